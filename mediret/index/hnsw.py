"""The hnsw index kind: ``IndexHNSWFlat``, M = 32 links per node, efConstruction = 200.

efSearch is tuned at build time: the smallest of 16, 24, 32, 48, ..., 512 whose
recall@10 against exact search, minus two standard errors, reaches the target
(0.99 by default) on sample queries (see ``recall.recall10``). Scores are exact
cosines (the graph holds the full vectors).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import recall
from .base import SearchIndex

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # steps of ~1.5x
EF_REFINE = 8  # between two grid values, efSearch is narrowed down in steps of this


def build(vectors: np.ndarray, ids: np.ndarray, seed: int) -> tuple[Any, dict[str, Any]]:
    import faiss

    hnsw = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index = faiss.IndexIDMap2(hnsw)
    index.add_with_ids(vectors, ids)
    return index, {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH[0]}


def search(index: SearchIndex, queries: np.ndarray, k: int, sel) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    params = faiss.SearchParametersHNSW(efSearch=max(index.params["efSearch"], k))
    if sel is not None:
        params.sel = sel
    return index.index.search(queries, k, params=params)


def tune(index: SearchIndex, queries: np.ndarray, query_ids: np.ndarray, vectors: np.ndarray,
         ids: np.ndarray, truth: np.ndarray) -> None:
    """efSearch: the smallest reaching the target recall (on the grid HNSW_EF_SEARCH, then
    narrowed in steps of EF_REFINE below the first grid value that reaches it), else the
    smallest within 0.01 of the best recall seen."""
    target = index.params["target_recall"]
    seen: dict[int, float] = {}
    previous = None
    for ef in HNSW_EF_SEARCH:
        index.params["efSearch"] = ef
        seen[ef], lower, _ = recall.recall10(index, queries, query_ids, vectors, ids, truth)
        if lower >= target:
            for between in range(previous + EF_REFINE, ef, EF_REFINE) if previous else ():
                index.params["efSearch"] = between
                if recall.recall10(index, queries, query_ids, vectors, ids, truth)[1] >= target:
                    return
            index.params["efSearch"] = ef
            return
        previous = ef
    best = max(seen.values())
    index.params["efSearch"] = min(ef for ef, r in seen.items() if r >= best - 0.01)
