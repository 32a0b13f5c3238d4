"""Ported from vLLM tests/entrypoints/openai/test_chat.py at commit 0091c9502ffb9f6761588a21b8d917db8ede4990
(github.com/vllm-project/vllm), its first part (logprobs, sessions, streaming, stream_options, guided choice).
The checks are re-expressed here with the synchronous OpenAI client against this project's demo server; each
upstream assertion is kept, except these deliberate differences (docs/api.md, "Differences from the peers' tests"):

- no LoRA adapters and no V0/V1 engines: each test runs once, on the one model;
- exact prompt token counts of zephyr-7b's tokenizer (prompt_tokens=37) are not checked;
- prompt_logprobs is refused (400 unsupported_parameter, named) instead of answered: this server does not compute
  the prompt's logprobs;
- stream_options.continuous_usage_stats (vLLM's extension) is not offered: that part is skipped.
"""

from __future__ import annotations

import openai
import pytest
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


@pytest.mark.parametrize("prompt_logprobs", [1, 0, -1])
def test_prompt_logprobs_chat_is_refused(client, prompt_logprobs):
    with pytest.raises(BadRequestError) as caught:
        client.chat.completions.create(model="demo", messages=MESSAGES, extra_body={"prompt_logprobs": prompt_logprobs})
    assert caught.value.body["param"] == "prompt_logprobs"  # upstream: answered for 0 and 1, 400 for -1


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
