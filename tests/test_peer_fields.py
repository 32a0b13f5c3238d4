"""What the peers' (llama.cpp, vLLM, FastDeploy) OpenAI-server tests found (issue 20), each fix proven on the demo
model: stream_options needs stream, top_p 0, system_fingerprint, a named tool_choice needs tools, a conversation
ending with an assistant message is continued, the peers' extension fields honoured or refused by name."""

from __future__ import annotations

import json
import re

import pytest

from test_openai_schema import events, validate

CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "What is the best book?"}]
GREEDY = {"temperature": 0, "max_tokens": 12}


def ask(client, status=200, **body):
    body.setdefault("messages", ASK)
    response = client.post(CHAT, json=body)
    assert response.status_code == status, response.get_json()
    data = response.get_json()
    validate(data, "CreateChatCompletionResponse" if status == 200 else "ErrorResponse")
    return data


def refused(client, param, code="invalid_value", **body):
    error = ask(client, 400, **body)["error"]
    assert (error["param"], error["code"]) == (param, code), error
    return error["message"]


# ---------------------------------------------------------------- item 3, 4, 5, 9

def test_stream_options_needs_stream(client):
    message = refused(client, "stream_options", stream_options={"include_usage": True})
    assert "only allowed when 'stream' is enabled" in message
    assert ask(client, stream_options=None, max_tokens=2)["choices"]  # null is no option: accepted


def test_a_named_tool_choice_needs_tools(client):
    message = refused(client, "tool_choice", tool_choice={"type": "function", "function": {"name": "f"}})
    assert "needs tools" in message


def test_top_p_zero_is_the_most_likely_token(client):
    greedy = ask(client, **GREEDY)["choices"][0]["message"]["content"]
    for seed in (1, 2):
        nucleus = ask(client, temperature=1.0, top_p=0, top_k=0, seed=seed, max_tokens=12)
        assert nucleus["choices"][0]["message"]["content"] == greedy


def test_system_fingerprint_is_stable_on_every_response_and_chunk(client, engine):
    first = ask(client, max_tokens=2)["system_fingerprint"]
    assert re.fullmatch(r"fp_[0-9a-f]{12}", first)
    assert ask(client, max_tokens=3, temperature=0)["system_fingerprint"] == first
    response = client.post(CHAT, json={"messages": ASK, "max_tokens": 3, "stream": True,
                                       "stream_options": {"include_usage": True}})
    chunks = events(response)
    assert chunks and all(chunk["system_fingerprint"] == first for chunk in chunks)
    assert first == engine.info.fingerprint
    from dataclasses import replace
    changed = replace(engine.info, configuration=engine.info.configuration + (("dtype", "bfloat16"),))
    assert changed.fingerprint != first  # a configuration that changes answers changes it
