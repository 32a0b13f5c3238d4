"""Check the folder the way AI Studio will deploy it, in ~20 s, before a deployment that takes an hour.

    python -m serving.deploy.preflight                 # the checks, as a table; exit 1 on any FAIL
    python -m serving.deploy.preflight --rehearse      # then a local deployment rehearsal (minutes)
    python -m serving.deploy.preflight --model /home/aistudio/Qwen2.5-VL-3B-Instruct --load

AI Studio packs this folder, runs `build_env.sh` and starts `python api.py`; its page only
says "deploying" while that fails. Each check catches one way it fails, and says how to fix it:
  preflight_files.py    non-ASCII file names, leftovers that would ship (weights, caches, images),
                        a token in a file, large files, the folder's size
  preflight_runtime.py  a `build_env.sh` that does not parse or was never run, PaddlePaddle older
                        than 3.3, a model that cannot be found
  preflight_api.py      an `api.py` out of sync with its notebook or not on 0.0.0.0:8080
  preflight_imports.py  torch in the serving path, a dependency missing from requirements.txt
`--rehearse` then does the deployment locally (rehearsal.py).

Exit codes: 0 no check failed (warnings allowed), 1 a check or the rehearsal failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from pathlib import Path

from serving.deploy.checks.api import api_binding_problems, check_api_sync, check_port
from serving.deploy.checks.engine import check_fastdeploy
from serving.deploy.checks.context import ENTRY, FAIL, PASS, SKIP_DIRS, WARN, Check, Context, Entry, human
from serving.deploy.checks.files import (CACHE_DIRS, FOLDER_WARN_BYTES, IMAGE_SUFFIXES, LARGE_FILE_BYTES, SECRET_FILE_NAMES,
                              SECRET_PATTERNS, SECRET_SCAN_MAX_BYTES, WEIGHT_SUFFIXES, check_ascii_names,
                              check_folder_size, check_large_files, check_leftovers, check_secrets, find_secrets)
from serving.deploy.checks.imports import ImportSite, check_dependencies, check_no_torch, serving_path
from serving.deploy.checks.runtime import PADDLE_MIN, check_build_env, check_build_env_run, check_model, check_paddle
from serving.deploy.rehearsal import Rehearsal, Step, format_rehearsal, rehearse

__all__ = [
    "CACHE_DIRS", "CHECKS", "ENTRY", "FAIL", "FOLDER_WARN_BYTES", "IMAGE_SUFFIXES", "LARGE_FILE_BYTES", "PADDLE_MIN",
    "PASS", "ROOT", "SECRET_FILE_NAMES", "SECRET_PATTERNS", "SECRET_SCAN_MAX_BYTES", "SKIP_DIRS", "WARN",
    "WEIGHT_SUFFIXES", "Check", "Context", "Entry", "ImportSite", "Rehearsal", "Step", "api_binding_problems",
    "check_api_sync", "check_ascii_names", "check_build_env", "check_build_env_run", "check_dependencies",
    "check_folder_size", "check_large_files", "check_leftovers", "check_model", "check_no_torch", "check_paddle",
    "check_port", "check_secrets", "find_secrets", "format_rehearsal", "format_table", "human", "main", "rehearse",
    "run_checks", "serving_path",
]

ROOT = Path(__file__).resolve().parents[2]  # the repository: serving/<subpackage>/this file

CHECKS = (check_ascii_names, check_build_env, check_build_env_run, check_api_sync, check_port, check_no_torch,
          check_dependencies, check_leftovers, check_secrets, check_large_files, check_paddle, check_model,
          check_folder_size, check_fastdeploy)


def run_checks(ctx: Context, checks=CHECKS) -> list:
    results = []
    for check in checks:
        try:
            results.append(check(ctx))
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            results.append(Check(check.__name__.removeprefix("check_"), FAIL,
                                 f"the check itself failed: {type(exc).__name__}: {exc}",
                                 "report this as a bug of serving/deploy/preflight.py"))
    return results


def format_table(results: list, width: int = 110) -> str:
    name_w = max([len(r.name) for r in results] + [5])
    indent = " " * (name_w + 10)
    text_w = max(40, width - len(indent))
    lines = [f"{'check':<{name_w}}  status  detail", f"{'-' * name_w}  ------  {'-' * 40}"]
    for r in results:
        wrapped = textwrap.wrap(r.detail, text_w) or [""]
        lines.append(f"{r.name:<{name_w}}  {r.status:<6}  {wrapped[0]}")
        lines += [indent + w for w in wrapped[1:]]
        if r.status != PASS and r.fix:
            fix = textwrap.wrap("fix: " + r.fix, text_w)
            lines += [indent + w for w in fix]
    counts = {s: sum(r.status == s for r in results) for s in (PASS, WARN, FAIL)}
    lines.append(f"preflight: {counts[PASS]} PASS, {counts[WARN]} WARN, {counts[FAIL]} FAIL")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.deploy.preflight",
        description="Check this folder the way AI Studio will deploy it (and optionally rehearse the deployment).")
    parser.add_argument("--root", type=Path, default=ROOT, help="the folder to check (default: %(default)s)")
    parser.add_argument("--model", help="the model the service will load (default: env MODEL, else Settings' default); "
                        "for --rehearse: default demo")
    parser.add_argument("--hub", help="hub for a hub id (default: env HUB, else aistudio)")
    parser.add_argument("--backend", choices=("paddle", "openai", "fastdeploy"),
                        help="the engine the deployment uses (default: env BACKEND, else paddle); fastdeploy: check "
                             "that FastDeploy's wheels fit this GPU and are installed")
    parser.add_argument("--load", action="store_true", help="also load a local model folder for real")
    parser.add_argument("--allow", action="append", default=[], metavar="PATTERN",
                        help="glob of paths meant to ship (exempt from the leftover and large-file checks); repeatable")
    parser.add_argument("--rehearse", action="store_true",
                        help="then rehearse the deployment: copy, fresh venv, build_env.sh, api.py, requests")
    parser.add_argument("--reuse-site-packages", action="store_true",
                        help="rehearsal venv sees this Python's packages (fast; a real deployment starts empty)")
    parser.add_argument("--keep", action="store_true", help="keep the rehearsal's temporary folder and logs")
    parser.add_argument("--skip-checks", action="store_true", help="only the rehearsal")
    parser.add_argument("--start-timeout", type=float, default=600, help="seconds for /health to answer 200")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if not root.is_dir():
        parser.error(f"--root {root} is not a folder")
    failed = False
    if not args.skip_checks:
        ctx = Context(root, model=args.model, hub=args.hub, load=args.load, allow=tuple(args.allow),
                      backend=args.backend)
        print(f"AI Studio preflight of {root}", flush=True)
        results = run_checks(ctx)
        print(format_table(results, width=shutil.get_terminal_size((120, 20)).columns))
        failed = any(r.status == FAIL for r in results)
    if args.rehearse:
        print(flush=True)
        result = rehearse(root, model=args.model or "demo", hub=args.hub,
                          reuse_site_packages=args.reuse_site_packages, keep=args.keep,
                          start_timeout=args.start_timeout)
        print(format_rehearsal(result))
        failed = failed or not result.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
