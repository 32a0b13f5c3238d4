"""Known noise that PaddlePaddle, PaddleFormers, transformers and setuptools print at start-up, silenced.

Importing `serving` runs `silence_library_noise()`, before anything imports Paddle: each message below is
dropped by its exact text, so every other warning (and all of our own) still shows. What is dropped, and
why it is noise here:

- "No ccache found" (Paddle's C++ extension helper): about compiling custom operators, which we never do.
- "Setuptools is replacing distutils." (setuptools' distutils shim, on Python 3.11 and older).
- "To copy construct from a tensor, it is recommended to use sourceTensor.clone().detach() ..." (Paddle's
  creation.py, on the first request): paddle.to_tensor given a tensor inside PaddleFormers' generation code; it
  copies, which is what that code wants.
- "PyTorch was not found. Models won't be available ..." (transformers, printed twice): we use
  PaddleFormers' models and PaddlePaddle on purpose; AI Studio's service refuses PyTorch.
- "Due to potential compatibility issues between PaddlePaddle and PyTorch ..." (PaddleFormers): the same.
- "The image processor of type `Qwen2VLImageProcessor` is now loaded as a fast processor ..." (PaddleFormers):
  the chat service resizes every image to sides that are multiples of 28 first, and on such images the fast
  and slow processors give identical pixels (docs: DESIGN, "Facts measured").
"""

from __future__ import annotations

import logging
import warnings

WARNINGS = (r"No ccache found", r"Setuptools is replacing distutils",
            r"To copy construct from a tensor, it is recommended to use sourceTensor\.clone\(\)\.detach\(\)")
LOG_LINES = {  # logger name -> starts of the messages dropped
    "transformers": ("PyTorch was not found.",),
    "PaddleFormers": ("Due to potential compatibility issues between PaddlePaddle and PyTorch",
                      "The image processor of type `Qwen2VLImageProcessor` is now loaded as a fast processor"),
}


class _DropKnown(logging.Filter):
    def __init__(self, starts: tuple):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is not ours to judge
            return True
        return not message.lstrip().startswith(self.starts)


def silence_library_noise() -> None:
    """Install the filters (idempotent)."""
    for pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    for name, starts in LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(starts))
