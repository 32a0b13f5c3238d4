"""Paddle's CPU math threads: how many each model thread uses, and how long they spin when done.

Paddle's CPU build runs its ops on Intel's OpenMP (libiomp5, with MKL). After each parallel region
its helper threads spin, waiting for more work, for KMP_BLOCKTIME: 200 ms by default. Measured here:
after a decoding step the spinning helper burns a whole core for 150 ms of idle time, taking it from
the HTTP threads (image intake) and from prefill lanes working beside it (serving.engines.builtin.lanes).
A spin of 2 ms keeps the helpers awake from one op to the next within a pass and lets the core go
between passes. Measured on demo-bench, 2 cores, the staggered workload of `python -m bench --only
staggered`: default spin 1.53-1.58 requests/s and p95 time to first token of streamed requests
3.95x idle; 2 ms 1.61 requests/s and 3.82x; 20 ms 1.53 and 4.09x; 0 ms 1.15 requests/s (every op
wakes sleeping threads).
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

SPIN_MS = 2
_openmp = None  # libiomp5, once found; False when absent


def use_threads(count: int) -> None:
    """This thread's ops use `count` math threads (MKL's setting is process-wide, OpenMP's per thread),
    and the threads it starts spin SPIN_MS when done."""
    from paddle.base import core

    core.set_num_threads(max(1, count))
    openmp = _intel_openmp()
    if openmp:
        openmp.kmp_set_blocktime(SPIN_MS)  # per calling thread: it and the team it leads


def _intel_openmp():
    """Paddle's own libiomp5 (already loaded with Paddle), or False when this build has none."""
    global _openmp
    if _openmp is None:
        import paddle

        path = os.path.join(os.path.dirname(paddle.__file__), "libs", "libiomp5.so")
        try:
            _openmp = ctypes.CDLL(path) if os.path.exists(path) else False
            if _openmp:
                _openmp.kmp_set_blocktime  # noqa: B018  (Intel's OpenMP only)
        except (OSError, AttributeError):
            _openmp = False
        if not _openmp:
            log.debug("no Intel OpenMP in this Paddle build: math threads keep their spin time")
    return _openmp
