"""A search index over a store's ids, and the id selection a search ranks within."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .kinds import SIMILARITY, get_kind

__all__ = ["SIMILARITY", "SMALL_BATCH", "SearchIndex", "Selection"]
SMALL_BATCH = 16  # exact queries up to this many are scored with numpy/BLAS, more with FAISS


@dataclass(frozen=True)
class Selection:
    """The ids a search ranks: ``allowed`` (None: every stored id) minus ``excluded``."""

    allowed: np.ndarray | None = None
    excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def count(self, n_total: int) -> int:
        if self.allowed is None:
            return n_total - len(self.excluded)
        return len(np.setdiff1d(self.allowed, self.excluded))

    def faiss_selector(self) -> tuple[Any, list]:
        """(selector or None, objects to keep alive while FAISS uses the selector)."""
        import faiss

        if self.allowed is not None:
            ids = np.setdiff1d(self.allowed, self.excluded).astype(np.int64)
            sel = faiss.IDSelectorBatch(ids)
            return sel, [sel, ids]
        if len(self.excluded):
            ids = np.ascontiguousarray(self.excluded, dtype=np.int64)
            inner = faiss.IDSelectorBatch(ids)
            sel = faiss.IDSelectorNot(inner)
            return sel, [sel, inner, ids]
        return None, []


@dataclass
class SearchIndex:
    """A FAISS index over a store's ids, with the parameters and recall it was built with.

    index: the kind's own FAISS index (the exact index itself for ``exact``).
    exact: the store's exact index (``IndexIDMap2`` over ``IndexFlatIP``), which every kind
        can also rank with, and approximate kinds re-score with.
    recall: recall@k against exact search per k (empty for ``exact``); a hit
        counts when its exact cosine is at least that of the k-th exact neighbour.
    build_seconds: None when the index was loaded from the cache (or is exact).
    """

    kind: str
    index: Any
    exact: Any
    params: dict[str, Any] = field(default_factory=dict)
    recall: dict[int, float] = field(default_factory=dict)
    build_seconds: float | None = None
    cache_file: str | None = None
    _exact_scan: Any = field(default=None, repr=False)

    @property
    def ntotal(self) -> int:
        return int(self.exact.ntotal)

    @property
    def exact_scan(self):
        """The exact kind's scans over ``exact`` (``mediret.index.exact.ExactScan``)."""
        if self._exact_scan is None:
            from .exact import ExactScan

            self._exact_scan = ExactScan(self.exact)
        return self._exact_scan

    def search(self, queries: np.ndarray, k: int, selection: Selection | None = None,
               kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids (Q, k), best first; id -1 (score -inf) pads missing hits.

        kind: rank with another kind than the index's own ('exact' is always possible).
        """
        kind = kind or self.kind
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        selection = selection or Selection()
        if kind == "exact":
            return self.exact_scan.search(queries, k, selection)
        implementation = get_kind(kind).implementation()
        sel, keep_alive = selection.faiss_selector()
        with faiss_threads(1) if len(queries) <= SMALL_BATCH else nullcontext():
            scores, ids = implementation.search(self, queries, k, sel)
        del keep_alive  # the selector had to outlive the search; no longer
        return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": self.params,
                "recall": {f"recall@{k}": round(v, 4) for k, v in self.recall.items()},
                "built_seconds": (None if self.build_seconds is None
                                  else round(self.build_seconds, 2)),
                "cache_file": self.cache_file}


@contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """FAISS's OpenMP threads set to ``n`` for a block. FAISS splits a search over queries; with a
    few of them, extra threads only add start-up and spinning (IVF-PQ at 1M: 418 q/s on 1
    thread, 122 on 2)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def sort_order(ids: np.ndarray) -> np.ndarray | None:
    """None when ``ids`` are strictly ascending, else the permutation that sorts them."""
    return None if bool(np.all(ids[1:] > ids[:-1])) else np.argsort(ids, kind="stable")


def rows_of(ids: np.ndarray, order: np.ndarray | None, wanted: np.ndarray) -> np.ndarray:
    """Positions in ``ids`` (sorted by ``order``, see ``sort_order``) of the ``wanted`` ids;
    wanted ids that ``ids`` does not hold are dropped."""
    rows = np.minimum(np.searchsorted(ids, wanted, sorter=order), len(ids) - 1)
    rows = rows if order is None else order[rows]
    return rows[ids[rows] == wanted]
