"""Query image or stored id -> top-k stored images, filtered before ranking, joined with metadata.

Similarity is the cosine of L2-normalised vectors, computed as their inner
product. Filters (label, split, SQL over ``images``, group) become a set of
allowed ids in DuckDB; FAISS then ranks only those ids through an
``IDSelector`` in its search parameters, so k hits come back whenever k images
pass the filters (no over-fetching and dropping).

Index kinds (:data:`INDEX_KINDS`):

``exact``
    The store's own ``IndexFlatIP``: every allowed vector is scored. Up to
    ``SMALL_BATCH`` queries are scored by one BLAS matrix product over a
    zero-copy view of the index's vectors (on one host FAISS scanned one query
    on one thread at 0.41-0.65 of the memory-bandwidth bound, and slower with
    two, where multi-threaded sgemv reached 0.93-1.04 of it: BENCHMARKS.md);
    larger batches go to FAISS. A single unfiltered query takes whichever of
    BLAS and FAISS's one-thread scan was faster on a probe query (timed once
    per index): on another host FAISS's scan was the faster, 27.5 against
    23 GB/s.
``hnsw``
    ``IndexHNSWFlat``, M = 32 links per node, efConstruction = 200. efSearch
    is tuned at build time: the smallest of 16, 24, 32, 48, ..., 512 whose recall@10
    against exact search, minus two standard errors, reaches 0.99 on sample queries
    (see ``_recall10``). Scores are
    exact cosines (the graph holds the full vectors).
``ivf-pq``
    An OPQ rotation, then ``IndexIVFPQFastScan``: nlist = min(4 sqrt(N), N / 39)
    inverted lists (at least 39 training points per centroid, FAISS's minimum;
    spherical k-means on at most 64 points per list, which at 1M x 512 cut
    training from 195 to 53 s for -0.02 recall), and the residual to the list's
    centroid coded by m = dim / 4 sub-quantizers (4-d sub-vectors; the divisor
    of dim nearest dim / 4 otherwise) of 4 bits, dim / 8 bytes per vector, which
    FAISS scans with SIMD table look-ups. The OPQ rotation (20 iterations up to
    512-d, fewer above, see ``opq_iterations``; on at most 65,536 vectors,
    trained for those very 4-bit codes; only from 4 training vectors per
    dimension up, as FAISS's OPQ training crashes on fewer vectors than
    dimensions) spreads the variance of anisotropic embeddings over the
    sub-vectors. A PQ shortlist of
    max(refine_factor * k, 100) ids is re-scored with the stored vectors
    (IVFADC+R), so scores are exact cosines. nprobe (1, 2, 3, 4, 6, ... in ~1.5x
    steps) and refine_factor (10 to 200) are tuned together: of the settings
    whose recall@10 minus two standard errors reaches 0.95, the fastest on the tuning queries (see
    ``_tune_ivf_pq``). Stores under 160 vectors (10 per 4-bit code word) are
    refused. At 1M x 512 (BENCHMARKS.md), 8-bit PQ with 32-byte codes and no
    rotation needed 2,000 re-scored candidates per query and ran at a quarter
    of this layout's speed at the same recall.

An approximate index is built from the vectors reconstructed from the store,
its recall@1/10/50 against exact search is measured on held-out stored
vectors, and both are cached in the store directory as
``<encoder>.<kind>.faiss`` plus ``.json`` (parameters, recall, and a
fingerprint of the store's ids that invalidates the cache when vectors are
added or removed).

Graph and inverted-list search lose recall when a filter keeps few images;
below ``EXACT_FILTER_FRACTION`` of the store the allowed ids are ranked by the
exact index instead, and the result says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import SearchError, StoreError
from .store import Store, StoredImage

INDEX_KINDS = ("exact", "hnsw", "ivf-pq")
SPLIT_SCHEMES = ("random", "group", "given")
SIMILARITY = "cosine similarity on L2-normalised vectors (inner product)"

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # steps of ~1.5x
HNSW_TARGET_RECALL = 0.99
IVF_TARGET_RECALL = 0.95
TARGET_RECALL = {"hnsw": HNSW_TARGET_RECALL, "ivf-pq": IVF_TARGET_RECALL}  # defaults, per kind
EF_REFINE = 8  # between two grid values, efSearch is narrowed down in steps of this
IVF_REFINE_FACTORS = (10, 20, 30, 50, 100, 200)  # PQ shortlist = max(factor * k, REFINE_MIN) ids
IVF_NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
IVF_TRAIN_PER_LIST = 64  # k-means training sample: at most this many vectors per inverted list
IVF_SUBVECTOR = 4  # dimensions per PQ sub-quantizer
IVF_NBITS = 4  # bits per sub-quantizer code: FAISS's fast-scan (SIMD) PQ
IVF_MIN_VECTORS = 10 * 2 ** IVF_NBITS  # 10 training points per PQ code word
OPQ_ITERATIONS = 20  # at <= 512-d (FAISS's default is 50); fewer above, see opq_iterations
OPQ_MIN_ITERATIONS = 4
OPQ_MIN_PER_DIM = 4  # OPQ only with at least this many training vectors per dimension
OPQ_TRAIN_POINTS = 65536
ADD_CHUNK = 65536
REFINE_MIN = 100
CACHE_FORMAT = 2  # of the cached approximate indexes; 2: IVF-PQ with OPQ, an HNSW coarse quantizer, 4-bit fast-scan codes
RECALL_KS = (1, 10, 50)
RECALL_SAMPLE = 2000  # stored vectors as queries: half to tune on, half to report recall on
RECALL_MARGIN = 2.0  # standard errors a tuned setting's recall must clear the target by (see _recall10)
EXACT_FILTER_FRACTION = 0.1
SMALL_BATCH = 16  # exact queries up to this many are scored with numpy/BLAS, more with FAISS
SCAN_PROBE_BYTES = 256 << 20  # the single-query scans are timed on at most this much of the index (see _single_scan)
GATHER_FRACTION = 0.25  # below this share of the store, allowed vectors are gathered, not scanned

IMAGE_COLUMNS = ("id, image_id, source, dataset, group_id, given_split, content_hash, width, "
                 "height, meta (JSON: e.g. meta->>'sex' = 'male'), ingest_run")


# ---- filters -------------------------------------------------------------------------

@dataclass(frozen=True)
class Filters:
    """Which stored images a search may return. Every condition must hold; ``labels`` and
    ``groups`` match any of theirs.

    where: an SQL condition over the ``images`` table's columns (see IMAGE_COLUMNS).
    split_scheme: the scheme ``split`` refers to; None picks :func:`default_scheme`.
    """

    labels: tuple[str, ...] = ()
    split: str | None = None
    split_scheme: str | None = None
    where: str | None = None
    groups: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        return not (self.labels or self.split or self.where or self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "split": self.split,
                "split_scheme": self.split_scheme if self.split else None,
                "where": self.where, "groups": list(self.groups)}


def default_scheme(store: Store) -> str:
    """The dataset's own split when it has one (MedMNIST), else the group-aware one."""
    schemes = store.split_schemes()
    for scheme in ("given", "group", "random"):
        if scheme in schemes:
            return scheme
    raise SearchError(f"{store.path} has no train/test split; re-run `mediret ingest`")


