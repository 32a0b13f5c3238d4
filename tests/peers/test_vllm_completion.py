"""Ported from vLLM tests/entrypoints/openai/completion/test_completion.py at commit
10efe9463b0a2529746fe5fb81d546cf1062b06c (github.com/vllm-project/vllm), the whole module, on /v1/completions.
The checks are re-expressed here with the synchronous OpenAI client against this project's demo server, with the
checkpoint's own tokenizer loaded apart from the server; each upstream assertion is kept, except these
deliberate differences:

- prompt token counts are the demo tokenizer's (upstream: opt-125m's 6 for "Hello, my name is");
- upstream runs with --no-enable-prefix-caching: test_single_completion turns the shared engine's prefix cache
  off, so its cached_tokens is 0 as upstream's;
- short answers use ignore_eos, so the demo's random text runs to max_tokens (upstream's model writes them);
- the sampled tests (n = 3 at temperature 1) send top_k 0 and top_p 1 (Qwen's generation config is near greedy);
  "subrequests finished at different times" needs an answer that ends on its own, the model's meaning: not
  checked (the demo rarely samples an end token within 50 tokens);
- a stream's finishing chunk carries no text (OpenAI's form, docs/api.md): the streaming test checks the last
  text chunk has text;
- one prompt per request (docs/api.md): test_batch_completions (lists of prompts, and beam search) is skipped;
  test_prompt_logprobs_completion sends its two prompts as two requests, upstream's assertions checked on each;
- the echo-with-logprobs tests use ignore_eos so the answer has its 5 tokens (upstream's model writes them);
- truncate_prompt_tokens / truncation_side are refused by name (docs/api.md): that test is skipped;
"""

from __future__ import annotations

import re

import openai
import pytest
from openai import BadRequestError, OpenAI
from paddleformers.transformers import AutoTokenizer

from peer_server import server  # noqa: F401  (one demo server per module)

