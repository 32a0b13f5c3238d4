"""serving/deploy/environment.py: judging made-up machines, and probing this one."""

from __future__ import annotations

from serving.deploy.environment import GB, Facts, Gpu, Row, as_records, check_environment, problems, rows_from, version_tuple


def machine(**overrides) -> Facts:
    """A healthy AI Studio GPU machine; tests change one thing at a time."""
    values = dict(python=(3, 10, 10), paddle="3.3.1", paddle_cuda=True,
                  gpus=[Gpu("Tesla V100-SXM2-32GB", 32 * GB, (7, 0))], nvidia_smi=True,
                  paddleformers="1.2.0", memory_available=60 * GB, memory_total=64 * GB,
                  disk_path="/home/aistudio", disk_free=100 * GB, torch=False)
    values.update(overrides)
    return Facts(**values)


def row(rows, name) -> Row:
    return next(r for r in rows if r.name == name)


def test_healthy_gpu_machine_has_no_problems():
    rows = rows_from(machine())
    assert [r.name for r in rows] == ["Python", "PaddlePaddle", "PaddleFormers", "Device", "Memory", "Disk", "PyTorch"]
    assert problems(rows, required_only=False) == []
    device = row(rows, "Device")
    assert "Tesla V100-SXM2-32GB" in device.value and "32.0 GiB" in device.value and "sm_70" in device.value
    assert "float16" in device.advice  # V100 has no bfloat16
    assert row(rows, "PaddlePaddle").value == "3.3.1 (GPU build)"


def test_old_paddle_on_ai_studio_says_run_build_env():
    rows = rows_from(machine(paddle="2.6.1"))
    paddle = row(rows, "PaddlePaddle")
    assert not paddle.ok and paddle.required
    assert "older than 3.3" in paddle.advice and "build_env.sh" in paddle.advice
    assert "paddlepaddle-gpu" in paddle.advice and "restart the kernel" in paddle.advice
    assert problems(rows) == [paddle]


def test_missing_paddle_and_paddleformers_are_required():
    rows = rows_from(machine(paddle=None, paddle_error="ModuleNotFoundError: No module named 'paddle'",
                             paddle_cuda=False, gpus=[], paddleformers=None))
    assert {r.name for r in problems(rows)} == {"PaddlePaddle", "PaddleFormers"}
    assert "No module named 'paddle'" in row(rows, "PaddlePaddle").advice


def test_cpu_build_on_a_gpu_machine():
    device = row(rows_from(machine(paddle_cuda=False, gpus=[])), "Device")
    assert not device.ok and not device.required
    assert "CPU build" in device.value and "build_env.sh" in device.advice


def test_cpu_only_machine_is_advice_not_failure():
    rows = rows_from(machine(paddle_cuda=False, gpus=[], nvidia_smi=False, memory_available=20 * GB))
    device = row(rows, "Device")
    assert device.value == "CPU only (no GPU)" and not device.ok and not device.required
    assert "demo" in device.advice
    assert problems(rows) == []


def test_small_gpu_low_memory_low_disk_torch():
    rows = rows_from(machine(gpus=[Gpu("T4", 8 * GB, (7, 5))], memory_available=4 * GB, disk_free=3 * GB,
                             torch=True))
    assert {r.name for r in problems(rows, required_only=False)} == {"Device", "Memory", "Disk", "PyTorch"}
    assert problems(rows) == []
    assert "pip uninstall torch" in row(rows, "PyTorch").advice


def test_memory_need_depends_on_the_device():
    gpu = rows_from(machine(memory_available=10 * GB))
    cpu = rows_from(machine(paddle_cuda=False, gpus=[], nvidia_smi=False, memory_available=10 * GB))
    assert row(gpu, "Memory").ok and not row(cpu, "Memory").ok


def test_old_python():
    python = row(rows_from(machine(python=(3, 8, 18))), "Python")
    assert not python.ok and python.required and "3.9" in python.advice


def test_version_tuple():
    assert version_tuple("3.3.1") == (3, 3, 1)
    assert version_tuple("3.0.0rc1") == (3, 0, 0)
    assert version_tuple("2.6.1+cu118") == (2, 6, 1)
    assert version_tuple("3.3.1.post20250101") >= (3, 3)


def test_records_for_a_table():
    records = as_records(rows_from(machine(paddle="2.6.1", torch=True)))
    marks = {r["check"]: r["ok"] for r in records}
    assert marks["PaddlePaddle"] == "✗" and marks["PyTorch"] == "!" and marks["Python"] == "✓"
    assert set(records[0]) == {"check", "value", "ok", "advice"}


def test_this_machine(tmp_path):
    """The real probe: the test environment has Paddle >= 3.3 and PaddleFormers installed."""
    rows = check_environment(str(tmp_path))
    assert problems(rows) == [], [r for r in rows if not r.ok]
    assert row(rows, "Disk").value.endswith(str(tmp_path))
    assert "GiB free of" in row(rows, "Memory").value
