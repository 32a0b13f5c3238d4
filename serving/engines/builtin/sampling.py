"""The next token of every row in a decoding batch, each row with its own sampling settings.

A continuous-batching loop gets logits [B, V] from one forward pass, one row per running request.
`next_tokens` turns them into one token per row in a single vectorised pass on the logits' device;
only per-row values (settings, the tokens already seen, one uniform draw) go to the device and only
the B chosen tokens (and the logprobs asked for) come back.

The maths is PaddleFormers 1.2.0's `generate`, row by row, so an answer does not depend on which
path (this loop or `model.generate`) produced it:

  repetition penalty -> (presence and frequency penalties) -> greedy: argmax
                                                           -> sampling: / temperature -> softmax
                                                              -> top-k -> top-p -> draw
  - repetition penalty: RepetitionPenaltyLogitsProcessor over the prompt and the answer so far
    (divide a seen token's positive logit by the penalty, multiply a negative one), in the logits'
    own dtype as generate does (Qwen2.5-VL does not upcast its logits: bfloat16 on a GPU).
  - presence and frequency penalties (OpenAI's; generate has none): logit -= presence * (count > 0)
    + frequency * count over the answer's tokens only, after the repetition penalty and before the
    temperature, where vLLM applies them. From here on all maths is float32.
  - top-k keeps every token at least as likely as the k-th (ties kept), top-p then works on those
    probabilities without renormalising first: TopKProcess and TopPProcess exactly.
  - the draw: inverse CDF over the row's kept probabilities in vocabulary order, with one uniform
    from the row's own numpy Generator, so a seeded row gives the same tokens whatever its
    companions and its position in the batch. Greedy rows draw nothing.

Logprobs are vLLM's default "raw logprobs": log_softmax of the model's logits before any penalty,
temperature or filtering, i.e. what the model thinks, not the distribution that was sampled.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional, Sequence

import numpy as np

from serving.jobs import SamplingParams, TokenLogprob, TopLogprob

DEFAULT_NAMES = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


def generation_defaults(generation_config) -> dict:
    """The sampling defaults a checkpoint's GenerationConfig carries, in the form RowSampler takes.
    (PaddleFormers' GenerationConfig fills what the checkpoint leaves out: top_k 50, temperature 1.0...)"""
    return {name: getattr(generation_config, name, None) for name in DEFAULT_NAMES}


class RowSampler:
    """One request's sampling state.

    Settings are resolved once: a value the request left as None takes the model's default from
    `defaults` (see generation_defaults), else the neutral value. Temperature 0 means greedy, and so
    does a request without a temperature when the model's default is do_sample=False. top_k <= 0 and
    top_p >= 1 mean no filtering (vLLM's -1 for top_k included).

    The caller records every token it keeps with `accept`: `next_tokens` does not, so a loop may
    drop a row's token (a cancelled request) without touching its state.
    """

    def __init__(self, params: SamplingParams, defaults: Optional[dict], prompt_ids: Sequence[int]):
        defaults = defaults or {}

        def pick(name, neutral):
            value = getattr(params, name)
            if value is None:
                value = defaults.get(name)
            return neutral if value is None else value

        temperature = params.temperature
        if temperature is None:
            temperature = 0.0 if defaults.get("do_sample") is False else defaults.get("temperature")
        self.temperature = _finite("temperature", 1.0 if temperature is None else temperature, low=0.0)
        self.greedy = self.temperature == 0.0
        self.top_k = max(int(pick("top_k", 0)), 0)
        self.top_p = _finite("top_p", pick("top_p", 1.0), low=0.0)
        self.repetition_penalty = _finite("repetition_penalty", pick("repetition_penalty", 1.0), low=0.0)
        if self.repetition_penalty == 0.0:
            raise ValueError("repetition_penalty must be positive")
        self.presence_penalty = _finite("presence_penalty", params.presence_penalty or 0.0)
        self.frequency_penalty = _finite("frequency_penalty", params.frequency_penalty or 0.0)
        self.logprobs = bool(params.logprobs)
        self.top_logprobs = int(params.top_logprobs or 0) if self.logprobs else 0
        if self.top_logprobs < 0:
            raise ValueError("top_logprobs must not be negative")
        # numpy seeds must be non-negative; OpenAI's seed is any integer.
        self.rng = np.random.default_rng(None if params.seed is None else int(params.seed) % 2**64)
        self.answer_counts: dict = {}  # token id -> times generated in this answer
        self._seen = {int(t) for t in prompt_ids}  # prompt + answer: what the repetition penalty covers
        self._seen_ids: Optional[np.ndarray] = None
        self._counted: Optional[tuple] = None

    def accept(self, token: int) -> None:
        """Record a token the answer keeps."""
        token = int(token)
        self.answer_counts[token] = self.answer_counts.get(token, 0) + 1
        self._counted = None
        if token not in self._seen:
            self._seen.add(token)
            self._seen_ids = None

    @property
    def penalizes_repetition(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def penalizes_answer_tokens(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0) and bool(self.answer_counts)

    def seen_ids(self) -> np.ndarray:
        """Distinct token ids of the prompt and the answer so far."""
        if self._seen_ids is None:
            self._seen_ids = np.fromiter(sorted(self._seen), dtype=np.int64, count=len(self._seen))
        return self._seen_ids

    def answer_penalties(self) -> tuple:
        """(token ids, float32 amounts to subtract) for the presence and frequency penalties."""
        if self._counted is None:
            ids = np.fromiter(self.answer_counts.keys(), dtype=np.int64, count=len(self.answer_counts))
            counts = np.fromiter(self.answer_counts.values(), dtype=np.float32, count=len(self.answer_counts))
            amounts = np.float32(self.presence_penalty) + np.float32(self.frequency_penalty) * counts
            self._counted = (ids, amounts.astype(np.float32))
        return self._counted


def next_tokens(logits, samplers: Sequence[RowSampler], tokenizer=None, adjust=None) -> tuple:
    """(token ids, logprobs) for a batch: logits [B, V] from the model, samplers[i] for row i.

    logprobs[i] is a TokenLogprob when row i asked for logprobs (the tokenizer then names the tokens),
    else None. Each sampling row consumes one draw of its generator; no row's state changes otherwise
    (record kept tokens with RowSampler.accept).

    `adjust` (optional): one entry per row, None or a callable taking the row's penalized scores (numpy
    float32 [V]) and returning them changed: a grammar's mask (forbidden tokens at -inf) and a logit bias
    (serving.engines.builtin.grammar.RowConstraint.adjust). It applies after the penalties and before
    temperature, top-k and top-p; rows with None are not touched, and a row with a callable consumes its
    draw like any other. Logprobs stay the model's raw logprobs."""
    import paddle

    _check_batch(logits, samplers)
    scores = penalized_logits(logits, samplers)
    if adjust is not None and any(fn is not None for fn in adjust):
        scores = adjusted_scores(scores, adjust)
    chosen = paddle.argmax(scores, axis=-1)  # the greedy pick of every row; sampling rows replace theirs
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
    """float32 [B, V]: the repetition penalty (PaddleFormers' maths, rounded to the logits' dtype),
    then the presence and frequency penalties. The logits themselves are left untouched."""
    import paddle

    batch, vocab = logits.shape
    flat = logits.reshape([-1]).astype("float32")  # exact for half-precision values
    rows = [(i, s) for i, s in enumerate(samplers) if s.penalizes_repetition]
    if rows:
        index, penalty = _flat_index(vocab, [(i, s.seen_ids(), s.repetition_penalty) for i, s in rows])
        score = paddle.gather(flat, index)
        # generate computes `score * penalty` in the logits' dtype, which (measured) rounds the
        # penalty to that dtype, multiplies in float32 and rounds the product back: do the same.
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


def adjusted_scores(scores, adjust):
    """float32 [B, V]: the rows with a callable in `adjust` replaced by what it returns for them (see next_tokens)."""
    import paddle

    rows = [i for i, fn in enumerate(adjust) if fn is not None]
    index = paddle.to_tensor(rows, dtype="int64")
    part = paddle.gather(scores, index, axis=0).numpy().copy()
    changed = np.stack([np.asarray(adjust[i](part[j]), dtype=np.float32) for j, i in enumerate(rows)])
    return paddle.scatter(scores, index, paddle.to_tensor(changed))


def sampling_probs(scores, samplers: Sequence[RowSampler]):
    """float32 [S, V]: the probabilities each sampling row draws from, after temperature, top-k and
    top-p; filtered tokens are 0 and the rows are not renormalised (the draw scales by each row's sum,
    as paddle.multinomial does in generate)."""
    import paddle
    import paddle.nn.functional as F

    temperature = np.array([[s.temperature] for s in samplers], dtype=np.float32)
    probs = F.softmax(scores / paddle.to_tensor(temperature), axis=-1)
    if any(s.top_k for s in samplers):
        probs = _keep_top_k(probs, [s.top_k for s in samplers])
    nucleus_rows = [j for j, s in enumerate(samplers) if s.top_p < 1.0]
    if len(nucleus_rows) == len(samplers):
        probs = _keep_top_p(probs, [s.top_p for s in samplers])
    elif nucleus_rows:  # sorting the vocabulary is the costly part: only for the rows that need it
        index = paddle.to_tensor(nucleus_rows, dtype="int64")
        kept = _keep_top_p(paddle.gather(probs, index, axis=0), [samplers[j].top_p for j in nucleus_rows])
        probs = paddle.scatter(probs, index, kept)
    return probs


def draw(probs, uniforms: Sequence[float]):
    """int64 [S]: row i's token is the first whose cumulative probability passes uniforms[i] of the
    row's total (inverse CDF, in float64 so a 150k-token vocabulary sums without visible error)."""
    import paddle

    cdf = paddle.cumsum(probs.astype("float64"), axis=-1)
    target = paddle.to_tensor(np.asarray(uniforms, dtype=np.float64).reshape(-1, 1)) * cdf[:, -1:]
    index = paddle.searchsorted(cdf, target, right=True).reshape([-1])
    # u * total can round up to the total itself: fall back to the last token that has mass.
    last_with_mass = paddle.argmax(cdf, axis=-1)
    return paddle.minimum(index, last_with_mass)


def token_logprobs(logits, tokens: Sequence[int], samplers: Sequence[RowSampler], tokenizer=None) -> list:
    """TokenLogprob of tokens[i] for each row that asked for logprobs (None for the others): raw
    logprobs (log_softmax of the model's logits) and the row's top_logprobs most likely tokens."""
    import paddle
    import paddle.nn.functional as F

    asking = [i for i, s in enumerate(samplers) if s.logprobs]
    result: list = [None] * len(samplers)
    if not asking:
        return result
    if tokenizer is None:
        raise ValueError("logprobs were asked for, but no tokenizer was given to name the tokens")
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


class TokenNames:
    """A single token's text and UTF-8 bytes, as OpenAI's logprobs show them.

    Qwen's byte-level BPE spells each byte as a printable character (GPT-2's byte-to-unicode map);
    mapping the token's string back gives its bytes, which may be part of a character: the text is
    then decoded with replacement characters. Added tokens (<|im_end|>...) are their own text. An id
    the tokenizer does not know (the model's vocabulary is padded past it) is "" with no bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.added = {int(i): str(getattr(t, "content", t)) for i, t in added.items()}
        self.byte_of_char = _byte_decoder()
        self._cache: dict = {}

    def __call__(self, token_id: int) -> tuple:
        """(text, bytes) of one token id."""
        named = self._cache.get(token_id)
        if named is None:
            raw = self.token_bytes(token_id)
            named = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return named

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return b""
        # a character outside the byte alphabet (not a byte-level piece) stands for itself
        return b"".join(bytes([self.byte_of_char[c]]) if c in self.byte_of_char else c.encode("utf-8")
                        for c in piece)


_names_by_tokenizer: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_names(tokenizer) -> TokenNames:
    """The TokenNames of a tokenizer, built once (its per-token cache then lives as long as it does)."""
    if isinstance(tokenizer, TokenNames):
        return tokenizer
    try:
        names = _names_by_tokenizer.get(tokenizer)
        if names is None:
            names = _names_by_tokenizer[tokenizer] = TokenNames(tokenizer)
        return names
    except TypeError:  # not weak-referenceable: no cache across calls
        return TokenNames(tokenizer)


def _byte_decoder() -> dict:
    """GPT-2's bytes_to_unicode, reversed: printable character -> the byte it spells."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_values, chars = list(printable), list(printable)
    shifted = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(byte_values, chars)}


def _keep_top_k(probs, top_ks: Sequence[int]):
    """TopKProcess per row: keep the probabilities >= the row's k-th largest (rows with k 0: all)."""
    import paddle

    vocab = probs.shape[-1]
    ks = np.array([min(k, vocab) if k > 0 else 1 for k in top_ks], dtype=np.int64)  # 1: any valid column
    top_values, _ = paddle.topk(probs, k=int(ks.max()), axis=-1)
    kth = paddle.take_along_axis(top_values, paddle.to_tensor(ks.reshape(-1, 1) - 1), axis=-1)
    unfiltered = paddle.to_tensor(np.array([[k <= 0] for k in top_ks]))
    kth = paddle.where(unfiltered, paddle.zeros_like(kth), kth)  # every probability is >= 0
    return paddle.where(probs >= kth, probs, paddle.zeros_like(probs))


def _keep_top_p(probs, top_ps: Sequence[float]):
    """TopPProcess per row (top_p < 1): drop the tokens after the smallest most-likely set whose
    cumulative probability exceeds top_p; the token that crosses it stays."""
    import paddle

    sorted_ids = paddle.argsort(probs, axis=-1, descending=True)
    # the same values paddle.sort gives (equal values are interchangeable), without a second sort
    cumulative = paddle.cumsum(paddle.take_along_axis(probs, sorted_ids, axis=-1), axis=-1)
    limit = np.array(top_ps, dtype=np.float32).reshape(-1, 1)
    beyond = (cumulative > paddle.to_tensor(limit)).astype("int64")
    drop_sorted = paddle.concat([paddle.zeros_like(beyond[:, :1]), beyond[:, :-1]], axis=-1)
    drop = paddle.put_along_axis(paddle.zeros_like(drop_sorted), sorted_ids, drop_sorted, axis=-1)
    return paddle.where(drop.astype("bool"), paddle.zeros_like(probs), probs)


def _flat_index(vocab: int, parts) -> tuple:
    """(int64 tensor of row * vocab + token id, float32 values) for parts of (row, ids, value or values)."""
    import paddle

    index = np.concatenate([row * vocab + ids for row, ids, _ in parts])
    values = np.concatenate([np.broadcast_to(np.asarray(v, dtype=np.float32), ids.shape) for _, ids, v in parts])
    return paddle.to_tensor(index), values.astype(np.float32)


def _finite(name: str, value, low: Optional[float] = None) -> float:
    value = float(value)
    if math.isnan(value) or math.isinf(value) or (low is not None and value < low):
        raise ValueError(f"{name} must be a finite number{'' if low is None else f' >= {low}'}, not {value}")
    return value


def _check_batch(logits, samplers) -> None:
    if len(logits.shape) != 2:
        raise ValueError(f"logits must be [batch, vocab], not {list(logits.shape)}")
    if logits.shape[0] != len(samplers):
        raise ValueError(f"{logits.shape[0]} rows of logits but {len(samplers)} samplers")
