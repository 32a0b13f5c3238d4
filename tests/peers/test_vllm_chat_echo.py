"""Ported from vLLM tests/entrypoints/openai/chat_completion/test_chat_echo.py at commit
41c5903d049b80b83a6e570f52f0f55e31316e49 (github.com/vllm-project/vllm), the whole module.
The checks are re-expressed here with the synchronous OpenAI client against this project's demo server; each
upstream assertion is kept, except these deliberate differences:

- `echo` on chat completions is refused by name (400 unsupported_parameter, docs/api.md), so the echo=True case
  checks that refusal; echo=False (its neutral value) is answered and checked as upstream;
- the demo model's words are random: its answer may run to max_tokens, so finish_reason is "stop" or "length"
  (upstream: "stop", Qwen2-1.5B ends the saying);
- top_logprobs is 0 to 20 as in OpenAI's API (vLLM's -1, the whole vocabulary, is a 400 naming top_logprobs);
  prompt_logprobs likewise (upstream runs with --max-logprobs 151936 for -1): -1 is a 400 naming prompt_logprobs,
  and the same request with 20 is answered with the form upstream checks.
"""

from __future__ import annotations

import pytest
from openai import BadRequestError, OpenAI

from peer_server import server  # noqa: F401  (one demo server per module)

SAYING = "Here is a common saying about apple. An apple a day, keeps"
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Beijing is the capital of which country?"}]


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(api_key="dummy", base_url=server.base_url + "/v1", max_retries=0)


def continue_saying(client, echo: bool):
    return client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "tell me a common saying"},
                                {"role": "assistant", "content": SAYING}],
        extra_body={"echo": echo, "continue_final_message": True, "add_generation_prompt": False})


def test_chat_session_with_echo_and_continue_final_message(client):
    chat_completion = continue_saying(client, echo=False)
    assert chat_completion.id is not None
    assert len(chat_completion.choices) == 1
    choice = chat_completion.choices[0]
    assert choice.finish_reason in ("stop", "length")  # upstream: "stop"
    message = choice.message
    assert message.content is not None and SAYING not in message.content
    assert message.role == "assistant"


def test_chat_session_with_echo_true_is_refused(client):
    with pytest.raises(BadRequestError) as caught:  # upstream: answered, the saying first in the content
        continue_saying(client, echo=True)
    assert caught.value.body["param"] == "echo"


def test_prompt_logprobs(client):
    with pytest.raises(BadRequestError) as caught:  # upstream: -1 scores each prompt token over the whole vocabulary
        client.chat.completions.create(model="demo", messages=MESSAGES, extra_body={"prompt_logprobs": -1})
    assert caught.value.body["param"] == "prompt_logprobs"
    completion = client.chat.completions.create(model="demo", messages=MESSAGES, extra_body={"prompt_logprobs": 20})
    assert completion.model_extra["prompt_logprobs"] is not None
    assert len(completion.model_extra["prompt_logprobs"]) > 0


def test_top_logprobs(client):
    with pytest.raises(BadRequestError) as caught:  # upstream: -1 answers the whole vocabulary at each step
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=1,
                                       extra_body={"top_logprobs": -1, "logprobs": "true"})
    assert caught.value.body["param"] == "top_logprobs"
    # the same request within OpenAI's range is answered with the form upstream checks
    completion = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=1,
                                                extra_body={"top_logprobs": 20, "logprobs": "true"})
    assert completion.choices[0].logprobs is not None
    assert completion.choices[0].logprobs.content is not None
    assert len(completion.choices[0].logprobs.content) > 0
    assert len(completion.choices[0].logprobs.content[0].top_logprobs) == 20
