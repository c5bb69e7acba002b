"""The registry of index kinds: what each is called, what it is for, and the module that builds
and searches it. Imports nothing heavy, so the command line can list the kinds cheaply.

An index kind is one module with three functions (see ``mediret.index.hnsw`` for one):

``build(vectors, ids, seed) -> (faiss_index, params)``
    the index over the store's vectors, untuned (params: what it was built with, and the
    search knobs' starting values);
``tune(index, queries, query_ids, vectors, ids, truth)``
    sets ``index.params``' search knobs to reach ``index.params["target_recall"]`` on
    stored vectors as queries, measured with ``mediret.index.recall.recall10`` against
    their exact scores ``truth``;
``search(index, queries, k, selector) -> (scores, ids)``
    (Q, k) arrays, best first, id -1 padding, under a FAISS ``IDSelector`` (or None).

plus one ``register_kind`` line below. The exact kind is the store's own flat index and
has no build or tuning.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from ..errors import SearchError

SIMILARITY = "cosine similarity on L2-normalised vectors (inner product)"


@dataclass(frozen=True)
class IndexKind:
    """One kind of index.

    module: the module implementing it (imported on first use).
    target_recall: the recall@10 against exact search it is tuned to by default; None for
        the exact kind, which has nothing to tune.
    """

    name: str
    module: str
    summary: str
    target_recall: float | None = None

    @property
    def approximate(self) -> bool:
        return self.target_recall is not None

    def implementation(self) -> ModuleType:
        return importlib.import_module(self.module)


KINDS: dict[str, IndexKind] = {}


def register_kind(kind: IndexKind) -> IndexKind:
    """Add an index kind; a name can be registered once."""
    if kind.name in KINDS:
        raise SearchError(f"an index kind named {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def kind_names() -> tuple[str, ...]:
    """The registered kinds, exact first, then the approximate ones by name."""
    return tuple(sorted(KINDS, key=lambda name: (KINDS[name].approximate, name)))


def get_kind(name: str) -> IndexKind:
    """The kind registered as ``name``; unknown names fail with the list of valid ones."""
    try:
        return KINDS[name]
    except KeyError:
        raise SearchError(f"unknown index kind '{name}'; choose from {', '.join(kind_names())}") from None


register_kind(IndexKind("exact", "mediret.index.exact", "flat inner product over every vector"))
register_kind(IndexKind("hnsw", "mediret.index.hnsw", "HNSW graph over the full vectors", 0.99))
register_kind(IndexKind("ivf-pq", "mediret.index.ivf_pq",
                        "OPQ + inverted lists of 4-bit fast-scan PQ codes, shortlist re-scored exactly", 0.95))
