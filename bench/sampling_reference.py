"""The engine's sampling as it was before it stopped sorting the vocabulary (git f0713c5), kept verbatim
as the reference the new code is proven against (tests/test_sampling.py) and timed against
(python -m bench.sampling). Not used by the server.

Every step runs as Paddle ops over whole [rows, vocabulary] tensors: softmax, top-k by a threshold,
top-p by a full argsort per row, the draw by a float64 cumulative sum over the vocabulary, logprobs by a
log_softmax per row. (Its repetition penalty divides two same-shape tensors, which Paddle's CPU kernel
does 1 ulp off IEEE division on ~0.5% of values; generate, and the new code on a CPU, divide exactly.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from serving.engines.builtin.sampling import RowSampler, token_names
from serving.jobs import TokenLogprob, TopLogprob


def next_tokens(logits, samplers: Sequence[RowSampler], tokenizer=None) -> tuple:
    """(token ids, logprobs), as serving.engines.builtin.sampling.next_tokens computed them."""
    import paddle

    scores = penalized_logits(logits, samplers)
    chosen = paddle.argmax(scores, axis=-1)
    sampling_rows = [i for i, sampler in enumerate(samplers) if not sampler.greedy]
    if sampling_rows:
        rows = paddle.to_tensor(sampling_rows, dtype="int64")
        row_samplers = [samplers[i] for i in sampling_rows]
        probs = sampling_probs(paddle.gather(scores, rows, axis=0), row_samplers)
        uniforms = [sampler.rng.random() for sampler in row_samplers]
        chosen = paddle.scatter(chosen, rows, draw(probs, uniforms))
    tokens = [int(t) for t in chosen.numpy().reshape(-1)]
    return tokens, token_logprobs(logits, tokens, samplers, tokenizer)


def penalized_logits(logits, samplers: Sequence[RowSampler]):
    """float32 [B, V]: the repetition penalty (rounded to the logits' dtype), then presence and frequency."""
    import paddle

    batch, vocab = logits.shape
    flat = logits.reshape([-1]).astype("float32")
    rows = [(i, s) for i, s in enumerate(samplers) if s.penalizes_repetition]
    if rows:
        index, penalty = _flat_index(vocab, [(i, s.seen_ids(), s.repetition_penalty) for i, s in rows])
        score = paddle.gather(flat, index)
        penalty = paddle.to_tensor(penalty).astype(logits.dtype).astype("float32")
        penalized = paddle.where(score < 0, score * penalty, score / penalty)
        if logits.dtype != paddle.float32:
            penalized = penalized.astype(logits.dtype).astype("float32")
        flat = paddle.scatter(flat, index, penalized)
    rows = [(i, s) for i, s in enumerate(samplers) if s.penalizes_answer_tokens]
    if rows:
        parts = [(i, *s.answer_penalties()) for i, s in rows]
        index, amount = _flat_index(vocab, parts)
        flat = paddle.scatter(flat, index, paddle.gather(flat, index) - paddle.to_tensor(amount))
    return flat.reshape([batch, vocab])


def sampling_probs(scores, samplers: Sequence[RowSampler]):
    """float32 [S, V]: temperature, softmax, top-k, top-p; filtered tokens 0, rows not renormalised."""
    import paddle
    import paddle.nn.functional as F

    temperature = np.array([[s.temperature] for s in samplers], dtype=np.float32)
    probs = F.softmax(scores / paddle.to_tensor(temperature), axis=-1)
    if any(s.top_k for s in samplers):
        probs = _keep_top_k(probs, [s.top_k for s in samplers])
    nucleus_rows = [j for j, s in enumerate(samplers) if s.top_p < 1.0]
    if len(nucleus_rows) == len(samplers):
        probs = _keep_top_p(probs, [s.top_p for s in samplers])
    elif nucleus_rows:
        index = paddle.to_tensor(nucleus_rows, dtype="int64")
        kept = _keep_top_p(paddle.gather(probs, index, axis=0), [samplers[j].top_p for j in nucleus_rows])
        probs = paddle.scatter(probs, index, kept)
    return probs


def draw(probs, uniforms: Sequence[float]):
    """int64 [S]: inverse CDF over the vocabulary, in float64."""
    import paddle

    cdf = paddle.cumsum(probs.astype("float64"), axis=-1)
    target = paddle.to_tensor(np.asarray(uniforms, dtype=np.float64).reshape(-1, 1)) * cdf[:, -1:]
    index = paddle.searchsorted(cdf, target, right=True).reshape([-1])
    last_with_mass = paddle.argmax(cdf, axis=-1)
    return paddle.minimum(index, last_with_mass)


def token_logprobs(logits, tokens: Sequence[int], samplers: Sequence[RowSampler], tokenizer=None) -> list:
    """Raw logprobs through a full-vocabulary log_softmax per asking row."""
    import paddle
    import paddle.nn.functional as F

    asking = [i for i, s in enumerate(samplers) if s.logprobs]
    result: list = [None] * len(samplers)
    if not asking:
        return result
    names = token_names(tokenizer)
    vocab = logits.shape[-1]
    rows = paddle.to_tensor(asking, dtype="int64")
    logp = F.log_softmax(paddle.gather(logits, rows, axis=0).astype("float32"), axis=-1)
    picked = paddle.to_tensor(np.array([[tokens[i]] for i in asking], dtype=np.int64))
    chosen_logp = paddle.take_along_axis(logp, picked, axis=-1).numpy().reshape(-1)
    most = min(max(samplers[i].top_logprobs for i in asking), vocab)
    if most:
        top_logp, top_ids = (t.numpy() for t in paddle.topk(logp, k=most, axis=-1))
    for j, i in enumerate(asking):
        alternatives = []
        for k in range(min(samplers[i].top_logprobs, vocab)):
            text, raw = names(int(top_ids[j, k]))
            alternatives.append(TopLogprob(token=text, logprob=float(top_logp[j, k]), bytes=list(raw)))
        text, raw = names(tokens[i])
        result[i] = TokenLogprob(token=text, logprob=float(chosen_logp[j]), bytes=list(raw),
                                 top_logprobs=alternatives)
    return result


def _keep_top_k(probs, top_ks: Sequence[int]):
    import paddle

    vocab = probs.shape[-1]
    ks = np.array([min(k, vocab) if k > 0 else 1 for k in top_ks], dtype=np.int64)
    top_values, _ = paddle.topk(probs, k=int(ks.max()), axis=-1)
    kth = paddle.take_along_axis(top_values, paddle.to_tensor(ks.reshape(-1, 1) - 1), axis=-1)
    unfiltered = paddle.to_tensor(np.array([[k <= 0] for k in top_ks]))
    kth = paddle.where(unfiltered, paddle.zeros_like(kth), kth)
    return paddle.where(probs >= kth, probs, paddle.zeros_like(probs))


def _keep_top_p(probs, top_ps: Sequence[float]):
    import paddle

    sorted_ids = paddle.argsort(probs, axis=-1, descending=True)
    cumulative = paddle.cumsum(paddle.take_along_axis(probs, sorted_ids, axis=-1), axis=-1)
    limit = np.array(top_ps, dtype=np.float32).reshape(-1, 1)
    beyond = (cumulative > paddle.to_tensor(limit)).astype("int64")
    drop_sorted = paddle.concat([paddle.zeros_like(beyond[:, :1]), beyond[:, :-1]], axis=-1)
    drop = paddle.put_along_axis(paddle.zeros_like(drop_sorted), sorted_ids, drop_sorted, axis=-1)
    return paddle.where(drop.astype("bool"), paddle.zeros_like(probs), probs)


def _flat_index(vocab: int, parts) -> tuple:
    import paddle

    index = np.concatenate([row * vocab + ids for row, ids, _ in parts])
    values = np.concatenate([np.broadcast_to(np.asarray(v, dtype=np.float32), ids.shape) for _, ids, v in parts])
    return paddle.to_tensor(index), values.astype(np.float32)
