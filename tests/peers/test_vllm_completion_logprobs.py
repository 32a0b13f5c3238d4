"""Ported from vLLM tests/entrypoints/openai/test_completion.py at commit 0091c9502ffb9f6761588a21b8d917db8ede4990
(github.com/vllm-project/vllm): its tests of the completion endpoint's logprobs, echo and prompt_logprobs.
The checks are re-expressed here with the synchronous OpenAI client against this project's demo server; each
upstream assertion is kept, except these deliberate differences (docs/api.md, "Differences from the peers' tests"):

- no LoRA adapters: each test runs once, on the one model;
- one prompt per request (this server's /v1/completions takes one prompt; several answers to it with n): the
  two-prompt request of test_prompt_logprobs_completion is sent as two requests, one per prompt;
- the prompt text of the token-id prompt is the demo tokenizer's decoding of ids [0, 0, 0, 0, 0].
"""

from __future__ import annotations

import re

import openai
import pytest
from openai import BadRequestError, OpenAI

from peer_server import server  # noqa: F401  (one demo server per module)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(api_key="dummy", base_url=server.base_url + "/v1", max_retries=0)


def test_no_logprobs(client):
    completion = client.completions.create(model="demo", prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0,
                                           logprobs=None)
    assert completion.choices[0].logprobs is None


def test_zero_logprobs(client):
    completion = client.completions.create(model="demo", prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0,
                                           logprobs=0)
    choice = completion.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs is not None
    assert choice.logprobs.top_logprobs is not None
    assert len(choice.logprobs.top_logprobs[0]) == 1


def test_some_logprobs(client):
    completion = client.completions.create(model="demo", prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0,
                                           logprobs=5)
    choice = completion.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs is not None
    assert choice.logprobs.top_logprobs is not None
    assert 5 <= len(choice.logprobs.top_logprobs[0]) <= 6


def test_too_many_completion_logprobs(client):
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(model="demo", prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0, logprobs=21)
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        for _ in client.completions.create(model="demo", prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0,
                                           logprobs=30, stream=True):
            pass
    completion = client.completions.create(model="demo", prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0)
    assert len(completion.choices[0].text) >= 0


@pytest.mark.parametrize("prompt_logprobs", [-1, 0, 1, None])
def test_prompt_logprobs_completion(client, prompt_logprobs):
    for prompt in ("A robot may not injure another robot", "My name is"):  # upstream: both in one request
        params = {"prompt": prompt, "model": "demo"}
        if prompt_logprobs is not None:
            params["extra_body"] = {"prompt_logprobs": prompt_logprobs}
        if prompt_logprobs is not None and prompt_logprobs < 0:
            with pytest.raises(BadRequestError):
                client.completions.create(**params)
        else:
            completion = client.completions.create(**params)
            if prompt_logprobs is not None:
                assert completion.choices[0].prompt_logprobs is not None
                assert len(completion.choices[0].prompt_logprobs) > 0
            else:
                assert completion.choices[0].prompt_logprobs is None


@pytest.mark.parametrize("logprobs_arg", [1, 0])
def test_echo_logprob_completion(client, engine, logprobs_arg):
    for prompt in ("Hello, my name is", [0, 0, 0, 0, 0]):
        completion = client.completions.create(model="demo", prompt=prompt, max_tokens=5, temperature=0.0, echo=True,
                                               logprobs=logprobs_arg)
        prompt_text = engine.tokenizer.decode(prompt) if isinstance(prompt, list) else prompt
        assert re.search(r"^" + prompt_text, completion.choices[0].text)
        logprobs = completion.choices[0].logprobs
        assert logprobs is not None
        assert len(logprobs.text_offset) > 5
        assert len(logprobs.token_logprobs) > 5 and logprobs.token_logprobs[0] is None
        assert len(logprobs.top_logprobs) > 5 and logprobs.top_logprobs[0] is None
        for top_logprobs in logprobs.top_logprobs[1:]:
            assert max(logprobs_arg, 1) <= len(top_logprobs) <= logprobs_arg + 1
        assert len(logprobs.tokens) > 5


@pytest.mark.parametrize("stream,echo", [(False, False), (False, True), (True, False), (True, True)])
def test_echo_stream_completion(client, stream, echo):
    saying = "Hello, my name is"
    result = client.completions.create(model="demo", prompt=saying, max_tokens=10, temperature=0.0, echo=echo,
                                       stream=stream)
    stop_reason = "length"
    if not stream:
        choice = result.choices[0]
        assert result.id is not None and len(result.choices) == 1
        assert len(choice.text) >= 5
        assert choice.finish_reason == stop_reason
        if echo:
            assert choice.text is not None and saying in choice.text
        else:
            assert choice.text is not None and saying not in choice.text
    else:
        chunks, final_finish_reason = [], None
        for chunk in result:
            if chunk.choices and chunk.choices[0].text:
                chunks.append(chunk.choices[0].text)
            if chunk.choices and chunk.choices[0].finish_reason:
                final_finish_reason = chunk.choices[0].finish_reason
        assert final_finish_reason == stop_reason
        content = "".join(chunks)
        if echo:
            assert content is not None and saying in content
        else:
            assert content is not None and saying not in content
