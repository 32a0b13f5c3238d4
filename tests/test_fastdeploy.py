"""--backend fastdeploy: the launcher (serving/engines/fastdeploy.py) against a stand-in `fastdeploy` package.

FastDeploy itself needs an SM80+ GPU and is not on PyPI, so it cannot run here. tests/stand_ins/fastdeploy
takes FastDeploy's flags, checks what its Qwen2.5-VL guide asks for, and serves this project's own server,
so everything around it is real: the command line, the prepared model folder, the ports, the readiness
wait, the log lines, the crash handling, the stop.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import requests

from conftest import ROOT, b64, png_bytes
from serving.engines import fastdeploy
from serving.web.app import create_app
from serving.config import Settings, load_settings
from serving.model.demo import demo_path
from serving.engines.fastdeploy import (FastDeployError, Ports, child_env, command, prepare_model_dir, start_fastdeploy,
                                visible_gpus)
from serving.web.server import free_port

STAND_INS = ROOT / "tests" / "stand_ins"
QUESTION = {"messages": [{"role": "user", "content": [
    {"type": "image", "image": b64(png_bytes((120, 90), (30, 160, 60)))}, {"type": "text", "text": "What is this?"}]}],
    "max_tokens": 20, "temperature": 0}


@pytest.fixture()
def stand_in(monkeypatch, tmp_path):
    """The stand-in on the child's PYTHONPATH; returns the path where it records what it was given."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(STAND_INS), str(ROOT)]))
    record = tmp_path / "record.json"
    monkeypatch.setenv("FASTDEPLOY_STANDIN_RECORD", str(record))
    monkeypatch.delenv("FASTDEPLOY_STANDIN_MODE", raising=False)
    return record


def fd_settings(**changes):
    return replace(Settings(model="demo", backend="fastdeploy", max_images=3, max_batch_size=6,
                            gpu_memory_utilization=0.8, tensor_parallel=2, fastdeploy_start_timeout=120), **changes)


def gone(pid, timeout=15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------- pieces

def test_the_command_line_is_built_from_the_settings(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 8192}}))
    ports = Ports(7001, 7002, 7003, 7004)
    settings = replace(fd_settings(), served_model_name="qwen-vl", fastdeploy_args="--quantization wint8 "
                       "--tool-call-parser 'ernie_x1'", max_videos=2)
    argv = command(settings, tmp_path, ports, python="/usr/bin/python3")
    assert argv == ["/usr/bin/python3", "-m", "fastdeploy.entrypoints.openai.api_server",
                    "--model", str(tmp_path), "--served-model-name", "qwen-vl", "--host", "127.0.0.1",
                    "--port", "7001", "--metrics-port", "7002", "--engine-worker-queue-port", "7003",
                    "--cache-queue-port", "7004", "--max-model-len", "8192", "--max-num-seqs", "6",
                    "--limit-mm-per-prompt", '{"image": 3, "video": 2}', "--tensor-parallel-size", "2",
                    "--gpu-memory-utilization", "0.8", "--quantization", "wint8", "--tool-call-parser", "ernie_x1"]
    # defaults: the context capped at 32768, 32 sequences, the model's name, every visible GPU
    auto = command(replace(Settings(model="/m/Qwen2.5-VL-7B-Instruct"), tensor_parallel=0), tmp_path, ports, gpus=4)
    flags = dict(zip(auto[3::2], auto[4::2]))
    assert flags["--served-model-name"] == "/m/Qwen2.5-VL-7B-Instruct" and flags["--max-num-seqs"] == "32"
    assert flags["--tensor-parallel-size"] == "4" and flags["--max-model-len"] == "8192"
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 128000}))
    assert dict(zip(*[iter(command(Settings(), tmp_path, ports, gpus=1)[3:])] * 2))["--max-model-len"] == "32768"
    assert len(set(Ports.free().__dict__.values())) == 4


def test_visible_gpus():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,3"}) == 3
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 1

    class Done:
        returncode, stdout = 0, "GPU 0: NVIDIA A100 (UUID: x)\nGPU 1: NVIDIA A100 (UUID: y)\n"

    assert visible_gpus({}, run=lambda *a, **k: Done()) == 2


