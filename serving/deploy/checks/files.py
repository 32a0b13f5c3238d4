"""Preflight checks of the files AI Studio packs: their names, what should not ship, secrets, sizes."""

from __future__ import annotations

import re

from serving.deploy.checks.context import FAIL, PASS, WARN, Check, Context, human, join_present, listing

LARGE_FILE_BYTES = 50 * 1024 ** 2
FOLDER_WARN_BYTES = 1024 ** 3
SECRET_SCAN_MAX_BYTES = 5 * 1024 ** 2
WEIGHT_SUFFIXES = (".safetensors", ".pdparams", ".pdiparams", ".pdopt", ".bin", ".pt", ".pth", ".ckpt", ".gguf",
                   ".onnx", ".h5", ".msgpack")
# Packages and archives: build_env.sh installs from requirements.txt, so a wheel or tarball in the folder is
# only dead weight uploaded with every deployment (a stray 2.8 MiB wheel was once 65% of it).
ARCHIVE_SUFFIXES = (".whl", ".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz", ".zip", ".7z", ".rar", ".gz", ".xz",
                    ".bz2", ".egg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".mp4", ".avi", ".mov")
CACHE_DIRS = ("__pycache__", ".pytest_cache", ".hypothesis", ".ipynb_checkpoints", ".benchmarks", ".mypy_cache",
              ".ruff_cache", "artifacts")
SECRET_FILE_NAMES = (".env", ".aistudio_token", "id_rsa", "id_ed25519", ".netrc", ".pypirc")


def check_ascii_names(ctx: Context) -> Check:
    bad = [e.rel for e in ctx.entries if not e.rel.isascii()]
    # Report the outermost offenders only (a non-ASCII folder makes everything inside it one).
    outer = [p for p in bad if not any(p.startswith(q + "/") for q in bad if q != p)]
    if outer:
        return Check("ASCII file names", FAIL, f"{len(outer)} name(s) with non-ASCII characters: {listing(outer)}",
                     "rename them with ASCII letters, digits, '-', '_' and '.' only: AI Studio's unpacking fails on "
                     "such names and the deployment stays at 'deploying' forever")
    return Check("ASCII file names", PASS, f"{len(ctx.entries)} files and folders, all ASCII")


def check_leftovers(ctx: Context) -> Check:
    name = "no leftovers would ship"
    weights, venvs, caches, images, archives = [], [], [], [], []
    for e in ctx.entries:
        base = e.rel.rsplit("/", 1)[-1]
        if ctx.intended(e.rel) or any(e.rel.startswith(v + "/") for v in venvs + caches):
            continue
        if e.is_dir:
            if e.rel in ctx.venvs:
                venvs.append(e.rel)
            elif base in CACHE_DIRS:
                caches.append(e.rel)
        elif base.lower().endswith(WEIGHT_SUFFIXES):
            weights.append(f"{e.rel} ({human(e.size)})")
        elif base.lower().endswith(IMAGE_SUFFIXES):
            images.append(e.rel)
        elif base.lower().endswith(ARCHIVE_SUFFIXES):
            archives.append(f"{e.rel} ({human(e.size)})")
    if weights or venvs:
        return Check(name, FAIL, join_present((weights, f"weights/checkpoints: {listing(weights)}"),
                                              (venvs, f"virtual environments: {listing(venvs)}")),
                     "move them out of the folder (the service downloads the model or reads --model DIR; "
                     "build_env.sh builds the environment). To ship a model on purpose, point MODEL/--model at its "
                     "folder or pass --allow PATTERN")
    if caches or images or archives:
        return Check(name, WARN,
                     join_present((archives, f"{len(archives)} wheel(s)/archive(s): {listing(archives, 5)}"),
                                  (images, f"{len(images)} image/video file(s), maybe private: {listing(images, 5)}"),
                                  (caches, f"caches: {listing(caches, 5)}")),
                     "delete what should not ship, e.g. find . -name __pycache__ -o -name .ipynb_checkpoints | "
                     "xargs rm -rf; packages come from PyPI (requirements.txt, installed by build_env.sh), not from "
                     "wheels or archives in the folder; move user images out of the folder (--allow PATTERN marks "
                     "files meant to ship)")
    return Check(name, PASS, "no weights, virtual environments, caches, archives or images outside what is meant to "
                 "ship")


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
    for e in ctx.entries:
        base = e.rel.rsplit("/", 1)[-1]
        # .ipynb_checkpoints are scanned too: their notebook copies keep old outputs, and they ship.
        if (e.is_dir or ctx.intended(e.rel) or "__pycache__" in e.rel.split("/")
                or any(e.rel.startswith(v + "/") for v in ctx.venvs)):
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
        return Check(name, FAIL, f"{len(hits)} likely secret(s): {listing(hits, 6)}",
                     "remove them (and revoke them if they were ever shared); pass keys at run time instead: "
                     "API_KEY in the service's environment, --api-key for test_connection.py. Clear notebook "
                     "outputs that printed one")
    return Check(name, PASS, "no access token, API key or bearer token found in the text files")


def check_large_files(ctx: Context) -> Check:
    name = f"no file over {human(LARGE_FILE_BYTES)}"
    big = sorted(((e.size, e.rel) for e in ctx.entries
                  if not e.is_dir and e.size > LARGE_FILE_BYTES and not ctx.intended(e.rel)), reverse=True)
    if big:
        return Check(name, FAIL, f"{len(big)} large file(s): " + listing(f"{rel} ({human(size)})" for size, rel in big),
                     "move them out of the folder: everything in it is packed and uploaded with every deployment "
                     "(--allow PATTERN for a file the service really needs)")
    return Check(name, PASS, f"the largest file is {human(max((e.size for e in ctx.entries), default=0))}")


def check_folder_size(ctx: Context) -> Check:
    name = "folder size"
    total = sum(e.size for e in ctx.entries)
    files = sum(1 for e in ctx.entries if not e.is_dir)
    top: dict = {}
    for e in ctx.entries:
        first = e.rel.split("/")[0]
        top[first] = top.get(first, 0) + e.size
    biggest = ", ".join(f"{k} {human(v)}" for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:3])
    detail = f"{human(total)} in {files} files (largest: {biggest})"
    if total > FOLDER_WARN_BYTES:
        return Check(name, WARN, detail, "everything in the folder is packed and uploaded with each deployment: move "
                     "what the service does not need elsewhere")
    return Check(name, PASS, detail)
