"""Ranking: a query -> the top-k stored images among those passing the filters, joined with metadata.

Similarity is the cosine of L2-normalised vectors, computed as their inner
product. Filters (label, split, group, metadata fields, SQL over ``images``)
become a set of allowed ids in the store (``Store.select_ids``); the index then
ranks only those ids through an ``IDSelector``, so k hits come back whenever k
images pass the filters (no over-fetching and dropping).

Graph and inverted-list search lose recall when a filter keeps few images;
below ``EXACT_FILTER_FRACTION`` of the store the allowed ids are ranked by the
exact index instead, and the result says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import SearchError
from .index import SIMILARITY, SearchIndex, Selection, open_index
from .query import Query
from .store import Filters, Store, StoredImage

EXACT_FILTER_FRACTION = 0.1


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
        filters = replace(filters, split_scheme=store.default_split_scheme())
    index = index or open_index(store, "exact")
    notes: list[str] = []
    allowed = store.select_ids(filters)
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
        excluded.extend(store.ids_in_group(query.group_id).tolist())
        group = query.group_id
    return np.unique(np.array(excluded, dtype=np.int64)), group
