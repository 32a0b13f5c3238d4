"""Preflight checks of what the deployment builds and loads: build_env.sh, PaddlePaddle, the model."""

from __future__ import annotations

import os
import re
import subprocess

from serving.deploy.environment import PADDLE_MIN, version_tuple
from serving.deploy.checks.context import FAIL, PASS, WARN, Check, Context, listing, tail


def check_build_env(ctx: Context) -> Check:
    name = "build_env.sh parses"
    path = ctx.root / "build_env.sh"
    if not path.is_file():
        return Check(name, FAIL, "build_env.sh is missing",
                     "put build_env.sh at the top of the folder: AI Studio runs it to build the service's environment")
    data = path.read_bytes()
    if b"\r\n" in data:
        return Check(name, FAIL, "build_env.sh has Windows (CRLF) line endings: bash stops at the first '\\r'",
                     "convert it: sed -i 's/\\r$//' build_env.sh (or save it with LF line endings)")
    try:
        done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return Check(name, WARN, "bash is not installed here; cannot check the syntax", "install bash")
    if done.returncode != 0:
        return Check(name, FAIL, "bash -n build_env.sh: " + tail(done.stderr, 3).replace(str(path), "build_env.sh"),
                     "fix the syntax error (bash -n build_env.sh shows it), then run it once: bash build_env.sh")
    return Check(name, PASS, f"bash -n: no syntax errors ({len(data.splitlines())} lines)")


def check_build_env_run(ctx: Context) -> Check:
    """`build_env.sh --dry-run` here: does it still have something to install?"""
    name = "build_env.sh was run"
    if not (ctx.root / "build_env.sh").is_file():
        return Check(name, FAIL, "build_env.sh is missing", "see 'build_env.sh parses'")
    try:
        done = ctx.run(["bash", "build_env.sh", "--dry-run"], timeout=180, env=dict(os.environ, PYTHON=ctx.python))
    except subprocess.TimeoutExpired:
        return Check(name, WARN, "build_env.sh --dry-run did not finish within 180 s", "run bash build_env.sh once")
    out = done.stdout + done.stderr
    if done.returncode != 0:
        return Check(name, FAIL, "build_env.sh --dry-run failed: " + tail(out, 4),
                     "run bash build_env.sh in a terminal and fix what it reports")
    lines = out.splitlines()
    pending = [lines[i - 1].split("$", 1)[-1].strip() for i, line in enumerate(lines)
               if "(dry run: not executed)" in line and i > 0 and "$" in lines[i - 1] and "-c 'import" not in lines[i - 1]]
    if pending:
        return Check(name, WARN, f"in this Python ({ctx.python}) build_env.sh would still run: {listing(pending, 3)}",
                     "run it once in a terminal and read its summary: bash build_env.sh (the deployment runs the same "
                     "script; one that was never run is the tutorial's most common silent failure)")
    return Check(name, PASS, "everything build_env.sh installs is already here (its dry run has nothing to do)")


def check_paddle(ctx: Context) -> Check:
    name = "PaddlePaddle 3.3 or newer"
    done = ctx.run_python(["-c", "from importlib.metadata import version, PackageNotFoundError\n"
                                 "for d in ('paddlepaddle-gpu', 'paddlepaddle'):\n"
                                 "    try:\n        print(d, version(d)); break\n"
                                 "    except PackageNotFoundError:\n        pass\n"], timeout=60)
    installed = done.stdout.split() if done.returncode == 0 else []
    build = ctx.root / "build_env.sh"
    pinned = None
    if build.is_file():
        m = re.search(r'^\s*PADDLE_VERSION="?([0-9][0-9.]*)"?', build.read_text(encoding="utf-8", errors="replace"),
                      re.MULTILINE)
        pinned = m.group(1) if m else None
    installs = pinned is not None and version_tuple(pinned) >= PADDLE_MIN
    if len(installed) == 2 and version_tuple(installed[1]) >= PADDLE_MIN:
        return Check(name, PASS, f"{installed[0]} {installed[1]} installed" +
                     (f"; build_env.sh pins {pinned}" if pinned else ""))
    have = f"{installed[0]} {installed[1]}" if len(installed) == 2 else "no PaddlePaddle"
    if installs:
        return Check(name, WARN, f"{have} in this Python, but build_env.sh installs {pinned} (the deployment runs it)",
                     "run bash build_env.sh once here too, then restart the notebook kernels")
    return Check(name, FAIL, f"{have} here and build_env.sh does not install 3.3 or newer"
                 + (f" (PADDLE_VERSION={pinned})" if pinned else " (no PADDLE_VERSION in it)"),
                 "set PADDLE_VERSION=\"3.3.1\" in build_env.sh: PaddleFormers needs PaddlePaddle 3.3, and AI Studio's "
                 "images ship older ones")


def check_model(ctx: Context) -> Check:
    from serving.model.demo import is_demo_name
    from serving.model.download import is_hub_id, verify_checkpoint

    model = ctx.model_name
    name = "model"
    if is_demo_name(model):
        return Check(name, PASS, f"{model!r}: the offline demo model (random weights: its answers are meaningless "
                     "text; fine for a rehearsal)")
    if ctx.model_dir is not None:
        result = verify_checkpoint(ctx.model_dir)
        if not result.ok:
            return Check(name, FAIL, f"local folder {model}: " + "; ".join(result.problems[:4]),
                         "download it again (python -m serving.model.download MODEL --to DIR resumes and verifies)")
        detail = f"local folder {model}: {result.shards} shard(s), {result.parameters / 1e9:.2f}B parameters"
        inside = ctx.model_dir.is_relative_to(ctx.root.resolve())
        if ctx.load:
            code = ("import sys, time\nfrom serving.config import Settings\nfrom serving.model.loader import load_model\n"
                    f"m = load_model(Settings(model={str(ctx.model_dir)!r}))\n"
                    "print('LOADED', m.device, m.dtype, round(m.load_seconds, 1))\n")
            done = ctx.run_python(["-c", code], timeout=1800)
            if "LOADED" not in done.stdout:
                return Check(name, FAIL, detail + "; loading it failed: " + tail(done.stderr, 3),
                             "check the folder holds a Qwen2.5-VL checkpoint; python -m serving.model.download --verify DIR")
            detail += "; loads (" + done.stdout.split("LOADED", 1)[1].strip() + " s)"
        if not inside:
            return Check(name, WARN, detail + "; it is outside the folder AI Studio packs",
                         "the deployed service reads only what is in the deployed folder: move the model folder "
                         "inside it (and pass --model with the relative path), or let the service download a hub id")
        return Check(name, PASS, detail + " (inside the folder: it ships with the deployment)")
    if is_hub_id(model):
        from serving.model.download import HUBS

        if ctx.hub_name not in HUBS:
            return Check(name, FAIL, f"hub {ctx.hub_name!r} is unknown", f"use one of {', '.join(HUBS)}")
        return Check(name, PASS, f"hub id {model}: downloaded from the {ctx.hub_name} hub when the service starts "
                     "(each start waits for the download; /health answers 503 meanwhile)")
    return Check(name, FAIL, f"{model!r} is neither a folder here, a hub id (org/name) nor 'demo'",
                 "pass an existing checkpoint folder, a hub id such as Qwen/Qwen2.5-VL-3B-Instruct, or demo "
                 "(--model, or MODEL in the environment)")

