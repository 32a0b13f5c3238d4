"""Preflight checks of api.py: in sync with its notebook, and listening where AI Studio looks (0.0.0.0:8080)."""

from __future__ import annotations

import ast
import os
import re

from serving.deploy.checks.context import ENTRY, FAIL, PASS, WARN, Check, Context, tail


def check_api_sync(ctx: Context) -> Check:
    name = "api.py in sync with notebook"
    if not (ctx.root / ENTRY).is_file():
        return Check(name, FAIL, "api.py is missing", "export it from notebooks/04_serve_api.ipynb: python -m serving.notebook.export")
    if not (ctx.root / "serving" / "notebook" / "export.py").is_file():
        return Check(name, FAIL, "exporter missing: serving/notebook/export.py is not in the folder, so api.py cannot be "
                     "checked against notebooks/04_serve_api.ipynb", "restore serving/notebook/export.py from the repository")
    done = ctx.run_python(["-m", "serving.notebook.export", "--check"], timeout=120)
    if done.returncode == 0:
        return Check(name, PASS, tail(done.stdout, 1) or "python -m serving.notebook.export --check: in sync")
    missing = re.search(r"No module named '([^']+)'", done.stderr or "")
    if missing:  # the exporter could not run at all: say what is missing, not that the files differ
        return Check(name, FAIL, f"python -m serving.notebook.export --check could not run: the module {missing.group(1)!r} "
                     f"is not installed in this Python ({ctx.python})",
                     "install what the kit needs: bash build_env.sh (or pip install -r requirements.txt)")
    if done.returncode == 1 and "is out of date with" in (done.stderr or ""):
        diff = [line for line in done.stdout.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        return Check(name, FAIL, "api.py differs from a fresh export of the notebook; first changed lines: "
                     + (" | ".join(line[:80] for line in diff[:3]) or tail(done.stdout, 2)),
                     "edit the '#| export' cells of notebooks/04_serve_api.ipynb, save it, then: python -m serving.notebook.export")
    return Check(name, FAIL, "python -m serving.notebook.export --check failed: " + tail(done.stderr or done.stdout, 3),
                 "fix what the exporter reports in notebooks/04_serve_api.ipynb, then: python -m serving.notebook.export")


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

    def bad(key, value, names=("host", "port")):
        return (key == names[0] and bad_host(value)) or (key == names[1] and bad_port(value))

    env_names = ("HOST", "PORT")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if bad(kw.arg, const(kw.value)):
                    problems.append(f"line {node.lineno}: {kw.arg}={const(kw.value)!r}")
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
            if fname == "setdefault" and len(node.args) == 2:
                key, value = const(node.args[0]), const(node.args[1])
                if bad(key, value, env_names):
                    problems.append(f"line {node.lineno}: environ.setdefault({key!r}, {value!r})")
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [const(e) for e in node.elts]
            for item, value in zip(items, items[1:]):
                if bad(item, value, ("--host", "--port")):
                    problems.append(f"line {node.lineno}: {item!r}, {value!r}")
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Subscript):
                    key, value = const(target.slice), const(node.value)
                    if bad(key, value, env_names):
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

