"""Keep the CPU forward pass's activation buffers in the heap instead of mapping them anew each batch.

glibc serves allocations above its mmap threshold (dynamic, at most 32 MiB) with
``mmap`` and returns them with ``munmap`` when freed. A CNN forward at batch 32
frees and re-allocates tens of such buffers per batch, so every batch
page-faults its activations in again, and much of the forward's time goes to
the kernel.

``keep_freed_memory`` raises the mmap threshold to 256 MiB (a fixed threshold
also turns off glibc's dynamic adjustment) and the trim threshold to 1 GiB, so
freed activations stay mapped for the next batch. On 2 cores, batch 32
(``BENCHMARKS.md``, ``scripts/bench_encoders.py --ablation``): EfficientNet-Lite0
105 -> 240 img/s, SqueezeNet 172 -> 385, ResNet50 34 -> 50; peak RSS of an
ingest unchanged. Buffers of 256 MiB and more (a FAISS index, a big numpy
matrix) are still mapped and returned to the OS as before.

It also limits glibc to one arena (``M_ARENA_MAX``), so that threads other than
the main one allocate from the main heap too. glibc gives other threads arenas
of 64 MiB heaps, and serves any larger buffer (an EfficientNet-Lite0 activation
at batch 32 is 154 MB) with ``mmap`` whatever the threshold: the encoders'
forward threads (``Encoder.embed_stream``) would page-fault their activations
in on every batch. Arenas made before the limit stay, and glibc hands them out
in turn to new threads as well, so the setting must come before other threads
allocate: ``load_encoder(..., tune_allocator=True)`` applies it before it builds
a model (whose initialisation runs torch's threads), ``mediret.ingest.ingest``
before it opens its store (DuckDB's start makes arenas), and
``heap_keeps_large_buffers`` tells a thread whether it is spared the faults.

The setting is process-wide, so it is applied only where asked (the package's
public name for ``keep_freed_memory`` is ``mediret.encoders.tune_allocator``), and
only to glibc (Linux); elsewhere, or when the user set ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_MAX_`` themselves, or with
``MEDIRET_MALLOC_TUNING=0``, it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform

log = logging.getLogger(__name__)

DISABLE_ENV = "MEDIRET_MALLOC_TUNING"
USER_ENVS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_")
M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 256 << 20
# Above a secondary arena's 64 MiB heap, below the mmap threshold (heap_keeps_large_buffers).
PROBE_BYTES = 96 << 20
TRIM_THRESHOLD_BYTES = 1 << 30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the thresholds (and the arena limit) once per process; True when the thresholds are in effect."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _limit_arenas() -> None:
    """Limit glibc to one arena (see the module docstring), unless the user set ``MALLOC_ARENA_MAX``."""
    mallopt = _mallopt()
    if mallopt is not None and "MALLOC_ARENA_MAX" not in os.environ and not mallopt(M_ARENA_MAX, 1):
        log.debug("mallopt refused M_ARENA_MAX; threads keep their own arenas")


def _libc() -> ctypes.CDLL | None:
    """glibc through ctypes; None where mediret leaves the allocator alone (tuning off, not glibc)."""
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return None
    return _glibc()


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, found and loaded once per process (``find_library`` runs ``ldconfig``); None elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _mallopt():
    """glibc's ``mallopt``; None where mediret leaves the allocator alone."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def _apply() -> bool:
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if any(name in os.environ for name in USER_ENVS):
        return False  # the user tuned malloc themselves
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not applied:
        log.debug("mallopt refused the thresholds; the allocator keeps glibc's defaults")
    else:
        _limit_arenas()
    return applied


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_keeps_large_buffers() -> bool:
    """Whether a freed activation-sized buffer stays mapped for the calling thread.

    True when ``keep_freed_memory`` has put the thresholds in effect and a ``PROBE_BYTES`` allocation made
    by this thread comes from the heap rather than from ``mmap`` (glibc's count of
    mapped bytes, ``mallinfo2().hblkhd``, does not grow): the thread allocates from
    the main arena (see the module docstring). False elsewhere, including where
    glibc is too old for ``mallinfo2`` (before 2.33).
    """
    if not _applied:  # keep_freed_memory not called, or not in effect
        return False
    try:
        libc = _libc()
        mallinfo2, malloc, free = libc.mallinfo2, libc.malloc, libc.free
    except AttributeError:  # no libc (tuning turned off since), or no mallinfo2
        return False
    mallinfo2.restype = _MallInfo2
    malloc.argtypes, malloc.restype = (ctypes.c_size_t,), ctypes.c_void_p
    free.argtypes, free.restype = (ctypes.c_void_p,), None
    before = mallinfo2().hblkhd
    block = malloc(PROBE_BYTES)  # never touched: no page is faulted in
    if not block:
        return False
    mapped = mallinfo2().hblkhd > before
    free(block)
    return not mapped
