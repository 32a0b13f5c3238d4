"""Running the app: logging, the model loaded in the background, and waitress as the WSGI server.

The port is bound first and /health answers 503 until the model is ready, so a platform's
health check sees the service come up instead of a connection refused for minutes.
Waitress streams each server-sent event as it is written (send_bytes=1) and serves
concurrent connections from a thread pool; serving.web.connections holds it against idle, slow and
flooding clients, and serving.web.shutdown stops it on SIGTERM / SIGINT without dropping anyone.
A port that cannot be bound is one line in the log and exit status 2.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import threading

log = logging.getLogger("serving")


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build_engine(settings):
    """The engine BACKEND names: the model loaded here (paddle), the UPSTREAM servers once one answers
    (openai), or FastDeploy started as a child process once it is ready (fastdeploy)."""
    if settings.backend == "openai":
        from serving.engines.upstream import UpstreamEngine

        return UpstreamEngine.from_settings(settings)
    if settings.backend == "fastdeploy":
        from serving.engines.fastdeploy import start_fastdeploy

        return start_fastdeploy(settings)
    from serving.engines.builtin.engine import PaddleEngine
    from serving.engines.builtin.memory import tune_malloc
    from serving.model.loader import load_model

    tune_malloc()  # the model's large short-lived buffers go back to the system when freed (serving.engines.builtin.memory)
    engine = PaddleEngine(load_model(settings), max_batch_size=settings.max_batch_size,
                          max_batch_tokens=settings.max_batch_tokens, prefill_chunk_tokens=settings.prefill_chunk_tokens,
                          image_cache_bytes=settings.image_cache_mb * 2**20, cpu_threads=settings.cpu_threads,
                          prefix_cache_bytes=settings.prefix_cache_mb * 2**20 if settings.prefix_cache_mb >= 0 else -1,
                          grammar_cache_size=settings.grammar_cache_size, json_whitespace=settings.json_whitespace)
    engine.warm_up()  # /health says ok only for an engine that has answered
    return engine


def load_in_background(app, settings, on_failure=None, on_ready=None) -> threading.Thread:
    from serving.web.app import attach_engine
    from serving.model.loader import ModelLoadError

    def load():
        try:
            attach_engine(app, build_engine(settings))
            log.info("ready: http://%s:%d/v1/chat/completions", settings.host, settings.port)
            if on_ready is not None:
                on_ready()
        except ModelLoadError as exc:
            log.error("%s", exc)
            (on_failure or _exit)(2)
        except OSError as exc:
            if exc.errno not in _DISK_ERRORS:
                log.exception("loading the model failed")
                (on_failure or _exit)(1)
                return
            # a full or read-only disk at first start (the demo checkpoint, a download): the machine's
            # state, not a bug, so one line and exit status 2 like the other start-up errors
            where = f" ({exc.filename})" if exc.filename else ""
            log.error("could not start: %s%s while preparing the model; free disk space or point QWENVL_CACHE "
                      "(the demo checkpoint's folder) or the model folder to a writable disk", exc.strerror or exc,
                      where)
            (on_failure or _exit)(2)
        except Exception:
            log.exception("loading the model failed")
            (on_failure or _exit)(1)

    thread = threading.Thread(target=load, name="model-loader", daemon=True)
    thread.start()
    return thread


_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _exit(code: int) -> None:
    logging.shutdown()
    os._exit(code)  # the HTTP server holds the main thread: end the whole process


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests, notebooks and rehearsals on loopback)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_server(app, settings):
    """waitress on settings.host:settings.port, bound now (OSError when it cannot be), with the connection
    limits of serving.web.connections; its own early answers (413, bad request lines) are OpenAI-shaped JSON."""
    from serving.web import connections

    return connections.create(app, settings, send_bytes=1, ident="qwenvl-serving", recv_bytes=65536,
                              max_request_body_size=settings.max_request_bytes + 1,
                              # keep request bodies (base64 images) in memory: never spooled to a temp file
                              inbuf_overflow=settings.max_request_bytes + 1)


def shutdown(server, timeout: float = 30.0) -> None:
    """Stop a server made by make_server that runs in another thread.

    waitress keeps serving while any connection is open (clients keep idle ones), so close them
    all from the server's own loop, then stop its worker threads.
    """
    from serving.web.shutdown import close_connections

    close_connections(server)
    server.task_dispatcher.shutdown(timeout=timeout)


class BackgroundServer:
    """The app served by waitress from a thread of this process, on loopback: for tests,
    notebooks and benchmarks. The port is bound on creation, so requests sent right after
    start() wait in the listen queue instead of being refused."""

    def __init__(self, app, settings):
        from dataclasses import replace

        self.app = app
        self.settings = replace(settings, host="127.0.0.1", port=settings.port or free_port())
        self.server = make_server(app, self.settings)
        self.thread = threading.Thread(target=self.server.run, name="api-server", daemon=True)
        self.base_url = f"http://127.0.0.1:{self.settings.port}"

    def start(self) -> "BackgroundServer":
        self.thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        shutdown(self.server, timeout)
        self.thread.join(timeout)


def serve(app, settings) -> None:
    """Bind the port, load the model in the background, serve until SIGTERM or SIGINT, then stop gracefully
    (serving.web.shutdown) and end the process with status 0. A port that cannot be bound: exit status 2."""
    from serving.web.shutdown import Shutdown

    if settings.backend == "paddle":  # a --model that names nothing: said before the port is bound, like bad flags
        from serving.model.loader import model_problem

        problem = model_problem(settings.model)
        if problem:
            log.error("%s", problem)
            _exit(2)
    try:  # first: a port that cannot be bound is one line, before anything heavy is imported
        server = make_server(app, settings)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, bind_problem(exc, settings))
        _exit(2)
    stopper = Shutdown(app, server, settings.shutdown_grace).install()  # SIGTERM and SIGINT: a graceful stop
    if settings.backend == "paddle":
        import paddle  # noqa: F401  (imported on the main thread: Paddle's per-thread mode starts right)

        stopper.install()  # Paddle's import puts a SIGTERM handler of its own in place of ours
        reset = paddle.disable_signal_handler  # PaddleFormers' import calls it: SIGTERM back to the default

        def reset_then_ours():
            reset()
            if threading.current_thread() is threading.main_thread():
                stopper.install()

        paddle.disable_signal_handler = reset_then_ours
        import paddleformers  # noqa: F401

        stopper.install()
    log.info("listening on http://%s:%d (%s backend; model %s loading)", settings.host, int(server.effective_port),
             settings.backend, settings.model)
    # once loaded, the handlers again, from the main thread (the server's loop): loading may have replaced them
    load_in_background(app, settings, on_ready=lambda: server.trigger.pull_trigger(stopper.install))
    try:
        server.run()  # until the shutdown has answered everyone and closed every connection
        stopper.finish()
    finally:
        if settings.backend == "fastdeploy":  # stopping this process stops FastDeploy's, loaded or still loading
            from serving.engines.fastdeploy import stop_children

            stop_children()
    sys.stdout.flush()
    _exit(0)  # not the interpreter's own exit: Paddle's threads can abort it while it tears down


def bind_problem(exc: OSError, settings) -> str:
    """Why the port could not be bound, in words, with what to do."""
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return f"{settings.host!r} is not an address of this machine; choose another --host / HOST"
    if exc.errno == errno.EADDRINUSE:
        return (f"port {settings.port} is already in use (another server, or an earlier run still stopping?); "
                "stop it or choose another --port / PORT")
    if exc.errno == errno.EACCES:
        return f"permission denied for port {settings.port} (ports below 1024 need root); choose another --port / PORT"
    return exc.strerror or str(exc)

