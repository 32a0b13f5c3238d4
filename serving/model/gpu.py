"""Choices made before loading: the dtype, and whether the model will fit in free GPU or host memory.

Pure arithmetic on a Qwen2.5-VL config (no Paddle needed), so it runs and is tested on any
machine; `gpu_memory(device)` is the one function that asks the GPU.

    needed = estimate_model_memory(config, "bfloat16", context_tokens=8192)
    ok, message = check_fits(free_bytes, needed)

The estimate is weights + KV cache for the context + an activation margin (the vision tower's
attention over the largest image, the prefill's float32 logits, a fixed workspace). Only weights
that cannot fit make `check_fits` say no (loading would crash halfway); a margin that does not
fit is a warning, since it depends on the requests (image size, prompt length).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from serving.config import Settings

GiB = 1024 ** 3
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
WORKSPACE_BYTES = 768 * 1024 ** 2  # Paddle's allocator, cuBLAS/cuDNN workspaces, fragmentation
TIGHT_FRACTION = 0.9  # needing more than this share of the free memory is reported as tight
PROMPT_TOKENS = 4096  # the prompt the estimate makes room for (beside the answer's MAX_TOKENS_LIMIT)
_DEFAULTS = Settings()  # the limits' defaults have one owner: the settings

# Structural fields of the published checkpoints, for hub ids whose config.json is not on disk
# yet (the vision tower is the same 32-block, 1280-wide ViT in all of them).
_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
           "patch_size": 14, "temporal_patch_size": 2, "in_chans": 3, "spatial_merge_size": 2}
KNOWN_CONFIGS = {
    "3B": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
           "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "7B": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
    "32B": {"hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
            "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False},
    "72B": {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False},
}


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    dtype: str
    weights: int  # bytes
    kv_cache: int
    activations: int
    context_tokens: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def describe(self) -> str:
        return (f"~{gib(self.total)} for {self.parameters / 1e9:.2f}B parameters in {self.dtype}: weights "
                f"{gib(self.weights)} + KV cache {gib(self.kv_cache)} ({self.context_tokens} tokens) + "
                f"activations and workspace {gib(self.activations)}")


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


# --------------------------------------------------------------------------- configs


def _text(config: dict) -> dict:
    """The language model's fields: top level, overridden by text_config where present."""
    merged = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
    merged.update(config.get("text_config") or {})
    return merged


def _vision(config: dict) -> dict:
    return {**_VISION, **(config.get("vision_config") or {})}


def known_config(name: str) -> dict | None:
    """The structure of a published Qwen2.5-VL size named in a hub id ('...-3B-...'), else None."""
    match = re.search(r"(?<![\d.])(\d+)B(?![a-z])", str(name), re.IGNORECASE)
    size = match and f"{match.group(1)}B".upper()
    if size not in KNOWN_CONFIGS:
        return None
    text = KNOWN_CONFIGS[size]
    return {**text, "vision_config": {**_VISION, "out_hidden_size": text["hidden_size"]}}


def read_config(source) -> dict | None:
    """config.json of a local checkpoint folder, or the known structure a hub id names, else None."""
    path = Path(str(source)) / "config.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return known_config(str(source))


