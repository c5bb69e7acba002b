"""Store: FAISS and DuckDB stay consistent, ids round-trip, crashes are repaired on open."""

from __future__ import annotations

import subprocess
import sys

import faiss
import numpy as np
import pytest

from mediret.errors import StoreError
from mediret.ingest import assign_splits
from mediret.records import ImageRecord
from mediret.splits import check_group_disjoint
from mediret.store import DB_FILE, EncoderInfo, Store
from mediret.store.vectors import write_index_atomic as _write_index_atomic

from .conftest import ALLOCATOR_PROBES, HAM, environ_without, read_csv, requires_data

pytestmark = requires_data

ENCODER = EncoderInfo(name="test-enc", dim=16, preprocess="imagenet", weights_source="random")


@pytest.fixture(scope="module")
def ham_rows():
    return read_csv(HAM / "HAM10000_metadata.csv")[:600]


def records_of(rows):
    return [ImageRecord(image_id=r["image_id"], source=f"{r['image_id']}.jpg", labels=(r["dx"],),
                        group=r["lesion_id"], meta={"sex": r["sex"], "age": r["age"]})
            for r in rows]


def unit_vectors(n, dim=16, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def filled_store(path, rows, vectors):
    store = Store.create(path, ENCODER)
    store.set_label_names(sorted({r["dx"] for r in rows}))
    store.set_info("multilabel", "false")
    store.add(records_of(rows), vectors)
    store.commit()
    assign_splits(store, seed=0, test_fraction=0.2)
    return store


def test_ids_round_trip_vectors_and_records(tmp_path, ham_rows):
    vectors = unit_vectors(len(ham_rows))
    with filled_store(tmp_path / "s", ham_rows, vectors):
        pass
    with Store.open(tmp_path / "s") as store:
        assert store.index.ntotal == len(store) == len(ham_rows)
        ids = store.ids()
        np.testing.assert_array_equal(store.vectors(ids), vectors)
        picked = [17, 3, 599]
        got = store.records(picked)
        assert [g.id for g in got] == picked
        assert [g.image_id for g in got] == [ham_rows[i]["image_id"] for i in picked]
        assert [g.labels for g in got] == [(ham_rows[i]["dx"],) for i in picked]
        assert got[0].meta == {"sex": ham_rows[17]["sex"], "age": ham_rows[17]["age"]}
        assert store.id_of(ham_rows[42]["image_id"]) == 42
    # the index file alone is a plain FAISS index holding the same vectors under the same ids
    plain = faiss.read_index(str(tmp_path / "s" / "test-enc.faiss"))
    np.testing.assert_array_equal(plain.reconstruct(599), vectors[599])


def test_labelled_matrix_matches_metadata(tmp_path, ham_rows):
    with filled_store(tmp_path / "s", ham_rows, unit_vectors(len(ham_rows))) as store:
        matrix = store.labelled_matrix("group")
        names = matrix.label_names
        assert [names[k] for k in matrix.y] == [r["dx"] for r in ham_rows]
        assert list(matrix.groups) == [r["lesion_id"] for r in ham_rows]
        assert check_group_disjoint(matrix.split, matrix.groups) == []
        assert 0.15 < np.mean(matrix.split == "test") < 0.25
        with pytest.raises(StoreError, match="split 'given' is not in"):
            store.labelled_matrix("given")


def test_random_split_is_stratified_and_seeded(tmp_path, ham_rows):
    with filled_store(tmp_path / "s", ham_rows, unit_vectors(len(ham_rows))) as store:
        first = store.labelled_matrix("random").split
        for k in range(len(store.label_names())):
            members = store.labelled_matrix("random").y == k
            assert abs(np.mean(first[members] == "test") - 0.2) <= 0.5 / members.sum() + 1e-9
        assign_splits(store, seed=0, test_fraction=0.2)
        np.testing.assert_array_equal(store.labelled_matrix("random").split, first)
        assign_splits(store, seed=1, test_fraction=0.2)
        assert (store.labelled_matrix("random").split != first).any()


def test_crash_between_index_write_and_db_commit_is_repaired(tmp_path, ham_rows):
    vectors = unit_vectors(len(ham_rows))
    store = filled_store(tmp_path / "s", ham_rows[:500], vectors[:500])
    # a commit that dies after the index file was replaced but before DuckDB committed
    store.add(records_of(ham_rows[500:]), vectors[500:])
    _write_index_atomic(store.index, tmp_path / "s" / store.index_file)
    store._pending_rows.clear()
    store._pending_labels.clear()
    store._con.close()
    assert faiss.read_index(str(tmp_path / "s" / "test-enc.faiss")).ntotal == 600
    with Store.open(tmp_path / "s", read_only=False) as reopened:
        assert reopened.index.ntotal == len(reopened) == 500
        np.testing.assert_array_equal(reopened.vectors(reopened.ids()), vectors[:500])
    assert faiss.read_index(str(tmp_path / "s" / "test-enc.faiss")).ntotal == 500


def test_index_missing_rows_vectors_is_an_error(tmp_path, ham_rows):
    with filled_store(tmp_path / "s", ham_rows, unit_vectors(len(ham_rows))) as store:
        index_file = tmp_path / "s" / store.index_file
    _write_index_atomic(faiss.IndexIDMap2(faiss.IndexFlatIP(16)), index_file)
    with pytest.raises(StoreError, match="600 image rows have no vector"):
        Store.open(tmp_path / "s")


def test_uncommitted_adds_are_not_durable(tmp_path, ham_rows):
    vectors = unit_vectors(len(ham_rows))
    store = filled_store(tmp_path / "s", ham_rows[:100], vectors[:100])
    with pytest.raises(RuntimeError):
        with store:
            store.add(records_of(ham_rows[100:200]), vectors[100:200])
            raise RuntimeError("crash inside the with block")
    with Store.open(tmp_path / "s") as reopened:
        assert len(reopened) == reopened.index.ntotal == 100


def test_wrong_dimension_and_missing_store_fail_clearly(tmp_path, ham_rows):
    with filled_store(tmp_path / "s", ham_rows[:10], unit_vectors(10)) as store:
        with pytest.raises(StoreError, match="do not fit this store"):
            store.add(records_of(ham_rows[10:12]), unit_vectors(2, dim=8))
    with pytest.raises(StoreError, match="no store at"):
        Store.open(tmp_path / "nothing-here")
    with pytest.raises(StoreError, match="already holds a store"):
        Store.create(tmp_path / "s", ENCODER)
    assert (tmp_path / "s" / DB_FILE).is_file()


def test_info_counts(tmp_path, ham_rows):
    with filled_store(tmp_path / "s", ham_rows, unit_vectors(len(ham_rows))) as store:
        info = store.info()
    expected: dict[str, int] = {}
    for r in ham_rows:
        expected[r["dx"]] = expected.get(r["dx"], 0) + 1
    assert info["labels"] == expected
    assert info["images"] == info["vectors"] == 600
    assert info["groups"] == len({r["lesion_id"] for r in ham_rows})
    assert sum(info["splits"]["random"].values()) == 600
    assert info["encoder"]["dim"] == 16


def _measured_in_fresh_process(script: str, path) -> str:
    """Run ``script`` with ``path`` in a fresh process, without the user's MALLOC_ settings; it prints
    whether keep_freed_memory applied and one measurement, which is returned (skip where not applied)."""
    env = environ_without("MALLOC_")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                         check=True, env=env)
    applied, measured = out.stdout.split()
    if applied != "True":
        pytest.skip("not glibc: mediret leaves the allocator alone")
    return measured


