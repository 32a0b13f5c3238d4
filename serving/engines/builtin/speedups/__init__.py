"""Faster equivalents of PaddleFormers' slowest pieces, installed on the model our engine drives.

- attention: grouped-query attention without copying K/V per query head;
- attention_layer: the language model's attention layer, its rotary tables prepared once per forward pass;
- vision_tower: the vision tower's window attention batched instead of a loop of windows;
- rms_norm: RMSNorm in one Paddle kernel (CPU, float32).

Each is the same maths as the library's (tested equal within fp32 rounding, the same greedy
tokens). They are installed on the model instance by the built-in engine, never by the loader
(serving.model.loader), so the tutorial's baseline server (same loader) keeps the library's code.
`library_code(model)` puts the library's code back for a while: the tests' reference.
"""

from __future__ import annotations

from contextlib import contextmanager

from serving.engines.builtin.speedups import attention, attention_layer, rms_norm, vision_tower


def install(model, device: str) -> None:
    """On a CPU, where each was measured (and PaddleFormers runs eager attention). On a GPU the library's
    code stays, with the sdpa/flash kernels it may pick there, until these are measured on one."""
    if device != "cpu":
        return
    attention.install(model)
    attention_layer.install(model)
    vision_tower.install(model)
    rms_norm.install(model)


@contextmanager
def library_code(model):
    """PaddleFormers' own attention, vision tower and norms inside the block; ours again after it."""
    overridden = [layer for layer in model.sublayers() if "forward" in layer.__dict__]
    saved = [layer.__dict__.pop("forward") for layer in overridden]
    previous = attention.use(model, "eager")
    try:
        yield
    finally:
        attention.use(model, previous)
        for layer, forward in zip(overridden, saved):
            layer.forward = forward
