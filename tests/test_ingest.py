"""Ingest on real data: counts, labels, consistency, resume after a kill, idempotence, bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mediret.cli import cli
from mediret.datasets import read_dataset
from mediret.errors import StoreError
from mediret.ingest import ingest
from mediret.splits import check_group_disjoint
from mediret.store import Store

from .conftest import (
    ALLOCATOR_PROBES,
    HAM,
    MEDMNIST,
    PAD,
    REFAULTED_PAGES_AT_DEFAULT,
    ThumbnailEncoder,
    environ_without,
    make_ham_subset,
    requires_data,
    torch_threads,
)

pytestmark = requires_data
REPO = Path(__file__).resolve().parents[1]


def test_real_encoder_store_matches_label_file_and_encoder(ham_store, ham_subset,
                                                           efficientnet_lite0):
    root, rows = ham_subset
    with Store.open(ham_store) as store:
        assert store.index.ntotal == len(store) == len(rows)
        stored = {r.image_id: r for r in store.records(store.ids())}
        assert {i: r.labels for i, r in stored.items()} == {r["image_id"]: (r["dx"],) for r in rows}
        assert {i: r.group_id for i, r in stored.items()} == {
            r["image_id"]: r["lesion_id"] for r in rows}
        assert store.info()["labels"] == dict(Counter(r["dx"] for r in rows))
        # vectors re-read from FAISS equal what the encoder produces for the same files
        sample = [rows[i]["image_id"] for i in (0, 5, len(rows) - 1)]
        ids = [store.id_of(image_id) for image_id in sample]
        reread = store.vectors(ids)
        sources = [r.source for r in store.records(ids)]
        matrix = store.labelled_matrix("group")
        assert check_group_disjoint(matrix.split, matrix.groups) == []
    import torch

    batch = torch.stack([efficientnet_lite0.preprocess(Image.open(s)) for s in sources])
    direct = efficientnet_lite0.embed_batch(batch)
    np.testing.assert_allclose(reread, direct, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(reread, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("workers, threads", [(0, 1), (2, 1), (2, 2)])
def test_vectors_equal_the_encoders_own_batches_bit_for_bit(tmp_path, workers, threads):
    """Ingest decodes in chunks of 8 (in threads, or inline) and resizes each chunk's images together:
    the same vectors, bit for bit, as the encoder's ``embed_stream`` over the same batches of
    each image's own ``pixels``. In fp32: with ``auto`` precision, an encoder on a CPU with native
    bf16 may switch to bf16 after its first batch, so ingest's batches and these would differ.
    With two torch threads, batches run in the encoder's two forward threads, one torch thread each."""
    from mediret.encoders import load_encoder

    efficientnet_lite0 = load_encoder("efficientnet-lite0", precision="fp32")
    with torch_threads(threads):
        _ingest_and_compare(tmp_path, efficientnet_lite0, workers)
    assert bool(efficientnet_lite0._streams) == (threads == 2)


def _ingest_and_compare(tmp_path, efficientnet_lite0, workers):
    root = tmp_path / "ham"
    make_ham_subset(root, n_lesions=14, seed=3)
    report = ingest(read_dataset(root), tmp_path / "store", efficientnet_lite0, batch_size=16,
                    workers=workers, progress=False)
    assert report.added > 16 and report.added % 16 and not report.duplicates  # a short last batch too
    with Store.open(tmp_path / "store") as store:
        ids = store.ids()
        stored = store.vectors(ids)
        sources = [r.source for r in store.records(ids)]
    batches = []
    for start in range(0, len(sources), 16):
        pixels = []
        for source in sources[start:start + 16]:
            with Image.open(source) as image:
                pixels.append(efficientnet_lite0.preprocess.pixels(image))
        batches.append(pixels)
    expected = [vectors for _, vectors in efficientnet_lite0.embed_stream(batches)]
    np.testing.assert_array_equal(stored, np.concatenate(expected))


