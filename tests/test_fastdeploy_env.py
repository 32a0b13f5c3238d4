"""Where FastDeploy can run: serving/deploy/fastdeploy_env.py, `build_env.sh --engine fastdeploy` and the preflight.

There is no GPU here: a fake `nvidia-smi` on PATH plays each machine (A100, L20, V100, T4, old CUDA),
and build_env.sh runs for real in --dry-run mode (it prints the pip commands instead of running them).
"""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from conftest import ROOT
from serving.deploy.fastdeploy_env import Gpu, detect, plan
from serving.deploy.preflight import Context
from serving.deploy.checks.engine import check_fastdeploy

A100 = "0, NVIDIA A100-SXM4-80GB, 8.0"
H100 = "1, NVIDIA H100 80GB HBM3, 9.0"
L20 = "0, NVIDIA L20, 8.9"
V100 = "0, Tesla V100-SXM2-32GB, 7.0"
T4 = "0, Tesla T4, 7.5"


def fake_nvidia_smi(tmp_path, gpus: list, cuda: str):
    """A PATH with an nvidia-smi that reports `gpus` (index, name, compute capability) and `cuda`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    listing = "\\n".join(gpus)
    script.write_text(f"""#!/bin/sh
case "$1" in
  --query-gpu=*) printf '{listing}\\n' ;;
  -L) echo "GPU 0: fake" ;;
  *) echo "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: {cuda}     |" ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def build_env(path_env: str, *args):
    env = dict(os.environ, PATH=path_env)
    env.pop("BUILD_ENV_ENGINE", None)
    return subprocess.run(["bash", "build_env.sh", "--dry-run", "--engine", "fastdeploy", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def gpus(*lines):
    return [Gpu(int(i), n.strip(), c.strip()) for i, n, c in (line.split(",") for line in lines)]


# ---------------------------------------------------------------- the decision

@pytest.mark.parametrize("lines,cuda,ok,words", [
    ([A100], "12.4", True, ["fastdeploy-gpu-80_90", "cu126"]),
    ([A100, H100], "12.9", True, ["fastdeploy-gpu-80_90", "cu129"]),
    ([L20], "12.6", True, ["fastdeploy-gpu-86_89", "cu126"]),
    ([V100], "12.4", False, ["SM70", "none for V100", "built-in engine"]),
    ([T4], "12.2", False, ["SM75", "built-in engine"]),
    ([A100], "12.2", False, ["CUDA 12.2", "12.3 or newer", "built-in engine"]),
    ([A100, L20], "12.4", False, ["different FastDeploy wheels", "CUDA_VISIBLE_DEVICES"]),
    ([], "", False, ["no NVIDIA GPU", "built-in engine"]),
])
def test_which_machines_get_fastdeploy(lines, cuda, ok, words):
    verdict = plan(gpus(*lines), cuda, system="Linux", machine="x86_64", python=(3, 11))
    assert verdict.ok is ok
    text = verdict.reason + (" " + " ".join(" ".join(c) for c in verdict.commands()) if ok else "")
    for word in words:
        assert word in text, text


def test_platform_and_python_limits():
    assert "Linux x86_64" in plan(gpus(A100), "12.4", system="Darwin", machine="arm64", python=(3, 11)).reason
    assert "3.10 to 3.12" in plan(gpus(A100), "12.4", system="Linux", machine="x86_64", python=(3, 13)).reason


def test_detect_reads_nvidia_smi_and_cuda_visible_devices(tmp_path):
    path = fake_nvidia_smi(tmp_path, [A100, "1, NVIDIA L20, 8.9"], "12.8")

    def run(cmd, **kw):
        return subprocess.run(cmd, env=dict(os.environ, PATH=path), **kw)

    found, cuda = detect(run=run, environ={})
    assert [g.sm for g in found] == ["SM80", "SM89"] and cuda == "12.8"
    found, _ = detect(run=run, environ={"CUDA_VISIBLE_DEVICES": "1"})
    assert [g.name for g in found] == ["NVIDIA L20"]


# ---------------------------------------------------------------- build_env.sh --engine fastdeploy

def test_build_env_installs_the_wheels_for_the_gpu(tmp_path):
    done = build_env(fake_nvidia_smi(tmp_path, [A100], "12.4"))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "paddlepaddle-gpu==3.2.0 -i https://www.paddlepaddle.org.cn/packages/stable/cu126/" in out
    assert ("pip install fastdeploy-gpu -i https://www.paddlepaddle.org.cn/packages/stable/fastdeploy-gpu-80_90/ "
            "--extra-index-url https://pypi.org/simple") in out
    assert "paddlepaddle==3.3.1" not in out  # not the CPU build of the built-in engine's step
    done = build_env(fake_nvidia_smi(tmp_path, [L20], "12.9"))
    assert done.returncode == 0 and "fastdeploy-gpu-86_89/" in done.stdout and "/cu129/" in done.stdout


@pytest.mark.parametrize("lines,cuda,words", [
    ([V100], "12.4", "SM70"),
    ([T4], "12.4", "SM75"),
    ([A100], "12.1", "CUDA 12.1"),
])
def test_build_env_stops_where_fastdeploy_has_no_wheels(tmp_path, lines, cuda, words):
    done = build_env(fake_nvidia_smi(tmp_path, lines, cuda))
    assert done.returncode != 0
    assert words in done.stderr and "use the built-in engine" in done.stderr
    assert "pip install fastdeploy-gpu" not in done.stdout


def test_build_env_refuses_an_unknown_engine():
    done = subprocess.run(["bash", "build_env.sh", "--engine", "vllm"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown --engine vllm" in done.stderr


# ---------------------------------------------------------------- the preflight

def test_preflight_checks_the_same_before_a_fastdeploy_deployment(tmp_path, monkeypatch):
    paddle = check_fastdeploy(Context(ROOT, backend="paddle"))
    assert paddle.status == "PASS" and "built-in" in paddle.detail
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, [T4], "12.4"))
    t4 = check_fastdeploy(Context(ROOT, backend="fastdeploy"))
    assert t4.status == "FAIL" and "SM75" in t4.detail and "--backend paddle" in t4.fix
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, [A100], "12.4"))
    a100 = check_fastdeploy(Context(ROOT, backend="fastdeploy"))
    # the GPU is right; FastDeploy itself is not installed here
    assert a100.status == "FAIL" and "fastdeploy-gpu-80_90" in a100.detail
    assert "build_env.sh --engine fastdeploy" in a100.fix
    monkeypatch.setenv("BACKEND", "fastdeploy")
    assert Context(ROOT).backend_name == "fastdeploy"
