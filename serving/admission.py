"""Flow control for chat requests: a bounded number in the server at once, each with a time limit.

`Admission.enter()` takes a place or raises 429 (ServerBusy) with Retry-After; `Slot.release()`
gives it back once, however often it is called (a stream releases at its end and on close).
`TimedEvents` reads an engine job's events (text deltas, then Finished) with a deadline: past it
the job is cancelled and RequestTimeout raised. The job's own reads never block longer than a
short poll, so a stuck or slow engine cannot stall the HTTP thread past the deadline.
"""

from __future__ import annotations

import threading

from .errors import RequestTimeout, ServerBusy


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
                                 code="queue_full", headers={"Retry-After": str(self.retry_after)})
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


class TimedEvents:
    """Iterate an engine job's events until `deadline` (time.perf_counter()); `close()` cancels the job."""

    def __init__(self, job, deadline: float, limit_seconds: float):
        self.job = job
        self.deadline = deadline
        self.limit_seconds = limit_seconds

    def __iter__(self):
        try:
            yield from self.job.until(self.deadline)
        except TimeoutError:
            self.close()
            raise RequestTimeout(f"the request took longer than this server's limit of "
                                 f"{self.limit_seconds:g} seconds and was cancelled",
                                 code="request_timeout") from None

    def close(self) -> None:
        self.job.cancel()  # the engine drops it at its next step
