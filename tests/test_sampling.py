"""serving.engines.builtin.sampling picks what PaddleFormers' generate would, row by row, with per-row settings and
seeds, and the same tokens for the same seeds as the full-vocabulary code it replaced (bench/sampling_reference.py)
while sorting only candidates at the real vocabulary."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddleformers.generation.logits_process import TopKProcess, TopPProcess

from serving.jobs import SamplingParams, TokenLogprob
from serving.model.loader import load_model
from bench import sampling_reference as reference
from serving.engines.builtin.sampling import (RowSampler, draw, generation_defaults, greedy_picks, kept_tokens,
                                              next_tokens, penalized_logits, penalized_on_host, sampling_probs,
                                              token_logprobs, token_names)

VOCAB = 3000


@pytest.fixture(scope="module")
def loaded(settings):
    """The demo model through the project's loader (which applies serving.model.paddle_fixes)."""
    return load_model(settings)


@pytest.fixture(scope="module")
def tokenizer(loaded):
    return loaded.processor.tokenizer


def params(**settings) -> SamplingParams:
    return SamplingParams(max_tokens=16, **settings)


def random_logits(rng, rows, vocab=VOCAB, scale=4.0):
    return paddle.to_tensor((rng.standard_normal((rows, vocab)) * scale).astype(np.float32))


def generate_processors(model, repetition_penalty):
    """The processor list generate builds for these settings (no min length, no forced tokens)."""
    return model.get_logits_processor(max_length=10_000, eos_token_id=model.generation_config.eos_token_id,
                                      repetition_penalty=repetition_penalty)


def seen_ids_with_the_top_token(rng, row_logits, length=40):
    """Random prompt ids that include the row's most likely token, so the penalty matters."""
    ids = rng.integers(0, row_logits.shape[-1], length).tolist()
    ids[rng.integers(0, length)] = int(np.argmax(row_logits))
    return ids


def filtered_probs(scores, samplers) -> np.ndarray:
    """[S, V] numpy: each row's kept probabilities in place, 0 elsewhere (the dense form generate uses)."""
    probs = sampling_probs(scores, range(len(samplers)), samplers)
    return np.stack([kept_tokens(row, s.top_k, s.top_p).dense() for row, s in zip(probs, samplers)])


def test_greedy_is_the_argmax_of_generates_processors(loaded):
    rng = np.random.default_rng(1)
    penalties = [1.0, 1.05, 1.3, 0.8, 2.0, 1.05, None, 1.5]
    logits = random_logits(rng, len(penalties))
    raw = logits.numpy()
    prompts = [seen_ids_with_the_top_token(rng, raw[i]) for i in range(len(penalties))]
    answers = [rng.integers(0, VOCAB, 5).tolist() for _ in penalties]
    samplers = []
    for penalty, prompt, answer in zip(penalties, prompts, answers):
        sampler = RowSampler(params(temperature=0, repetition_penalty=penalty), {}, prompt)
        for token in answer:
            sampler.accept(token)
        samplers.append(sampler)

    tokens, logprobs = next_tokens(logits, samplers)
    on_host = penalized_on_host(logits, samplers)

    for i, penalty in enumerate(penalties):
        input_ids = paddle.to_tensor([prompts[i] + answers[i]], dtype="int64")
        processed = generate_processors(loaded.model, penalty)(input_ids, logits[i:i + 1])
        assert tokens[i] == int(paddle.argmax(processed, axis=-1))
        np.testing.assert_array_equal(on_host[i], processed.numpy()[0])  # bit for bit
    assert logprobs == [None] * len(penalties)
    assert greedy_picks(penalized_logits(logits, samplers)).tolist() == tokens  # a device's path: a tensor
    changed = [tokens[i] != int(np.argmax(raw[i])) for i in range(len(penalties))]
    assert any(changed) and not all(changed)  # the penalty really decided some rows, and not others


def test_the_repetition_penalty_on_a_cpu_equals_generates_bit_for_bit(loaded):
    """generate divides by the penalty as a Python number (IEEE division, as numpy's); Paddle's CPU
    division of two same-shape tensors, which the engine's Paddle path used, is 1 ulp off on ~0.5% of
    values. The CPU path (numpy) gives generate's values exactly."""
    rng = np.random.default_rng(15)
    penalties = [1.05, 0.9, 1.3, 1.2]
    logits = random_logits(rng, len(penalties))
    prompts = [rng.integers(0, VOCAB, 1500).tolist() for _ in penalties]
    samplers = [RowSampler(params(temperature=0, repetition_penalty=p), {}, ids) for p, ids in zip(penalties, prompts)]

    on_host = penalized_on_host(logits, samplers)
    through_paddle = penalized_logits(logits, samplers).numpy()

    for i, penalty in enumerate(penalties):
        processed = generate_processors(loaded.model, penalty)(paddle.to_tensor([prompts[i]]), logits[i:i + 1])
        np.testing.assert_array_equal(on_host[i], processed.numpy()[0])
    np.testing.assert_array_max_ulp(through_paddle, on_host, maxulp=1)
    assert 0 < np.count_nonzero(through_paddle != on_host) < 0.02 * sum(len(set(p)) for p in prompts)


