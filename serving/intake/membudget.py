"""A memory budget: bytes that work of one kind (images being decoded) may use at once.

    budget = MemoryBudget(512 * 2**20)
    with budget.hold(estimated_bytes, deadline=...):   # waits its turn, first come first served
        ...decode...

A holder larger than the whole budget waits until it is alone, then runs (so one large image is
still decoded, never two at once). Past `deadline` (time.perf_counter()) the wait raises TimeoutError.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Optional


class MemoryBudget:
    def __init__(self, total_bytes: int):
        self.total = max(1, int(total_bytes))
        self.used = 0
        self.peak = 0  # the most held at once, for tests and logs
        self.waited = 0  # holders that had to wait
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()  # waiting holders, in arrival order

    @contextlib.contextmanager
    def hold(self, nbytes: int, deadline: Optional[float] = None):
        nbytes = min(max(0, int(nbytes)), self.total)
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                if not self._may_go(ticket, nbytes):
                    self.waited += 1
                while not self._may_go(ticket, nbytes):
                    wait = None if deadline is None else deadline - time.perf_counter()
                    if wait is not None and wait <= 0:
                        raise TimeoutError("waited too long for memory to decode in")
                    self._cond.wait(wait)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()

    def _may_go(self, ticket, nbytes: int) -> bool:
        return self._queue[0] is ticket and self.used + nbytes <= self.total
