"""The peers' per-row token rules (issue 20): min_tokens, ignore_eos, min_p and bad words, as a row's score
adjustment.

They run in the same per-row path as a grammar's mask (serving.engines.builtin.sampling.next_tokens' `adjust`,
after the penalties and the grammar, before temperature, top-k and top-p), so rows without them are not
touched and greedy answers stay as they were.

- min_tokens (vLLM, FastDeploy): the row's ending tokens (the model's end-of-turn tokens and the request's
  stop_token_ids) are forbidden while the answer is shorter than min_tokens, as vLLM does.
- ignore_eos (vLLM, llama.cpp): the model's end-of-turn tokens are forbidden (stop_token_ids still end the
  answer, as in vLLM), as llama.cpp does it (a bias of -inf), not as vLLM (which samples an end token and goes
  on past it): the answer is then the text the model writes when it does not end.
  A grammar that allows nothing but an end (a finished JSON value) keeps it: the form wins.
- min_p (vLLM, llama.cpp): tokens whose probability is below min_p times the most likely token's are dropped.
  p_i >= min_p * p_max  <=>  s_i >= s_max + T * ln(min_p) on the scores s before the temperature T, so it is
  exact here; greedy rows (the top token always passes) are not touched.
- bad_words (vLLM) and bad_words_token_ids (FastDeploy): token sequences the answer must never contain. A
  sequence's last token is forbidden when the answer so far ends with the rest of it (a one-token sequence is
  forbidden everywhere), as vLLM's NoBadWordsLogitsProcessor does; a word is banned as tokenized alone and after
  a space (the two ways byte-level BPE writes it). Only the answer's own tokens count, not the prompt's.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np


MAX_BAD_WORD_TOKENS = 32  # a longer "word" is a sentence: 400 (each step compares every sequence's tail)


def bad_word_sequences(encode, words, token_ids) -> list:
    """The token sequences to ban: each id of `token_ids` alone, and each of `words` (strings) as `encode`
    (text -> ids, no special tokens) writes it on its own and after a space. ValueError naming a word that
    encodes to nothing or to more than MAX_BAD_WORD_TOKENS tokens."""
    found = {(int(t),) for t in token_ids or ()}
    for word in words or ():
        core = word.lstrip() or word  # leading spaces belong to the spaced form, as in vLLM
        for form in dict.fromkeys((core, " " + core)):
            ids = tuple(int(t) for t in encode(form))
            if not ids or len(ids) > MAX_BAD_WORD_TOKENS:
                raise ValueError(f"bad word {word!r} is {len(ids)} tokens; each must be 1 to "
                                 f"{MAX_BAD_WORD_TOKENS} tokens")
            found.add(ids)
    return sorted(found)


class RowRules:
    def __init__(self, params, sampler, eos_ids):
        self.min_tokens = int(params.min_tokens or 0)
        self.ignore_eos = bool(params.ignore_eos)
        self.eos = np.fromiter(sorted(eos_ids), dtype=np.int64)
        self.ending = np.fromiter(sorted(set(eos_ids) | set(params.stop_token_ids or ())), dtype=np.int64)
        self.min_p = float(params.min_p or 0.0) if not sampler.greedy else 0.0
        self.temperature = sampler.temperature
        banned = list(getattr(params, "banned", None) or ())
        self.banned_always = np.fromiter(sorted({seq[0] for seq in banned if len(seq) == 1}), dtype=np.int64)
        self.banned_after = [seq for seq in banned if len(seq) > 1]  # (..., last): last is banned after the rest

    @classmethod
    def of(cls, params, sampler, eos_ids) -> Optional["RowRules"]:
        """The row's rules (`eos_ids`: the model's end-of-turn tokens), or None when the request uses none."""
        if not (params.min_tokens or params.ignore_eos or (params.min_p and not sampler.greedy)
                or getattr(params, "banned", None)):
            return None
        return cls(params, sampler, eos_ids)

    def shapes(self, count: int) -> bool:
        """The next token's scores change (after `count` tokens of the answer)."""
        return (self.ignore_eos or count < self.min_tokens or self.min_p > 0.0 or self.banned_always.size > 0
                or bool(self.banned_after))

    def adjust(self, scores: np.ndarray, count: int, answer=()) -> np.ndarray:
        """`scores` of the next token after `count` tokens of the answer (`answer`: their ids)."""
        if self.banned_always.size or self.banned_after:
            banned = self.banned_now(answer)
            banned = banned[banned < scores.shape[0]]
            if banned.size and np.isfinite(scores).sum() > np.isfinite(scores[banned]).sum():
                scores[banned] = -np.inf  # (when nothing else is allowed, the answer's form wins)
        if self.ignore_eos or count < self.min_tokens:
            ending = self.ending if count < self.min_tokens else self.eos
            ending = ending[ending < scores.shape[0]]
            others = np.isfinite(scores).sum() - np.isfinite(scores[ending]).sum()
            if others > 0:  # something else may come: the end waits
                scores[ending] = -np.inf
        if self.min_p > 0.0:
            floor = np.float32(scores.max() + self.temperature * math.log(self.min_p))
            scores = np.where(scores >= floor, scores, np.float32(-np.inf)).astype(np.float32, copy=False)
        return scores

    def banned_now(self, answer) -> np.ndarray:
        """The token ids a bad word forbids as the answer's next token, after `answer` (ids so far)."""
        tails = [seq[-1] for seq in self.banned_after
                 if len(answer) >= len(seq) - 1 and tuple(answer[len(answer) - len(seq) + 1:]) == seq[:-1]]
        if not tails:
            return self.banned_always
        return np.union1d(self.banned_always, np.asarray(tails, dtype=np.int64))
