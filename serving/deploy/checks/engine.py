"""Preflight check of the engine the deployment will use: with --backend fastdeploy, whether FastDeploy's
wheels fit this machine's GPU and CUDA (serving.deploy.fastdeploy_env, the same decision build_env.sh takes) and
whether fastdeploy-gpu is installed."""

from __future__ import annotations

from serving.deploy.fastdeploy_env import detect, plan
from serving.deploy.checks.context import FAIL, PASS, Check, Context, tail

BUILD = ("bash build_env.sh --engine fastdeploy (for the deployment too: AI Studio runs build_env.sh without "
         "arguments, so set ENGINE=\"${BUILD_ENV_ENGINE:-fastdeploy}\" in it)")


def check_fastdeploy(ctx: Context) -> Check:
    name = "engine"
    backend = ctx.backend_name
    if backend != "fastdeploy":
        what = ("the built-in Paddle engine" if backend == "paddle"
                else "the UPSTREAM servers generate (nothing to install for them here)")
        return Check(name, PASS, f"BACKEND={backend}: {what}; FastDeploy is not needed")
    gpus, cuda = detect()
    verdict = plan(gpus, cuda)
    if not verdict.ok:
        return Check(name, FAIL, f"BACKEND=fastdeploy, but {verdict.reason}",
                     "deploy with the built-in engine (start command python api.py, i.e. --backend paddle), or on an "
                     "A100/H100 (SM80/90) or A10/L20/4090 (SM86/89) GPU with CUDA 12.3+")
    done = ctx.run_python(["-c", "from importlib.metadata import version; print(version('fastdeploy-gpu'))"], timeout=60)
    if done.returncode != 0:
        return Check(name, FAIL, f"BACKEND=fastdeploy: the GPU fits ({verdict.reason}), but fastdeploy-gpu is not "
                     f"installed in {ctx.python}", BUILD)
    return Check(name, PASS, f"BACKEND=fastdeploy: {verdict.reason}; fastdeploy-gpu {tail(done.stdout, 1)} installed")
