"""Qwen2.5-VL's vision tower with its window attention batched, for the model our engine drives.

PaddleFormers' tower attends window by window: per block it splits q/k/v into one piece per
window (64 patches each for a 448x448 image: 16 windows) and runs eager attention on each in a
Python loop, then concatenates. Profiled on `demo-bench`, those splits, tiny matmuls and the
loop were a large share of a 448x448 image's tower. Here windows of equal length are stacked and
attended in one batched matmul; everything else (patch embedding, rotary, norms, MLPs, merger,
the window order) is PaddleFormers' own modules and functions, in the library's order, so the
output equals the library's tower within fp32 rounding (tested).

Installed per model instance by serving.engine (the tutorial's server keeps the library's tower).
"""

from __future__ import annotations

from functools import partial

import numpy as np


def install(model) -> None:
    visual = model.model.visual
    visual.forward = partial(forward, visual)


def forward(visual, hidden_states, grid_thw):
    """Qwen2_5_VisionTransformerPretrainedModel.forward (inference), window attention batched."""
    import paddle

    hidden_states = visual.patch_embed(hidden_states)
    rotary_pos_emb = visual.rot_pos_emb(grid_thw)
    window_index, cu_window_seqlens = visual.get_window_index(grid_thw)
    seq_len = int(hidden_states.shape[0])
    unit = visual.spatial_merge_unit
    hidden_states = hidden_states.reshape([seq_len // unit, unit, -1])[window_index].reshape([seq_len, -1])
    rotary_pos_emb = rotary_pos_emb.reshape([seq_len // unit, unit, -1])[window_index].reshape([seq_len, -1])
    emb = paddle.cat((rotary_pos_emb, rotary_pos_emb), axis=-1)
    cos, sin = emb.cos(), emb.sin()

    grid = np.asarray(grid_thw.numpy() if hasattr(grid_thw, "numpy") else grid_thw).reshape(-1, 3)
    full = np.concatenate([[0], np.cumsum(np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]))])
    windows = _segments(np.asarray(cu_window_seqlens))
    segments = {True: _segments(full), False: windows}
    for layer_num, block in enumerate(visual.blocks):
        starts_lengths = segments[layer_num in visual.fullatt_block_indexes]
        hidden_states = hidden_states + _attention(block.attn, block.norm1(hidden_states), starts_lengths, cos, sin)
        hidden_states = hidden_states + block.mlp(block.norm2(hidden_states))
    hidden_states = visual.merger(hidden_states)
    return hidden_states[paddle.argsort(x=window_index), :]


def _segments(bounds) -> list:
    """Cumulative boundaries -> [(length, starts)] for each distinct non-zero length."""
    bounds = np.unique(bounds)  # as unique_consecutive on a sorted list: drops empty windows
    starts, lengths = bounds[:-1], np.diff(bounds)
    return [(int(n), starts[lengths == n]) for n in np.unique(lengths)]


def _attention(attn, hidden_states, segments, cos, sin):
    """Qwen2_5_VLVisionAttention.forward with the windows of each length attended together."""
    import paddle
    from paddleformers.transformers.qwen2_5_vl.modeling import apply_rotary_pos_emb_vision

    seq_length = int(hidden_states.shape[0])
    q, k, v = attn.qkv(hidden_states).reshape([seq_length, 3, attn.num_heads, -1]).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # [n, heads, d]
    if len(segments) == 1 and int(segments[0][1][0]) == 0:  # one length, contiguous from 0: a reshape
        length, starts = segments[0]
        out = _attend(q, k, v, len(starts), length, attn.scaling).reshape([seq_length, -1])
    else:
        pieces, order = [], []
        for length, starts in segments:
            index = (starts[:, None] + np.arange(length)[None, :]).reshape(-1)
            picked = paddle.to_tensor(index)
            pieces.append(_attend(q[picked], k[picked], v[picked], len(starts), length, attn.scaling))
            order.append(index)
        out = paddle.concat(pieces, axis=0)[paddle.to_tensor(np.argsort(np.concatenate(order)))]
        out = out.reshape([seq_length, -1])
    return attn.proj(out)


def _attend(q, k, v, count: int, length: int, scaling: float):
    """[count * length, heads, d] each -> attention within each run of `length` rows -> [count * length, heads, d]."""
    import paddle
    import paddle.nn.functional as F

    heads, dim = q.shape[1], q.shape[2]
    q, k, v = (t.reshape([count, length, heads, dim]).transpose([0, 2, 1, 3]) for t in (q, k, v))
    scores = paddle.matmul(q, k, transpose_y=True) * scaling
    weights = F.softmax(scores, axis=-1, dtype=paddle.float32).astype(q.dtype)
    out = paddle.matmul(weights, v)  # [count, heads, length, d]
    return out.transpose([0, 2, 1, 3]).reshape([count * length, heads, dim])
