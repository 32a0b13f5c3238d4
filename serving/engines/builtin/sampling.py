"""The next token of every row in a decoding batch, each row with its own sampling settings.

A continuous-batching loop gets logits [B, V] from one forward pass, one row per running request.
`next_tokens` turns them into one token per row. The penalties (on the seen tokens only), the
temperature and the softmax are Paddle ops on the logits' device, so the probabilities are the ones
generate computes there, bit for bit; what follows works on host numpy rows (a CPU's own memory; on
a GPU each sampling row's probabilities are copied over, and greedy rows send only their argmax).

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

At Qwen's 151,936 tokens none of this sorts the vocabulary when it need not (a full sort per row was
~30 ms; python -m bench.sampling): top-k and top-p sort only candidates bounded in one pass, top_k 1
is the argmax (with its ties), and the draw sums only the kept tokens, in vocabulary order, which
gives the same float64 sums at those tokens as the whole row did: the same token for the same
uniform as the full-vocabulary code (bench/sampling_reference.py, proven in tests/test_sampling.py).

Logprobs are vLLM's default "raw logprobs": log_softmax of the model's logits before any penalty,
temperature or filtering, i.e. what the model thinks, not the distribution that was sampled; computed
as one log-sum-exp per row and the largest logits asked for, never a log_softmax tensor (Paddle 3.3.1's
CPU log_softmax grows with the square of the row here: 9 ms at 3,000 tokens, 0.6 s at 20,000, 32 s
at 151,936).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
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
    float32 [V], a row it may change in place) and returning them changed: a grammar's mask (forbidden tokens
    at -inf) and a logit bias (serving.engines.builtin.grammar.RowConstraint.adjust). It applies after the
    penalties and before temperature, top-k and top-p; rows with None are not touched, and a row with a
    callable consumes its draw like any other. Logprobs stay the model's raw logprobs."""
    import paddle

    _check_batch(logits, samplers)
    if logits.place.is_cpu_place() and logits.dtype == paddle.float32:
        scores = penalized_on_host(logits, samplers)  # numpy from here on
    else:
        scores = penalized_logits(logits, samplers)
        if scores.place.is_cpu_place():
            scores = _shared_with_numpy(scores)
    adjusted = [i for i, fn in enumerate(adjust or ()) if fn is not None]
    if adjusted:
        scores = adjusted_scores(scores, adjust, adjusted)
    chosen = greedy_picks(scores)  # the argmax of every row; sampling rows replace theirs
    sampling_rows = [i for i, sampler in enumerate(samplers) if not sampler.greedy]
    if sampling_rows:
        row_samplers = [samplers[i] for i in sampling_rows]
        probs = sampling_probs(scores, sampling_rows, row_samplers)
        if adjusted and not probs.flags.writeable:
            probs = probs.copy()
        for j, i in enumerate(sampling_rows):
            if i in adjusted:  # a masked token has no probability at all (Paddle's CPU softmax leaves ~1e-28)
                probs[j][np.isneginf(_row_of(scores, i))] = 0.0
        for i, sampler, row in zip(sampling_rows, row_samplers, probs):
            token = draw(kept_tokens(row, sampler.top_k, sampler.top_p), sampler.rng.random())
            if token is not None:  # None: no token has mass (NaN logits): the argmax stands
                chosen[i] = token
    tokens = [int(t) for t in chosen]
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


def penalized_on_host(logits, samplers: Sequence[RowSampler]) -> np.ndarray:
    """penalized_logits for a CPU's float32 logits, in numpy, on the seen tokens only: generate's values
    bit for bit (it divides by the penalty as a Python number: IEEE division, as numpy's; Paddle's CPU
    division of two same-shape tensors is 1 ulp off on ~0.5% of values), without Paddle's per-op cost
    (on a busy 2-core machine a multi-threaded op can wait milliseconds for its second thread). A copy
    when a penalty applies, else the logits' own memory, read-only."""
    scores = _shared_with_numpy(logits)
    if not any(s.penalizes_repetition or s.penalizes_answer_tokens for s in samplers):
        return scores
    scores = np.array(scores, dtype=np.float32, order="C")
    for row, sampler in zip(scores, samplers):
        if sampler.penalizes_repetition:
            ids = sampler.seen_ids()
            score, penalty = row[ids], np.float32(sampler.repetition_penalty)
            row[ids] = np.where(score < 0, score * penalty, score / penalty)
        if sampler.penalizes_answer_tokens:
            ids, amounts = sampler.answer_penalties()
            row[ids] -= amounts
    return scores


