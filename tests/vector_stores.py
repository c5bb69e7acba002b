"""Stores of real dataset metadata with seeded vectors, for search and retrieval logic tests.

Vectors are class centre + group (lesion/patient) offset + noise, normalised:
images of one class are near each other and images of one group nearer still,
so filters and group exclusion change the results in ways tests can see.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mediret.ingest import assign_splits
from mediret.records import ImageRecord
from mediret.store import EncoderInfo, Store

from .conftest import HAM, ODIR, ham_image_path, read_csv

DIM = 32
ODIR_FLAGS = ("N", "D", "G", "C", "A", "H", "M", "O")


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Run FAISS on one OpenMP thread: on a busy 2-core machine its threads spin against
    each other and training an IVF-PQ index takes 4x longer. Import into a test module."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@dataclass
class VectorStore:
    """A store on disk and what went into it: ``rows[i]`` and ``X[i]`` belong to id ``i``."""

    path: Path
    rows: list[dict[str, str]]
    X: np.ndarray
    labels: list[tuple[str, ...]]
    groups: list[str]


def structured_vectors(labels: list[tuple[str, ...]], groups: list[str], seed: int,
                       dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    names = sorted({label for row in labels for label in row})
    centres = {name: rng.normal(size=dim) * 0.5 for name in names}
    offsets = {g: rng.normal(size=dim) for g in sorted(set(groups))}
    X = np.array([sum((centres[label] for label in row), np.zeros(dim)) + offsets[g]
                  + rng.normal(size=dim) * 0.9 for row, g in zip(labels, groups)], dtype=np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def _write_store(path: Path, records: list[ImageRecord], X: np.ndarray, label_names: list[str],
                 multilabel: bool, fmt: str) -> None:
    store = Store.create(path, EncoderInfo(name="seeded-test", dim=X.shape[1],
                                           preprocess="imagenet", weights_source="none"))
    store.set_label_names(label_names)
    store.set_info("multilabel", "true" if multilabel else "false")
    store.set_info("format", fmt)
    store.add(records, X, dataset=fmt)
    store.commit()
    assign_splits(store, seed=0, test_fraction=0.2)
    store.close()


def ham_vector_store(path: Path, n: int = 1500, seed: int = 0) -> VectorStore:
    """``n`` seeded HAM10000 metadata rows (real ids, labels, lesions, sex, age, image files)."""
    rows = read_csv(HAM / "HAM10000_metadata.csv")
    rows = random.Random(seed).sample(rows, n)
    labels = [(r["dx"],) for r in rows]
    groups = [r["lesion_id"] for r in rows]
    X = structured_vectors(labels, groups, seed)
    records = [ImageRecord(image_id=r["image_id"], source=str(ham_image_path(r["image_id"])),
                           labels=(r["dx"],), group=r["lesion_id"],
                           meta={"sex": r["sex"], "age": float(r["age"]) if r["age"] else None,
                                 "localization": r["localization"]})
               for r in rows]
    _write_store(path, records, X, sorted({r["dx"] for r in rows}), False, "ham10000")
    return VectorStore(path, rows, X, labels, groups)


def odir_multilabel_store(path: Path, n: int = 600, seed: int = 0) -> VectorStore:
    """``n`` seeded ODIR rows labelled with their patient-level flags N..O (multi-label)."""
    rows = read_csv(ODIR / "full_df.csv")
    rows = random.Random(seed).sample(rows, n)
    labels = [tuple(f for f in ODIR_FLAGS if r[f] == "1") for r in rows]
    groups = [r["ID"] for r in rows]
    X = structured_vectors(labels, groups, seed)
    records = [ImageRecord(image_id=r["filename"],
                           source=str(ODIR / "preprocessed_images" / r["filename"]),
                           labels=lab, group=r["ID"]) for r, lab in zip(rows, labels)]
    _write_store(path, records, X, list(ODIR_FLAGS), True, "odir")
    return VectorStore(path, rows, X, labels, groups)
