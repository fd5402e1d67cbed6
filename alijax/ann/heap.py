"""The process heap: glibc keeps freed memory resident and, after the first large free, puts
later large buffers on the heap, where they fragment. The index builds and searches hand freed
heap back (release_free_heap) and build with large buffers kept off the heap
(large_buffers_off_heap); both are no-ops without glibc."""

from __future__ import annotations

import contextlib
import ctypes
import functools


@functools.lru_cache(maxsize=None)
def _libc(name: str):
    try:
        return getattr(ctypes.CDLL(None), name, None)
    except OSError:
        return None


# glibc's mallopt parameters (malloc.h) and the ceiling of its dynamic mmap threshold on 64-bit.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_DYNAMIC_MMAP_MAX = 32 << 20


@contextlib.contextmanager
def large_buffers_off_heap(threshold: int = 1 << 20):
    """While open, glibc serves an allocation of `threshold` bytes or more that no free heap
    block can hold with its own mapping, returned to the OS when freed, instead of growing the
    heap (a no-op where there is no mallopt). The setting is the whole process's.

    glibc raises its mmap threshold to the size of each mapped block freed, up to 32 MB, so
    after a build's first large free its later buffers (XLA's temporaries, numpy chunks) came
    from the heap and stayed there, fragmented: at 1M the process held 612 MB after a
    BinaryGraphIndex.build with the threshold left to glibc and 545 MB with the build under
    this, and the build's own peak fell from 728 to 719 MB (VmRSS / VmHWM over the loaded
    data, 2 cores, 2026-11-26). Searches must not run under it: their per-call buffers, mapped
    and unmapped on every call, cost 25-35% of the QPS at 100k with a 1 or 16 MB threshold.
    On exit the threshold is pinned at 32 MB (and the trim threshold at twice that), where
    glibc's own settles once a large block has been freed; glibc cannot be put back to
    adjusting it itself."""
    mallopt = _libc("mallopt")
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, int(threshold))
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _DYNAMIC_MMAP_MAX)
        mallopt(_M_TRIM_THRESHOLD, 2 * _DYNAMIC_MMAP_MAX)


def release_free_heap():
    """Hands the heap that Python and XLA have freed back to the OS (glibc's malloc_trim; a
    no-op elsewhere). Freed heap stays resident, and a stage's buffers come from fresh pages,
    not from it: compiling the 1M build left 0.25 GB freed but resident, and each stage about
    0.55 GB, which the next stage's peak then stood on (VmRSS, 2 cores)."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)