def test_the_child_environment_has_the_scheduler_flag_and_none_of_our_settings():
    env = child_env({"PATH": "/bin", "API_KEY": "secret", "PORT": "8080", "BACKEND": "fastdeploy",
                     "CUDA_VISIBLE_DEVICES": "0"})
    assert env["ENABLE_V1_KVCACHE_SCHEDULER"] == "1" and env["CUDA_VISIBLE_DEVICES"] == "0" and env["PATH"] == "/bin"
    assert not {"API_KEY", "PORT", "BACKEND"} & set(env)


def test_the_model_folder_is_prepared_without_touching_the_users(tmp_path):
    user = tmp_path / "Qwen2.5-VL-3B-Instruct"
    (user / "sub").mkdir(parents=True)
    config = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "hidden_size": 2048}
    (user / "config.json").write_text(json.dumps(config))
    (user / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1024)
    (user / "tokenizer.json").write_text("{}")
    (user / "sub" / "x").write_text("x")
    before = {p: p.read_bytes() for p in user.rglob("*") if p.is_file()}
    prepared = prepare_model_dir(user, tmp_path / "cache")
    assert prepared != user and prepared.parent == tmp_path / "cache"
    assert json.loads((prepared / "config.json").read_text()) == dict(config, rope_3d=True, freq_allocation=16)
    for name in ("model-00001-of-00002.safetensors", "tokenizer.json", "sub"):
        assert (prepared / name).is_symlink() and (prepared / name).resolve() == (user / name).resolve()
    assert {p: p.read_bytes() for p in user.rglob("*") if p.is_file()} == before  # the user's folder, unchanged
    assert prepare_model_dir(user, tmp_path / "cache") == prepared  # the same preparation is reused
    (user / "preprocessor_config.json").write_text("{}")  # a file added later is linked too
    again = prepare_model_dir(user, tmp_path / "cache")
    assert (again / "preprocessor_config.json").is_symlink()
    done = dict(config, rope_3d=True, freq_allocation=16)
    (user / "config.json").write_text(json.dumps(done))
    assert prepare_model_dir(user, tmp_path / "cache") == user.resolve()  # already right: used as it is


def test_concurrent_preparations_of_one_folder_agree_and_never_replace_each_other(tmp_path):
    """Several servers preparing one folder at once (docs/backends.md's one FastDeploy per GPU starts two): each gets the
    same prepared folder, none fails, and a folder once returned is never replaced (it used to be removed and
    renamed over: ENOTEMPTY failures, and folders replaced after they were returned)."""
    from concurrent.futures import ThreadPoolExecutor

    user = tmp_path / "Qwen2.5-VL-3B-Instruct"
    user.mkdir()
    (user / "config.json").write_text(json.dumps({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}))
    for k in range(20):
        (user / f"file{k}.json").write_text("{}")
    cache = tmp_path / "cache"
    returned = []

    def prepare(_):
        folder = prepare_model_dir(user, cache)
        returned.append((folder, (folder / "config.json").stat().st_ino))
        return folder

    with ThreadPoolExecutor(16) as pool:
        folders = list(pool.map(prepare, range(64)))
    assert len(set(folders)) == 1
    assert {ino for _, ino in returned} == {(folders[0] / "config.json").stat().st_ino}  # never replaced
    assert [p.name for p in cache.iterdir()] == [folders[0].name]  # no temporary folder left behind
    assert len(list(folders[0].iterdir())) == 21


# ---------------------------------------------------------------- the child, for real (the stand-in)

