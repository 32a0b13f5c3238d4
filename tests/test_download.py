"""serving.model.download: verification of a checkpoint folder, fast offline failure, resume, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from serving.model import download as dl
from serving.model.demo import demo_path
from serving.model.download import DownloadError, download, probe, verify_checkpoint
from serving.model.loader import is_hub_id
from serving.model.loader import ModelLoadError

HUB_ID = "Qwen/Qwen2.5-VL-3B-Instruct"


@pytest.fixture(scope="module")
def demo_dir():
    return demo_path("demo")


@pytest.fixture()
def demo_copy(demo_dir, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(demo_dir, target)
    return target


def shards(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


@pytest.fixture()
def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture()
def unreachable_hubs(monkeypatch, closed_port):
    """Every hub's client pointed at a local port where nothing listens (offline, whatever the network)."""
    url = f"http://127.0.0.1:{closed_port}"
    monkeypatch.setenv("STUDIO_GIT_HOST", url)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("MODELSCOPE_DOMAIN", url)
    return url


# --------------------------------------------------------------------------- verification


def test_demo_checkpoint_verifies(demo_dir):
    result = verify_checkpoint(demo_dir)
    assert result.ok, result.summary()
    assert result.shards == len(shards(demo_dir)) == 2
    assert result.tensors == len(json.loads((demo_dir / "model.safetensors.index.json").read_text())["weight_map"])
    assert result.parameters > 0
    assert "complete" in result.summary()


def test_missing_shard_is_reported(demo_copy):
    (demo_copy / shards(demo_copy)[1]).unlink()
    result = verify_checkpoint(demo_copy)
    assert not result.ok
    assert any("missing" in p and shards(demo_copy)[1] in p for p in result.problems)


def test_truncated_shard_is_reported(demo_copy):
    shard = demo_copy / shards(demo_copy)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])  # an interrupted download
    result = verify_checkpoint(demo_copy)
    assert not result.ok
    assert any("incomplete" in p and shard.name in p for p in result.problems), result.problems


def test_shard_cut_inside_its_header_is_reported(demo_copy):
    shard = demo_copy / shards(demo_copy)[0]
    shard.write_bytes(shard.read_bytes()[:100])
    result = verify_checkpoint(demo_copy)
    assert any("damaged" in p for p in result.problems), result.problems


def test_missing_config_and_tokenizer_are_reported(demo_copy):
    (demo_copy / "config.json").unlink()
    (demo_copy / "tokenizer.json").unlink()
    (demo_copy / "vocab.json").unlink()
    problems = " ".join(verify_checkpoint(demo_copy).problems)
    assert "config.json is missing" in problems
    assert "tokenizer files are missing" in problems


def test_index_that_disagrees_with_the_shards_is_reported(demo_copy):
    index_path = demo_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] += 4
    index_path.write_text(json.dumps(index))
    assert any("total_size" in p for p in verify_checkpoint(demo_copy).problems)

    index["metadata"]["total_size"] -= 4
    first, second = shards(demo_copy)
    name = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][name] = second  # the index says it is in the other shard
    index_path.write_text(json.dumps(index))
    assert any("lacks 1 tensor" in p for p in verify_checkpoint(demo_copy).problems)


def test_folder_without_weights(tmp_path):
    assert verify_checkpoint(tmp_path / "nothing").problems == ["the folder does not exist"]
    (tmp_path / "config.json").write_text("{}")
    assert any("no weights" in p for p in verify_checkpoint(tmp_path).problems)


def test_is_hub_id(tmp_path):
    assert is_hub_id(HUB_ID)
    assert not is_hub_id("demo")
    assert not is_hub_id(str(tmp_path))
    assert not is_hub_id("./models/x")
    assert not is_hub_id("a/b/c")
    assert not is_hub_id("Qwen2.5-VL-3B-Instruct")


# --------------------------------------------------------------------------- offline: fail fast and clearly


@pytest.mark.parametrize("hub", dl.HUBS)
def test_unreachable_hub_fails_at_once(hub, unreachable_hubs, tmp_path):
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download(HUB_ID, hub, tmp_path / "m", timeout=3)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert f"cannot reach the {hub} hub at {unreachable_hubs}" in message
    assert "--model demo" in message and "copy the folder" in message
    assert isinstance(info.value, ModelLoadError)  # notebooks and the server report it like any load failure
    assert not (tmp_path / "m").exists()  # nothing started


