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

The setting is process-wide and applies only to glibc (Linux); elsewhere, or when
the user set ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` /
``MALLOC_MMAP_MAX_`` themselves, or with ``MEDIRET_MALLOC_TUNING=0``, it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

DISABLE_ENV = "MEDIRET_MALLOC_TUNING"
USER_ENVS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_")
M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 << 20
TRIM_THRESHOLD_BYTES = 1 << 30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the thresholds once per process; True when they are in effect."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(name in os.environ for name in USER_ENVS):
        return False  # the user tuned malloc themselves
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not applied:
        log.debug("mallopt refused the thresholds; the allocator keeps glibc's defaults")
    return applied
