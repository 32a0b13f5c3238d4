"""An earlier assistant turn whose tool call's arguments are not JSON (a call cut short by max_tokens, which this
server itself returns with finish_reason "length", sent back by an agent loop): the prompt holds a readable call,
the text as a JSON string. Written raw, '{' left '{"name": "f", "arguments": {}' in the prompt."""

from __future__ import annotations

import json
import re

import pytest

from serving import tools as tool_format
from serving.model.demo import PUBLISHED_CHAT_TEMPLATE
from serving.protocol import ChatTurn

CUT = ["{", "", '{"city": "Pa', "not json at all"]


def turns_with(arguments: str) -> list:
    return [ChatTurn("user", ["Weather?"]),
            ChatTurn("assistant", [""], tool_calls=[
                {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]),
            ChatTurn("user", ["Continue"])]


def calls_in(prompt: str) -> list:
    return [json.loads(body) for body in re.findall(r"<tool_call>\n(.*?)\n</tool_call>", prompt, re.S)]


@pytest.mark.parametrize("arguments", CUT)
def test_arguments_that_are_not_json_go_in_as_a_string_with_either_template(engine, monkeypatch, arguments):
    with_section = engine.build_prompt(turns_with(arguments)).text  # the demo's template writes the calls
    assert calls_in(with_section) == [{"name": "get_weather", "arguments": arguments}]
    monkeypatch.setattr(engine.processor, "chat_template", PUBLISHED_CHAT_TEMPLATE)
    assert not tool_format.template_knows_tools(engine._chat_template())
    assert engine.build_prompt(turns_with(arguments)).text == with_section  # the server writes them itself


def test_json_arguments_are_still_written_as_the_object(engine):
    prompt = engine.build_prompt(turns_with('{"city": "Paris"}')).text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt


def test_a_cut_call_sent_back_is_answered(client, engine):
    cut = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 40, "temperature": 0, "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]}).get_json()
    message = cut["choices"][0]["message"]
    assert cut["choices"][0]["finish_reason"] == "length" and message["tool_calls"]
    arguments = message["tool_calls"][0]["function"]["arguments"]
    assert arguments and not tool_format._is_json(arguments)  # cut short
    answer = client.post("/v1/chat/completions", json={"max_tokens": 4, "return_token_ids": True, "messages": [
        {"role": "user", "content": "Weather?"}, message, {"role": "user", "content": "Go on"}]})
    assert answer.status_code == 200, answer.get_json()
    prompt = engine.tokenizer.decode(answer.get_json()["prompt_token_ids"])
    assert calls_in(prompt) == [{"name": "get_weather", "arguments": arguments}]
