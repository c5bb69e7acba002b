"""Shared fixtures: real-data subsets of ../shared/data and stores built from them."""

from __future__ import annotations

import csv
import os
import random
import shutil
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mediret.encoders import tune_allocator

# As `mediret ingest` does by loading its encoder with tune_allocator=True first: the allocator
# setting in place before FAISS's or DuckDB's threads allocate, so that the encoders' forward
# threads share the main heap (mediret.encoders._allocator) whatever the order the tests run in.
tune_allocator()

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HAM = SHARED_DATA / "ham10000"
ODIR = SHARED_DATA / "odir"
PAD = SHARED_DATA / "pad-ufes-20"
MEDMNIST = SHARED_DATA / "medmnist" / "pneumoniamnist.npz"

requires_data = pytest.mark.skipif(not HAM.is_dir(), reason=f"real data not found at {SHARED_DATA}")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def ham_image_path(image_id: str) -> Path:
    for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
        candidate = HAM / part / f"{image_id}.jpg"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(image_id)


def make_ham_subset(dest: Path, n_lesions: int, seed: int = 0) -> list[dict[str, str]]:
    """Copy every image of ``n_lesions`` seeded lesions, in HAM10000's own layout, to ``dest``.

    Returns the metadata rows written. Lesions are sampled per class (at least
    two of each) so that every class is present.
    """
    rows = read_csv(HAM / "HAM10000_metadata.csv")
    by_class: dict[str, list[str]] = {}
    for row in rows:
        lesions = by_class.setdefault(row["dx"], [])
        if row["lesion_id"] not in lesions:
            lesions.append(row["lesion_id"])
    rng = random.Random(seed)
    total = sum(len(v) for v in by_class.values())
    chosen: set[str] = set()
    for dx, lesions in sorted(by_class.items()):
        k = max(2, round(n_lesions * len(lesions) / total))
        chosen.update(rng.sample(sorted(lesions), min(k, len(lesions))))
    kept = [r for r in rows if r["lesion_id"] in chosen]
    (dest / "HAM10000_images_part_1").mkdir(parents=True, exist_ok=True)
    (dest / "HAM10000_images_part_2").mkdir(parents=True, exist_ok=True)
    for row in kept:
        src = ham_image_path(row["image_id"])
        shutil.copy(src, dest / src.parent.name / src.name)
    with open(HAM / "HAM10000_metadata.csv", newline="") as fh:
        header = fh.readline()
    with open(dest / "HAM10000_metadata.csv", "w", newline="") as fh:
        fh.write(header)
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writerows(kept)
    return kept


class ThumbnailPreprocess:
    """Deterministic, cheap preprocessing for store/CLI logic tests: an 8x8 RGB thumbnail."""

    name = "thumbnail"

    def pixels(self, image) -> np.ndarray:
        return np.array(image.convert("RGB").resize((8, 8)), dtype=np.uint8)

    def __call__(self, image):
        import torch

        return torch.from_numpy(self.pixels(image).astype(np.float32)).permute(2, 0, 1) / 255


class ThumbnailEncoder:
    """A fake encoder whose embedding is the normalised, centred 8x8 thumbnail (192-d)."""

    def __init__(self, dim: int = 192, name: str = "thumbnail-test"):
        self.spec = SimpleNamespace(name=name, dim=dim)
        self.dim = dim
        self.weights_source = "none (test encoder)"
        self.preprocess = ThumbnailPreprocess()
        self.images = 0  # embedded so far
        self.lookahead = 2  # Encoder.embed_stream's default on 2 cores: 2 forward streams

    def embed_pixels(self, pixels) -> np.ndarray:
        import torch

        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_batch(torch.from_numpy(np.asarray(pixels, dtype=np.float32)).permute(0, 3, 1, 2) / 255)

    def embed_stream(self, items, batch=None):
        """As ``Encoder.embed_stream``: ``lookahead`` batches taken (and embedded) before one is handed back."""
        pending = deque()
        for item in items:
            pending.append((item, self.embed_pixels(batch(item) if batch else item)))
            if len(pending) > self.lookahead:
                yield pending.popleft()
        yield from pending

    def embed_batch(self, batch) -> np.ndarray:
        self.images += len(batch)
        x = batch.reshape(len(batch), -1).numpy().astype(np.float32)[:, : self.dim]
        x = x - x.mean(axis=1, keepdims=True)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@pytest.fixture
def thumbnail_encoder():
    return ThumbnailEncoder()


def environ_without(*prefixes: str) -> dict[str, str]:
    """This process's environment minus the variables starting with any of ``prefixes``: for a
    fresh process that must not inherit the user's allocator (``MALLOC_``) or OpenMP settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


# Source for a fresh process (prepend it to a script) that observes glibc's allocator settings:
# refaulted_pages() counts the pages ten re-allocations of a 64 MiB buffer fault in again (all of
# them at glibc's default mmap threshold, next to none once mediret's tuning keeps freed buffers);
# arenas() counts glibc's arenas (malloc_info's heaps) once a new thread has allocated: more than
# one unless M_ARENA_MAX limits them.
ALLOCATOR_PROBES = """
import ctypes, ctypes.util, os, resource, tempfile, threading
_libc = ctypes.CDLL(ctypes.util.find_library('c'))
_libc.malloc.restype, _libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
_libc.free.argtypes = (ctypes.c_void_p,)
_libc.fopen.restype, _libc.fopen.argtypes = ctypes.c_void_p, (ctypes.c_char_p, ctypes.c_char_p)
_libc.fclose.argtypes = (ctypes.c_void_p,)
_libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
def refaulted_pages():
    def churn():
        buf = bytearray(64 << 20)
        buf[::4096] = b'x' * len(buf[::4096])
    churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        churn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def arenas():
    thread = threading.Thread(target=lambda: _libc.free(_libc.malloc(1000)))
    thread.start(); thread.join()
    fd, path = tempfile.mkstemp(); os.close(fd)
    stream = _libc.fopen(path.encode(), b'w'); _libc.malloc_info(0, stream); _libc.fclose(stream)
    with open(path) as fh:
        heaps = fh.read().count('<heap nr=')
    os.unlink(path)
    return heaps
"""
REFAULTED_PAGES_AT_DEFAULT = 10 * (64 << 20) // 4096  # refaulted_pages() under glibc's defaults


@contextmanager
def torch_threads(n: int | None = None):
    """Torch's thread count set to ``n`` for a block (or left to the block), restored after it."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ham_subset(tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    """A real HAM10000 subset (about 120 images, all 7 classes) in the distributed layout."""
    if not HAM.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    dest = tmp_path_factory.mktemp("ham_subset")
    rows = make_ham_subset(dest, n_lesions=90, seed=7)
    return dest, rows


@pytest.fixture(scope="session")
def efficientnet_lite0():
    from mediret.encoders import load_encoder

    return load_encoder("efficientnet-lite0")


@pytest.fixture(scope="session")
def ham_store(tmp_path_factory, ham_subset, efficientnet_lite0) -> Path:
    """A store of the HAM10000 subset embedded with the real efficientnet-lite0 weights.

    Session-scoped and shared: tests must treat it as read-only.
    """
    from mediret.datasets import read_dataset
    from mediret.ingest import ingest

    path = tmp_path_factory.mktemp("stores") / "ham"
    report = ingest(read_dataset(ham_subset[0]), path, efficientnet_lite0, progress=False)
    assert report.added == len(ham_subset[1])
    return path
