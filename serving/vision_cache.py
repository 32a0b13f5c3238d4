"""The vision tower's output, cached by image: a second question about a picture skips the tower.

Qwen2_5_VLModel.forward asks `self.get_image_features(pixel_values, grid)` for the embeddings
of all images in the batch; the wrapper installed here computes only the ones not cached.
`keys()` gives the content keys of the images in the running batch, in order.
"""

from __future__ import annotations

import numpy as np


def install(model, cache, keys) -> None:
    inner = getattr(model, "model", None)
    original = getattr(inner, "get_image_features", None)
    if original is None:
        return

    def get_image_features(pixel_values, image_grid_thw=None):
        import paddle

        batch_keys = keys()
        grid = image_grid_thw.numpy() if hasattr(image_grid_thw, "numpy") else np.asarray(image_grid_thw)
        if len(batch_keys) != len(grid):
            return original(pixel_values, image_grid_thw)
        found = [cache.get(k) for k in batch_keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            sizes = [int(np.prod(g)) for g in grid]
            parts = paddle.split(pixel_values, sizes, axis=0)
            computed = original(paddle.concat([parts[i] for i in missing], axis=0), paddle.to_tensor(grid[missing]))
            for i, embeddings in zip(missing, computed):
                found[i] = embeddings
                cache.put(batch_keys[i], embeddings, _nbytes(embeddings))
        return tuple(found)

    inner.get_image_features = get_image_features


def _nbytes(tensor) -> int:
    return int(np.prod(tensor.shape)) * (4 if str(tensor.dtype).endswith("float32") else 2)
