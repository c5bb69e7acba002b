"""Retrieval evaluation: test-split queries against the train split, CBIR metrics per k and class.

The protocol follows Mahbod et al. 2024 (arXiv 2409.09430): every image of the
query split (``test``) is a query, the database is the ``train`` split, and the
hits are ranked by cosine similarity (inner product of L2-normalised vectors).
Metrics come from :func:`mediret.metrics.retrieval_report`: their mAP@k,
ACC@k and majority vote, and Denner et al.'s micro and macro precision@k with
denominator min(k, R_q). A hit is relevant when it has the query's label;
in multi-label stores when it shares at least one label with the query.

With ``exclude_group`` a query never retrieves database images of its own
group (patient/lesion), and R_q counts only the database images it can
retrieve. Under a group-aware split no group straddles the split, so the
option changes nothing there; under the random split it removes the
near-duplicate leak of other images of the same lesion.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import SearchError
from .metrics import (RetrievalMetrics, class_sizes, relevance_from_label_sets,
                      relevance_from_labels, retrieval_report)
from .index import SIMILARITY, SearchIndex, Selection, open_index
from .search import EXACT_FILTER_FRACTION
from .store import Store

DEFAULT_KS = (1, 3, 5, 10)


@dataclass
class RetrievalEvaluation:
    """What :func:`evaluate_retrieval` measured, and on what."""

    store: str
    encoder: str
    scheme: str
    query_split: str
    database_splits: list[str]
    n_queries: int
    n_database: int
    exclude_group: bool
    queries_with_group_in_database: int
    index: dict[str, Any]
    metrics: RetrievalMetrics
    seconds: float

    @property
    def protocol(self) -> str:
        return (f"queries: the {self.n_queries} '{self.query_split}' images of split scheme "
                f"'{self.scheme}'; database: the {self.n_database} "
                f"'{'+'.join(self.database_splits)}' images; ranking: {SIMILARITY}"
                + ("; each query's own group (patient/lesion) left out of its database"
                   if self.exclude_group else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "encoder": self.encoder, "scheme": self.scheme,
                "query_split": self.query_split, "database_splits": self.database_splits,
                "n_queries": self.n_queries, "n_database": self.n_database,
                "exclude_group": self.exclude_group,
                "queries_with_group_in_database": self.queries_with_group_in_database,
                "similarity": SIMILARITY, "protocol": self.protocol, "index": self.index,
                "seconds": round(self.seconds, 2), **self.metrics.to_dict()}


def evaluate_retrieval(store: Store, scheme: str | None = None, ks: Sequence[int] = DEFAULT_KS,
                       exclude_group: bool = False, index: SearchIndex | None = None,
                       query_split: str = "test", database_splits: Sequence[str] = ("train",),
                       ties: str = "first") -> RetrievalEvaluation:
    """Search the database split with every query-split image and score the hits.

    scheme: split scheme (random, group, given); default: given when the
        dataset has one, else group.
    ties: majority-vote ties, 'first' (highest-ranked tied label) or 'any'
        (Mahbod et al.'s code); see metrics.RETRIEVAL_DEFINITIONS.
    """
    started = time.perf_counter()
    scheme = scheme or store.default_split_scheme()
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise SearchError(f"ks must be positive integers, got {list(ks)}")
    index = index or open_index(store, "exact")
    matrix = store.labelled_matrix(scheme)
    database_splits = list(database_splits)
    query_rows = np.flatnonzero(matrix.split == query_split)
    db_rows = np.flatnonzero(np.isin(matrix.split, database_splits))
    present = sorted(set(matrix.split.tolist()))
    if not len(query_rows) or not len(db_rows):
        empty = query_split if not len(query_rows) else "+".join(database_splits)
        raise SearchError(f"split scheme '{scheme}' has no '{empty}' images; it has: "
                          f"{', '.join(present)}")
    if query_split in database_splits:
        raise SearchError(f"the query split '{query_split}' is also in the database; "
                          "queries would find themselves")
    if ks[-1] > len(db_rows):
        raise SearchError(f"k={ks[-1]} exceeds the {len(db_rows)} database images")

    exclusions = _group_exclusions(matrix.groups, query_rows, db_rows) if exclude_group else {}
    excluded_ids = {q: matrix.ids[rows] for q, rows in exclusions.items()}
    scores, ids = _search_all(index, matrix.X[query_rows], ks[-1], matrix.ids[db_rows],
                              excluded_ids)

    found = ids >= 0
    rows = np.where(found, np.searchsorted(matrix.ids, np.where(found, ids, 0)), 0)
    y_query = matrix.y[query_rows]
    if matrix.multilabel:
        hit_labels = np.where(found[:, :, None], matrix.y[rows], 0)
        relevant, n_relevant = relevance_from_label_sets(y_query, hit_labels, matrix.y[db_rows])
        retrieved = None
    else:
        retrieved = np.where(found, matrix.y[rows], -1)
        relevant, n_relevant = relevance_from_labels(y_query, retrieved,
                                                     class_sizes(matrix.y[db_rows]))
    for q, excluded_rows in exclusions.items():
        n_relevant[q] -= _n_relevant_among(matrix.y, y_query[q], excluded_rows, matrix.multilabel)
    metrics = retrieval_report(y_query, retrieved, ks=ks, relevant=relevant, n_relevant=n_relevant,
                               class_names=matrix.label_names, ties=ties)
    return RetrievalEvaluation(
        store=str(store.path), encoder=store.encoder.name, scheme=scheme, query_split=query_split,
        database_splits=database_splits, n_queries=len(query_rows), n_database=len(db_rows),
        exclude_group=exclude_group, queries_with_group_in_database=len(exclusions),
        index=index.describe(), metrics=metrics, seconds=time.perf_counter() - started)


def _group_exclusions(groups: np.ndarray, query_rows: np.ndarray,
                      db_rows: np.ndarray) -> dict[int, np.ndarray]:
    """query position -> matrix rows of the database images in the query's group (if any)."""
    by_group: dict[str, list[int]] = {}
    for row in db_rows:
        by_group.setdefault(groups[row], []).append(int(row))
    return {q: np.array(by_group[groups[row]]) for q, row in enumerate(query_rows)
            if groups[row] in by_group}


def _search_all(index: SearchIndex, queries: np.ndarray, k: int, db_ids: np.ndarray,
                excluded_ids: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Top-k database hits of every query, ``excluded_ids[q]`` left out of query q's database.

    Queries with the same exclusions (one group) share one FAISS call.
    """
    kind = index.kind
    if kind != "exact" and len(db_ids) < EXACT_FILTER_FRACTION * index.ntotal:
        kind = "exact"
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    plain = np.array([q for q in range(len(queries)) if q not in excluded_ids], dtype=np.int64)
    if len(plain):
        scores[plain], ids[plain] = index.search(queries[plain], k, Selection(db_ids), kind=kind)
    by_excluded: dict[tuple[int, ...], list[int]] = {}
    for q, excluded in excluded_ids.items():
        by_excluded.setdefault(tuple(excluded.tolist()), []).append(q)
    for excluded, members in by_excluded.items():
        rows = np.array(members)
        selection = Selection(db_ids, np.array(excluded, dtype=np.int64))
        scores[rows], ids[rows] = index.search(queries[rows], k, selection, kind=kind)
    return scores, ids


def _n_relevant_among(y: np.ndarray, query_label, rows: np.ndarray, multilabel: bool) -> int:
    if multilabel:
        return int((y[rows].astype(bool) & np.asarray(query_label, dtype=bool)).any(axis=1).sum())
    return int((y[rows] == query_label).sum())