def test_second_ingest_adds_nothing(tmp_path, ham_store, ham_subset, efficientnet_lite0):
    copy = tmp_path / "store"
    shutil.copytree(ham_store, copy)
    before = faiss.read_index(str(copy / "efficientnet-lite0.faiss")).ntotal
    report = ingest(read_dataset(ham_subset[0]), copy, efficientnet_lite0, progress=False)
    assert report.added == 0 and report.already_stored == len(ham_subset[1]) == before
    assert report.precision == ""  # nothing went through the encoder, so nothing to report
    with Store.open(copy) as store:
        assert len(store) == store.index.ntotal == before


def test_other_encoder_is_refused(tmp_path, ham_store, ham_subset):
    copy = tmp_path / "store"
    shutil.copytree(ham_store, copy)
    with pytest.raises(StoreError, match="built with encoder efficientnet-lite0.*store's settings: "
                                         "--encoder efficientnet-lite0 --preprocess efficientnet-lite"):
        ingest(read_dataset(ham_subset[0]), copy, ThumbnailEncoder(), progress=False)


def test_other_dataset_is_refused_without_encoder_advice(tmp_path, ham_store, efficientnet_lite0):
    copy = tmp_path / "store"
    shutil.copytree(ham_store, copy)
    with pytest.raises(StoreError, match="holds a 'ham10000' dataset, not 'pad-ufes-20'") as refused:
        ingest(read_dataset(PAD), copy, efficientnet_lite0, progress=False)
    assert "--encoder" not in str(refused.value)  # the encoder matches: only the store is wrong
    with Store.open(copy) as store:
        assert store.get_info("format") == "ham10000"


@pytest.mark.slow
def test_killed_ingest_resumes_to_the_same_store(tmp_path, ham_store, ham_subset,
                                                 efficientnet_lite0):
    store_path = tmp_path / "store"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mediret.cli", "ingest", str(ham_subset[0]), "--store",
         str(store_path), "--commit-every", "16", "--batch-size", "8", "--quiet"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    index_file = store_path / "efficientnet-lite0.faiss"
    deadline = time.time() + 240
    stored_at_kill = 0
    while time.time() < deadline and proc.poll() is None:
        if index_file.is_file():
            stored_at_kill = faiss.read_index(str(index_file)).ntotal
            if stored_at_kill >= 16:
                break
        time.sleep(0.05)
    # The first commit wrote the index file; its DuckDB rows follow within milliseconds.
    # Commits after it are spaced out (commit_due), so whether a later one is under way
    # when the kill lands depends on the machine: the store must be consistent either way.
    time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n = len(ham_subset[1])
    assert 16 <= stored_at_kill < n
    with Store.open(store_path) as partial:
        kept = len(partial)
        assert 16 <= kept == partial.index.ntotal < n
    report = ingest(read_dataset(ham_subset[0]), store_path, efficientnet_lite0, progress=False)
    assert (report.already_stored, report.added) == (kept, n - kept)
    assert report.precision == efficientnet_lite0.precision and report.precision.startswith("fp32")
    with Store.open(store_path) as resumed, Store.open(ham_store) as whole:
        assert len(resumed) == resumed.index.ntotal == n
        order = sorted(whole.image_ids())
        a = resumed.vectors([resumed.id_of(i) for i in order])
        b = whole.vectors([whole.id_of(i) for i in order])
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert resumed.labelled_matrix("group").split.tolist() == \
            whole.labelled_matrix("group").split.tolist()


def test_slow_commits_are_spaced_out(tmp_path, ham_subset, monkeypatch):
    """Each commit rewrites the index file; when that is slow, commits wait (at most 5 % of the time)."""
    calls = []
    real_commit = Store.commit

    def slow_commit(self):
        calls.append(time.perf_counter())
        time.sleep(0.5)  # as an index file of a few hundred MB would take
        real_commit(self)

    monkeypatch.setattr(Store, "commit", slow_commit)
    scan = read_dataset(ham_subset[0])
    report = ingest(scan, tmp_path / "store", ThumbnailEncoder(), batch_size=8, commit_every=8,
                    workers=0, progress=False)
    assert report.added == len(scan.records) >= 100
    seconds = time.perf_counter() - calls[0]
    # every 8 images would be 13+ commits; spaced out, they take at most 5 % of the time after the first
    assert len(calls) - 1 <= 1 + 0.05 * seconds / 0.5
    with Store.open(tmp_path / "store") as store:
        assert len(store) == store.index.ntotal == report.added


