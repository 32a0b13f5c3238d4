"""Settings from flags and environment; model source, device and dtype choices; clear load errors."""

import os

import pytest

from serving.config import DEFAULT_MODEL, Settings, load_settings
from serving.model import loader
from serving.model.loader import ModelLoadError, choose_device, choose_dtype, load_model


def test_defaults():
    s = load_settings([], environ={})
    assert (s.host, s.port, s.model, s.hub) == ("0.0.0.0", 8080, DEFAULT_MODEL, "aistudio")


def test_flags_beat_environment_beat_defaults():
    env = {"PORT": "9000", "MODEL": "demo", "API_KEY": "a, b", "ALLOW_IMAGE_URLS": "false"}
    s = load_settings(["--port", "9100"], environ=env)
    assert s.port == 9100 and s.model == "demo" and s.api_key == ("a", "b") and s.allow_image_urls is False
    assert load_settings([], environ=env).port == 9000


def test_bad_setting_value_exits_with_message():
    with pytest.raises(SystemExit) as info:
        load_settings(["--port", "eighty"], environ={})
    assert "--port" in str(info.value)


@pytest.mark.parametrize("argv, named", [
    (["--hub", "bogus"], "--hub / HUB: 'bogus' is not one of aistudio, huggingface, modelscope"),
    (["--device", "tpu"], "--device / DEVICE: 'tpu' is not auto, cpu, gpu or gpu:N"),
    (["--dtype", "fp8"], "--dtype / DTYPE: 'fp8' is not one of auto, bfloat16, float16, float32"),
    (["--backend", "openai"], "needs at least one upstream URL"),
    (["--backend", "openai", "--upstream", "ftp://x"], "--upstream / UPSTREAM: 'ftp://x' is not an http(s) URL"),
    (["--fastdeploy-args", "--quantization 'wint8"], "--fastdeploy-args / FASTDEPLOY_ARGS"),
])
def test_api_py_refuses_a_bad_setting_before_listening(argv, named):
    """Every setting is checked before the port is bound: one line, exit status 2, nothing served."""
    import subprocess
    import sys

    from conftest import ROOT, free_port

    done = subprocess.run([sys.executable, str(ROOT / "api.py"), "--model", "demo", "--host", "127.0.0.1",
                           "--port", str(free_port()), *argv], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k not in ("HUB", "DEVICE", "DTYPE", "BACKEND")})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], done.stderr
    assert "listening on" not in done.stderr + done.stdout


def test_device_and_dtype_spellings():
    s = load_settings(["--hub", "HuggingFace", "--device", "GPU:1", "--dtype", "Float16"], environ={})
    assert (s.hub, s.device, s.dtype) == ("huggingface", "gpu:1", "float16")
    s = load_settings([], environ={"HUB": "", "DEVICE": "", "DTYPE": ""})  # empty variables: the defaults
    assert (s.hub, s.device, s.dtype) == ("aistudio", "auto", "auto")


def test_device_and_dtype_on_cpu():
    assert choose_device("auto") == "cpu"
    assert choose_dtype("cpu") == "float32"
    assert choose_dtype("cpu", "float32") == "float32"
    with pytest.raises(ModelLoadError, match="no bfloat16 matmul kernel"):  # Paddle's CPU build cannot compute in it
        choose_dtype("cpu", "bfloat16")
    with pytest.raises(ModelLoadError, match="GPU"):
        choose_device("gpu")
    with pytest.raises(ModelLoadError):
        choose_dtype("cpu", "int3")


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model(Settings(model=str(tmp_path / "nowhere")))
    assert "does not exist" in str(info.value) and "--model demo" in str(info.value)


def test_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model(Settings(model=str(tmp_path)))
    assert str(tmp_path) in str(info.value)


@pytest.fixture
def roomy_machine(monkeypatch):
    """The memory check before loading sees room for the 3B model, whatever else runs on this machine."""
    from serving.model import gpu

    monkeypatch.setattr(gpu, "host_available", lambda: 64 * gpu.GiB)


def test_a_hub_model_too_large_for_this_machine_is_refused_before_any_download(monkeypatch):
    from serving.model import gpu

    monkeypatch.setattr(gpu, "host_available", lambda: 4 * gpu.GiB)
    with pytest.raises(ModelLoadError, match="not enough memory to load Qwen/Qwen2.5-VL-3B-Instruct in float32"):
        load_model(Settings(model="Qwen/Qwen2.5-VL-3B-Instruct", hub="aistudio", device="cpu"))


