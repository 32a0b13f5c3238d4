"""The offline demo checkpoint: a tiny random-weight Qwen2.5-VL in the published layout.

No weights can be downloaded on the machines this project is built and tested on, so
`--model demo` builds (once, then cached) a checkpoint with exactly the shape of
Qwen/Qwen2.5-VL-3B-Instruct on disk -- config.json with the real structural fields scaled
down, safetensors under the published (Hugging Face) key names, preprocessor config,
byte-level BPE tokenizer files carrying Qwen's special tokens, and Qwen2.5-VL's chat
template -- so the very same loading code serves it and a real model. Its answers are
meaningless text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from serving.tools import TOOLS_INTRO, TOOLS_OUTRO

DEMO_NAMES = {"demo": "small", "demo-small": "small", "demo-bench": "bench",
              # the published form at real scale (serving.model.published): Qwen's real vocabulary
              "demo-vocab": "vocab", "demo-3b": "3b"}


def _literal(text: str) -> str:
    """`text` as a Jinja expression: the template environment drops a newline that follows a block tag."""
    return "{{ '" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "' }}"


# Qwen2.5-VL's chat template, as published in the checkpoint's chat_template.json (no tools section).
# Qwen2.5-VL-3B-Instruct's preprocessor_config.json as published (every demo checkpoint carries it).
PUBLISHED_PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}

PUBLISHED_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-VL's chat template, as above, with the tools section of
# Qwen2.5-Instruct's template (the `# Tools` system block, assistant tool_calls, tool results in <tool_response>
# blocks of one user turn), so tests run the real tool path. Without tools it writes exactly the published text.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% else %}You are a helpful assistant.{% endif %}" + _literal(TOOLS_INTRO) +
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}" + _literal(TOOLS_OUTRO) + "<|im_end|>\n{% endif %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' and not tools %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user\n{% else %}{{ '\\n' }}{% endif %}"
    "<tool_response>\n{{ message['content'] }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "<|im_start|>assistant\n{% if message['content'] %}{{ message['content'] }}\n{% endif %}"
    "{% for tool_call in message['tool_calls'] %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{% if tool_call['function'] is defined %}{% set tool_call = tool_call['function'] %}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": \"' }}{{ tool_call['name'] }}{{ '\", \"arguments\": ' }}"
    "{% if tool_call['arguments'] is string %}{{ tool_call['arguments'] }}{% else %}{{ tool_call['arguments'] | tojson }}"
    "{% endif %}{{ '}\\n</tool_call>' }}{% endfor %}<|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen's added tokens in their published order; ids follow the base vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
NON_SPECIAL_ADDED = ["<tool_call>", "</tool_call>"]

# Qwen2's pre-tokenizer split pattern (tokenizer.json of the published checkpoint).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class DemoSize:
    """Structural sizes; the 3B model's values are in the comments."""

    hidden_size: int  # 2048
    intermediate_size: int  # 11008
    num_hidden_layers: int  # 36
    num_attention_heads: int  # 16
    num_key_value_heads: int  # 2
    mrope_section: tuple  # (16, 24, 24): sums to head_dim / 2
    vision_hidden_size: int  # 1280
    vision_intermediate_size: int  # 3420
    vision_depth: int  # 32
    vision_heads: int  # 16
    fullatt_block_indexes: tuple  # (7, 15, 23, 31)
    bpe_merges: int  # Qwen's tokenizer has ~151k merges


SIZES = {
    # Small enough that the whole test suite runs in minutes on 2 CPU cores.
    "small": DemoSize(64, 128, 2, 4, 2, (2, 3, 3), 32, 64, 4, 2, (1, 3), 600),
    # Large enough that a 64-token answer takes about a second on 2 CPU cores, with a
    # vision tower about as large against the language model as the 3B model's (~0.2).
    "bench": DemoSize(512, 1536, 8, 8, 2, (8, 12, 12), 256, 704, 8, 4, (3, 7), 600),
}