def test_fastdeploy_starts_answers_and_stops_with_us(stand_in, engine, settings, caplog):
    caplog.set_level(logging.INFO, logger="serving.engines.fastdeploy")
    exits = []
    fd = start_fastdeploy(fd_settings(), on_exit=exits.append, cache_root=None)
    try:
        seen = json.loads(stand_in.read_text())
        argv = seen["argv"]
        flags = dict(zip(argv[0::2], argv[1::2]))
        assert flags["--served-model-name"] == "demo" and flags["--host"] == "127.0.0.1"
        assert flags["--max-num-seqs"] == "6" and flags["--tensor-parallel-size"] == "2"
        assert flags["--gpu-memory-utilization"] == "0.8" and flags["--max-model-len"] == "32768"
        assert json.loads(flags["--limit-mm-per-prompt"])["image"] == 3
        ports = [int(flags[f]) for f in ("--port", "--metrics-port", "--engine-worker-queue-port", "--cache-queue-port")]
        assert len(set(ports)) == 4 and 8080 not in ports
        assert seen["env"] == {"ENABLE_V1_KVCACHE_SCHEDULER": "1", "PORT": None, "MODEL": None, "API_KEY": None,
                               "BACKEND": None}
        assert seen["config"]["rope_3d"] is True and seen["config"]["freq_allocation"] == 16
        assert Path(flags["--model"]) != demo_path("demo") and "rope_3d" not in (demo_path("demo") / "config.json").read_text()
        assert seen["pgid"] == seen["pid"] == fd.supervisor.pid  # a process group of its own
        # its log lines are in ours, prefixed
        assert any(r.getMessage().startswith("[fastdeploy] api_server.py[standin] Launching") for r in caplog.records)
        # ready: answers through this server's own app equal the built-in engine's
        assert fd.health() == (True, "ok") and fd.info.name == "demo" and fd.info.is_demo
        assert fd.info.context_length == 32768
        ours = create_app(replace(settings, backend="fastdeploy"), fd).test_client()
        direct = create_app(settings, engine).test_client()
        a, b = ours.post("/v1/chat/completions", json=QUESTION), direct.post("/v1/chat/completions", json=QUESTION)
        assert a.status_code == 200 and b.status_code == 200, a.get_data(as_text=True)
        assert a.get_json()["choices"][0]["message"]["content"] == b.get_json()["choices"][0]["message"]["content"]
        counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached_tokens: each server's own reuse
        assert [a.get_json()["usage"][k] for k in counts] == [b.get_json()["usage"][k] for k in counts]
        health = ours.get("/health").get_json()
        assert health["status"] == "ok" and health["upstreams"][0]["url"] == f"http://127.0.0.1:{ports[0]}"
    finally:
        fd.close()
    assert gone(seen["pid"]) and not fd.supervisor.alive()
    with pytest.raises(ProcessLookupError):
        os.killpg(seen["pgid"], 0)  # nothing of its group is left
    assert exits == []  # a stop we asked for is not a crash


def test_a_crash_turns_health_503_and_ends_this_process_with_its_last_lines(stand_in, monkeypatch, caplog):
    monkeypatch.setenv("FASTDEPLOY_STANDIN_MODE", "die:1")
    monkeypatch.setattr(fastdeploy, "EXIT_DELAY", 3.0)
    exits = []
    fd = start_fastdeploy(fd_settings(), on_exit=exits.append)
    client = create_app(fd_settings(), fd).test_client()
    try:
        assert client.get("/health").status_code == 200
        deadline = time.monotonic() + 30
        while fd.died is None and time.monotonic() < deadline:
            time.sleep(0.05)
        r = client.get("/health")  # within EXIT_DELAY: still up, saying it cannot serve
        assert r.status_code == 503 and r.get_json()["reason"] == "FastDeploy exited with code 7"
        chat = client.post("/v1/chat/completions", json=QUESTION)
        assert chat.status_code == 503 and chat.get_json()["error"]["code"] == "engine_unavailable"
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
        assert exits == [1]
        crash = [r.getMessage() for r in caplog.records if "FastDeploy exited with code 7" in r.getMessage()]
        assert crash and "simulated crash (illegal memory access)" in crash[0]  # its last lines, in the error
    finally:
        fd.close()


def test_a_failed_start_is_one_error_with_its_last_lines(stand_in, monkeypatch):
    monkeypatch.setenv("FASTDEPLOY_STANDIN_MODE", "fail")
    with pytest.raises(FastDeployError) as info:
        start_fastdeploy(fd_settings())
    message = str(info.value)
    assert "exited with code 3 before it was ready" in message
    assert "no CUDA-capable device is detected" in message and "loading weights" in message
    assert fastdeploy._CHILDREN == []