def allowed_ids(store: Store, filters: Filters) -> np.ndarray | None:
    """Sorted ids of the images passing ``filters``; None when there are no filters."""
    import duckdb

    if filters.is_empty():
        return None
    conditions, params = [], []
    if filters.labels:
        known = set(store.label_names())
        known |= {r[0] for r in store.sql("SELECT DISTINCT label FROM labels")}
        unknown = [label for label in filters.labels if label not in known]
        if unknown:
            raise SearchError(f"unknown label(s) {', '.join(unknown)}; the store has: "
                              f"{', '.join(sorted(known))}")
        conditions.append("id IN (SELECT id FROM labels WHERE label IN (SELECT unnest(?)))")
        params.append(list(filters.labels))
    if filters.split:
        scheme = filters.split_scheme or default_scheme(store)
        values = [r[0] for r in store.sql(
            "SELECT DISTINCT split FROM splits WHERE scheme = ? ORDER BY 1", [scheme])]
        if not values:
            raise SearchError(f"split scheme '{scheme}' is not in {store.path}; it has: "
                              f"{', '.join(store.split_schemes()) or 'none'}")
        if filters.split not in values:
            raise SearchError(f"split '{filters.split}' is not in scheme '{scheme}'; "
                              f"it has: {', '.join(values)}")
        conditions.append("id IN (SELECT id FROM splits WHERE scheme = ? AND split = ?)")
        params.extend([scheme, filters.split])
    if filters.groups:
        known_groups = {r[0] for r in store.sql(
            "SELECT group_id FROM groups WHERE group_id IN (SELECT unnest(?))",
            [list(filters.groups)])}
        unknown = [g for g in filters.groups if g not in known_groups]
        if unknown:
            raise SearchError(f"no group {', '.join(unknown)} in {store.path}")
        conditions.append("group_id IN (SELECT unnest(?))")
        params.append(list(filters.groups))
    if filters.where:
        # In parentheses, so that the text is one expression and cannot end the statement.
        conditions.append(f"({filters.where})")
    query = f"SELECT id FROM images WHERE {' AND '.join(conditions)} ORDER BY id"
    try:
        rows = store.sql(query, params)
    except duckdb.Error as exc:
        message = str(exc).splitlines()[0].rstrip(".!")
        raise SearchError(f"--where {filters.where!r} failed: {message}. It is an SQL condition "
                          f"over the images table, whose columns are {IMAGE_COLUMNS}") from exc
    return np.array([r[0] for r in rows], dtype=np.int64)


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


# ---- indexes -------------------------------------------------------------------------

