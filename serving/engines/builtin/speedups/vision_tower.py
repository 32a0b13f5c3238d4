"""Qwen2.5-VL's vision tower with its window attention batched, for the model our engine drives.

PaddleFormers' tower attends window by window: per block it splits q/k/v into one piece per
window (64 patches each for a 448x448 image: 16 windows) and runs eager attention on each in a
Python loop, then concatenates. Here windows of equal length are stacked and attended in one
batched matmul, and the per-op costs that dominate on a CPU are cut: rotary positions applied to
q and k at once (cos/sin tiled once per image, not broadcast per block; rotate_half as a matmul),
q scaled before the matmul instead of the [heads, n, n] scores after it, softmax without a
float32 cast when already float32, full attention a slice of rows at a time (its scores
stay in the CPU's cache), and the patch embedding (a Conv3d whose stride equals its
kernel) as the matmul it is. Measured in one process on `demo-bench` (library's tower and norm ->
this tower with the one-kernel norm of serving.engines.builtin.speedups.rms_norm): a 448x448 image 424 -> 227 ms, a
1008x1260 one (6,480 patches) 5.3 -> 2.5 s.
Norms, MLPs, merger, window order and rotary tables are PaddleFormers' own modules and functions;
the output equals the library's tower within fp32 rounding (tested).

Installed per model instance by serving.engines.builtin.speedups (the tutorial's server keeps the library's tower).
"""

from __future__ import annotations

from functools import partial

import numpy as np


def install(model) -> None:
    visual = model.model.visual
    visual.forward = partial(forward, visual)


def forward(visual, hidden_states, grid_thw):
    """Qwen2_5_VisionTransformerPretrainedModel.forward (inference), window attention batched."""
    run = TowerRun(visual, hidden_states, grid_thw)
    run.advance(run.blocks_left)
    return run.output()