def test_commit_due_keeps_commits_under_five_percent():
    from mediret.ingest import commit_due

    assert commit_due(0.0, 0.0)  # fast commits: every commit_every images
    assert not commit_due(18.9, 1.0) and commit_due(19.0, 1.0)  # 1 s commit: 19 s of work between


@pytest.fixture
def damaged_ham(tmp_path):
    """A real HAM10000 subset with one instance of every kind of bad input."""
    root = tmp_path / "ham"
    rows = make_ham_subset(root, n_lesions=20, seed=3)
    part = root / "HAM10000_images_part_1"
    images = sorted(part.glob("*.jpg")) + sorted((root / "HAM10000_images_part_2").glob("*.jpg"))
    zero, truncated, text, missing = images[:4]
    zero.write_bytes(b"")
    truncated.write_bytes(truncated.read_bytes()[:1500])
    text.write_text("this is not an image\n")
    missing.unlink()
    shutil.copy(images[4], part / "ISIC_9999999.jpg")  # an image with no label row
    return root, rows, {"zero": zero, "truncated": truncated, "text": text, "missing": missing,
                        "unlabelled": part / "ISIC_9999999.jpg"}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_input_is_reported_with_paths_and_the_rest_ingested(tmp_path, damaged_ham, workers):
    root, rows, bad = damaged_ham
    report = ingest(read_dataset(root), tmp_path / "store", ThumbnailEncoder(), progress=False,
                    workers=workers)
    by_path = {p.path: p for p in report.problems}
    assert by_path[str(bad["zero"])].kind == "unreadable-image"
    assert "0 bytes" in by_path[str(bad["zero"])].reason
    assert by_path[str(bad["truncated"])].kind == "unreadable-image"
    assert by_path[str(bad["text"])].kind == "unreadable-image"
    assert str(bad["missing"]) in by_path or any(
        bad["missing"].stem in p.path and p.kind == "missing-image" for p in report.problems)
    assert any(p.kind == "missing-label" and bad["unlabelled"].name in p.path
               for p in report.problems)
    assert report.added == len(rows) - 4
    with Store.open(tmp_path / "store") as store:
        assert len(store) == store.index.ntotal == len(rows) - 4
        recorded = store.sql("SELECT kind, count(*) FROM problems GROUP BY kind")
        assert dict(recorded)["unreadable-image"] == 3
        assert dict(recorded)["missing-label"] == 1
        assert dict(recorded)["missing-image"] == 1
        # decoded inline or in threads, each image gets its own vector, in order
        stored = store.records(store.ids())
        encoder = ThumbnailEncoder()
        expected = []
        for image in stored:
            with Image.open(image.source) as pil:
                expected.append(encoder.embed_batch(encoder.preprocess(pil)[None])[0])
        np.testing.assert_allclose(store.vectors([r.id for r in stored]), np.array(expected), atol=1e-6)


class _PortraitRefusingPreprocess:
    """The thumbnail preset split in ingest's two halves; the batched half refuses portrait images."""

    name = "thumbnail"

    def decode_for_pixels(self, image) -> np.ndarray:
        return np.array(image.convert("RGB"))

    def finish_pixels(self, decoded: list) -> list:
        if any(array.shape[0] > array.shape[1] for array in decoded):
            raise ValueError("portrait")
        return [np.array(Image.fromarray(array).resize((8, 8)), dtype=np.uint8) for array in decoded]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_its_chunk_cannot_resize_is_reported_and_the_chunk_kept(tmp_path, workers):
    root = tmp_path / "ham"
    rows = make_ham_subset(root, n_lesions=6, seed=11)
    images = sorted(root.glob("HAM10000_images_part_*/*.jpg"))
    portrait = images[2]
    with Image.open(portrait) as image:
        image.transpose(Image.Transpose.ROTATE_90).save(portrait, quality=95)
    encoder = ThumbnailEncoder()
    encoder.preprocess = _PortraitRefusingPreprocess()
    report = ingest(read_dataset(root), tmp_path / "store", encoder, progress=False, workers=workers)
    refused = [p for p in report.problems if p.kind == "unreadable-image"]
    assert [(p.path, p.reason) for p in refused] == [(str(portrait), "cannot resize: portrait")]
    assert report.added == len(rows) - 1
    with Store.open(tmp_path / "store") as store:
        assert len(store) == store.index.ntotal == len(rows) - 1
        stored = store.records(store.ids())
        expected = [ThumbnailEncoder().embed_batch(ThumbnailEncoder().preprocess(Image.open(r.source))[None])[0]
                    for r in stored]
        np.testing.assert_allclose(store.vectors([r.id for r in stored]), np.array(expected), atol=1e-6)


