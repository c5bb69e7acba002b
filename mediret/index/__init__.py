"""Search indexes over a store's vectors: the exact one, and approximate kinds built, tuned and cached.

``kinds.KINDS`` lists the kinds; each is one module (``exact``, ``hnsw``, ``ivf_pq``).
``open_index(store, kind)`` gives a ``SearchIndex`` whose ``search`` ranks ids under a
``Selection``. Adding a kind: a module with ``build``, ``tune`` and ``search`` and one
``register_kind`` line in ``kinds`` (docs/architecture.md).

Only the registry is imported with the package (the command line lists the kinds without
numpy); the rest loads on first use.
"""

from importlib import import_module

from .kinds import KINDS, SIMILARITY, IndexKind, get_kind, kind_names, register_kind

_LAZY = {"SMALL_BATCH": "base", "SearchIndex": "base", "Selection": "base",
         "build_from_vectors": "build", "CACHE_FORMAT": "cache", "build_index": "cache",
         "open_index": "cache", "RECALL_MARGIN": "recall", "recall_at_k": "recall"}

__all__ = ["KINDS", "SIMILARITY", "IndexKind", "get_kind", "kind_names", "register_kind", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
