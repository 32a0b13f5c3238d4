"""tools, tool_choice, parallel_tool_calls and tool messages in the built-in engine, on the demo model.

The demo's random weights cannot call a tool on their own: every call below is valid only because the call
grammar masked each token (Qwen2.5's <tool_call> format, read back at the <tool_call> / </tool_call> token
ids). Every answer and chunk validates against the vendored OpenAI schemas."""

from __future__ import annotations

import json
from dataclasses import replace

import jsonschema
import pytest

from serving import tools as tool_format
from serving.model.demo import PUBLISHED_CHAT_TEMPLATE
from serving.protocol import ChatTurn
from serving.web.app import create_app
from test_openai_schema import events, validate

CHAT = "/v1/chat/completions"
WEATHER = {"type": "object", "properties": {
    "city": {"enum": ["Paris", "Rome", "Beijing"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "days", "unit"], "additionalProperties": False}
LOOKUP = {"type": "object", "properties": {"query": {"type": "string", "maxLength": 12}, "exact": {"type": "boolean"}},
          "required": ["query", "exact"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "lookup", "description": "Search notes", "parameters": LOOKUP}}]
SCHEMAS = {"get_weather": WEATHER, "lookup": LOOKUP}
ASK = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
SAMPLE = {"temperature": 1.0, "top_p": 1.0, "top_k": -1}


def ask(client, status=200, **body):
    body.setdefault("messages", ASK)
    body.setdefault("tools", TOOLS)
    response = client.post(CHAT, json=body)
    assert response.status_code == status, response.get_json()
    data = response.get_json()
    validate(data, "CreateChatCompletionResponse" if status == 200 else "ErrorResponse")
    return data


def valid_calls(choice) -> list:
    """The choice's calls, each checked: an id, a known function, arguments that validate."""
    assert choice["finish_reason"] == "tool_calls", choice
    message = choice["message"]
    assert message["content"] is None or "<tool_call>" not in message["content"]
    calls = message["tool_calls"]
    assert calls
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "function"
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    assert len({call["id"] for call in calls}) == len(calls)
    return calls


def tool_call_id(engine) -> int:
    return engine.tokenizer.convert_tokens_to_ids("<tool_call>")


def test_required_gives_valid_calls(client):
    """Parallel calls allowed: random weights may go on calling until max_tokens; every call but a last one cut
    short is whole and valid (a real model ends its turn)."""
    for extra in ({"temperature": 0}, *({"seed": seed, **SAMPLE} for seed in range(4))):
        choice = ask(client, tool_choice="required", max_tokens=160, **extra)["choices"][0]
        assert choice["message"]["content"] is None
        if choice["finish_reason"] == "length":
            choice = dict(choice, finish_reason="tool_calls", message=dict(
                choice["message"], tool_calls=choice["message"]["tool_calls"][:-1]))
            if not choice["message"]["tool_calls"]:
                continue
        valid_calls(choice)


def test_a_named_function_is_called_once(client):
    for extra in ({"temperature": 0}, {"seed": 3, **SAMPLE}):
        choice = ask(client, tool_choice={"type": "function", "function": {"name": "lookup"}}, max_tokens=120,
                     **extra)["choices"][0]
        calls = valid_calls(choice)
        assert [call["function"]["name"] for call in calls] == ["lookup"]


def test_parallel_tool_calls_false_gives_exactly_one_call(client):
    for seed in range(4):
        choice = ask(client, tool_choice="required", parallel_tool_calls=False, max_tokens=120, seed=seed,
                     **SAMPLE)["choices"][0]
        assert len(valid_calls(choice)) == 1


def test_auto_gives_free_text_or_valid_calls(client, engine):
    opening = str(tool_call_id(engine))
    text = ask(client, tool_choice="auto", max_tokens=24, temperature=0, logit_bias={opening: -100})["choices"][0]
    assert text["finish_reason"] in ("stop", "length") and "tool_calls" not in text["message"]
    assert "<tool_call>" not in text["message"]["content"]
    # the model's first token pushed to <tool_call>: from there on the grammar holds the call
    called = ask(client, tool_choice="auto", parallel_tool_calls=False, max_tokens=120, temperature=0,
                 logit_bias={opening: 100})["choices"][0]
    assert len(valid_calls(called)) == 1


def test_tools_with_a_response_format_give_json_or_calls(client):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    for seed in range(3):
        choice = ask(client, tool_choice="auto", response_format=fmt, parallel_tool_calls=False, max_tokens=120,
                     seed=seed, **SAMPLE)["choices"][0]
        if choice["finish_reason"] == "tool_calls":
            valid_calls(choice)
        else:
            assert choice["finish_reason"] == "stop"
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_streamed_calls_reassemble_to_the_non_streamed_calls(client):
    for extra in ({"tool_choice": "required", "seed": 5, **SAMPLE},  # several calls (until max_tokens, maybe)
                  {"tool_choice": "required", "parallel_tool_calls": False, "seed": 6, **SAMPLE},
                  {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "temperature": 0}):
        whole = ask(client, max_tokens=160, **extra)["choices"][0]
        chunks = events(client.post(CHAT, json=dict(messages=ASK, tools=TOOLS, max_tokens=160, stream=True, **extra)))
        calls: dict = {}
        for chunk in chunks:
            validate(chunk, "CreateChatCompletionStreamResponse")
            if not chunk["choices"]:
                continue
            delta = chunk["choices"][0]["delta"]
            assert "<tool_call>" not in (delta.get("content") or "")
            for piece in delta.get("tool_calls", []):
                if piece["index"] not in calls:  # the first piece of a call: id, type and name, once
                    assert piece["id"].startswith("call_") and piece["type"] == "function"
                    calls[piece["index"]] = {"id": piece["id"], "name": piece["function"]["name"], "arguments": ""}
                else:
                    assert "id" not in piece and "name" not in piece["function"]
                calls[piece["index"]]["arguments"] += piece["function"]["arguments"]
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
        streamed = [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]
        assert streamed == [(c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]]
        if "parallel_tool_calls" in extra or "function" in extra["tool_choice"]:
            assert len(valid_calls(whole)) == 1


def test_a_conversation_with_a_tool_result_is_answered(client, engine):
    messages = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3, "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 degrees"},
    ]
    data = ask(client, messages=messages, max_tokens=12, temperature=0)
    assert data["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    chunks = events(client.post(CHAT, json=dict(messages=messages, tools=TOOLS, max_tokens=12, temperature=0,
                                                stream=True)))
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    turns = [ChatTurn("system", ["Be brief."]), ChatTurn("user", [ASK[0]["content"]]),
             ChatTurn("assistant", [""], tool_calls=messages[2]["tool_calls"]),
             ChatTurn("tool", ["sunny, 21 degrees"], tool_call_id="call_1")]
    prompt = engine.build_prompt(turns, TOOLS).text
    assert "# Tools" in prompt and json.dumps(TOOLS[0], ensure_ascii=False) in prompt
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "unit": "celsius"}}\n'
            '</tool_call>') in prompt
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 degrees\n</tool_response><|im_end|>" in prompt