@pytest.mark.parametrize("batch_size", [32, 2])
def test_identical_bytes_are_stored_once_embedded(tmp_path, batch_size):
    """Once within a batch; and with batches of 2 embedded all ahead of storing (the encoder's
    stream runs ahead), so the copy is sorted while its original is still in the encoder."""
    root = tmp_path / "ham"
    rows = make_ham_subset(root, n_lesions=10, seed=5)
    first = next((root / "HAM10000_images_part_1").glob("*.jpg"), None) or next(
        (root / "HAM10000_images_part_2").glob("*.jpg"))
    shutil.copy(first, first.with_name("ISIC_9999998.jpg"))
    with open(root / "HAM10000_metadata.csv", "a") as fh:
        fh.write(f"HAM_9999998,ISIC_9999998,{rows[0]['dx']},histo,50.0,male,back\n")
    encoder = ThumbnailEncoder()
    encoder.lookahead = len(rows) + 1
    report = ingest(read_dataset(root), tmp_path / "store", encoder, batch_size=batch_size, progress=False)
    assert report.duplicates == 1 and report.added == len(rows) + 1
    assert encoder.images == len(rows)  # the copy never went through the encoder
    with Store.open(tmp_path / "store") as store:
        a, b = store.vectors([store.id_of(first.stem), store.id_of("ISIC_9999998")])
        np.testing.assert_array_equal(a, b)


def test_medmnist_keeps_given_splits(tmp_path):
    data = np.load(MEDMNIST)
    small = {}
    for split in ("train", "val", "test"):
        small[f"{split}_images"] = data[f"{split}_images"][:20]
        small[f"{split}_labels"] = data[f"{split}_labels"][:20]
    npz = tmp_path / "pneumoniamnist.npz"
    np.savez(npz, **small)
    report = ingest(read_dataset(npz), tmp_path / "store", ThumbnailEncoder(), progress=False)
    assert report.added == 60
    with Store.open(tmp_path / "store") as store:
        assert store.info()["splits"]["given"] == {"test": 20, "train": 20, "val": 20}
        matrix = store.labelled_matrix("given")
        expected = np.concatenate([small[f"{s}_labels"][:, 0] for s in ("train", "val", "test")])
        names = matrix.label_names
        got = [names[k] for k in matrix.y]
        assert Counter(got) == Counter({0: "normal", 1: "pneumonia"}[v] for v in expected)


