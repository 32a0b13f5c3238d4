"""--backend fastdeploy: FastDeploy's OpenAI server as a supervised child process behind this server.

FastDeploy 2.x (PaddlePaddle/FastDeploy) serves Qwen2.5-VL on GPUs with continuous batching, a paged
KV cache, CUDA graphs, prefix caching and tensor parallelism. `start_fastdeploy(settings)`:

1. finds the model folder (the demo checkpoint, a local folder, or a hub id downloaded first) and
   prepares it as FastDeploy's Qwen2.5-VL guide asks: `"rope_3d": true, "freq_allocation": 16` in
   config.json. The user's folder is never changed: a folder under this project's cache holds the
   edited config.json and a symbolic link for every other file;
2. starts `python -m fastdeploy.entrypoints.openai.api_server` on free loopback ports (FastDeploy
   opens four: --port, --metrics-port, --engine-worker-queue-port, --cache-queue-port; its own
   defaults could collide) with flags from this server's settings (command() lists them) and
   ENABLE_V1_KVCACHE_SCHEDULER=1, in a process group of its own;
3. copies each line the child prints into this server's log, prefixed "[fastdeploy]";
4. waits until the child's GET /health answers 200 (this server's /health says "loading" meanwhile);
5. returns the upstream engine (serving.engines.upstream) pointed at it.

If the child dies later, /health turns 503 at once, the child's last lines are logged, and this
process exits non-zero (a platform then restarts the whole service) instead of serving a dead
engine. Stopping this server stops the child's whole process group (engine.close(), and
serving.web.server's SIGTERM handling through stop_children()).

FastDeploy itself needs Linux, an SM80/86/89/90 GPU and CUDA 12.3+ (serving.deploy.fastdeploy_env checks
that); it is not on PyPI. The tests run this launcher against a stand-in `fastdeploy` package.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import requests

from serving.model.loader import ModelLoadError
from serving.engines.upstream import UpstreamEngine

log = logging.getLogger(__name__)

MODULE = "fastdeploy.entrypoints.openai.api_server"
QWEN25_VL_CONFIG = {"rope_3d": True, "freq_allocation": 16}  # FastDeploy's Qwen2.5-VL guide
CHILD_ENV = {"ENABLE_V1_KVCACHE_SCHEDULER": "1"}
MAX_MODEL_LEN = 32768  # FASTDEPLOY_MAX_MODEL_LEN 0: the model's context, at most this (FastDeploy's own default is 2048)
MAX_NUM_SEQS = 32  # MAX_BATCH_SIZE 0: as the built-in engine on a GPU
TAIL_LINES = 40  # the child's last lines kept for the error when it dies
EXIT_DELAY = 2.0  # seconds /health answers 503 before this process exits after the child died
STOP_SECONDS = 30.0  # after SIGTERM, how long the child's group has before SIGKILL
LOG_PREFIX = "[fastdeploy] "


class FastDeployError(ModelLoadError):
    """FastDeploy could not be started; the message carries its last log lines."""


# ---------------------------------------------------------------- the model folder

def resolve_model_dir(settings) -> Path:
    """The local checkpoint folder MODEL names: the demo checkpoint, a folder, or a hub id (downloaded
    and verified first, into this project's cache)."""
    from serving.model.demo import demo_path, is_demo_name
    from serving.model.loader import is_hub_id

    model = settings.model
    if is_demo_name(model):
        return demo_path(model)
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        return path.resolve()
    if is_hub_id(model):
        from serving.model.download import download_model

        log.info("downloading %s from the %s hub for FastDeploy", model, settings.hub)
        return download_model(model, settings.hub)
    raise FastDeployError(f"model folder {model!r} does not exist. Pass the folder that holds config.json and the "
                          "*.safetensors files, a hub id such as Qwen/Qwen2.5-VL-3B-Instruct, or --model demo.")


def prepare_model_dir(source: Path, cache_root: Optional[Path] = None) -> Path:
    """`source` as FastDeploy needs it: config.json with QWEN25_VL_CONFIG. `source` itself when it has
    them already; otherwise a folder under the cache whose config.json is the edited copy and whose
    other entries are symbolic links to `source`'s (nothing is copied but config.json, nothing in
    `source` is written).

    Safe when several servers prepare the same folder at once (docs/backends.md's one-server-per-GPU example starts two):
    the prepared folder's name is a digest of everything in it (the source, its entries, the edited config), so
    a folder once made is never replaced or removed; each preparation builds in a temporary folder of its own
    and renames it into place, and the one that finds the place taken uses the folder already there. (It used to
    delete and replace the folder: 6 in 400 concurrent preparations failed with ENOTEMPTY, and 7 replaced a
    folder another had just returned.)"""
    from serving.model.demo import default_cache_dir

    source = Path(source).resolve()
    config_path = source / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FastDeployError(f"cannot read {config_path}: {exc}") from None
    if all(config.get(k) == v for k, v in QWEN25_VL_CONFIG.items()):
        return source
    config.update(QWEN25_VL_CONFIG)
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    names = sorted(e.name for e in source.iterdir() if e.name != "config.json")
    key = hashlib.sha256("\0".join([str(source), text, *names]).encode()).hexdigest()[:12]
    root = Path(cache_root) if cache_root else default_cache_dir() / "fastdeploy"
    target = root / f"{source.name}-{key}"
    if _prepared(source, target, text):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    try:
        for name in names:
            (tmp / name).symlink_to(source / name)
        (tmp / "config.json").write_text(text, encoding="utf-8")
        for attempt in range(2):
            try:
                os.rename(tmp, target)  # atomic; fails when the place is taken (by another preparation)
                break
            except OSError:
                if _prepared(source, target, text):
                    return target  # another preparation got there first: the same content
                if attempt:
                    raise
                aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=root))
                os.rename(target, aside / "folder")  # something else in the place (a crash's leftover): moved aside
                shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s for FastDeploy in %s (config.json with %s; every other file linked)", source, target,
             ", ".join(f"{k}={json.dumps(v)}" for k, v in QWEN25_VL_CONFIG.items()))
    return target


