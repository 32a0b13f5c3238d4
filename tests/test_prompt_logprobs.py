"""Prompt logprobs on the real Paddle engine (demo checkpoint): each prompt token's logprob given the tokens before
it, computed chunk by chunk during the prefill, equals an independent reference (PaddleFormers' own forward over
the whole prompt at once, then log_softmax); chunked prompts give the same numbers as one pass; image placeholder
tokens are scored too; rows scoring their prompt change no greedy token of theirs or of their companions; the
HTTP forms (/v1/completions echo with logprobs and max_tokens 0, vLLM's prompt_logprobs on completions and chat)
and the 400s for bad values."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from serving.engines.builtin import decode, speedups
from serving.jobs import Finished, Prompt, SamplingParams
from serving.protocol import ChatTurn
from test_completions import sse
from test_continuous_batching import collect, wait_idle

GREEDY = {"temperature": 0, "repetition_penalty": 1.0}
PROMPT = "Once upon a time, in a land far away, there lived a scorer of prompts"


def greedy(max_tokens=6, **more):
    return SamplingParams(max_tokens=max_tokens, temperature=0, repetition_penalty=1.0, **more)


def text_prompt(engine, text=PROMPT) -> Prompt:
    ids = engine.encode(text)
    return Prompt({"input_ids": np.asarray([ids], dtype=np.int64),
                   "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}, len(ids), text, 0)


def run(engine, prompt, params) -> tuple:
    """(text, Finished, the job's prompt logprobs) of one request."""
    job = engine.submit(prompt, params)
    text, finish = collect(job)
    return text, finish, job.prompt_logprobs


def reference(engine, prompt) -> np.ndarray:
    """float32 [n, vocab]: log_softmax of PaddleFormers' own forward over the whole prompt in one pass (images
    included), in this thread while the worker is idle."""
    import paddle
    import paddle.nn.functional as F

    wait_idle(engine)
    inputs = {k: paddle.to_tensor(v) for k, v in prompt.arrays.items()}
    with speedups.library_code(engine.model), paddle.no_grad():
        out = engine.model(**inputs, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return F.log_softmax(logits.astype("float32"), axis=-1).numpy()[0]


def check_against(scores, expected: np.ndarray, ids, top: int, atol=2e-5) -> None:
    assert len(scores) == len(ids) and scores[0] is None
    for position in range(1, len(ids)):
        row, scored = expected[position - 1], scores[position]
        assert scored.id == ids[position]
        assert scored.logprob == pytest.approx(float(row[ids[position]]), abs=atol)
        exact = int((row > row[ids[position]]).sum()) + 1
        assert abs(scored.rank - exact) <= 1  # only a near-tie (within float rounding) may swap two places
        best = np.sort(row)[::-1][:top]
        assert [a.logprob for a in scored.top_logprobs] == pytest.approx(best.tolist(), abs=atol)
        assert [a.rank for a in scored.top_logprobs] == list(range(1, top + 1))


# ---------------------------------------------------------------- the engine

def test_prompt_logprobs_equal_a_whole_prompt_log_softmax(engine):
    prompt = text_prompt(engine)
    text, finish, scores = run(engine, prompt, greedy(prompt_logprobs=3))
    ids = prompt.arrays["input_ids"][0].tolist()
    check_against(scores, reference(engine, prompt), ids, top=3)
    assert finish.cached_tokens == 0
    assert text == run(engine, prompt, greedy())[0]  # scoring changes no token of the answer


def test_zero_alternatives_still_score_every_token(engine):
    prompt = text_prompt(engine, "Zero alternatives here, only the prompt's own tokens")
    _, _, scores = run(engine, prompt, greedy(max_tokens=1, prompt_logprobs=0))
    assert scores[0] is None and all(s.top_logprobs == [] and s.logprob <= 0 and s.rank >= 1 for s in scores[1:])


def test_a_cached_prefix_is_not_used_by_a_scoring_row_but_filled_by_it(engine):
    prompt = text_prompt(engine, "A prompt asked twice: first plainly, then scored, then plainly again. " * 3)
    plain, first, _ = run(engine, prompt, greedy())
    wait_idle(engine)
    scored_text, finish, scores = run(engine, prompt, greedy(prompt_logprobs=1))
    assert finish.cached_tokens == 0 and len(scores) == prompt.prompt_tokens  # the whole prompt prefilled
    check_against(scores, reference(engine, prompt), prompt.arrays["input_ids"][0].tolist(), top=1)
    assert scored_text == plain
    wait_idle(engine)
    again, finish, none = run(engine, prompt, greedy())
    assert again == plain and finish.cached_tokens > 0 and none is None


def test_chunked_prefill_gives_the_numbers_of_one_pass(engine, monkeypatch):
    prompt = text_prompt(engine, "A longer prompt, prefilled a few tokens at a time in many forward passes. " * 4)
    _, _, whole = run(engine, prompt, greedy(max_tokens=2, prompt_logprobs=2))
    monkeypatch.setattr(decode, "FORWARD_TOKENS", 8)  # far more tokens than one forward pass takes
    monkeypatch.setattr(decode, "SCORE_TOKENS", 3)  # and the logits of 3 positions at a time
    assert prompt.prompt_tokens > 5 * decode.FORWARD_TOKENS
    wait_idle(engine)
    import paddle

    from serving.engines.builtin import sampling

    prefill = decode.Prefill(engine.model, prompt.arrays, score_prompt=lambda rows, targets: (
        sampling.prompt_token_logprobs(rows, targets, 2, engine.tokenizer)))

    with paddle.no_grad():
        results = [prefill.run(11) for _ in range(-(-prompt.prompt_tokens // 11))]  # several turns of 11 tokens
    assert all(r is None for r in results[:-1]) and results[-1] is not None
    chunked = results[-1].prompt_logprobs
    assert len(chunked) == len(whole) == prompt.prompt_tokens and chunked[0] is None
    for a, b in zip(chunked[1:], whole[1:]):
        assert a.id == b.id and a.logprob == pytest.approx(b.logprob, abs=2e-5)
        assert [t.id for t in a.top_logprobs] == [t.id for t in b.top_logprobs]
    _, _, through_engine = run(engine, prompt, greedy(max_tokens=2, prompt_logprobs=2))  # the scheduler's path
    assert [s.logprob for s in through_engine[1:]] == pytest.approx([s.logprob for s in whole[1:]], abs=2e-5)


def test_a_prompt_with_an_image_scores_its_placeholder_tokens_too(engine):
    rng = np.random.default_rng(7)
    picture = Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8))
    prompt = engine.build_prompt([ChatTurn("user", [picture, "What is in this picture?"])])
    text, _, scores = run(engine, prompt, greedy(prompt_logprobs=2))
    ids = prompt.arrays["input_ids"][0].tolist()
    image_token = int(engine.model.config.image_token_id)
    placeholders = [i for i, t in enumerate(ids) if t == image_token]
    assert placeholders and all(scores[i].id == image_token for i in placeholders)
    check_against(scores, reference(engine, prompt), ids, top=2, atol=5e-5)
    again = engine.build_prompt([ChatTurn("user", [picture, "What is in this picture?"])])
    assert run(engine, again, greedy())[0] == text


def test_rows_with_and_without_scoring_in_one_batch_answer_as_alone(engine):
    prompts = [text_prompt(engine, f"Row number {i} of a mixed batch, some of them scoring their prompts.")
               for i in range(4)]
    alone = [run(engine, p, greedy(max_tokens=12))[0] for p in prompts]
    alone_scores = run(engine, prompts[1], greedy(max_tokens=1, prompt_logprobs=1))[2]
    wait_idle(engine)
    first = engine.submit(prompts[0], greedy(max_tokens=12))  # decoding when the others join
    head = next(iter(first))
    jobs = [engine.submit(p, greedy(max_tokens=12, prompt_logprobs=1 if i % 2 else None))
            for i, p in enumerate(prompts[1:], 1)]
    texts = [str(head) + "".join(str(e) for e in first if not isinstance(e, Finished))]
    for job in jobs:
        texts.append("".join(str(e) for e in job if not isinstance(e, Finished)))
    assert texts == alone
    assert [s.logprob for s in jobs[0].prompt_logprobs[1:]] == pytest.approx(
        [s.logprob for s in alone_scores[1:]], abs=2e-5)
    assert jobs[1].prompt_logprobs is None and jobs[2].prompt_logprobs is not None


def test_a_lone_row_not_scoring_runs_no_extra_lm_head(engine, request):
    """Rows that do not ask pay nothing: lm_head sees only the prompt's last position."""
    seen = []

    def counting(layer, inputs):  # a hook: a forward patched on the layer or its class may be shadowed
        seen.append(int(inputs[0].shape[1]))

    wait_idle(engine)
    hook = engine.model.lm_head.register_forward_pre_hook(counting)
    request.addfinalizer(hook.remove)
    run(engine, text_prompt(engine, "Nobody scores this prompt at all."), greedy(max_tokens=3))
    assert seen and set(seen) == {1}
    seen.clear()
    scored = text_prompt(engine, "Somebody scores this one.")
    run(engine, scored, greedy(max_tokens=1, prompt_logprobs=0))
    assert 2 < scored.prompt_tokens <= decode.SCORE_TOKENS
    assert sorted(seen) == [1, scored.prompt_tokens - 1]  # the answer's position, then every other position at once


# ---------------------------------------------------------------- HTTP

def complete(client, status=200, **body):
    body.setdefault("prompt", PROMPT)
    response = client.post("/v1/completions", json=body)
    assert response.status_code == status, response.get_json()
    return response.get_json()


def chat(client, status=200, **body):
    body.setdefault("messages", [{"role": "user", "content": "Score this question, please."}])
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.get_json()
    return response.get_json()


def test_echo_with_logprobs_scores_prompt_then_answer(client, engine):
    plain = complete(client, max_tokens=5, **GREEDY)["choices"][0]["text"]
    out = complete(client, max_tokens=5, echo=True, logprobs=1, **GREEDY)
    choice, n = out["choices"][0], out["usage"]["prompt_tokens"]
    assert choice["text"] == PROMPT + plain and out["usage"]["completion_tokens"] == 5
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n + 5
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert "".join(lp["tokens"][:n]) == PROMPT and lp["text_offset"][0] == 0
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][n] == len(PROMPT)
    expected = reference(engine, text_prompt(engine))
    ids = engine.encode(PROMPT)
    assert lp["token_logprobs"][1:n] == pytest.approx([float(expected[i - 1, ids[i]]) for i in range(1, n)], abs=2e-5)
    for token, logprob, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        # the most likely token and the token itself (keyed by its text, or "bytes:..." for part of a character)
        assert 1 <= len(top) <= 2 and any(value == pytest.approx(logprob) for value in top.values())


def test_max_tokens_0_with_echo_scores_the_prompt_alone(client):
    out = complete(client, max_tokens=0, echo=True, logprobs=0, **GREEDY)
    choice, n = out["choices"][0], out["usage"]["prompt_tokens"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 0 and out["usage"]["total_tokens"] == n
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == n and lp["token_logprobs"][0] is None
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])  # logprobs 0: the token itself
    with_answer = complete(client, max_tokens=3, echo=True, logprobs=0, **GREEDY)["choices"][0]["logprobs"]
    assert with_answer["token_logprobs"][:n] == lp["token_logprobs"]
    # a harness's loglikelihood request: the continuation's tokens scored as part of the prompt
    total = sum(lp["token_logprobs"][1:])
    assert total < 0


def test_streamed_echo_with_logprobs_matches_the_whole_answer(client):
    whole = complete(client, max_tokens=4, echo=True, logprobs=2, **GREEDY)["choices"][0]
    chunks = sse(client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "echo": True,
                                                       "logprobs": 2, "stream": True, **GREEDY}))
    assert chunks[0]["choices"][0]["text"] == PROMPT
    merged = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in chunks:
        lp = chunk["choices"][0]["logprobs"]
        for key in merged:
            merged[key] += lp[key] if lp else []
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert merged["tokens"] == whole["logprobs"]["tokens"]
    assert merged["text_offset"] == whole["logprobs"]["text_offset"]
    assert merged["token_logprobs"][0] is None
    assert merged["token_logprobs"][1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=1e-6)
    alone = sse(client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1,
                                                      "stream": True, **GREEDY}))
    assert "".join(c["choices"][0]["text"] for c in alone) == PROMPT
    assert alone[-1]["choices"][0]["finish_reason"] == "length"


