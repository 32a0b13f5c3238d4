"""Ported from vLLM tests/entrypoints/openai/chat_completion/test_logprob_token_ids.py at commit
164670d45cbc1c6b080f09c896c5470310ebf7db and test_logprob_token_ids_validation.py at commit
002032ee2b18e1f7bd924ec47b62504ba3866063 (github.com/vllm-project/vllm), both whole modules.
The checks are re-expressed here with the synchronous OpenAI client (or HTTP posts where upstream validates its
request models directly) against this project's demo server, with these deliberate differences:

- logprob_token_ids (vLLM's fixed set of ids to score) is refused by name here (400 unsupported_parameter,
  docs/api.md), and so is return_tokens_as_token_ids: the test of the feature is skipped; the validation tests
  check the 400 naming logprob_token_ids for every form (vLLM's messages: "must not be an empty list", "when
  using logprob_token_ids"; here the one refusal); vLLM's /v1/chat/completions/batch is not served, so the
  batch request model's cases run on the chat endpoint only;
- a value that is not a list is a 400 too (upstream: pydantic's ValidationError).
"""

from __future__ import annotations

import pytest
import requests
from openai import OpenAI

from peer_server import server  # noqa: F401  (one demo server per module)

ENDPOINTS = {"chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
             "completion": ("/v1/completions", {"prompt": "hi"})}


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(api_key="dummy", base_url=server.base_url + "/v1", max_retries=0)


def refused(server, endpoint: str, **fields) -> None:
    path, base = ENDPOINTS[endpoint]
    response = requests.post(server.base_url + path, json={"model": "demo", "max_tokens": 1, **base, **fields},
                             timeout=60)
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["param"] == "logprob_token_ids"


def test_logprob_token_ids_returns_requested_ids(client):
    pytest.skip("logprob_token_ids (and return_tokens_as_token_ids) is refused by name (docs/api.md)")


def test_logprob_token_ids_default_behavior_unchanged(client):
    resp = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hello"}], max_tokens=1,
                                          temperature=0, logprobs=True, top_logprobs=5)
    entries = resp.choices[0].logprobs.content[0].top_logprobs
    assert len(entries) == 5
    for e in entries:
        assert e.logprob <= 0.0


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize("logprobs", [None, False, True])
def test_rejects_empty_token_ids(server, endpoint, logprobs):
    fields = {"logprob_token_ids": []}
    if logprobs is not None:  # the chat endpoint's logprobs is a bool; /v1/completions' a count
        fields["logprobs"] = logprobs if endpoint == "chat" else (1 if logprobs else None)
    refused(server, endpoint, **fields)


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_rejects_token_ids_without_logprobs(server, endpoint):
    refused(server, endpoint, logprob_token_ids=[100])


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize("val", [123, "123"])
def test_defers_non_list_to_pydantic(server, endpoint, val):
    path, base = ENDPOINTS[endpoint]
    response = requests.post(server.base_url + path, json={"model": "demo", "max_tokens": 1, **base,
                                                           "logprob_token_ids": val}, timeout=60)
    assert response.status_code == 400
