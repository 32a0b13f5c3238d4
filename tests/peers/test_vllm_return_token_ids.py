"""Ported from vLLM tests/entrypoints/openai/basic/test_return_token_ids.py at commit
35daaf4dd032917896c665abc01dedd7bb4a0ad8 (github.com/vllm-project/vllm), the whole module.
The checks are re-expressed here with the synchronous OpenAI client against this project's demo server, decoding
with the checkpoint's own tokenizer loaded apart from the server; each upstream assertion is kept, except these
deliberate differences:

- without return_token_ids, prompt_token_ids and token_ids are absent from a completion choice (vLLM writes
  them as null): checked with .get;
- the demo model does not choose to call a tool of its own accord, so the tool-use test forces the call with
  tool_choice "required" (upstream: "auto", and its model calls get_weather), and its parameters are bounded
  (location maxLength 8, no additional properties, parallel_tool_calls false) so the demo's random argument closes within upstream's 100 tokens;
- the demo's answers are random and may run to max_tokens: a decoded answer ends with an end token only when
  finish_reason is "stop" (upstream's model always ends its answer), and that end token is <|im_end|> or
  <|endoftext|> (both end an answer in the checkpoint's generation config; the demo's random weights pick either);
- return_tokens_as_token_ids is refused by name (docs/api.md): test_comparison_with_prompt_logprobs_and_logprobs
  checks that refusal, then sends its two requests without it and keeps the assertions that do not read token ids
  out of the logprobs' "token_id:N" strings (those need it): each is compared by count instead; its answer is
  decoded without special tokens, as the server's text is (the demo's random answer may hold some).
"""

from __future__ import annotations

import pytest
from openai import BadRequestError, OpenAI
from paddleformers.transformers import AutoTokenizer

from peer_server import server  # noqa: F401  (one demo server per module)

EMOJI_PROMPT = "Complete this sentence with emojis: I love coding \U0001f680"
ENDS = ("<|im_end|>", "<|endoftext|>")  # the checkpoint's generation config ends an answer on either
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "maxLength": 8, "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "The unit of temperature"}},
        "required": ["location"], "additionalProperties": False}}}]
WEATHER = [{"role": "system", "content": "You are a helpful assistant."},
           {"role": "user", "content": "What's the weather like in Paris?"}]


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(api_key="dummy", base_url=server.base_url + "/v1", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(engine):
    return AutoTokenizer.from_pretrained(engine.info.source)


def ends_as_finished(decoded: str, content: str, finish_reason: str) -> bool:
    if finish_reason == "stop":
        return any(decoded == content + end for end in ENDS)
    return decoded == content


@pytest.mark.parametrize("return_token_ids", [True, False, None])
def test_basic_completion_with_emoji(client, tokenizer, return_token_ids):
    extra_body = None if return_token_ids is None else {"return_token_ids": return_token_ids}
    completion = client.completions.create(model="demo", prompt=EMOJI_PROMPT, max_tokens=10, temperature=0,
                                           logprobs=1, extra_body=extra_body)
    completion_dict = completion.model_dump()
    if not return_token_ids:
        assert completion_dict["choices"][0].get("token_ids") is None
        assert completion_dict["choices"][0].get("prompt_token_ids") is None
        return
    assert "prompt_token_ids" in completion_dict["choices"][0]
    prompt_ids = completion.choices[0].prompt_token_ids
    assert isinstance(prompt_ids, list)
    encoded = tokenizer.encode(EMOJI_PROMPT)
    assert any(prompt_ids[i:i + len(encoded)] == encoded for i in range(len(prompt_ids) - len(encoded) + 1))
    token_ids = completion.choices[0].token_ids
    assert token_ids is not None and isinstance(token_ids, list) and len(token_ids) > 0
    assert tokenizer.decode(token_ids).startswith(completion.choices[0].text)

    without = client.completions.create(model="demo", prompt=EMOJI_PROMPT, max_tokens=10, temperature=0,
                                        logprobs=1, extra_body={"return_token_ids": False}).model_dump()
    assert without["choices"][0].get("token_ids") is None
    assert without.get("prompt_token_ids") is None


def test_chat_completion_with_tool_use(client, tokenizer):
    response = client.chat.completions.create(model="demo", messages=WEATHER, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False,
                                              max_tokens=100, temperature=0, logprobs=True,
                                              extra_body={"return_token_ids": True})
    choice = response.choices[0]
    assert choice.token_ids is not None and isinstance(choice.token_ids, list)
    assert response.prompt_token_ids is not None and isinstance(response.prompt_token_ids, list)
    prompt_text = tokenizer.decode(response.prompt_token_ids)
    assert prompt_text.startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert prompt_text.endswith("What's the weather like in Paris?<|im_end|>\n<|im_start|>assistant\n")
    response_text = tokenizer.decode(choice.token_ids)
    assert response_text.startswith('<tool_call>\n{"name": "get_weather"')
    assert any(response_text.endswith("</tool_call>" + end) for end in ENDS)  # upstream: <|im_end|>
    if choice.message.tool_calls:
        assert len(choice.message.tool_calls) > 0
        assert choice.message.tool_calls[0].function.name == "get_weather"

    without = client.chat.completions.create(model="demo", messages=WEATHER, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False, max_tokens=100, temperature=0, logprobs=True,
                                             extra_body={"return_token_ids": False})
    assert without.choices[0].model_extra.get("token_ids") is None
    assert without.model_extra.get("prompt_token_ids") is None


def test_comparison_with_prompt_logprobs_and_logprobs(client, tokenizer):
    asked = dict(model="demo", prompt="Hello, world! How are you today?", max_tokens=20, temperature=0, echo=True,
                 logprobs=1)
    with pytest.raises(BadRequestError) as caught:
        client.completions.create(**asked, extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True,
                                                       "prompt_logprobs": 1})
    assert caught.value.body["param"] == "return_tokens_as_token_ids"

    completion = client.completions.create(**asked, extra_body={"return_token_ids": True, "prompt_logprobs": 1})
    choice = completion.choices[0]
    assert choice.token_ids is not None
    assert choice.prompt_token_ids is not None
    assert choice.prompt_logprobs is not None
    assert choice.logprobs is not None
    # echo: the logprobs hold the prompt's tokens, then the answer's (upstream: their "token_id:N" ids)
    assert len(choice.token_ids) < len(choice.logprobs.tokens)
    assert len(choice.logprobs.tokens) == len(choice.prompt_token_ids) + len(choice.token_ids)
    assert "Hello, world" in tokenizer.decode(choice.prompt_token_ids)
    # the answer's text leaves out special tokens (vLLM's skip_special_tokens default); the demo's random answer
    # may hold some, so they are skipped in the decoding too (upstream: plain decode, its model writes none)
    assert choice.text.endswith(tokenizer.decode(choice.token_ids, skip_special_tokens=True))

    streamed_prompt_token_ids, streamed_token_ids, streamed_logprob_tokens, first_chunk = [], [], [], True
    for chunk in client.completions.create(model="demo", prompt="Tell me a short fact about Python:", max_tokens=30,
                                           temperature=0, stream=True, echo=False, logprobs=1,
                                           extra_body={"return_token_ids": True}):
        if chunk.choices[0].logprobs is not None:  # the finishing chunk here has none (docs/api.md)
            streamed_logprob_tokens += chunk.choices[0].logprobs.tokens
        if first_chunk:
            streamed_prompt_token_ids = chunk.choices[0].prompt_token_ids
            first_chunk = False
        streamed_token_ids += chunk.choices[0].token_ids or []
    assert len(streamed_prompt_token_ids) > 0
    assert len(streamed_token_ids) == len(streamed_logprob_tokens)


