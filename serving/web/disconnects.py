"""Answers whose client has gone: noticed while they are generated, and cancelled.

A stream notices its client leave when a write fails; a plain (non-streamed) answer writes nothing until
it is complete, so without this it ran to its end and held its MAX_QUEUE place for minutes after the
client hung up (16 clients gone after 50 ms held all 16 places for 4 minutes: everyone else got 429).
waitress, with `channel_request_lookahead` >= 1 (serving.web.connections sets it), keeps reading a
connection while its request runs and marks it disconnected at EOF; `environ["waitress.client_disconnected"]`
tells. One thread looks at every watched answer a few times a second and aborts the answers whose client
has gone with ClientGone (answered, and logged, as 499): the engine drops the row at its next step (an
upstream engine shuts its upstream connection), and the request's place is free as soon as its handler returns.
A client that shuts down only its sending side after its request (a half-close, rare in HTTP clients) reads the
same as one that left, as with uvicorn.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from serving.errors import ClientGone

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # how often the connections are looked at (a flag read each: no system call)


class DisconnectWatch:
    def __init__(self, poll_seconds: float = POLL_SECONDS):
        self.poll_seconds = poll_seconds
        self.cancelled = 0  # answers aborted because their client left (for tests and logs)
        self._watched: dict = {}  # id -> (client_disconnected, reply)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def watch(self, client_disconnected: Optional[Callable[[], bool]], reply) -> Callable[[], None]:
        """Abort `reply` if `client_disconnected()` turns true; returns the function that ends the watch
        (call it when the answer is over). Without a check (not waitress: a test client) nothing is watched."""
        if client_disconnected is None:
            return _nothing
        key = object()
        with self._lock:
            self._watched[key] = (client_disconnected, reply)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="disconnect-watch", daemon=True)
                self._thread.start()
        self._wake.set()
        return lambda: self._unwatch(key)

    def _unwatch(self, key) -> None:
        with self._lock:
            self._watched.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                watched = list(self._watched.items())
            if not watched:
                self._wake.wait()  # nothing to look at: sleep until something is watched
                self._wake.clear()
                continue
            for key, (gone, reply) in watched:
                try:
                    left = gone()
                except Exception:  # noqa: BLE001  (a channel torn down meanwhile: its client has gone too)
                    left = True
                if left and not reply.done:
                    self.cancelled += 1
                    reply.abort(ClientGone("the client closed the connection before the answer was complete"))
                    self._unwatch(key)
            time.sleep(self.poll_seconds)


def _nothing() -> None:
    pass
