"""Build an approximate index from stored vectors: the kind's own build, its tuning, its recall."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..errors import SearchError
from . import recall
from .base import SearchIndex
from .kinds import get_kind


def build_from_vectors(kind: str, vectors: np.ndarray, ids: np.ndarray, exact: Any,
                       seed: int = 0, target_recall: float | None = None) -> SearchIndex:
    """An approximate index of ``kind`` over ``vectors`` / ``ids`` (those of the exact index
    ``exact``), tuned with one sample of the vectors as queries, its recall measured on another.

    target_recall: the recall@10 against exact search its knobs are tuned to (default: the
        kind's own, ``IndexKind.target_recall``).
    """
    spec = get_kind(kind)
    if not spec.approximate:
        raise SearchError(f"cannot build an index of kind '{kind}'; it is the store's own")
    target = target_recall or spec.target_recall
    if not 0 < target <= 1:
        raise SearchError(f"target recall must be in (0, 1], got {target}")
    implementation = spec.implementation()
    started = time.perf_counter()
    index, params = implementation.build(vectors, ids, seed)
    params["target_recall"] = target
    built = SearchIndex(kind, index, exact, params=params)
    tune, held_out = recall.recall_sample(len(vectors), seed)
    truth = recall.exact_scores(built, vectors[tune], 10)
    implementation.tune(built, vectors[tune], ids[tune], vectors, ids, truth)
    built.recall = recall.recall_at_k(built, vectors[held_out], ids[held_out], vectors, ids, recall.RECALL_KS)
    built.build_seconds = time.perf_counter() - started
    return built
