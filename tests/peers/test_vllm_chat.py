"""Ported from vLLM tests/entrypoints/openai/test_chat.py at commit 0091c9502ffb9f6761588a21b8d917db8ede4990
(github.com/vllm-project/vllm), the whole module.
The checks are re-expressed here with the synchronous OpenAI client against this project's demo server; each
upstream assertion is kept, except these deliberate differences (docs/api.md, "Differences from the peers' tests"):

- no LoRA adapters and no V0/V1 engines: each test runs once, on the one model;
- exact prompt token counts of zephyr-7b's tokenizer (prompt_tokens=37) are not checked;
- prompt_logprobs: when not asked for, the response has no prompt_logprobs field (vLLM's is null): read with
  getattr; at a prompt position the map holds the k most likely tokens and the prompt's own token, so k entries
  when that token is among them and k + 1 when not, which depends on the model's meaning (upstream's zephyr-7b
  predicts the third prompt token: k; vLLM's later version of this test asserts k + 1): checked as k or k + 1;
- the demo model's answers are random text: assertions on a real model's reading ("a different name", "2",
  {"result": 2}) are not checked (the answer's form is), or the test is skipped when nothing else is left;
- sampling: vLLM samples at its temperature; the checkpoint's generation defaults (Qwen's top_k 1) do not, so
  the sampled tests send top_k 0 and top_p 1;
- a custom role (my-custom-role) is refused by name here (Qwen's template has no such role): both content forms
  are checked to be refused alike;
- vLLM's conftest schemas (sample_json_schema) are written here with small bounds (max lengths), so the demo's
  random text fits the token budget;
- stream_options.continuous_usage_stats: the finish chunk here carries no token (OpenAI's form), so its usage
  repeats the last count instead of growing;
"""

from __future__ import annotations

import json
import re

import openai
import pytest
import requests
from openai import BadRequestError, OpenAI

from peer_server import server  # noqa: F401  (one demo server per module)

MESSAGES = [{"role": "system", "content": "you are a helpful assistant"}, {"role": "user", "content": "what is 1+1?"}]


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(api_key="dummy", base_url=server.base_url + "/v1", max_retries=0)


def test_no_logprobs_chat(client):
    completion = client.chat.completions.create(model="demo", messages=MESSAGES, max_completion_tokens=5,
                                                temperature=0.0, logprobs=False)
    assert completion.choices[0].logprobs is None


@pytest.mark.parametrize("top", [0, 5])
def test_zero_and_some_logprobs_chat(client, top):
    completion = client.chat.completions.create(model="demo", messages=MESSAGES, max_completion_tokens=5,
                                                temperature=0.0, logprobs=True, top_logprobs=top)
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert len(choice.logprobs.content[0].top_logprobs) == top


def test_too_many_chat_logprobs(client):
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        for _ in client.chat.completions.create(model="demo", messages=MESSAGES, max_completion_tokens=10,
                                                logprobs=True, top_logprobs=21, stream=True):
            pass
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=MESSAGES, max_completion_tokens=10, logprobs=True,
                                       top_logprobs=30, stream=False)
    message = client.chat.completions.create(model="demo", messages=MESSAGES, max_completion_tokens=10).choices[0].message
    assert message.content is not None and len(message.content) >= 0


WORLD_SERIES = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Who won the world series in 2020?"},
                {"role": "assistant", "content": "The Los Angeles Dodgers won the World Series in 2020."},
                {"role": "user", "content": "Where was it played?"}]


@pytest.mark.parametrize("prompt_logprobs", [1, 0, -1, None])
def test_prompt_logprobs_chat(client, prompt_logprobs):
    params = {"messages": WORLD_SERIES, "model": "demo"}
    if prompt_logprobs is not None:
        params["extra_body"] = {"prompt_logprobs": prompt_logprobs}
    if prompt_logprobs is not None and prompt_logprobs < 0:
        with pytest.raises(BadRequestError):
            client.chat.completions.create(**params)
    else:
        completion = client.chat.completions.create(**params)
        if prompt_logprobs is not None:
            assert completion.prompt_logprobs is not None
            assert len(completion.prompt_logprobs) > 0
        else:
            assert getattr(completion, "prompt_logprobs", None) is None


