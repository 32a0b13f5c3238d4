"""Flow control for chat requests: a bounded number in the server at once.

`Admission.enter()` takes a place or raises ServerBusy (429 with Retry-After); `Slot.release()`
gives it back once, however often it is called (a stream releases at its end and on close).
"""

from __future__ import annotations

import threading

from serving.errors import ServerBusy


class Admission:
    def __init__(self, limit: int, retry_after: int = 2):
        self.limit = max(1, int(limit))
        self.retry_after = retry_after
        self._count = 0
        self._lock = threading.Lock()

    def enter(self) -> "Slot":
        with self._lock:
            if self._count >= self.limit:
                raise ServerBusy(f"the server is busy ({self.limit} requests in progress); retry shortly",
                                 code="queue_full", retry_after=self.retry_after)
            self._count += 1
        return Slot(self)

    def in_flight(self) -> int:
        return self._count

    def _leave(self) -> None:
        with self._lock:
            self._count -= 1


class Slot:
    def __init__(self, admission: Admission):
        self._admission = admission
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._admission._leave()
