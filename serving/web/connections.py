"""The HTTP server's connections, held against idle, slow and flooding clients.

waitress reads each request whole (headers and body) in its one I/O thread, with poll(), before a
worker thread sees it: a slow client costs a socket, never a worker. What it lacks is added here:

- a header time limit: a request whose headers have not all arrived HEADER_TIMEOUT seconds after
  its first byte is cut off (slowloris: headers trickled a byte at a time), and a body time limit
  (BODY_TIMEOUT after the headers);
- an idle time limit: a connection with no request running that receives nothing for IDLE_TIMEOUT
  seconds is closed (waitress's own channel_timeout, checked every second instead of every 30);
- a connection limit that never locks anyone out: at MAX_CONNECTIONS open connections waitress
  would stop accepting until one closes; here a new connection is always accepted and the one idle
  longest (no request running) is closed instead;
- poll() instead of select(), so more than 1024 sockets work, with the process's open-file limit
  raised to fit MAX_CONNECTIONS;
- `Expect: 100-continue` with a Content-Length over the body limit is answered 413 at once (waitress
  sends "100 Continue" and then waits for a body it will refuse);
- a connection is read on while its request runs (`channel_request_lookahead`), so a client that hangs
  up is seen at once (serving.web.disconnects cancels its answer);
- a streamed (chunked) answer keeps its connection open like any other: waitress closed it after every
  stream, dropping requests the client had pipelined behind it.

`create(app, settings)` makes the server; serving.web.server runs it.
"""

from __future__ import annotations

import logging
import resource
import time

from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import WSGITask

from serving.web.waitress_errors import JSONErrorChannel

log = logging.getLogger(__name__)

SPARE_FILES = 256  # open files kept free beside the connections (model files, image fetches, logs)
REPORT_SECONDS = 60  # connections cut off are summed up in the log this often, not logged one by one


class GuardedParser(HTTPRequestParser):
    """waitress's request parser, knowing when its request began."""

    def __init__(self, adj):
        super().__init__(adj)
        self.started = time.monotonic()  # made when the request's first bytes arrive
        self.headers_at = None  # when its headers were complete

    def received(self, data):
        consumed = super().received(data)
        if self.headers_finished and self.headers_at is None:
            self.headers_at = time.monotonic()
        if self.error is not None:
            # an error found in the headers (413 for a Content-Length over the limit): answer it now;
            # with expect_continue set waitress would send "100 Continue" and wait for the body
            self.expect_continue = False
        return consumed


class KeepAliveTask(WSGITask):
    """waitress's task, except that an HTTP/1.1 answer sent chunked (an SSE stream) does not close the connection:
    its end is marked by the last chunk, so the connection can carry the next request. (waitress closes it
    always; the requests a client pipelined behind a stream were then dropped.)"""

    def set_close_on_finish(self):
        chunked_end_is_marked = (self.version == "1.1" and self.chunked_response
                                 and self.request.headers.get("CONNECTION", "").lower() != "close")
        if chunked_end_is_marked and not self.close_on_finish:
            return
        super().set_close_on_finish()


class GuardedChannel(JSONErrorChannel):
    parser_class = GuardedParser
    task_class = KeepAliveTask