def test_single_chat_session(client):
    messages = list(MESSAGES)
    completion = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=10,
                                                logprobs=True, top_logprobs=5)
    assert completion.id is not None and len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    usage = completion.usage
    assert usage.completion_tokens == 10 and usage.total_tokens == usage.prompt_tokens + 10  # upstream: 37 + 10
    assert choice.message.content is not None and choice.message.role == "assistant"
    messages += [{"role": "assistant", "content": choice.message.content},
                 {"role": "user", "content": "express your result in json"}]
    message = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=10).choices[0].message
    assert message.content is not None and len(message.content) >= 0


def test_chat_streaming(client):
    whole = client.chat.completions.create(model="demo", messages=MESSAGES, max_completion_tokens=10, temperature=0.0)
    output, stop_reason = whole.choices[0].message.content, whole.choices[0].finish_reason
    chunks, finish_reason_count = [], 0
    for chunk in client.chat.completions.create(model="demo", messages=MESSAGES, max_completion_tokens=10,
                                                temperature=0.0, stream=True):
        delta = chunk.choices[0].delta
        if delta.role:
            assert delta.role == "assistant"
        if delta.content:
            chunks.append(delta.content)
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    assert finish_reason_count == 1
    assert chunk.choices[0].finish_reason == stop_reason
    assert "".join(chunks) == output


def test_chat_completion_stream_options(client):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    for chunk in client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=10,
                                                temperature=0.0, stream=True, stream_options={"include_usage": False}):
        assert chunk.usage is None
    stream = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=10, temperature=0.0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        assert chunk.usage is None
        if chunk.choices[0].finish_reason is not None:
            final_chunk = next(stream)
            assert final_chunk.usage is not None
            assert final_chunk.usage.prompt_tokens > 0 and final_chunk.usage.completion_tokens > 0
            assert final_chunk.usage.total_tokens == final_chunk.usage.prompt_tokens + final_chunk.usage.completion_tokens
            assert final_chunk.choices == []
    for options in ({"include_usage": None}, {"include_usage": True}):
        with pytest.raises(BadRequestError):
            client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=10, temperature=0.0,
                                           stream=False, stream_options=options)
    last_completion_tokens = 0
    for chunk in client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=10,
                                                extra_body=dict(min_tokens=10), temperature=0.0, stream=True,
                                                stream_options={"include_usage": True,
                                                                "continuous_usage_stats": True}):
        assert chunk.usage.prompt_tokens >= 0
        # upstream: strictly growing on every chunk with choices; here the finish chunk is its own chunk,
        # without a token (OpenAI's form), so it repeats the count
        finish_only = bool(chunk.choices) and chunk.choices[0].finish_reason is not None
        assert (last_completion_tokens == 0 or chunk.usage.completion_tokens > last_completion_tokens
                or ((not chunk.choices or finish_only) and chunk.usage.completion_tokens == last_completion_tokens))
        assert chunk.usage.total_tokens == chunk.usage.prompt_tokens + chunk.usage.completion_tokens
        last_completion_tokens = chunk.usage.completion_tokens
    assert last_completion_tokens == 10


def test_guided_choice_chat(client):
    choices = ["Python", "Java", "JavaScript", "C++", "C#", "PHP", "TypeScript", "Ruby", "Swift", "Kotlin"]
    messages = [{"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": "The best language for type-safe systems programming is "}]
    completion = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=10,
                                                temperature=0.7, extra_body=dict(guided_choice=choices))
    choice1 = completion.choices[0].message.content
    assert choice1 in choices
    messages += [{"role": "assistant", "content": choice1}, {"role": "user", "content": "I disagree, pick another one"}]
    completion = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=10,
                                                temperature=0.7, extra_body=dict(guided_choice=choices))
    assert completion.choices[0].message.content in choices


# ---------------------------------------------------------------- the rest of the upstream module

EMPLOYEE = {"type": "object", "properties": {  # vLLM's sample_json_schema fixture's shape, written here
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 18, "maximum": 99},
    "skills": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}},
    "required": ["name", "age", "skills"], "additionalProperties": False}
IP_REGEX = r"((25[0-5]|(2[0-4]|1\d|[1-9]|)\d)\.){3}(25[0-5]|(2[0-4]|1\d|[1-9]|)\d)"
LANGUAGES = ["Python", "Java", "JavaScript", "C++", "C#", "PHP", "TypeScript", "Ruby", "Swift", "Kotlin"]
SAMPLE = {"top_k": 0, "top_p": 1.0}  # vLLM samples at temperature 0.7; Qwen's generation config is near greedy