def adjusted_scores(scores, adjust, rows: Sequence[int]):
    """scores with rows[j] replaced by adjust[rows[j]](its float32 numpy row) (see next_tokens): numpy
    scores (a CPU's) are copied first (they may be the logits' own read-only memory); a device tensor
    sends only those rows to the host and back."""
    if isinstance(scores, np.ndarray):
        scores = np.array(scores, dtype=np.float32, order="C")  # ours: each row goes to its adjuster as is
        for i in rows:
            row = scores[i]
            changed = adjust[i](row)
            if changed is not row:
                scores[i] = changed
        return scores
    import paddle

    index = paddle.to_tensor(list(rows), dtype="int64")
    part = paddle.gather(scores, index, axis=0).numpy().copy()
    changed = np.stack([np.asarray(adjust[i](part[j]), dtype=np.float32) for j, i in enumerate(rows)])
    return paddle.scatter(scores, index, paddle.to_tensor(changed))


def _row_of(scores, i: int) -> np.ndarray:
    return scores[i] if isinstance(scores, np.ndarray) else scores[i].numpy()


def greedy_picks(scores) -> np.ndarray:
    """int64 [B]: each row's first most likely token, of numpy scores (a CPU's) or of a device tensor
    (only the B ids leave the device)."""
    if isinstance(scores, np.ndarray):
        return np.argmax(scores, axis=-1).astype(np.int64)
    import paddle

    return paddle.argmax(scores, axis=-1).numpy().reshape(-1).astype(np.int64)


def sampling_probs(scores, rows: Sequence[int], samplers: Sequence[RowSampler]) -> np.ndarray:
    """float32 numpy [S, V]: softmax(scores[rows] / temperature), by Paddle's own softmax kernel (the
    probabilities generate computes, bit for bit). scores: numpy on a CPU (numpy divides as generate's
    `logits / temperature` does, IEEE float32, at a fifth of Paddle's cost at 8 rows), else a tensor on
    its device (the S rows of probabilities are then copied to the host, ~0.6 MB each at 151,936 tokens)."""
    import paddle
    import paddle.nn.functional as F

    temperature = np.array([[s.temperature] for s in samplers], dtype=np.float32)
    scaled = np.any(temperature != 1.0)  # x / 1 is x: one pass over the rows saved
    if isinstance(scores, np.ndarray):
        if len(rows) != scores.shape[0]:
            scores = scores[list(rows)]
        if scaled:
            scores = scores / temperature
        return _shared_with_numpy(F.softmax(_shared_with_paddle(scores), axis=-1))
    if len(rows) != scores.shape[0]:
        scores = paddle.gather(scores, paddle.to_tensor(list(rows), dtype="int64"), axis=0)
    if scaled:
        scores = scores / paddle.to_tensor(temperature)
    return F.softmax(scores, axis=-1).numpy()


NUCLEUS_CANDIDATES = (64, 1024, 8192)  # top-p alone: candidates tried before sorting the whole vocabulary
MANY_TIED = 4096  # more tokens than this at one probability are drawn over as runs, not one by one


@dataclass
class Kept:
    """The tokens one row may draw, each with mass: `ids` (ascending) with their probabilities `probs`, and
    `tied`: more ids (ascending) that all have the probability `tied_prob`. ids None: nothing was filtered,
    `probs` is the whole row.

    Paddle's CPU softmax has a floor (its exp clamps at -64, -inf included: a logit masked with -inf
    keeps ~1e-28 of probability): in a cold row (temperature 1e-06, the published default) every token
    but the top few has that one tiny probability, and top-k 50 keeps all ~150k of them
    (fewer than 50 are above it). They stay one run of equal values: neither sorted nor summed one by one."""

    ids: Optional[np.ndarray]
    probs: np.ndarray
    tied: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    tied_prob: float = 0.0
    size: int = 0  # the vocabulary

    def dense(self) -> np.ndarray:
        """The row's kept probabilities in place, 0 elsewhere (the form TopKProcess and TopPProcess give)."""
        if self.ids is None:
            return self.probs
        out = np.zeros(self.size, dtype=np.float32)
        out[self.ids], out[self.tied] = self.probs, self.tied_prob
        return out


