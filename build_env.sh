#!/usr/bin/env bash
# build_env.sh - the one environment build script of this project.
#
# Baidu AI Studio runs it before deployment inside its own Python environment;
# locally run it inside a venv (or the current python). It is idempotent: a
# second run only checks and finishes in a few seconds.
#
#   bash build_env.sh            # PaddlePaddle + requirements.txt
#   bash build_env.sh --dev      # also requirements-dev.txt (tests, notebooks)
#   bash build_env.sh --dry-run  # print the install commands, run none of them
#   bash build_env.sh --engine fastdeploy
#                                # FastDeploy's GPU server too (--backend fastdeploy):
#                                # paddlepaddle-gpu and fastdeploy-gpu from Paddle's
#                                # indexes, for this GPU (SM80/90 or SM86/89, CUDA 12.3+)
#   bash build_env.sh --help
#
# Environment:
#   PYTHON=...            interpreter to use (default: python, else python3)
#   BUILD_ENV_DEV=1       same as --dev
#   BUILD_ENV_DRY_RUN=1   same as --dry-run
#   BUILD_ENV_CUDA_TAG=cu126
#                         force Paddle's CUDA wheel index (cu118, cu126, cu129)
#                         instead of detecting it
#   BUILD_ENV_ENGINE=fastdeploy   same as --engine fastdeploy
#   BUILD_ENV_FD_PADDLE_VERSION=3.2.0
#                         the paddlepaddle-gpu installed with FastDeploy
#
# Steps: 1 python and pip, 2 detect PaddlePaddle and GPU, 3 install
# PaddlePaddle if needed, 4 requirements.txt [5 requirements-dev.txt],
# last: verify imports (and that torch is not pulled in).
set -euo pipefail

PADDLE_VERSION="3.3.1"    # the PaddlePaddle release we install
PADDLE_MIN_VERSION="3.3"  # an installed GPU build at least this new is kept
PADDLE_INDEX_BASE="https://www.paddlepaddle.org.cn/packages/stable"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REQ_FILE="$SCRIPT_DIR/requirements.txt"
REQ_DEV_FILE="$SCRIPT_DIR/requirements-dev.txt"

DEV="${BUILD_ENV_DEV:-0}"
DRY_RUN="${BUILD_ENV_DRY_RUN:-0}"
ENGINE="${BUILD_ENV_ENGINE:-paddle}"

STEP_NO=0
STEP_TOTAL=0
STEP_NAME="startup"
SUMMARY=()

log() { echo "[build_env] $*"; }
warn() { echo "[build_env] WARNING: $*" >&2; }
die() { echo "[build_env] ERROR: $*" >&2; exit 1; }

on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "[build_env] FAILED at step: $STEP_NAME (exit code $rc)" >&2
    fi
    exit "$rc"
}
trap on_exit EXIT

step() {
    STEP_NO=$((STEP_NO + 1))
    STEP_NAME="$*"
    log "step $STEP_NO/$STEP_TOTAL: $*"
}

note() { SUMMARY+=("$*"); }

# Print a command exactly as it will run, then run it (or not, in a dry run).
run() {
    log "  \$ $*"
    if [ "$DRY_RUN" = "1" ]; then
        log "  (dry run: not executed)"
        return 0
    fi
    "$@"
}

usage() {
    cat <<'EOF'
Usage: bash build_env.sh [--dev] [--dry-run] [--engine paddle|fastdeploy] [--help]

Builds the Python environment for the Qwen2.5-VL PaddlePaddle serving kit:
  - PaddlePaddle 3.3.1: keeps an installed GPU build >= 3.3; on a GPU machine
    installs paddlepaddle-gpu from Paddle's index for the detected CUDA version;
    without a GPU installs the CPU build paddlepaddle (skipped when present).
  - requirements.txt (pip is skipped when every pin is already satisfied).
  - verifies the imports and that importing paddleformers does not import torch.

Options:
  --dev        also install requirements-dev.txt (or BUILD_ENV_DEV=1)
  --engine fastdeploy
               for --backend fastdeploy: paddlepaddle-gpu and fastdeploy-gpu from
               PaddlePaddle's indexes (FastDeploy is not on PyPI), matching this
               GPU (SM80/90: A100, H100...; SM86/89: A10, L20, 4090...) and CUDA
               12.3+; on other machines (V100, T4, no GPU, older CUDA) it stops and
               says to use the built-in engine (the default, --engine paddle)
  --dry-run    print the pip commands instead of running them (or BUILD_ENV_DRY_RUN=1)
  -h, --help   show this help

Environment: PYTHON (interpreter; default python, else python3),
BUILD_ENV_CUDA_TAG (cu118 | cu126 | cu129: override the detected CUDA index).
EOF
}

