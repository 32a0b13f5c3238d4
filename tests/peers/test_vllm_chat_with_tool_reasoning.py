"""Ported from vLLM tests/entrypoints/openai/chat_completion/test_chat_with_tool_reasoning.py at commit
41c5903d049b80b83a6e570f52f0f55e31316e49 (github.com/vllm-project/vllm), the whole module.
Upstream serves QwQ-32B with vLLM's deepseek_r1 reasoning parser and hermes tool parser (Qwen2.5's tool format,
which this server writes and reads: serving/tools.py). The checks are re-expressed here with the synchronous
OpenAI client against this project's demo server, with these deliberate differences:

- Qwen2.5-VL has no reasoning (no <think> section, no reasoning parser here): the assertions on `reasoning` are
  skipped, each upstream test as a whole (its exact arguments for Dallas need the model's meaning too);
- what is left, the tool call's protocol, is checked in a companion test: the demo model does not choose to call a
  tool, so the call is forced with a named tool_choice, the schema's strings are bounded (maxLength 8, no
  additional properties) so the random arguments close within max_tokens 200 (upstream sends none; this server's
  test default is 16), and the arguments are checked to be JSON naming city, state and a unit of the enum
  (upstream: exactly {"city": "Dallas", "state": "TX", "unit": "fahrenheit"}).
"""

from __future__ import annotations

import json

import pytest
from openai import OpenAI

from peer_server import server  # noqa: F401  (one demo server per module)

REASONING = ("needs a reasoning model (QwQ's <think> section and vLLM's --reasoning-parser; Qwen2.5-VL has none) "
             "and the model's meaning (Dallas, TX, fahrenheit); the tool call's protocol is checked beside it")
FUNC_NAME = "get_current_weather"
TOOLS = [{"type": "function", "function": {
    "name": FUNC_NAME, "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8,
                 "description": "The city to find the weather for, e.g. 'San Francisco'"},
        "state": {"type": "string", "maxLength": 8, "description": "the two-letter abbreviation for the state that "
                  "the city is in, e.g. 'CA' which would mean 'California'"},
        "unit": {"type": "string", "description": "The unit to fetch the temperature in",
                 "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "state", "unit"], "additionalProperties": False}}}]
MESSAGES = [{"role": "user", "content": "Hi! How are you doing today?"},
            {"role": "assistant", "content": "I'm doing well! How can I help you?"},
            {"role": "user", "content": "Can you tell me what the temperate will be in Dallas, in fahrenheit?"}]
FORCED = {"tool_choice": {"type": "function", "function": {"name": FUNC_NAME}}, "parallel_tool_calls": False,
          "max_tokens": 200}


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(api_key="dummy", base_url=server.base_url + "/v1", max_retries=0)


def extract_reasoning_and_calls(chunks: list):
    reasoning, tool_call_idx, arguments, function_names = "", -1, [], []
    for chunk in chunks:
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta is not None and delta.tool_calls:
            tool_call = delta.tool_calls[0]
            if tool_call.index != tool_call_idx:
                tool_call_idx = tool_call.index
                arguments.append("")
                function_names.append("")
            if tool_call.function:
                if tool_call.function.name:
                    function_names[tool_call_idx] = tool_call.function.name
                if tool_call.function.arguments:
                    arguments[tool_call_idx] += tool_call.function.arguments
        elif delta is not None and getattr(delta, "reasoning", None):
            reasoning += delta.reasoning
    return reasoning, arguments, function_names


def assert_weather_arguments(arguments: str) -> None:
    parsed = json.loads(arguments)
    assert set(parsed) == {"city", "state", "unit"}
    assert parsed["unit"] in ("celsius", "fahrenheit")


def test_chat_streaming_of_tool_and_reasoning(client):
    pytest.skip(REASONING)


def test_chat_full_of_tool_and_reasoning(client):
    pytest.skip(REASONING)


def test_chat_streaming_of_tool_call_form(client):
    chunks = list(client.chat.completions.create(model="demo", messages=MESSAGES, tools=TOOLS, temperature=0.0,
                                                 stream=True, **FORCED))
    reasoning, arguments, function_names = extract_reasoning_and_calls(chunks)
    assert reasoning == ""  # no reasoning model here
    assert len(function_names) > 0 and function_names[0] == FUNC_NAME
    assert len(arguments) > 0
    assert_weather_arguments(arguments[0])


def test_chat_full_of_tool_call_form(client):
    tool_calls = client.chat.completions.create(model="demo", messages=MESSAGES, tools=TOOLS, temperature=0.0,
                                                stream=False, **FORCED)
    assert tool_calls.choices[0].message.tool_calls[0].function.name == FUNC_NAME
    assert_weather_arguments(tool_calls.choices[0].message.tool_calls[0].function.arguments)
