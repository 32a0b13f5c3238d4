"""Random-weight checkpoints in exactly the form Qwen publishes Qwen2.5-VL-3B-Instruct, at real scale.

`--model demo-vocab`: Qwen's real tokenizer and 151,936-token vocabulary on small layers (fast enough
for the test suite). `--model demo-3b`: the exact 3B shape (3.75B parameters, ~7.5 GB of bf16), built
once on request. Both are the published files, not the small demos' variants of them: config.json as
Qwen ships it (no `fuse_rms_norm`, `torch_dtype` bfloat16, no text_config), bf16 safetensors in two
shards with model.safetensors.index.json, the published generation_config.json and
preprocessor_config.json, and the real tokenizer (serving.model.qwen_tokenizer). Whatever a real
checkpoint needs from the loader, these need too. Their answers are meaningless text.

The weights are written tensor by tensor in chunks straight into the shard files, so building the
3B model needs a few hundred MB of memory, not its size.
"""

from __future__ import annotations

import copy
import json
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from serving.model import qwen_tokenizer
from serving.model.demo import PUBLISHED_CHAT_TEMPLATE, PUBLISHED_PREPROCESSOR_CONFIG, SEED

BUILD_VERSION = "published-1"  # bump when the layout changes, so old caches are rebuilt
VOCAB_SIZE = 151936  # the model's vocabulary: the tokenizer's 151,665 tokens padded to a multiple of 128
CHUNK_ELEMENTS = 1 << 23  # random values drawn and written per chunk (32 MiB of float32)
SHARDS = 2  # as Qwen/Qwen2.5-VL-3B-Instruct is sharded

# Qwen/Qwen2.5-VL-3B-Instruct's config.json as published on the Hugging Face hub (key order kept).
PUBLISHED_3B_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

# Its generation_config.json as published: Qwen's sampling defaults for the model.
PUBLISHED_GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 1e-06,
    "transformers_version": "4.49.0",
}

@dataclass(frozen=True)
class Scale:
    """The structural sizes that differ between the published 3B model and a smaller stand-in."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mrope_section: tuple  # sums to head_dim / 2
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_depth: int
    vision_heads: int
    fullatt_block_indexes: tuple
    weight_std: float  # of the random weights (norms are ones)


SCALES = {
    # The 3B model's exact shape; weights at its initializer_range.
    "3b": Scale(2048, 11008, 36, 16, 2, (16, 24, 24), 1280, 3420, 32, 16, (7, 15, 23, 31), 0.02),
    # The real vocabulary (embedding and tied lm_head at 151,936 x 64) on the small demo's layers; weights
    # large enough that sampled answers wander over the whole vocabulary (Chinese, emoji, byte pieces).
    "vocab": Scale(64, 128, 2, 4, 2, (2, 3, 3), 32, 64, 4, 2, (1, 3), 0.3),
}


def config(scale: Scale) -> dict:
    """config.json in the published form, with this scale's structural sizes."""
    out = copy.deepcopy(PUBLISHED_3B_CONFIG)
    out.update(hidden_size=scale.hidden_size, intermediate_size=scale.intermediate_size,
               num_hidden_layers=scale.num_hidden_layers, num_attention_heads=scale.num_attention_heads,
               num_key_value_heads=scale.num_key_value_heads)
    out["rope_scaling"]["mrope_section"] = list(scale.mrope_section)
    out["vision_config"].update(depth=scale.vision_depth, hidden_size=scale.vision_hidden_size,
                                intermediate_size=scale.vision_intermediate_size, num_heads=scale.vision_heads,
                                out_hidden_size=scale.hidden_size,
                                fullatt_block_indexes=list(scale.fullatt_block_indexes))
    return out


