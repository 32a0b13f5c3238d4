"""Ported from llama.cpp tools/server/tests/unit/test_chat_truncate.py at commit
a8c0adccfd64ac52437791e8b6e9f81530673049 (github.com/ggml-org/llama.cpp). The checks are re-expressed here
against this project's demo server, its context cut to 256 tokens for this module (upstream: n_ctx 512 over 2
slots, 256 a slot); each upstream assertion is kept, except these deliberate differences:

- a conversation longer than the context is a 400 of OpenAI's type invalid_request_error with code
  context_length_exceeded (llama.cpp: type exceed_context_size_error);
- llama.cpp's --chat-truncate (dropping the oldest turns until the prompt fits) is not offered: the client
  keeps its conversation within the context (GET /v1/models tells max_model_len; /tokenize counts a
  conversation), so those tests are skipped with the reason.
"""

from __future__ import annotations

import pytest
import requests

from peer_server import server  # noqa: F401  (one demo server per module)

N_CTX = 256
SYSTEM = "You are a helpful assistant."
FINAL_USER = "[U Last]This is the most recent user message."
MAX_COMPLETION_TOKENS = 1
NOT_OFFERED = ("llama.cpp's --chat-truncate (the oldest turns dropped until the prompt fits) is not offered: a "
               "conversation longer than the context is refused with context_length_exceeded")


@pytest.fixture(scope="module", autouse=True)
def small_context(engine):
    """The shared demo engine with a 256-token context for this module (llama.cpp: --ctx-size 512, 2 slots)."""
    saved = engine.context_length
    engine.context_length = N_CTX
    yield
    engine.context_length = saved


def get_messages(n_turns=128, include_final_user=True):
    msgs = [{"role": "system", "content": SYSTEM}]
    for i in range(1, n_turns + 1):
        msgs.append({"role": "user", "content": f"[U{i:03d}] Please explain topic {i:03d} in detail."})
        msgs.append({"role": "assistant", "content": f"[A{i:03d}] Here is my explanation of topic {i:03d}."})
    if include_final_user:
        msgs.append({"role": "user", "content": FINAL_USER})
    return msgs


def test_chat_truncate_overflow_without_chat_truncate_flag(server):
    res = requests.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "max_completion_tokens": MAX_COMPLETION_TOKENS,
        "messages": get_messages(),
    })
    assert res.status_code == 400
    error = res.json()["error"]  # llama.cpp: type exceed_context_size_error
    assert error["type"] == "invalid_request_error" and error["code"] == "context_length_exceeded"


@pytest.mark.parametrize("name", [
    "test_chat_truncate_prevents_overflow",
    "test_chat_truncate_no_op",
    "test_chat_truncate_prompt_within_budget",
    "test_chat_truncate_drops_oldest_keeps_newest",
    "test_chat_truncate_non_user_newest_preserved",
    "test_chat_truncate_n_predict_threshold_vs_max_completion_tokens",
    "test_chat_truncate_target_capped_to_budget",
    "test_chat_truncate_very_low_fraction_preserves_last_user_msg",
    "test_chat_truncate_max_keep_zero_rejected",
    "test_chat_truncate_max_keep_one_rejected",
    "test_chat_truncate_with_images_prevents_overflow",
    "test_chat_truncate_with_images_drops_oldest_keeps_newest",
    "test_chat_truncate_after_sleep_wake",
    "test_chat_truncate_cache_timing",
])
def test_chat_truncate(server, name):
    pytest.skip(NOT_OFFERED)
