"""The peers' per-row token rules (issue 20): min_tokens, ignore_eos and min_p, as a row's score adjustment.

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
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np


class RowRules:
    def __init__(self, params, sampler, eos_ids):
        self.min_tokens = int(params.min_tokens or 0)
        self.ignore_eos = bool(params.ignore_eos)
        self.eos = np.fromiter(sorted(eos_ids), dtype=np.int64)
        self.ending = np.fromiter(sorted(set(eos_ids) | set(params.stop_token_ids or ())), dtype=np.int64)
        self.min_p = float(params.min_p or 0.0) if not sampler.greedy else 0.0
        self.temperature = sampler.temperature

    @classmethod
    def of(cls, params, sampler, eos_ids) -> Optional["RowRules"]:
        """The row's rules (`eos_ids`: the model's end-of-turn tokens), or None when the request uses none."""
        if not (params.min_tokens or params.ignore_eos or (params.min_p and not sampler.greedy)):
            return None
        return cls(params, sampler, eos_ids)

    def shapes(self, count: int) -> bool:
        """The next token's scores change (after `count` tokens of the answer)."""
        return self.ignore_eos or count < self.min_tokens or self.min_p > 0.0

    def adjust(self, scores: np.ndarray, count: int) -> np.ndarray:
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
