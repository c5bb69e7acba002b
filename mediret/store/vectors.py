"""One encoder's vectors in a store: a FAISS ``IndexIDMap2`` over ``IndexFlatIP`` in one file.

The file loads with plain ``faiss.read_index``. It is replaced atomically
(temporary file, fsync, rename, fsync of the folder), so a crash leaves either
the old or the new file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError


class VectorFile:
    """The vectors of one encoder, by store id: what the exact index searches and classifiers export."""

    def __init__(self, path: Path, index: Any):
        self.path = path
        self.index = index  # faiss.IndexIDMap2(IndexFlatIP): the exact index

    @classmethod
    def create(cls, path: Path, dim: int) -> "VectorFile":
        import faiss

        vectors = cls(path, faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))
        vectors.write()
        return vectors

    @classmethod
    def load(cls, path: Path) -> "VectorFile":
        import faiss

        return cls(path, faiss.read_index(str(path)))

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        """Ids of the vectors, in the order they were added."""
        import faiss

        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.index.add_with_ids(vectors, ids)

    def get(self, ids: np.ndarray) -> np.ndarray:
        if len(ids) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        try:
            return self.index.reconstruct_batch(ids)
        except RuntimeError as exc:
            raise StoreError(f"some ids are not in the index: {exc}") from exc

    def remove(self, ids: np.ndarray) -> int:
        """Drop the vectors of ``ids`` (in memory; ``write`` makes it durable); returns how many went."""
        import faiss

        return int(self.index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64))))

    def write(self) -> None:
        """Replace the file with the vectors held now, atomically."""
        write_index_atomic(self.index, self.path)


def write_index_atomic(index, path: Path) -> None:
    """Replace ``path`` with ``index`` so that a crash leaves either the old or the new file."""
    import faiss

    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