def test_unreachable_hub_model_names_model_and_remedies(roomy_machine):
    """Offline, a hub id fails at once with one message naming the model and the ways out."""
    with pytest.raises(ModelLoadError) as info:
        load_model(Settings(model="Qwen/Qwen2.5-VL-3B-Instruct", hub="aistudio"))
    message = str(info.value)
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in message
    assert "--model /path/to" in message and "--model demo" in message
    # said as it is: the hub cannot be reached (not the hub client's "no files ... found in repo")
    assert "hub at https://" in message and "is unreachable from this machine" in message
    assert "found in repo" not in message


def test_a_reachable_hub_without_the_model_says_check_the_id(monkeypatch, roomy_machine):
    from serving.model import download

    monkeypatch.setattr(download, "probe", lambda url, timeout=None: None)  # as if the hub answered
    with pytest.raises(ModelLoadError) as info:
        load_model(Settings(model="Qwen/No-Such-Model", hub="aistudio"))
    message = str(info.value)
    assert "Check the model id" in message and "unreachable" not in message


def test_api_py_fails_cleanly_offline(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, free_port

    done = subprocess.run([sys.executable, str(ROOT / "api.py"), "--model", str(tmp_path / "missing"),
                           "--port", str(free_port()), "--host", "127.0.0.1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr
    assert "listening on" not in done.stderr  # refused before the port is bound


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed (CPU)", "library loader (GPU path)"])
def test_a_model_folder_is_only_read_while_loading(tmp_path, monkeypatch, streamed):
    """PaddleFormers writes flex-ckpt.auto_generated.metadata (under a .lock) into the folder it loads from: a
    read-only folder could not be served and two servers loading one folder raced. Loaded through a private
    view, the folder is left exactly as it was (no file added, removed or touched)."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file

    from serving.model import demo

    source = demo.demo_path("demo")
    folder = tmp_path / "model"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("flex-ckpt*"))
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    if not streamed:  # the library's loader, through the private view, as on a GPU
        monkeypatch.setattr(loader, "streams", lambda device, source: False)
    folder.chmod(0o555)  # as far as the user allows (root ignores it): the check below is what counts
    try:
        loaded = load_model(Settings(model=str(folder)))
    finally:
        folder.chmod(0o755)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    weights = {}
    for shard in folder.glob("*.safetensors"):
        weights.update(load_file(shard))
    name = next(k for k in weights if k.endswith("embed_tokens.weight"))
    state = loaded.model.state_dict()
    loaded_name = next(k for k in state if k.endswith("embed_tokens.weight"))
    assert np.array_equal(state[loaded_name].numpy(), weights[name])  # the weights did load, from the view


def test_every_setting_is_in_one_help_group_in_readme_order():
    """`python api.py --help` groups the flags as README's settings table does, with readable defaults."""
    import re
    import subprocess
    import sys
    from dataclasses import fields

    from conftest import ROOT
    from serving.config import GROUPS, default_text, env_name

    names = [n for _, _, group in GROUPS for n in group]
    assert sorted(names) == sorted(f.name for f in fields(Settings)), "a setting in no group, or in two"

    done = subprocess.run([sys.executable, str(ROOT / "api.py"), "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "100"})
    assert done.returncode == 0, done.stderr
    help_text = done.stdout
    sections = re.split(r"^([a-z][a-z ]*):\n", help_text, flags=re.MULTILINE)  # "server:", "model:", ...
    by_title = dict(zip(sections[1::2], sections[2::2]))
    assert [t for t in by_title if t != "options"] == [title for title, _, _ in GROUPS]
    for title, _, group in GROUPS:
        flags = re.findall(r"^  (--[a-z0-9-]+) ", by_title[title], flags=re.MULTILINE)
        assert flags == ["--" + n.replace("_", "-") for n in group], title
    assert "--host" not in by_title["options"]
    assert "()" not in help_text and "''" not in help_text and "default: (" not in help_text
    assert re.search(r"--quantization\n", help_text) is None  # a flag is never parted from its value

    # README's table: the same groups, in the same order, with the same defaults
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("\n## Settings", 1)[1].split("\n\n")[2]
    rows = re.findall(r"^\| (?:\*\*([a-z ]+)\*\*|`--([a-z0-9-]+)` \| `([A-Z0-9_]+)` \| `([^`]*)`)", table,
                      flags=re.MULTILINE)
    seen, defaults = [], {}
    for title, flag, env, default in rows:
        seen.append(("group", title) if title else ("flag", flag))
        if flag:
            defaults[flag.replace("-", "_")] = (env, default)
    assert seen == [item for title, _, group in GROUPS
                    for item in [("group", title)] + [("flag", n.replace("_", "-")) for n in group]]
    by_name = {f.name: f for f in fields(Settings)}
    wrong = {n: d for n, d in defaults.items() if d != (env_name(n), default_text(by_name[n]))}
    assert not wrong, f"README's settings table disagrees with serving/config.py: {wrong}"
