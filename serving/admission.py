"""Flow control for chat requests: a bounded number in the server at once, each with a time limit.

`Admission.enter()` takes a place or raises 429 (ServerBusy) with Retry-After; `Slot.release()`
gives it back once, however often it is called (a stream releases at its end and on close).
`TimedEvents` reads an engine job's events (text deltas, then Finished) with a deadline: past it
the job is cancelled and RequestTimeout raised. A reader thread drains the job, so a stuck or
slow engine never stalls the HTTP thread past the deadline.
"""

from __future__ import annotations

import queue
import threading
import time

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


_END = object()


class TimedEvents:
    """Iterate an engine job's events until `deadline` (time.perf_counter()); `close()` cancels the job."""

    def __init__(self, job, deadline: float, limit_seconds: float):
        self.job = job
        self.deadline = deadline
        self.limit_seconds = limit_seconds
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._drain, name="job-reader", daemon=True).start()

    def _drain(self) -> None:
        try:
            for event in self.job:
                self._events.put(event)
        except BaseException as exc:  # the engine's error travels to the request thread
            self._events.put(_Raised(exc))
        self._events.put(_END)

    def __iter__(self):
        while True:
            try:
                event = self._events.get(timeout=max(0.0, self.deadline - time.perf_counter()))
            except queue.Empty:
                self.close()
                raise RequestTimeout(f"the request took longer than this server's limit of "
                                     f"{self.limit_seconds:g} seconds and was cancelled",
                                     code="request_timeout") from None
            if event is _END:
                return
            if isinstance(event, _Raised):
                raise event.exc
            yield event

    def close(self) -> None:
        self.job.cancel()  # the engine then ends the job's iteration, and so our reader


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc
