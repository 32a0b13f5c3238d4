"""Ported from vLLM tests/entrypoints/openai/test_tokenization.py at commit 0091c9502ffb9f6761588a21b8d917db8ede4990
(github.com/vllm-project/vllm), the whole module.
The checks are re-expressed here against this project's demo server (/tokenize, /detokenize); the expected ids
come, as upstream's do, from the checkpoint's own tokenizer and chat template loaded apart from the server. Each
upstream assertion is kept, except these deliberate differences:

- max_model_len is the served model's context (the max_model_len of its /v1/models entry), not upstream's
  --max-model-len 8192;
- token_strs is absent, not null, when return_token_strs is not asked (checked with .get);
- /detokenize answers {"content", "prompt"} (llama.cpp's and vLLM's names for the text, one endpoint for both
  peers), so its "prompt" is compared, not the whole body;
- Qwen's tokenizer adds no special tokens (no BOS), so add_special_tokens true and false give the same ids here;
- /tokenizer_info needs vLLM's --enable-tokenizer-info-endpoint and is not served: its five tests are skipped.
"""

from __future__ import annotations

import pytest
import requests
from paddleformers.transformers import AutoTokenizer

from peer_server import server  # noqa: F401  (one demo server per module)

TOKENIZER_INFO = "vLLM CLI flag: /tokenizer_info needs --enable-tokenizer-info-endpoint; this server does not serve it"

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"location": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tokenizer(engine):
    return AutoTokenizer.from_pretrained(engine.info.source)  # the checkpoint's files, loaded apart from the engine


@pytest.fixture(scope="module")
def max_model_len(server):
    return requests.get(server.base_url + "/v1/models", timeout=10).json()["data"][0]["max_model_len"]


def post(server, path, body):
    response = requests.post(server.base_url + path, json=body, timeout=60)
    response.raise_for_status()
    return response.json()


def test_tokenize_completions(server, tokenizer, max_model_len):
    for add_special in [False, True]:
        prompt = "vllm1 This is a test prompt."
        tokens = tokenizer.encode(prompt, add_special_tokens=add_special)
        result = post(server, "/tokenize", {"add_special_tokens": add_special, "model": "demo", "prompt": prompt})
        assert result["tokens"] == tokens
        assert result["count"] == len(tokens)
        assert result["max_model_len"] == max_model_len
        assert result.get("token_strs") is None


def conversations():
    """Upstream's loop: each (add_generation_prompt, continue_final_message) pair but both true."""
    for add_generation in [False, True]:
        for add_special in [False, True]:
            conversation = [{"role": "user", "content": "Hi there!"},
                            {"role": "assistant", "content": "Nice to meet you!"},
                            {"role": "user", "content": "Can I ask a question? vllm1"}]
            for continue_final in [False, True]:
                if add_generation and continue_final:
                    continue
                if continue_final:
                    conversation.append({"role": "assistant", "content": "Sure,"})
                yield add_generation, add_special, continue_final, list(conversation)


def check_chat(server, tokenizer, max_model_len, tools=None):
    for add_generation, add_special, continue_final, conversation in conversations():
        if tools:  # upstream's tools test asks about the weather instead
            conversation = [{"role": "user", "content": "What's the weather like in Paris today?"}] + (
                [{"role": "assistant", "content": "Sure,"}] if continue_final else [])
        prompt = tokenizer.apply_chat_template(conversation, tools=tools, add_generation_prompt=add_generation,
                                               continue_final_message=continue_final, tokenize=False)
        tokens = tokenizer.encode(prompt, add_special_tokens=add_special)
        body = {"add_generation_prompt": add_generation, "continue_final_message": continue_final,
                "add_special_tokens": add_special, "messages": conversation, "model": "demo"}
        if tools:
            body["tools"] = tools
        result = post(server, "/tokenize", body)
        assert result["tokens"] == tokens
        assert result["count"] == len(tokens)
        assert result["max_model_len"] == max_model_len
        assert result.get("token_strs") is None


def test_tokenize_chat(server, tokenizer, max_model_len):
    check_chat(server, tokenizer, max_model_len)


def test_tokenize_chat_with_tools(server, tokenizer, max_model_len):
    check_chat(server, tokenizer, max_model_len, tools=TOOLS)


def test_tokenize_with_return_token_strs(server, tokenizer, max_model_len):
    prompt = "This is a token_strs test prompt! vllm1"
    result = post(server, "/tokenize", {"prompt": prompt, "model": "demo", "return_token_strs": True})
    tokens = tokenizer.encode(prompt, add_special_tokens=True)
    assert result["tokens"] == tokens
    assert result["count"] == len(tokens)
    assert result["max_model_len"] == max_model_len
    assert result["token_strs"] == tokenizer.convert_ids_to_tokens(tokens)


def test_detokenize(server, tokenizer):
    prompt = "This is a test prompt. vllm1"
    tokens = tokenizer.encode(prompt, add_special_tokens=False)
    assert post(server, "/detokenize", {"model": "demo", "tokens": tokens})["prompt"] == prompt


@pytest.mark.parametrize("name", ["basic", "schema", "added_tokens_structure", "consistency_with_tokenize",
                                  "chat_template"])
def test_tokenizer_info(server, name):
    pytest.skip(TOKENIZER_INFO)