def kept_tokens(probs: np.ndarray, top_k: int, top_p: float) -> Kept:
    """The tokens with mass that TopKProcess then TopPProcess keep in one row of probabilities.

    Only candidates are sorted: top-k sorts the tokens above a bound on its k-th probability; top-p alone
    sorts the 64, then 1,024, then 8,192 most likely and checks that their cumulative sum (float32, in
    the same order as the full sort, so the same sums) crosses top_p before falling back to the whole
    vocabulary. Among equally likely tokens the lower id comes first (the full sort left that order to
    std::sort)."""
    vocab = probs.shape[-1]
    nucleus = top_p < 1.0
    if 0 < top_k < vocab:
        ids, values, tied, tie, _ = _likeliest(probs, top_k)
        if ids.size >= top_k:  # the k-th is above the tie: keep what is at least as likely as it
            kept = _at_least_as_large(values, values[top_k - 1])
            ids, values, tied = ids[:kept], values[:kept], tied[:0]
        # else the k-th is the tie (all of it stays) or fewer than k tokens have mass (all stay)
        crossing = _crossing(values, tied.size, tie, top_p) if nucleus else None
    elif nucleus:
        for candidates in (*NUCLEUS_CANDIDATES, vocab):
            ids, values, tied, tie, whole = _likeliest(probs, candidates)
            crossing = _crossing(values, tied.size, tie, top_p)
            if whole or crossing is not None:
                break
    else:
        return Kept(None, probs, size=vocab)
    if nucleus:
        if crossing is not None:  # the token that crosses top_p stays
            if crossing < ids.size:
                ids, values, tied = ids[:crossing + 1], values[:crossing + 1], tied[:0]
            else:
                tied = tied[:crossing + 1 - ids.size]
    order = np.argsort(ids)
    return Kept(ids[order], values[order], tied, tie, size=vocab)


def draw(kept: Kept, uniform: float) -> Optional[int]:
    """The token whose cumulative probability first passes uniform * total: inverse CDF in vocabulary
    order, in float64 (a 150k-token vocabulary sums without visible error). Tokens without mass add
    nothing to a sequential sum, so the kept tokens' sums are the sums the whole row gives at those
    tokens: the same token for the same uniform. None when nothing has mass."""
    if kept.ids is None:
        ids, probs = None, kept.probs
    elif kept.tied.size > MANY_TIED and kept.ids.size <= MANY_TIED:
        return _draw_over_runs(kept, uniform)
    else:
        ids = np.concatenate([kept.ids, kept.tied])
        probs = np.concatenate([kept.probs, np.full(kept.tied.size, kept.tied_prob, dtype=np.float32)])
        order = np.argsort(ids)
        ids, probs = ids[order], probs[order]
    if probs.size == 0:
        return None
    cdf = np.cumsum(probs, dtype=np.float64)
    index = int(np.searchsorted(cdf, uniform * cdf[-1], side="right"))
    # u * total can round up to the total itself: fall back to the last token that has mass.
    index = min(index, int(np.argmax(cdf)))
    return index if ids is None else int(ids[index])


def _draw_over_runs(kept: Kept, uniform: float) -> int:
    """draw() with many tied tokens: the same float64 sequential sums, a run of ties at a time."""
    ids, probs, tied, tie = kept.ids, kept.probs, kept.tied, float(kept.tied_prob)
    bounds = np.concatenate([[0], np.searchsorted(tied, ids), [tied.size]])  # run r comes before ids[r]

    def walk(target):
        """(total, the first token whose sum passes target or None)."""
        total = 0.0
        for r in range(ids.size + 1):
            start, count = int(bounds[r]), int(bounds[r + 1] - bounds[r])
            if count:
                total, within = _tied_run(total, tie, count, target)
                if within is not None:
                    return total, int(tied[start + within])
            if r < ids.size:
                total += float(probs[r])
                if target is not None and total > target:
                    return total, int(ids[r])
        return total, None

    total, _ = walk(None)
    target = uniform * total
    if not target < total:  # u * total rounded up to the total: the first token whose sum reaches it
        target = float(np.nextafter(total, 0.0))
    return walk(target)[1]