def test_half_precision_repetition_penalty_rounds_like_generate():
    """generate applies the penalty in the logits' dtype (bfloat16 on a GPU): `score * penalty` there."""
    rng = np.random.default_rng(2)
    logits = random_logits(rng, 2, vocab=500, scale=8.0).astype("bfloat16")
    seen = [list(range(0, 500, 2)), list(range(1, 500, 3))]
    penalties = [1.05, 1.3]
    samplers = [RowSampler(params(temperature=0, repetition_penalty=p), {}, ids) for p, ids in zip(penalties, seen)]

    ours = penalized_logits(logits, samplers).numpy()

    for row, (penalty, ids) in enumerate(zip(penalties, seen)):
        score = paddle.gather(logits[row], paddle.to_tensor(ids))  # bfloat16
        multiplied, divided = (score * penalty).astype("float32"), (score / penalty).astype("float32")
        expected = np.where(score.astype("float32").numpy() < 0, multiplied.numpy(), divided.numpy())
        np.testing.assert_array_equal(ours[row, ids], expected)
        others = np.setdiff1d(np.arange(500), ids)
        np.testing.assert_array_equal(ours[row, others], logits[row].astype("float32").numpy()[others])


SAMPLING_CASES = [  # temperature, top_k, top_p, repetition_penalty
    (1.0, 0, 1.0, 1.0),
    (0.7, 50, 1.0, 1.05),
    (1.3, 0, 0.9, 1.0),
    (0.5, 20, 0.8, 1.2),
    (0.1, 1, 0.001, 1.05),
    (2.0, 3000, 0.95, 1.0),
]


def test_sampling_rows_draw_from_generates_distribution(loaded):
    rng = np.random.default_rng(3)
    logits = random_logits(rng, len(SAMPLING_CASES), scale=2.0)
    raw = logits.numpy()
    prompts = [seen_ids_with_the_top_token(rng, raw[i]) for i in range(len(SAMPLING_CASES))]
    samplers = [RowSampler(params(temperature=t, top_k=k, top_p=p, repetition_penalty=r, seed=i), {}, prompts[i])
                for i, (t, k, p, r) in enumerate(SAMPLING_CASES)]

    ours = filtered_probs(penalized_logits(logits, samplers), samplers)

    for i, (temperature, top_k, top_p, penalty) in enumerate(SAMPLING_CASES):
        # generate's sample(): processors, then / temperature, softmax, TopKProcess, TopPProcess
        row = generate_processors(loaded.model, penalty)(paddle.to_tensor([prompts[i]]), logits[i:i + 1])
        if temperature != 1.0:
            row = row / temperature
        probs = F.softmax(row)
        if top_k != 0:
            probs = TopKProcess(probs, top_k, 1)
        if top_p < 1.0:
            probs = TopPProcess(probs, top_p, 1)
        np.testing.assert_array_equal(ours[i], probs.numpy()[0])
    kept = (ours > 0).sum(axis=1)
    assert kept[4] == 1 and kept[1] <= 50 and kept[0] == VOCAB  # the filters really filtered


def test_the_models_defaults_fill_what_the_request_leaves_out(loaded):
    defaults = generation_defaults(loaded.model.generation_config)
    sampler = RowSampler(params(), defaults, [1, 2])
    # the demo checkpoint carries Qwen2.5-VL's published generation_config
    assert (sampler.temperature, sampler.top_k, sampler.top_p, sampler.repetition_penalty) == (0.1, 1, 0.001, 1.05)
    assert not sampler.greedy
    assert RowSampler(params(temperature=0), defaults, []).greedy
    assert RowSampler(params(), {**defaults, "do_sample": False}, []).greedy
    assert RowSampler(params(temperature=0.9), {**defaults, "do_sample": False}, []).temperature == 0.9
    assert RowSampler(params(top_k=-1, top_p=0.5), defaults, []).top_k == 0  # vLLM's "no top-k"
    for impossible in (dict(temperature=-0.5), dict(top_p=float("nan")), dict(repetition_penalty=0.0)):
        with pytest.raises(ValueError):
            RowSampler(params(**impossible), defaults, [])


