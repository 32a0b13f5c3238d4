"""The demo checkpoint: published layout, deterministic, loaded by the real PaddleFormers code."""

import hashlib
import json

import numpy as np
from safetensors.numpy import load_file

from serving.model import demo

PUBLISHED_FILES = {"config.json", "generation_config.json", "preprocessor_config.json", "chat_template.json",
                   "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "model.safetensors.index.json"}


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name.startswith("flex-ckpt"):  # PaddleFormers writes a metadata file on first load
            continue
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_layout_matches_published_checkpoint(tmp_path):
    folder = demo.demo_path("demo", tmp_path)
    names = {p.name for p in folder.iterdir()}
    assert PUBLISHED_FILES <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["tie_word_embeddings"] is True
    assert config["rope_scaling"]["type"] == "mrope"
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert sum(config["rope_scaling"]["mrope_section"]) == head_dim // 2
    vision = config["vision_config"]
    assert vision["fullatt_block_indexes"] and max(vision["fullatt_block_indexes"]) < vision["depth"]
    assert vision["window_size"] == 112 and vision["patch_size"] == 14
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert "model.layers.0.self_attn.q_proj.bias" in keys  # the published names, not model.language_model.*
    assert "visual.blocks.0.attn.qkv.weight" in keys and "visual.merger.mlp.2.weight" in keys
    assert "lm_head.weight" not in keys  # tied to the embeddings, as in the 3B model
    assert not any(k.startswith("model.language_model") for k in keys)
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    added = {v["content"]: int(k) for k, v in tok["added_tokens_decoder"].items()}
    assert config["image_token_id"] == added["<|image_pad|>"]
    assert config["vision_start_token_id"] == added["<|vision_start|>"]
    assert "<|im_start|>" in tok["chat_template"]


def test_built_once_then_cached_and_deterministic(tmp_path):
    first = demo.demo_path("demo", tmp_path / "a")
    mtime = (first / "config.json").stat().st_mtime_ns
    assert demo.demo_path("demo", tmp_path / "a") == first
    assert (first / "config.json").stat().st_mtime_ns == mtime  # not rebuilt
    second = demo.demo_path("demo", tmp_path / "b")
    assert _digest(first) == _digest(second)


def test_real_loader_reads_every_weight(engine):
    """PaddleFormers' from_pretrained mapped each published tensor onto the model."""
    folder = engine.loaded.source
    weights = {}
    for shard in sorted(set(json.loads(open(f"{folder}/model.safetensors.index.json").read())["weight_map"].values())):
        weights.update(load_file(f"{folder}/{shard}"))
    state = engine.model.state_dict()
    embed = state["model.language_model.embed_tokens.weight"].numpy()
    np.testing.assert_array_equal(embed, weights["model.embed_tokens.weight"])
    # Linear weights are stored [out, in] in the checkpoint and [in, out] in Paddle
    patch = state["model.visual.merger.mlp.2.weight"].numpy()
    np.testing.assert_array_equal(patch, weights["visual.merger.mlp.2.weight"].T)
    assert engine.loaded.is_demo
