"""No silent semantic drops, on the demo model: request fields that would change the answer and that the engine
does not honour are refused with 400 unsupported_parameter naming the field and the backends that serve it
(shown with the demo engine declaring no features: the built-in engine honours them all, see
test_structured_output.py and test_tools.py); wrong types are a 400; fields that do not change the answer are
accepted and change nothing."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from serving.web.app import create_app
from serving.chat import FEATURES

CHAT = "/v1/chat/completions"
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
SCHEMA = {"name": "answer", "schema": {"type": "object", "properties": {"text": {"type": "string"}}}}


def say(**extra):
    return {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0, **extra}


UNSUPPORTED = [
    ("json_object", say(response_format={"type": "json_object"}), "response_format"),
    ("json_schema", say(response_format={"type": "json_schema", "json_schema": SCHEMA}), "response_format"),
    ("tools, tool_choice omitted", say(tools=[TOOL]), "tools"),
    ("tools, tool_choice auto", say(tools=[TOOL], tool_choice="auto"), "tools"),
    ("tools, tool_choice required", say(tools=[TOOL], tool_choice="required"), "tools"),
    ("tools, a named tool", say(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}),
     "tools"),
    ("functions (deprecated)", say(functions=[TOOL["function"]]), "functions"),
    ("a tool message", {"messages": [{"role": "user", "content": "Weather in Paris?"},
                                     {"role": "assistant", "content": None, "tool_calls": [CALL]},
                                     {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                                     {"role": "user", "content": "So?"}]}, "messages[1].tool_calls"),
    ("a tool message alone", {"messages": [{"role": "user", "content": "Weather in Paris?"},
                                           {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]},
     "messages[1].role"),
    ("logit_bias", say(logit_bias={"1234": -100}), "logit_bias"),
]


@pytest.fixture(scope="module")
def featureless(settings, engine):
    """A client of the demo engine declaring no features (as when structured output cannot be built)."""
    return create_app(settings, WithFeatures(engine, ())).test_client()


@pytest.mark.parametrize("name,body,param", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_semantics_are_refused(featureless, name, body, param):
    r = featureless.post(CHAT, json=body)
    assert r.status_code == 400, r.json
    error = r.json["error"]
    assert error["code"] == "unsupported_parameter" and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert "Paddle engine" in error["message"]
    assert "--backend openai" in error["message"] and "--backend fastdeploy" in error["message"]


WRONG_TYPES = [
    ("tools not a list", say(tools="notalist"), "tools"),
    ("a tool without a function", say(tools=[{"type": "function"}]), "tools[0].function"),
    ("a tool of unknown type", say(tools=[{"type": "magic", "function": {"name": "f"}}]), "tools[0].type"),
    ("tool_choice a number", say(tools=[TOOL], tool_choice=5), "tool_choice"),
    ("tool_choice an unknown word", say(tools=[TOOL], tool_choice="sometimes"), "tool_choice"),
    ("response_format a string", say(response_format="json"), "response_format"),
    ("response_format of unknown type", say(response_format={"type": "yaml"}), "response_format.type"),
    ("json_schema without a name", say(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
     "response_format.json_schema.name"),
    ("logit_bias a list", say(logit_bias=[1, 2]), "logit_bias"),
    ("logit_bias with a word for a token", say(logit_bias={"hello": 1}), "logit_bias"),
    ("logit_bias over 100", say(logit_bias={"12": 101}), "logit_bias.12"),
    ("a tool message without tool_call_id", {"messages": [{"role": "user", "content": "x"},
                                                          {"role": "tool", "content": "sunny"}]},
     "messages[1].tool_call_id"),
    ("metadata not an object", say(metadata="x"), "metadata"),
    ("store a word", say(store="perhaps"), "store"),
    ("parallel_tool_calls a word", say(parallel_tool_calls="maybe"), "parallel_tool_calls"),
    ("user a number", say(user=5), "user"),
]


@pytest.mark.parametrize("name,body,param", WRONG_TYPES, ids=[w[0] for w in WRONG_TYPES])
def test_wrong_types_are_refused(client, name, body, param):
    r = client.post(CHAT, json=body)
    assert r.status_code == 400, r.json
    assert r.json["error"]["code"] == "invalid_value" and r.json["error"]["param"] == param, r.json


def answer(client, body):
    r = client.post(CHAT, json=body)
    assert r.status_code == 200, r.json
    return r.json["choices"][0]["message"]["content"]


ACCEPTED = [
    ("identity and bookkeeping", dict(user="u-1", metadata={"team": "a"}, store=False, service_tier="auto",
                                      prompt_cache_key="k", safety_identifier="s")),
    ("parallel_tool_calls", dict(parallel_tool_calls=False)),
    ("tools that may not be called", dict(tools=[TOOL], tool_choice="none")),
    ("response_format text", dict(response_format={"type": "text"})),
    ("empty logit_bias", dict(logit_bias={})),
]


@pytest.mark.parametrize("name,extra", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_fields_that_do_not_change_the_answer_are_accepted(client, name, extra):
    assert answer(client, say(**extra)) == answer(client, say())


class WithFeatures:
    """The demo engine, declaring features the way an upstream engine does (serving.engines.base.ModelInfo)."""

    def __init__(self, engine, features):
        self._engine = engine
        self.info = replace(engine.info, features=frozenset(features))

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_an_engine_that_declares_a_feature_gets_the_field(settings, engine):
    client = create_app(settings, WithFeatures(engine, {"response_format", "logit_bias"})).test_client()
    assert client.post(CHAT, json=say(response_format={"type": "json_object"})).status_code == 200
    assert client.post(CHAT, json=say(logit_bias={"12": 5})).status_code == 200
    r = client.post(CHAT, json=say(tools=[TOOL]))  # not declared: still refused, naming the field
    assert r.status_code == 400 and r.json["error"]["param"] == "tools"


def test_backend_named_in_the_refusal(settings, engine):
    client = create_app(replace(settings, backend="openai"), WithFeatures(engine, ())).test_client()
    message = client.post(CHAT, json=say(logit_bias={"1": 1})).json["error"]["message"]
    assert "--backend openai" in message and "does not declare 'logit_bias'" in message


def test_the_built_in_engine_declares_every_feature(engine):
    assert engine.info.features == frozenset(FEATURES)


def test_stream_refusals_are_plain_json_errors(featureless):
    r = featureless.post(CHAT, json=say(stream=True, response_format={"type": "json_object"}))
    assert r.status_code == 400 and r.mimetype == "application/json"
    assert json.loads(r.get_data())["error"]["code"] == "unsupported_parameter"


def test_features_are_field_names():
    # the OpenAI fields, and three groups of the peers' extensions (serving.chat.unsupported_fields names each field)
    assert set(FEATURES) == {"response_format", "tools", "logit_bias", "prompt_ending", "peer_sampling",
                             "prompt_logprobs"}
