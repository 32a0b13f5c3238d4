"""What this machine offers the kit: Python, PaddlePaddle, PaddleFormers, GPU, memory, disk.

`check_environment()` returns rows (name, value, ok, advice) for notebook 01 to show.
`gather_facts()` probes the machine and `rows_from(facts)` judges them, so the judging is
testable with made-up machines. A row with `required=True` that is not ok means nothing will
run; the others are advice (a CPU-only machine runs the demo model, not the 3B model in earnest).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

PYTHON_MIN = (3, 9)
PADDLE_MIN = (3, 3)  # PaddleFormers 1.2 warns below it, and build_env.sh keeps GPU builds from it on
PADDLEFORMERS_MIN = (1, 2)  # the first with Qwen2.5-VL as this kit uses it
GPU_MEMORY_MIN_GB = 12  # Qwen2.5-VL-3B in bfloat16/float16: ~7.5 GB of weights plus activations
MEMORY_MIN_GB_GPU = 8  # host RAM to stage the checkpoint while it moves to the GPU
MEMORY_MIN_GB_CPU = 16  # the 3B model in float32 on CPU
DISK_MIN_GB = 10  # the 3B checkpoint is ~7.5 GB
GB = 1024 ** 3

BUILD_ENV = "run `bash build_env.sh` (from the repo root), then restart the kernel"


@dataclass(frozen=True)
class Row:
    name: str
    value: str
    ok: bool
    advice: str = ""  # what to do when not ok (or a note when ok)
    required: bool = True  # False: the kit still runs, but not as well as it could


@dataclass(frozen=True)
class Gpu:
    name: str
    total_memory: int  # bytes
    capability: tuple  # (major, minor)


@dataclass
class Facts:
    python: tuple  # sys.version_info[:3]
    paddle: Optional[str] = None  # version, None when it cannot be imported
    paddle_error: str = ""
    paddle_cuda: bool = False  # compiled with CUDA (the GPU build)
    gpus: list = field(default_factory=list)  # Gpu, as PaddlePaddle sees them
    nvidia_smi: bool = False  # the machine has an NVIDIA GPU, whatever Paddle sees
    paddleformers: Optional[str] = None
    memory_available: Optional[int] = None  # bytes
    memory_total: Optional[int] = None
    disk_path: str = ""
    disk_free: Optional[int] = None  # bytes
    torch: bool = False  # torch is installed


def version_tuple(text: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", str(text).split("+")[0])[:3])


def _gb(n: Optional[int]) -> str:
    return "unknown" if n is None else f"{n / GB:.1f} GiB"


# ---------------------------------------------------------------------------- probing

def gather_facts(disk_path: Optional[str] = None) -> Facts:
    """Probe this machine. Imports paddle: run build_env.sh first, the kernel keeps what it imported."""
    facts = Facts(python=tuple(sys.version_info[:3]))
    try:
        import paddle

        facts.paddle = paddle.__version__
        facts.paddle_cuda = bool(paddle.device.is_compiled_with_cuda())
        if facts.paddle_cuda:
            for i in range(paddle.device.cuda.device_count()):
                props = paddle.device.cuda.get_device_properties(i)
                facts.gpus.append(Gpu(props.name, int(props.total_memory), (props.major, props.minor)))
    except Exception as exc:  # not installed, or a broken install (missing CUDA libraries, ...)
        facts.paddle_error = f"{type(exc).__name__}: {exc}"[:300]
    facts.nvidia_smi = _nvidia_smi_sees_gpu()
    try:
        from importlib.metadata import version

        facts.paddleformers = version("paddleformers")
    except Exception:
        facts.paddleformers = None
    facts.memory_available, facts.memory_total = _memory()
    facts.disk_path = disk_path or os.path.expanduser("~")
    try:
        facts.disk_free = shutil.disk_usage(facts.disk_path).free
    except OSError:
        facts.disk_free = None
    facts.torch = importlib.util.find_spec("torch") is not None
    return facts


def _nvidia_smi_sees_gpu() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def _memory() -> tuple:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except ImportError:
        pass
    try:
        info = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        return info.get("MemAvailable"), info.get("MemTotal")
    except (OSError, ValueError, IndexError):
        return None, None


# ---------------------------------------------------------------------------- judging

def rows_from(facts: Facts) -> list[Row]:
    rows = []
    py = ".".join(map(str, facts.python))
    if tuple(facts.python[:2]) >= PYTHON_MIN:
        rows.append(Row("Python", py, True))
    else:
        rows.append(Row("Python", py, False, f"PaddlePaddle 3.3 needs Python {PYTHON_MIN[0]}.{PYTHON_MIN[1]} or newer: "
                                             "choose a newer Python environment (on AI Studio: a newer image)"))

    if facts.paddle is None:
        rows.append(Row("PaddlePaddle", "not importable", False,
                        f"{facts.paddle_error or 'not installed'}; {BUILD_ENV}"))
    else:
        build = "GPU build" if facts.paddle_cuda else "CPU build"
        value = f"{facts.paddle} ({build})"
        if version_tuple(facts.paddle) >= PADDLE_MIN:
            rows.append(Row("PaddlePaddle", value, True))
        else:
            what = ("installs paddlepaddle-gpu 3.3.1 for this machine's CUDA" if facts.nvidia_smi or facts.paddle_cuda
                    else "installs paddlepaddle 3.3.1")
            rows.append(Row("PaddlePaddle", value, False,
                            f"PaddlePaddle {facts.paddle} is older than {PADDLE_MIN[0]}.{PADDLE_MIN[1]}, which "
                            f"PaddleFormers needs: run `bash build_env.sh` (it {what}), then restart the kernel"))

    if facts.paddleformers is None:
        rows.append(Row("PaddleFormers", "not installed", False, BUILD_ENV))
    elif version_tuple(facts.paddleformers) >= PADDLEFORMERS_MIN:
        rows.append(Row("PaddleFormers", facts.paddleformers, True))
    else:
        rows.append(Row("PaddleFormers", facts.paddleformers, False,
                        f"older than {'.'.join(map(str, PADDLEFORMERS_MIN))}, which brings Qwen2.5-VL; {BUILD_ENV}"))

    rows.append(_device_row(facts))

    need = MEMORY_MIN_GB_GPU if facts.gpus else MEMORY_MIN_GB_CPU
    value = f"{_gb(facts.memory_available)} free of {_gb(facts.memory_total)}"
    if facts.memory_available is None:
        rows.append(Row("Memory", value, True, "could not read the free memory", required=False))
    elif facts.memory_available >= need * GB:
        rows.append(Row("Memory", value, True, required=False))
    else:
        rows.append(Row("Memory", value, False,
                        f"Qwen2.5-VL-3B needs about {need} GiB free {'to load onto the GPU' if facts.gpus else 'on CPU'}; "
                        "close other kernels (each notebook that loaded a model holds it) or choose a larger "
                        "machine. The demo model needs little.", required=False))

    value = f"{_gb(facts.disk_free)} free at {facts.disk_path}"
    if facts.disk_free is None or facts.disk_free >= DISK_MIN_GB * GB:
        rows.append(Row("Disk", value, True, required=False))
    else:
        rows.append(Row("Disk", value, False,
                        f"downloading Qwen2.5-VL-3B needs about {DISK_MIN_GB} GiB; free some space or point the "
                        "hub cache elsewhere (AISTUDIO_CACHE, HF_HOME)", required=False))

    if facts.torch:
        rows.append(Row("PyTorch", "installed", False,
                        "AI Studio's serving refuses PyTorch and this kit never needs it: pip uninstall torch",
                        required=False))
    else:
        rows.append(Row("PyTorch", "not installed", True, required=False))
    return rows


def _device_row(facts: Facts) -> Row:
    if facts.gpus:
        best = max(facts.gpus, key=lambda g: g.total_memory)
        names = ", ".join(f"{g.name} ({_gb(g.total_memory)}, sm_{g.capability[0]}{g.capability[1]})" for g in facts.gpus)
        value = f"GPU: {names}"
        dtype = "bfloat16" if best.capability[0] >= 8 else "float16 (bfloat16 needs sm_80 or newer)"
        if best.total_memory < GPU_MEMORY_MIN_GB * GB:
            return Row("Device", value, False,
                       f"Qwen2.5-VL-3B needs about {GPU_MEMORY_MIN_GB} GiB of GPU memory; choose a larger GPU",
                       required=False)
        return Row("Device", value, True, f"the model will run in {dtype}", required=False)
    if facts.paddle_cuda:
        return Row("Device", "GPU build of PaddlePaddle, but it sees no GPU", False,
                   "check nvidia-smi and CUDA_VISIBLE_DEVICES; without a GPU install the CPU build "
                   "(build_env.sh does on a machine without one)", required=False)
    if facts.nvidia_smi:
        return Row("Device", "CPU build of PaddlePaddle on a machine with a GPU", False,
                   f"the GPU goes unused: {BUILD_ENV} (it replaces the CPU build with paddlepaddle-gpu)",
                   required=False)
    return Row("Device", "CPU only (no GPU)", False,
               "the demo model runs on CPU; Qwen2.5-VL-3B answers slowly there: choose a GPU environment "
               "on AI Studio to serve it", required=False)


def check_environment(disk_path: Optional[str] = None) -> list[Row]:
    return rows_from(gather_facts(disk_path))


def problems(rows: list[Row], required_only: bool = True) -> list[Row]:
    return [r for r in rows if not r.ok and (r.required or not required_only)]


def as_records(rows: list[Row]) -> list[dict]:
    """Rows as dicts with a ✓/✗ column, for a pandas DataFrame or an HTML table."""
    return [{"check": r.name, "value": r.value, "ok": "✓" if r.ok else ("✗" if r.required else "!"),
             "advice": r.advice} for r in rows]

