"""serving.model.gpu: the memory estimate (arithmetic on the config), the fit check, the dtype line."""

from __future__ import annotations

import logging

import pytest

from serving.model import gpu
from serving.model.demo import demo_path
from serving.model.download import verify_checkpoint
from serving.model.gpu import GiB, check_fits, dtype_reason, estimate_model_memory, known_config, parameter_count
from serving.model.loader import ModelLoadError


def test_parameter_count_matches_the_demo_checkpoint_exactly():
    folder = demo_path("demo")
    assert parameter_count(gpu.read_config(folder)) == verify_checkpoint(folder).parameters


@pytest.mark.parametrize("name, billions", [
    ("Qwen/Qwen2.5-VL-3B-Instruct", 3.75),  # the published parameter counts
    ("Qwen/Qwen2.5-VL-7B-Instruct", 8.29),
    ("Qwen/Qwen2.5-VL-72B-Instruct", 73.4),
])
def test_parameter_count_of_the_published_sizes(name, billions):
    assert parameter_count(known_config(name)) / 1e9 == pytest.approx(billions, rel=0.01)


def test_known_config_reads_the_size_from_the_name():
    assert known_config("Qwen/Qwen2.5-VL-3B-Instruct")["hidden_size"] == 2048
    assert known_config("PaddlePaddle/Qwen2.5-VL-7B-Instruct")["hidden_size"] == 3584
    assert known_config("someone/some-model") is None
    assert gpu.read_config("Qwen/Qwen2.5-VL-3B-Instruct")["num_hidden_layers"] == 36


def test_estimate_is_weights_plus_kv_cache_plus_margin():
    config = known_config("Qwen/Qwen2.5-VL-3B-Instruct")
    params = parameter_count(config)
    bf16 = estimate_model_memory(config, "bfloat16", context_tokens=8192)
    assert bf16.weights == params * 2
    head_dim = 2048 // 16
    assert bf16.kv_cache == 2 * 36 * 2 * head_dim * 8192 * 2  # K and V, 36 layers, 2 KV heads, 2 bytes
    assert bf16.total == bf16.weights + bf16.kv_cache + bf16.activations
    assert bf16.activations >= gpu.WORKSPACE_BYTES
    fp32 = estimate_model_memory(config, "float32", context_tokens=8192)
    assert fp32.weights == 2 * bf16.weights and fp32.kv_cache == 2 * bf16.kv_cache
    longer = estimate_model_memory(config, "bfloat16", context_tokens=16384)
    assert longer.kv_cache == 2 * bf16.kv_cache
    assert 9 * GiB < bf16.total < 14 * GiB  # 3B in bf16: ~7 GiB of weights plus the rest
    assert "3.75B parameters in bfloat16" in bf16.describe()
    assert estimate_model_memory(1_000_000, "float16").weights == 2_000_000  # a bare parameter count
    with pytest.raises(ValueError):
        estimate_model_memory(config, "int4")


def test_check_fits():
    needed = estimate_model_memory(known_config("Qwen/Qwen2.5-VL-3B-Instruct"), "bfloat16")
    ok, message = check_fits(40 * GiB, needed, "gpu:0")
    assert ok and message.startswith("GPU memory: the model needs") and "40.0 GiB free on gpu:0" in message
    ok, message = check_fits(int(needed.total / 0.95), needed)
    assert ok and "tight" in message
    ok, message = check_fits(needed.weights + gpu.WORKSPACE_BYTES + 1, needed)
    assert ok and "short" in message and "--max-pixels" in message
    ok, message = check_fits(6 * GiB, needed)
    assert not ok
    assert "not enough GPU memory on gpu:0" in message and "6.0 GiB is free" in message
    assert "out-of-memory" in message and "--device cpu" in message
    assert check_fits(None, needed)[0]
    assert check_fits(10, 11) == (False, check_fits(10, 11)[1])


def test_dtype_reason():
    assert "bfloat16" in dtype_reason("gpu:0", "bfloat16", "auto", (8, 0)) and "8.0" in dtype_reason(
        "gpu:0", "bfloat16", "auto", (8, 0))
    line = dtype_reason("gpu:0", "float16", "auto", (7, 0))
    assert line.startswith("dtype float16") and "compute capability 7.0" in line
    assert dtype_reason("cpu", "float32").startswith("dtype float32: on CPU")
    assert dtype_reason("gpu:0", "float32", "float32") == "dtype float32: as asked (--dtype float32)"


def test_check_before_load(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    assert gpu.check_before_load("demo", "cpu", "float32") is None  # on CPU only the dtype line
    assert "on CPU" in caplog.text
    monkeypatch.setattr(gpu, "gpu_memory", lambda device: (4 * GiB, (7, 5)))
    with pytest.raises(ModelLoadError, match="not enough GPU memory"):
        gpu.check_before_load("Qwen/Qwen2.5-VL-3B-Instruct", "gpu:0", "float16")
    monkeypatch.setattr(gpu, "gpu_memory", lambda device: (80 * GiB, (8, 0)))
    estimate = gpu.check_before_load("Qwen/Qwen2.5-VL-7B-Instruct", "gpu:0", "bfloat16")
    assert estimate.parameters > 8e9
    assert "80.0 GiB free" in caplog.text and "dtype bfloat16" in caplog.text
    assert gpu.check_before_load("someone/unknown", "gpu:0", "bfloat16") is None  # no config: no estimate


def test_gpu_memory_on_cpu():
    assert gpu.gpu_memory("cpu") == (None, None)