def employee_messages():
    return [{"role": "system", "content": "you are a helpful assistant"},
            {"role": "user", "content": f"Give an example JSON for an employee profile that fits this schema: {EMPLOYEE}"}]


def test_more_than_one_prompt_logprobs_chat(client):
    params = {"messages": WORLD_SERIES, "model": "demo", "extra_body": {"prompt_logprobs": 1}}
    completion_1 = client.chat.completions.create(**params)
    params["extra_body"] = {"prompt_logprobs": 2}
    completion_2 = client.chat.completions.create(**params)
    assert len(completion_1.prompt_logprobs[3]) in (1, 2)  # upstream: == 1 (see the module's docstring)
    assert len(completion_2.prompt_logprobs[3]) in (2, 3)  # upstream: == 2


def test_guided_json_chat(client):
    import jsonschema

    messages = employee_messages()
    message = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=200,
                                             extra_body=dict(guided_json=EMPLOYEE, **SAMPLE)).choices[0].message
    assert message.content is not None
    json1 = json.loads(message.content)
    jsonschema.validate(instance=json1, schema=EMPLOYEE)
    messages += [{"role": "assistant", "content": message.content},
                 {"role": "user", "content": "Give me another one with a different name and age"}]
    message = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=200,
                                             extra_body=dict(guided_json=EMPLOYEE, **SAMPLE)).choices[0].message
    json2 = json.loads(message.content)
    jsonschema.validate(instance=json2, schema=EMPLOYEE)
    # upstream also asserts the second name and age differ: a real model reading "a different name" (not checked)


def test_guided_regex_chat(client):
    messages = [{"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": f"Give an example IP address with this regex: {IP_REGEX}"}]
    ip1 = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=20,
                                         extra_body=dict(guided_regex=IP_REGEX)).choices[0].message.content
    assert ip1 is not None and re.fullmatch(IP_REGEX, ip1) is not None
    messages += [{"role": "assistant", "content": ip1}, {"role": "user", "content": "Give me a different one"}]
    ip2 = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=20,
                                         extra_body=dict(guided_regex=IP_REGEX)).choices[0].message.content
    assert ip2 is not None and re.fullmatch(IP_REGEX, ip2) is not None
    # upstream also asserts ip1 != ip2: a real model reading "a different one" (not checked)


def test_guided_decoding_type_error(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=MESSAGES,
                                       extra_body=dict(guided_regex={1: "Python", 2: "C++"}))


def test_guided_choice_chat_logprobs(client):
    messages = [{"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": "The best language for type-safe systems programming is "}]
    completion = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=10,
                                                logprobs=True, top_logprobs=5, extra_body=dict(guided_choice=LANGUAGES))
    assert completion.choices[0].logprobs is not None and completion.choices[0].logprobs.content is not None
    for item in completion.choices[0].logprobs.content[0].top_logprobs:
        assert item.logprob >= -9999.0  # OpenAI's lowest logprob


def test_named_tool_use(client):
    import jsonschema

    messages = employee_messages()
    tools = [{"type": "function", "function": {"name": "dummy_function_name", "description": "This is a dummy function",
                                               "parameters": EMPLOYEE}}]
    tool_choice = {"type": "function", "function": {"name": "dummy_function_name"}}
    message = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=200, tools=tools,
                                             tool_choice=tool_choice, extra_body=SAMPLE).choices[0].message
    assert not message.content  # upstream: len(content) == 0; OpenAI's form here: null beside tool calls
    json_string = message.tool_calls[0].function.arguments
    json1 = json.loads(json_string)
    jsonschema.validate(instance=json1, schema=EMPLOYEE)
    messages += [{"role": "assistant", "content": json_string},
                 {"role": "user", "content": "Give me another one with a different name and age"}]
    output, finish_reason_count = [], 0
    for chunk in client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=200, tools=tools,
                                                tool_choice=tool_choice, stream=True, extra_body=SAMPLE):
        delta = chunk.choices[0].delta
        if delta.role:
            assert delta.role == "assistant"
        assert delta.content is None or len(delta.content) == 0
        if delta.tool_calls:
            output.append(delta.tool_calls[0].function.arguments or "")
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    assert finish_reason_count == 1
    jsonschema.validate(instance=json.loads("".join(output)), schema=EMPLOYEE)
    # upstream also asserts the second name and age differ (a real model's reading; not checked)


