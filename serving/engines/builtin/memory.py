"""Giving memory back: glibc's malloc and the model's large short-lived buffers.

Measured on the demo model (scripts in bench/attacks.py, attack "memory"): one 1000x1000 image costs
the vision tower ~650 MB of buffers for a moment (its full-attention layers over ~5,000 patches),
allocated by Paddle's CPU allocator with malloc and freed at once (Paddle's "Reserved" equals its
"Allocated": it caches nothing on a CPU). glibc then kept most of that memory: after freeing a large
mmap'd block it raises its mmap threshold (up to 32 MB), so the next large buffers come from the heap,
where freed memory stays mapped. The server's RSS grew ~1.5 GB over 120 distinct images while the
image caches held ~150 MB; malloc_trim(0) gave 400 MB of 920 back at once.

`tune_malloc()` fixes the threshold at 1 MB: every buffer of 1 MB or more is its own mapping and goes
back to the system when freed. Measured: RSS +200 MB after 80 distinct images (caches 134 MB of it)
instead of +550 MB after 24, at a cost within the noise of the image requests' time (mmap and page
faults, a few percent at most). Not glibc (musl, macOS): nothing is changed.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20
_done = False


def tune_malloc(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc map every allocation of `threshold` bytes or more on its own (and unmap it when freed),
    once per process. True when applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (present in glibc only)
    except (OSError, AttributeError):
        return False
    _done = libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1
    if _done:
        log.debug("malloc: blocks of %d bytes or more are mapped on their own and returned when freed", threshold)
    return _done
