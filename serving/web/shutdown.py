"""Stopping on SIGTERM or SIGINT without dropping anyone.

    stopper = Shutdown(app, server, grace=settings.shutdown_grace).install()
    server.run()        # returns once the shutdown has closed every connection
    stopper.finish()    # stops the model worker; the caller then exits 0

On the first signal:
1. the listening socket is closed: new connections are refused;
2. /health answers 503, and new chat requests on open connections and requests still waiting for
   the model get 503 `shutting_down` (with Retry-After);
3. answers being generated get SHUTDOWN_GRACE seconds to finish;
4. then the rest are ended: a stream with an error event (503 shutting_down) and [DONE], a request
   whose answer had not started with a 503;
5. the answers are flushed, every connection is closed and the server's loop ends.
A second signal ends what is left of the grace period at once. Each step is logged.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from waitress import wasyncore

from serving.errors import NotReady

log = logging.getLogger("serving")

FLUSH_SECONDS = 5.0  # after the grace period: time for ended answers to reach their clients
POLL_SECONDS = 0.05


class Shutdown:
    def __init__(self, app, server, grace: float):
        self.state = app.extensions["qwenvl"]
        self.server = server
        self.grace = max(0.0, float(grace))
        self.started = threading.Event()
        self.hurry = threading.Event()  # a second signal: no more grace
        self.done = threading.Event()
        self.thread = None

    def install(self) -> "Shutdown":
        """Handle SIGTERM and SIGINT (from the main thread)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.started.is_set():
            log.warning("%s again: ending the answers still running now", name)
            self.hurry.set()
            return
        log.warning("%s: shutting down; answers running now may take up to %g s to finish (SHUTDOWN_GRACE)",
                    name, self.grace)
        self.begin()

    def begin(self) -> None:
        """Start the shutdown in a thread of its own (a signal handler must not block)."""
        if self.started.is_set():
            return
        self.started.set()
        self.thread = threading.Thread(target=self.run, name="shutdown", daemon=True)
        self.thread.start()

    def run(self) -> None:
        try:
            self._run()
        except Exception:  # never leave the process half stopped
            log.exception("shutting down failed; closing every connection")
            close_connections(self.server)
        finally:
            self.done.set()

    def _run(self) -> None:
        server, service, admission = self.server, self.state.service, self.state.admission
        in_server_loop(server, lambda: _stop_listening(server))
        service.begin_shutdown()
        deadline = time.monotonic() + self.grace
        while admission.in_flight() and time.monotonic() < deadline and not self.hurry.is_set():
            time.sleep(POLL_SECONDS)
        running = admission.in_flight()
        if running:
            ended = service.end_all(NotReady(f"the server is shutting down: the answer was ended after the grace "
                                             f"period of {self.grace:g} seconds", code="shutting_down",
                                             retry_after=5))
            log.warning("shutdown: grace period over, ending %d answers still running", ended)
        else:
            log.info("shutdown: no answer running")
        flush_until = time.monotonic() + FLUSH_SECONDS
        while time.monotonic() < flush_until and (admission.in_flight() or _busy(server)):
            time.sleep(POLL_SECONDS)
        if admission.in_flight() or _busy(server):
            log.warning("shutdown: %d requests did not finish writing in %g s; closing their connections",
                        admission.in_flight(), FLUSH_SECONDS)
        close_connections(server)  # ends server.run()
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=FLUSH_SECONDS)

    def finish(self, timeout: float = 60.0) -> None:
        """After server.run() returned: wait for the shutdown thread, then stop the model worker, so the
        process never exits with the worker inside Paddle (which can abort it)."""
        if self.thread is not None:
            self.done.wait(FLUSH_SECONDS * 3 + self.grace)
        engine = self.state.service.engine
        if engine is not None:
            engine.close(timeout)
        log.info("stopped")


def _stop_listening(server) -> None:
    """Close the listening socket (in the server's loop): new connections are refused from now on."""
    server.accepting = False
    wasyncore.dispatcher.close(server)  # the listener only; the trigger and the connections stay


def close_connections(server) -> None:
    """Close every connection of a waitress server and its listener: its loop (server.run()) then ends."""
    in_server_loop(server, lambda: wasyncore.close_all(server._map, ignore_all=True))


def in_server_loop(server, thunk) -> None:
    """Run `thunk` in the server's I/O thread (its loop owns the sockets). When the loop's wake-up pipe is
    already closed (seen in a test run and once in CI right after SIGTERM: the loop is ending), run it
    from here."""
    try:
        server.trigger.pull_trigger(thunk)
    except OSError as exc:
        log.debug("shutdown: the server loop's wake-up pipe is closed (%s); acting from this thread", exc)
        thunk()


def _busy(server) -> bool:
    """Some connection still has a request running or output not yet sent."""
    dispatcher = server.task_dispatcher
    if dispatcher.queue or dispatcher.active_count:
        return True
    return any(channel.requests or channel.total_outbufs_len for channel in list(server.active_channels.values()))
