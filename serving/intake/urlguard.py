"""Fetching an image URL without letting a client reach inside the server's network.

http and https only; the host is resolved once and refused when any of its addresses is not
public (loopback, private, link-local, multicast, reserved, unspecified, shared, and the IPv4
hidden inside IPv6 forms); the connection goes to the vetted address itself, so a second DNS
answer cannot swap it (rebinding); every redirect is vetted again, a few at most; the body is
read with a size cap. The time limit covers the whole fetch, every phase of it: resolving, connecting,
the response headers and the body (a server that sends its headers a byte a second is cut off like one
that sends nothing: a watchdog shuts the socket down at the deadline); a TLS handshake is bounded by
the time limit of each of its reads. Hosts listed in `allow_hosts`
skip the address check (an internal image store, or a test server on 127.0.0.1).
"""

from __future__ import annotations

import concurrent.futures
import heapq
import ipaddress
import itertools
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import urllib3

MAX_REDIRECTS = 3
CHUNK = 64 * 1024
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_resolver = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="resolve")  # getaddrinfo has no timeout


class FetchError(Exception):
    def __init__(self, message: str, code: str = "image_fetch_failed"):
        super().__init__(message)
        self.message, self.code = message, code


def refused(message: str) -> FetchError:
    return FetchError(message, "image_url_refused")


@dataclass
class Target:
    url: str
    scheme: str
    host: str  # as written (brackets removed), lower case
    port: int
    address: str  # the vetted IP to connect to
    host_header: str
    path: str


def is_public(ip) -> bool:
    """True only for globally routable unicast addresses, looking inside IPv6 forms that embed IPv4."""
    ip = ipaddress.ip_address(ip)
    if ip.version == 6:
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d
            return is_public(ip.ipv4_mapped)
        embedded = [ip.sixtofour, *(ip.teredo or ())]
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.is_site_local or any(e is not None and not is_public(e) for e in embedded):
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local
                                 or ip.is_reserved or ip.is_unspecified)


def vet(url: str, allow_hosts=(), timeout: float = 10.0) -> Target:
    """Check one URL and resolve its host; FetchError(code="image_url_refused") when it may not be fetched."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise refused(f"the image URL is malformed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise refused(f"image URLs must be http or https, not {scheme or 'schemeless'!r}")
    if parts.username is not None or parts.password is not None:
        raise refused("image URLs must not carry credentials")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise refused("the image URL has no host")
    port = port or (443 if scheme == "https" else 80)
    addresses = _resolve(host, port, timeout)
    if not _allowed(host, allow_hosts):
        bad = [a for a in addresses if not is_public(a)]
        if bad:
            raise refused(f"the image URL's host {host!r} resolves to a non-public address ({bad[0]}); "
                          "this server fetches only from public addresses")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url, scheme, host, port, addresses[0], parts.netloc, path)


def fetch(url: str, *, timeout: float, max_bytes: int, allow_hosts=()) -> bytes:
    """The body at `url`, following at most MAX_REDIRECTS vetted redirects, within `timeout` overall
    (every phase included); FetchError when it cannot be had in time."""
    deadline = time.monotonic() + timeout
    with _watchdog.watch(deadline) as watch:
        for _ in range(MAX_REDIRECTS + 1):
            target = vet(url, allow_hosts, max(0.001, deadline - time.monotonic()))
            location = _get(target, timeout, deadline, max_bytes, watch)
            if isinstance(location, bytes):
                return location
            url = urljoin(target.url, location)
    raise FetchError(f"the image URL redirected more than {MAX_REDIRECTS} times")


def _allowed(host: str, allow_hosts) -> bool:
    wanted = {_canonical(h) for h in allow_hosts}
    return _canonical(host) in wanted


def _canonical(host: str) -> str:
    host = host.strip().strip("[]").rstrip(".").lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _resolve(host: str, port: int, timeout: float) -> list:
    future = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        raise FetchError(f"resolving the image URL's host {host!r} timed out") from None
    except (OSError, UnicodeError) as exc:
        raise FetchError(f"could not resolve the image URL's host {host!r} ({exc})") from None
    addresses = []
    for info in infos:
        address = info[4][0].split("%")[0]  # drop an IPv6 zone index
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise FetchError(f"the image URL's host {host!r} has no address")
    return addresses


def _get(target: Target, timeout: float, deadline: float, max_bytes: int, watch: "_Watch"):
    """GET from the pinned address: the body (bytes), or the Location (str) of a redirect."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _timed_out(timeout)
    limits = urllib3.Timeout(connect=min(timeout, remaining), read=min(timeout, remaining))
    if target.scheme == "https":
        pool = urllib3.HTTPSConnectionPool(target.address, target.port, timeout=limits, retries=False, maxsize=1,
                                           server_hostname=target.host, assert_hostname=target.host,
                                           cert_reqs="CERT_REQUIRED", ca_certs=_ca_bundle(), watch=watch)
        pool.ConnectionCls = _WatchedHTTPSConnection
    else:
        pool = urllib3.HTTPConnectionPool(target.address, target.port, timeout=limits, retries=False, maxsize=1,
                                          watch=watch)
        pool.ConnectionCls = _WatchedHTTPConnection
    headers = {"Host": target.host_header, "User-Agent": "qwenvl-serving", "Accept": "image/*",
               "Accept-Encoding": "identity"}
    try:
        with pool:
            response = pool.urlopen("GET", target.path, headers=headers, redirect=False, retries=False,
                                    preload_content=False, assert_same_host=False)
            try:
                return _read(response, deadline, max_bytes)
            finally:
                response.release_conn()
    except FetchError:
        if watch.expired:
            raise _timed_out(timeout) from None
        raise
    except Exception as exc:  # urllib3/http.client/ssl errors: a fetch failure, not a server fault
        if watch.expired or time.monotonic() >= deadline:
            raise _timed_out(timeout) from None
        raise FetchError(f"could not fetch the image URL: {type(exc).__name__}") from None