def test_store_leaves_the_encoders_kept_buffers_mapped(tmp_path):
    """DuckDB's worker threads, idle for half a second, would malloc_trim the heap and unmap the
    freed buffers mediret.encoders._allocator keeps for the encoder; a store runs DuckDB on one thread."""
    script = (
        "import resource, sys, time\n"
        "from mediret.encoders._allocator import keep_freed_memory\n"
        "from mediret.store import EncoderInfo, Store\n"
        "applied = keep_freed_memory()\n"
        "pins = []\n"
        "def churn():\n"
        "    buf = bytearray(64 << 20)\n"
        "    buf[::4096] = b'x' * len(buf[::4096])\n"
        "    pins.append(bytearray(1 << 20))  # after buf on the heap: buf's pages are freed, not the top\n"
        "store = Store.create(sys.argv[1], EncoderInfo('e', 4, 'imagenet', 'random'))\n"
        "store.sql('SELECT sum(i * i) FROM range(20000000) r(i)')  # work DuckDB spreads over its threads\n"
        "churn(); churn()\n"
        "time.sleep(1.5)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5):\n"
        "    churn()\n"
        "print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "store.close()\n"
    )
    faults = _measured_in_fresh_process(script, tmp_path / "s")
    buffer_pages, pin_pages = (64 << 20) // 4096, 5 * (1 << 20) // 4096
    assert int(faults) < pin_pages + buffer_pages // 4  # the 64 MiB buffer was not faulted in again