while [ "$#" -gt 0 ]; do
    case "$1" in
        --dev) DEV=1 ;;
        --dry-run) DRY_RUN=1 ;;
        --engine)
            [ "$#" -ge 2 ] || { echo "[build_env] --engine needs a value: paddle or fastdeploy" >&2; exit 2; }
            ENGINE="$2"; shift ;;
        --engine=*) ENGINE="${1#--engine=}" ;;
        -h | --help) usage; exit 0 ;;
        *) echo "[build_env] unknown option: $1" >&2; usage >&2; STEP_NAME="parse arguments"; exit 2 ;;
    esac
    shift
done

case "$ENGINE" in
    paddle | fastdeploy) ;;
    *) echo "[build_env] unknown --engine $ENGINE: use paddle (the built-in engine) or fastdeploy" >&2; exit 2 ;;
esac

STEP_TOTAL=5
if [ "$DEV" = "1" ]; then STEP_TOTAL=6; fi
DID="installed"
if [ "$DRY_RUN" = "1" ]; then
    DID="would install (dry run)"
    log "dry run: pip commands are printed, not executed"
fi

# ---------------------------------------------------------------------------
step "python and pip"
if [ -z "${PYTHON:-}" ]; then
    if command -v python >/dev/null 2>&1; then
        PYTHON=python
    elif command -v python3 >/dev/null 2>&1; then
        PYTHON=python3
    else
        die "neither 'python' nor 'python3' is on PATH (set PYTHON=/path/to/python)"
    fi
fi
PY_INFO="$("$PYTHON" -c 'import importlib.util, sys; print("%d.%d.%d" % sys.version_info[:3], bool(importlib.util.find_spec("pip")), sys.executable)')" \
    || die "cannot run $PYTHON"
read -r PY_VERSION PY_HAS_PIP PY_PATH <<<"$PY_INFO"
[ "$PY_HAS_PIP" = "True" ] || die "$PYTHON ($PY_PATH) has no pip; install it (e.g. $PYTHON -m ensurepip)"
log "  python $PY_VERSION at $PY_PATH"
# Call the interpreter itself from here on (same python; skips pyenv/conda shims).
if [ -n "$PY_PATH" ] && [ -x "$PY_PATH" ]; then PYTHON="$PY_PATH"; fi
note "python: $PY_VERSION ($PY_PATH)"

# version_ge A B: true when version A >= version B (numeric parts only).
version_ge() {
    "$PYTHON" - "$1" "$2" <<'EOF'
import re, sys
def key(v):
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])
sys.exit(0 if key(sys.argv[1]) >= key(sys.argv[2]) else 1)
EOF
}

# ---------------------------------------------------------------------------
step "detect PaddlePaddle and GPU"
PADDLE_INFO="$("$PYTHON" -c 'import paddle; print(paddle.__version__, paddle.is_compiled_with_cuda())' 2>/dev/null | tail -n 1)" \
    || PADDLE_INFO=""
PADDLE_CUR=""
PADDLE_CUDA="False"
if [ -n "$PADDLE_INFO" ]; then
    read -r PADDLE_CUR PADDLE_CUDA <<<"$PADDLE_INFO"
    log "  installed PaddlePaddle: $PADDLE_CUR (compiled with CUDA: $PADDLE_CUDA)"
else
    log "  PaddlePaddle: not installed (or not importable)"
fi

HAS_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    HAS_GPU=1
    log "  GPU: yes (nvidia-smi works)"
else
    log "  GPU: no (nvidia-smi absent or failing)"
fi

# CUDA version: the driver's "CUDA Version: X.Y" from nvidia-smi (what the
# wheel must run on), else the toolkit's "release X.Y" from nvcc --version.
detect_cuda_version() {
    local v=""
    if command -v nvidia-smi >/dev/null 2>&1; then
        v="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)" || v=""
    fi
    if [ -z "$v" ] && command -v nvcc >/dev/null 2>&1; then
        v="$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)" || v=""
    fi
    echo "$v"
}