class GuardedServer(TcpWSGIServer):
    """waitress's TCP server with the limits above. `limits`: (max_connections, idle, header, body seconds)."""

    channel_class = GuardedChannel

    def __init__(self, application, *, limits, **kwargs):
        self.max_connections, self.idle_timeout, self.header_timeout, self.body_timeout = limits
        self.closed_idle = self.closed_slow = self.evicted = 0  # counts, for logs and tests
        self._reported = (0, 0)  # (slow, evicted) at the last summary in the log
        self._report_at = time.monotonic() + REPORT_SECONDS
        super().__init__(application, **kwargs)

    def readable(self):
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        return self.accepting  # always accept: handle_accept makes room at the limit

    def handle_accept(self):
        super().handle_accept()
        while sum(not c.will_close for c in self.active_channels.values()) > self.max_connections:
            if not self._evict_one():
                break

    def maintenance(self, now):
        """Close connections past their idle, header or body time limit (run about once a second)."""
        mono = time.monotonic()
        for channel in list(self.active_channels.values()):
            if channel.requests or channel.will_close:
                continue  # a request is running: its own limits (REQUEST_TIMEOUT) apply
            request = channel.request
            if request is not None and isinstance(request, GuardedParser):
                if request.headers_at is None and mono - request.started > self.header_timeout:
                    self.closed_slow += 1
                    self._close(channel, "its request headers took longer than HEADER_TIMEOUT")
                    continue
                if request.headers_at is not None and mono - request.headers_at > self.body_timeout:
                    self.closed_slow += 1
                    self._close(channel, "its request body took longer than BODY_TIMEOUT")
                    continue
            if now - channel.last_activity > self.idle_timeout:
                self.closed_idle += 1
                log.debug("closing the connection from %s: idle for %.1f s", _peer(channel), now - channel.last_activity)
                self._close(channel, None)
        if mono >= self._report_at:  # one line a minute at most, however many there were (an attack is many)
            self._report_at = mono + REPORT_SECONDS
            slow, evicted = self.closed_slow - self._reported[0], self.evicted - self._reported[1]
            if slow or evicted:
                log.warning("in the last %d s: %d connections cut off for sending too slowly (HEADER_TIMEOUT, "
                            "BODY_TIMEOUT), %d closed to make room past MAX_CONNECTIONS (%d open now)",
                            REPORT_SECONDS, slow, evicted, len(self.active_channels))
            self._reported = (self.closed_slow, self.evicted)

    def _evict_one(self) -> bool:
        """Close the connection idle longest that runs no request; False when every one is busy."""
        idle = [c for c in self.active_channels.values() if not c.requests and not c.will_close]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.last_activity)
        self.evicted += 1
        if self.evicted == 1:
            log.warning("%d open connections, more than MAX_CONNECTIONS (%d): closing the ones idle longest to "
                        "make room", len(self.active_channels), self.max_connections)
        self._close(victim, "closed to make room past MAX_CONNECTIONS")
        return True

    @staticmethod
    def _close(channel, why) -> None:
        """Mark the connection for closing: the loop closes it when it next polls it (writable). Closing it
        here, while poll() results are being handled, could free its descriptor for a connection accepted
        in the same round, which a stale event for the old one would then close (a reset for a new client)."""
        if why:
            log.debug("closing the connection from %s: %s", _peer(channel), why)
        channel.will_close = True


def _peer(channel) -> str:
    addr = getattr(channel, "addr", None)
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else str(addr)


def raise_file_limit(wanted: int) -> int:
    """Raise the soft limit on open files towards `wanted` (at most the hard limit); the limit now."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        return soft if soft != resource.RLIM_INFINITY else wanted
    except (ValueError, OSError):  # not allowed here: keep what there is
        return wanted


def create(app, settings, **adjustments):
    """The server for `app` on settings.host:settings.port (bound now; OSError when the port is taken)."""
    files = raise_file_limit(settings.max_connections + SPARE_FILES)
    max_connections = settings.max_connections
    if files - SPARE_FILES < max_connections:
        max_connections = max(16, files - SPARE_FILES)
        log.warning("MAX_CONNECTIONS lowered from %d to %d: the process may open only %d files",
                    settings.max_connections, max_connections, files)
    limits = (max_connections, settings.idle_timeout, settings.header_timeout, settings.body_timeout)
    return GuardedServer(app, limits=limits, host=settings.host, port=settings.port, threads=settings.threads,
                         asyncore_use_poll=True, cleanup_interval=1, channel_timeout=max(1, int(settings.idle_timeout)),
                         connection_limit=max_connections + 16, backlog=2048,
                         channel_request_lookahead=1,  # read on while a request runs: a hang-up is seen
                         **adjustments)
