"""The vision tower's output, cached by image or video: a second question about a picture or a clip skips the tower.

Qwen2_5_VLModel.forward asks `self.get_image_features(pixel_values, grid)` for the embeddings
of all images in the batch, and `self.get_video_features(pixel_values_videos, grid)` for those of
all videos; the wrappers installed here compute only the ones not cached. `keys()` gives the
content keys of the images in the running batch, in order, and `video_keys()` those of the videos.
"""

from __future__ import annotations

import numpy as np


def install(model, cache, keys, video_keys=None) -> None:
    inner = getattr(model, "model", None)
    for name, batch_keys in (("get_image_features", keys), ("get_video_features", video_keys)):
        original = getattr(inner, name, None)
        if original is not None and batch_keys is not None:
            setattr(inner, name, _cached(original, cache, batch_keys))


def _cached(original, cache, keys):
    def features(pixel_values, grid_thw=None):
        import paddle

        batch_keys = keys()
        grid = grid_thw.numpy() if hasattr(grid_thw, "numpy") else np.asarray(grid_thw)
        if len(batch_keys) != len(grid):
            return original(pixel_values, grid_thw)
        found = [cache.get(k) for k in batch_keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            sizes = [int(np.prod(g)) for g in grid]
            parts = paddle.split(pixel_values, sizes, axis=0)
            computed = original(paddle.concat([parts[i] for i in missing], axis=0), paddle.to_tensor(grid[missing]))
            for i, embeddings in zip(missing, computed):
                found[i] = embeddings
                cache.put(batch_keys[i], embeddings, nbytes(embeddings))
        return tuple(found)

    return features


def nbytes(tensor) -> int:
    return int(np.prod(tensor.shape)) * (4 if str(tensor.dtype).endswith("float32") else 2)