def test_cli_ingest_and_info(tmp_path, monkeypatch, damaged_ham):
    root, rows, bad = damaged_ham
    monkeypatch.setattr("mediret.encoders.load_encoder", lambda *a, **k: ThumbnailEncoder())
    runner = CliRunner()
    result = runner.invoke(cli, ["ingest", str(root), "--store", str(tmp_path / "s"), "-q"])
    assert result.exit_code == 0, result.output
    assert f"{len(rows) - 4} added" in result.output
    assert str(bad["truncated"]) in result.output
    result = runner.invoke(cli, ["info", "--store", str(tmp_path / "s"), "--problems"])
    assert result.exit_code == 0, result.output
    assert f"images     {len(rows) - 4}" in result.output
    assert str(bad["zero"]) in result.output
    result = runner.invoke(cli, ["info", "--store", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "no store at" in result.output
    assert "Traceback" not in result.output


def test_cli_streams_sets_the_batches_run_at_once(tmp_path, monkeypatch, ham_subset):
    """--streams 1 runs the real encoder one batch at a time (no forward threads started);
    without it the encoder keeps its default of two."""
    from mediret.encoders import load_encoder

    encoders = []

    def load(*args, **kwargs):
        encoders.append(load_encoder("squeezenet1_1", weights="random", precision="fp32"))
        return encoders[-1]

    monkeypatch.setattr("mediret.encoders.load_encoder", load)
    runner = CliRunner()
    for options in (["--streams", "1"], []):
        result = runner.invoke(cli, ["ingest", str(ham_subset[0]), "--store", str(tmp_path / "s"),
                                     "-q", "--limit", "24", "-b", "8", *options])
        assert result.exit_code == 0, result.output
    one, default = encoders
    assert one.forward_streams == 1 and one._streams is None
    assert default.forward_streams == 2
    with Store.open(tmp_path / "s") as store:
        assert len(store) == 48
    with torch_threads():  # --threads sets the process's
        result = runner.invoke(cli, ["ingest", str(ham_subset[0]), "--store", str(tmp_path / "s"), "-q",
                                     "--limit", "8", "--threads", "2", "--streams", "3"])
    assert result.exit_code == 0, result.output
    assert "--streams 3 needs a torch thread per stream" in result.output
    assert encoders[-1]._streams is None  # inline, as the note says


def test_dicom_source_is_decoded(tmp_path):
    """A DICOM mammogram (here a real HAM image's grey levels in 16 bits) reads as an image."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from mediret.ingest import open_image
    from mediret.records import ImageRecord

    grey = np.asarray(Image.open(next(iter(sorted(
        (MEDMNIST.parent.parent / "ham10000" / "HAM10000_images_part_1").glob("*.jpg"))))).convert("L"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "a.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (grey.astype(np.uint16) * 200).tobytes()
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    image = open_image(ImageRecord("a", str(tmp_path / "a.dcm"), ("benign",)))
    assert image.mode == "L" and image.size == (grey.shape[1], grey.shape[0])
    expected = 255 - (grey - grey.min()) / (grey.max() - grey.min()) * 255  # MONOCHROME1 inverts
    assert np.abs(np.asarray(image, dtype=np.float32) - expected).max() <= 1
    (tmp_path / "b.dcm").write_bytes(b"DICM but not really")
    with pytest.raises(OSError):
        open_image(ImageRecord("b", str(tmp_path / "b.dcm"), ("benign",)))


@requires_data
@pytest.mark.slow
def test_ingest_applies_the_allocator_tuning_for_library_users(tmp_path):
    """A library user who loads the encoder without ``tune_allocator`` still gets ingest's tuning:
    in a fresh process, after ``ingest`` freed 64 MiB buffers stay mapped (glibc's default unmaps
    them: see test_load_encoder_leaves_the_allocator_alone_unless_asked)."""
    images = sorted((HAM / "HAM10000_images_part_1").glob("*.jpg"))[:8]
    for i, image in enumerate(images):
        folder = tmp_path / "dataset" / ("nv" if i % 2 else "mel")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / image.name)
    script = ALLOCATOR_PROBES + (
        "import sys\n"
        "from mediret.datasets import read_dataset\n"
        "from mediret.encoders import load_encoder, tune_allocator\n"
        "from mediret.ingest import ingest\n"
        "encoder = load_encoder('squeezenet1_1', weights='random', precision='fp32')\n"
        "report = ingest(read_dataset(sys.argv[1]), sys.argv[2], encoder, progress=False)\n"
        "print(report.added, refaulted_pages(), tune_allocator())\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "dataset"), str(tmp_path / "store")],
                         capture_output=True, text=True, check=True, env=environ_without("MALLOC_")).stdout.split()
    if out[2] != "True":
        pytest.skip("not glibc: mediret leaves the allocator alone")
    assert int(out[0]) == len(images)
    assert int(out[1]) < REFAULTED_PAGES_AT_DEFAULT // 20
