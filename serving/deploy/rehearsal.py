"""The deployment rehearsal (python -m serving.deploy.preflight --rehearse), locally, in minutes.

It copies the folder (without .git) to a temporary place, makes a fresh virtual environment, runs
`build_env.sh` in it, starts `api.py` (the demo model unless --model), waits for /health, sends
test_connection.py's request in both payload formats, and stops everything and removes what it
made (unless --keep). `--reuse-site-packages` lets the venv see this Python's packages, so
build_env.sh finds everything installed and finishes in seconds (the tests use it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from serving.deploy.checks.context import ENTRY, SKIP_DIRS, tail


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    detail: str = ""
    log_tail: str = ""


@dataclass
class Rehearsal:
    steps: list = field(default_factory=list)
    workdir: str = ""
    kept: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process started with start_new_session=True and everything it started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, even when the leader is gone
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _run_logged(cmd, cwd, env, log_path: Path, timeout: float, echo=None, echo_prefix: str = "") -> int:
    """Run cmd in its own process group, output to log_path (lines matching echo also to stdout)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

        def pump():
            for raw in proc.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode("utf-8", "replace").rstrip()
                if echo and echo(line):
                    print(echo_prefix + line, flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            reader.join(5)
            log.write(f"\n(timed out after {timeout:g} s)\n".encode())
            return 124
        finally:
            _kill_group(proc, grace=2)  # children it left behind
        reader.join(10)
        return rc


def _see_packages_of(python: str, vpython: Path) -> str:
    """When `python` runs in a virtual environment, let the new venv at `vpython` see its packages too.

    `venv --system-site-packages` links a new venv to the base interpreter's packages only, never to those of
    the venv `python` belongs to (where `bash build_env.sh --dev` installed everything, when a user works in
    one). A .pth file in the new venv adds them after its own. Returns the .pth path, or "" when not needed."""
    import json

    probe = ("import json, site, sys\n"
             "print(json.dumps(site.getsitepackages() if sys.prefix != sys.base_prefix else []))")
    outer = json.loads(subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True,
                                      timeout=60).stdout.strip().splitlines()[-1])
    if not outer:
        return ""
    purelib = subprocess.run([str(vpython), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    pth = Path(purelib) / "qwenvl-rehearsal-outer-venv.pth"
    pth.write_text("".join(f"{path}\n" for path in outer), encoding="utf-8")
    return str(pth)


def rehearse(root: Path, model: str = "demo", hub: str | None = None, reuse_site_packages: bool = False,
             keep: bool = False, build_timeout: float = 1800, start_timeout: float = 600,
             request_timeout: float = 300, python: str = sys.executable) -> Rehearsal:
    """The deployment, locally: copy, fresh venv, build_env.sh, api.py, /health, two requests, stop."""
    import requests

    from serving.web.server import free_port

    root = Path(root).resolve()
    work = Path(tempfile.mkdtemp(prefix="qwenvl-rehearsal-"))
    result = Rehearsal(workdir=str(work), kept=keep)
    app_dir, venv, logs = work / "app", work / "venv", work / "logs"
    logs.mkdir()
    server = None
    port = free_port()
    vpython = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHON", "VIRTUAL_ENV")}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHON=str(vpython), PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1")
    base_url = f"http://127.0.0.1:{port}"
    total_steps = 7

    def step(n: int, name: str, action) -> bool:
        print(f"[rehearse] {n}/{total_steps} {name} ...", flush=True)
        started = time.monotonic()
        log_path = logs / f"{n}.log"
        try:
            ok, detail = action(log_path)
        except Exception as exc:  # noqa: BLE001
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        seconds = time.monotonic() - started
        log_tail = ""
        if not ok and log_path.is_file():
            log_tail = tail(log_path.read_text(encoding="utf-8", errors="replace"), 30)
        result.steps.append(Step(name, ok, seconds, detail, log_tail))
        print(f"[rehearse] {n}/{total_steps} {name}: {'ok' if ok else 'FAILED'} ({seconds:.1f} s)"
              + (f" - {detail}" if detail else ""), flush=True)
        if not ok and log_tail:
            print(textwrap.indent(f"end of its log ({log_path.name}):\n{log_tail}", "    "), flush=True)
        return ok

    def copy(log_path):
        shutil.copytree(root, app_dir, symlinks=True, ignore=shutil.ignore_patterns(*SKIP_DIRS))
        files = sum(len(f) for _, _, f in os.walk(app_dir))
        return True, f"{files} files copied to {app_dir} (without .git)"

    def make_venv(log_path):
        cmd = [python, "-m", "venv"] + (["--system-site-packages"] if reuse_site_packages else []) + [str(venv)]
        rc = _run_logged(cmd, work, env, log_path, 300)
        kind = "sees this Python's packages (--reuse-site-packages)" if reuse_site_packages else "fresh, empty"
        if rc == 0 and reuse_site_packages:
            linked = _see_packages_of(python, vpython)
            if linked:
                kind += f"; this virtual environment's packages through {linked}"
        return rc == 0, f"{venv} ({kind})"

    def build_env(log_path):
        rc = _run_logged(["bash", "build_env.sh"], app_dir, env, log_path, build_timeout,
                         echo=lambda line: line.startswith("[build_env]") and ("step" in line or "ERROR" in line
                                                                                 or "FAILED" in line),
                         echo_prefix="    ")
        text = log_path.read_text(encoding="utf-8", errors="replace")
        used = re.search(r"python (\S+) at (\S+)", text)
        summary = [line.split("- ", 1)[1] for line in text.splitlines() if line.startswith("[build_env]   - ")]
        detail = f"bash build_env.sh (python {used.group(1)} at {used.group(2)})" if used else "bash build_env.sh"
        if rc != 0:
            return False, f"{detail} exited with {rc}"
        return True, "; ".join([detail] + [s for s in summary if s.startswith(("paddle", "requirements"))])

    def start(log_path):
        nonlocal server
        cmd = [str(vpython), ENTRY, "--model", model, "--host", "127.0.0.1", "--port", str(port)]
        if hub:
            cmd += ["--hub", hub]
        with open(log_path, "ab") as log:
            server = subprocess.Popen(cmd, cwd=app_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + start_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if server.poll() is not None:
                return False, f"api.py exited with {server.returncode} before /health answered 200"
            try:
                resp = requests.get(base_url + "/health", timeout=5)
                if resp.status_code == 200:
                    return True, f"python api.py --model {model} --port {port}: /health 200"
                last = f"/health {resp.status_code}"
            except requests.RequestException as exc:
                last = type(exc).__name__
            time.sleep(0.5)
        return False, f"/health did not answer 200 within {start_timeout:g} s (last: {last})"

    image = work / "test.png"

    def request(fmt: str, extra: list):
        def action(log_path):
            nonlocal image
            sample = app_dir / "examples" / "cat.jpg"  # README's sample picture, when the folder has it
            if sample.is_file():
                image = sample
            elif not image.exists():
                from PIL import Image, ImageDraw

                picture = Image.new("RGB", (112, 84), (135, 206, 235))
                ImageDraw.Draw(picture).ellipse([60, 10, 100, 50], fill=(255, 215, 0))
                picture.save(image)
            cmd = [str(vpython), "test_connection.py", "--api-url", base_url + "/v1/chat/completions",
                   "--image", str(image), "--format", fmt, "--max-tokens", "8", "--timeout", str(request_timeout),
                   *extra]
            rc = _run_logged(cmd, app_dir, env, log_path, request_timeout + 30)
            lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            stats = next((line for line in reversed(lines) if line.startswith("time:")), "")
            return rc == 0, f"test_connection.py --format {fmt} {' '.join(extra)}".rstrip() + (f": {stats}" if stats else "")
        return action

    def stop(log_path):
        if server is None:
            return True, "nothing to stop"
        _kill_group(server)
        try:
            requests.get(base_url + "/health", timeout=2)
            return False, f"something still answers on port {port}"
        except requests.RequestException:
            return True, f"api.py (pid {server.pid}) and its process group stopped; port {port} is free"

    try:
        ok = step(1, "copy the folder", copy)
        ok = ok and step(2, "create the virtual environment", make_venv)
        ok = ok and step(3, "run build_env.sh", build_env)
        ok = ok and step(4, "start api.py and wait for /health", start)
        ok = ok and step(5, "request in the tutorial's format", request("tutorial", []))
        ok = ok and step(6, "request in OpenAI's format, streamed", request("openai", ["--stream"]))
        if server is not None:
            step(7, "stop the service", stop)
    finally:
        if server is not None:
            _kill_group(server)
        if keep:
            print(f"[rehearse] kept {work} (logs in {logs})", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return result


def format_rehearsal(result: Rehearsal) -> str:
    lines = ["rehearsal:"]
    for s in result.steps:
        lines.append(f"  {'ok  ' if s.ok else 'FAIL'}  {s.seconds:7.1f} s  {s.name}" + (f": {s.detail}" if s.detail else ""))
    total = sum(s.seconds for s in result.steps)
    failed = next((s for s in result.steps if not s.ok), None)
    lines.append(f"rehearsal: {'passed' if result.ok else 'FAILED at ' + repr(failed.name) if failed else 'did not run'}"
                 f" in {total:.0f} s")
    return "\n".join(lines)