# CUDA version -> PaddlePaddle wheel index (paddlepaddle-gpu 3.3.x):
#   11.8 <= CUDA < 12.0  -> cu118
#   12.0 <= CUDA < 12.9  -> cu126  (CUDA minor-version compatibility)
#   CUDA >= 12.9         -> cu129  (also 13.x drivers, which run 12.9 wheels)
#   CUDA < 11.8          -> unsupported
cuda_tag_for() {
    local v="$1"
    if version_ge "$v" "12.9"; then
        echo cu129
    elif version_ge "$v" "12.0"; then
        echo cu126
    elif version_ge "$v" "11.8"; then
        echo cu118
    else
        return 1
    fi
}

# ---------------------------------------------------------------------------
if [ "$ENGINE" = "fastdeploy" ]; then
step "PaddlePaddle and FastDeploy for this GPU"
# serving/deploy/fastdeploy_env.py (standard library only) decides: GPU compute capability, CUDA >= 12.3
FD_PLAN="$("$PYTHON" "$SCRIPT_DIR/serving/deploy/fastdeploy_env.py" --shell)" \
    || die "FastDeploy cannot be installed here (see the reason above)"
fd_value() { echo "$FD_PLAN" | sed -n "s/^$1=//p" | tr -d "'"; }
FD_PADDLE_VERSION="${BUILD_ENV_FD_PADDLE_VERSION:-3.2.0}"
log "  $(fd_value FD_FOUND)"
if [ "$PADDLE_CUDA" = "True" ] && [ "$PADDLE_CUR" = "$FD_PADDLE_VERSION" ]; then
    log "  keeping the installed paddlepaddle-gpu $PADDLE_CUR"
else
    if [ -n "$PADDLE_CUR" ] && [ "$PADDLE_CUDA" != "True" ]; then
        run "$PYTHON" -m pip uninstall -y paddlepaddle  # the CPU build owns the same 'paddle' module
    fi
    run "$PYTHON" -m pip install "paddlepaddle-gpu==$FD_PADDLE_VERSION" -i "$(fd_value FD_PADDLE_INDEX)"
fi
if "$PYTHON" -c 'from importlib.metadata import version; version("fastdeploy-gpu")' >/dev/null 2>&1; then
    log "  fastdeploy-gpu already installed"
    note "fastdeploy: already installed"
else
    run "$PYTHON" -m pip install fastdeploy-gpu -i "$(fd_value FD_INDEX)" --extra-index-url https://pypi.org/simple
    note "fastdeploy: $DID fastdeploy-gpu ($(fd_value FD_GROUP) wheels) with paddlepaddle-gpu==$FD_PADDLE_VERSION"
fi
else
step "PaddlePaddle $PADDLE_VERSION"
if [ "$PADDLE_CUDA" = "True" ] && [ -n "$PADDLE_CUR" ] && version_ge "$PADDLE_CUR" "$PADDLE_MIN_VERSION"; then
    log "  keeping the installed GPU build paddlepaddle-gpu $PADDLE_CUR (>= $PADDLE_MIN_VERSION)"
    note "paddle: kept GPU build $PADDLE_CUR"
elif [ "$HAS_GPU" = "1" ]; then
    CUDA_VER="$(detect_cuda_version)"
    if [ -n "${BUILD_ENV_CUDA_TAG:-}" ]; then
        CUDA_TAG="$BUILD_ENV_CUDA_TAG"
        log "  CUDA index forced by BUILD_ENV_CUDA_TAG: $CUDA_TAG"
    else
        [ -n "$CUDA_VER" ] || die "GPU found but no CUDA version (neither nvidia-smi 'CUDA Version' nor nvcc); set BUILD_ENV_CUDA_TAG=cu118|cu126|cu129"
        CUDA_TAG="$(cuda_tag_for "$CUDA_VER")" \
            || die "CUDA $CUDA_VER is older than 11.8, which PaddlePaddle $PADDLE_VERSION does not support"
        log "  CUDA $CUDA_VER -> Paddle index $CUDA_TAG"
    fi
    if [ -n "$PADDLE_CUR" ]; then
        log "  installed paddle $PADDLE_CUR (CUDA: $PADDLE_CUDA) is not a GPU build >= $PADDLE_MIN_VERSION: replacing it"
        if [ "$PADDLE_CUDA" != "True" ]; then
            # The CPU package 'paddlepaddle' and 'paddlepaddle-gpu' both own the
            # 'paddle' module; remove the CPU one so they do not overwrite each other.
            run "$PYTHON" -m pip uninstall -y paddlepaddle
        fi
    fi
    run "$PYTHON" -m pip install "paddlepaddle-gpu==$PADDLE_VERSION" -i "$PADDLE_INDEX_BASE/$CUDA_TAG/"
    note "paddle: $DID paddlepaddle-gpu==$PADDLE_VERSION from $CUDA_TAG (was: ${PADDLE_CUR:-none})"
