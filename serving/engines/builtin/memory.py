"""Giving memory back: glibc's malloc and the model's large short-lived buffers.

Measured on the demo model (scripts in bench/attacks.py, attack "memory"): one 1000x1000 image costs
the vision tower ~650 MB of buffers for a moment (its full-attention layers over ~5,000 patches),
allocated by Paddle's CPU allocator with malloc and freed at once (Paddle's "Reserved" equals its
"Allocated": it caches nothing on a CPU). glibc then kept most of that memory: after freeing a large
mmap'd block it raises its mmap threshold (up to 32 MB), so the next large buffers come from the heap,
where freed memory stays mapped. The server's RSS grew ~1.5 GB over 120 distinct images while the
image caches held ~150 MB.

Two measures, both glibc only (musl, macOS: nothing is changed):
- `tune_malloc()` fixes the mmap threshold at 4 MB: the largest buffers are each their own mapping,
  returned when freed, and the threshold no longer climbs to 32 MB.
- `give_back()` (malloc_trim) after each prompt's prefill hands the heap's free pages back: ~3 ms,
  against 100 ms or more for a prefill.
Why 4 MB and not lower: every mmap'd buffer is fresh pages, faulted in on first touch. At 1 MB
(the first version) the tower's many 1-4 MB buffers were all mapped, and on the model worker's
thread a 448x448 image's tower took 362 ms instead of 229 ms and a 300-token prefill 155 ms instead
of 112 (demo-bench, 2 cores). Measured with 120 distinct 1000x1000 images (`python -m bench.attacks
--only memory --memory-images 120`): RSS growth apart from the image caches 90 MB at 1 MB, 318 MB
at 4 MB alone, 57 MB with both measures (and the run took 101, 80 and 74 s).
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 4 << 20
_libc = None  # glibc, once tune_malloc() found it


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (present in glibc only)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc map every allocation of `threshold` bytes or more on its own (and unmap it when freed),
    once per process. True when applied."""
    global _libc
    if _libc is not None:
        return True
    libc = _glibc()
    if libc is None or libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) != 1:
        return False
    _libc = libc
    log.debug("malloc: blocks of %d bytes or more are mapped on their own and returned when freed", threshold)
    return True


def give_back() -> None:
    """Return the heap's free pages to the system (after tune_malloc(); otherwise nothing)."""
    if _libc is not None:
        _libc.malloc_trim(0)