def test_vllm_prompt_logprobs_on_completions(client):
    out = complete(client, max_tokens=3, prompt_logprobs=2, n=2, return_token_ids=True, **GREEDY)
    n = out["usage"]["prompt_tokens"]
    echo = complete(client, max_tokens=3, echo=True, logprobs=2, **GREEDY)["choices"][0]["logprobs"]
    for choice in out["choices"]:
        scores = choice["prompt_logprobs"]
        assert len(scores) == n and scores[0] is None
        for position, entry in enumerate(scores[1:], 1):
            assert 2 <= len(entry) <= 3
            ranked = sorted(entry.values(), key=lambda e: e["rank"])
            assert ranked[0]["rank"] == 1 and all(e["logprob"] <= 0 and isinstance(e["decoded_token"], str)
                                                  for e in ranked)
            own = entry[str(choice["prompt_token_ids"][position])]  # the prompt's own token is always there
            assert own["logprob"] == pytest.approx(echo["token_logprobs"][position], abs=1e-6)
    assert out["choices"][0]["logprobs"] is None  # prompt_logprobs alone: no legacy logprobs
    assert complete(client, max_tokens=2, **GREEDY)["choices"][0]["prompt_logprobs"] is None


def test_vllm_prompt_logprobs_on_chat_at_the_top_level(client, engine):
    out = chat(client, max_tokens=3, prompt_logprobs=1, return_token_ids=True, **GREEDY)
    scores, ids = out["prompt_logprobs"], out["prompt_token_ids"]
    assert len(scores) == len(ids) == out["usage"]["prompt_tokens"] and scores[0] is None
    prompt = engine.build_prompt([ChatTurn("user", ["Score this question, please."])])
    expected = reference(engine, prompt)
    for position, entry in enumerate(scores[1:], 1):
        own = entry[str(ids[position])]
        assert own["logprob"] == pytest.approx(float(expected[position - 1, ids[position]]), abs=2e-5)
        assert 1 <= len(entry) <= 2
    plain = chat(client, max_tokens=3, **GREEDY)
    assert "prompt_logprobs" not in plain
    assert plain["choices"][0]["message"] == out["choices"][0]["message"]


