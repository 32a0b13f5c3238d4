"""Prefill lanes: on a CPU, prompts waiting for their prefill are worked on side by side, one
thread each, with the machine's math threads shared among them.

Why: half of a prefill's time on a CPU goes to Paddle ops that use one core whatever the thread
setting (elementwise ops, norms, softmax, copies); only the matmuls use them all. Measured on
demo-bench, 2 cores, four 448x448 image prompts (vision tower and prefill): one after another with
2 math threads each 1.42 s, two at a time with 1 math thread each 1.00 s. The first prompt's own
wait grows (0.36 -> 0.50 s) and the last one's shrinks (1.42 -> 1.00 s): a burst of image requests
gets its first tokens sooner, and the machine does more per second.

Each lane takes the next prompt in the scheduler's prefill order and works on it within its own
share of the turn's prefill budget (the scheduler's `advance`); a prompt is in one lane at a time.
The lanes run only the prompts' own work (each has its own KV cache and vision tower run) and the
first token of a prompt they finish (sent at once; sampled under a lock, as unseeded rows share
Paddle's generator); joining the running batch stays on the model worker's thread. State the model's forward pass
keeps between layers is per thread (serving.engines.builtin.speedups), and so are the vision
cache's keys (PaddleEngine.set_image_keys).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from serving.engines.builtin import cpu_math

UNTOUCHED = object()  # a prompt no lane reached this turn


class PrefillLanes:
    """Up to `math_threads` lanes, the model worker's thread being the first of them."""

    def __init__(self, math_threads: int):
        self.math_threads = max(1, math_threads)
        self._pool: Optional[ThreadPoolExecutor] = None

    def count(self, prompts: int) -> int:
        """Lanes for this many prompts: one per prompt, at most one per math thread."""
        return max(1, min(self.math_threads, prompts))

    def run(self, items: list, budget: Optional[int], advance: Callable, lanes: int) -> list:
        """advance(item, allowance) -> (tokens spent, outcome) for each item a lane reaches, in order,
        while its lane has budget left (None: no limit); returns those pairs in the items' order,
        UNTOUCHED for the rest."""
        outcomes = [UNTOUCHED] * len(items)
        taken = iter(range(len(items)))
        lock = threading.Lock()

        def lane() -> None:
            spent = 0
            while budget is None or spent < budget:
                with lock:
                    index = next(taken, None)
                if index is None:
                    return
                outcomes[index] = advance(items[index], None if budget is None else budget - spent)
                spent += outcomes[index][0]

        if lanes <= 1:
            lane()
            return outcomes
        each = max(1, self.math_threads // lanes)
        pool = self._pool or self._start()
        cpu_math.use_threads(each)
        try:
            helpers = [pool.submit(_in_model_thread, lane, each) for _ in range(lanes - 1)]
            lane()
            for helper in helpers:
                helper.result()
        finally:
            cpu_math.use_threads(self.math_threads)
        return outcomes

    def _start(self) -> ThreadPoolExecutor:
        self._pool = ThreadPoolExecutor(self.math_threads - 1, thread_name_prefix="prefill-lane")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _in_model_thread(work: Callable, math_threads: int) -> None:
    """A helper lane's turn: eager mode, no autograd, its share of the math threads."""
    import paddle

    if not paddle.in_dynamic_mode():
        paddle.disable_static()
    cpu_math.use_threads(math_threads)
    with paddle.no_grad():
        work()
