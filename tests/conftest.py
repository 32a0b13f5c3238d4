"""Shared fixtures: the demo model loaded once, the Flask app, and a live server on a free port."""

from __future__ import annotations

import base64
import io
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serving.app import create_app  # noqa: E402
from serving.config import Settings  # noqa: E402
from serving.server import build_engine, make_server  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture(scope="session")
def app(settings, engine):
    return create_app(settings, engine)


@pytest.fixture()
def client(app):
    return app.test_client()


class LiveServer:
    def __init__(self, app, settings):
        from dataclasses import replace

        self.settings = replace(settings, port=free_port())
        self.server = make_server(app, self.settings)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = f"http://127.0.0.1:{self.settings.port}"

    def start(self):
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if requests.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("live server did not come up")

    def stop(self):
        self.server.close()


@pytest.fixture(scope="session")
def live_server(app, settings):
    server = LiveServer(app, settings).start()
    yield server
    server.stop()