def parameter_count(config: dict) -> int:
    """Parameters of a Qwen2.5-VL from its config: language model + vision tower + merger."""
    t, v = _text(config), _vision(config)
    h, inter, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    heads = t["num_attention_heads"]
    kv = t.get("num_key_value_heads", heads) * (h // heads)
    vocab = t["vocab_size"]
    attention = (h * h + h) + 2 * (h * kv + kv) + h * h  # q, k, v with biases; o without
    mlp = 3 * h * inter  # gate, up, down; no biases
    text = vocab * h + layers * (attention + mlp + 2 * h) + h
    if not t.get("tie_word_embeddings", config.get("tie_word_embeddings", False)):
        text += vocab * h  # a separate lm_head
    c, ci = v["hidden_size"], v["intermediate_size"]
    patch = v.get("in_chans", 3) * v.get("temporal_patch_size", 2) * v.get("patch_size", 14) ** 2 * c
    block = 2 * c + (3 * c * c + 3 * c) + (c * c + c) + 2 * (c * ci + ci) + (ci * c + c)
    merged = c * v.get("spatial_merge_size", 2) ** 2
    out = v.get("out_hidden_size", h)
    merger = c + (merged * merged + merged) + (merged * out + out)
    return text + patch + v["depth"] * block + merger


# --------------------------------------------------------------------------- the estimate


def estimate_model_memory(config, dtype: str = "bfloat16", context_tokens: int = 8192, batch_size: int = 1,
                          max_pixels: int = _DEFAULTS.max_pixels) -> MemoryEstimate:
    """GPU bytes Qwen2.5-VL needs: `config` is a config dict, or a parameter count (weights only
    then, plus the fixed workspace)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    size = DTYPE_BYTES[dtype]
    if isinstance(config, int):
        return MemoryEstimate(config, dtype, config * size, 0, WORKSPACE_BYTES, context_tokens)
    t, v = _text(config), _vision(config)
    params = parameter_count(config)
    heads = t["num_attention_heads"]
    head_dim = t["hidden_size"] // heads
    kv_heads = t.get("num_key_value_heads", heads)
    # K and V for every layer and token of every sequence in the batch.
    kv_cache = 2 * t["num_hidden_layers"] * kv_heads * head_dim * context_tokens * batch_size * size
    # The vision tower's full-attention blocks hold a heads x patches x patches score matrix
    # for the largest image (max_pixels / 14^2 patches).
    patches = max_pixels // (v.get("patch_size", 14) ** 2)
    vision = v["num_heads"] * patches * patches * size
    # The prefill computes float32 logits over the vocabulary for the prompt's tokens.
    prompt = min(context_tokens, PROMPT_TOKENS)
    logits = batch_size * prompt * t["vocab_size"] * 4
    activations = vision + logits + WORKSPACE_BYTES
    return MemoryEstimate(params, dtype, params * size, kv_cache, activations, context_tokens)


def check_fits(free_bytes: int | None, needed, device: str = "gpu:0") -> tuple[bool, str]:
    """(fits, one line to print). `needed` is a MemoryEstimate or a byte count.

    Not fitting means the weights alone (plus the workspace) exceed the free memory: loading
    would crash. When only the activation margin does not fit, the model loads but a large
    image or a long prompt may run out: that is reported as a warning, still (True, ...).
    """
    if isinstance(needed, MemoryEstimate):
        total, floor, detail = needed.total, needed.weights + WORKSPACE_BYTES, needed.describe()
    else:
        total = floor = int(needed)
        detail = f"~{gib(total)}"
    if free_bytes is None:
        return True, f"GPU memory: the model needs {detail}; free memory on {device} is unknown"
    if floor > free_bytes:
        return False, (
            f"not enough GPU memory on {device}: the model needs {detail}, but only {gib(free_bytes)} is free, "
            "less than its weights: loading would end in an out-of-memory crash. Free the GPU (other notebook "
            "kernels that loaded a model hold its memory: shut them down), choose a larger GPU or a smaller "
            "model (Qwen/Qwen2.5-VL-3B-Instruct), or use --device cpu.")
    if total > free_bytes:
        return True, (
            f"GPU memory is short on {device}: the model needs {detail}, {gib(free_bytes)} is free. It loads, but a "
            "large image or a long prompt may run out of memory: lower --max-pixels and --max-tokens-limit.")
    if total > TIGHT_FRACTION * free_bytes:
        return True, (f"GPU memory is tight on {device}: the model needs {detail} of {gib(free_bytes)} free; "
                      "large images or long answers may run out (lower --max-pixels if they do)")
    return True, f"GPU memory: the model needs {detail}; {gib(free_bytes)} free on {device}"


def dtype_reason(device: str, dtype: str, requested: str = "auto", capability: tuple | None = None) -> str:
    """The line that says which dtype was chosen and why."""
    if requested not in (None, "", "auto"):
        return f"dtype {dtype}: as asked (--dtype {requested})"
    if str(device).startswith("cpu"):
        return "dtype float32: on CPU (Paddle's half-precision CPU kernels are slow or missing)"
    cc = f"compute capability {capability[0]}.{capability[1]}" if capability else "this GPU"
    if dtype == "bfloat16":
        return f"dtype bfloat16: {cc} supports it (8.0 or newer: Ampere, Ada, Hopper)"
    return (f"dtype float16: {cc} has no fast bfloat16 (it needs 8.0 or newer, e.g. A100/A800, RTX 30xx); "
            "float16 halves memory like bfloat16 but can overflow on rare inputs")


# --------------------------------------------------------------------------- the GPU itself


def gpu_memory(device: str) -> tuple[int | None, tuple | None]:
    """(free bytes, compute capability) of a GPU device such as 'gpu:0'; (None, None) on CPU.

    Free memory is what the driver reports (other processes' use, e.g. another notebook kernel
    holding a model, counts against it): Paddle's `paddle.cuda.mem_get_info`, else nvidia-smi.
    """
    if not str(device).startswith("gpu"):
        return None, None
    import paddle

    index = int(device.split(":")[1]) if ":" in device else 0
    capability = None
    try:
        capability = tuple(paddle.device.cuda.get_device_capability(index))
    except Exception:  # noqa: BLE001
        pass
    try:
        free, _total = paddle.cuda.mem_get_info(index)
        return int(free), capability
    except Exception:  # noqa: BLE001 - older Paddle: ask the driver
        return _nvidia_smi_free(index), capability


def _nvidia_smi_free(index: int) -> int | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits",
                              "-i", str(index)], capture_output=True, text=True, timeout=10).stdout
        return int(float(out.strip().splitlines()[0])) * 1024 ** 2
    except Exception:  # noqa: BLE001 - no nvidia-smi, or an answer we cannot read
        return None


def check_before_load(source, device: str, dtype: str, requested_dtype: str = "auto", settings=None,
                      log=None) -> MemoryEstimate | None:
    """Log the dtype choice and the memory estimate against the free memory; raise ModelLoadError
    when the model will not fit (on a CPU: the host's available memory). `source`: a folder or a hub id.

    In serving.model.loader.load_model, right after the dtype is chosen:
        gpu.check_before_load(source, device, dtype, settings.dtype, settings, log)
    """
    import logging

    log = log or logging.getLogger(__name__)
    free, capability = gpu_memory(device)
    log.info("%s", dtype_reason(device, dtype, requested_dtype, capability))
    if not str(device).startswith("gpu"):
        log.info("%s", check_host_memory(source, dtype))
        return None
    config = read_config(source)
    if config is None:
        log.info("GPU memory: no config.json for %s yet, no estimate before loading", source)
        return None
    settings = settings or _DEFAULTS
    context = max(2048, settings.max_tokens_limit + PROMPT_TOKENS)
    estimate = estimate_model_memory(config, dtype, context_tokens=context, max_pixels=settings.max_pixels)
    fits, message = check_fits(free, estimate, device)
    if not fits:
        from serving.model.loader import ModelLoadError

        raise ModelLoadError(message)
    log.log(logging.WARNING if message.startswith("GPU memory is") else logging.INFO, "%s", message)
    return estimate


# --------------------------------------------------------------------------- a CPU's memory

PROCESS_BASE_BYTES = 768 * 1024 ** 2  # Python, Paddle's libraries and the server before any weight


def host_available() -> int | None:
    """MemAvailable of /proc/meminfo (what can be used without swapping), None where it is unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_bytes_to_load(config: dict, dtype: str) -> int:
    """Bytes a CPU load needs at its peak: the weights in `dtype`, plus the temporaries of the last
    large tensors read (serving.model.weights streams one parameter at a time, and reads the
    embedding first, before the weights pile up: the fused gate and up projection, with its two parts,
    is the largest temporary later on), plus the process itself. Measured on the 3B shape in float32:
    peak 14.6 GiB, this estimate 15.1 GiB."""
    t = _text(config)
    largest = 2 * 2 * t["intermediate_size"] * t["hidden_size"] * 4
    return parameter_count(config) * DTYPE_BYTES[dtype] + largest + PROCESS_BASE_BYTES


def check_host_memory(source, dtype: str, available: int | None = None) -> str:
    """One line on whether the model fits this machine's memory; raises ModelLoadError when it cannot
    (loading would end with the kernel's out-of-memory killer, not a message)."""
    config = read_config(source)
    if config is None:
        return f"memory: no config.json for {source} yet, no estimate before loading"
    needed = host_bytes_to_load(config, dtype)
    available = host_available() if available is None else available
    if available is None:
        return f"memory: loading needs ~{gib(needed)}; available memory is unknown"
    if needed > available:
        from serving.model.loader import ModelLoadError

        smaller = " or another dtype" if dtype == "float32" else ""
        raise ModelLoadError(
            f"not enough memory to load {source} in {dtype}: it needs ~{gib(needed)} "
            f"({parameter_count(config) / 1e9:.2f}B parameters), this machine has {gib(available)} available. "
            f"Stop other processes that hold memory, use a machine with more memory, a smaller model{smaller}, "
            "or a GPU.")
    return f"memory: loading needs ~{gib(needed)} of {gib(available)} available: it fits"
