"""A store's index of a kind: its exact one, or an approximate one from the store's cache or built anew.

An approximate index is built from the vectors reconstructed from the store,
its recall@1/10/50 against exact search is measured on held-out stored
vectors, and both are cached in the store directory as
``<encoder>.<kind>.faiss`` plus ``.json`` (parameters, recall, and a
fingerprint of the store's ids that invalidates the cache when vectors are
added or removed).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import SearchError
from ..store import Store
from .base import SearchIndex
from .build import build_from_vectors
from .kinds import get_kind

CACHE_FORMAT = 2  # of the cached approximate indexes; 2: IVF-PQ with OPQ, an HNSW coarse quantizer, 4-bit fast-scan codes


def open_index(store: Store, kind: str = "exact", rebuild: bool = False,
               target_recall: float | None = None,
               on_build: Callable[[int], None] | None = None) -> SearchIndex:
    """The store's index of ``kind``: exact, or an approximate one from cache or freshly built.

    target_recall: the recall@10 against exact search its knobs are tuned to (default
        the kind's own); a cached index tuned to another target is rebuilt.
    on_build: called with the number of vectors just before a build starts (which takes
        minutes at a million vectors), e.g. to tell the user.
    """
    spec = get_kind(kind)
    if len(store) == 0:
        raise SearchError(f"{store.path} holds no vectors; ingest a dataset first")
    if not spec.approximate:
        return SearchIndex(kind, store.index, store.index)
    import faiss

    index_path, meta_path = cache_paths(store, kind)
    fingerprint = store_fingerprint(store)
    target = target_recall or spec.target_recall
    if not rebuild and index_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if (meta.get("format") == CACHE_FORMAT and meta.get("fingerprint") == fingerprint
                    and meta["params"].get("target_recall") == target):
                return SearchIndex(kind, faiss.read_index(str(index_path)), store.index,
                                   params=meta["params"],
                                   recall={int(k): v for k, v in meta["recall"].items()},
                                   cache_file=index_path.name)
        except (OSError, ValueError, KeyError, RuntimeError):
            pass  # unreadable or stale cache: rebuild below
    if on_build is not None:
        on_build(len(store))
    built = build_index(store, kind, target_recall=target_recall)
    try:
        _write_atomic(index_path, lambda tmp: faiss.write_index(built.index, str(tmp)))
        _write_atomic(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(
            {"format": CACHE_FORMAT, "fingerprint": fingerprint, "params": built.params,
             "recall": {str(k): v for k, v in built.recall.items()},
             "build_seconds": built.build_seconds}, indent=2)))
        built.cache_file = index_path.name
    except OSError:
        built.cache_file = None  # a read-only store directory: use the index uncached
    return built


def build_index(store: Store, kind: str, seed: int = 0, target_recall: float | None = None) -> SearchIndex:
    """Build an approximate index from the store's vectors, tune it and measure its recall."""
    ids = store.vector_ids()
    return build_from_vectors(kind, store.vectors(ids), ids, store.index, seed, target_recall)


def store_fingerprint(store: Store) -> dict[str, Any]:
    """What a cached index was built from: the encoder and the exact set of vector ids."""
    ids = store.vector_ids()
    return {"encoder": store.encoder.name, "vectors": int(len(ids)),
            "ids_blake2b": hashlib.blake2b(ids.tobytes(), digest_size=16).hexdigest()}


def cache_paths(store: Store, kind: str) -> tuple[Path, Path]:
    stem = f"{store.encoder.name}.{kind}"
    return store.path / f"{stem}.faiss", store.path / f"{stem}.json"


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