def test_opening_and_closing_stores_leaves_the_encoders_kept_buffers_mapped(tmp_path):
    """DuckDB trims the heap (malloc_trim) as it starts and ends a database instance; the process
    keeps one instance and attaches each store's file to it, so after the first store, creating,
    opening and closing stores hands none of the freed buffers mediret.encoders._allocator keeps for the
    encoder back to the OS: the resident size does not drop by a freed 64 MiB buffer."""
    script = (
        "import sys\n"
        "from mediret.encoders._allocator import keep_freed_memory\n"
        "from mediret.store import EncoderInfo, Store\n"
        "applied = keep_freed_memory()\n"
        "def resident_mib():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
        "Store.create(sys.argv[1] + '/first', EncoderInfo('e', 4, 'imagenet', 'random')).close()\n"
        "freed = bytearray(64 << 20)\n"
        "freed[::4096] = b'x' * len(freed[::4096])\n"
        "pin = bytearray(1 << 20)  # after it on the heap: its pages stay resident once freed\n"
        "del freed\n"
        "before = resident_mib()\n"
        "for i in range(3):\n"
        "    Store.create(sys.argv[1] + f'/s{i}', EncoderInfo('e', 4, 'imagenet', 'random')).close()\n"
        "    with Store.open(sys.argv[1] + f'/s{i}') as store:\n"
        "        store.info()\n"
        "print(applied, before - resident_mib())\n"
    )
    dropped_mib = _measured_in_fresh_process(script, tmp_path)
    assert float(dropped_mib) < 16  # a trim would hand back most of the freed 64 MiB


def _arenas_after_stores(path, tune_first: bool) -> int:
    """In a fresh process (``tune_allocator()`` first, or not): create a store, open it, and count
    glibc's arenas once a new thread has allocated (skip where the tuning cannot apply)."""
    script = ALLOCATOR_PROBES + (
        "import sys\n"
        "from mediret.encoders import tune_allocator\n"
        "from mediret.store import EncoderInfo, Store\n"
        "applied = tune_allocator() if sys.argv[2] == 'tune' else None\n"
        "Store.create(sys.argv[1], EncoderInfo('e', 4, 'imagenet', 'random')).close()\n"
        "with Store.open(sys.argv[1]) as store:\n"
        "    store.info()\n"
        "print(arenas(), tune_allocator() if applied is None else applied)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path), "tune" if tune_first else "leave"],
                         capture_output=True, text=True, check=True, env=environ_without("MALLOC_")).stdout.split()
    if out[1] != "True":
        pytest.skip("not glibc: mediret leaves the allocator alone")
    return int(out[0])