def _tied_run(total: float, tie: float, count: int, target: Optional[float]) -> tuple:
    """Add `count` tokens of probability `tie` one by one to a float64 sum: (the sum after them, the index
    in the run of the first whose sum passes target, or None), in O(1) in the two usual cases."""
    if total + tie == total:  # each addition rounds away (and total <= target, or the walk had stopped)
        return total, None
    if total == 0.0:  # k * tie is exact (a float32 needs 24 bits, k < 2**29): the partial sums are k * tie
        after = count * tie
        if target is None or after <= target:
            return after, None
        index = max(int(target / tie) - 1, 0)
        while index > 0 and index * tie > target:
            index -= 1
        while (index + 1) * tie <= target:
            index += 1
        return after, index
    sums = np.cumsum(np.concatenate([[total], np.full(count, tie)]))[1:]  # sequential, as the row's own sum
    if target is None:
        return float(sums[-1]), None
    index = int(np.searchsorted(sums, target, side="right"))
    return float(sums[-1]), (index if index < count else None)


def token_logprobs(logits, tokens: Sequence[int], samplers: Sequence[RowSampler], tokenizer=None) -> list:
    """TokenLogprob of tokens[i] for each row that asked for logprobs (None for the others): raw
    logprobs (log_softmax of the model's logits) and the row's top_logprobs most likely tokens.

    Only what is asked is computed: one log-sum-exp per row, the chosen token's logit and the
    top_logprobs largest logits (no full-vocabulary log_softmax tensor)."""
    asking = [i for i, s in enumerate(samplers) if s.logprobs]
    result: list = [None] * len(samplers)
    if not asking:
        return result
    if tokenizer is None:
        raise ValueError("logprobs were asked for, but no tokenizer was given to name the tokens")
    names = token_names(tokenizer)
    for i, row in zip(asking, _host_rows(logits, asking)):
        largest = row.max()
        # log_softmax = (x - max) - log(sum(exp(x - max))), as Paddle's kernel computes it, in float32
        log_total = np.float32(np.log(np.exp(row - largest).sum(dtype=np.float64)))
        most = min(samplers[i].top_logprobs, row.size)
        alternatives = []
        if most:
            for token_id in _largest_logits(row, most):
                text, raw = names(int(token_id))
                alternatives.append(TopLogprob(token=text, logprob=float((row[token_id] - largest) - log_total),
                                               bytes=list(raw), id=int(token_id)))
        text, raw = names(tokens[i])
        result[i] = TokenLogprob(token=text, logprob=float((row[tokens[i]] - largest) - log_total),
                                 bytes=list(raw), top_logprobs=alternatives, id=int(tokens[i]))
    return result


