"""Streaming a published Qwen2.5-VL checkpoint into PaddleFormers' model, one tensor at a time.

PaddleFormers' own `from_pretrained` builds the whole model with random weights, then reads every
shard into memory and converts it (its "flex checkpoint" pass): on a CPU the 3B model in float32
went past 21 GiB resident and the machine ran out of memory (issue 22). It also writes a metadata
file into the checkpoint folder on every load, so a read-only folder cannot be served.

Here the model is built without allocating its weights (paddle.LazyGuard), and each parameter is
filled from the safetensors shards as soon as its source tensors are read: peak memory is the model
plus one parameter's worth of temporaries, and nothing is written anywhere.

The conversion is PaddleFormers 1.2.0's own (Qwen2_5_VLForConditionalGeneration._gen_aoa_config):
linear weights transposed to Paddle's [in, out], q/k/v fused per key-value group, gate and up fused;
a test checks every parameter equals what the library's loader produces.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

# safetensors dtype -> (numpy dtype read from the file, bytes per element)
_FILE_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}
_TEXT = "model.language_model."
_VISION = "model.visual."
# vision-tower linear layers: stored [out, in] like PyTorch, Paddle keeps [in, out]
_VISION_LINEARS = ("attn.qkv.weight", "attn.proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                   "mlp.down_proj.weight", "merger.mlp.0.weight", "merger.mlp.2.weight")


class WeightsError(RuntimeError):
    """The checkpoint's tensors do not fit the model built from its config.json."""


class SafetensorsFolder:
    """The tensors of a checkpoint folder (one model.safetensors, or shards with an index), each read
    from disk only when asked for: a plain read, no memory map kept, so what was read is freed."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        elif (self.folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise WeightsError(f"no model.safetensors or model.safetensors.index.json in {self.folder}")
        self.entries: dict = {}  # name -> (file, dtype, shape, start, end)
        for name in files:
            path = self.folder / name
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            for key, entry in header.items():
                start, end = entry["data_offsets"]
                self.entries[key] = (path, entry["dtype"], tuple(entry["shape"]), 8 + length + start, 8 + length + end)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list:
        return list(self.entries)

    def float32(self, name: str) -> np.ndarray:
        """The tensor as float32 (bfloat16 and float16 widen exactly)."""
        path, dtype, shape, start, end = self.entries[name]
        if dtype not in _FILE_DTYPES:
            raise WeightsError(f"tensor {name} in {path.name} is {dtype}; only F32, F16 and BF16 can be loaded")
        with open(path, "rb") as f:
            f.seek(start)
            raw = np.frombuffer(f.read(end - start), dtype=_FILE_DTYPES[dtype][0])
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return raw.astype(np.float32, copy=False).reshape(shape)


def checkpoint_sources(param: str, config) -> tuple:
    """(checkpoint names, how to combine them) for one parameter of PaddleFormers' Qwen2.5-VL.

    how: "copy", "transpose", "qkv" (q, k, v fused per key-value group, then [in, out]) or "gate_up"."""
    if param.startswith(_TEXT):
        key = "model." + param[len(_TEXT):]
        if key.endswith("self_attn.qkv_proj.weight") or key.endswith("self_attn.qkv_proj.bias"):
            stem, kind = key.rsplit(".qkv_proj.", 1)
            return tuple(f"{stem}.{x}_proj.{kind}" for x in "qkv"), "qkv"
        if key.endswith("mlp.up_gate_proj.weight"):
            stem = key[: -len("up_gate_proj.weight")]
            return (stem + "gate_proj.weight", stem + "up_proj.weight"), "gate_up"
        if key.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            return (key,), "transpose"
        return (key,), "copy"
    if param.startswith(_VISION):
        key = "visual." + param[len(_VISION):]
        return (key,), "transpose" if key.endswith(_VISION_LINEARS) else "copy"
    if param == "lm_head.weight":  # only when the embeddings are not tied; kept [vocab, hidden]
        return ("lm_head.weight",), "copy"
    raise WeightsError(f"the model has a parameter {param} this loader does not know")


def combine(parts: list, how: str, config) -> np.ndarray:
    if how == "copy":
        return parts[0]
    if how == "transpose":
        return np.ascontiguousarray(parts[0].T)
    if how == "gate_up":
        return np.concatenate([parts[0].T, parts[1].T], axis=1)
    if how == "qkv":
        groups = config.text_config.num_key_value_heads
        q, k, v = (np.split(p, groups, axis=0) for p in parts)  # rows grouped by key-value head
        fused = np.concatenate([x for g in range(groups) for x in (q[g], k[g], v[g])], axis=0)
        return fused if fused.ndim == 1 else np.ascontiguousarray(fused.T)
    raise ValueError(how)


def load_into(model, folder, dtype: str = "float32") -> dict:
    """Fill every parameter of a model built under paddle.LazyGuard from the folder's shards.

    Raises WeightsError naming what is missing, unexpected or of the wrong shape; returns
    {"parameters": count, "bytes_read": n}."""
    import paddle

    tensors = SafetensorsFolder(folder)
    used, count, bytes_read = set(), 0, 0
    for name, param in model.named_parameters():
        sources, how = checkpoint_sources(name, model.config)
        missing = [s for s in sources if s not in tensors]
        if missing:
            raise WeightsError(f"the checkpoint in {folder} has no tensor {missing[0]} (for {name})")
        parts = [tensors.float32(s) for s in sources]
        bytes_read += sum(p.nbytes for p in parts)
        value = combine(parts, how, model.config)
        del parts
        if tuple(value.shape) != tuple(param.shape):
            raise WeightsError(f"tensor for {name} has shape {list(value.shape)}, the model expects "
                               f"{list(param.shape)}: config.json and the weights disagree")
        if dtype == "float32":
            param.set_value(value)
        else:
            param.set_value(paddle.to_tensor(value).astype(dtype))
        del value
        used.update(sources)
        count += 1
    # a tied lm_head is the embedding itself; anything else left over was not loaded
    unexpected = sorted(set(tensors.names()) - used - {"lm_head.weight"})
    if unexpected:
        raise WeightsError(f"the checkpoint in {folder} has {len(unexpected)} tensor(s) the model does not use, "
                           f"e.g. {unexpected[0]}: config.json does not describe these weights")
    return {"parameters": count, "bytes_read": bytes_read}


def build_and_load(model_class, folder, config, dtype: str):
    """The model of `config` with the folder's weights, never holding more than one extra tensor."""
    import paddle
    from paddleformers.transformers.model_utils import dtype_guard, no_init_weights

    config.dtype = dtype
    for key in getattr(config, "sub_configs", None) or ():
        sub = getattr(config, key, None)
        if sub is not None:
            sub.dtype = dtype
    with no_init_weights(_enable=True), paddle.LazyGuard(), dtype_guard(dtype):
        model = model_class(config)
    load_into(model, folder, dtype)
    return model


def can_stream(folder) -> bool:
    """A local folder with safetensors weights (the published form) can be streamed."""
    folder = str(folder)
    return os.path.isdir(folder) and (os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
                                      or os.path.isfile(os.path.join(folder, "model.safetensors")))
