"""Ported from llama.cpp tools/server/tests/unit/test_template.py at commit
581e9bec6e7b732ee48b9f6da16f0185179b8f47 (github.com/ggml-org/llama.cpp). The checks are re-expressed here
against this project's demo server; each upstream assertion is kept, except these deliberate differences:

- llama.cpp's /apply-template is read here through POST /tokenize with "messages" (vLLM's form, which takes
  add_generation_prompt too): the prompt is its token ids, decoded;
- one chat template is served, Qwen2.5-VL's: the generation prompt is "<|im_start|>assistant" (upstream:
  Llama 3.3's header); the rows of other templates are skipped with the reason: thinking sections
  (--reasoning; Qwen2.5-VL has none), today's date written by Llama 3's template, llama.cpp's
  --system-message-prefix.
"""

from __future__ import annotations

import pytest
import requests

from peer_server import server  # noqa: F401  (one demo server per module)
from test_llamacpp_tool_call import TEST_TOOL


def apply_template(server, engine, body):
    """The prompt a chat request makes, as text (llama.cpp: POST /apply-template -> {"prompt"})."""
    res = requests.post(server.base_url + "/tokenize", json=body, timeout=60)
    return res, engine.tokenizer.decode(res.json()["tokens"]) if res.status_code == 200 else None


@pytest.mark.parametrize("tools", [None, [], [TEST_TOOL]])
def test_reasoning(server, tools):
    pytest.skip("the peers' thinking templates (DeepSeek R1, Qwen3, QwQ, Command R7B) and llama.cpp's --reasoning: "
                "Qwen2.5-VL's template has no thinking section")


@pytest.mark.parametrize("tools", [None, [], [TEST_TOOL]])
def test_date_inside_prompt(server, tools):
    pytest.skip("Llama 3's and firefunction's templates write today's date; Qwen2.5-VL's writes none")


def test_system_message_prefix(server):
    pytest.skip("llama.cpp's --system-message-prefix: no such setting here")


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_add_generation_prompt(server, engine, add_generation_prompt):
    expected_generation_prompt = "<|im_start|>assistant"  # upstream: Llama 3.3's assistant header
    res, prompt = apply_template(server, engine, {
        "messages": [
            {"role": "user", "content": "What is today?"},
        ],
        "add_generation_prompt": add_generation_prompt,
    })
    assert res.status_code == 200
    if add_generation_prompt:
        assert expected_generation_prompt in prompt, f"Expected generation prompt in content ({prompt})"
    else:
        assert expected_generation_prompt not in prompt, f"Did not expect generation prompt in content ({prompt})"