def test_inconsistent_tool_choice_and_tools(client):
    messages = employee_messages()
    tools = [{"type": "function", "function": {"name": "dummy_function_name", "description": "This is a dummy function",
                                               "parameters": EMPLOYEE}}]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=1000,
                                       tool_choice={"type": "function", "function": {"name": "dummy_function_name"}})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=1000, tools=tools,
                                       tool_choice={"type": "function", "function": {"name": "nondefined_function_name"}})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=1000, tools=tools,
                                       tool_choice={})


def test_response_format_json_object(client):
    for _ in range(2):
        content = client.chat.completions.create(
            model="demo", max_completion_tokens=64, response_format={"type": "json_object"}, extra_body=SAMPLE,
            messages=[{"role": "user", "content": 'what is 1+1? please respond with a JSON object, the format is {"result": 2}'}],
        ).choices[0].message.content
        assert content is not None
        # upstream: json.loads(content) == {"result": 2}, a real model's answer; here: a JSON object (when it ended)
        if content.rstrip().endswith("}"):
            assert isinstance(json.loads(content), dict)
        else:
            assert content.lstrip().startswith("{")


def test_response_format_json_schema(client):
    prompt = 'what is 1+1? The format is "result": 2'
    for _ in range(2):  # without a schema, the answer is not that JSON
        content = client.chat.completions.create(model="demo", max_completion_tokens=16,
                                                 messages=[{"role": "user", "content": prompt}]).choices[0].message.content
        assert content is not None
        with pytest.raises((json.JSONDecodeError, AssertionError)):
            assert json.loads(content) == {"result": 2}
    schema = {"type": "object", "properties": {"result": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["result"], "additionalProperties": False}
    for _ in range(2):
        content = client.chat.completions.create(
            model="demo", max_completion_tokens=32, messages=[{"role": "user", "content": prompt}],
            response_format={"type": "json_schema", "json_schema": {"name": "foo_test", "schema": schema}},
        ).choices[0].message.content
        assert content is not None
        loaded = json.loads(content)
        assert set(loaded) == {"result"} and isinstance(loaded["result"], int)  # upstream: == {"result": 2}


def test_extra_fields_allowed(client):
    resp = client.chat.completions.create(model="demo", max_completion_tokens=5, temperature=0, seed=0,
                                          messages=[{"role": "user", "content": "what is 1+1?", "extra_field": "0"}])
    assert resp.choices[0].message.content is not None


def test_complex_message_content(client):
    pytest.skip("model meaning: upstream asserts zephyr's answer to 'what is 1+1?' is \"2\"")


def test_custom_role(client):
    # upstream: a custom role's string and part-list contents are answered alike; here both are refused alike
    # (Qwen's chat template knows system, user, assistant and tool), naming the role
    for content in ("what is 1+1?", [{"type": "text", "text": "what is 1+1?"}]):
        with pytest.raises(BadRequestError) as caught:
            client.chat.completions.create(model="demo", temperature=0, seed=0,
                                           messages=[{"role": "my-custom-role", "content": content}])
        assert caught.value.body["param"] == "messages[0].role"


def test_long_seed(client):
    for seed in (-2**63 - 1, 2**63):  # torch.long's range, one beyond
        with pytest.raises(BadRequestError) as caught:
            client.chat.completions.create(model="demo", temperature=0, seed=seed,
                                           messages=[{"role": "system", "content": "You are a helpful assistant."}])
        # upstream: pydantic's error type names; here its message ("greater than or equal", "less than or equal")
        assert "greater than or equal" in caught.value.message or "less than or equal" in caught.value.message


def test_http_chat_no_model_name_with_curl(server):
    data = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "what is 1+1?"}], "max_tokens": 5, "ignore_eos": True}
    response_data = requests.post(server.base_url + "/v1/chat/completions", json=data, timeout=60).json()
    assert response_data.get("model") == "demo"  # the served model's name
    content = response_data["choices"][0]["message"]["content"]
    assert content is not None and len(content) > 0


def test_http_chat_no_model_name_with_openai(server):
    client = OpenAI(api_key="EMPTY", base_url=server.base_url + "/v1")
    response = client.chat.completions.create(model="", messages=[{"role": "user", "content": "Hello, vLLM!"}],
                                              max_tokens=4)
    assert response.model == "demo"


def test_invocations(server):
    pytest.skip("declined: vLLM's /invocations (SageMaker's route); this server answers /v1/chat/completions only")
