"""Ported from vLLM tests/entrypoints/openai/chat_completion/test_tool_choice_null.py at commit
689fb8326cc24cc1a65d1eb72f789e124a3c35b7 (github.com/vllm-project/vllm), the whole module.
Upstream validates its ChatCompletionRequest model directly and reads the parsed tool_choice; here each body is
posted to this project's demo server, with this deliberate difference:

- the parsed field is not visible over HTTP, so "null means the same as absent" is checked on the answers: the
  greedy answer to a request with "tool_choice": null equals the one without the key (auto when tools are
  present), null beside structured_outputs is answered (no conflict), and the invalid forms are 400s.
"""

from __future__ import annotations

import pytest
import requests

from peer_server import server  # noqa: F401  (one demo server per module)

MESSAGES = [{"role": "user", "content": "what is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
GREEDY = {"temperature": 0, "max_tokens": 8}


def post(server, body):
    return requests.post(server.base_url + "/v1/chat/completions", json={"messages": MESSAGES, **GREEDY, **body},
                         timeout=60)


def answer(response) -> tuple:
    assert response.status_code == 200, response.json()
    choice = response.json()["choices"][0]
    return choice["message"].get("content"), choice["message"].get("tool_calls"), choice["finish_reason"]


def test_null_tool_choice_defaults_to_auto_like_an_absent_one(server):
    omitted = answer(post(server, {"tools": TOOLS}))
    explicit_null = answer(post(server, {"tools": TOOLS, "tool_choice": None}))
    auto = answer(post(server, {"tools": TOOLS, "tool_choice": "auto"}))
    assert omitted == auto
    assert explicit_null == omitted


def test_null_tool_choice_without_tools_matches_an_absent_one(server):
    assert answer(post(server, {"tool_choice": None})) == answer(post(server, {}))


def test_null_tool_choice_does_not_conflict_with_structured_outputs(server):
    response = post(server, {"structured_outputs": {"json": {"type": "object"}}, "tool_choice": None,
                             "max_tokens": 32})
    assert response.status_code == 200, response.json()


@pytest.mark.parametrize("tool_choice,tools", [("bogus", TOOLS), ("auto", None)])
def test_invalid_tool_choice_is_still_rejected(server, tool_choice, tools):
    body = {"tool_choice": tool_choice}
    if tools is not None:
        body["tools"] = tools
    response = post(server, body)
    assert response.status_code == 400
    assert response.json()["error"]["param"].startswith("tool_choice")


def test_explicit_none_tool_choice_is_untouched(server):
    content, tool_calls, _ = answer(post(server, {"tools": TOOLS, "tool_choice": "none"}))
    assert tool_calls is None and content is not None
