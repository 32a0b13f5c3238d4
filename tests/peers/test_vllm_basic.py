"""Ported from vLLM tests/entrypoints/openai/basic/test_basic.py at commit 35daaf4dd032917896c665abc01dedd7bb4a0ad8
(github.com/vllm-project/vllm), the whole module.
The checks are re-expressed here with the synchronous OpenAI client against this project's demo server; each
upstream assertion is kept, except these deliberate differences:

- no frontend-multiprocessing variants (a vLLM CLI flag): each test runs once, on the one server;
- /version reports vLLM's own version and /load needs vLLM's --enable-server-load-tracking: neither is served
  here, so those two tests are skipped (the in-flight count is the qwenvl_requests_in_flight gauge of /metrics);
- request cancellation sends 8 clients that give up after 0.5 s, not 200: MAX_QUEUE (16) answers 429 beyond it,
  which would hide the timeouts upstream's test asserts;
- the dead-engine health check calls /health on an engine whose worker reports itself stopped (vLLM's test
  mocks its EngineDeadError inside its own health handler).
"""

from __future__ import annotations

import threading
import time

import openai
import pytest
import requests
from openai import OpenAI

from peer_server import server  # noqa: F401  (one demo server per module)
from serving.web.app import create_app

CHAT_INPUT = [{"role": "user", "content": "Write a long story"}]


def test_show_version(server):
    pytest.skip("vLLM-only endpoint: /version reports vLLM's own version; this server does not serve it")


def test_check_health(server):
    response = requests.get(server.base_url + "/health", timeout=10)
    assert response.status_code == 200


def test_request_cancellation(server):
    impatient = OpenAI(api_key="dummy", base_url=server.base_url + "/v1", max_retries=0, timeout=0.5)
    outcomes = []

    def ask():
        try:
            impatient.chat.completions.create(model="demo", messages=CHAT_INPUT, max_tokens=4000,
                                              extra_body={"min_tokens": 4000})
            outcomes.append("answered")
        except Exception as caught:  # noqa: BLE001  (the test asserts on the kind below)
            outcomes.append(caught)

    clients = [threading.Thread(target=ask) for _ in range(8)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    # every request reached the server and timed out (a 400 or 429 would make this test prove nothing)
    assert len(outcomes) == 8
    for outcome in outcomes:
        assert isinstance(outcome, openai.APITimeoutError), outcome

    # had the server kept generating those 8 answers of 4000 tokens, this one would wait behind them
    patient = OpenAI(api_key="dummy", base_url=server.base_url + "/v1", max_retries=0, timeout=5)
    response = patient.chat.completions.create(model="demo", messages=CHAT_INPUT, max_tokens=10)
    assert len(response.choices) == 1


def test_request_wrong_content_type(server):
    client = OpenAI(api_key="dummy", base_url=server.base_url + "/v1", max_retries=0)
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="demo", messages=CHAT_INPUT, max_tokens=10000,
                                       extra_headers={"Content-Type": "application/x-www-form-urlencoded"})


def test_server_load(server):
    pytest.skip("vLLM CLI flag: /load needs --enable-server-load-tracking; this server counts requests in "
                "flight in /metrics (qwenvl_requests_in_flight) instead")


def test_health_check_engine_dead_error(settings, engine, monkeypatch):
    # the engine's worker has died: health must say so with 503, as vLLM's does for EngineDeadError
    monkeypatch.setattr(engine, "health", lambda: (False, "the model worker has stopped"))
    response = create_app(settings, engine).test_client().get("/health")
    assert response.status_code == 503


def test_request_cancellation_frees_the_batch(server, engine):
    """Beside upstream's check: the abandoned requests leave the running batch soon after their clients go."""
    deadline = time.monotonic() + 10
    while engine.scheduler.rows_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.scheduler.rows_running() == 0