def _timed_out(timeout: float) -> FetchError:
    return FetchError(f"fetching the image URL took longer than this server's limit of {timeout:g} seconds "
                      "(IMAGE_FETCH_TIMEOUT)")


def _read(response, deadline: float, max_bytes: int):
    if response.status in (301, 302, 303, 307, 308):
        location = response.headers.get("Location")
        if not location:
            raise FetchError(f"the image URL answered HTTP {response.status} without a Location")
        return location
    if response.status >= 300:
        raise FetchError(f"fetching the image URL gave HTTP {response.status}")
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(f"the image at the URL is {declared} bytes, more than the limit of {max_bytes}",
                         "image_too_large")
    chunks, size = [], 0
    while chunk := response.read1(CHUNK):  # whatever has arrived, so the deadline is checked often
        size += len(chunk)
        if size > max_bytes:
            raise FetchError(f"the image at the URL is larger than the limit of {max_bytes} bytes", "image_too_large")
        if time.monotonic() > deadline:
            raise FetchError("fetching the image URL timed out (IMAGE_FETCH_TIMEOUT)")
        chunks.append(chunk)
    return b"".join(chunks)


def _ca_bundle():
    try:
        import certifi

        return certifi.where()
    except ImportError:  # the system's default certificates
        return None


# ---------------------------------------------------------------- the deadline of every phase

class _Watch:
    """The sockets of one fetch, shut down when its deadline passes (a blocked read or handshake returns)."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.expired = False
        self.done = False
        self._sockets: list = []
        self._lock = threading.Lock()

    def add(self, sock) -> None:
        with self._lock:
            self._sockets.append(sock)
            late = self.expired
        if late:
            _shut(sock)

    def expire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with self._lock:
            self.done = True
            self._sockets.clear()
        _watchdog.forget(self)


def _shut(sock) -> None:
    try:  # the plain socket's shutdown (an SSLSocket's own would touch its TLS state from this thread)
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # closed already


class _Watchdog:
    """One thread that expires watches at their deadlines (time.monotonic())."""

    def __init__(self):
        self._heap: list = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread = None

    def watch(self, deadline: float) -> _Watch:
        watch = _Watch(deadline)
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._order), watch))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        return watch

    def forget(self, watch: _Watch) -> None:
        with self._cond:
            self._heap = [entry for entry in self._heap if entry[2] is not watch]
            heapq.heapify(self._heap)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, watch = heapq.heappop(self._heap)
            watch.expire()


_watchdog = _Watchdog()


class _Watched:
    """Mixed into a urllib3 connection: its socket joins its fetch's watch as soon as it exists."""

    def __init__(self, *args, watch: _Watch, **kwargs):
        super().__init__(*args, **kwargs)
        self._watch = watch

    def _new_conn(self):
        sock = super()._new_conn()
        self._watch.add(sock)
        return sock


class _WatchedHTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    """The same over TLS. The TLS socket replaces the plain one (detached, so shutting that down does
    nothing): it joins the watch once the handshake is done; the handshake itself is bounded by the
    connect time limit of each of its reads."""

    def connect(self):
        super().connect()
        self._watch.add(self.sock)