def test_draws_follow_the_filtered_distribution():
    """4000 rows, same logits, different seeds: token frequencies match the kept probabilities."""
    rows = 4000
    base = np.log(np.array([0.05, 0.3, 0.02, 0.25, 0.2, 0.1, 0.05, 0.03], dtype=np.float32))
    logits = paddle.to_tensor(np.tile(base, (rows, 1)))
    samplers = [RowSampler(params(temperature=1.0, top_p=0.8, seed=seed), {}, []) for seed in range(rows)]

    tokens, _ = next_tokens(logits, samplers)

    # top_p 0.8 keeps 0.3, 0.25, 0.2 (0.75) and the 0.1 that crosses 0.8
    expected = np.array([0, 0.3, 0, 0.25, 0.2, 0.1, 0, 0]) / 0.85
    counts = np.bincount(tokens, minlength=len(base))
    assert counts[expected == 0].sum() == 0
    sigma = np.sqrt(rows * expected * (1 - expected))
    assert np.all(np.abs(counts - rows * expected) < 4 * sigma + 1)


def decode_steps(samplers, row_logits_per_step):
    """Run steps of next_tokens + accept; row_logits_per_step[t] is [B, V] numpy."""
    out = [[] for _ in samplers]
    for step_logits in row_logits_per_step:
        tokens, _ = next_tokens(paddle.to_tensor(step_logits), samplers)
        for sampler, token, seq in zip(samplers, tokens, out):
            sampler.accept(token)
            seq.append(token)
    return out


def test_a_seeded_row_draws_the_same_tokens_alone_and_anywhere_in_a_batch():
    rng = np.random.default_rng(4)
    steps = 12
    mine = (rng.standard_normal((steps, VOCAB)) * 1.5).astype(np.float32)
    others = (rng.standard_normal((steps, 3, VOCAB)) * 1.5).astype(np.float32)
    settings = dict(temperature=0.9, top_k=200, top_p=0.95, repetition_penalty=1.1, presence_penalty=0.5,
                    frequency_penalty=0.3)

    def seeded(seed=1234):
        return RowSampler(params(seed=seed, **settings), {}, [5, 6, 7])

    alone = decode_steps([seeded()], mine[:, None, :])[0]
    assert len(set(alone)) > 1  # really sampled, not a constant pick
    for position in range(4):
        companions = [RowSampler(params(temperature=0), {}, [1]),
                      RowSampler(params(temperature=1.5, seed=99), {}, []),
                      RowSampler(params(temperature=0.7, top_k=5), {}, [2, 3])]  # unseeded
        samplers = companions[:position] + [seeded()] + companions[position:]
        batch = np.insert(others, position, mine, axis=1)
        assert decode_steps(samplers, batch)[position] == alone

    assert decode_steps([seeded(seed=4321)], mine[:, None, :])[0] != alone


def test_presence_and_frequency_penalties_touch_only_answer_tokens_by_their_amounts():
    rng = np.random.default_rng(5)
    logits = random_logits(rng, 2)
    raw = logits.numpy()
    prompt = [1, 2, 3, 40]
    answer = [3, 3, 3, 7, 9, 7]
    counts = {3: 3, 7: 2, 9: 1}
    plain = RowSampler(params(temperature=0, presence_penalty=0.5, frequency_penalty=0.25), {}, prompt)
    with_repetition = RowSampler(params(temperature=0, presence_penalty=-0.4, frequency_penalty=1.5,
                                        repetition_penalty=1.2), {}, prompt)
    for token in answer:
        plain.accept(token)
        with_repetition.accept(token)

    out = penalized_logits(logits, [plain, with_repetition]).numpy()
    np.testing.assert_array_equal(penalized_on_host(logits, [plain, with_repetition]), out)

    delta = out[0] - raw[0]
    for token, count in counts.items():
        assert delta[token] == pytest.approx(-(0.5 + 0.25 * count), abs=1e-5)
    untouched = np.setdiff1d(np.arange(VOCAB), list(counts))
    assert np.all(delta[untouched] == 0)  # prompt tokens 1, 2, 40 included: not the answer

    # repetition penalty first (prompt and answer), then presence and frequency (answer only)
    repeated = raw[1].copy()
    for token in set(prompt + answer):
        repeated[token] = repeated[token] * 1.2 if repeated[token] < 0 else repeated[token] / 1.2
    for token, count in counts.items():
        repeated[token] -= -0.4 + 1.5 * count
    np.testing.assert_allclose(out[1], repeated, rtol=1e-6, atol=1e-6)