@dataclass
class SearchIndex:
    """A FAISS index over a store's ids, with the parameters and recall it was built with.

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
    _id_map: tuple[np.ndarray, np.ndarray | None] | None = field(default=None, repr=False)  # see _flat_view
    _one_query_scan: str | None = field(default=None, repr=False)  # "blas" or "faiss", see _single_scan

    @property
    def ntotal(self) -> int:
        return int(self.exact.ntotal)

    def search(self, queries: np.ndarray, k: int, selection: Selection | None = None,
               kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids (Q, k), best first; id -1 (score -inf) pads missing hits.

        kind: rank with another kind than the index's own ('exact' is always possible).
        """
        kind = kind or self.kind
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        selection = selection or Selection()
        few = len(queries) <= SMALL_BATCH
        view = self._flat_view() if kind == "exact" and few else None
        if view is not None and not (len(queries) == 1 and selection.allowed is None
                                     and self._single_scan(view) == "faiss"):
            return self._search_blas(queries, k, selection, *view)
        # FAISS splits a search over queries; with a few of them, extra OpenMP threads only
        # add start-up and spinning (IVF-PQ at 1M: 418 q/s on 1 thread, 122 on 2)
        with _faiss_threads(1) if few else nullcontext():
            return self._search_faiss(queries, k, selection, kind)

    def _search_faiss(self, queries: np.ndarray, k: int, selection: Selection,
                      kind: str) -> tuple[np.ndarray, np.ndarray]:
        """``search`` by FAISS's own search of the index of ``kind``."""
        import faiss

        sel, keep_alive = selection.faiss_selector()
        if kind == "exact":
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
            scores, ids = self.exact.search(queries, k, params=params)
        elif kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.params["efSearch"], k))
            if sel is not None:
                params.sel = sel
            scores, ids = self.index.search(queries, k, params=params)
        elif kind == "ivf-pq":
            scores, ids = self._search_refined(queries, k, sel)
        else:
            raise SearchError(f"unknown index kind '{kind}'; choose from {', '.join(INDEX_KINDS)}")
        del keep_alive  # the selector had to outlive the search; no longer
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids

    def _single_scan(self, view: tuple[np.ndarray, np.ndarray, np.ndarray | None]) -> str:
        """Which scans one unfiltered query faster on this machine: "blas" or "faiss" (one thread).

        Timed once per index, on the first such query, under the thread settings then in
        force: best of five runs each, a stored vector as the query, over the first
        ``SCAN_PROBE_BYTES`` of the vectors (beyond the CPU's caches, yet at most about
        50 ms in all: at 1M x 512 both scans streamed as fast over 256 MB as over the whole
        2 GB, ad hoc). Which wins depends on the CPU: BLAS sgemv reached 0.93-1.04 of the memory-bandwidth bound
        where FAISS's one-query scan reached 0.41-0.65 (2026-11-25), while on another
        AVX-512 host FAISS's scan streamed 27.5 GB/s on one thread and OpenBLAS's sgemv
        12 GB/s a thread (2026-12-03; BENCHMARKS.md part 3).
        """
        if self._one_query_scan is None:
            import faiss

            vectors, row_ids, _ = view
            rows = max(1, min(len(vectors), SCAN_PROBE_BYTES // max(1, vectors[0].nbytes)))
            sample, probe = vectors[:rows], np.ascontiguousarray(vectors[:1])

            def faiss_scan():  # the kernel of IndexFlatIP's search, over the sample
                with _faiss_threads(1):
                    faiss.knn(probe, sample, 10, faiss.METRIC_INNER_PRODUCT)

            self._one_query_scan = _fastest(
                {"blas": lambda: self._search_blas(probe, 10, Selection(), sample, row_ids[:rows], None),
                 "faiss": faiss_scan}, repeat=5)
        return self._one_query_scan

    def _flat_view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """(vectors (n, d) viewing the flat index's memory, row -> id, id sort order), or None.

        The sort order is None when the ids are ascending (``_rows_of``). None when the
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
            self._id_map = (row_ids, _sort_order(row_ids))
        return faiss.rev_swig_ptr(flat.get_xb(), n * flat.d).reshape(n, flat.d), *self._id_map

    def _search_blas(self, queries: np.ndarray, k: int, selection: Selection, vectors: np.ndarray,
                     row_ids: np.ndarray, order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by ``vectors @ queries.T`` on the index's own memory; same contract as ``search``."""
        n = len(row_ids)
        candidates = None  # rows that may be returned; None: all
        if selection.allowed is not None:
            candidates = _rows_of(row_ids, order, np.setdiff1d(selection.allowed, selection.excluded))
        if candidates is not None and len(candidates) < GATHER_FRACTION * n:
            scores = vectors[candidates] @ queries.T  # (c, Q): reads only the allowed vectors
        else:
            scores = vectors @ queries.T  # (n, Q): one pass over the index
            if candidates is not None:
                scores = scores[candidates]
            elif len(selection.excluded):
                scores[_rows_of(row_ids, order, np.asarray(selection.excluded, dtype=np.int64))] = -np.inf
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

    def _search_refined(self, queries: np.ndarray, k: int, sel) -> tuple[np.ndarray, np.ndarray]:
        """IVF-PQ shortlist of max(refine_factor * k, REFINE_MIN) ids, re-ranked exactly."""
        import faiss

        nprobe = self.params["nprobe"]
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        # the graph over the centroids finds the nprobe nearest lists (a pointer: keep it referenced)
        graph_params = faiss.SearchParametersHNSW(efSearch=max(nprobe, HNSW_EF_SEARCH[0]))
        if self.params.get("coarse") == "hnsw":
            params.quantizer_params = graph_params
        if sel is not None:
            params.sel = sel
        shortlist_size = max(self.params["refine_factor"] * k, REFINE_MIN)
        _, shortlist = self.index.search(queries, shortlist_size, params=params)
        del graph_params
        view = self._flat_view()  # gathering rows of it beats reconstruct_batch's per-id lookups
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for q, candidates in enumerate(shortlist):
            candidates = candidates[candidates >= 0]
            if not len(candidates):
                continue
            rows = _rows_of(view[1], view[2], candidates) if view is not None else None
            if rows is not None and len(rows) == len(candidates):
                exact = view[0][rows] @ queries[q]
            else:  # no flat view, or an id the exact index lacks (reconstruct_batch raises)
                exact = self.exact.reconstruct_batch(candidates) @ queries[q]
            order = np.argsort(-exact, kind="stable")[:k]
            scores[q, :len(order)] = exact[order]
            ids[q, :len(order)] = candidates[order]
        return scores, ids

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": self.params,
                "recall": {f"recall@{k}": round(v, 4) for k, v in self.recall.items()},
                "built_seconds": (None if self.build_seconds is None
                                  else round(self.build_seconds, 2)),
                "cache_file": self.cache_file}


def _sort_order(ids: np.ndarray) -> np.ndarray | None:
    """None when ``ids`` are strictly ascending, else the permutation that sorts them."""
    return None if bool(np.all(ids[1:] > ids[:-1])) else np.argsort(ids, kind="stable")


def _rows_of(ids: np.ndarray, order: np.ndarray | None, wanted: np.ndarray) -> np.ndarray:
    """Positions in ``ids`` (sorted by ``order``, see ``_sort_order``) of the ``wanted`` ids;
    wanted ids that ``ids`` does not hold are dropped."""
    rows = np.minimum(np.searchsorted(ids, wanted, sorter=order), len(ids) - 1)
    rows = rows if order is None else order[rows]
    return rows[ids[rows] == wanted]


def _fastest(calls: dict[str, Callable[[], Any]], repeat: int = 2) -> str:
    """The name of the call that ran fastest, best of ``repeat`` interleaved runs each."""
    seconds: dict[str, float] = {}
    for _ in range(repeat):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            seconds[name] = min(seconds.get(name, math.inf), time.perf_counter() - started)
    return min(seconds, key=seconds.__getitem__)


@contextmanager
def _faiss_threads(n: int) -> Iterator[None]:
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def open_index(store: Store, kind: str = "exact", rebuild: bool = False,
               target_recall: float | None = None,
               on_build: Callable[[int], None] | None = None) -> SearchIndex:
    """The store's index of ``kind``: exact, or an approximate one from cache or freshly built.

    target_recall: the recall@10 against exact search its knobs are tuned to (default
        ``TARGET_RECALL[kind]``); a cached index tuned to another target is rebuilt.
    on_build: called with the number of vectors just before a build starts (which takes
        minutes at a million vectors), e.g. to tell the user.
    """
    if kind not in INDEX_KINDS:
        raise SearchError(f"unknown index kind '{kind}'; choose from {', '.join(INDEX_KINDS)}")
    if store.index.ntotal == 0:
        raise SearchError(f"{store.path} holds no vectors; ingest a dataset first")
    if kind == "exact":
        return SearchIndex("exact", store.index, store.index)
    import faiss

    index_path, meta_path = _cache_paths(store, kind)
    fingerprint = _fingerprint(store)
    if not rebuild and index_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            target = target_recall or TARGET_RECALL[kind]
            if (meta.get("format") == CACHE_FORMAT and meta.get("fingerprint") == fingerprint
                    and meta["params"].get("target_recall") == target):
                return SearchIndex(kind, faiss.read_index(str(index_path)), store.index,
                                   params=meta["params"],
                                   recall={int(k): v for k, v in meta["recall"].items()},
                                   cache_file=index_path.name)
        except (OSError, ValueError, KeyError, RuntimeError):
            pass  # unreadable or stale cache: rebuild below
    if on_build is not None:
        on_build(int(store.index.ntotal))
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
    ids = _stored_ids(store)
    return build_from_vectors(kind, store.vectors(ids), ids, store.index, seed, target_recall)


def build_from_vectors(kind: str, vectors: np.ndarray, ids: np.ndarray, exact: Any,
                       seed: int = 0, target_recall: float | None = None) -> SearchIndex:
    """An approximate index of ``kind`` over ``vectors`` / ``ids`` (those of the exact index
    ``exact``), tuned with one sample of the vectors as queries, its recall measured on another."""
    import faiss

    started = time.perf_counter()
    n, dim = vectors.shape
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index = faiss.IndexIDMap2(hnsw)
        index.add_with_ids(vectors, ids)
        params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH[0]}
    elif kind == "ivf-pq":
        index, params = _build_ivf_pq(vectors, ids, seed)
    else:
        raise SearchError(f"cannot build an index of kind '{kind}'; choose hnsw or ivf-pq")
    target = target_recall or TARGET_RECALL[kind]
    if not 0 < target <= 1:
        raise SearchError(f"target recall must be in (0, 1], got {target}")
    params["target_recall"] = target
    built = SearchIndex(kind, index, exact, params=params)
    tune, held_out = _recall_sample(n, seed)
    truth = _exact_scores(built, vectors[tune], 10)
    if kind == "hnsw":
        _tune_hnsw(built, vectors[tune], ids[tune], vectors, ids, truth)
    else:
        _tune_ivf_pq(built, vectors[tune], ids[tune], vectors, ids, truth)
    built.recall = recall_at_k(built, vectors[held_out], ids[held_out], vectors, ids, RECALL_KS)
    built.build_seconds = time.perf_counter() - started
    return built