def test_a_store_opened_after_tune_allocator_keeps_every_thread_in_one_arena(tmp_path):
    """tune_allocator's arena limit holds for DuckDB's threads and any thread started later."""
    assert _arenas_after_stores(tmp_path / "s", tune_first=True) == 1


def test_opening_a_store_leaves_the_arena_limit_alone(tmp_path):
    """Opening a store changes no process-wide allocator setting: glibc still gives new threads
    arenas of their own (M_ARENA_MAX untouched)."""
    assert _arenas_after_stores(tmp_path / "s", tune_first=False) > 1


def _writable_elsewhere(path) -> bool:
    """Whether another process can open the store's database at ``path`` for writing (no lock held here)."""
    script = ("import sys, duckdb\n"
              "try:\n    duckdb.connect(sys.argv[1]).close()\nexcept duckdb.IOException:\n    print('locked')\n"
              "else:\n    print('free')\n")
    out = subprocess.run([sys.executable, "-c", script, str(path / DB_FILE)], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip() == "free"


def test_stores_of_one_file_share_it_and_release_it(tmp_path):
    """Two stores of one path in one process share its database, in one mode; the file is released
    once the last closes, once a store is garbage-collected unclosed, and after a failed open."""
    import gc

    path = tmp_path / "s"
    Store.create(path, ENCODER).close()
    with Store.open(path, read_only=False) as writer, Store.open(path, read_only=False) as second:
        writer.add(records_of([{"image_id": "a", "dx": "nv", "lesion_id": "l", "sex": "f", "age": "1"}]),
                   unit_vectors(1))
        writer.commit()
        assert second.sql("SELECT image_id FROM images") == [("a",)]
        with pytest.raises(StoreError, match="open for writing in this process already"):
            Store.open(path)  # read-only beside a writer, as DuckDB refuses too
        assert not _writable_elsewhere(path)
    assert _writable_elsewhere(path)
    forgotten = Store.open(path, read_only=False)
    assert not _writable_elsewhere(path)
    del forgotten
    gc.collect()
    assert _writable_elsewhere(path)
    (path / f"{ENCODER.name}.faiss").rename(path / "moved.faiss")
    with pytest.raises(StoreError, match="lacks its index file"):
        Store.open(path, read_only=False)
    assert _writable_elsewhere(path)


def test_a_snapshot_holds_no_lock_and_sees_writes_once_reopened(tmp_path, ham_rows):
    """A server's view: another process writes the store while a snapshot is open; the snapshot
    keeps what it saw, and a new snapshot sees the writer's committed rows and vectors."""
    vectors = unit_vectors(len(ham_rows))
    filled_store(tmp_path / "s", ham_rows[:200], vectors[:200]).close()
    snapshot = Store.open(tmp_path / "s", snapshot=True)
    assert _writable_elsewhere(tmp_path / "s")  # no lock held
    writer = (
        "import sys, numpy as np\n"
        "from mediret.records import ImageRecord\n"
        "from mediret.store import Store\n"
        "with Store.open(sys.argv[1], read_only=False) as store:\n"
        "    x = np.eye(16, dtype=np.float32)[:5]\n"
        "    store.add([ImageRecord(f'new{i}', f'new{i}.jpg', ('nv',)) for i in range(5)], x)\n"
        "    store.commit()\n"
    )
    subprocess.run([sys.executable, "-c", writer, str(tmp_path / "s")], check=True)
    assert len(snapshot) == snapshot.index.ntotal == 200
    with pytest.raises(StoreError, match="read-only"):
        snapshot.add(records_of(ham_rows[300:301]), vectors[300:301])
    snapshot.close()
    with Store.open(tmp_path / "s", snapshot=True) as again:
        assert len(again) == again.index.ntotal == 205
        np.testing.assert_array_equal(again.vectors([again.id_of("new3")]), np.eye(16, dtype=np.float32)[3:4])
        np.testing.assert_array_equal(again.vectors(again.ids()[:200]), vectors[:200])
