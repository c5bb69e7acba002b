"""The process's one DuckDB instance, and each store's database file attached to it.

DuckDB's worker threads, after half a second idle, call glibc's ``malloc_trim``,
which hands every freed heap page back to the OS, the activation buffers an
encoder keeps between batches included: the next forward pass page-faults them
in again (tens of thousands of faults after each commit of an ingest;
BENCHMARKS.md). The store's queries are small, so DuckDB runs them on the
calling thread alone (``DB_CONFIG``).

DuckDB also calls ``malloc_trim`` each time it starts a database instance and
closes one: a store opened or closed in a process whose encoder has run would
cost its next forward pass the same page faults. So the process keeps one
in-memory instance, started with the first store, and each open store's file is
attached to it under an alias. Nothing here changes process-wide state beyond
that instance: the allocator tuning belongs to the encoders.
"""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StoreError

DB_CONFIG = {"threads": 1}

_instance: Any = None
_attached: dict[str, "_Attachment"] = {}
_attach_lock = threading.RLock()  # a store collected (finalized) inside connect closes in the same thread
_aliases = itertools.count()


@dataclass
class _Attachment:
    alias: str
    read_only: bool
    users: int = 0


def connect(db_file: Path, read_only: bool, snapshot: bool = False) -> tuple[Any, str]:
    """A DuckDB connection whose default database is ``db_file``, and the key to release it with.

    A cursor of the process's one instance, the file attached to it under an
    alias; stores of the same file share the attachment, in the same mode (as
    DuckDB's own connections to one file must).

    snapshot: instead, an in-memory copy of the file's database, made while it was
    attached read-only for a moment: the file is not held (DuckDB lets one process
    write a file, or any number read it, not both), so another process may write it
    meanwhile. Each snapshot is its own copy.
    """
    import duckdb

    global _instance
    key = os.path.realpath(db_file)
    with _attach_lock:
        if _instance is None:
            _instance = duckdb.connect(":memory:", config=DB_CONFIG)
        if snapshot:
            return _snapshot(key)
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
        attachment.users += 1  # counted once the connection exists: disconnect releases exactly these
    return con, key


def _snapshot(key: str) -> tuple[Any, str]:
    alias, source = f"snapshot_{next(_aliases)}", f"source_{next(_aliases)}"
    quoted = "'" + key.replace("'", "''") + "'"
    _instance.execute(f"ATTACH {quoted} AS {source} (READ_ONLY)")
    try:
        _instance.execute(f"ATTACH ':memory:' AS {alias}")
        _instance.execute(f"COPY FROM DATABASE {source} TO {alias}")
    finally:
        _instance.execute(f"DETACH {source}")
    _attached[alias] = _Attachment(alias, read_only=True, users=1)
    con = _instance.cursor()
    con.execute(f"USE {alias}")
    return con, alias


def disconnect(con, key: str) -> None:
    """Close a ``connect`` connection; the last one of a file detaches it (DuckDB checkpoints it then)."""
    con.close()
    with _attach_lock:
        attachment = _attached[key]
        attachment.users -= 1
        if attachment.users == 0:
            del _attached[key]
            _instance.execute(f"DETACH {attachment.alias}")


def insert_columns(con, table: str, rows, types) -> None:
    """Insert many rows in one statement: each column travels as one list parameter.

    DuckDB's executemany runs one statement per row, about 100x slower.
    """
    if not rows:
        return
    columns = [list(col) for col in zip(*rows)]
    select = ", ".join(f"unnest(?::{t}[])" for t in types)
    con.execute(f"INSERT INTO {table} SELECT {select}", columns)