class TowerRun:
    """One pass of the tower over some images, a few blocks at a time: the scheduler spreads a new
    image's tower over its turns (between decoding steps, behind streamed prompts) instead of one piece."""

    def __init__(self, visual, hidden_states, grid_thw):
        import paddle

        self.visual = visual
        hidden_states = _patch_embed(visual.patch_embed, hidden_states)
        rotary_pos_emb = visual.rot_pos_emb(grid_thw)
        self.window_index, cu_window_seqlens = visual.get_window_index(grid_thw)
        seq_len = int(hidden_states.shape[0])
        unit = visual.spatial_merge_unit
        self.hidden = hidden_states.reshape([seq_len // unit, unit, -1])[self.window_index].reshape([seq_len, -1])
        rotary_pos_emb = rotary_pos_emb.reshape([seq_len // unit, unit, -1])[self.window_index].reshape([seq_len, -1])
        emb = paddle.cat((rotary_pos_emb, rotary_pos_emb), axis=-1)
        heads = visual.blocks[0].attn.num_heads * 2  # q and k heads, rotated together
        self.rotary = (paddle.tile(emb.cos().unsqueeze(-2), [1, heads, 1]),
                       paddle.tile(emb.sin().unsqueeze(-2), [1, heads, 1]), _half_rotation(int(emb.shape[-1])))
        grid = np.asarray(grid_thw.numpy() if hasattr(grid_thw, "numpy") else grid_thw).reshape(-1, 3)
        full = np.concatenate([[0], np.cumsum(np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]))])
        self.segments = {True: _segments(full), False: _segments(np.asarray(cu_window_seqlens))}
        self.block = 0  # blocks done

    @property
    def blocks_left(self) -> int:
        return len(self.visual.blocks) - self.block

    def advance(self, blocks: int) -> None:
        for block in self.visual.blocks[self.block:self.block + blocks]:
            starts_lengths = self.segments[self.block in self.visual.fullatt_block_indexes]
            self.hidden = self.hidden + _attention(block.attn, block.norm1(self.hidden), starts_lengths, self.rotary)
            self.hidden = self.hidden + block.mlp(block.norm2(self.hidden))
            self.block += 1

    def output(self):
        """The merged patches, in the images' order (after the last block)."""
        import paddle

        return self.visual.merger(self.hidden)[paddle.argsort(x=self.window_index), :]


def _patch_embed(embed, pixels):
    """Qwen2_5_VisionPatchEmbed: its Conv3d's kernel equals its stride, so each patch is one dot product."""
    import paddle

    weight = embed.proj.weight  # [embed_dim, channels, t, p, p], the order of a patch's flattened pixels
    pixels = pixels.astype(weight.dtype).reshape([-1, int(np.prod(weight.shape[1:]))])
    return paddle.matmul(pixels, weight.reshape([weight.shape[0], -1]), transpose_y=True)


def _segments(bounds) -> list:
    """Cumulative boundaries -> [(length, starts)] for each distinct non-zero length."""
    bounds = np.unique(bounds)  # as unique_consecutive on a sorted list: drops empty windows
    starts, lengths = bounds[:-1], np.diff(bounds)
    return [(int(n), starts[lengths == n]) for n in np.unique(lengths)]


def _attention(attn, hidden_states, segments, rotary):
    """Qwen2_5_VLVisionAttention.forward with the windows of each length attended together."""
    import paddle

    seq_length, heads = int(hidden_states.shape[0]), attn.num_heads
    qkv = attn.qkv(hidden_states).reshape([seq_length, 3, heads, -1])
    qk = _rotate(qkv[:, :2].reshape([seq_length, 2 * heads, -1]), *rotary)  # q and k at once
    q, k, v = qk[:, :heads] * attn.scaling, qk[:, heads:], qkv[:, 2]
    if len(segments) == 1 and int(segments[0][1][0]) == 0:  # one length, contiguous from 0: a reshape
        length, starts = segments[0]
        out = _attend(q, k, v, len(starts), length)
    else:
        pieces, order = [], []
        for length, starts in segments:
            index = (starts[:, None] + np.arange(length)[None, :]).reshape(-1)
            picked = paddle.to_tensor(index)
            pieces.append(_attend(q[picked], k[picked], v[picked], len(starts), length))
            order.append(index)
        out = paddle.concat(pieces, axis=0)[paddle.to_tensor(np.argsort(np.concatenate(order)))]
    return attn.proj(out.reshape([seq_length, -1]))


def _rotate(x, cos, sin, rotation):
    """apply_rotary_pos_emb_vision's formula, x * cos + rotate_half(x) * sin, with cos and sin already
    the shape of x (Paddle's broadcasting is slow on a CPU) and rotate_half as a matmul with a signed
    permutation (exact: one term of +-x, the rest zeros). 1.7 ms instead of 6.5 ms per block here."""
    import paddle

    return x * cos + paddle.matmul(x, rotation) * sin


def _half_rotation(dim: int):
    """R with x @ R == rotate_half(x) == concat(-x2, x1) for x = concat(x1, x2)."""
    import paddle

    half = dim // 2
    rotation = np.zeros((dim, dim), dtype=np.float32)
    rotation[np.arange(half) + half, np.arange(half)] = -1.0
    rotation[np.arange(half), np.arange(half) + half] = 1.0
    return paddle.to_tensor(rotation)


SCORES_PER_CHUNK = 2**20  # attention scores computed at once (4 MB in float32): they stay in the CPU's cache


def _attend(q, k, v, count: int, length: int):
    """[count * length, heads, d] each (q already scaled) -> attention within each run of `length` rows.
    A long run (a full-attention block over a whole image) goes a slice of query rows at a time: each
    row's scores and softmax are its own, so the result is the same, and the scores stay in the CPU's
    cache (measured alone, full attention over 1,024 patches x 16 heads: 80 -> 37 ms; 5,120: 2.9 -> 0.9 s;
    in the whole tower, 448x448: 238 -> 227 ms; 1008x1260: 3.0 -> 2.5 s)."""
    import paddle
    import paddle.nn.functional as F

    heads, dim = q.shape[1], q.shape[2]
    q, k, v = (t.reshape([count, length, heads, dim]).transpose([0, 2, 1, 3]) for t in (q, k, v))
    rows = max(16, 2 ** int(np.log2(max(1, SCORES_PER_CHUNK // (count * heads * length)))))
    if rows < length:  # laid out once, not again by every slice's matmul
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    pieces = []
    for start in range(0, length, rows):
        scores = paddle.matmul(q[:, :, start:start + rows] if rows < length else q, k, transpose_y=True)
        if scores.dtype == paddle.float32:
            weights = F.softmax(scores, axis=-1)
        else:
            weights = F.softmax(scores, axis=-1, dtype=paddle.float32).astype(q.dtype)
        pieces.append(paddle.matmul(weights, v))  # [count, heads, rows, d]
    out = pieces[0] if len(pieces) == 1 else paddle.concat(pieces, axis=2)
    return out.transpose([0, 2, 1, 3]).reshape([count * length, heads, dim])
