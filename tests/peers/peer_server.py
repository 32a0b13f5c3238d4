"""The shared server of tests/peers (the peers' OpenAI-server tests, ported: issue 20): one demo server per module
(the session's demo engine, from tests/conftest.py, behind a live HTTP server), so the whole folder stays quick."""

from __future__ import annotations

from dataclasses import replace

import pytest

from serving.web.app import create_app
from serving.web.server import BackgroundServer


@pytest.fixture(scope="module")
def server(settings, engine):
    live = BackgroundServer(create_app(settings, engine), replace(settings, port=0)).start()
    yield live
    live.stop()