def test_probe_has_a_hard_deadline():
    """A server that accepts the connection and never answers (or DNS that hangs) costs `timeout`, no more."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        reason = probe(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1.0)
        elapsed = time.monotonic() - started
    assert reason is not None
    assert elapsed < 3


def test_real_hubs_fail_fast_when_offline(tmp_path):
    """On this machine the hubs are unreachable: each fails within seconds (a hub client alone retries ~20 s)."""
    for hub in dl.HUBS:
        if probe(dl.hub_endpoint(hub), timeout=5) is None:
            pytest.skip(f"the {hub} hub is reachable from here; this test is about offline machines")
    for hub in dl.HUBS:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "serving.model.download", HUB_ID, "--hub", hub,
                               "--to", str(tmp_path / hub)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"cannot reach the {hub} hub" in done.stderr
        assert elapsed < 20, f"{hub}: {elapsed:.1f} s"
        assert not any((tmp_path / hub).glob("*.safetensors"))


# --------------------------------------------------------------------------- resume and completeness


def _copier(source, only=None, then=None):
    """A stand-in for a hub client: copies (some of) the demo checkpoint, then maybe fails."""
    def fetch(hub, model, to, revision, endpoint):
        for path in sorted(source.iterdir()):
            if only is None or only(path.name):
                if not (to / path.name).exists():
                    shutil.copy2(path, to / path.name)
        if then is not None:
            raise then
    return fetch


def test_interrupted_download_resumes_and_verifies(demo_dir, tmp_path, capsys):
    target = tmp_path / "m"
    first = _copier(demo_dir, only=lambda n: not n.endswith(".safetensors"), then=KeyboardInterrupt())
    with pytest.raises(DownloadError, match="interrupted; run the same command again to resume"):
        download(HUB_ID, "huggingface", target, fetch=first)
    assert not verify_checkpoint(target).ok

    result = download(HUB_ID, "huggingface", target, fetch=_copier(demo_dir))
    assert result.ok and result.shards == 2


def test_a_hub_error_becomes_one_clear_message(tmp_path):
    def fetch(*args):
        raise OSError("Connection reset by peer")

    with pytest.raises(DownloadError) as info:
        download(HUB_ID, "modelscope", tmp_path / "m", fetch=fetch)
    assert "Connection reset by peer" in str(info.value)
    assert "run the same command again" in str(info.value)


def test_incomplete_result_is_an_error(demo_dir, tmp_path):
    fetch = _copier(demo_dir, only=lambda n: not n.startswith("model-00002"))
    with pytest.raises(DownloadError, match="not complete"):
        download(HUB_ID, "aistudio", tmp_path / "m", fetch=fetch)


def test_complete_folder_needs_no_network(demo_dir, tmp_path, unreachable_hubs):
    target = tmp_path / "m"
    shutil.copytree(demo_dir, target)

    def must_not_run(*args):
        raise AssertionError("the hub was asked although the folder is complete")

    assert download(HUB_ID, "aistudio", target, fetch=must_not_run).ok
    assert dl.download_model(HUB_ID, "aistudio", target) == target  # no probe either: the hub is unreachable


# --------------------------------------------------------------------------- command line


def test_cli_verify(demo_dir, demo_copy):
    ok = subprocess.run([sys.executable, "-m", "serving.model.download", "--verify", str(demo_dir)], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "complete" in ok.stdout
    (demo_copy / shards(demo_copy)[0]).unlink()
    bad = subprocess.run([sys.executable, "-m", "serving.model.download", "--verify", str(demo_copy)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "is missing" in bad.stdout


def test_cli_offline_and_bad_arguments(tmp_path, closed_port):
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{closed_port}")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "serving.model.download", HUB_ID, "--hub", "huggingface",
                           "--to", str(tmp_path / "m")], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1
    assert "error: cannot reach the huggingface hub" in done.stderr
    assert time.monotonic() - started < 20
    bad = subprocess.run([sys.executable, "-m", "serving.model.download", "./not/a/hub/id"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a hub id" in bad.stderr