SEED = 20251126
BUILD_VERSION = "4"  # bump when the layout changes, so old caches are rebuilt


def default_cache_dir() -> Path:
    root = os.environ.get("QWENVL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qwenvl-serving"
    )
    return Path(root)


def is_demo_name(name: str) -> bool:
    return name in DEMO_NAMES


def demo_path(name: str = "demo", cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder of the named demo checkpoint, building it the first time."""
    from serving.model import published  # it builds on this module's pieces

    size_name = DEMO_NAMES[name]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    if size_name in published.SCALES:
        scale = published.SCALES[size_name]
        key, build = [published.BUILD_VERSION, asdict(scale), PUBLISHED_CHAT_TEMPLATE], partial(published.build_checkpoint, scale=scale)
    else:
        size = SIZES[size_name]
        key, build = [BUILD_VERSION, asdict(size)], partial(build_checkpoint, size=size)
    digest = hashlib.sha256(json.dumps([*key, SEED]).encode()).hexdigest()[:12]
    target = root / f"qwen2_5_vl_demo_{size_name}_{digest}"
    if (target / "model.safetensors.index.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder and rename, so a crash or a concurrent builder never
    # leaves a half-written checkpoint where the loader would find it.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=root))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors.index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_checkpoint(folder: Path, size: DemoSize) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_files = _build_tokenizer(folder, size)
    vocab_size = _round_up(tokenizer_files["total_tokens"], 64)
    ids = tokenizer_files["special_ids"]
    config = _config(size, vocab_size, ids)
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "repetition_penalty": 1.05,
        "temperature": 0.1,
        "top_p": 0.001,
        "top_k": 1,
    })
    _write_json(folder / "preprocessor_config.json", PUBLISHED_PREPROCESSOR_CONFIG)
    _write_json(folder / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    _write_weights(folder, _weights(size, vocab_size))
    _write_json(folder / "DEMO_MODEL.json", {
        "warning": "random weights: answers are meaningless text",
        "size": asdict(size),
        "seed": SEED,
    })


def _config(size: DemoSize, vocab_size: int, ids: dict) -> dict:
    text = {
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_hidden_layers,
        "num_attention_heads": size.num_attention_heads,
        "num_key_value_heads": size.num_key_value_heads,
        "max_position_embeddings": 128000,
        "max_window_layers": 70,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        **text,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        # PaddlePaddle's fused RMSNorm kernel does not exist on CPU (DESIGN.md).
        "fuse_rms_norm": False,
        "text_config": {**text, "fuse_rms_norm": False, "tie_word_embeddings": True,
                        "rope_scaling": {"type": "mrope", "mrope_section": list(size.mrope_section)}},
        "vision_config": {
            "depth": size.vision_depth,
            "hidden_act": "silu",
            "hidden_size": size.vision_hidden_size,
            "intermediate_size": size.vision_intermediate_size,
            "num_heads": size.vision_heads,
            "in_chans": 3,
            "out_hidden_size": size.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": list(size.fullatt_block_indexes),
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
            "fuse_rms_norm": False,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(size.mrope_section)},
    }


def _weights(size: DemoSize, vocab: int) -> dict:
    """Random tensors under the published key names, in the published [out, in] layout."""
    rng = np.random.default_rng(SEED)
    h, i = size.hidden_size, size.intermediate_size
    head = h // size.num_attention_heads
    kv = size.num_key_value_heads * head
    c, ci = size.vision_hidden_size, size.vision_intermediate_size
    merged = c * 4  # spatial_merge_size ** 2 patches are merged into one token

    def normal(*shape, std=0.3):  # large enough that random answers are varied text
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(vocab, h), "model.norm.weight": np.ones(h, np.float32)}
    for n in range(size.num_hidden_layers):
        p = f"model.layers.{n}."
        w[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "self_attn.q_proj.weight"] = normal(h, h)
        w[p + "self_attn.q_proj.bias"] = normal(h)
        w[p + "self_attn.k_proj.weight"] = normal(kv, h)
        w[p + "self_attn.k_proj.bias"] = normal(kv)
        w[p + "self_attn.v_proj.weight"] = normal(kv, h)
        w[p + "self_attn.v_proj.bias"] = normal(kv)
        w[p + "self_attn.o_proj.weight"] = normal(h, h)
        w[p + "mlp.gate_proj.weight"] = normal(i, h)
        w[p + "mlp.up_proj.weight"] = normal(i, h)
        w[p + "mlp.down_proj.weight"] = normal(h, i)
    w["visual.patch_embed.proj.weight"] = normal(c, 3, 2, 14, 14)
    for n in range(size.vision_depth):
        p = f"visual.blocks.{n}."
        w[p + "norm1.weight"] = np.ones(c, np.float32)
        w[p + "norm2.weight"] = np.ones(c, np.float32)
        w[p + "attn.qkv.weight"] = normal(3 * c, c)
        w[p + "attn.qkv.bias"] = normal(3 * c)
        w[p + "attn.proj.weight"] = normal(c, c)
        w[p + "attn.proj.bias"] = normal(c)
        for name in ("gate", "up"):
            w[p + f"mlp.{name}_proj.weight"] = normal(ci, c)
            w[p + f"mlp.{name}_proj.bias"] = normal(ci)
        w[p + "mlp.down_proj.weight"] = normal(c, ci)
        w[p + "mlp.down_proj.bias"] = normal(c)
    w["visual.merger.ln_q.weight"] = np.ones(c, np.float32)
    w["visual.merger.mlp.0.weight"] = normal(merged, merged)
    w["visual.merger.mlp.0.bias"] = normal(merged)
    w["visual.merger.mlp.2.weight"] = normal(h, merged)
    w["visual.merger.mlp.2.bias"] = normal(h)
    return w


def _write_weights(folder: Path, weights: dict) -> None:
    """Two shards plus an index, as the published checkpoint is sharded."""
    from safetensors.numpy import save_file

    names = sorted(weights)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: weights[n] for n in shard}, str(folder / fname), metadata={"format": "pt"})
        for n in shard:
            weight_map[n] = fname
            total += weights[n].nbytes
    _write_json(folder / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _build_tokenizer(folder: Path, size: DemoSize) -> dict:
    """A byte-level BPE like Qwen2's, trained deterministically on a small built-in text."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + size.bpe_merges,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    base = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL_ADDED])
    tok.save(str(folder / "tokenizer.json"))

    # vocab.json and merges.txt, as the published checkpoint also ships them.
    saved = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    _write_json(folder / "vocab.json", saved["model"]["vocab"])
    merges = saved["model"]["merges"]
    lines = ["#version: 0.2"] + [m if isinstance(m, str) else " ".join(m) for m in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + NON_SPECIAL_ADDED}
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": t in SPECIAL_TOKENS}
        for t in SPECIAL_TOKENS + NON_SPECIAL_ADDED
    }
    _write_json(folder / "tokenizer_config.json", {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    return {"total_tokens": tok.get_vocab_size(), "base": base, "special_ids": ids}


def _training_text():
    """Deterministic English and Chinese text, so common words become single tokens."""
    english = (
        "Describe this image. The picture shows a red square on a white background. "
        "There is a cat and a dog in the garden. The sky is blue and the grass is green. "
        "What is in the image? How many objects are there? Please answer in one sentence. "
        "You are a helpful assistant. The quick brown fox jumps over the lazy dog. "
        "A photo of a person standing next to a car on a street in the city at night. "
    )
    chinese = "这是一张图片。请描述这张图片。图片中有一只猫和一只狗。天空是蓝色的，草地是绿色的。你好！"
    for _ in range(3):
        yield english
        yield chinese


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