def test_a_template_without_tools_gets_the_same_prompt(engine, monkeypatch):
    """The published Qwen2.5-VL template has no tools section: the server writes Qwen2.5's text itself, the
    same prompt the demo's template (which has the section) writes."""
    turns = [ChatTurn("user", [ASK[0]["content"]]),
             ChatTurn("assistant", ["Let me check."], tool_calls=[
                 {"id": "a", "type": "function", "function": {"name": "lookup", "arguments": '{"query": "x"}'}},
                 {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]),
             ChatTurn("tool", ["one"], tool_call_id="a"), ChatTurn("tool", ["two"], tool_call_id="b")]
    with_section = engine.build_prompt(turns, TOOLS)
    monkeypatch.setattr(engine.processor, "chat_template", PUBLISHED_CHAT_TEMPLATE)
    assert not tool_format.template_knows_tools(engine._chat_template())
    without = engine.build_prompt(turns, TOOLS)
    assert without.text == with_section.text
    assert without.arrays["input_ids"].tolist() == with_section.arrays["input_ids"].tolist()


def test_calls_are_found_at_the_token_ids_not_in_the_text(engine):
    """`<tool_call>` spelled with ordinary tokens is text; only the single token opens a call."""
    from serving.engines.builtin.detokenize import IncrementalText

    reader = tool_format.CallReader(tool_call_id(engine), engine.tokenizer.convert_tokens_to_ids("</tool_call>"),
                                    lambda: IncrementalText(engine.tokenizer))
    spelled = engine.encode("<tool") + engine.encode("_call>")
    assert tool_call_id(engine) not in spelled
    assert all(reader.add(token) is None for token in spelled)
    assert reader.add(tool_call_id(engine)) == []
    pieces = []
    for token in engine.encode('\n{"name": "lookup", "arguments": {"query": "a}b", "exact": true}}\n'):
        pieces += reader.add(token)
    pieces += reader.add(engine.tokenizer.convert_tokens_to_ids("</tool_call>"))
    assert pieces[0].name == "lookup" and pieces[0].id.startswith("call_")
    assert "".join(p.arguments for p in pieces) == '{"query": "a}b", "exact": true}'
    assert reader.tool_calls()[0]["function"]["arguments"] == '{"query": "a}b", "exact": true}'


def test_the_deprecated_functions_form(client):
    choice = ask(client, tools=None, functions=[TOOLS[0]["function"]], function_call={"name": "get_weather"},
                 max_tokens=120, temperature=0)["choices"][0]
    assert [c["function"]["name"] for c in valid_calls(choice)] == ["get_weather"]


BAD = [
    ("an unknown named tool", dict(tool_choice={"type": "function", "function": {"name": "fly"}}), "tool_choice",
     "unknown_tool"),
    ("required without tools", dict(tools=None, tool_choice="required"), "tool_choice", "invalid_value"),
    ("an unsupported keyword", dict(tools=[TOOLS[0], {"type": "function", "function": {
        "name": "bad", "parameters": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}]),
     "tools[1].function.parameters", "unsupported_schema"),
    ("parameters that are not an object", dict(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string"}}}]), "tools[0].function.parameters", "invalid_value"),
    ("a bad function name", dict(tools=[{"type": "function", "function": {"name": "no spaces"}}]),
     "tools[0].function.name", "invalid_value"),
    ("two tools of one name", dict(tools=[TOOLS[0], TOOLS[0]]), "tools[1].function.name", "invalid_value"),
]


@pytest.mark.parametrize("name,extra,param,code", BAD, ids=[b[0] for b in BAD])
def test_bad_tool_requests_are_refused_before_the_engine(client, engine, monkeypatch, name, extra, param, code):
    started = []
    monkeypatch.setattr(engine, "start", lambda *a, **k: started.append(a))
    error = ask(client, 400, **extra)["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert not started


def test_max_tools_is_a_setting(settings, engine):
    client = create_app(replace(settings, max_tools=1), engine).test_client()
    error = ask(client, 400)["error"]
    assert (error["param"], error["code"]) == ("tools", "too_many_tools") and "MAX_TOOLS" in error["message"]
    valid_calls(ask(client, tools=TOOLS[:1], tool_choice="required", parallel_tool_calls=False, max_tokens=120,
                    temperature=0)["choices"][0])