def prompt_token_logprobs(rows: np.ndarray, targets: Sequence[int], top: int, tokenizer) -> list:
    """TokenLogprob of targets[i] under rows[i] (float32 numpy [c, V]: the logits of c prompt positions, each
    scoring the prompt token after it), with its rank (1 + tokens more likely) and the `top` most likely tokens
    (ranks 1..top): the same raw logprobs as token_logprobs (one log-sum-exp per row, no log_softmax tensor)."""
    names = token_names(tokenizer)
    rows = np.asarray(rows, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    largest = rows.max(axis=1)
    log_totals = np.log(np.exp(rows - largest[:, None]).sum(axis=1, dtype=np.float64)).astype(np.float32)
    chosen = rows[np.arange(len(targets)), targets]
    ranks = (rows > chosen[:, None]).sum(axis=1) + 1
    out = []
    for row, target, best, log_total, rank in zip(rows, targets, largest, log_totals, ranks):
        alternatives = []
        for place, token_id in enumerate(_largest_logits(row, min(top, row.size)) if top else (), 1):
            text, raw = names(int(token_id))
            alternatives.append(TopLogprob(token=text, logprob=float((row[token_id] - best) - log_total),
                                           bytes=list(raw), id=int(token_id), rank=place))
        text, raw = names(int(target))
        out.append(TokenLogprob(token=text, logprob=float((row[target] - best) - log_total), bytes=list(raw),
                                top_logprobs=alternatives, id=int(target), rank=int(rank)))
    return out


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
    from serving.model.qwen_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def _threshold(values: np.ndarray, count: int) -> float:
    """A value that at least `count` of the row's values reach, close to the count-th largest, found in
    one pass instead of a sort; -inf when the row is too short for that to save anything.

    The row is cut into disjoint groups (group j: values j, j + groups, ...), 4 * count of them where
    the row allows (at least 8 values each, at least 2 * count groups): the count-th largest of their
    maxima is reached by at least those `count` maxima."""
    size = values.shape[-1]
    groups = min(max(4 * count, 256), size // 8)
    if groups < 2 * count:
        return -np.inf
    whole = size - size % groups
    maxima = values[:whole].reshape(-1, groups).max(axis=0)
    if whole < size:
        maxima = np.concatenate([maxima, values[whole:]])  # the rest: groups of one
    return maxima[np.argpartition(maxima, maxima.size - count)[maxima.size - count]]


def _likeliest(probs: np.ndarray, count: int) -> tuple:
    """(ids, probabilities, tied, tie, whole): the tokens with mass among the `count` most likely and every
    token as likely as those: `ids` above a bound, most likely first (ties by ascending id), then `tied`,
    the ids (ascending) exactly at the bound `tie`; whole: these are all the tokens with mass (fewer than
    `count` have any, or the row was short), none tied."""
    threshold = _threshold(probs, count)
    if not threshold > 0:  # NaN included
        return (*_descending(probs, np.flatnonzero(probs > 0)), np.zeros(0, dtype=np.int64), np.float32(0), True)
    ids, values = _descending(probs, np.flatnonzero(probs > threshold))
    return ids, values, np.flatnonzero(probs == threshold), threshold, False


def _crossing(values: np.ndarray, tied: int, tie, top_p: float) -> Optional[int]:
    """The position where the float32 cumulative sum of `values`, then `tied` times `tie`, first exceeds
    top_p (TopPProcess's sums over the sorted row), or None."""
    limit = np.float32(top_p)
    sums = np.cumsum(values, dtype=np.float32)
    if sums.size and sums[-1] > limit:
        return int(np.argmax(sums > limit))
    if tied:
        start = sums[-1] if sums.size else np.float32(0)
        run = np.cumsum(np.concatenate([[start], np.full(tied, tie, dtype=np.float32)]), dtype=np.float32)[1:]
        if run[-1] > limit:
            return values.size + int(np.argmax(run > limit))
    return None


def _at_least_as_large(descending: np.ndarray, value) -> int:
    """How many of the leading values of a descending array are >= value."""
    return int(np.searchsorted(-descending, -value, side="right"))


def _largest_logits(row: np.ndarray, count: int) -> np.ndarray:
    """Ids of the `count` largest logits, largest first (ties: ascending id)."""
    ids = np.flatnonzero(row >= _threshold(row, count))
    if ids.size < count:  # NaN compares false
        ids = np.arange(row.size)
    return _descending(row, ids)[0][:count]


def _descending(values: np.ndarray, ids: np.ndarray) -> tuple:
    """(ids, values) most likely first, ties in ascending id order (ids ascending on entry)."""
    chosen = values[ids]
    order = np.argsort(-chosen, kind="stable")
    return ids[order], chosen[order]


def _shared_with_numpy(tensor) -> np.ndarray:
    """A CPU tensor's memory as a read-only numpy array, without a copy (DLPack)."""
    return np.from_dlpack(tensor)


def _shared_with_paddle(array: np.ndarray):
    """A numpy array's memory as a CPU tensor, without a copy (DLPack; a read-only array, itself a
    tensor's, is copied: DLPack cannot say read-only)."""
    from paddle.utils import dlpack

    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array, order="C")
    return dlpack.from_dlpack(array)


def _host_rows(logits, rows: Sequence[int]) -> np.ndarray:
    """float32 numpy [len(rows), V]: those rows of the logits (a CPU's float32 logits without a copy;
    from a device, only those rows travel)."""
    import paddle

    if logits.place.is_cpu_place() and logits.dtype == paddle.float32:
        shared = _shared_with_numpy(logits)
        return shared if len(rows) == shared.shape[0] else shared[list(rows)]
    if len(rows) != logits.shape[0]:
        logits = paddle.gather(logits, paddle.to_tensor(list(rows), dtype="int64"), axis=0)
    return logits.astype("float32").numpy()


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
