"""A store: one encoder's FAISS vectors and the DuckDB database of its images, kept consistent.

Layout of a store directory::

    mediret.duckdb        images, labels, splits, problems, ingest runs, encoder provenance,
                          classifiers
    <encoder>.faiss       IndexIDMap2 over a flat inner-product index (plain ``faiss.read_index``)

One integer ``id`` links a FAISS vector to its ``images`` row. DuckDB is the
commit point: :meth:`Store.commit` first replaces the index file atomically,
then commits the DuckDB transaction that adds the rows. A crash between the two
leaves vectors whose ids DuckDB does not know; :meth:`Store.open` removes them,
so a reopened store always holds exactly the vectors of its committed rows.

The store owns its SQL: every other module asks it through the verbs below
(which return numpy arrays or small dataclasses); ``sql`` is for inspection and
tests only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence
import weakref

import numpy as np

from ..errors import SearchError, StoreError
from ..records import ImageRecord, Problem
from . import _duckdb
from .classifiers import ClassifierTable
from .filters import FIELD_COLUMNS, OPERATORS, Filters, field_sql
from .schema import DB_FILE, IMAGE_COLUMNS, IMAGE_TYPES, SCHEMA_VERSION, TABLES
from .vectors import VectorFile

SPLIT_SCHEMES = ("random", "group", "given")


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


@dataclass(frozen=True)
class RecordedProblem:
    """An input problem kept in the store's ``problems`` table, with the ingest run that met it."""

    run: int
    kind: str
    path: str
    reason: str


