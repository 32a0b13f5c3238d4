"""What every preflight check is given (the folder as AI Studio will pack it) and returns (a Check)."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
SKIP_DIRS = (".git",)
# The serving path starts here; what it imports (transitively, inside the folder) is the serving path.
ENTRY = "api.py"
SHIPPED = ("examples/cat.jpg", "docs/bench/chart.png")  # the kit's own pictures: README's sample, the benchmark chart


@dataclass
class Check:
    name: str
    status: str  # PASS, WARN or FAIL
    detail: str
    fix: str = ""


@dataclass
class Entry:
    rel: str  # relative path with forward slashes
    is_dir: bool
    size: int


@dataclass
class Context:
    root: Path
    model: str | None = None  # --model; None: MODEL from the environment, else Settings' default
    hub: str | None = None
    python: str = sys.executable
    load: bool = False  # actually load a local model folder
    backend: str | None = None  # --backend; None: BACKEND from the environment, else paddle
    allow: tuple = ()  # glob patterns of paths that are meant to ship

    @cached_property
    def entries(self) -> list:
        found = []
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            for name in dirs + sorted(files):
                path = Path(folder) / name
                rel = path.relative_to(self.root).as_posix()
                try:
                    is_dir = path.is_dir() and not path.is_symlink()
                    size = 0 if is_dir else path.lstat().st_size
                except OSError:
                    is_dir, size = False, 0
                found.append(Entry(rel, is_dir, size))
        return found

    @cached_property
    def venvs(self) -> frozenset:
        """Relative paths of the virtual environments in the folder."""
        return frozenset(e.rel for e in self.entries if e.is_dir and (self.root / e.rel / "pyvenv.cfg").is_file())

    @cached_property
    def settings(self) -> dict:
        """Settings as the folder's own serving.config defines them (asked in a subprocess)."""
        code = ("import json, os\n"
                "from serving.config import Settings, DEFAULT_MODEL\n"
                "s = Settings()\n"
                "print(json.dumps({'host': s.host, 'port': s.port, 'model': s.model, 'hub': s.hub}))\n")
        done = self.run_python(["-c", code], timeout=60)
        if done.returncode != 0:
            return {"error": tail(done.stdout + done.stderr, 6)}
        return json.loads(done.stdout.strip().splitlines()[-1])

    @property
    def model_name(self) -> str:
        return self.model or os.environ.get("MODEL") or self.settings.get("model") or "Qwen/Qwen2.5-VL-3B-Instruct"

    @property
    def backend_name(self) -> str:
        return (self.backend or os.environ.get("BACKEND") or "paddle").strip().lower()

    @property
    def hub_name(self) -> str:
        return self.hub or os.environ.get("HUB") or self.settings.get("hub") or "aistudio"

    @cached_property
    def model_dir(self) -> Path | None:
        """The model's folder when it is a local folder (relative paths from the folder's root)."""
        name = self.model_name
        from serving.model.demo import is_demo_name

        if is_demo_name(name):
            return None
        path = Path(os.path.expanduser(name))
        if not path.is_absolute():
            path = self.root / path
        return path.resolve() if path.is_dir() else None

    def intended(self, rel: str) -> bool:
        """True for paths meant to ship: the kit's own samples, inside the model folder, or matching an --allow pattern."""
        if rel in SHIPPED:
            return True
        if any(fnmatch.fnmatch(rel, pat) or rel.startswith(pat.rstrip("/") + "/") for pat in self.allow):
            return True
        return self.model_dir is not None and (self.root / rel).resolve().is_relative_to(self.model_dir)

    def run(self, cmd: list, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run cmd in the folder without PYTHONPATH (so Python imports the folder's own code)."""
        full_env = dict(os.environ if env is None else env)
        full_env.pop("PYTHONPATH", None)
        return subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, timeout=timeout, env=full_env)

    def run_python(self, args: list, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the folder's Python; a timeout becomes exit code 124."""
        try:
            return self.run([self.python, *args], timeout)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(exc.cmd, 124, _text(exc.stdout),
                                               _text(exc.stderr) + f"\n(timed out after {timeout:g} s)")


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def tail(text: str, lines: int = 20) -> str:
    kept = [line for line in (text or "").strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def listing(items, limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def join_present(*parts) -> str:
    """'; '-joined texts of the (items, text) pairs whose items are not empty."""
    return "; ".join(text for items, text in parts if items)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