def test_logprobs_are_raw_log_softmax_with_sorted_alternatives(tokenizer):
    rng = np.random.default_rng(6)
    vocab = 576  # the demo model's vocabulary (padded past the tokenizer's 538 ids)
    raw = (rng.standard_normal((4, vocab)) * 3.0).astype(np.float32)
    raw[2, 10], raw[2, 11] = 20.0, 19.5  # a greedy row whose pick the frequency penalty will move
    logits = paddle.to_tensor(raw)
    raw = raw.astype(np.float64)
    reference = raw - np.log(np.exp(raw - raw.max(1, keepdims=True)).sum(1, keepdims=True)) - raw.max(1, keepdims=True)
    samplers = [
        RowSampler(params(temperature=0.8, top_k=10, seed=1, logprobs=True, top_logprobs=5,
                          repetition_penalty=1.3, presence_penalty=1.0), {}, list(range(100))),
        RowSampler(params(temperature=0), {}, []),
        RowSampler(params(temperature=0, logprobs=True, top_logprobs=0, frequency_penalty=2.0), {}, []),
        RowSampler(params(temperature=1.0, seed=2, logprobs=True, top_logprobs=20), {}, []),
    ]
    samplers[2].accept(10)  # now 18.0 against 19.5: the pick moves, the logprobs stay raw

    tokens, logprobs = next_tokens(logits, samplers, tokenizer)

    assert logprobs[1] is None
    for i, want in ((0, 5), (2, 0), (3, 20)):
        entry = logprobs[i]
        assert isinstance(entry, TokenLogprob)
        assert entry.logprob == pytest.approx(reference[i, tokens[i]], abs=1e-5)
        assert len(entry.top_logprobs) == want
        values = [alt.logprob for alt in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        np.testing.assert_allclose(values, np.sort(reference[i])[::-1][:want], atol=1e-5)
        names = token_names(tokenizer)
        for alt, token_id in zip(entry.top_logprobs, np.argsort(-reference[i])[:want]):
            assert (alt.token, bytes(alt.bytes)) == names(int(token_id))
    assert tokens[2] == 11


def test_token_text_and_bytes_as_openai_shows_them(tokenizer):
    names = token_names(tokenizer)
    for word in ("Hello", " world", " the", "!"):
        for token_id in tokenizer(word, add_special_tokens=False)["input_ids"]:
            text, raw = names(token_id)
            assert raw.decode("utf-8") == text == tokenizer.decode([token_id])
    assert names(tokenizer.convert_tokens_to_ids("\u0120the")) == (" the", b" the")  # byte-level spelling of " "

    # a byte-level token that is only the first byte of 这 (E8 BF 99)
    first_byte = tokenizer.convert_tokens_to_ids("\u00e8")
    text, raw = names(first_byte)
    assert raw == b"\xe8" and "这".encode("utf-8").startswith(raw)
    assert text == "\ufffd" == tokenizer.decode([first_byte])
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    whole = tokenizer("这", add_special_tokens=False)["input_ids"]
    assert b"".join(names(t)[1] for t in whole).decode("utf-8") == "这"

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert names(im_end) == ("<|im_end|>", b"<|im_end|>")
    assert names(len(tokenizer) + 3) == ("", b"")  # a padded vocabulary id the tokenizer does not know

    logits = np.full((1, 576), -5.0, dtype=np.float32)
    logits[0, first_byte] = 5.0
    _, (entry,) = next_tokens(paddle.to_tensor(logits), [RowSampler(params(temperature=0, logprobs=True), {}, [])],
                              tokenizer)
    assert (entry.token, entry.bytes) == ("\ufffd", [0xE8])


def test_manual_cached_greedy_decode_matches_generate(loaded):
    model, processor = loaded.model, loaded.processor
    tokenizer = processor.tokenizer
    text = processor.apply_chat_template([{"role": "user", "content": "Describe the sky at night."}],
                                         tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    max_new = 12
    penalty = model.generation_config.repetition_penalty  # 1.05, so the penalty is part of the parity

    with paddle.no_grad():
        ids, _ = model.generate(input_ids=paddle.to_tensor([prompt]), attention_mask=paddle.ones([1, len(prompt)],
                                dtype="int64"), max_new_tokens=max_new, decode_strategy="greedy_search",
                                repetition_penalty=penalty, eos_token_id=list(eos), use_cache=True)
        expected = ids.numpy()[0].tolist()

        sampler = RowSampler(params(temperature=0), generation_defaults(model.generation_config), prompt)
        assert sampler.repetition_penalty == penalty
        answer, past, feed = [], None, prompt
        while len(answer) < max_new:
            start = len(prompt) + len(answer) - len(feed)
            positions = paddle.arange(start, start + len(feed), dtype="int64").reshape([1, 1, -1]).expand([3, 1, -1])
            out = model(input_ids=paddle.to_tensor([feed]), position_ids=positions, past_key_values=past,
                        attention_mask=paddle.ones([1, start + len(feed)], dtype="int64"), use_cache=True,
                        return_dict=True)
            past = out.past_key_values
            (token,), _ = next_tokens(out.logits[:, -1, :], [sampler])
            sampler.accept(token)
            answer.append(token)
            if token in eos:
                break
            feed = [token]

    assert answer == expected
    assert len(set(answer)) > 1


# ---------------------------------------------------------------- the same tokens as the full sort (bench.sampling_reference)

REAL_VOCAB = 151_936
EQUALITY_CASES = [  # temperature, top_k, top_p, repetition_penalty, presence, frequency
    (1e-6, 50, 1.0, 1.05, 0.0, 0.0),  # Qwen2.5-VL-3B's published defaults (top_k 50 filled in by PaddleFormers)
    (0.1, 1, 0.001, 1.05, 0.0, 0.0),  # the defaults several Qwen VL checkpoints publish
    (0.7, 0, 0.8, 1.0, 0.0, 0.0),
    (1.0, 0, 1.0, 1.0, 0.0, 0.0),  # nothing filtered: the whole row is drawn from
    (1.0, 0, 0.001, 1.0, 0.0, 0.0),
    (1.3, 0, 0.95, 1.0, 0.5, 0.25),
    (0.9, 40, 0.9, 1.2, -0.4, 1.5),
    (2.0, 0, 0.999, 1.05, 0.0, 0.0),  # flat: the nucleus needs thousands of tokens (the full fallback)
    (0.5, 3000, 0.9, 1.0, 0.0, 0.0),  # top_k >= vocabulary: no top-k
    (0.6, 7, 1.0, 0.9, 0.0, 0.0),
]


def equality_samplers(rng, vocab, cases, seed=0):
    samplers = []
    for j, (t, k, p, r, presence, frequency) in enumerate(cases):
        sampler = RowSampler(params(temperature=t, top_k=k, top_p=p, repetition_penalty=r, presence_penalty=presence,
                                    frequency_penalty=frequency, seed=seed + j), {}, rng.integers(0, vocab, 60).tolist())
        for token in rng.integers(0, vocab, 6):
            sampler.accept(int(token))
        samplers.append(sampler)
    return samplers


def straddled_tie(probs, reference_row, top_p) -> bool:
    """True when top-p's crossing token shares its probability with another token (probs: the row before
    filtering): which of those the full sort kept was std::sort's choice (ours: the lower ids)."""
    values = np.sort(reference_row[reference_row > 0])[::-1]
    if top_p >= 1.0 or values.size == 0:
        return False
    crossing = np.cumsum(values, dtype=np.float32) > np.float32(top_p)
    if not crossing.any():
        return False
    return np.count_nonzero(probs == values[int(np.argmax(crossing))]) > 1


def boundary_uniforms(rng, kept, count) -> list:
    """Random uniforms plus those that land exactly on the cumulative sums' steps (and 0 and the largest)."""
    cdf = np.cumsum(kept.astype(np.float64))
    steps = np.flatnonzero(kept)[:count]
    exact = [cdf[i] / cdf[-1] for i in steps] + [np.nextafter(cdf[i] / cdf[-1], 0) for i in steps]
    return [0.0, float(np.nextafter(1.0, 0.0)), *rng.random(count).tolist(), *[float(u) for u in exact if u < 1.0]]


def assert_same_filter_and_draws(rng, logits, samplers, uniforms=30):
    scores = reference.penalized_logits(logits, samplers)
    np.testing.assert_array_equal(penalized_logits(logits, samplers).numpy(), scores.numpy())
    if logits.dtype == paddle.float32:  # a CPU's path: IEEE division, as generate's (see the next test)
        np.testing.assert_array_max_ulp(penalized_on_host(logits, samplers), scores.numpy(), maxulp=1)
    expected = reference.sampling_probs(scores, samplers).numpy()
    probs = sampling_probs(scores, range(len(samplers)), samplers)  # a device's path (a tensor)
    np.testing.assert_array_equal(sampling_probs(scores.numpy(), range(len(samplers)), samplers), probs)  # a CPU's
    checked = 0
    for j, sampler in enumerate(samplers):
        kept = kept_tokens(probs[j], sampler.top_k, sampler.top_p)
        dense = kept.dense()
        if kept.ids is not None:
            everything = np.concatenate([kept.ids, kept.tied])
            assert np.unique(everything).size == everything.size and np.all(dense[everything] > 0)
        if straddled_tie(probs[j], expected[j], sampler.top_p):
            # test_a_tie_across_the_top_p_cut_keeps_the_lower_ids: the same values kept, maybe other ids
            np.testing.assert_array_equal(np.sort(dense), np.sort(expected[j]))
            continue
        np.testing.assert_array_equal(dense, expected[j])
        for u in boundary_uniforms(rng, expected[j], uniforms):
            want = int(reference.draw(paddle.to_tensor(expected[j:j + 1]), [u]).numpy()[0])
            assert draw(kept, u) == want, (j, u)
        checked += 1
    return checked


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_filters_and_draws_equal_the_full_sort_for_the_same_uniforms(dtype):
    rng = np.random.default_rng(7)
    checked = 0
    for scale in (0.3, 3.0, 12.0):  # flat, realistic, peaked
        for repeat in range(3):
            logits = random_logits(rng, len(EQUALITY_CASES), scale=scale).astype(dtype)
            checked += assert_same_filter_and_draws(rng, logits, equality_samplers(rng, VOCAB, EQUALITY_CASES))
    # bfloat16 logits tie often (top-p cuts through a tie in about a quarter of those rows)
    assert checked >= (0.9 if dtype == "float32" else 0.6) * 9 * len(EQUALITY_CASES)


def test_at_the_real_vocabulary_filters_and_draws_equal_the_full_sort(monkeypatch):
    from serving.engines.builtin import sampling

    tried = set()
    likeliest = sampling._likeliest
    monkeypatch.setattr(sampling, "_likeliest", lambda probs, count: (tried.add(count), likeliest(probs, count))[1])
    rng = np.random.default_rng(8)
    cases = [c for c in EQUALITY_CASES if c[1] != 3000] + [(1.0, 0, 0.85, 1.0, 0.0, 0.0)]  # a nucleus of thousands
    logits = paddle.to_tensor(np.concatenate([
        (rng.standard_normal((len(cases), REAL_VOCAB)) * 3.0).astype(np.float32),
        (rng.standard_normal((2, REAL_VOCAB)) * 0.5).astype(np.float32)]))  # flat rows: candidates grow to the full sort
    cases = cases + [(1.0, 0, 0.9, 1.0, 0.0, 0.0), (0.8, 0, 0.5, 1.05, 0.0, 0.0)]
    assert assert_same_filter_and_draws(rng, logits, equality_samplers(rng, REAL_VOCAB, cases), uniforms=8) == len(cases)
    assert {*sampling.NUCLEUS_CANDIDATES, REAL_VOCAB} <= tried  # every size of candidates, and the full sort


def test_next_tokens_equal_the_full_sort_over_many_seeds():
    """Whole batches (greedy and sampling rows, penalties, both dtypes), decoded for several steps with
    the same seeds by the old code and the new: the same tokens at every step. (bfloat16 rows without
    top-p: there top-p often cuts through a tie, where the old choice was std::sort's.)"""
    rng = np.random.default_rng(9)
    every = EQUALITY_CASES + [(0.0, 0, 1.0, 1.05, 0.0, 0.0), (0.0, 0, 1.0, 1.0, 0.3, 0.2)]
    for seed, dtype in ((0, "float32"), (100, "bfloat16"), (200, "float32")):
        cases = every if dtype == "float32" else [c for c in every if c[2] >= 1.0]
        ours, theirs = equality_samplers(np.random.default_rng(seed), VOCAB, cases, seed), \
            equality_samplers(np.random.default_rng(seed), VOCAB, cases, seed)
        sampled = set()
        for step in range(6):
            logits = random_logits(rng, len(cases), scale=float(rng.choice([0.5, 3.0, 8.0]))).astype(dtype)
            tokens, _ = next_tokens(logits, ours)
            expected, _ = reference.next_tokens(logits, theirs)
            assert tokens == expected, (seed, step)
            for a, b, token in zip(ours, theirs, tokens):
                a.accept(token)
                b.accept(token)
            sampled.update(tokens)
        assert len(sampled) > 12  # really sampled


def test_top_k_keeps_every_token_tied_with_the_kth():
    probs = np.zeros(4000, dtype=np.float32)
    probs[[3, 900, 1500, 3999]] = 0.2  # four tokens tied at the top
    probs[[10, 20]] = 0.1
    for top_k, want in ((1, [3, 900, 1500, 3999]), (4, [3, 900, 1500, 3999]), (5, [3, 10, 20, 900, 1500, 3999])):
        dense = kept_tokens(probs, top_k, 1.0).dense()
        assert np.flatnonzero(dense).tolist() == want and np.all(dense[want] == probs[want])
        np.testing.assert_array_equal(
            reference._keep_top_k(paddle.to_tensor(probs[None]), [top_k]).numpy()[0] > 0, np.isin(np.arange(4000), want))


def test_a_tie_across_the_top_p_cut_keeps_the_lower_ids():
    """[0.3 x3, 0.1]: top_p 0.5 crosses at the second 0.3. The full sort kept two of the three (which two
    was std::sort's choice); ours keeps the same number, the two lowest ids."""
    probs = np.zeros(3000, dtype=np.float32)
    probs[[2900, 17, 1200]] = 0.3
    probs[5] = 0.1
    assert np.flatnonzero(kept_tokens(probs, 0, 0.5).dense()).tolist() == [17, 1200]
    expected = reference._keep_top_p(paddle.to_tensor(probs[None]), [0.5]).numpy()[0]
    assert np.count_nonzero(expected) == 2 and set(np.flatnonzero(expected)) <= {17, 1200, 2900}


def test_a_cold_row_keeps_softmaxs_floor_like_the_full_sort():
    """Paddle's softmax clamps exp at -64: at temperature 1e-6 every token but the top has the same tiny
    probability, and top-k 50 keeps them all (fewer than 50 are above it). The draw still ends on the top."""
    rng = np.random.default_rng(10)
    logits = random_logits(rng, 1, vocab=REAL_VOCAB, scale=3.0)
    sampler = RowSampler(params(temperature=1e-6, top_k=50, top_p=1.0, repetition_penalty=1.05, seed=3), {}, [1, 2])
    probs = sampling_probs(penalized_logits(logits, [sampler]), [0], [sampler])[0]
    kept = kept_tokens(probs, 50, 1.0)
    assert kept.ids.size + kept.tied.size == REAL_VOCAB and kept.tied.size > REAL_VOCAB - 50
    np.testing.assert_array_equal(kept.dense(), probs)
    top = int(np.argmax(probs))
    picks = {}
    for u in (0.0, 1e-30, 1e-25, 1e-20, 0.5, float(np.nextafter(1.0, 0.0))):
        picks[u] = draw(kept, u)
        assert picks[u] == int(reference.draw(paddle.to_tensor(probs[None]), [u]).numpy()[0])
    # the floor's mass before the top token is ~1e-23 of the row: only uniforms below that land on it
    assert picks[0.0] == picks[1e-30] == 0 < picks[1e-25] < top == picks[1e-20] == picks[0.5]


def test_logprobs_equal_the_full_log_softmax(tokenizer):
    rng = np.random.default_rng(11)
    vocab = 576
    samplers = [RowSampler(params(temperature=0.7, top_p=0.8, seed=1, logprobs=True, top_logprobs=5), {}, []),
                RowSampler(params(temperature=0), {}, []),
                RowSampler(params(temperature=0, logprobs=True, top_logprobs=20, repetition_penalty=1.3), {}, [4, 5]),
                RowSampler(params(temperature=1.0, seed=2, logprobs=True), {}, [])]
    for dtype in ("float32", "bfloat16"):
        logits = random_logits(rng, len(samplers), vocab=vocab, scale=3.0).astype(dtype)
        tokens = rng.integers(0, vocab, len(samplers)).tolist()
        ours = token_logprobs(logits, tokens, samplers, tokenizer)
        expected = reference.token_logprobs(logits, tokens, samplers, tokenizer)
        assert ours[1] is None is expected[1]
        for mine, theirs in zip(ours, expected):
            if theirs is None:
                continue
            assert (mine.token, mine.bytes) == (theirs.token, theirs.bytes)
            assert mine.logprob == pytest.approx(theirs.logprob, rel=1e-6, abs=2e-6)
            assert [t.logprob for t in mine.top_logprobs] == pytest.approx([t.logprob for t in theirs.top_logprobs],
                                                                           rel=1e-6, abs=2e-6)
            if dtype == "float32":  # bfloat16 logits tie often: the order among equals is free
                assert [t.token for t in mine.top_logprobs] == [t.token for t in theirs.top_logprobs]


def test_logprobs_at_the_real_vocabulary_without_a_full_log_softmax(tokenizer):
    rng = np.random.default_rng(12)
    raw = (rng.standard_normal((2, REAL_VOCAB)) * 3.0).astype(np.float32)
    samplers = [RowSampler(params(temperature=0, logprobs=True, top_logprobs=5), {}, []),
                RowSampler(params(temperature=0.7, top_p=0.8, seed=5, logprobs=True, top_logprobs=20), {}, [])]
    tokens = [int(np.argmax(raw[0])), 1234]
    entries = token_logprobs(paddle.to_tensor(raw), tokens, samplers, tokenizer)
    exact = raw.astype(np.float64)
    exact = exact - exact.max(1, keepdims=True)
    exact = exact - np.log(np.exp(exact).sum(1, keepdims=True))
    for row, (entry, token) in enumerate(zip(entries, tokens)):
        assert entry.logprob == pytest.approx(exact[row, token], abs=3e-6)
        want = np.argsort(-exact[row], kind="stable")[:len(entry.top_logprobs)]
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], exact[row, want], atol=3e-6)
        assert [t.token for t in entry.top_logprobs] == [token_names(tokenizer)(int(i))[0] for i in want]


