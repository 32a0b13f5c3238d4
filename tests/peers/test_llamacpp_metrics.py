"""Ported from llama.cpp tools/server/tests/unit/test_metrics.py at commit
035019cf5630e012098bac30218fc1eb451178de (github.com/ggml-org/llama.cpp). The checks are re-expressed here
against this project's demo server; each upstream assertion is kept, except these deliberate differences:

- the request goes to OpenAI's /v1/chat/completions, the prompt as a user message (llama.cpp's own /completion
  body is not served, and this server's /v1/completions does not report cached tokens): llama.cpp's
  timings.cache_n is OpenAI's usage.prompt_tokens_details.cached_tokens;
- the metrics are this server's names: llama.cpp:prompt_tokens_cache_total is
  qwenvl_prefix_cache_hit_tokens_total, its prompt_cache_hit_ratio is read from
  qwenvl_prefix_cache_lookups_total by result (GET /metrics is always on here: no --metrics flag).
"""

from __future__ import annotations

import re

import requests

from peer_server import server  # noqa: F401  (one demo server per module)


def test_prompt_cache_metrics(server):
    req = {
        "messages": [{"role": "user", "content": "I believe the meaning of life is"}],  # llama.cpp: prompt
        "temperature": 0.0,
        "top_k": 1,
        "max_tokens": 8,  # llama.cpp: n_predict (and cache_prompt, always on here)
    }
    res = requests.post(server.base_url + "/v1/chat/completions", json=req, timeout=60)
    assert res.status_code == 200

    res = requests.post(server.base_url + "/v1/chat/completions", json=req, timeout=60)
    assert res.status_code == 200
    assert res.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # llama.cpp: timings.cache_n

    res = requests.get(server.base_url + "/metrics", timeout=60)
    assert res.status_code == 200
    assert re.search(r"^qwenvl_prefix_cache_hit_tokens_total\s+[1-9]", res.text, re.M)
    assert "qwenvl_prefix_cache_lookups_total{" in res.text  # llama.cpp: prompt_cache_hit_ratio
