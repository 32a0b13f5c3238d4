"""Check the folder the way AI Studio will deploy it, in seconds, before a deployment that takes an hour.

    python -m serving.preflight                 # the checks, as a table; exit 1 on any FAIL
    python -m serving.preflight --rehearse      # then a local deployment rehearsal (minutes)
    python -m serving.preflight --model /home/aistudio/Qwen2.5-VL-3B-Instruct --load

AI Studio packs this folder, runs `build_env.sh` and starts `python api.py`; its page only
says "deploying" while that fails. Each check below catches one way it fails, and says how
to fix it: non-ASCII file names (the unpacking hangs), a `build_env.sh` that does not parse
or was never run, an `api.py` out of sync with its notebook or not on 0.0.0.0:8080, torch
in the serving path, a dependency missing from requirements.txt, leftovers that would ship
(weights, caches, images, a token in a file), PaddlePaddle older than 3.3, a model that
cannot be found, and the folder's size.

`--rehearse` then does the deployment locally: it copies the folder (without .git) to a
temporary place, makes a fresh virtual environment, runs `build_env.sh` in it, starts
`api.py` (the demo model unless --model), waits for /health, sends test_connection.py's
request in both payload formats, and stops everything and removes what it made (unless
--keep). `--reuse-site-packages` lets the venv see this Python's packages, so build_env.sh
finds everything installed and finishes in seconds (the tests use it).

Exit codes: 0 no check failed (warnings allowed), 1 a check or the rehearsal failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
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
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASS, WARN, FAIL = "PASS", "WARN", "FAIL"

LARGE_FILE_BYTES = 50 * 1024 ** 2
FOLDER_WARN_BYTES = 1024 ** 3
SECRET_SCAN_MAX_BYTES = 5 * 1024 ** 2
PADDLE_MIN = (3, 3)
WEIGHT_SUFFIXES = (".safetensors", ".pdparams", ".pdiparams", ".pdopt", ".bin", ".pt", ".pth", ".ckpt", ".gguf",
                   ".onnx", ".h5", ".msgpack")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".mp4", ".avi", ".mov")
CACHE_DIRS = ("__pycache__", ".pytest_cache", ".ipynb_checkpoints", ".benchmarks", ".mypy_cache", ".ruff_cache",
              "artifacts")
SECRET_FILE_NAMES = (".env", ".aistudio_token", "id_rsa", "id_ed25519", ".netrc", ".pypirc")
SKIP_DIRS = (".git",)
# The serving path starts here; what it imports (transitively, inside the folder) is the serving path.
ENTRY = "api.py"


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
    def settings(self) -> dict:
        """Settings as the folder's own serving.config defines them (asked in a subprocess)."""
        code = ("import json, os\n"
                "from serving.config import Settings, DEFAULT_MODEL\n"
                "s = Settings()\n"
                "print(json.dumps({'host': s.host, 'port': s.port, 'model': s.model, 'hub': s.hub}))\n")
        done = _python(self, ["-c", code], timeout=60)
        if done.returncode != 0:
            return {"error": _tail(done.stdout + done.stderr, 6)}
        import json

        return json.loads(done.stdout.strip().splitlines()[-1])

    @property
    def model_name(self) -> str:
        return self.model or os.environ.get("MODEL") or self.settings.get("model") or "Qwen/Qwen2.5-VL-3B-Instruct"

    @property
    def hub_name(self) -> str:
        return self.hub or os.environ.get("HUB") or self.settings.get("hub") or "aistudio"

    @cached_property
    def model_dir(self) -> Path | None:
        """The model's folder when it is a local folder (relative paths from the folder's root)."""
        name = self.model_name
        from .demo import is_demo_name

        if is_demo_name(name):
            return None
        path = Path(os.path.expanduser(name))
        if not path.is_absolute():
            path = self.root / path
        return path.resolve() if path.is_dir() else None

    def intended(self, rel: str) -> bool:
        """True for paths meant to ship: inside the model folder, or matching an --allow pattern."""
        if any(fnmatch.fnmatch(rel, pat) or rel.startswith(pat.rstrip("/") + "/") for pat in self.allow):
            return True
        if self.model_dir is not None:
            try:
                (self.root / rel).resolve().relative_to(self.model_dir)
                return True
            except ValueError:
                return False
        return False