@pytest.mark.parametrize("tie", [1e-28, 1e-9, 3e-6])
def test_draws_over_a_run_of_tied_tokens_sum_like_the_whole_row(tie):
    """Many tokens at one probability are summed a run at a time (exactly k * tie from zero, nothing once
    each addition rounds away, else a sequential sum): the same token as the row's float64 cumsum for
    uniforms on and next to every step."""
    rng = np.random.default_rng(13)
    vocab = 20_000
    probs = np.zeros(vocab, dtype=np.float32)
    tied = rng.choice(vocab, 15_000, replace=False)
    probs[tied] = tie
    others = rng.choice(np.setdiff1d(np.arange(vocab), tied), 40, replace=False)
    probs[others] = rng.choice([0.3, 0.05, 1e-3, 50 * tie, 4 * tie], 40).astype(np.float32)
    kept = kept_tokens(probs, 100, 1.0)  # fewer than 100 above the tie: all of it stays
    assert kept.tied.size == 15_000 and kept.ids.size == 40
    np.testing.assert_array_equal(kept.dense(), probs)
    cdf = np.cumsum(probs.astype(np.float64))
    steps = np.concatenate([np.sort(others), np.sort(tied)[[0, 1, 2, 500, 7000, -1]]])
    exact = [cdf[i] / cdf[-1] for i in steps]
    uniforms = [0.0, float(np.nextafter(1.0, 0.0)), *rng.random(40).tolist(), *exact,
                *[float(np.nextafter(u, 0.0)) for u in exact], *[float(np.nextafter(u, 1.0)) for u in exact]]
    row = paddle.to_tensor(probs[None])
    for u in uniforms:
        if u < 1.0:
            assert draw(kept, u) == int(reference.draw(row, [u]).numpy()[0]), u