def test_a_missing_model_folder_is_one_clear_error(tmp_path):
    with pytest.raises(FastDeployError, match="does not exist"):
        start_fastdeploy(fd_settings(model=str(tmp_path / "nowhere")))


# ---------------------------------------------------------------- api.py, as deployed

def start_api(tmp_path, port, mode=None, delay=None):
    env = {k: v for k, v in os.environ.items() if k not in ("BACKEND", "MODEL", "PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(STAND_INS), str(ROOT)]), PYTHONUNBUFFERED="1",
               FASTDEPLOY_STANDIN_RECORD=str(tmp_path / "record.json"))
    env.pop("FASTDEPLOY_STANDIN_MODE", None)
    if mode:
        env["FASTDEPLOY_STANDIN_MODE"] = mode
    if delay:
        env["FASTDEPLOY_STANDIN_DELAY"] = str(delay)
    log = open(tmp_path / "api.log", "wb")
    process = subprocess.Popen([sys.executable, "api.py", "--backend", "fastdeploy", "--model", "demo", "--host",
                                "127.0.0.1", "--port", str(port), "--max-images", "2"], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return process, tmp_path / "api.log"


def wait_health(url, process, timeout=600):  # generous: start-up is slow on a loaded machine
    statuses = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            r = requests.get(url + "/health", timeout=5)
            statuses.append((r.status_code, r.json().get("status")))
            if r.status_code == 200:
                return statuses
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready: {statuses[-3:]}")


def test_api_py_serves_through_fastdeploy_and_sigterm_stops_both(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process, log_path = start_api(tmp_path, port, delay=2)
    try:
        statuses = wait_health(url, process)
        assert (503, "loading") in statuses  # while FastDeploy loads, this server says so
        r = requests.post(url + "/v1/chat/completions", json=QUESTION, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "demo", r.text
        three = dict(QUESTION, messages=[{"role": "user", "content": [
            {"type": "image", "image": b64(png_bytes())}] * 3 + [{"type": "text", "text": "hi"}]}])
        assert requests.post(url + "/v1/chat/completions", json=three, timeout=60).json()["error"]["code"] == \
            "too_many_images"  # this server's limits, in front of FastDeploy
        child = json.loads((tmp_path / "record.json").read_text())
        assert json.loads(dict(zip(child["argv"][0::2], child["argv"][1::2]))["--limit-mm-per-prompt"])["image"] == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert gone(child["pid"])
        log = log_path.read_text(errors="replace")
        assert "[fastdeploy] api_server.py[standin] Launching chat completion service" in log
        assert "stopping fastdeploy" in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def test_api_py_exits_non_zero_when_fastdeploy_dies(tmp_path):
    port = free_port()
    process, log_path = start_api(tmp_path, port, mode="die:1")
    try:
        wait_health(f"http://127.0.0.1:{port}", process)
        code = process.wait(60)
        assert code != 0
        log = log_path.read_text(errors="replace")
        assert "FastDeploy exited with code 7" in log and "simulated crash (illegal memory access)" in log
        assert gone(json.loads((tmp_path / "record.json").read_text())["pid"])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def test_a_sigkill_of_this_server_stops_fastdeploy_too(tmp_path):
    """No cleanup runs on SIGKILL (or the OOM killer): the kernel's parent-death signal stops the child."""
    port = free_port()
    process, _ = start_api(tmp_path, port)
    try:
        wait_health(f"http://127.0.0.1:{port}", process)
        child = json.loads((tmp_path / "record.json").read_text())["pid"]
        os.kill(child, 0)  # running
        process.kill()
        process.wait(10)
        assert gone(child, timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def test_settings_reach_the_backend_choice():
    s = load_settings(["--backend", "fastdeploy", "--tensor-parallel", "4", "--gpu-memory-utilization", "0.75"],
                      environ={"FASTDEPLOY_MAX_MODEL_LEN": "16384", "FASTDEPLOY_ARGS": "--quantization wint4"})
    assert (s.backend, s.tensor_parallel, s.gpu_memory_utilization, s.fastdeploy_max_model_len, s.fastdeploy_args) == (
        "fastdeploy", 4, 0.75, 16384, "--quantization wint4")
