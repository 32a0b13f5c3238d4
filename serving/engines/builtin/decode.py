"""The running batch of the built-in engine: the model's forward pass, driven one step at a time.

Rows join and leave at every step. A new request is prefilled on its own (in chunks, so a long
image prompt shares the machine with everyone's decoding), then its KV cache is merged into the
running batch: both caches are left-padded to a common length and stacked, and the attention
mask marks the padding. Finished rows are dropped at once and padding columns that no row needs
any more are trimmed away.

Qwen2.5-VL's rotary positions are 3-D (time, height, width) for image tokens; after the prompt
every row advances one position per token from its own prompt's largest position. Each row
carries that number itself and the position ids are always passed explicitly, so the model's
shared `rope_deltas` attribute (which assumes one batch from one prefill) is never used.

This drives PaddleFormers' own modules (embedding, vision tower, language model, lm_head): the
maths is the library's; only the scheduling is ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from serving.engines.builtin import kv_cache, vision_cache
from serving.engines.builtin.speedups import vision_tower


def _paddle():
    import paddle

    return paddle


FORWARD_TOKENS = 1024  # most prompt tokens in one forward pass (bounds the attention scores' memory)
SCORE_TOKENS = 64  # prompt positions whose logits exist at once when a prompt is scored (64 x 151,936 floats: 39 MB)


@dataclass

class PrefillResult:
    logits: object  # [1, vocab] for the prompt's last position
    cache: object  # the prompt's DynamicCache, [1, heads, n, dim] per layer
    length: int  # n: tokens in the cache
    next_position: int  # the rope position of the first generated token
    prompt_logprobs: Optional[list] = None  # when the prompt was scored: None, then a TokenLogprob per later token


class Prefill:
    """One prompt being prefilled, `chunk` tokens at a time. The vision tower runs first for the whole
    prompt's images and videos (its output goes into the prompt's embeddings): at once, or, given the
    vision cache and the images' keys (images only, not all cached, our tower installed), a few blocks
    at a time through `advance_vision`.

    Given `reuse` (a serving.engines.builtin.prefix_cache.Hit), the cache starts with that prefix's KV and
    only the rest of the prompt is prefilled: a chunked prefill whose first chunk was computed earlier.
    Images and videos wholly inside the prefix need no embeddings, so neither the tower nor the vision
    cache is asked for them; those in the rest go through both as without a hit. Rope positions are
    computed for the whole prompt (they depend on every earlier token and grid) and the rest's are used.

    Given `score_prompt` (callable: (float32 logits [c, vocab] of c prompt positions, the c prompt tokens they
    predict) -> a TokenLogprob per token), every chunk's hidden states also go through lm_head, SCORE_TOKENS
    positions at a time, and the result carries each prompt token's logprob (the first token's None). Such a
    prefill starts at the prompt's first token (no `reuse`): the positions a prefix hit skips have no logits.
    The sampling logits of the last position are computed as without scoring (the same first token).
    """

    def __init__(self, model, arrays: dict, set_media_keys=None, vision_cache=None, image_keys=(), video_keys=(),
                 reuse=None, score_prompt=None):
        paddle = _paddle()
        from paddleformers.transformers.cache_utils import DynamicCache

        self.model = model
        inner = model.model
        assert reuse is None or score_prompt is None, "a scored prompt needs the logits of all its positions"
        start = reuse.length if reuse is not None else 0
        self.score_prompt = score_prompt
        self.prompt_ids = np.asarray(arrays["input_ids"]).reshape(-1) if score_prompt is not None else None
        self.prompt_logprobs = [None] if score_prompt is not None else None
        full_ids = paddle.to_tensor(arrays["input_ids"])
        ids = full_ids[:, start:] if start else full_ids  # the tokens to prefill
        embeds = inner.get_input_embeddings()(ids)
        media = _suffix_media(arrays, reuse)
        image_keys = tuple(image_keys)[reuse.images:] if reuse is not None else tuple(image_keys)
        video_keys = tuple(video_keys)[reuse.videos:] if reuse is not None else tuple(video_keys)
        grid = video_grid = seconds = None
        self.tower = None  # a vision_tower.TowerRun while the images' tower is under way
        self.media_tokens = _media_tokens(media)  # the tokens the tower's work here stands for
        if "pixel_values" in media:
            suffix_grid = paddle.to_tensor(media["image_grid_thw"])
            if _can_stage(inner, media, vision_cache, image_keys):
                self.tower = vision_tower.TowerRun(inner.visual, paddle.to_tensor(media["pixel_values"]), suffix_grid)
                self._grid, self._cache, self._keys, self._ids = suffix_grid, vision_cache, image_keys, ids
            else:
                if set_media_keys is not None:  # the vision cache's keys for these images and videos
                    set_media_keys(image_keys, video_keys)
                features = inner.get_image_features(paddle.to_tensor(media["pixel_values"]), suffix_grid)
                embeds = _put_media(inner, ids, embeds, "image", features)
        if "pixel_values_videos" in media:  # as the model's forward does it, after the images
            if set_media_keys is not None:
                set_media_keys(image_keys, video_keys)
            features = inner.get_video_features(paddle.to_tensor(media["pixel_values_videos"]),
                                                paddle.to_tensor(media["video_grid_thw"]))
            embeds = _put_media(inner, ids, embeds, "video", features)
        if "image_grid_thw" in arrays:
            grid = paddle.to_tensor(arrays["image_grid_thw"])
        if "video_grid_thw" in arrays:
            video_grid = paddle.to_tensor(arrays["video_grid_thw"])
            # seconds per temporal patch (time positions), as Python floats of their float32 values: the same
            # positions as a tensor gives, without Paddle's C++ "type promotion" warning on every video (int64
            # positions times a float32 tensor in PaddleFormers' get_rope_index)
            seconds = [float(s) for s in np.asarray(_numpy(arrays["second_per_grid_ts"]), dtype=np.float32).reshape(-1)]
        mask = paddle.ones(full_ids.shape, dtype="int64")
        positions, _ = inner.get_rope_index(full_ids, grid, video_grid, seconds, attention_mask=mask)  # [3, 1, n]
        self.next_position = int(positions.max()) + 1
        self.embeds = embeds
        self.positions = positions[:, :, start:] if start else positions
        self.length = int(full_ids.shape[1])
        self.start = self.done = start  # prompt tokens already in the cache
        self.cache = DynamicCache(config=inner.language_model.config)
        if reuse is not None:  # a copy: the row's cache is its own, whatever becomes of the prefix cache's entry
            for layer, (keys, values) in zip(self.cache.layers, reuse.layers):
                layer.update(keys, values)

    @property
    def tower_blocks(self) -> int:
        return len(self.model.model.visual.blocks)

    @property
    def vision_blocks_left(self) -> int:
        return 0 if self.tower is None else self.tower.blocks_left

    def advance_vision(self, blocks: int) -> None:
        """Run up to `blocks` more blocks of the tower; after the last, its output goes into the embeddings
        and, per image, into the vision cache."""
        self.tower.advance(blocks)
        if self.tower.blocks_left:
            return
        inner = self.model.model
        merged = self.tower.output()
        sizes = (self._grid.prod(-1) // inner.visual.spatial_merge_size ** 2).tolist()
        features = _paddle().split(merged, sizes)
        for key, image in zip(self._keys, features):
            self._cache.put(key, image, vision_cache.nbytes(image))
        self.embeds = _put_media(inner, self._ids, self.embeds, "image", features)
        self.tower = self._ids = None

    @property
    def remaining(self) -> int:
        return self.length - self.done

    def run(self, tokens: int, cancelled=lambda: False, pause=lambda: False) -> Optional[PrefillResult]:
        """Prefill up to `tokens` more prompt tokens; the result once the whole prompt is in. One forward
        pass takes at most FORWARD_TOKENS of them: its attention scores (heads x new tokens x all tokens)
        stay bounded whatever the prompt's length (a 9,000-token prompt at once took 17 GB on the demo).
        Between passes, `cancelled()` stops a request given up (on an idle engine the whole prompt is asked
        for at once: 80,000 tokens ran on for minutes after their client left), and `pause()` ends this
        call early, after one pass at least (so a prompt always moves on), with the prompt unfinished."""
        paddle = _paddle()
        assert self.tower is None, "the vision tower has blocks left"
        end, began = min(self.length, self.done + max(1, tokens)), self.done
        while self.done < end:
            if cancelled() or (self.done > began and pause()):
                return None
            start, stop = self.done, min(end, self.done + FORWARD_TOKENS)
            here = slice(start - self.start, stop - self.start)  # embeddings and positions start at self.start
            hidden = self.model.model.language_model(
                input_ids=None, inputs_embeds=self.embeds[:, here], position_ids=self.positions[:, :, here],
                attention_mask=paddle.ones([1, stop], dtype="int64"), past_key_values=self.cache, use_cache=True,
                return_dict=True, cache_position=paddle.arange(start, stop)).last_hidden_state
            if self.score_prompt is not None:
                self._score(hidden, start, stop)
            self.done = stop
        if end < self.length:
            return None
        logits = self.model.lm_head(hidden[:, -1:, :])[:, -1, :]
        self.embeds = self.positions = None  # no longer needed: free them now
        return PrefillResult(logits, self.cache, self.length, self.next_position, self.prompt_logprobs)

    def _score(self, hidden, start: int, stop: int) -> None:
        """The logprobs of the prompt tokens that positions start..stop-1 predict (the prompt's last position
        predicts the answer, not a prompt token), from this chunk's hidden states [1, stop - start, dim]."""
        last = min(stop, self.length - 1)  # positions before it score tokens 1..length-1
        for first in range(start, last, SCORE_TOKENS):
            until = min(last, first + SCORE_TOKENS)
            logits = self.model.lm_head(hidden[:, first - start:until - start, :])[0]
            rows = logits.astype("float32").numpy()
            self.prompt_logprobs.extend(self.score_prompt(rows, self.prompt_ids[first + 1:until + 1]))


