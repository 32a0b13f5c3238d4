"""Ported from vLLM tests/entrypoints/openai/test_optional_middleware.py at commit
00f3b164c9a4bc72504675537cf46c7d96f39964 (github.com/vllm-project/vllm), the whole module.
The checks are re-expressed here against this project's demo server (upstream serves an embedding model: the
middleware does not depend on it), started as upstream's variants are: without options, and with an API key
(vLLM's --api-key test is API_KEY=test here); each upstream assertion is kept, except this deliberate difference:

- X-Request-Id is always on here (a client's own id is echoed, otherwise a fresh 32-hex-digit one; vLLM needs
  --enable-request-id-headers): test_no_request_id_header checks the header is the server's fresh id instead of
  absent, and the two request-id tests run on the default server.
"""

from __future__ import annotations

import re
from dataclasses import replace
from http import HTTPStatus

import pytest
import requests

from peer_server import server  # noqa: F401  (one demo server per module)
from serving.web.app import create_app
from serving.web.server import BackgroundServer


@pytest.fixture(scope="module")
def keyed_server(settings, engine):
    keyed = replace(settings, port=0, api_key=("test",))
    live = BackgroundServer(create_app(keyed, engine), keyed).start()
    yield live
    live.stop()


def get(live, path, **headers):
    return requests.get(live.base_url + path, headers=headers, timeout=30)


def test_no_api_token(server):
    assert get(server, "/v1/models").status_code == HTTPStatus.OK


def test_no_request_id_header(server):
    # upstream: absent without --enable-request-id-headers; here always a fresh id
    assert re.fullmatch(r"[0-9a-f]{32}", get(server, "/health").headers["X-Request-Id"])


def test_missing_api_token(keyed_server):
    assert get(keyed_server, "/v1/models").status_code == HTTPStatus.UNAUTHORIZED


def test_passed_api_token(keyed_server):
    assert get(keyed_server, "/v1/models", Authorization="Bearer test").status_code == HTTPStatus.OK


def test_not_v1_api_token(keyed_server):
    assert get(keyed_server, "/health").status_code == HTTPStatus.OK  # only /v1 paths need the key


def test_enable_request_id_header(server):
    response = get(server, "/health")
    assert "X-Request-Id" in response.headers
    assert len(response.headers.get("X-Request-Id")) == 32


def test_custom_request_id_header(server):
    response = get(server, "/health", **{"X-Request-Id": "Custom"})
    assert "X-Request-Id" in response.headers
    assert response.headers.get("X-Request-Id") == "Custom"