def _prepared(source: Path, target: Path, text: str) -> bool:
    """Whether `target` is a finished preparation of `source` with config `text`."""
    try:
        if (target / "config.json").read_text(encoding="utf-8") != text:
            return False
        wanted = {e.name for e in source.iterdir() if e.name != "config.json"}
        have = {e.name for e in target.iterdir() if e.name != "config.json"}
    except OSError:
        return False
    return wanted == have and all((target / n).resolve() == (source / n).resolve() for n in wanted)


def context_length(model_dir: Path) -> int:
    """The model's context (max_position_embeddings, of text_config where it has one), 0 when unknown."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    text = config.get("text_config") or {}
    value = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else 0


# ---------------------------------------------------------------- the command line

@dataclass(frozen=True)
class Ports:
    port: int  # its OpenAI server
    metrics_port: int
    engine_worker_queue_port: int
    cache_queue_port: int

    @classmethod
    def free(cls) -> "Ports":
        """Four distinct ports nothing listens on now (on loopback)."""
        import socket

        sockets = []
        try:
            for _ in range(4):  # all bound at once: four different ports
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                sockets.append(s)
            return cls(*(s.getsockname()[1] for s in sockets))
        finally:
            for s in sockets:
                s.close()


def visible_gpus(environ=None, run=subprocess.run) -> int:
    """GPUs FastDeploy would see: CUDA_VISIBLE_DEVICES when set, else nvidia-smi's list; at least 1."""
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return max(1, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    try:
        done = run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        count = sum(line.startswith("GPU ") for line in done.stdout.splitlines()) if done.returncode == 0 else 0
    except (OSError, subprocess.SubprocessError):
        count = 0
    return max(1, count)


def command(settings, model_dir: Path, ports: Ports, *, python: str = sys.executable, gpus: Optional[int] = None) -> list:
    """FastDeploy's command line, from this server's settings."""
    max_model_len = settings.fastdeploy_max_model_len or min(context_length(model_dir) or MAX_MODEL_LEN, MAX_MODEL_LEN)
    limits = {"image": settings.max_images, "video": getattr(settings, "max_videos", 1)}
    argv = [python, "-m", MODULE,
            "--model", str(model_dir),
            "--served-model-name", settings.model_name,
            "--host", "127.0.0.1",
            "--port", str(ports.port),
            "--metrics-port", str(ports.metrics_port),
            "--engine-worker-queue-port", str(ports.engine_worker_queue_port),
            "--cache-queue-port", str(ports.cache_queue_port),
            "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(settings.max_batch_size or MAX_NUM_SEQS),
            "--limit-mm-per-prompt", json.dumps(limits),
            "--tensor-parallel-size", str(settings.tensor_parallel or gpus or visible_gpus()),
            "--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    return argv + shlex.split(settings.fastdeploy_args or "")


def child_env(environ=None) -> dict:
    """The child's environment: ours without this server's own settings (API_KEY, PORT, MODEL, ... mean
    something else, or nothing, to FastDeploy), plus what FastDeploy needs for Qwen2.5-VL."""
    from dataclasses import fields

    from serving.config import Settings, env_name

    environ = dict(os.environ if environ is None else environ)
    for f in fields(Settings):
        environ.pop(env_name(f.name), None)
    environ.update(CHILD_ENV)
    environ["PYTHONUNBUFFERED"] = "1"  # its lines reach our log as they are printed
    return environ


# ---------------------------------------------------------------- the child process

_CHILDREN: list = []  # every Supervisor running now, for stop_children()
_CHILDREN_LOCK = threading.Lock()


def stop_children(timeout: float = STOP_SECONDS) -> None:
    """Stop every FastDeploy child this process started (on SIGTERM and at exit)."""
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
    for child in children:
        child.stop(timeout)


class Supervisor:
    """One child process in a process group of its own; its output goes into our log line by line."""

    def __init__(self, argv: list, env: dict, *, name: str = "fastdeploy", tail: int = TAIL_LINES):
        self.argv, self.env, self.name = argv, env, name
        self.lines: collections.deque = collections.deque(maxlen=tail)
        self.process: Optional[subprocess.Popen] = None
        self.on_death: Optional[Callable[[int, str], None]] = None  # set once the child is ready
        self.stopping = False
        self._pump: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the child from the thread that reads its output. That thread lives as long as the child,
        and Linux's parent-death signal follows the thread that forked: if this process is killed
        outright (SIGKILL, the OOM killer), the child gets SIGTERM instead of running on, orphaned."""
        log.info("starting %s: %s", self.name, shlex.join(self.argv))
        started = threading.Event()
        failure: list = []

        def run() -> None:
            try:
                self.process = subprocess.Popen(
                    self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent())
                with _CHILDREN_LOCK:
                    _CHILDREN.append(self)
            except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
                failure.append(exc)
                return
            finally:
                started.set()
            self._read()

        self._pump = threading.Thread(target=run, name=f"{self.name}-log", daemon=True)
        self._pump.start()
        started.wait()
        if failure:
            raise failure[0]

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self) -> str:
        return "\n".join(self.lines)

    def _read(self) -> None:
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.lines.append(line)
                log.info("%s%s", LOG_PREFIX, line)
        code = self.process.wait()
        with _CHILDREN_LOCK:
            if self in _CHILDREN:
                _CHILDREN.remove(self)
        if not self.stopping and self.on_death is not None:
            self.on_death(code, self.tail())

    def wait_ready(self, url: str, timeout: float) -> None:
        """Until GET `url` answers 200; FastDeployError (with the child's last lines) when the child exits
        first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        last_said = time.monotonic()
        while True:
            if not self.alive():
                self._pump.join(5)  # its last lines are in
                raise FastDeployError(f"FastDeploy exited with code {self.process.returncode} before it was ready; "
                                      f"its last lines:\n{self.tail() or '(nothing)'}")
            try:
                if requests.get(url, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            now = time.monotonic()
            if now > deadline:
                self.stop()
                raise FastDeployError(f"FastDeploy was not ready after {timeout:.0f} s (FASTDEPLOY_START_TIMEOUT); "
                                      f"its last lines:\n{self.tail() or '(nothing)'}")
            if now - last_said > 60:
                log.info("waiting for FastDeploy to load the model (%.0f s so far)", now - deadline + timeout)
                last_said = now
            time.sleep(0.5)

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """SIGTERM to the child's whole process group, SIGKILL after `timeout` seconds."""
        self.stopping = True
        if self.process is None:
            return
        if self.process.poll() is None:
            log.info("stopping %s (process group %d)", self.name, self.process.pid)
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s: killing it", self.name, timeout)
        _signal_group(self.process.pid, signal.SIGKILL)  # whatever of its group is left (its workers)
        self.process.wait()
        if self._pump is not None:
            self._pump.join(5)
        with _CHILDREN_LOCK:
            if self in _CHILDREN:
                _CHILDREN.remove(self)


def _die_with_parent() -> Optional[Callable[[], None]]:
    """A preexec_fn that asks Linux for SIGTERM when our forking thread dies (prctl PR_SET_PDEATHSIG),
    as Ray does for its workers; elsewhere nothing (None). Everything it calls is looked up here, before
    the fork, so the child only makes two system calls."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    set_pdeathsig, sigterm, getppid, exit_now = 1, int(signal.SIGTERM), os.getppid, os._exit

    def preexec() -> None:
        prctl(set_pdeathsig, sigterm, 0, 0, 0)
        if getppid() != parent:  # we died between the fork and the prctl
            exit_now(1)

    return preexec


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- the engine

class FastDeployEngine(UpstreamEngine):
    """The upstream engine on the supervised FastDeploy child; unhealthy for good once the child died."""

    def __init__(self, supervisor: Supervisor, url: str, *, model_dir: Path, **kwargs):
        tokenizer = Path(model_dir) / "tokenizer.json"
        super().__init__([url], tokenizer_file=str(tokenizer) if tokenizer.is_file() else None,
                         source=str(model_dir), **kwargs)
        self.supervisor = supervisor
        self.died: Optional[str] = None

    def health(self) -> tuple:
        if self.died is not None:
            return False, self.died
        return super().health()

    def stats(self) -> dict:
        return dict(super().stats(), fastdeploy_alive=self.supervisor.alive())

    def close(self, timeout: float = STOP_SECONDS) -> None:
        super().close(timeout)
        self.supervisor.stop(timeout)


def start_fastdeploy(settings, *, on_exit: Optional[Callable[[int], None]] = None, python: str = sys.executable,
                     cache_root: Optional[Path] = None) -> FastDeployEngine:
    """Start FastDeploy for `settings`, wait until it is ready, and return the engine in front of it.
    FastDeployError when it cannot start. Once running, its death calls `on_exit(1)` (default: end this
    process) after EXIT_DELAY seconds, /health answering 503 meanwhile."""
    model_dir = prepare_model_dir(resolve_model_dir(settings), cache_root)
    ports = Ports.free()
    supervisor = Supervisor(command(settings, model_dir, ports, python=python), child_env())
    supervisor.start()
    url = f"http://127.0.0.1:{ports.port}"
    supervisor.wait_ready(url + "/health", settings.fastdeploy_start_timeout)
    try:
        engine = FastDeployEngine(supervisor, url, model_dir=model_dir, served_model_name=settings.model_name,
                                  health_interval=settings.upstream_health_interval,
                                  image_format=settings.upstream_image_format, read_timeout=settings.request_timeout,
                                  pool_size=max(8, settings.threads))
        engine.start_checks(wait=True, timeout=120)
    except Exception as exc:
        supervisor.stop()
        raise FastDeployError(f"FastDeploy answered /health but not /v1/models: {exc}") from None
    from serving.model.demo import is_demo_name

    # what FastDeploy enforces (--max-model-len), and what this server knows of the model
    engine.info = replace(engine.info, context_length=int(command_value(supervisor.argv, "--max-model-len")),
                          is_demo=is_demo_name(settings.model))

    def died(code: int, tail: str) -> None:
        if engine.died is not None:
            return
        engine.died = f"FastDeploy exited with code {code}"
        log.error("FastDeploy exited with code %s; this server stops too (a platform restarts it). Its last "
                  "lines:\n%s", code, tail or "(nothing)")
        time.sleep(EXIT_DELAY)  # /health says 503 meanwhile
        (on_exit or _exit)(1)

    supervisor.on_death = died
    if not supervisor.alive():  # died between the checks and now
        died(supervisor.process.returncode, supervisor.tail())
    log.info("FastDeploy is ready at %s (model %s from %s)", url, engine.info.name, model_dir)
    return engine


def command_value(argv: list, flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _exit(code: int) -> None:
    from serving.web.server import _exit as exit_process

    stop_children(5)
    exit_process(code)