@dataclass(frozen=True)
class SplitKey:
    """What split assignment needs of one image: its ids, group, given split and first label."""

    id: int
    image_id: str
    group_id: str | None
    given_split: str | None
    first_label: str | None


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Store:
    """FAISS vectors and DuckDB metadata of one set of images and one encoder.

    Use :meth:`open` or :meth:`create`, as a context manager::

        with Store.open("indexes/ham") as store:
            X = store.vectors(ids)
    """

    def __init__(self, path: Path, connection: tuple[Any, str], encoder: EncoderInfo,
                 vector_file: VectorFile, read_only: bool):
        self.path = path
        self._con = connection[0]
        self.encoder = encoder
        self._vectors = vector_file
        self.read_only = read_only
        self.classifiers = ClassifierTable(self._con)
        self._pending_rows: list[tuple] = []
        self._pending_labels: list[tuple[int, str]] = []
        self._next_id = self._scalar("SELECT coalesce(max(id), -1) + 1 FROM images")
        self._disconnect = weakref.finalize(self, _duckdb.disconnect, *connection)  # at close, or when collected

    # ---- opening -----------------------------------------------------------------

    @classmethod
    def exists(cls, path: str | Path) -> bool:
        return (Path(path) / DB_FILE).is_file()

    @classmethod
    def create(cls, path: str | Path, encoder: EncoderInfo) -> "Store":
        """Create an empty store for ``encoder`` (the directory may exist but not hold a store)."""
        import duckdb

        path = Path(path)
        if cls.exists(path):
            raise StoreError(f"{path} already holds a store; open it instead")
        path.mkdir(parents=True, exist_ok=True)
        try:
            connection = _duckdb.connect(path / DB_FILE, read_only=False)
        except duckdb.Error as exc:
            raise StoreError(f"cannot create {path / DB_FILE}: {exc}") from exc
        try:
            con = connection[0]
            con.execute(TABLES)
            index_file = f"{encoder.name}.faiss"
            vector_file = VectorFile.create(path / index_file, encoder.dim)
            con.execute("BEGIN")
            con.execute("INSERT INTO store_info VALUES ('schema_version', ?), ('created_at', ?)",
                        [str(SCHEMA_VERSION), _now().isoformat()])
            con.execute("INSERT INTO encoders VALUES (?, ?, ?, ?, 'inner_product', ?, ?)",
                        [encoder.name, encoder.dim, encoder.preprocess, encoder.weights_source,
                         index_file, _now()])
            con.execute("COMMIT")
            return cls(path, connection, encoder, vector_file, read_only=False)
        except BaseException:
            _duckdb.disconnect(*connection)
            raise

    @classmethod
    def open(cls, path: str | Path, read_only: bool = True, snapshot: bool = False) -> "Store":
        """Open a store, repairing vectors a crash left without rows, and check it is consistent.

        snapshot: a read-only copy in memory of the store as it is now, which holds no file
            open (a server's view, while an ingest may write the store; reopen to see more).
            The vectors' file is read once; rows committed after it was read are left out.
        """
        if snapshot:
            read_only = True
        import duckdb

        path = Path(path)
        if not cls.exists(path):
            raise StoreError(
                f"no store at {path} (looked for {path / DB_FILE}); "
                "create one with `mediret ingest DATASET --store PATH`")
        try:
            connection = _duckdb.connect(path / DB_FILE, read_only=read_only, snapshot=snapshot)
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
            store = cls(path, connection, encoder, VectorFile.load(index_path), read_only=read_only)
        except BaseException:
            _duckdb.disconnect(*connection)
            raise
        try:
            store._reconcile()
        except BaseException:
            store._disconnect()
            raise
        return store

    def _reconcile(self) -> None:
        """Make the index hold exactly the vectors of committed rows (see module docstring)."""
        index_ids = self._vectors.ids()
        db_ids = self._id_column("SELECT id FROM images")
        orphans = np.setdiff1d(index_ids, db_ids)
        missing = np.setdiff1d(db_ids, index_ids)
        if len(missing):
            raise StoreError(
                f"{self.path}: {len(missing)} image rows have no vector in {self._vectors.path.name} "
                "(was the index file replaced?); re-ingest into a new store")
        if len(orphans):
            self._vectors.remove(orphans)
            if not self.read_only:
                self._vectors.write()
        if len(self._vectors) != len(db_ids):
            raise StoreError(f"{self.path}: index holds {len(self._vectors)} vectors "
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
        self._check_writable()
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
        self._vectors.add(vectors, ids)
        return ids

    def commit(self) -> None:
        """Make everything added so far durable: index file first, then the DuckDB rows."""
        self._check_writable()
        self._vectors.write()
        con = self._con
        con.execute("BEGIN")
        try:
            _duckdb.insert_columns(con, "images", self._pending_rows, IMAGE_TYPES)
            _duckdb.insert_columns(con, "labels", self._pending_labels, ("BIGINT", "TEXT"))
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        self._pending_rows.clear()
        self._pending_labels.clear()

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self.path} is open read-only")

    def set_label_names(self, names: Iterable[str]) -> None:
        """Record the dataset's label vocabulary (merged with what is there, order kept)."""
        known = self.label_names()
        new = [n for n in names if n not in known]
        _duckdb.insert_columns(self._con, "label_names",
                               [(n, len(known) + i) for i, n in enumerate(new)], ("TEXT", "INTEGER"))

    def set_splits(self, scheme: str, ids: np.ndarray, split: Sequence[str]) -> None:
        """Replace the split assignment of ``scheme`` for ``ids``."""
        con = self._con
        con.execute("BEGIN")
        con.execute("DELETE FROM splits WHERE scheme = ?", [scheme])
        _duckdb.insert_columns(con, "splits", [(int(i), scheme, str(s)) for i, s in zip(ids, split)],
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
            _duckdb.insert_columns(con, "problems", [(run, p.path, p.kind, p.reason) for p in problems],
                                   ("INTEGER", "TEXT", "TEXT", "TEXT"))
        con.execute("UPDATE ingest_runs SET finished_at = ?, added = ?, skipped = ?, problems = ? "
                    "WHERE run = ?", [_now(), added, skipped, len(problems), run])
        con.execute("COMMIT")

    def set_info(self, key: str, value: str) -> None:
        self._con.execute("INSERT OR REPLACE INTO store_info VALUES (?, ?)", [key, value])

    # ---- reading: images ---------------------------------------------------------

    @property
    def index(self):
        """The exact FAISS index over every vector (an ``IndexIDMap2`` over ``IndexFlatIP``)."""
        return self._vectors.index

    @property
    def index_file(self) -> str:
        return self._vectors.path.name

    def sql(self, query: str, params: Sequence[Any] | None = None) -> list[tuple]:
        """Run a query against the store's DuckDB database: for inspection and tests; the
        library itself goes through the verbs of this class."""
        return self._con.execute(query, params or []).fetchall()

    def _scalar(self, query: str, params: Sequence[Any] | None = None):
        return self._con.execute(query, params or []).fetchone()[0]

    def _id_column(self, query: str, params: Sequence[Any] | None = None) -> np.ndarray:
        return np.array([r[0] for r in self.sql(query, params)], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._scalar("SELECT count(*) FROM images"))

    def ids(self) -> np.ndarray:
        """Every stored id, ascending."""
        return self._id_column("SELECT id FROM images ORDER BY id")

    def vector_ids(self) -> np.ndarray:
        """The ids the vectors are stored under, ascending (those of ``ids`` once opened)."""
        return np.sort(self._vectors.ids())

    def image_ids(self) -> set[str]:
        return {r[0] for r in self.sql("SELECT image_id FROM images")}

    def hashes(self) -> dict[str, tuple[int, str]]:
        """content hash -> (id, image_id) of the first stored image with those bytes."""
        return {h: (i, image_id) for h, i, image_id in self.sql(
            "SELECT content_hash, min(id), arg_min(image_id, id) FROM images "
            "WHERE content_hash IS NOT NULL GROUP BY content_hash")}

    def content_hashes(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """The content hashes of ``ids`` that have one (in no particular order)."""
        return [r[0] for r in self.sql(
            "SELECT content_hash FROM images WHERE content_hash IS NOT NULL "
            "AND id IN (SELECT unnest(?))", [[int(i) for i in ids]])]

    def find_by_hash(self, content_hash: str) -> StoredImage | None:
        """The first stored image whose bytes have ``content_hash``, or None."""
        return self._first("SELECT min(id) FROM images WHERE content_hash = ?", [content_hash])

    def find_by_source(self, *sources: str) -> StoredImage | None:
        """The first stored image whose source is one of ``sources``, or None."""
        return self._first("SELECT min(id) FROM images WHERE source IN (SELECT unnest(?))", [list(sources)])

    def _first(self, query: str, params: list) -> StoredImage | None:
        found = self._scalar(query, params)
        return None if found is None else self.records([found])[0]

    def label_names(self) -> list[str]:
        return [r[0] for r in self.sql("SELECT label FROM label_names ORDER BY position")]

    def labels_in_use(self) -> set[str]:
        """Every label an image carries or the dataset defines."""
        return set(self.label_names()) | {r[0] for r in self.sql("SELECT DISTINCT label FROM labels")}

    def is_multilabel(self) -> bool:
        return self.get_info("multilabel") == "true"

    def get_info(self, key: str) -> str | None:
        row = self.sql("SELECT value FROM store_info WHERE key = ?", [key])
        return row[0][0] if row else None

    def dicom_options(self):
        """How this store's DICOM files were read at ingest (window, frame): queries read theirs the same."""
        from ..dicom import DicomOptions

        return DicomOptions.from_info(self.get_info)

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids``, reconstructed from the FAISS index."""
        return self._vectors.get(np.asarray(ids, dtype=np.int64))

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

    def ids_in_group(self, group_id: str) -> np.ndarray:
        """Ids of every image of one group (patient/lesion), ascending."""
        return self._id_column("SELECT id FROM images WHERE group_id = ? ORDER BY id", [group_id])

    # ---- reading: splits and filters -----------------------------------------------

    def split_schemes(self) -> list[str]:
        return [r[0] for r in self.sql("SELECT DISTINCT scheme FROM splits ORDER BY scheme")]

    def split_values(self, scheme: str) -> list[str]:
        """The split names of ``scheme`` (e.g. test, train), sorted; empty for an unknown scheme."""
        return [r[0] for r in self.sql(
            "SELECT DISTINCT split FROM splits WHERE scheme = ? ORDER BY 1", [scheme])]

    def default_split_scheme(self) -> str:
        """The dataset's own split when it has one (MedMNIST), else the group-aware one."""
        schemes = self.split_schemes()
        for scheme in ("given", "group", "random"):
            if scheme in schemes:
                return scheme
        raise SearchError(f"{self.path} has no train/test split; re-run `mediret ingest`")

    def split_keys(self) -> list[SplitKey]:
        """What split assignment needs of every image, by id."""
        return [SplitKey(*row) for row in self.sql(
            "SELECT i.id, i.image_id, i.group_id, i.given_split, "
            "  (SELECT min(l.label) FROM labels l WHERE l.id = i.id) "
            "FROM images i ORDER BY i.id")]

    def field_names(self) -> list[str]:
        """What a ``FieldCondition`` may name: the images columns, then every metadata key."""
        keys = {r[0] for r in self.sql(
            "SELECT DISTINCT unnest(json_keys(meta)) FROM images WHERE meta IS NOT NULL")}
        return [*FIELD_COLUMNS, *sorted(keys - set(FIELD_COLUMNS))]

    def select_ids(self, filters: Filters) -> np.ndarray | None:
        """Sorted ids of the images passing ``filters``; None when there are no filters.

        Unknown labels, splits, groups, fields and operators raise SearchError naming the
        valid ones; a failing ``where`` names the columns it may use.
        """
        import duckdb

        if filters.is_empty():
            return None
        conditions, params = [], []
        if filters.labels:
            known = self.labels_in_use()
            unknown = [label for label in filters.labels if label not in known]
            if unknown:
                raise SearchError(f"unknown label(s) {', '.join(unknown)}; the store has: "
                                  f"{', '.join(sorted(known))}")
            conditions.append("id IN (SELECT id FROM labels WHERE label IN (SELECT unnest(?)))")
            params.append(list(filters.labels))
        if filters.split:
            scheme = filters.split_scheme or self.default_split_scheme()
            values = self.split_values(scheme)
            if not values:
                raise SearchError(f"split scheme '{scheme}' is not in {self.path}; it has: "
                                  f"{', '.join(self.split_schemes()) or 'none'}")
            if filters.split not in values:
                raise SearchError(f"split '{filters.split}' is not in scheme '{scheme}'; "
                                  f"it has: {', '.join(values)}")
            conditions.append("id IN (SELECT id FROM splits WHERE scheme = ? AND split = ?)")
            params.extend([scheme, filters.split])
        if filters.groups:
            known_groups = {r[0] for r in self.sql(
                "SELECT group_id FROM groups WHERE group_id IN (SELECT unnest(?))",
                [list(filters.groups)])}
            unknown = [g for g in filters.groups if g not in known_groups]
            if unknown:
                raise SearchError(f"no group {', '.join(unknown)} in {self.path}")
            conditions.append("group_id IN (SELECT unnest(?))")
            params.append(list(filters.groups))
        if filters.fields:
            names = self.field_names()
            for condition in filters.fields:
                if condition.field not in names:
                    raise SearchError(f"unknown field '{condition.field}'; the store has: {', '.join(names)}")
                if condition.operator not in OPERATORS:
                    raise SearchError(f"unknown operator '{condition.operator}'; use one of "
                                      f"{', '.join(OPERATORS)}")
                sql, values = field_sql(condition)
                conditions.append(sql)
                params.extend(values)
        if filters.where:
            # In parentheses, so that the text is one expression and cannot end the statement.
            conditions.append(f"({filters.where})")
        query = f"SELECT id FROM images WHERE {' AND '.join(conditions)} ORDER BY id"
        try:
            return self._id_column(query, params)
        except duckdb.Error as exc:
            message = str(exc).splitlines()[0].rstrip(".!")
            raise SearchError(f"--where {filters.where!r} failed: {message}. It is an SQL condition "
                              f"over the images table, whose columns are {IMAGE_COLUMNS}") from exc

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

    # ---- reading: the store as a whole ---------------------------------------------

    def problems(self) -> list[RecordedProblem]:
        """Every input problem recorded at ingest, by run, kind and path."""
        return [RecordedProblem(*row) for row in self.sql(
            "SELECT ingest_run, kind, path, reason FROM problems ORDER BY ingest_run, kind, path")]

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
            "vectors": len(self._vectors),
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