else
    if [ "$PADDLE_CUR" = "$PADDLE_VERSION" ]; then
        log "  paddlepaddle $PADDLE_VERSION (CPU) already installed"
        note "paddle: CPU $PADDLE_VERSION already installed"
    else
        if [ "$PADDLE_CUDA" = "True" ]; then
            run "$PYTHON" -m pip uninstall -y paddlepaddle-gpu
        fi
        run "$PYTHON" -m pip install "paddlepaddle==$PADDLE_VERSION"
        note "paddle: $DID CPU paddlepaddle==$PADDLE_VERSION (was: ${PADDLE_CUR:-none})"
    fi
fi
fi  # engine

# True when every 'name==version' pin in the file (and the files it includes
# with -r) is already installed at exactly that version.
requirements_satisfied() {
    "$PYTHON" - "$1" <<'EOF'
import os, re, sys
from importlib.metadata import PackageNotFoundError, version

def pins(path, seen=()):
    path = os.path.abspath(path)
    if path in seen:
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            m = re.match(r"^(-r|--requirement)\s*=?\s*(\S+)$", line)
            if m:
                yield from pins(os.path.join(os.path.dirname(path), m.group(2)), seen + (path,))
                continue
            yield line

missing = []
for line in pins(sys.argv[1]):
    m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;]+)$", line)
    if not m:
        missing.append(line + " (not a plain name==version pin)")
        continue
    name, want = m.group(1), m.group(3)
    try:
        have = version(name)
    except PackageNotFoundError:
        missing.append(f"{name}=={want} (not installed)")
        continue
    if have != want:
        missing.append(f"{name}=={want} (installed {have})")
for item in missing:
    print("[build_env]     needs " + item)
sys.exit(1 if missing else 0)
EOF
}

install_requirements() {
    local file="$1" label
    label="$(basename "$file")"
    [ -f "$file" ] || die "$file not found"
    if requirements_satisfied "$file"; then
        log "  $label: already satisfied"
        note "$label: already satisfied"
    else
        run "$PYTHON" -m pip install -r "$file"
        note "$label: $DID"
    fi
}

# ---------------------------------------------------------------------------
step "requirements.txt"
install_requirements "$REQ_FILE"

if [ "$DEV" = "1" ]; then
    step "requirements-dev.txt"
    install_requirements "$REQ_DEV_FILE"
fi

# ---------------------------------------------------------------------------
step "verify imports (and no torch)"
VERIFY_PY='
import importlib.util, sys
import paddle, paddleformers, flask, PIL, pydantic, requests
import paddleformers.transformers
from importlib.metadata import version
print("[build_env]   paddle %s (CUDA: %s), paddleformers %s, flask %s, Pillow %s, pydantic %s, requests %s" % (
    paddle.__version__, paddle.is_compiled_with_cuda(), version("paddleformers"),
    version("flask"), PIL.__version__, pydantic.VERSION, requests.__version__))
if "torch" in sys.modules:
    print("[build_env] ERROR: importing paddleformers.transformers imported torch;"
          " AI Studio refuses PyTorch", file=sys.stderr)
    sys.exit(1)
print("[build_env]   torch not imported by paddleformers.transformers: ok")
if importlib.util.find_spec("torch") is not None:
    print("[build_env] WARNING: torch is installed in this environment; AI Studio refuses"
          " PyTorch, uninstall it (pip uninstall torch)", file=sys.stderr)
'
if [ "$DRY_RUN" = "1" ]; then
    log "  \$ $PYTHON -c 'import paddle, paddleformers, flask, PIL, pydantic, requests; ...'"
    log "  (dry run: not executed)"
    note "verify: skipped (dry run)"
else
    # Paddle and transformers print noise on import (ccache, "PyTorch was not
    # found"); keep our lines and any error, drop the known chatter.
    VERIFY_OUT="$("$PYTHON" -c "$VERIFY_PY" 2>&1)" || {
        echo "$VERIFY_OUT" >&2
        die "import check failed"
    }
    echo "$VERIFY_OUT" | grep -E '^\[build_env\]' || true
    note "verify: imports ok, torch not imported"
fi

# ---------------------------------------------------------------------------
STEP_NAME="summary"
log "summary:"
for line in "${SUMMARY[@]}"; do
    log "  - $line"
done
if [ "$DRY_RUN" = "1" ]; then log "  (dry run: nothing was installed)"; fi
log "done"
