"""A store: one FAISS index and one DuckDB database under one directory, kept consistent.

Layout of a store directory::

    mediret.duckdb        images, labels, splits, problems, ingest runs, encoder provenance
    <encoder>.faiss       IndexIDMap2 over a flat inner-product index (plain ``faiss.read_index``)

One integer ``id`` links a FAISS vector to its ``images`` row. DuckDB is the
commit point: :meth:`Store.commit` first replaces the index file atomically
(write to a temporary file, fsync, rename), then commits the DuckDB
transaction that adds the rows. A crash between the two leaves vectors whose
ids DuckDB does not know; :meth:`Store.open` removes them, so a reopened store
always holds exactly the vectors of its committed rows.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .encoders._allocator import limit_arenas
from .errors import StoreError
from .records import ImageRecord, Problem

DB_FILE = "mediret.duckdb"
SCHEMA_VERSION = 1
# DuckDB's worker threads, after half a second idle, call glibc's malloc_trim, which
# hands every freed heap page back to the OS, the activation buffers mediret.allocator
# keeps for the encoder included: the next forward pass page-faults them in again
# (tens of thousands of faults after each commit of an ingest; BENCHMARKS.md part 2).
# The store's queries are small, so DuckDB runs them on the calling thread alone.
DB_CONFIG = {"threads": 1}
# DuckDB calls malloc_trim each time it starts a database instance (as it launches its
# threads) and closes one: a store opened or closed in a process whose encoder has run
# costs its next forward pass the same page faults (200,000 for EfficientNet-Lite0's two
# forward streams, about 0.2 s). So the process keeps one in-memory instance, started
# with the first store, and each open store's file is attached to it (_connect).
_instance: Any = None
_attached: dict[str, "_Attachment"] = {}
_attach_lock = threading.RLock()  # a store collected (finalized) inside _connect closes in the same thread
_aliases = itertools.count()


@dataclass
class _Attachment:
    alias: str
    read_only: bool
    users: int = 0


def _connect(db_file: Path, read_only: bool):
    """A DuckDB connection whose default database is ``db_file``, and the key to release it with.

    A cursor of the process's one instance (see ``_instance``), the file attached
    to it under an alias; stores of the same file share the attachment, in the
    same mode (as DuckDB's own connections to one file must).
    """
    import duckdb

    global _instance
    key = os.path.realpath(db_file)
    with _attach_lock:
        if _instance is None:
            limit_arenas()  # DuckDB's start makes an arena glibc would later hand to an encoder's thread
            _instance = duckdb.connect(":memory:", config=DB_CONFIG)
        attachment = _attached.get(key)
        if attachment is None:
            alias = f"store_{next(_aliases)}"
            quoted = "'" + key.replace("'", "''") + "'"
            _instance.execute(f"ATTACH {quoted} AS {alias}" + (" (READ_ONLY)" if read_only else ""))
            attachment = _attached[key] = _Attachment(alias, read_only)
        elif attachment.read_only != read_only:
            mode = "read-only" if attachment.read_only else "for writing"
            raise StoreError(f"{db_file.parent} is open {mode} in this process already; close it first")
        con = _instance.cursor()
        con.execute(f"USE {attachment.alias}")
        attachment.users += 1  # counted once the connection exists: _disconnect releases exactly these
    return con, key


def _disconnect(con, key: str) -> None:
    """Close a ``_connect`` connection; the last one of a file detaches it (DuckDB checkpoints it then)."""
    con.close()
    with _attach_lock:
        attachment = _attached[key]
        attachment.users -= 1
        if attachment.users == 0:
            del _attached[key]
            _instance.execute(f"DETACH {attachment.alias}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS store_info (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS encoders (
    name TEXT PRIMARY KEY, dim INTEGER, preprocess TEXT, weights_source TEXT,
    metric TEXT, index_file TEXT, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS images (
    id BIGINT PRIMARY KEY, image_id TEXT UNIQUE, source TEXT, dataset TEXT,
    group_id TEXT, given_split TEXT, content_hash TEXT, width INTEGER, height INTEGER,
    meta JSON, ingest_run INTEGER);
CREATE TABLE IF NOT EXISTS labels (id BIGINT, label TEXT);
CREATE TABLE IF NOT EXISTS label_names (label TEXT PRIMARY KEY, position INTEGER);
CREATE TABLE IF NOT EXISTS splits (id BIGINT, scheme TEXT, split TEXT, PRIMARY KEY (id, scheme));
CREATE TABLE IF NOT EXISTS problems (
    ingest_run INTEGER, path TEXT, kind TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS ingest_runs (
    run INTEGER PRIMARY KEY, root TEXT, format TEXT, started_at TIMESTAMP,
    finished_at TIMESTAMP, added INTEGER, skipped INTEGER, problems INTEGER, seed INTEGER);
CREATE OR REPLACE VIEW groups AS
    SELECT group_id, count(*) AS n_images FROM images
    WHERE group_id IS NOT NULL GROUP BY group_id;
"""


@dataclass(frozen=True)
class EncoderInfo:
    """Which encoder produced a store's vectors, and how."""

    name: str
    dim: int
    preprocess: str
    weights_source: str


@dataclass(frozen=True)
class StoredImage:
    """An image row of the store, as search results and exports return it."""

    id: int
    image_id: str
    source: str
    labels: tuple[str, ...]
    group_id: str | None
    given_split: str | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LabelledMatrix:
    """Vectors of a store joined with their labels and split, for classifiers.

    ``y`` holds one row per image: class indices (N,) for single-label stores,
    a 0/1 matrix (N, L) for multi-label ones. ``split`` holds 'train'/'test'
    (or the dataset's own names) for the scheme asked for.
    """

    ids: np.ndarray
    X: np.ndarray
    y: np.ndarray
    label_names: list[str]
    multilabel: bool
    split: np.ndarray
    groups: np.ndarray


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Store:
    """FAISS vectors and DuckDB metadata of one set of images and one encoder.

    Use :meth:`open` or :meth:`create`, as a context manager::

        with Store.open("indexes/ham") as store:
            X = store.vectors(ids)
    """

    def __init__(self, path: Path, connection: tuple[Any, str], encoder: EncoderInfo, index, read_only: bool):
        self.path = path
        self._con = connection[0]
        self.encoder = encoder
        self.index = index
        self.read_only = read_only
        self._pending_rows: list[tuple] = []
        self._pending_labels: list[tuple[int, str]] = []
        self._next_id = self._scalar("SELECT coalesce(max(id), -1) + 1 FROM images")
        self._disconnect = weakref.finalize(self, _disconnect, *connection)  # at close, or when collected

    # ---- opening -----------------------------------------------------------------

    @classmethod
    def exists(cls, path: str | Path) -> bool:
        return (Path(path) / DB_FILE).is_file()

    @classmethod
    def create(cls, path: str | Path, encoder: EncoderInfo) -> "Store":
        """Create an empty store for ``encoder`` (the directory may exist but not hold a store)."""
        import duckdb
        import faiss

        path = Path(path)
        if cls.exists(path):
            raise StoreError(f"{path} already holds a store; open it instead")
        path.mkdir(parents=True, exist_ok=True)
        try:
            connection = _connect(path / DB_FILE, read_only=False)
        except duckdb.Error as exc:
            raise StoreError(f"cannot create {path / DB_FILE}: {exc}") from exc
        try:
            con = connection[0]
            con.execute(_SCHEMA)
            index_file = f"{encoder.name}.faiss"
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(encoder.dim))
            _write_index_atomic(index, path / index_file)
            con.execute("BEGIN")
            con.execute("INSERT INTO store_info VALUES ('schema_version', ?), ('created_at', ?)",
                        [str(SCHEMA_VERSION), _now().isoformat()])
            con.execute("INSERT INTO encoders VALUES (?, ?, ?, ?, 'inner_product', ?, ?)",
                        [encoder.name, encoder.dim, encoder.preprocess, encoder.weights_source,
                         index_file, _now()])
            con.execute("COMMIT")
            return cls(path, connection, encoder, index, read_only=False)
        except BaseException:
            _disconnect(*connection)
            raise

    @classmethod
    def open(cls, path: str | Path, read_only: bool = True) -> "Store":
        """Open a store, repairing vectors a crash left without rows, and check it is consistent."""
        import duckdb
        import faiss

        path = Path(path)
        if not cls.exists(path):
            raise StoreError(
                f"no store at {path} (looked for {path / DB_FILE}); "
                "create one with `mediret ingest DATASET --store PATH`")
        try:
            connection = _connect(path / DB_FILE, read_only=read_only)
        except duckdb.Error as exc:
            raise StoreError(f"cannot open {path / DB_FILE}: {exc}") from exc
        try:
            row = connection[0].execute(
                "SELECT name, dim, preprocess, weights_source, index_file FROM encoders").fetchone()
            if row is None:
                raise StoreError(f"{path} has no encoder recorded; the store was never completed")
            encoder = EncoderInfo(name=row[0], dim=row[1], preprocess=row[2], weights_source=row[3])
            index_path = path / row[4]
            if not index_path.is_file():
                raise StoreError(f"{path} lacks its index file {index_path.name}")
            index = faiss.read_index(str(index_path))
            store = cls(path, connection, encoder, index, read_only=read_only)
        except BaseException:
            _disconnect(*connection)
            raise
        try:
            store._reconcile(index_path)
        except BaseException:
            store._disconnect()
            raise
        return store

    def _reconcile(self, index_path: Path) -> None:
        """Make the index hold exactly the vectors of committed rows (see module docstring)."""
        import faiss

        index_ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        db_ids = np.array([r[0] for r in self._con.execute("SELECT id FROM images").fetchall()],
                          dtype=np.int64)
        orphans = np.setdiff1d(index_ids, db_ids)
        missing = np.setdiff1d(db_ids, index_ids)
        if len(missing):
            raise StoreError(
                f"{self.path}: {len(missing)} image rows have no vector in {index_path.name} "
                "(was the index file replaced?); re-ingest into a new store")
        if len(orphans):
            self.index.remove_ids(faiss.IDSelectorBatch(orphans))
            if not self.read_only:
                _write_index_atomic(self.index, index_path)
        if self.index.ntotal != len(db_ids):
            raise StoreError(f"{self.path}: index holds {self.index.ntotal} vectors "
                             f"but the database {len(db_ids)} images")

    def close(self) -> None:
        if self._pending_rows and not self.read_only:
            self.commit()
        self._disconnect()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self._pending_rows.clear()
            self._pending_labels.clear()
        self.close()

    # ---- writing -----------------------------------------------------------------

    def add(self, records: Sequence[ImageRecord], vectors: np.ndarray,
            content_hashes: Sequence[str | None] | None = None,
            sizes: Sequence[tuple[int, int] | None] | None = None,
            dataset: str = "", ingest_run: int | None = None) -> np.ndarray:
        """Add images and their vectors; nothing is durable until :meth:`commit`.

        Returns the ids given to the records, in order.
        """
        if self.read_only:
            raise StoreError(f"{self.path} is open read-only")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.encoder.dim:
            raise StoreError(f"vectors of shape {vectors.shape} do not fit this store "
                             f"({self.encoder.name}, dim {self.encoder.dim})")
        if len(records) != len(vectors):
            raise StoreError("records and vectors differ in number")
        ids = np.arange(self._next_id, self._next_id + len(records), dtype=np.int64)
        self._next_id += len(records)
        content_hashes = content_hashes or [None] * len(records)
        sizes = sizes or [None] * len(records)
        for i, record, digest, size in zip(ids, records, content_hashes, sizes):
            width, height = size if size else (None, None)
            self._pending_rows.append((
                int(i), record.image_id, record.source, dataset, record.group, record.split,
                digest, width, height, json.dumps(record.meta, default=str), ingest_run))
            self._pending_labels.extend((int(i), label) for label in record.labels)
        self.index.add_with_ids(vectors, ids)
        return ids

    def commit(self) -> None:
        """Make everything added so far durable: index file first, then the DuckDB rows."""
        if self.read_only:
            raise StoreError(f"{self.path} is open read-only")
        _write_index_atomic(self.index, self.path / self.index_file)
        con = self._con
        con.execute("BEGIN")
        try:
            _insert_columns(con, "images", self._pending_rows, _IMAGE_TYPES)
            _insert_columns(con, "labels", self._pending_labels, ("BIGINT", "TEXT"))
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        self._pending_rows.clear()
        self._pending_labels.clear()

    def set_label_names(self, names: Iterable[str]) -> None:
        """Record the dataset's label vocabulary (merged with what is there, order kept)."""
        known = self.label_names()
        new = [n for n in names if n not in known]
        _insert_columns(self._con, "label_names",
                        [(n, len(known) + i) for i, n in enumerate(new)], ("TEXT", "INTEGER"))

    def set_splits(self, scheme: str, ids: np.ndarray, split: Sequence[str]) -> None:
        """Replace the split assignment of ``scheme`` for ``ids``."""
        con = self._con
        con.execute("BEGIN")
        con.execute("DELETE FROM splits WHERE scheme = ?", [scheme])
        _insert_columns(con, "splits", [(int(i), scheme, str(s)) for i, s in zip(ids, split)],
                        ("BIGINT", "TEXT", "TEXT"))
        con.execute("COMMIT")

    def start_run(self, root: str, fmt: str, seed: int) -> int:
        run = self._scalar("SELECT coalesce(max(run), 0) + 1 FROM ingest_runs")
        self._con.execute("INSERT INTO ingest_runs VALUES (?, ?, ?, ?, NULL, 0, 0, 0, ?)",
                          [run, root, fmt, _now(), seed])
        return run

    def finish_run(self, run: int, added: int, skipped: int, problems: Sequence[Problem]) -> None:
        con = self._con
        con.execute("BEGIN")
        if problems:
            _insert_columns(con, "problems", [(run, p.path, p.kind, p.reason) for p in problems],
                            ("INTEGER", "TEXT", "TEXT", "TEXT"))
        con.execute("UPDATE ingest_runs SET finished_at = ?, added = ?, skipped = ?, problems = ? "
                    "WHERE run = ?", [_now(), added, skipped, len(problems), run])
        con.execute("COMMIT")

    # ---- reading -----------------------------------------------------------------

    @property
    def index_file(self) -> str:
        return self._scalar("SELECT index_file FROM encoders")

    def sql(self, query: str, params: Sequence[Any] | None = None) -> list[tuple]:
        """Run a read query against the store's DuckDB database."""
        return self._con.execute(query, params or []).fetchall()

    def _scalar(self, query: str, params: Sequence[Any] | None = None):
        return self._con.execute(query, params or []).fetchone()[0]

    def __len__(self) -> int:
        return int(self._scalar("SELECT count(*) FROM images"))

    def ids(self) -> np.ndarray:
        return np.array([r[0] for r in self.sql("SELECT id FROM images ORDER BY id")],
                        dtype=np.int64)

    def image_ids(self) -> set[str]:
        return {r[0] for r in self.sql("SELECT image_id FROM images")}

    def hashes(self) -> dict[str, tuple[int, str]]:
        """content hash -> (id, image_id) of the first stored image with those bytes."""
        return {h: (i, image_id) for h, i, image_id in self.sql(
            "SELECT content_hash, min(id), arg_min(image_id, id) FROM images "
            "WHERE content_hash IS NOT NULL GROUP BY content_hash")}

    def label_names(self) -> list[str]:
        return [r[0] for r in self.sql("SELECT label FROM label_names ORDER BY position")]

    def is_multilabel(self) -> bool:
        return self.get_info("multilabel") == "true"

    def set_info(self, key: str, value: str) -> None:
        self._con.execute("INSERT OR REPLACE INTO store_info VALUES (?, ?)", [key, value])

    def get_info(self, key: str) -> str | None:
        row = self.sql("SELECT value FROM store_info WHERE key = ?", [key])
        return row[0][0] if row else None

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids``, reconstructed from the FAISS index."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        try:
            return self.index.reconstruct_batch(ids)
        except RuntimeError as exc:
            raise StoreError(f"some ids are not in the index: {exc}") from exc

    def records(self, ids: Sequence[int] | np.ndarray) -> list[StoredImage]:
        """Image rows for ``ids`` in the order given (one batched query)."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        rows = self.sql(
            "SELECT i.id, i.image_id, i.source, i.group_id, i.given_split, i.meta, "
            "  list(l.label ORDER BY l.label) FILTER (WHERE l.label IS NOT NULL) "
            "FROM images i LEFT JOIN labels l ON l.id = i.id "
            "WHERE i.id IN (SELECT unnest(?)) GROUP BY ALL", [ids])
        by_id = {r[0]: StoredImage(id=r[0], image_id=r[1], source=r[2], group_id=r[3],
                                   given_split=r[4], meta=json.loads(r[5]) if r[5] else {},
                                   labels=tuple(r[6] or ()))
                 for r in rows}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise StoreError(f"ids not in the store: {missing[:10]}")
        return [by_id[i] for i in ids]

    def id_of(self, image_id: str) -> int:
        row = self.sql("SELECT id FROM images WHERE image_id = ?", [image_id])
        if not row:
            raise StoreError(f"no image '{image_id}' in {self.path}")
        return int(row[0][0])

    def split_schemes(self) -> list[str]:
        return [r[0] for r in self.sql("SELECT DISTINCT scheme FROM splits ORDER BY scheme")]

    def labelled_matrix(self, scheme: str = "random") -> LabelledMatrix:
        """Every stored vector with its labels, group and ``scheme`` split, ordered by id."""
        schemes = self.split_schemes()
        if scheme not in schemes:
            raise StoreError(f"split '{scheme}' is not in {self.path}; it has: "
                             f"{', '.join(schemes) or 'none'}")
        rows = self.sql(
            "SELECT i.id, coalesce(i.group_id, i.image_id), s.split "
            "FROM images i JOIN splits s ON s.id = i.id AND s.scheme = ? ORDER BY i.id", [scheme])
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        names = self.label_names()
        position = {n: k for k, n in enumerate(names)}
        row_of = {int(i): k for k, i in enumerate(ids)}
        multilabel = self.is_multilabel()
        Y = np.zeros((len(ids), len(names)), dtype=np.int8)
        for i, label in self.sql("SELECT id, label FROM labels"):
            if i in row_of:
                Y[row_of[i], position[label]] = 1
        if multilabel:
            y = Y
        else:
            unlabelled = np.flatnonzero(Y.sum(axis=1) != 1)
            if len(unlabelled):
                raise StoreError(f"{len(unlabelled)} images of a single-label store do not carry "
                                 "exactly one label")
            y = Y.argmax(axis=1)
        return LabelledMatrix(ids=ids, X=self.vectors(ids), y=y, label_names=names,
                              multilabel=multilabel, split=np.array([r[2] for r in rows]),
                              groups=np.array([r[1] for r in rows]))

    def info(self) -> dict[str, Any]:
        """Counts per label and split, encoder, dims and size on disk."""
        size = sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
        per_label = self.sql(
            "SELECT label, count(*) FROM labels GROUP BY label ORDER BY count(*) DESC, label")
        per_split = self.sql(
            "SELECT scheme, split, count(*) FROM splits GROUP BY ALL ORDER BY scheme, split")
        splits: dict[str, dict[str, int]] = {}
        for scheme, split, n in per_split:
            splits.setdefault(scheme, {})[split] = n
        problems = self.sql("SELECT kind, count(*) FROM problems GROUP BY kind ORDER BY kind")
        return {
            "path": str(self.path),
            "images": len(self),
            "vectors": int(self.index.ntotal),
            "groups": int(self._scalar("SELECT count(*) FROM groups")),
            "datasets": [r[0] for r in self.sql("SELECT DISTINCT dataset FROM images ORDER BY 1")],
            "multilabel": self.is_multilabel(),
            "encoder": {"name": self.encoder.name, "dim": self.encoder.dim,
                        "preprocess": self.encoder.preprocess,
                        "weights": self.encoder.weights_source},
            "labels": {label: n for label, n in per_label},
            "splits": splits,
            "problems": {kind: n for kind, n in problems},
            "ingest_runs": int(self._scalar("SELECT count(*) FROM ingest_runs")),
            "size_bytes": size,
        }


_IMAGE_TYPES = ("BIGINT", "TEXT", "TEXT", "TEXT", "TEXT", "TEXT", "TEXT", "INTEGER", "INTEGER",
                "JSON", "INTEGER")


def _insert_columns(con, table: str, rows: Sequence[tuple], types: Sequence[str]) -> None:
    """Insert many rows in one statement: each column travels as one list parameter.

    DuckDB's executemany runs one statement per row, about 100x slower.
    """
    if not rows:
        return
    columns = [list(col) for col in zip(*rows)]
    select = ", ".join(f"unnest(?::{t}[])" for t in types)
    con.execute(f"INSERT INTO {table} SELECT {select}", columns)


def _write_index_atomic(index, path: Path) -> None:
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