def tensor_shapes(scale: Scale) -> dict:
    """{published key name: shape ([out, in] for linear layers)}: what the checkpoint holds."""
    h, i = scale.hidden_size, scale.intermediate_size
    kv = scale.num_key_value_heads * (h // scale.num_attention_heads)
    c, ci = scale.vision_hidden_size, scale.vision_intermediate_size
    merged = c * 4  # spatial_merge_size ** 2 patches are merged into one token
    shapes = {"model.embed_tokens.weight": (VOCAB_SIZE, h), "model.norm.weight": (h,)}
    for n in range(scale.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    shapes["visual.patch_embed.proj.weight"] = (c, 3, 2, 14, 14)
    for n in range(scale.vision_depth):
        p = f"visual.blocks.{n}."
        shapes.update({
            p + "norm1.weight": (c,), p + "norm2.weight": (c,),
            p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,),
            p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
            p + "mlp.gate_proj.weight": (ci, c), p + "mlp.gate_proj.bias": (ci,),
            p + "mlp.up_proj.weight": (ci, c), p + "mlp.up_proj.bias": (ci,),
            p + "mlp.down_proj.weight": (c, ci), p + "mlp.down_proj.bias": (c,),
        })
    shapes.update({
        "visual.merger.ln_q.weight": (c,),
        "visual.merger.mlp.0.weight": (merged, merged), "visual.merger.mlp.0.bias": (merged,),
        "visual.merger.mlp.2.weight": (h, merged), "visual.merger.mlp.2.bias": (h,),
    })
    return dict(sorted(shapes.items()))


def parameter_count(scale: Scale) -> int:
    return sum(int(np.prod(shape)) for shape in tensor_shapes(scale).values())


def shard_plan(scale: Scale) -> dict:
    """{shard file name: [tensor names]}: the sorted names cut into SHARDS runs of about equal bytes."""
    shapes = tensor_shapes(scale)
    total = sum(int(np.prod(s)) for s in shapes.values())
    plan, names, done, k = {}, [], 0, 1
    for name, shape in shapes.items():
        if done >= total * k / SHARDS and names and k < SHARDS:
            plan[_shard_name(k)] = names
            names, k = [], k + 1
        names.append(name)
        done += int(np.prod(shape))
    plan[_shard_name(k)] = names
    return plan


def index(scale: Scale) -> dict:
    """model.safetensors.index.json, computed from the shapes alone (bf16: 2 bytes a value)."""
    shapes = tensor_shapes(scale)
    weight_map = {name: shard for shard, names in shard_plan(scale).items() for name in names}
    total = sum(2 * int(np.prod(shape)) for shape in shapes.values())
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def build_checkpoint(folder: Path, scale: Scale) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = qwen_tokenizer.write_tokenizer_files(folder, PUBLISHED_CHAT_TEMPLATE)
    cfg = config(scale)
    for field in ("bos_token_id", "eos_token_id", "image_token_id", "video_token_id", "vision_start_token_id"):
        assert cfg[field] in ids.values(), field  # the published ids are the tokenizer's
    _write_json(folder / "config.json", cfg)
    _write_json(folder / "generation_config.json", PUBLISHED_GENERATION_CONFIG)
    _write_json(folder / "preprocessor_config.json", PUBLISHED_PREPROCESSOR_CONFIG)
    _write_json(folder / "chat_template.json", {"chat_template": PUBLISHED_CHAT_TEMPLATE})
    shapes = tensor_shapes(scale)
    for shard, names in shard_plan(scale).items():
        write_bf16_safetensors(folder / shard, {n: shapes[n] for n in names}, scale.weight_std)
    _write_json(folder / "model.safetensors.index.json", index(scale))
    _write_json(folder / "DEMO_MODEL.json", {
        "warning": "random weights: answers are meaningless text",
        "form": "published (Qwen/Qwen2.5-VL-3B-Instruct's files)",
        "scale": asdict(scale),
        "parameters": parameter_count(scale),
        "seed": SEED,
    })


def write_bf16_safetensors(path: Path, shapes: dict, std: float) -> None:
    """A safetensors file of bf16 tensors, each drawn and written chunk by chunk (header first: the
    offsets follow from the shapes), so memory stays at one chunk whatever the tensors' sizes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape in shapes.items():
            for chunk in _random_chunks(name, shape, std):
                f.write(to_bf16(chunk).tobytes())


def _random_chunks(name: str, shape: tuple, std: float):
    """A tensor's float32 values in row order, at most CHUNK_ELEMENTS at a time, from a generator of its own
    (seeded by the name), so a tensor's values depend neither on the others nor on the sharding."""
    total = int(np.prod(shape))
    if name.endswith("norm.weight") or "layernorm" in name or name.endswith(("norm1.weight", "norm2.weight")) \
            or name.endswith("ln_q.weight"):
        yield np.ones(total, np.float32)  # RMSNorm scales start at one, as a trained model's are near
        return
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    for start in range(0, total, CHUNK_ELEMENTS):
        yield rng.standard_normal(min(CHUNK_ELEMENTS, total - start), dtype=np.float32) * np.float32(std)


def to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even, as torch and Paddle round."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _shard_name(k: int) -> str:
    return f"model-{k:05d}-of-{SHARDS:05d}.safetensors"


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
