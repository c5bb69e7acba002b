"""The exact index kind: every allowed vector of the store's flat index is scored.

Up to ``SMALL_BATCH`` queries are scored by one BLAS matrix product over a
zero-copy view of the index's vectors (on one host FAISS scanned one query on
one thread at 0.41-0.65 of the memory-bandwidth bound, and slower with two,
where multi-threaded sgemv reached 0.93-1.04 of it: BENCHMARKS.md); larger
batches go to FAISS. A single unfiltered query takes whichever of BLAS and
FAISS's one-thread scan was faster on a probe query (timed once per index): on
another host FAISS's scan was the faster, 27.5 against 23 GB/s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np

from .base import SMALL_BATCH, Selection, faiss_threads, rows_of, sort_order

SCAN_PROBE_BYTES = 256 << 20  # the single-query scans are timed on at most this much of the index
GATHER_FRACTION = 0.25  # below this share of the store, allowed vectors are gathered, not scanned


class ExactScan:
    """Exact top-k over an ``IndexIDMap`` of an ``IndexFlat`` (the store's vectors).

    single_query_scan: "blas" or "faiss" once a single unfiltered query has been timed
        both ways (``choose_single_scan``), else None.
    """

    def __init__(self, exact: Any):
        self.exact = exact
        self.single_query_scan: str | None = None
        self._id_map: tuple[np.ndarray, np.ndarray | None] | None = None  # see flat_view

    def search(self, queries: np.ndarray, k: int, selection: Selection) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids (Q, k) of float32 ``queries``, best first; id -1 (score -inf) pads."""
        few = len(queries) <= SMALL_BATCH
        view = self.flat_view() if few else None
        if view is not None and not (len(queries) == 1 and selection.allowed is None
                                     and self.choose_single_scan(view) == "faiss"):
            return self.search_blas(queries, k, selection, *view)
        with faiss_threads(1) if few else nullcontext():
            return self.search_faiss(queries, k, selection)

    def search_faiss(self, queries: np.ndarray, k: int, selection: Selection) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        sel, keep_alive = selection.faiss_selector()
        params = faiss.SearchParameters(sel=sel) if sel is not None else None
        scores, ids = self.exact.search(queries, k, params=params)
        del keep_alive
        return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids

    def choose_single_scan(self, view: tuple[np.ndarray, np.ndarray, np.ndarray | None]) -> str:
        """Which scans one unfiltered query faster on this machine: "blas" or "faiss" (one thread).

        Timed once per index, on the first such query, under the thread settings then in
        force: best of five runs each, a stored vector as the query, over the first
        ``SCAN_PROBE_BYTES`` of the vectors (beyond the CPU's caches, yet at most about
        50 ms in all: at 1M x 512 both scans streamed as fast over 256 MB as over the whole
        2 GB). Which wins depends on the CPU: BLAS sgemv reached 0.93-1.04 of the
        memory-bandwidth bound where FAISS's one-query scan reached 0.41-0.65 on one host,
        while on another FAISS's scan streamed 27.5 GB/s on one thread and OpenBLAS's
        sgemv 12 GB/s a thread (BENCHMARKS.md).
        """
        if self.single_query_scan is None:
            import faiss

            vectors, row_ids, _ = view
            rows = max(1, min(len(vectors), SCAN_PROBE_BYTES // max(1, vectors[0].nbytes)))
            sample, probe = vectors[:rows], np.ascontiguousarray(vectors[:1])

            def faiss_scan():  # the kernel of IndexFlatIP's search, over the sample
                with faiss_threads(1):
                    faiss.knn(probe, sample, 10, faiss.METRIC_INNER_PRODUCT)

            self.single_query_scan = _fastest(
                {"blas": lambda: self.search_blas(probe, 10, Selection(), sample, row_ids[:rows], None),
                 "faiss": faiss_scan}, repeat=5)
        return self.single_query_scan

    def flat_view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """(vectors (n, d) viewing the flat index's memory, row -> id, id sort order), or None.

        The sort order is None when the ids are ascending (``rows_of``). None when the
        exact index is not an ``IndexIDMap`` over an ``IndexFlat``. The view is taken
        afresh on each call (adding vectors may move FAISS's buffer); the id map is
        cached while the index size stays the same.
        """
        import faiss

        n = int(self.exact.ntotal)
        if n == 0 or not hasattr(self.exact, "id_map"):
            return None
        flat = faiss.downcast_index(self.exact.index)
        if not isinstance(flat, faiss.IndexFlat):
            return None
        if self._id_map is None or len(self._id_map[0]) != n:
            row_ids = faiss.vector_to_array(self.exact.id_map).astype(np.int64)
            self._id_map = (row_ids, sort_order(row_ids))
        return faiss.rev_swig_ptr(flat.get_xb(), n * flat.d).reshape(n, flat.d), *self._id_map

    def search_blas(self, queries: np.ndarray, k: int, selection: Selection, vectors: np.ndarray,
                    row_ids: np.ndarray, order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by ``vectors @ queries.T`` on the index's own memory; same contract as ``search``."""
        n = len(row_ids)
        candidates = None  # rows that may be returned; None: all
        if selection.allowed is not None:
            candidates = rows_of(row_ids, order, np.setdiff1d(selection.allowed, selection.excluded))
        if candidates is not None and len(candidates) < GATHER_FRACTION * n:
            scores = vectors[candidates] @ queries.T  # (c, Q): reads only the allowed vectors
        else:
            scores = vectors @ queries.T  # (n, Q): one pass over the index
            if candidates is not None:
                scores = scores[candidates]
            elif len(selection.excluded):
                scores[rows_of(row_ids, order, np.asarray(selection.excluded, dtype=np.int64))] = -np.inf
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        kk = min(k, len(scores))
        if kk == 0:
            return out_scores, out_ids
        for q in range(len(queries)):
            column = scores[:, q]
            top = np.argpartition(-column, kk - 1)[:kk] if kk < len(column) else np.arange(len(column))
            rows = top if candidates is None else candidates[top]
            order_q = np.lexsort((row_ids[rows], -column[top]))  # best first, ties by id
            top, rows = top[order_q], rows[order_q]
            keep = np.isfinite(column[top])
            out_scores[q, :keep.sum()] = column[top][keep]
            out_ids[q, :keep.sum()] = row_ids[rows][keep]
        return out_scores, out_ids

    def rescore(self, queries: np.ndarray, shortlist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's shortlisted ids (-1 padded) re-ranked by their exact scores: (Q, k) arrays."""
        view = self.flat_view()  # gathering rows of it beats reconstruct_batch's per-id lookups
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for q, candidates in enumerate(shortlist):
            candidates = candidates[candidates >= 0]
            if not len(candidates):
                continue
            rows = rows_of(view[1], view[2], candidates) if view is not None else None
            if rows is not None and len(rows) == len(candidates):
                exact = view[0][rows] @ queries[q]
            else:  # no flat view, or an id the exact index lacks (reconstruct_batch raises)
                exact = self.exact.reconstruct_batch(candidates) @ queries[q]
            order = np.argsort(-exact, kind="stable")[:k]
            scores[q, :len(order)] = exact[order]
            ids[q, :len(order)] = candidates[order]
        return scores, ids


def _fastest(calls: dict[str, Callable[[], Any]], repeat: int = 2) -> str:
    """The name of the call that ran fastest, best of ``repeat`` interleaved runs each."""
    seconds: dict[str, float] = {}
    for _ in range(repeat):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            seconds[name] = min(seconds.get(name, math.inf), time.perf_counter() - started)
    return min(seconds, key=seconds.__getitem__)