def _build_ivf_pq(vectors: np.ndarray, ids: np.ndarray, seed: int) -> tuple[Any, dict[str, Any]]:
    """OPQ rotation (from OPQ_MIN_PER_DIM training vectors per dimension up), then IVF over
    spherical k-means lists, then 4-bit fast-scan PQ of the residuals (see the module
    docstring), trained on one seeded sample and filled in chunks."""
    import faiss

    n, dim = vectors.shape
    if n < IVF_MIN_VECTORS:
        raise SearchError(f"an ivf-pq index needs at least {IVF_MIN_VECTORS} vectors, the store holds {n}; "
                          "exact search over so few is already instant")
    nlist, m, nbits = ivf_pq_shape(n, dim)
    sample = np.random.default_rng(seed).permutation(n)[:min(n, nlist * IVF_TRAIN_PER_LIST)]
    train = vectors[np.sort(sample)]
    coarse = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)  # nearest lists without a scan of all
    coarse.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    ivf = faiss.IndexIVFPQFastScan(coarse, dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    ivf.by_residual = True
    kmeans_index = faiss.IndexFlatIP(dim)
    ivf.quantizer_trains_alone, ivf.clustering_index = 2, kmeans_index  # k-means exact, then the graph
    ivf.cp.seed = ivf.pq.cp.seed = seed
    ivf.pq.cp.min_points_per_centroid = 10  # IVF_MIN_VECTORS keeps N >= 10 * 2**nbits
    opq = None
    if len(train) >= OPQ_MIN_PER_DIM * dim:  # FAISS's OPQ training crashes when N < dim
        opq = faiss.OPQMatrix(dim, m)
        opq_pq = faiss.ProductQuantizer(dim, m, nbits)  # rotate for the very codes the index stores
        opq_pq.cp.min_points_per_centroid, opq_pq.cp.seed = 10, seed
        opq.pq, opq.niter, opq.max_train_points = opq_pq, opq_iterations(dim), OPQ_TRAIN_POINTS
        index = faiss.IndexPreTransform(opq, ivf)
    else:
        index = ivf
    index.train(train)
    ivf.clustering_index = None  # only for training; the index must not point at it
    if opq is not None:
        opq.pq = None  # likewise
    for start in range(0, n, ADD_CHUNK):  # each chunk is rotated on its own: no rotated copy of all N
        index.add_with_ids(vectors[start:start + ADD_CHUNK], ids[start:start + ADD_CHUNK])
    params = {"nlist": nlist, "m": m, "nbits": nbits, "opq": opq is not None,
              "opq_iterations": opq.niter if opq is not None else 0, "coarse": "hnsw", "nprobe": 1,
              "refine_factor": IVF_REFINE_FACTORS[0], "train_points": len(train)}
    return index, params


def _tune_hnsw(index: SearchIndex, queries: np.ndarray, query_ids: np.ndarray, vectors: np.ndarray,
               ids: np.ndarray, truth: np.ndarray) -> None:
    """efSearch: the smallest reaching the target recall (see ``_recall10``; on the grid HNSW_EF_SEARCH, then
    narrowed in steps of EF_REFINE below the first grid value that reaches it), else the
    smallest within 0.01 of the best recall seen."""
    target = index.params["target_recall"]
    seen: dict[int, float] = {}
    previous = None
    for ef in HNSW_EF_SEARCH:
        index.params["efSearch"] = ef
        seen[ef], lower, _ = _recall10(index, queries, query_ids, vectors, ids, truth)
        if lower >= target:
            for between in range(previous + EF_REFINE, ef, EF_REFINE) if previous else ():
                index.params["efSearch"] = between
                if _recall10(index, queries, query_ids, vectors, ids, truth)[1] >= target:
                    return
            index.params["efSearch"] = ef
            return
        previous = ef
    best = max(seen.values())
    index.params["efSearch"] = min(ef for ef, r in seen.items() if r >= best - 0.01)


def _tune_ivf_pq(index: SearchIndex, queries: np.ndarray, query_ids: np.ndarray, vectors: np.ndarray,
                 ids: np.ndarray, truth: np.ndarray) -> None:
    """(nprobe, refine_factor) reaching the target recall in the least measured search time.

    Recall grows with both knobs. For each shortlist factor (ascending) the nprobe
    sweep stops at the first value reaching the target (see ``_recall10``), or when recall stops
    growing (the shortlist, not nprobe, is then the limit); a longer shortlist never
    needs more nprobe than a shorter one did. Of the settings reaching the target the
    fastest, timed on the tuning queries, wins; when none does, the cheapest within
    0.01 of the best recall seen.
    """
    nlist, target = index.params["nlist"], index.params["target_recall"]
    nprobes = tuple(p for p in IVF_NPROBES if p < nlist) + (nlist,)
    reached: list[tuple[float, int, int]] = []  # (seconds, nprobe, factor)
    seen: list[tuple[float, int, int]] = []  # (recall, nprobe, factor)
    for factor in IVF_REFINE_FACTORS:
        index.params["refine_factor"] = factor
        previous = -1.0
        for nprobe in nprobes:
            index.params["nprobe"] = nprobe
            recall, lower, seconds = _recall10(index, queries, query_ids, vectors, ids, truth)
            seen.append((recall, nprobe, factor))
            if lower >= target:
                reached.append((seconds, nprobe, factor))
                nprobes = tuple(p for p in nprobes if p <= nprobe)
                break
            if recall < previous + 0.002:
                break  # plateau: this shortlist caps recall
            previous = recall
        if reached and reached[-1][1] == nprobes[0]:
            break  # nprobe cannot go lower; longer shortlists only cost more
    if reached:
        _, nprobe, factor = min(reached)
    else:
        best = max(r for r, _, _ in seen)
        _, nprobe, factor = min((p * f, p, f) for r, p, f in seen if r >= best - 0.01)
    index.params.update(nprobe=nprobe, refine_factor=factor)


def _exact_scores(index: SearchIndex, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-(k + 1) scores of each query (a stored query is its own first neighbour)."""
    scores, _ = index.search(queries, k + 1, kind="exact")
    return scores


def _recall10(index: SearchIndex, queries: np.ndarray, query_ids: np.ndarray, vectors: np.ndarray,
              ids: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """(recall@10 of ``index`` against the exact scores ``truth``, that minus RECALL_MARGIN
    standard errors, seconds the search took).

    A setting reaches the target when the lower figure does. Tuned on the mean alone, or
    with one standard error on 500 queries, the chosen setting (the first of many tried
    to pass) fell just under the target on other queries: IVF-PQ at 1M x 512 was
    tuned to 0.95 and held out 0.949, and 0.946 on the benchmark's queries.
    """
    started = time.perf_counter()
    _, approx = index.search(queries, 11)
    seconds = time.perf_counter() - started
    per_query = _recall_per_query(approx, 10, queries, query_ids, vectors, ids, truth)
    mean = float(np.mean(per_query))
    error = float(np.std(per_query, ddof=1) / math.sqrt(len(per_query))) if len(per_query) > 1 else 0.0
    return mean, mean - RECALL_MARGIN * error, seconds


def _recall_per_query(approx: np.ndarray, k: int, queries: np.ndarray, query_ids: np.ndarray,
                      vectors: np.ndarray, ids: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Share of each query's first k hits (own id left out) scoring at least its k-th exact neighbour."""
    order = _sort_order(ids)
    per_query = np.empty(len(query_ids))
    for q, own in enumerate(query_ids):
        threshold = truth[q][k] - 1e-5  # the query is its own first exact neighbour: the k-th other one is at k
        hits = np.array([i for i in approx[q] if i >= 0 and i != own][:k], dtype=np.int64)
        rows = _rows_of(ids, order, hits)  # every hit is a stored id
        per_query[q] = np.sum(vectors[rows] @ queries[q] >= threshold) / k
    return per_query


def opq_iterations(dim: int) -> int:
    """OPQ training iterations: OPQ_ITERATIONS up to 512-d, fewer in proportion to dim**2 above
    (one took about 1.3 s at 512-d and 4.5 s at 1280-d on 2 cores in ad hoc timings; 20 at
    1280-d made an 8k store's build 91 s, BENCHMARKS.md), at least OPQ_MIN_ITERATIONS."""
    return max(OPQ_MIN_ITERATIONS, min(OPQ_ITERATIONS, round(OPQ_ITERATIONS * (512 / dim) ** 2)))


def ivf_pq_shape(n: int, dim: int) -> tuple[int, int, int]:
    """(nlist, m, nbits) for N vectors of ``dim`` (see the module docstring)."""
    nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    m = min(divisors, key=lambda d: (abs(d - dim / IVF_SUBVECTOR), d))
    return nlist, m, IVF_NBITS


def recall_at_k(index: SearchIndex, queries: np.ndarray, query_ids: np.ndarray,
                vectors: np.ndarray, ids: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Recall@k of ``index`` against exact search, each query's own id left out of both.

    Each k is a search for k hits of its own (efSearch and the IVF-PQ shortlist
    depend on k). A returned hit counts when its exact cosine is at least the
    k-th exact neighbour's, so ties (duplicate images) are not counted as misses.
    """
    ks = [k for k in ks if k < len(ids)]
    if not ks or not len(queries):
        return {}
    truth = _exact_scores(index, queries, max(ks))
    recall = {}
    for k in ks:
        _, approx = index.search(queries, k + 1)
        recall[k] = float(np.mean(_recall_per_query(approx, k, queries, query_ids, vectors, ids, truth)))
    return recall


def _recall_sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of two disjoint query samples: one to tune on, one to report recall on."""
    rows = np.random.default_rng(seed).permutation(n)[:min(n, RECALL_SAMPLE)]
    half = max(1, len(rows) // 2)
    return rows[:half], rows[half:] if len(rows) > 1 else rows


def _stored_ids(store: Store) -> np.ndarray:
    import faiss

    return np.sort(faiss.vector_to_array(store.index.id_map).astype(np.int64))


def _fingerprint(store: Store) -> dict[str, Any]:
    ids = _stored_ids(store)
    return {"encoder": store.encoder.name, "vectors": int(len(ids)),
            "ids_blake2b": hashlib.blake2b(ids.tobytes(), digest_size=16).hexdigest()}


def _cache_paths(store: Store, kind: str) -> tuple[Path, Path]:
    stem = f"{store.encoder.name}.{kind}"
    return store.path / f"{stem}.faiss", store.path / f"{stem}.json"


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


# ---- queries -------------------------------------------------------------------------

@dataclass(frozen=True)
class Query:
    """What a search looks for.

    source: the query image (a file, or a stored image's source).
    image: the stored image the query is (by id, or a file whose bytes are
        stored), else None.
    group_of: the stored image whose group ``exclude_group`` leaves out
        (its patient/lesion, or the image alone when it has no group);
        None when unknown.
    """

    vector: np.ndarray
    source: str
    image: StoredImage | None = None
    group_of: StoredImage | None = None
    by_id: bool = False

    @property
    def group_id(self) -> str | None:
        return self.group_of.group_id if self.group_of is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "by_id": self.by_id,
                "image_id": self.image.image_id if self.image else None,
                "labels": list(self.image.labels) if self.image else None,
                "group_id": self.group_id}


def query_from_id(store: Store, image_id: str) -> Query:
    """A stored image as the query, with its stored vector."""
    try:
        id_ = store.id_of(image_id)
    except StoreError as exc:
        raise SearchError(f"{exc}; --id takes an image_id, as the id column of "
                          "`mediret search` lists them") from exc
    image = store.records([id_])[0]
    return Query(vector=store.vectors([id_])[0], source=image.source, image=image,
                 group_of=image, by_id=True)


def query_from_file(store: Store, source: str, weights: str | None = None,
                    group_of: str | None = None, device: str = "cpu", encoder=None) -> Query:
    """An image file (or ``file.npz#split/index``) embedded with the store's encoder.

    weights: the weights the store was built with when they are not the
        encoder's default; by default the store's recorded local weights file,
        if it was built from one.
    group_of: image_id of a stored image whose group ``exclude_group`` leaves
        out; by default the group of the stored image with the same bytes, if any.
    encoder: an already loaded encoder to reuse across queries (the store's own).
    """
    from .ingest import content_hash
    from .sources import open_source

    path, split = query_file(source)
    try:
        image = open_source(source)
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise SearchError(f"cannot read the query image {source}: {exc}") from exc
    vector = embed_image(store, image, weights=weights, device=device, encoder=encoder)
    stored = None
    if split is None:
        match = store.sql("SELECT min(id) FROM images WHERE content_hash = ?",
                          [content_hash(path.read_bytes())])
        if match and match[0][0] is not None:
            stored = store.records([match[0][0]])[0]
    else:
        match = store.sql("SELECT min(id) FROM images WHERE source = ? OR source = ?",
                          [source, f"{path.resolve()}#{source.partition('#')[2]}"])
        if match and match[0][0] is not None:
            stored = store.records([match[0][0]])[0]
    group_image = stored
    if group_of is not None:
        try:
            group_image = store.records([store.id_of(group_of)])[0]
        except StoreError as exc:
            raise SearchError(f"--group-of: {exc}") from exc
    return Query(vector=vector, source=source, image=stored, group_of=group_image)


def query_file(source: str) -> tuple[Path, str | None]:
    """The file of a query ``source`` (a path, or ``file.npz#split/index``) and its split, if any;
    SearchError when it is missing or a folder."""
    from .sources import split_source

    path, split, _ = split_source(source)
    if path.is_dir():
        raise SearchError(f"query {path} is a folder; give one image file (or --id for a stored image)")
    if not path.is_file():
        raise SearchError(f"query image {path} not found")
    return path, split


def store_encoder(store: Store, weights: str | None = None, device: str = "cpu"):
    """The store's encoder, loaded with its preprocessing and weights, for embedding queries.

    weights: as for ``query_from_file``. fp32: for a few query images, trying bf16
    (see ``Encoder``) would cost more than it saves.
    """
    from .encoders import load_encoder

    return load_encoder(store.encoder.name, weights=weights or _store_weights(store),
                        preprocess=store.encoder.preprocess, device=device, precision="fp32")


def embed_image(store: Store, image, weights: str | None = None, device: str = "cpu",
                encoder=None) -> np.ndarray:
    """One PIL image embedded with the store's encoder and preprocessing: (dim,) float32."""
    if encoder is None:
        encoder = store_encoder(store, weights, device)
    elif (encoder.name, encoder.preprocess.name) != (store.encoder.name, store.encoder.preprocess):
        raise SearchError(f"encoder {encoder.name} ({encoder.preprocess.name}) is not the "
                          f"store's {store.encoder.name} ({store.encoder.preprocess})")
    vector = np.asarray(encoder.embed_images([image]), dtype=np.float32)[0]
    if vector.shape != (store.encoder.dim,):
        raise SearchError(f"encoder {store.encoder.name} gave a {vector.shape} vector but the "
                          f"store holds dim {store.encoder.dim}; were other --weights used?")
    return vector


def _store_weights(store: Store) -> str | None:
    """The weights file a store was built from when it was a local file (else the default)."""
    source = store.encoder.weights_source or ""
    if source.startswith("random"):
        raise SearchError(f"{store.path} was built with randomly initialised weights, which a "
                          "new load does not reproduce; query it with --id")
    if not source.startswith("local file "):
        return None
    path = source.removeprefix("local file ")
    if not Path(path).is_file():
        path = path.rsplit(" (", 1)[0]  # load_encoder may append a note in parentheses
    if not Path(path).is_file():
        raise SearchError(f"{store.path} was built with the weights file {path}, which is gone; "
                          "pass the same weights with --weights")
    return path


# ---- search ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Hit:
    """One search result: rank (1 = most similar), cosine score and the stored image."""

    rank: int
    score: float
    image: StoredImage

    def to_dict(self) -> dict[str, Any]:
        image = self.image
        return {"rank": self.rank, "id": image.id, "image_id": image.image_id,
                "labels": list(image.labels), "group_id": image.group_id,
                "score": round(float(self.score), 6), "source": image.source, "meta": image.meta}


@dataclass
class SearchResult:
    """Hits of one query with what produced them.

    candidates: images the filters and exclusions left to rank.
    index_used: the kind that ranked them (exact when a filter is restrictive).
    notes: things a person should know about this result.
    """

    query: Query
    hits: list[Hit]
    k: int
    candidates: int
    filters: Filters
    excluded_group: str | None
    index: SearchIndex
    index_used: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query.to_dict(), "k": self.k, "candidates": self.candidates,
                "filters": self.filters.to_dict(), "excluded_group": self.excluded_group,
                "similarity": SIMILARITY, "index": self.index.describe(),
                "index_used": self.index_used, "notes": self.notes,
                "hits": [h.to_dict() for h in self.hits]}


def search(store: Store, query: Query, k: int = 10, filters: Filters | None = None,
           exclude_group: bool = False, index: SearchIndex | None = None) -> SearchResult:
    """The ``k`` stored images most similar to ``query`` among those passing ``filters``.

    A query by stored id never returns that image. ``exclude_group`` leaves out
    every image of the query's group (patient/lesion); an image without a group
    is a group of its own.
    """
    if k < 1:
        raise SearchError(f"k must be at least 1, got {k}")
    filters = filters or Filters()
    if filters.split and not filters.split_scheme:
        filters = replace(filters, split_scheme=default_scheme(store))
    index = index or open_index(store, "exact")
    notes: list[str] = []
    allowed = allowed_ids(store, filters)
    excluded, excluded_group = _exclusions(store, query, exclude_group, notes)
    selection = Selection(allowed, excluded)
    candidates = selection.count(index.ntotal)
    if candidates == 0:
        raise SearchError("no stored image passes the filters "
                          f"({json.dumps(filters.to_dict())}); loosen them")
    kind = index.kind
    restrictive = allowed is not None and candidates < EXACT_FILTER_FRACTION * index.ntotal
    if kind != "exact" and restrictive:
        kind = "exact"
        notes.append(f"the filters keep {candidates} of {index.ntotal} images; ranked them "
                     f"exactly ({index.kind} loses recall under restrictive filters)")
    scores, ids = index.search(query.vector, k, selection, kind=kind)
    found = ids[0] >= 0
    hits_ids, hit_scores = ids[0][found], scores[0][found]
    if len(hits_ids) < min(k, candidates):
        notes.append(f"{index.kind} returned {len(hits_ids)} hits of the {min(k, candidates)} "
                     "possible; try --index exact")
    images = store.records(hits_ids)
    hits = [Hit(rank=r + 1, score=float(s), image=img)
            for r, (s, img) in enumerate(zip(hit_scores, images))]
    if query.image is not None and not query.by_id and not exclude_group:
        notes.append(f"the query file is stored as {query.image.image_id}; it ranks first unless "
                     "--exclude-group is given")
    return SearchResult(query=query, hits=hits, k=k, candidates=candidates, filters=filters,
                        excluded_group=excluded_group, index=index, index_used=kind, notes=notes)


def _exclusions(store: Store, query: Query, exclude_group: bool,
                notes: list[str]) -> tuple[np.ndarray, str | None]:
    """Ids a query must not retrieve (itself by id; its group with ``exclude_group``), and
    the excluded group's name: its group_id, or 'image X (no group)'."""
    excluded = [query.image.id] if query.by_id and query.image is not None else []
    group = None
    if exclude_group and query.group_of is None:
        notes.append("--exclude-group: the query file is not a stored image and no "
                     "--group-of was given, so no group is excluded")
    elif exclude_group and query.group_id is None:
        excluded.append(query.group_of.id)
        group = f"image {query.group_of.image_id} (no group)"
    elif exclude_group:
        excluded.extend(r[0] for r in store.sql(
            "SELECT id FROM images WHERE group_id = ?", [query.group_id]))
        group = query.group_id
    return np.unique(np.array(excluded, dtype=np.int64)), group
