"""Recall of an approximate index against exact search: what tuning aims at and builds report.

A returned hit counts when its exact cosine is at least the k-th exact
neighbour's, so ties (duplicate images) are not counted as misses. Queries are
stored vectors, each query's own id left out of both rankings.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np

from .base import SearchIndex, rows_of, sort_order

RECALL_KS = (1, 10, 50)
RECALL_SAMPLE = 2000  # stored vectors as queries: half to tune on, half to report recall on
RECALL_MARGIN = 2.0  # standard errors a tuned setting's recall must clear the target by (see recall10)


def exact_scores(index: SearchIndex, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-(k + 1) scores of each query (a stored query is its own first neighbour)."""
    scores, _ = index.search(queries, k + 1, kind="exact")
    return scores


def recall10(index: SearchIndex, queries: np.ndarray, query_ids: np.ndarray, vectors: np.ndarray,
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
    per_query = recall_per_query(approx, 10, queries, query_ids, vectors, ids, truth)
    mean = float(np.mean(per_query))
    error = float(np.std(per_query, ddof=1) / math.sqrt(len(per_query))) if len(per_query) > 1 else 0.0
    return mean, mean - RECALL_MARGIN * error, seconds


def recall_per_query(approx: np.ndarray, k: int, queries: np.ndarray, query_ids: np.ndarray,
                     vectors: np.ndarray, ids: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Share of each query's first k hits (own id left out) scoring at least its k-th exact neighbour."""
    order = sort_order(ids)
    per_query = np.empty(len(query_ids))
    for q, own in enumerate(query_ids):
        threshold = truth[q][k] - 1e-5  # the query is its own first exact neighbour: the k-th other one is at k
        hits = np.array([i for i in approx[q] if i >= 0 and i != own][:k], dtype=np.int64)
        rows = rows_of(ids, order, hits)  # every hit is a stored id
        per_query[q] = np.sum(vectors[rows] @ queries[q] >= threshold) / k
    return per_query


def recall_at_k(index: SearchIndex, queries: np.ndarray, query_ids: np.ndarray,
                vectors: np.ndarray, ids: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Recall@k of ``index`` against exact search, each query's own id left out of both.

    Each k is a search for k hits of its own (efSearch and the IVF-PQ shortlist
    depend on k).
    """
    ks = [k for k in ks if k < len(ids)]
    if not ks or not len(queries):
        return {}
    truth = exact_scores(index, queries, max(ks))
    recall = {}
    for k in ks:
        _, approx = index.search(queries, k + 1)
        recall[k] = float(np.mean(recall_per_query(approx, k, queries, query_ids, vectors, ids, truth)))
    return recall


def recall_sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of two disjoint query samples: one to tune on, one to report recall on."""
    rows = np.random.default_rng(seed).permutation(n)[:min(n, RECALL_SAMPLE)]
    half = max(1, len(rows) // 2)
    return rows[:half], rows[half:] if len(rows) > 1 else rows