def test_top_p_that_crosses_inside_a_tied_run_keeps_its_lowest_ids():
    probs = np.zeros(30_000, dtype=np.float32)
    probs[:20_000] = 2e-5  # 0.4 in all
    probs[25_000] = 0.6
    kept = kept_tokens(probs, 0, 0.7)  # 0.6, then ties until the float32 sum passes 0.7: ~5,000 of them
    assert kept.ids.tolist() == [25_000] and 4_000 < kept.tied.size < 6_000
    assert kept.tied.tolist() == list(range(kept.tied.size))
    expected = reference._keep_top_p(paddle.to_tensor(probs[None]), [0.7]).numpy()[0]
    np.testing.assert_array_equal(np.sort(kept.dense()), np.sort(expected))  # the same count, ids std::sort's


def test_realistic_rows_sort_only_candidates_at_the_real_vocabulary(monkeypatch):
    """The settings that matter (the published defaults, top_p 0.8, top_k 1 with top_p 0.001, logprobs)
    sort at most a few hundred tokens per row on logits ~ N(0, 3), never the 151,936."""
    from serving.engines.builtin import sampling

    sorted_sizes = []
    descending = sampling._descending
    monkeypatch.setattr(sampling, "_descending", lambda values, ids: (sorted_sizes.append(ids.size),
                                                                     descending(values, ids))[1])
    rng = np.random.default_rng(14)
    defaults = {"do_sample": True, "temperature": 1e-06, "repetition_penalty": 1.05, "top_k": 50, "top_p": 1.0}
    samplers = [RowSampler(params(), defaults, [1, 2, 3]),
                RowSampler(params(temperature=0.7, top_p=0.8, seed=1), {}, []),
                RowSampler(params(temperature=0.1, top_k=1, top_p=0.001, repetition_penalty=1.05, seed=2), {}, [4]),
                RowSampler(params(temperature=0, logprobs=True, top_logprobs=5), {}, [])]
    assert samplers[0].temperature == 1e-06 and samplers[0].top_k == 50 and not samplers[0].greedy
    logits = random_logits(rng, len(samplers), vocab=REAL_VOCAB, scale=3.0)

    tokens, logprobs = next_tokens(logits, samplers, token_names_stand_in())

    top = np.argmax(logits.numpy(), axis=-1)
    assert tokens[0] == top[0] and tokens[3] == top[3]  # temperature 1e-06 is greedy in all but name
    assert logprobs[3] is not None and len(logprobs[3].top_logprobs) == 5
    assert sorted_sizes and max(sorted_sizes) <= 1024, sorted_sizes


def token_names_stand_in():
    class Pieces:  # one byte-level piece per id: enough for TokenNames
        added_tokens_decoder: dict = {}

        def convert_ids_to_tokens(self, token_id):
            return "a"

    return Pieces()