def test_chat_completion_with_emoji_and_token_ids(client, tokenizer):
    chat_messages = [{"role": "system", "content": "You like to use emojis in your responses."},
                     {"role": "user", "content": "Repeat after me: I love cats \U0001f431"}]
    response = client.chat.completions.create(model="demo", messages=chat_messages, max_tokens=50, temperature=0,
                                              logprobs=True, extra_body={"return_token_ids": True})
    response_dict = response.model_dump()
    assert response.choices[0].token_ids is not None
    assert "prompt_token_ids" in response_dict
    assert response.choices[0].message.content is not None
    decoded_prompt = tokenizer.decode(response.prompt_token_ids)
    assert decoded_prompt.startswith("<|im_start|>system\nYou like to use emojis in your responses.")
    assert decoded_prompt.endswith("I love cats \U0001f431<|im_end|>\n<|im_start|>assistant\n")
    decoded_response = tokenizer.decode(response.choices[0].token_ids)
    assert ends_as_finished(decoded_response, response.choices[0].message.content, response.choices[0].finish_reason)

    stream = client.chat.completions.create(model="demo", messages=chat_messages, max_tokens=50, temperature=0,
                                            stream=True, extra_body={"return_token_ids": True})
    collected_content, collected_token_ids, first_chunk, finish_reason = "", [], True, None
    for chunk in stream:
        if first_chunk:
            assert chunk.prompt_token_ids is not None and isinstance(chunk.prompt_token_ids, list)
            assert tokenizer.decode(chunk.prompt_token_ids) == decoded_prompt
            first_chunk = False
        else:
            assert "prompt_token_ids" not in chunk.model_dump(), "Subsequent chunks should not have prompt_token_ids"
        if chunk.choices:
            if chunk.choices[0].delta.content:
                collected_content += chunk.choices[0].delta.content
            if "token_ids" in chunk.choices[0].model_dump():
                collected_token_ids.extend(chunk.choices[0].token_ids)
            finish_reason = chunk.choices[0].finish_reason or finish_reason
    assert len(collected_content) > 0
    assert len(collected_token_ids) > 0
    assert ends_as_finished(tokenizer.decode(collected_token_ids), collected_content, finish_reason)