@pytest.mark.parametrize("body,param", [
    (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(prompt_logprobs="many"), "prompt_logprobs"),
    (dict(prompt_logprobs=1, stream=True), "prompt_logprobs"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-1, echo=True), "max_tokens"),
    (dict(echo=True, logprobs=21), "logprobs"),
], ids=["21", "-1", "a string", "streamed", "max_tokens 0 without echo", "max_tokens -1", "logprobs 21"])
def test_bad_values_on_completions_are_400_naming_the_field(client, body, param):
    error = complete(client, 400, **body)["error"]
    assert error["param"] == param, error


@pytest.mark.parametrize("body", [dict(prompt_logprobs=21), dict(prompt_logprobs=-1),
                                  dict(prompt_logprobs=1, stream=True)], ids=["21", "-1", "streamed"])
def test_bad_values_on_chat_are_400_naming_the_field(client, body):
    assert chat(client, 400, **body)["error"]["param"] == "prompt_logprobs"


def test_an_engine_without_prompt_logprobs_refuses_them(settings):
    from fake_engine import FakeEngine
    from serving.web.app import create_app

    fake = create_app(settings, FakeEngine()).test_client()
    error = chat(fake, 400, prompt_logprobs=1)["error"]
    assert (error["param"], error["code"]) == ("prompt_logprobs", "unsupported_parameter")


