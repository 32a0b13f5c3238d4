"""Preflight checks of the serving path (what api.py imports, transitively, inside the folder):
no torch in it, and every third-party package it imports in requirements.txt."""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from serving.deploy.checks.context import ENTRY, FAIL, PASS, WARN, Check, Context, join_present, listing, tail

TORCH = ("torch", "torchvision", "torchaudio")

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

    def add(module, node, optional):
        sites.append(ImportSite(module, "", node.lineno, optional))

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
                add(alias.name, node, optional)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base)
                for name in [node.module] if node.module else [alias.name for alias in node.names]:
                    add(f"{prefix}.{name}" if prefix else name, node, optional)
            elif node.module:
                add(node.module, node, optional)
                for alias in node.names:  # `from serving import gpu` imports a submodule
                    add(f"{node.module}.{alias.name}", node, True)
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
        package = module.rsplit(".", 1)[0] if "." in module else ""
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
    return [s for s in sites if s.module.split(".")[0] in TORCH]


def _no_api(name: str) -> Check:
    return Check(name, FAIL, "api.py is missing", "export it: python -m serving.notebook.export")


def check_no_torch(ctx: Context) -> Check:
    name = "no torch in the serving path"
    fix = ("AI Studio's service refuses PyTorch: use PaddlePaddle / PaddleFormers instead, remove torch from "
           "requirements.txt and build_env.sh, and pip uninstall torch")
    if not (ctx.root / ENTRY).is_file():
        return _no_api(name)
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
            f"             if mod is not None and m.split('.')[0] in {TORCH!r})\n"
            "print('TORCH_MODULES', len(bad), ' '.join(bad[:5]))\n"
            "print('TORCH_INSTALLED', importlib.util.find_spec('torch') is not None)\n")
    done = ctx.run_python(["-c", code], timeout=300)
    found = re.search(r"TORCH_MODULES (\d+) ?(.*)", done.stdout)
    if done.returncode != 0 or not found:
        return Check(name, FAIL, f"importing api.py and its {len(modules)} serving modules failed: "
                     + tail(done.stderr, 3), "run python -c 'import api' in the folder and fix the error")
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
        return _no_api(name)
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
        return Check(name, FAIL, join_present(
                         (missing, "not installed here and not in requirements.txt: " + listing(missing)),
                         (unpinned, "installed here but not in requirements.txt: " + listing(unpinned))),
                     "add each one to requirements.txt as name==version (pip show NAME gives the version); the "
                     "deployment installs only what build_env.sh and requirements.txt name")
    return Check(name, PASS, f"{len(seen)} third-party packages imported by the serving path ("
                 f"{', '.join(sorted(seen))}) are in requirements.txt or installed with them")

