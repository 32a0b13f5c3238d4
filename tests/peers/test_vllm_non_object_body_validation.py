"""Ported from vLLM tests/entrypoints/openai/chat_completion/test_non_object_body_validation.py at commit
5cc615108e9004ff7e26903f49a3aca62b1c8b18 (github.com/vllm-project/vllm), the whole module.
Upstream validates its ChatCompletionRequest model directly; here the same bodies are posted to this project's
demo server, whose HTTP layer parses and validates them, with these deliberate differences:

- the check is the HTTP answer (a 400 with OpenAI's error body, not a 500) rather than a pydantic ValidationError;
- cache_salt (vLLM's prefix-cache salt) has no counterpart here: that test is skipped.
"""

from __future__ import annotations

import json

import pytest
import requests

from peer_server import server  # noqa: F401  (one demo server per module)


@pytest.mark.parametrize("payload", ["this is not valid json{{{", ["not", "an", "object"], 42, None])
def test_chat_completion_request_rejects_non_object_body(server, payload):
    body = payload if isinstance(payload, str) else json.dumps(payload)
    response = requests.post(server.base_url + "/v1/chat/completions", data=body, timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}


def test_chat_completion_request_cache_salt_still_validated_on_dict(server):
    pytest.skip("vLLM-only: cache_salt salts vLLM's prefix cache; this server has no such field")
