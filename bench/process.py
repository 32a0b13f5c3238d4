"""Servers the benchmarks talk to: a subprocess on a free loopback port, and waiting for one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from serving.web.server import free_port

ROOT = Path(__file__).resolve().parent.parent


def wait_ready(url: str, timeout: float, name: str = "server", process=None, log_tail=lambda: "") -> None:
    """Until `url` answers 200; RuntimeError, with the log's end, if the process dies or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the {name} exited with {process.returncode}:\n{log_tail()}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the {name} at {url} was not ready after {timeout:.0f} s:\n{log_tail()}")


class ServerProcess:
    """A server subprocess on a free loopback port, its log in a file; stopped by its own pid."""

    def __init__(self, name: str, argv: list, cwd: Path, ready_path: str, log_dir: Path):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        self.log_path = log_dir / f"{name}.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep), PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen([sys.executable, *argv, "--port", str(self.port)], cwd=cwd, env=env,
                                        stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float) -> None:
        wait_ready(self.url + self.ready_path, timeout, self.name, process=self.process, log_tail=self.log_tail)

    def wait_ready_or_exit(self, timeout: float) -> None:
        """wait_ready for a command-line tool: a server that does not start is stopped, and the tool exits with
        its log's end."""
        try:
            self.wait_ready(timeout)
        except RuntimeError as exc:
            self.stop()
            raise SystemExit(str(exc)) from None
        except BaseException:  # interrupted while waiting: the server is stopped all the same
            self.stop()
            raise

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        self._log.close()
