"""Running the app: logging, the model loaded in the background, and waitress as the WSGI server.

The port is bound first and /health answers 503 until the model is ready, so a platform's
health check sees the service come up instead of a connection refused for minutes.
Waitress streams each server-sent event as it is written (send_bytes=1) and serves
concurrent connections from a thread pool.
"""

from __future__ import annotations

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
    """Load the model named by the settings and wrap it in an engine."""
    from .engine import PaddleEngine
    from .model import load_model

    return PaddleEngine(load_model(settings), max_batch_size=settings.max_batch_size,
                        max_batch_tokens=settings.max_batch_tokens, prefill_chunk_tokens=settings.prefill_chunk_tokens,
                        image_cache_bytes=settings.image_cache_mb * 2**20, cpu_threads=settings.cpu_threads)


def load_in_background(app, settings, on_failure=None) -> threading.Thread:
    from .app import attach_engine
    from .model import ModelLoadError

    def load():
        try:
            attach_engine(app, build_engine(settings))
            log.info("ready: http://%s:%d/v1/chat/completions", settings.host, settings.port)
        except ModelLoadError as exc:
            log.error("%s", exc)
            (on_failure or _exit)(2)
        except Exception:
            log.exception("loading the model failed")
            (on_failure or _exit)(1)

    thread = threading.Thread(target=load, name="model-loader", daemon=True)
    thread.start()
    return thread


def _exit(code: int) -> None:
    logging.shutdown()
    os._exit(code)  # the HTTP server holds the main thread: end the whole process


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests, notebooks and rehearsals on loopback)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_server(app, settings):
    from waitress import create_server

    from .waitress_errors import use_json_errors

    server = create_server(app, host=settings.host, port=settings.port, threads=settings.threads,
                           send_bytes=1, channel_timeout=600, ident="qwenvl-serving",
                           max_request_body_size=settings.max_request_bytes + 1,
                           # keep request bodies (base64 images) in memory: never spooled to a temp file
                           inbuf_overflow=settings.max_request_bytes + 1)
    use_json_errors(server)  # waitress's own early answers (413, bad request lines) in OpenAI's shape too
    return server


def shutdown(server, timeout: float = 30.0) -> None:
    """Stop a server made by make_server that runs in another thread.

    waitress keeps serving while any connection is open (clients keep idle ones), so close them
    all from the server's own loop, then stop its worker threads.
    """
    from waitress import wasyncore

    server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
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
    """Bind the port, load the model in the background, serve until stopped."""
    import paddle  # noqa: F401  (imported on the main thread: Paddle's per-thread mode starts right)

    server = make_server(app, settings)
    log.info("listening on http://%s:%d (model %s loading)", settings.host, settings.port, settings.model)
    load_in_background(app, settings)
    try:
        server.run()
    except KeyboardInterrupt:
        log.info("stopped")
