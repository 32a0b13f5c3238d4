"""Can FastDeploy run on this machine, and from which wheels: what `build_env.sh --engine fastdeploy`
and the preflight both ask (standard library only: build_env.sh runs it before anything is installed).

FastDeploy 2.x (PaddlePaddle/FastDeploy, docs/get_started/installation/nvidia_gpu.md) is not on PyPI.
Its GPU wheels are on PaddlePaddle's own package index, built for two groups of GPUs only:

    compute capability 8.0, 9.0  (A100, A800, A30, H100, H800, H20)   packages/stable/fastdeploy-gpu-80_90/
    compute capability 8.6, 8.9  (A10, A40, L20, L40, RTX 3090/4090)  packages/stable/fastdeploy-gpu-86_89/

and need Linux x86_64, Python 3.10-3.12, an NVIDIA driver of at least 535 and CUDA 12.3 or newer;
paddlepaddle-gpu comes first, from packages/stable/cu126/ (or cu129/ for CUDA 12.9+). There are no
wheels for V100 (SM70) or T4 (SM75): there the built-in engine (--backend paddle) is the one to use.

    python serving/deploy/fastdeploy_env.py            # the verdict, in words; exit 0 when FastDeploy can run
    python serving/deploy/fastdeploy_env.py --shell    # KEY=value lines for build_env.sh; exit 3 when it cannot
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field

INDEX = "https://www.paddlepaddle.org.cn/packages/stable"
# compute capability -> FastDeploy's wheel group (the suffix of its index)
WHEEL_GROUPS = {"8.0": "80_90", "9.0": "80_90", "8.6": "86_89", "8.9": "86_89"}
MIN_CUDA = (12, 3)
PYTHONS = ((3, 10), (3, 11), (3, 12))
PADDLE_VERSION = "3.2.0"  # paddlepaddle-gpu for FastDeploy 2.x's per-GPU-group wheels (BUILD_ENV_FD_PADDLE_VERSION)
USE_BUILT_IN = ("use the built-in engine instead: bash build_env.sh (without --engine) and python api.py "
                "(--backend paddle, the default), which runs on any GPU with CUDA 11.8+ and on CPUs")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    capability: str  # "8.0"

    @property
    def sm(self) -> str:
        return "SM" + self.capability.replace(".", "")


@dataclass
class Plan:
    ok: bool
    reason: str  # why not, or what was found
    gpus: list = field(default_factory=list)
    cuda: str = ""  # the driver's CUDA version, "12.4"
    group: str = ""  # "80_90" or "86_89"
    cuda_tag: str = ""  # "cu126" or "cu129": paddlepaddle-gpu's index

    @property
    def paddle_index(self) -> str:
        return f"{INDEX}/{self.cuda_tag}/"

    @property
    def fastdeploy_index(self) -> str:
        return f"{INDEX}/fastdeploy-gpu-{self.group}/"

    def commands(self, python: str = "python", paddle_version: str = PADDLE_VERSION) -> list:
        return [[python, "-m", "pip", "install", f"paddlepaddle-gpu=={paddle_version}", "-i", self.paddle_index],
                [python, "-m", "pip", "install", "fastdeploy-gpu", "-i", self.fastdeploy_index,
                 "--extra-index-url", "https://pypi.org/simple"]]


def _version(text: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def detect(run=subprocess.run, environ=None) -> tuple:
    """(GPUs visible to CUDA, the driver's CUDA version or "") from nvidia-smi; ([], "") without one."""
    environ = os.environ if environ is None else environ
    try:
        listing = run(["nvidia-smi", "--query-gpu=index,name,compute_cap", "--format=csv,noheader"],
                      capture_output=True, text=True, timeout=30)
        header = run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return [], ""
    if listing.returncode != 0:
        return [], ""
    gpus = []
    for line in listing.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and parts[0].isdigit():
            gpus.append(Gpu(int(parts[0]), parts[1], parts[2]))
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and all(v.strip().isdigit() for v in visible.split(",") if v.strip()):
        wanted = [int(v) for v in visible.split(",") if v.strip()]
        gpus = [g for g in gpus if g.index in wanted]
    match = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", header.stdout or "")
    return gpus, match.group(1) if match else ""


def plan(gpus: list, cuda: str, *, system: str = None, machine: str = None, python: tuple = None) -> Plan:
    """Whether FastDeploy's wheels fit this machine, and which."""
    system = system or platform.system()
    machine = (machine or platform.machine()).lower()
    python = tuple(python or sys.version_info[:2])
    if system != "Linux" or machine not in ("x86_64", "amd64"):
        return Plan(False, f"FastDeploy's GPU wheels are for Linux x86_64; this is {system} {machine}; {USE_BUILT_IN}")
    if python not in PYTHONS:
        return Plan(False, f"FastDeploy's wheels are for Python 3.10 to 3.12; this is {python[0]}.{python[1]}")
    if not gpus:
        return Plan(False, f"no NVIDIA GPU found (nvidia-smi is absent or lists none, or its driver is older than "
                    f"FastDeploy's 535); FastDeploy needs one; {USE_BUILT_IN}")
    described = ", ".join(f"GPU {g.index} {g.name} ({g.sm})" for g in gpus)
    unsupported = [g for g in gpus if g.capability not in WHEEL_GROUPS]
    if unsupported:
        g = unsupported[0]
        return Plan(False, f"GPU {g.index} is {g.name} ({g.sm}): FastDeploy publishes wheels only for SM80/90 "
                    f"(A100, H100, ...) and SM86/89 (A10, L20, 4090, ...), none for V100 (SM70) or T4 (SM75); "
                    f"{USE_BUILT_IN}", gpus, cuda)
    groups = sorted({WHEEL_GROUPS[g.capability] for g in gpus})
    if len(groups) > 1:
        return Plan(False, f"the GPUs need different FastDeploy wheels ({described}); make one kind visible, e.g. "
                    "CUDA_VISIBLE_DEVICES=0, and run again", gpus, cuda)
    if not cuda:
        return Plan(False, f"{described}, but no CUDA version from nvidia-smi (a driver older than 535?); FastDeploy "
                    f"needs CUDA 12.3+; {USE_BUILT_IN}", gpus, cuda)
    if _version(cuda) < MIN_CUDA:
        return Plan(False, f"{described} with CUDA {cuda}: FastDeploy needs CUDA 12.3 or newer (driver 535+); "
                    f"update the driver, or {USE_BUILT_IN}", gpus, cuda)
    tag = "cu129" if _version(cuda) >= (12, 9) else "cu126"
    return Plan(True, f"{described} with CUDA {cuda}: fastdeploy-gpu-{groups[0]} wheels, paddlepaddle-gpu from {tag}",
                gpus, cuda, groups[0], tag)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python serving/deploy/fastdeploy_env.py",
                                     description="Can FastDeploy run here, and from which wheels?")
    parser.add_argument("--shell", action="store_true", help="KEY=value lines for build_env.sh")
    args = parser.parse_args(argv)
    gpus, cuda = detect()
    verdict = plan(gpus, cuda)
    if args.shell:
        if not verdict.ok:
            print(verdict.reason, file=sys.stderr)
            return 3
        print(f"FD_GROUP={verdict.group}\nFD_CUDA_TAG={verdict.cuda_tag}\nFD_PADDLE_INDEX={verdict.paddle_index}\n"
              f"FD_INDEX={verdict.fastdeploy_index}\nFD_FOUND='{verdict.reason}'")
        return 0
    print(("FastDeploy can run here: " if verdict.ok else "FastDeploy cannot run here: ") + verdict.reason)
    if verdict.ok:
        for cmd in verdict.commands():
            print("  " + " ".join(cmd))
    return 0 if verdict.ok else 3


if __name__ == "__main__":
    sys.exit(main())
