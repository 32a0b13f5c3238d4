"""Shared fixtures: the demo model loaded once, the Flask app, and a live server on a free port."""

from __future__ import annotations

import base64
import io
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.loopback import LoopbackServer  # noqa: E402
from serving.web.app import create_app  # noqa: E402
from serving.config import Settings  # noqa: E402
from serving.web.server import BackgroundServer, build_engine, free_port  # noqa: E402,F401




def png_bytes(size=(96, 64), color=(200, 30, 30), fmt="PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings(model="demo", host="127.0.0.1", port=0, default_max_tokens=16)


@pytest.fixture(scope="session")
def engine(settings):
    return build_engine(settings)


@pytest.fixture()
def no_prefix_cache(engine):
    """The shared engine with its prefix cache off for one test: for tests of the prefill's own work
    (chunks, lanes, the vision tower), which a prompt seen before would otherwise mostly skip."""
    saved = engine.prefix_cache.max_bytes
    engine.prefix_cache.max_bytes = 0
    yield engine
    engine.prefix_cache.max_bytes = saved


@pytest.fixture(scope="session")
def app(settings, engine):
    return create_app(settings, engine)


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def vocab_settings() -> Settings:
    """demo-vocab: Qwen's real tokenizer and 151,936-token vocabulary, in the published checkpoint form."""
    return Settings(model="demo-vocab", host="127.0.0.1", port=0, default_max_tokens=16)


@pytest.fixture(scope="session")
def vocab_engine(vocab_settings):
    return build_engine(vocab_settings)


@pytest.fixture()
def vocab_client(vocab_settings, vocab_engine):
    return create_app(vocab_settings, vocab_engine).test_client()


def LiveServer(app, settings):
    """The app on a free loopback port (the same BackgroundServer the notebook and benchmark use)."""
    return BackgroundServer(app, replace(settings, port=0))


@pytest.fixture(scope="session")
def live_server(app, settings):
    server = LiveServer(app, settings).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def serve_app(settings, engine):
    """serve_app(**setting_changes) -> a started LiveServer sharing the demo engine (engine=None: loading)."""
    servers = []

    def start(engine=engine, **changes):
        custom = replace(settings, **changes)
        server = LiveServer(create_app(custom, engine), custom).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries almost no data: a decompression-bomb header."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class ImageHost(LoopbackServer):
    """A local HTTP server with good and bad image URLs, on 127.0.0.1 (allow it: IMAGE_URL_ALLOW_HOSTS)."""

    def __init__(self):
        import http.server

        routes = self.routes()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                routes.get(self.path.split("?")[0], ImageHost.not_found)(self)

            def log_message(self, *args):
                pass

        super().__init__(Handler)

    @staticmethod
    def send(handler, status, body=b"", headers=(), length=True):
        handler.send_response(status)
        for name, value in headers:
            handler.send_header(name, value)
        if length:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        try:
            handler.wfile.write(body)
        except OSError:
            pass

    @staticmethod
    def not_found(handler):
        ImageHost.send(handler, 404, b"nope")

    def routes(self):
        send = ImageHost.send
        noise = _noise_png(300, 300)

        def slow(handler):  # headers, then a byte every 0.2 s for at most 3 s
            handler.send_response(200)
            handler.send_header("Content-Length", "100000")
            handler.end_headers()
            for _ in range(15):
                try:
                    handler.wfile.write(b"\0")
                    handler.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)

        def slow_headers(handler):  # the status line and headers a byte every 0.2 s, for at most 6 s
            line = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Padding: " + b"x" * 20
            for byte in line:
                try:
                    handler.wfile.write(bytes([byte]))
                    handler.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)

        def unsized_big(handler):  # no Content-Length (HTTP/1.0, ends at close): the cap must hold while reading
            send(handler, 200, noise, [("Content-Type", "image/png")], length=False)

        return {
            "/img.png": lambda h: send(h, 200, png_bytes((33, 22)), [("Content-Type", "image/png")]),
            "/big.png": lambda h: send(h, 200, noise, [("Content-Type", "image/png")]),
            "/big-unsized.png": unsized_big,
            "/bomb.png": lambda h: send(h, 200, png_header_only(20000, 20000), [("Content-Type", "image/png")]),
            "/page.html": lambda h: send(h, 200, b"<html>not an image</html>", [("Content-Type", "text/html")]),
            "/redirect": lambda h: send(h, 302, headers=[("Location", "/img.png")]),
            "/loop": lambda h: send(h, 302, headers=[("Location", "/loop")]),
            "/to-private": lambda h: send(h, 302, headers=[("Location", "http://10.0.0.1/x.png")]),
            "/to-metadata": lambda h: send(h, 301, headers=[("Location", "http://169.254.169.254/latest/meta-data/")]),
            "/slow.png": slow,
            "/slow-headers.png": slow_headers,
        }

def _noise_png(width, height) -> bytes:
    """Random pixels: a PNG that does not compress (about 3 bytes per pixel)."""
    import os

    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def image_server():
    host = ImageHost()
    yield host
    host.stop()