class RunningBatch:
    """The KV cache of every decoding row, left-padded to one length, with its attention mask.

    Row i of every tensor belongs to `self.rows[i]` (whatever the engine keeps per request).
    """

    def __init__(self, model):
        self.model = model
        self.rows: list = []
        self.cache = None  # DynamicCache, [rows, heads, length, dim] per layer
        self.mask = None  # int64 [rows, length]: 1 where a row has a real token
        self.positions: list[int] = []  # each row's next rope position
        self.last_tokens: list[int] = []  # each row's latest token: the next step's input

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def kv_tokens(self) -> int:
        """Token slots the cache holds now, padding included (rows x length)."""
        return len(self.rows) * self.length

    def add(self, row, prefill: PrefillResult, first_token: int) -> None:
        """Merge a prefilled prompt into the batch; its first generated token is the next input."""
        paddle = _paddle()
        new_mask = paddle.ones([1, prefill.length], dtype="int64")
        if self.cache is None:
            self.cache, self.mask = prefill.cache, new_mask
        else:
            width = max(self.length, prefill.length)
            for mine, theirs in zip(self.cache.layers, prefill.cache.layers):
                mine.keys = paddle.concat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)], axis=0)
                mine.values = paddle.concat([_pad_left(mine.values, width, 2),
                                             _pad_left(theirs.values, width, 2)], axis=0)
            self.mask = paddle.concat([_pad_left(self.mask, width, 1), _pad_left(new_mask, width, 1)], axis=0)
        self.rows.append(row)
        self.positions.append(prefill.next_position)
        self.last_tokens.append(first_token)

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at these indices (in order), and trim padding no row needs any more."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.positions = [self.positions[i] for i in keep]
        self.last_tokens = [self.last_tokens[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        paddle = _paddle()
        index = paddle.to_tensor(keep, dtype="int64")
        mask = paddle.index_select(self.mask, index, axis=0)
        used = np.flatnonzero(mask.numpy().any(axis=0))
        start = int(used[0]) if used.size else 0
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = paddle.index_select(layer.keys, index, axis=0)[:, :, start:, :]
            layer.values = paddle.index_select(layer.values, index, axis=0)[:, :, start:, :]

    def row_kv(self, index: int) -> tuple:
        """(one (keys, values) pair per layer, [1, heads, n, dim], n) of row `index`'s real tokens: a compact
        copy, without the left padding, that outlives the batch's buffers."""
        length = int(self.mask[index].sum())
        start = self.length - length  # a row's tokens are the last `length` columns (padding is on the left)
        return [(layer.keys[index:index + 1, :, start:].clone(), layer.values[index:index + 1, :, start:].clone())
                for layer in self.cache.layers], length

    def step(self):
        """One decoding step for every row: logits [rows, vocab] for each row's next token."""
        paddle = _paddle()
        inner = self.model.model
        self.cache.layers = [kv_cache.roomy(layer) for layer in self.cache.layers]  # no copy of the cache per step
        tokens = paddle.to_tensor(self.last_tokens, dtype="int64").reshape([-1, 1])
        embeds = inner.get_input_embeddings()(tokens)
        positions = paddle.to_tensor(self.positions, dtype="int64").reshape([1, -1, 1]).expand([3, -1, 1])
        self.mask = paddle.concat([self.mask, paddle.ones([len(self.rows), 1], dtype="int64")], axis=1)
        length = self.length
        hidden = inner.language_model(
            input_ids=None, inputs_embeds=embeds, position_ids=positions, attention_mask=self.mask,
            past_key_values=self.cache, use_cache=True, return_dict=True,
            cache_position=paddle.arange(length - 1, length)).last_hidden_state
        self.positions = [p + 1 for p in self.positions]
        return self.model.lm_head(hidden)[:, -1, :]

    def set_next(self, tokens: list[int]) -> None:
        self.last_tokens = list(tokens)


def _suffix_media(arrays: dict, reuse) -> dict:
    """The pixel arrays and grids of the images and videos to embed: all of them, or (given a prefix-cache hit)
    those after the ones wholly inside the reused prefix."""
    if reuse is None:
        return arrays
    media = {}
    for pixels, grids, skip in (("pixel_values", "image_grid_thw", reuse.images),
                                ("pixel_values_videos", "video_grid_thw", reuse.videos)):
        if grids not in arrays or skip >= len(arrays[grids]):
            continue
        rows = int(np.prod(arrays[grids][:skip], axis=-1).sum()) if skip else 0  # their patches come first
        media[pixels] = arrays[pixels][rows:]
        media[grids] = arrays[grids][skip:]
        if pixels == "pixel_values_videos":
            media["second_per_grid_ts"] = arrays["second_per_grid_ts"][skip:]
    return media


def _media_tokens(arrays: dict) -> int:
    """Prompt tokens that stand for image or video patches (each covers a 2x2 group of patches)."""
    grids = [arrays[k] for k in ("image_grid_thw", "video_grid_thw") if k in arrays]
    return sum(int(np.prod(grid, axis=-1).sum()) // 4 for grid in grids)


def _can_stage(inner, arrays: dict, cache, keys) -> bool:
    """The tower can go block by block: images only, each with a cache key, not all of them cached
    (then the cache serves them at once), and serving.engines.builtin.speedups.vision_tower installed on this model."""
    if cache is None or "pixel_values_videos" in arrays or len(keys) != len(arrays["image_grid_thw"]):
        return False
    if all(key in cache for key in keys):
        return False
    return getattr(inner.visual.forward, "func", None) is vision_tower.forward


def _put_media(inner, ids, embeds, kind: str, features):
    """The vision tower's output (one tensor per image or video) in place of the prompt's placeholder tokens."""
    features = _paddle().concat(list(features), axis=0).astype(embeds.dtype)
    image_mask, video_mask = inner.get_placeholder_mask(ids, inputs_embeds=embeds, **{f"{kind}_features": features})
    return embeds.masked_scatter(image_mask if kind == "image" else video_mask, features)


def _pad_left(tensor, width: int, axis: int):
    """Zero-pad `tensor` on the left of `axis` to `width` (the mask keeps padding out of attention)."""
    missing = width - int(tensor.shape[axis])
    if missing <= 0:
        return tensor
    paddle = _paddle()
    shape = list(tensor.shape)
    shape[axis] = missing
    return paddle.concat([paddle.zeros(shape, dtype=tensor.dtype), tensor], axis=axis)


def _numpy(value):
    """A tensor's values as numpy; lists and arrays as they are."""
    return value.numpy() if hasattr(value, "numpy") else value