def _python(ctx: Context, args: list, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ctx.python with the folder as working directory (so it imports the folder's own code)."""
    full_env = dict(os.environ if env is None else env)
    full_env.pop("PYTHONPATH", None)
    try:
        return subprocess.run([ctx.python, *args], cwd=ctx.root, capture_output=True, text=True, timeout=timeout,
                              env=full_env)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(exc.cmd, 124, _text(exc.stdout), _text(exc.stderr) + f"\n(timed out after {timeout:g} s)")


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def _tail(text: str, lines: int = 20) -> str:
    kept = [line for line in (text or "").strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def _listing(items, limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _version_tuple(text: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", str(text).split("+")[0])[:3])


# --------------------------------------------------------------------------- the checks


def check_ascii_names(ctx: Context) -> Check:
    bad = [e.rel for e in ctx.entries if not e.rel.isascii()]
    # Report the outermost offenders only (a non-ASCII folder makes everything inside it one).
    outer = [p for p in bad if not any(p.startswith(q + "/") for q in bad if q != p)]
    if outer:
        return Check("ASCII file names", FAIL, f"{len(outer)} name(s) with non-ASCII characters: {_listing(outer)}",
                     "rename them with ASCII letters, digits, '-', '_' and '.' only: AI Studio's unpacking fails on "
                     "such names and the deployment stays at 'deploying' forever")
    return Check("ASCII file names", PASS, f"{len(ctx.entries)} files and folders, all ASCII")


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
        return Check(name, FAIL, "bash -n build_env.sh: " + _tail(done.stderr, 3).replace(str(path), "build_env.sh"),
                     "fix the syntax error (bash -n build_env.sh shows it), then run it once: bash build_env.sh")
    return Check(name, PASS, f"bash -n: no syntax errors ({len(data.splitlines())} lines)")


def check_build_env_run(ctx: Context) -> Check:
    """`build_env.sh --dry-run` here: does it still have something to install?"""
    name = "build_env.sh was run"
    if not (ctx.root / "build_env.sh").is_file():
        return Check(name, FAIL, "build_env.sh is missing", "see 'build_env.sh parses'")
    env = dict(os.environ, PYTHON=ctx.python)
    env.pop("PYTHONPATH", None)
    try:
        done = subprocess.run(["bash", "build_env.sh", "--dry-run"], cwd=ctx.root, capture_output=True, text=True,
                              timeout=180, env=env)
    except subprocess.TimeoutExpired:
        return Check(name, WARN, "build_env.sh --dry-run did not finish within 180 s", "run bash build_env.sh once")
    out = done.stdout + done.stderr
    if done.returncode != 0:
        return Check(name, FAIL, "build_env.sh --dry-run failed: " + _tail(out, 4),
                     "run bash build_env.sh in a terminal and fix what it reports")
    lines = out.splitlines()
    pending = [lines[i - 1].split("$", 1)[-1].strip() for i, line in enumerate(lines)
               if "(dry run: not executed)" in line and i > 0 and "$" in lines[i - 1] and "-c 'import" not in lines[i - 1]]
    if pending:
        return Check(name, WARN, f"in this Python ({ctx.python}) build_env.sh would still run: {_listing(pending, 3)}",
                     "run it once in a terminal and read its summary: bash build_env.sh (the deployment runs the same "
                     "script; one that was never run is the tutorial's most common silent failure)")
    return Check(name, PASS, "everything build_env.sh installs is already here (its dry run has nothing to do)")


def check_api_sync(ctx: Context) -> Check:
    name = "api.py in sync with notebook"
    if not (ctx.root / ENTRY).is_file():
        return Check(name, FAIL, "api.py is missing", "export it from notebooks/04_serve_api.ipynb: python -m serving.export")
    if not (ctx.root / "serving" / "export.py").is_file():
        return Check(name, FAIL, "exporter missing: serving/export.py is not in the folder, so api.py cannot be "
                     "checked against notebooks/04_serve_api.ipynb", "restore serving/export.py from the repository")
    done = _python(ctx, ["-m", "serving.export", "--check"], timeout=120)
    if done.returncode == 0:
        return Check(name, PASS, _tail(done.stdout, 1) or "python -m serving.export --check: in sync")
    if done.returncode == 1:
        diff = [line for line in done.stdout.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        return Check(name, FAIL, "api.py differs from a fresh export of the notebook; first changed lines: "
                     + " | ".join(line[:80] for line in diff[:3]),
                     "edit the '#| export' cells of notebooks/04_serve_api.ipynb, save it, then: python -m serving.export")
    return Check(name, FAIL, "python -m serving.export --check failed: " + _tail(done.stderr or done.stdout, 3),
                 "fix what the exporter reports in notebooks/04_serve_api.ipynb, then: python -m serving.export")


def api_binding_problems(source: str) -> list:
    """Host/port literals in api.py that would move the service off 0.0.0.0:8080."""
    tree = ast.parse(source)
    problems = []
    uses_settings = "load_settings" in source or "Settings(" in source

    def bad_host(value):
        return isinstance(value, str) and value not in ("0.0.0.0", "::", "")

    def bad_port(value):
        try:
            return int(value) != 8080
        except (TypeError, ValueError):
            return False

    def const(node):
        return node.value if isinstance(node, ast.Constant) else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "host" and bad_host(const(kw.value)):
                    problems.append(f"line {node.lineno}: host={const(kw.value)!r}")
                if kw.arg == "port" and bad_port(const(kw.value)):
                    problems.append(f"line {node.lineno}: port={const(kw.value)!r}")
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname == "run" and isinstance(func, ast.Attribute):
                args = [const(a) for a in node.args]
                if args and bad_host(args[0]):
                    problems.append(f"line {node.lineno}: run({args[0]!r}, ...)")
                if len(args) > 1 and bad_port(args[1]):
                    problems.append(f"line {node.lineno}: run(..., {args[1]!r})")
                keywords = {kw.arg for kw in node.keywords}
                if not node.args and not {"host", "port"} & keywords and not uses_settings:
                    problems.append(f"line {node.lineno}: .run() without host and port (Flask's default is "
                                    "127.0.0.1:5000)")
            if fname == "setdefault" and len(node.args) == 2 and const(node.args[0]) in ("HOST", "PORT"):
                key, value = const(node.args[0]), const(node.args[1])
                if (key == "HOST" and bad_host(value)) or (key == "PORT" and bad_port(value)):
                    problems.append(f"line {node.lineno}: environ.setdefault({key!r}, {value!r})")
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [const(e) for e in node.elts]
            for i, item in enumerate(items[:-1]):
                if item == "--host" and bad_host(items[i + 1]):
                    problems.append(f"line {node.lineno}: '--host', {items[i + 1]!r}")
                if item == "--port" and bad_port(items[i + 1]):
                    problems.append(f"line {node.lineno}: '--port', {items[i + 1]!r}")
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Subscript) and const(target.slice) in ("HOST", "PORT"):
                    key, value = const(target.slice), const(node.value)
                    if (key == "HOST" and bad_host(value)) or (key == "PORT" and bad_port(value)):
                        problems.append(f"line {node.lineno}: [{key!r}] = {value!r}")
    return problems


def check_port(ctx: Context) -> Check:
    name = "listens on 0.0.0.0:8080"
    fix = ("AI Studio forwards only port 8080 and reaches the service from outside the container: keep the defaults "
           "(Settings.host '0.0.0.0', Settings.port 8080) and pass no --host/--port in api.py")
    api = ctx.root / ENTRY
    if not api.is_file():
        return Check(name, FAIL, "api.py is missing", fix)
    try:
        problems = api_binding_problems(api.read_text(encoding="utf-8"))
    except SyntaxError as exc:
        return Check(name, FAIL, f"api.py is not valid Python: line {exc.lineno}: {exc.msg}", "fix api.py's notebook")
    settings = ctx.settings
    if "error" in settings:
        problems.append("serving.config.Settings cannot be read: " + settings["error"].splitlines()[-1])
    else:
        if settings["host"] != "0.0.0.0":
            problems.append(f"Settings.host defaults to {settings['host']!r}")
        if int(settings["port"]) != 8080:
            problems.append(f"Settings.port defaults to {settings['port']!r}")
    if problems:
        return Check(name, FAIL, "api.py would not listen on 0.0.0.0:8080: " + "; ".join(problems), fix)
    local = {k: os.environ[k] for k in ("HOST", "PORT") if os.environ.get(k) not in (None, "", "0.0.0.0", "8080")}
    if local:
        return Check(name, WARN, "api.py and Settings default to 0.0.0.0:8080, but this shell sets "
                     + ", ".join(f"{k}={v}" for k, v in local.items()) + " (the deployment does not inherit it)",
                     "fine for local runs; do not put HOST/PORT in the deployment's start command")
    return Check(name, PASS, "Settings default to 0.0.0.0:8080 and api.py overrides neither")


# --- the serving path: what api.py imports, transitively, inside the folder


@dataclass
class ImportSite:
    module: str  # the imported module, absolute
    file: str  # relative path of the importing file
    line: int
    optional: bool  # inside try/except ImportError


def _imports(path: Path, package: str) -> list:
    """Every import in a file (module level and inside functions), with relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    sites = []

    def visit(node, optional):
        if isinstance(node, ast.Try):
            catches = set()
            for handler in node.handlers:
                types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                catches |= {getattr(t, "id", getattr(t, "attr", "")) for t in types if t is not None}
            guarded = bool(catches & {"ImportError", "ModuleNotFoundError"})
            for child in node.body:
                visit(child, optional or guarded)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, optional)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                sites.append(ImportSite(alias.name, "", node.lineno, optional))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base)
                if node.module:
                    sites.append(ImportSite(f"{prefix}.{node.module}" if prefix else node.module, "", node.lineno, optional))
                else:
                    for alias in node.names:
                        sites.append(ImportSite(f"{prefix}.{alias.name}" if prefix else alias.name, "", node.lineno, optional))
            elif node.module:
                sites.append(ImportSite(node.module, "", node.lineno, optional))
                for alias in node.names:  # `from serving import gpu` imports a submodule
                    sites.append(ImportSite(f"{node.module}.{alias.name}", "", node.lineno, True))
        for child in ast.iter_child_nodes(node):
            visit(child, optional)

    visit(tree, False)
    return sites


def _local_file(root: Path, module: str) -> Path | None:
    parts = module.split(".")
    for candidate in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def serving_path(root: Path) -> tuple:
    """(local files reached from api.py, third-party ImportSites) by following imports."""
    files, external, todo = {}, [], [root / ENTRY]
    while todo:
        path = todo.pop()
        rel = path.relative_to(root).as_posix()
        if rel in files or not path.is_file():
            continue
        module = rel[:-3].replace("/", ".")
        package = module.rsplit(".", 1)[0] if not rel.endswith("__init__.py") else module.rsplit(".", 1)[0]
        package = package if "." in module else ""
        try:
            sites = _imports(path, package)
        except SyntaxError:
            sites = []
        files[rel] = sites
        for site in sites:
            site.file = rel
            local = _local_file(root, site.module)
            parts = site.module.split(".")
            # a package's __init__ runs before its submodule
            for i in range(1, len(parts)):
                init = root.joinpath(*parts[:i], "__init__.py")
                if init.is_file():
                    todo.append(init)
            if local is not None:
                todo.append(local)
            elif not site.optional and _local_file(root, parts[0]) is None and not (root / parts[0]).is_dir():
                external.append(site)
    return sorted(files), external


def _torch_sites(sites) -> list:
    return [s for s in sites if s.module.split(".")[0] in ("torch", "torchvision", "torchaudio")]


def check_no_torch(ctx: Context) -> Check:
    name = "no torch in the serving path"
    fix = ("AI Studio's service refuses PyTorch: use PaddlePaddle / PaddleFormers instead, remove torch from "
           "requirements.txt and build_env.sh, and pip uninstall torch")
    if not (ctx.root / ENTRY).is_file():
        return Check(name, FAIL, "api.py is missing", "export it: python -m serving.export")
    files, external = serving_path(ctx.root)
    problems = [f"{s.file}:{s.line} imports {s.module}" for s in _torch_sites(external)]
    req = ctx.root / "requirements.txt"
    if req.is_file():
        for n, line in enumerate(req.read_text(encoding="utf-8").splitlines(), 1):
            if re.match(r"^\s*(torch|torchvision|torchaudio)\b", line, re.IGNORECASE):
                problems.append(f"requirements.txt:{n} installs {line.strip()}")
    build = ctx.root / "build_env.sh"
    if build.is_file():
        for n, line in enumerate(build.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if re.search(r"pip3?\s+install[^#]*\btorch", line) and not line.lstrip().startswith("#"):
                problems.append(f"build_env.sh:{n} installs torch")
    if problems:
        return Check(name, FAIL, "; ".join(problems), fix)
    # Import all of it for real: a dependency could import torch behind our back.
    modules = [f[:-3].replace("/", ".").removesuffix(".__init__") for f in files if f != ENTRY]
    code = ("import importlib, sys\n"
            "import api\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "from paddleformers.transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration\n"
            "from paddleformers.generation.streamers import TextIteratorStreamer\n"
            "import importlib.util\n"
            "bad = sorted(m for m, mod in sys.modules.items()  # None entries are import blockers, not imports\n"
            "             if mod is not None and m.split('.')[0] in ('torch', 'torchvision', 'torchaudio'))\n"
            "print('TORCH_MODULES', len(bad), ' '.join(bad[:5]))\n"
            "print('TORCH_INSTALLED', importlib.util.find_spec('torch') is not None)\n")
    done = _python(ctx, ["-c", code], timeout=300)
    found = re.search(r"TORCH_MODULES (\d+) ?(.*)", done.stdout)
    if done.returncode != 0 or not found:
        return Check(name, FAIL, f"importing api.py and its {len(modules)} serving modules failed: "
                     + _tail(done.stderr, 3), "run python -c 'import api' in the folder and fix the error")
    if int(found.group(1)):
        return Check(name, FAIL, f"importing the serving path imported torch ({found.group(2)})", fix)
    if "TORCH_INSTALLED True" in done.stdout:
        return Check(name, WARN, f"api.py and {len(modules)} serving modules import without torch, but torch is "
                     "installed in this environment", "pip uninstall torch (AI Studio's service refuses it)")
    return Check(name, PASS, f"api.py, {len(modules)} serving modules and the PaddleFormers model classes import "
                 "without torch")


def _requirement_names(path: Path, seen=()) -> list:
    names = []
    if not path.is_file() or path in seen:
        return names
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(-r|--requirement)\s*=?\s*(\S+)$", line)
        if m:
            names += _requirement_names(path.parent / m.group(2), seen + (path,))
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if m:
            names.append(m.group(1))
    return names


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dependency_closure(names) -> set:
    """The pinned distributions and everything they require (as installed here)."""
    from importlib.metadata import PackageNotFoundError, requires

    closure, todo = set(), [_norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        for req in reqs:
            if "extra ==" in req.replace('"', "").replace("'", ""):
                continue
            m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", req)
            if m:
                todo.append(_norm(m.group(1)))
    return closure


def check_dependencies(ctx: Context) -> Check:
    name = "dependencies in requirements.txt"
    if not (ctx.root / ENTRY).is_file():
        return Check(name, FAIL, "api.py is missing", "export it: python -m serving.export")
    from importlib.metadata import packages_distributions

    _files, external = serving_path(ctx.root)
    pinned = _requirement_names(ctx.root / "requirements.txt")
    closure = _dependency_closure(pinned) | {"paddlepaddle", "paddlepaddle-gpu"}  # build_env.sh installs Paddle
    dists = packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    missing, unpinned, seen = [], [], set()
    for site in external:
        top = site.module.split(".")[0]
        if top in stdlib or top in seen or top == "__future__":
            continue
        seen.add(top)
        owners = [_norm(d) for d in dists.get(top, [])]
        if not owners:
            missing.append(f"{top} ({site.file}:{site.line})")
        elif not set(owners) & closure:
            unpinned.append(f"{top} from {dists[top][0]} ({site.file}:{site.line})")
    if missing or unpinned:
        detail = []
        if missing:
            detail.append("not installed here and not in requirements.txt: " + _listing(missing))
        if unpinned:
            detail.append("installed here but not in requirements.txt: " + _listing(unpinned))
        return Check(name, FAIL, "; ".join(detail),
                     "add each one to requirements.txt as name==version (pip show NAME gives the version); the "
                     "deployment installs only what build_env.sh and requirements.txt name")
    return Check(name, PASS, f"{len(seen)} third-party packages imported by the serving path ("
                 f"{', '.join(sorted(seen))}) are in requirements.txt or installed with them")


def check_leftovers(ctx: Context) -> Check:
    name = "no leftovers would ship"
    weights, venvs, caches, images = [], [], [], []
    for e in ctx.entries:
        base = e.rel.rsplit("/", 1)[-1]
        if ctx.intended(e.rel) or any(e.rel.startswith(v + "/") for v in venvs + caches):
            continue
        if e.is_dir:
            if (ctx.root / e.rel / "pyvenv.cfg").is_file():
                venvs.append(e.rel)
            elif base in CACHE_DIRS:
                caches.append(e.rel)
        elif base.lower().endswith(WEIGHT_SUFFIXES):
            weights.append(f"{e.rel} ({human(e.size)})")
        elif base.lower().endswith(IMAGE_SUFFIXES):
            images.append(e.rel)
    if weights or venvs:
        parts = []
        if weights:
            parts.append(f"weights/checkpoints: {_listing(weights)}")
        if venvs:
            parts.append(f"virtual environments: {_listing(venvs)}")
        return Check(name, FAIL, "; ".join(parts),
                     "move them out of the folder (the service downloads the model or reads --model DIR; "
                     "build_env.sh builds the environment). To ship a model on purpose, point MODEL/--model at its "
                     "folder or pass --allow PATTERN")
    if caches or images:
        parts = []
        if images:
            parts.append(f"{len(images)} image/video file(s), maybe private: {_listing(images, 5)}")
        if caches:
            parts.append(f"caches: {_listing(caches, 5)}")
        return Check(name, WARN, "; ".join(parts),
                     "delete what should not ship, e.g. find . -name __pycache__ -o -name .ipynb_checkpoints | "
                     "xargs rm -rf; move user images out of the folder (--allow PATTERN marks files meant to ship)")
    return Check(name, PASS, "no weights, virtual environments, caches or images outside what is meant to ship")


SECRET_PATTERNS = (
    ("OpenAI-style key", re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}")),
    ("Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{30,}")),
    ("bearer token", re.compile(r"\bBearer\s+([A-Za-z0-9._~+/=-]{24,})")),
    ("--api-key value", re.compile(r"--api-key[= ]+['\"]?([A-Za-z0-9._~+/-]{16,})")),
)
_ASSIGNMENT = re.compile(
    r"(?i)(?P<name>\b[a-z0-9_]*(?:api[_-]?key|access[_-]?token|secret[_-]?key|auth[_-]?token|token|secret|password|passwd))\b"
    r"(?:(?P<close>\\?[\"'])\]?\s*[:=,]|\s*[:=])\s*(?P<q>\\?[\"'])?(?P<value>[A-Za-z0-9._~+/-]{16,})")
_PLACEHOLDER = re.compile(r"(?i)your|example|placeholder|xxxx|changeme|dummy|\.\.\.|<|\$\{")


def _looks_secret(value: str) -> bool:
    return bool(re.search(r"\d", value)) and bool(re.search(r"[A-Za-z]", value)) and not _PLACEHOLDER.search(value)


def find_secrets(text: str) -> list:
    """(line number, kind, masked value) for things that look like credentials."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for kind, pattern in SECRET_PATTERNS:
            for m in pattern.finditer(line):
                value = m.group(m.lastindex or 0)
                if _looks_secret(value):
                    found.append((n, kind, value[:4] + "..."))
        for m in _ASSIGNMENT.finditer(line):
            value = m.group("value")
            env_style = re.match(r"^\s*(export\s+)?[A-Za-z_][A-Za-z0-9_]*=", line) and m.start() == line.find(m.group("name"))
            if (m.group("q") or env_style) and _looks_secret(value):
                found.append((n, f"{m.group('name')} value", value[:4] + "..."))
    return found


def check_secrets(ctx: Context) -> Check:
    name = "no token or secret in a file"
    hits = []
    venvs = [e.rel + "/" for e in ctx.entries if e.is_dir and (ctx.root / e.rel / "pyvenv.cfg").is_file()]
    for e in ctx.entries:
        base = e.rel.rsplit("/", 1)[-1]
        # .ipynb_checkpoints are scanned too: their notebook copies keep old outputs, and they ship.
        if (e.is_dir or ctx.intended(e.rel) or "__pycache__" in e.rel.split("/")
                or any(e.rel.startswith(v) for v in venvs)):
            continue
        if base in SECRET_FILE_NAMES or base.endswith((".pem", ".key")):
            hits.append(f"{e.rel} (a credentials file)")
            continue
        if e.size > SECRET_SCAN_MAX_BYTES or base.lower().endswith(WEIGHT_SUFFIXES + IMAGE_SUFFIXES):
            continue
        try:
            data = (ctx.root / e.rel).read_bytes()
        except OSError:
            continue
        if b"\0" in data[:8192]:
            continue
        for line, kind, masked in find_secrets(data.decode("utf-8", "replace")):
            hits.append(f"{e.rel}:{line} {kind} {masked}")
    if hits:
        return Check(name, FAIL, f"{len(hits)} likely secret(s): {_listing(hits, 6)}",
                     "remove them (and revoke them if they were ever shared); pass keys at run time instead: "
                     "API_KEY in the service's environment, --api-key for test_connection.py. Clear notebook "
                     "outputs that printed one")
    return Check(name, PASS, "no access token, API key or bearer token found in the text files")


def check_large_files(ctx: Context) -> Check:
    name = f"no file over {human(LARGE_FILE_BYTES)}"
    big = sorted(((e.size, e.rel) for e in ctx.entries
                  if not e.is_dir and e.size > LARGE_FILE_BYTES and not ctx.intended(e.rel)), reverse=True)
    if big:
        return Check(name, FAIL, f"{len(big)} large file(s): " + _listing(f"{rel} ({human(size)})" for size, rel in big),
                     "move them out of the folder: everything in it is packed and uploaded with every deployment "
                     "(--allow PATTERN for a file the service really needs)")
    return Check(name, PASS, f"the largest file is {human(max((e.size for e in ctx.entries), default=0))}")


def check_paddle(ctx: Context) -> Check:
    name = "PaddlePaddle 3.3 or newer"
    done = _python(ctx, ["-c", "from importlib.metadata import version, PackageNotFoundError\n"
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
    installs = pinned is not None and _version_tuple(pinned) >= PADDLE_MIN
    if len(installed) == 2 and _version_tuple(installed[1]) >= PADDLE_MIN:
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
    from .demo import is_demo_name
    from .download import is_hub_id, verify_checkpoint

    model = ctx.model_name
    name = "model"
    if is_demo_name(model):
        return Check(name, PASS, f"{model!r}: the offline demo model (random weights: its answers are meaningless "
                     "text; fine for a rehearsal)")
    if ctx.model_dir is not None:
        result = verify_checkpoint(ctx.model_dir)
        if not result.ok:
            return Check(name, FAIL, f"local folder {model}: " + "; ".join(result.problems[:4]),
                         "download it again (python -m serving.download MODEL --to DIR resumes and verifies)")
        detail = f"local folder {model}: {result.shards} shard(s), {result.parameters / 1e9:.2f}B parameters"
        try:
            ctx.model_dir.relative_to(ctx.root.resolve())
            inside = True
        except ValueError:
            inside = False
        if ctx.load:
            code = ("import sys, time\nfrom serving.config import Settings\nfrom serving.model import load_model\n"
                    f"m = load_model(Settings(model={str(ctx.model_dir)!r}))\n"
                    "print('LOADED', m.device, m.dtype, round(m.load_seconds, 1))\n")
            done = _python(ctx, ["-c", code], timeout=1800)
            if "LOADED" not in done.stdout:
                return Check(name, FAIL, detail + "; loading it failed: " + _tail(done.stderr, 3),
                             "check the folder holds a Qwen2.5-VL checkpoint; python -m serving.download --verify DIR")
            detail += "; loads (" + done.stdout.split("LOADED", 1)[1].strip() + " s)"
        if not inside:
            return Check(name, WARN, detail + "; it is outside the folder AI Studio packs",
                         "the deployed service reads only what is in the deployed folder: move the model folder "
                         "inside it (and pass --model with the relative path), or let the service download a hub id")
        return Check(name, PASS, detail + " (inside the folder: it ships with the deployment)")
    if is_hub_id(model):
        from .download import HUBS

        if ctx.hub_name not in HUBS:
            return Check(name, FAIL, f"hub {ctx.hub_name!r} is unknown", f"use one of {', '.join(HUBS)}")
        return Check(name, PASS, f"hub id {model}: downloaded from the {ctx.hub_name} hub when the service starts "
                     "(each start waits for the download; /health answers 503 meanwhile)")
    return Check(name, FAIL, f"{model!r} is neither a folder here, a hub id (org/name) nor 'demo'",
                 "pass an existing checkpoint folder, a hub id such as Qwen/Qwen2.5-VL-3B-Instruct, or demo "
                 "(--model, or MODEL in the environment)")


def check_folder_size(ctx: Context) -> Check:
    name = "folder size"
    total = sum(e.size for e in ctx.entries)
    files = sum(1 for e in ctx.entries if not e.is_dir)
    top: dict = {}
    for e in ctx.entries:
        top[e.rel.split("/")[0]] = top.get(e.rel.split("/")[0], 0) + e.size
    biggest = ", ".join(f"{k} {human(v)}" for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:3])
    detail = f"{human(total)} in {files} files (largest: {biggest})"
    if total > FOLDER_WARN_BYTES:
        return Check(name, WARN, detail, "everything in the folder is packed and uploaded with each deployment: move "
                     "what the service does not need elsewhere")
    return Check(name, PASS, detail)


CHECKS = (check_ascii_names, check_build_env, check_build_env_run, check_api_sync, check_port, check_no_torch,
          check_dependencies, check_leftovers, check_secrets, check_large_files, check_paddle, check_model,
          check_folder_size)


def run_checks(ctx: Context, checks=CHECKS) -> list:
    results = []
    for check in checks:
        try:
            results.append(check(ctx))
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            results.append(Check(check.__name__.removeprefix("check_"), FAIL,
                                 f"the check itself failed: {type(exc).__name__}: {exc}",
                                 "report this as a bug of serving/preflight.py"))
    return results


def format_table(results: list, width: int = 110) -> str:
    name_w = max([len(r.name) for r in results] + [5])
    indent = " " * (name_w + 10)
    lines = [f"{'check':<{name_w}}  status  detail", f"{'-' * name_w}  ------  {'-' * 40}"]
    for r in results:
        wrapped = textwrap.wrap(r.detail, max(40, width - len(indent))) or [""]
        lines.append(f"{r.name:<{name_w}}  {r.status:<6}  {wrapped[0]}")
        lines += [indent + w for w in wrapped[1:]]
        if r.status != PASS and r.fix:
            fix = textwrap.wrap("fix: " + r.fix, max(40, width - len(indent)))
            lines += [indent + w for w in fix]
    counts = {s: sum(r.status == s for r in results) for s in (PASS, WARN, FAIL)}
    lines.append(f"preflight: {counts[PASS]} PASS, {counts[WARN]} WARN, {counts[FAIL]} FAIL")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the rehearsal


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


def _copy_ignore(folder, names):
    return [n for n in names if n in SKIP_DIRS]


def rehearse(root: Path, model: str = "demo", hub: str | None = None, reuse_site_packages: bool = False,
             keep: bool = False, build_timeout: float = 1800, start_timeout: float = 600,
             request_timeout: float = 300, python: str = sys.executable) -> Rehearsal:
    """The deployment, locally: copy, fresh venv, build_env.sh, api.py, /health, two requests, stop."""
    import requests

    from .server import free_port

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
        tail = ""
        if not ok and log_path.is_file():
            tail = _tail(log_path.read_text(encoding="utf-8", errors="replace"), 30)
        result.steps.append(Step(name, ok, seconds, detail, tail))
        print(f"[rehearse] {n}/{total_steps} {name}: {'ok' if ok else 'FAILED'} ({seconds:.1f} s)"
              + (f" - {detail}" if detail else ""), flush=True)
        if not ok and tail:
            print(textwrap.indent(f"end of its log ({log_path.name}):\n{tail}", "    "), flush=True)
        return ok

    def copy(log_path):
        shutil.copytree(root, app_dir, symlinks=True, ignore=_copy_ignore)
        files = sum(len(f) for _, _, f in os.walk(app_dir))
        return True, f"{files} files copied to {app_dir} (without .git)"

    def make_venv(log_path):
        cmd = [python, "-m", "venv"] + (["--system-site-packages"] if reuse_site_packages else []) + [str(venv)]
        rc = _run_logged(cmd, work, env, log_path, 300)
        kind = "sees this Python's packages (--reuse-site-packages)" if reuse_site_packages else "fresh, empty"
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
        log = open(log_path, "ab")
        try:
            server = subprocess.Popen(cmd, cwd=app_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
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
            if not image.exists():
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


# --------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.preflight",
        description="Check this folder the way AI Studio will deploy it (and optionally rehearse the deployment).")
    parser.add_argument("--root", type=Path, default=ROOT, help="the folder to check (default: %(default)s)")
    parser.add_argument("--model", help="the model the service will load (default: env MODEL, else Settings' default); "
                        "for --rehearse: default demo")
    parser.add_argument("--hub", help="hub for a hub id (default: env HUB, else aistudio)")
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
        ctx = Context(root, model=args.model, hub=args.hub, load=args.load, allow=tuple(args.allow))
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