def test_the_real_vocabulary_scores_a_harness_request(vocab_client, vocab_engine):
    """A loglikelihood request of an evaluation harness (echo, logprobs 1, max_tokens 0) on Qwen's 151,936-token
    vocabulary: one entry per prompt token, and their logprobs equal a float64 log-sum-exp of the model's
    own logits over the whole prompt (numpy: Paddle's CPU log_softmax over this vocabulary is very slow)."""
    import paddle

    text = "The capital of France is Paris. \u5df4\u9ece\u662f\u6cd5\u56fd\u7684\u9996\u90fd\u3002"
    out = vocab_client.post("/v1/completions", json={"prompt": text, "echo": True, "logprobs": 1, "max_tokens": 0})
    assert out.status_code == 200, out.get_json()
    lp = out.get_json()["choices"][0]["logprobs"]
    ids = vocab_engine.encode(text)
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    # each token's own text: a character split across tokens shows as replacement characters in its parts
    assert "".join(lp["tokens"]).startswith("The capital of France is Paris. ")
    wait_idle(vocab_engine)
    with speedups.library_code(vocab_engine.model), paddle.no_grad():
        out = vocab_engine.model(input_ids=paddle.to_tensor([ids]), use_cache=False)
    logits = (out.logits if hasattr(out, "logits") else out[0]).numpy()[0].astype(np.float64)
    assert logits.shape[-1] == 151936
    expected = [logits[i - 1, ids[i]] - logits[i - 1].max()
                - np.log(np.exp(logits[i - 1] - logits[i - 1].max()).sum()) for i in range(1, len(ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