IDS = [0, 0, 0, 0, 0]
LONG = {"ignore_eos": True}
SAMPLED = {"top_k": 0, "top_p": 1.0}


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(api_key="dummy", base_url=server.base_url + "/v1", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(engine):
    return AutoTokenizer.from_pretrained(engine.info.source)


def test_single_completion(client, tokenizer, no_prefix_cache):
    prompt = "Hello, my name is"
    completion = client.completions.create(model="demo", prompt=prompt, max_tokens=5, temperature=0.0,
                                           extra_body=LONG)
    assert completion.id is not None
    assert completion.choices is not None and len(completion.choices) == 1
    choice = completion.choices[0]
    assert len(choice.text) >= 5
    assert choice.finish_reason == "length"
    prompt_tokens = len(tokenizer.encode(prompt))  # upstream: 6
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.total_tokens == prompt_tokens + 5
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0

    completion = client.completions.create(model="demo", prompt=IDS, max_tokens=5, temperature=0.0, extra_body=LONG)
    assert len(completion.choices[0].text) >= 1
    assert (completion.choices[0].model_extra or {}).get("prompt_logprobs") is None


def test_completion_truncation_side_controls_prompt_truncation(client):
    pytest.skip("truncate_prompt_tokens (and truncation_side) is refused by name (docs/api.md)")


def test_no_logprobs(client):
    completion = client.completions.create(model="demo", prompt=IDS, max_tokens=5, temperature=0.0, logprobs=None)
    assert completion.choices[0].logprobs is None


def test_zero_logprobs(client):
    completion = client.completions.create(model="demo", prompt=IDS, max_tokens=5, temperature=0.0, logprobs=0)
    choice = completion.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs is not None
    assert choice.logprobs.top_logprobs is not None
    assert len(choice.logprobs.top_logprobs[0]) == 1


def test_some_logprobs(client):
    completion = client.completions.create(model="demo", prompt=IDS, max_tokens=5, temperature=0.0, logprobs=5)
    choice = completion.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs is not None
    assert choice.logprobs.top_logprobs is not None
    assert 5 <= len(choice.logprobs.top_logprobs[0]) <= 6


def test_too_many_completion_logprobs(client):
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(model="demo", prompt=IDS, max_tokens=5, temperature=0.0, logprobs=21)
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        for _ in client.completions.create(model="demo", prompt=IDS, max_tokens=5, temperature=0.0, logprobs=30,
                                           stream=True):
            pass
    completion = client.completions.create(model="demo", prompt=IDS, max_tokens=5, temperature=0.0)
    assert len(completion.choices[0].text) >= 0


@pytest.mark.parametrize("prompt_logprobs", [-1, 0, 1, None])
def test_prompt_logprobs_completion(client, prompt_logprobs):
    for prompt in ("A robot may not injure another robot", "My name is"):  # upstream: both in one request
        params: dict = {"prompt": prompt, "model": "demo"}
        if prompt_logprobs is not None:
            params["extra_body"] = {"prompt_logprobs": prompt_logprobs}
        if prompt_logprobs is not None and prompt_logprobs < 0:
            with pytest.raises(BadRequestError):
                client.completions.create(**params)
            continue
        completion = client.completions.create(**params)
        scores = (completion.choices[0].model_extra or {}).get("prompt_logprobs")
        if prompt_logprobs is not None:
            assert scores is not None
            assert len(scores) > 0
        else:
            assert scores is None


def test_completion_streaming(client):
    prompt = "What is an LLM?"
    single_output = client.completions.create(model="demo", prompt=prompt, max_tokens=5, temperature=0.0,
                                              extra_body=LONG).choices[0].text
    chunks, finish_reason_count, last_text = [], 0, None
    for chunk in client.completions.create(model="demo", prompt=prompt, max_tokens=5, temperature=0.0, stream=True,
                                           extra_body=LONG):
        chunks.append(chunk.choices[0].text)
        last_text = chunk.choices[0].text or last_text
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    assert finish_reason_count == 1
    assert chunk.choices[0].finish_reason == "length"
    assert last_text  # upstream: the finishing chunk's own text
    assert "".join(chunks) == single_output


def check_unique(texts: list, n: int) -> None:
    repeats = {text: texts.count(text) for text in texts if texts.count(text) > 1}
    assert len(set(texts)) == n, f"Expected {n} unique completions; repeats: {repeats}"


def test_parallel_no_streaming(client):
    n, max_tokens = 3, 50
    completion = client.completions.create(model="demo", prompt="What is an LLM?", max_tokens=max_tokens, n=n,
                                           temperature=1.0, stream=False, logprobs=0, seed=42, extra_body=SAMPLED)
    assert len(completion.choices) == n
    for idx, choice in enumerate(completion.choices):
        assert choice.index == idx
        assert choice.finish_reason is not None
        assert len(choice.logprobs.tokens) <= max_tokens
    check_unique([choice.text for choice in completion.choices], n)


def test_parallel_streaming(client):
    n, max_tokens = 3, 50
    chunks, finish_reason_count = [[] for _ in range(n)], 0
    for chunk in client.completions.create(model="demo", prompt="What is an LLM?", max_tokens=max_tokens, n=n,
                                           temperature=1.0, stream=True, seed=42, extra_body=SAMPLED):
        chunks[chunk.choices[0].index].append(chunk.choices[0].text)
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    assert finish_reason_count == n
    for pieces in chunks:
        assert len(pieces) <= max_tokens + 1  # + the finishing chunk, which carries no text here
    check_unique(["".join(pieces) for pieces in chunks], n)


def test_completion_stream_options(client):
    prompt = "What is the capital of France?"

    def stream(options, stream=True):
        return client.completions.create(model="demo", prompt=prompt, max_tokens=5, temperature=0.0, stream=stream,
                                         stream_options=options, extra_body=LONG)

    for options in ({"include_usage": False, "continuous_usage_stats": False},
                    {"include_usage": False, "continuous_usage_stats": True}, {}):
        for chunk in stream(options):
            assert chunk.usage is None

    def check_usage(usage):
        assert usage is not None
        assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    events = iter(stream({"include_usage": True, "continuous_usage_stats": False}))
    for chunk in events:
        assert chunk.usage is None
        if chunk.choices[0].finish_reason is not None:
            final_chunk = next(events)
            check_usage(final_chunk.usage)
            assert final_chunk.choices == []
            break
    else:
        raise AssertionError("no finishing chunk")

    events = iter(stream({"include_usage": True, "continuous_usage_stats": True}))
    for chunk in events:
        check_usage(chunk.usage)
        if chunk.choices[0].finish_reason is not None:
            final_chunk = next(events)
            check_usage(final_chunk.usage)
            assert final_chunk.choices == []
            break
    else:
        raise AssertionError("no finishing chunk")

    for options in ({"include_usage": None}, {"include_usage": True}, {"continuous_usage_stats": None},
                    {"continuous_usage_stats": True}):
        with pytest.raises(BadRequestError):
            stream(options, stream=False)


def test_batch_completions(client):
    pytest.skip("one prompt per request (docs/api.md): lists of prompts are a 400 here; its n=2 part also needs "
                "use_beam_search, refused by name")


@pytest.mark.parametrize("logprobs_arg", [1, 0])
def test_echo_logprob_completion(client, tokenizer, logprobs_arg):
    for prompt in ("Hello, my name is", IDS):
        completion = client.completions.create(model="demo", prompt=prompt, max_tokens=5, temperature=0.0, echo=True,
                                               logprobs=logprobs_arg, extra_body=LONG)
        prompt_text = tokenizer.decode(prompt) if isinstance(prompt, list) else prompt
        assert re.search(r"^" + prompt_text, completion.choices[0].text)
        logprobs = completion.choices[0].logprobs
        assert logprobs is not None
        assert len(logprobs.text_offset) > 5
        assert len(logprobs.token_logprobs) > 5 and logprobs.token_logprobs[0] is None
        assert len(logprobs.top_logprobs) > 5 and logprobs.top_logprobs[0] is None
        for top_logprobs in logprobs.top_logprobs[1:]:
            assert max(logprobs_arg, 1) <= len(top_logprobs) <= logprobs_arg + 1
        assert len(logprobs.tokens) > 5


def test_invalid_json_schema(client):
    invalid_json_schema = {
        "$defs": {"CarType": {"enum": ["sedan", "SUV", "Truck", "Coupe"], "title": "CarType", "type": "string"}},
        "properties": {"brand": {"title": "Brand", "type": "string"}, "model": {"title": "Model", "type": "string"},
                       "car_type": {"$ref": "#/$defs/CarType"}, "foo": "bar"},
        "required": ["brand", "model", "car_type"], "title": "CarDescription", "type": "object"}
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(model="demo", prompt="Generate a JSON with the brand, model and car_type of the "
                                  "most iconic car from the 90's",
                                  extra_body={"structured_outputs": {"json": invalid_json_schema}})


def test_invalid_regex(client):
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(model="demo", prompt="Generate an email address for Alan Turing, who works in "
                                  "Enigma. End in .com and new line. Example result: alan.turing@enigma.com\n",
                                  extra_body={"structured_outputs": {"regex": r"[.*"}, "stop": ["\n"]})


def test_invalid_grammar(client):
    invalid_simplified_sql_grammar = """
        root ::= select_statementinvalidsyntax

        select_statement ::= "SELECT " column " from " table " where " condition

        column ::= "col_1 " | "col_2 "

        table ::= "table_1 " | "table_2 "

        condition ::= column "= " number

        number ::= "1 " | "2 "
    """
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        client.completions.create(model="demo", prompt="Generate an SQL query to show the 'username' and 'email' "
                                  "from the 'users' table.",
                                  extra_body={"structured_outputs": {"grammar": invalid_simplified_sql_grammar}})
