"""Streaming the published checkpoint form into the model (serving.model.weights): the same
parameters as PaddleFormers' own loader, clear errors for checkpoints that do not fit, nothing
written into the folder."""

import json
import shutil
import struct

import numpy as np
import pytest

from serving.model import demo, weights


@pytest.fixture(scope="module")
def demo_folder():
    return demo.demo_path("demo")


def _library_and_streamed(folder):
    from paddleformers.transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    library = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder), dtype="float32")
    streamed = weights.build_and_load(Qwen2_5_VLForConditionalGeneration, folder,
                                      Qwen2_5_VLConfig.from_pretrained(str(folder)), "float32")
    return library, streamed


def test_every_parameter_equals_the_library_loader(demo_folder, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(demo_folder, folder)
    library, streamed = _library_and_streamed(folder)
    ours, theirs = dict(streamed.named_parameters()), dict(library.named_parameters())
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert np.array_equal(ours[name].numpy(), theirs[name].numpy()), name
    # the tied lm_head is the embedding itself, as in the library's model
    assert streamed.lm_head.weight is streamed.model.language_model.embed_tokens.weight


def test_bfloat16_shards_widen_exactly(tmp_path):
    values = np.array([[1.0, -2.5, 3.140625], [0.0, 1e-3, -65536.0]], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact for these values' top halves
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, bf16.nbytes]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bf16.tobytes())
    read = weights.SafetensorsFolder(tmp_path).float32("w")
    expected = (bf16.astype(np.uint32) << 16).view(np.float32)
    assert read.dtype == np.float32 and np.array_equal(read, expected)
    assert read[0, 0] == 1.0 and read[1, 2] == -65536.0


def _rewrite_without(folder, drop=None, reshape=None):
    """Rewrite the folder's shards as float32, without tensor `drop` or with `reshape` = (name, shape)."""
    from safetensors.numpy import load_file, save_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(folder / shard))
        tensors.pop(drop, None)
        if reshape and reshape[0] in tensors:
            tensors[reshape[0]] = np.zeros(reshape[1], np.float32)
        save_file(tensors, str(folder / shard))


def test_a_missing_tensor_is_named(demo_folder, tmp_path):
    from paddleformers.transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder = tmp_path / "ckpt"
    shutil.copytree(demo_folder, folder)
    _rewrite_without(folder, drop="model.layers.1.self_attn.k_proj.weight")
    with pytest.raises(weights.WeightsError, match="model.layers.1.self_attn.k_proj.weight"):
        weights.build_and_load(Qwen2_5_VLForConditionalGeneration, folder,
                               Qwen2_5_VLConfig.from_pretrained(str(folder)), "float32")


def test_a_tensor_of_the_wrong_shape_is_named(demo_folder, tmp_path):
    from paddleformers.transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder = tmp_path / "ckpt"
    shutil.copytree(demo_folder, folder)
    _rewrite_without(folder, reshape=("model.layers.0.mlp.down_proj.weight", (3, 5)))
    with pytest.raises(weights.WeightsError, match="down_proj.*config.json and the weights disagree"):
        weights.build_and_load(Qwen2_5_VLForConditionalGeneration, folder,
                               Qwen2_5_VLConfig.from_pretrained(str(folder)), "float32")


def test_loading_writes_nothing_into_the_folder(demo_folder, tmp_path):
    """PaddleFormers' loader writes flex-ckpt metadata into the folder (a read-only folder then fails)."""
    from serving.config import Settings
    from serving.model.loader import load_model

    folder = tmp_path / "ckpt"
    shutil.copytree(demo_folder, folder)
    before = sorted(p.name for p in folder.iterdir())
    loaded = load_model(Settings(model=str(folder), device="cpu"))
    assert sorted(p.name for p in folder.iterdir()) == before
    assert loaded.parameter_count > 0


def test_the_cpu_memory_check_refuses_what_cannot_fit(demo_folder):
    from serving.model import gpu
    from serving.model.loader import ModelLoadError

    config = gpu.read_config(demo_folder)
    needed = gpu.host_bytes_to_load(config, "float32")
    assert needed >= gpu.parameter_count(config) * 4
    with pytest.raises(ModelLoadError, match="not enough memory"):
        gpu.check_host_memory(demo_folder, "float32", available=needed // 2)
    assert "fits" in gpu.check_host_memory(demo_folder, "float32", available=needed * 4)
    # the published 3B in float32: 3.75B parameters, ~14 GiB of weights
    three_b = {**gpu.KNOWN_CONFIGS["3B"], "vision_config": gpu._VISION}
    assert 14.6 * gpu.GiB < gpu.host_bytes_to_load(three_b, "float32") < 15.5 * gpu.GiB  # measured peak 14.6 GiB
