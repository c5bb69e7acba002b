"""Records -> decoded batches -> encoder -> store: streaming, resumable, with progress."""

from __future__ import annotations

import hashlib
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .encoders import tune_allocator
from .dicom import DicomError, DicomOptions
from .errors import StoreError
from .records import DatasetScan, ImageRecord, Problem
from .sources import decode_image
from .splits import group_split, random_split
from .store import EncoderInfo, Store


# At most this share of an ingest's time goes to commits (see commit_due).
COMMIT_TIME_SHARE = 0.05
# Images a decoding thread takes at a time: same-sized ones are resized in one call.
DECODE_CHUNK = 8


@dataclass
class IngestReport:
    """What one ingest did.

    ``problems`` lists every input that was not stored, with why, plus the
    duplicates (kind ``duplicate-content``) that were stored with a copied vector.
    """

    store: str
    dataset: str
    found: int
    added: int = 0
    already_stored: int = 0
    duplicates: int = 0
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    precision: str = ""  # the encoder's arithmetic, e.g. "fp32" or "bf16 (min cosine ...)"

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {
            "store": self.store, "dataset": self.dataset, "found": self.found,
            "added": self.added, "already_stored": self.already_stored,
            "duplicates": self.duplicates, "seconds": round(self.seconds, 2),
            "images_per_second": round(self.images_per_second, 1),
            "interrupted": self.interrupted, "precision": self.precision,
            "problems": [p.__dict__ for p in self.problems],
        }


@dataclass
class _Prepared:
    record: ImageRecord
    pixels: np.ndarray | None = None  # uint8 (S, S, 3), resized and cropped, when decoded
    content_hash: str | None = None
    size: tuple[int, int] | None = None
    problem: Problem | None = None


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def open_image(record: ImageRecord, data: bytes | None = None, dicom: DicomOptions | None = None):
    """The record's image as a PIL image (not yet decoded for files: preprocessing may draft;
    DICOM read with ``dicom``'s window and frame)."""
    from PIL import Image

    if record.pixels is not None:
        return Image.fromarray(record.pixels)
    if data is None:
        data = Path(record.source).read_bytes()
    return decode_image(data, record.source, dicom)


def _prepare(record: ImageRecord, decode: Callable, known_hashes: dict,
             decode_bytes: Callable | None = None, dicom: DicomOptions | None = None) -> _Prepared:
    """Read, hash and decode one record; failures become a Problem, never an exception.

    ``decode`` takes the opened PIL image; ``decode_bytes``, if given, is tried first on
    a file's bytes and returns (size, pixels), or None to open the file with PIL.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if record.pixels is not None:
            data = np.ascontiguousarray(record.pixels).tobytes()
        else:
            data = Path(record.source).read_bytes()
    except OSError as exc:
        return _Prepared(record, problem=Problem(record.source, f"cannot read: {exc}",
                                                 "unreadable-image"))
    if not data:
        return _Prepared(record, problem=Problem(record.source, "empty file (0 bytes)",
                                                 "unreadable-image"))
    digest = content_hash(data)
    if digest in known_hashes:
        return _Prepared(record, content_hash=digest)
    try:
        decoded = decode_bytes(data) if decode_bytes is not None and record.pixels is None else None
        if decoded is None:
            image = open_image(record, None if record.pixels is not None else data, dicom)
            decoded = image.size, decode(image)
        size, pixels = decoded
    except UnidentifiedImageError:
        reason = "not an image PIL can read"
    except Image.DecompressionBombError as exc:
        reason = f"image too large: {exc}"
    except DicomError as exc:  # says itself what is wrong: no pixels, no decoder, truncated, ...
        reason = f"DICOM: {exc}"
    except (OSError, SyntaxError, ValueError) as exc:
        reason = f"corrupt or truncated image: {exc}"
    else:
        return _Prepared(record, pixels=pixels, content_hash=digest, size=size)
    return _Prepared(record, content_hash=digest, problem=Problem(record.source, reason,
                                                                  "unreadable-image"))


def _prepare_chunk(records: list[ImageRecord], preprocess, known_hashes: dict,
                   dicom: DicomOptions | None = None) -> list[_Prepared]:
    """``_prepare`` each record, then resize and crop the decoded ones together.

    A preprocess with ``decode_for_pixels`` / ``finish_pixels`` (``mediret.preprocess``)
    runs its per-image half per record (straight from the file's bytes where its
    ``decode_bytes_for_pixels`` can) and its per-size batched half per chunk;
    one with only ``pixels`` runs that per record.
    """
    finish = getattr(preprocess, "finish_pixels", None)
    decode = preprocess.decode_for_pixels if finish is not None else preprocess.pixels
    decode_bytes = getattr(preprocess, "decode_bytes_for_pixels", None) if finish is not None else None
    prepared = [_prepare(record, decode, known_hashes, decode_bytes, dicom) for record in records]
    decoded = [item for item in prepared if item.pixels is not None]
    if finish is None or not decoded:
        return prepared
    try:
        finished = finish([item.pixels for item in decoded])
    except (ValueError, RuntimeError):  # find the image at fault: finish each on its own
        finished = []
        for item in decoded:
            try:
                finished.append(finish([item.pixels])[0])
            except (ValueError, RuntimeError) as exc:
                item.problem = Problem(item.record.source, f"cannot resize: {exc}", "unreadable-image")
                finished.append(None)
    for item, pixels in zip(decoded, finished):
        item.pixels = pixels
    return prepared


def prepared_stream(records: list[ImageRecord], preprocess, workers: int, known_hashes: dict,
                    prefetch: int, chunk: int = DECODE_CHUNK,
                    dicom: DicomOptions | None = None) -> Iterator[_Prepared]:
    """Decode records in ``workers`` threads, ``chunk`` at a time, in order, at most ``prefetch`` in flight.

    Each thread decodes a chunk's images (PIL), then resizes and crops them with one
    torch call per image size (``_prepare_chunk``); both release the GIL, so
    threads overlap them with the encoder's forward pass; normalisation runs once
    per batch (``_store_batch``). The bounded window keeps memory flat however
    large the dataset.
    """
    chunks = (records[i:i + chunk] for i in range(0, len(records), chunk))
    if workers <= 0:
        for part in chunks:
            yield from _prepare_chunk(part, preprocess, known_hashes, dicom)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mediret-decode") as pool:
        window: deque = deque()
        for part in chunks:
            window.append(pool.submit(_prepare_chunk, part, preprocess, known_hashes, dicom))
            if len(window) * chunk >= prefetch:
                yield from window.popleft().result()
        while window:
            yield from window.popleft().result()


def _batches(items: Iterator[_Prepared], size: int) -> Iterator[list[_Prepared]]:
    batch: list[_Prepared] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def commit_due(seconds_since_last: float, last_commit_seconds: float) -> bool:
    """Whether enough work has passed since the last commit for another one.

    A commit rewrites the whole index file (hundreds of MB at 100k+ images), so
    the time since the last commit must be at least 19x what that commit took:
    commits then take at most 5 % of an ingest, at any store size, instead of
    growing with the square of it. Small stores (commits of milliseconds) still
    commit every ``commit_every`` images.
    """
    return seconds_since_last >= last_commit_seconds * (1 / COMMIT_TIME_SHARE - 1)


def open_store_for(store_path: str | Path, encoder, scan: DatasetScan,
                   dicom: DicomOptions | None = None) -> Store:
    """Open (or create) the store at ``store_path`` for ``encoder`` and the DICOM reading
    options ``dicom`` (recorded, for queries to read DICOM alike), refusing a mismatch."""
    info = EncoderInfo(name=encoder.spec.name, dim=encoder.dim,
                       preprocess=encoder.preprocess.name, weights_source=encoder.weights_source)
    dicom = dicom or DicomOptions()
    if not Store.exists(store_path):
        store = Store.create(store_path, info)
        store.set_info("multilabel", "true" if scan.multilabel else "false")
        store.set_info("format", scan.name)
        for key, value in dicom.to_info().items():
            store.set_info(key, value)
        return store
    store = Store.open(store_path, read_only=False)
    held = store.encoder
    problems = []
    if (held.name, held.dim) != (info.name, info.dim):
        problems.append(f"it was built with encoder {held.name} (dim {held.dim}), "
                        f"not {info.name} (dim {info.dim})")
    elif held.preprocess != info.preprocess:
        problems.append(f"its vectors use preprocessing '{held.preprocess}', "
                        f"not '{info.preprocess}'")
    advice = "Choose another --store"
    if problems:  # the encoder's
        advice += (f", or ingest with the store's settings: --encoder {held.name} --preprocess "
                   f"{held.preprocess}, weights: {held.weights_source} (`mediret info --store "
                   f"{store_path}` shows them)")
    if store.get_info("format") not in (None, scan.name):
        problems.append(f"it holds a '{store.get_info('format')}' dataset, not '{scan.name}'")
    held_dicom = DicomOptions.from_info(store.get_info)
    if held_dicom != dicom:
        recorded, asked = held_dicom.to_info(), dicom.to_info()
        problems.append(f"its DICOM images were read with --window {recorded['dicom_window']} --frame "
                        f"{recorded['dicom_frame']}, not --window {asked['dicom_window']} --frame "
                        f"{asked['dicom_frame']}")
    if problems:
        store.close()
        raise StoreError(f"cannot ingest into {store_path}: {'; '.join(problems)}. {advice}.")
    return store


def assign_splits(store: Store, seed: int, test_fraction: float) -> None:
    """(Re)compute the random and group splits over every image in the store, plus 'given'."""
    keys = store.split_keys()
    if not keys:
        return
    ids = np.array([k.id for k in keys], dtype=np.int64)
    image_ids = [k.image_id for k in keys]
    strata = [k.first_label or "" for k in keys]
    store.set_splits("random", ids, random_split(image_ids, strata, test_fraction, seed))
    store.set_splits("group", ids, group_split(image_ids, strata, [k.group_id for k in keys],
                                               test_fraction, seed))
    if all(k.given_split is not None for k in keys):
        store.set_splits("given", ids, [k.given_split for k in keys])
    store.set_info("split_seed", str(seed))
    store.set_info("test_fraction", str(test_fraction))


def ingest(scan: DatasetScan, store_path: str | Path, encoder, *, batch_size: int = 32,
           workers: int = 2, seed: int = 0, test_fraction: float = 0.2,
           commit_every: int = 1024, progress: bool = True, limit: int | None = None,
           dicom: DicomOptions | None = None) -> IngestReport:
    """Embed the records of ``scan`` with ``encoder`` and add them to the store.

    Records whose ``image_id`` is already stored are skipped (resume, idempotence);
    an image whose bytes equal a stored one gets a copy of its vector without a
    forward pass. Work is committed every ``commit_every`` images, or less often
    once commits get slow (``commit_due``: at most 5 % of the time), so an
    interrupted ingest loses at most that much, or 19x one commit's time.
    ``limit`` ingests only the first N new records (for trials). ``workers``:
    decoding threads beside the forward pass (0: decode inline, between batches).
    Batches go through ``encoder.embed_stream`` (two at a time on the CPU): each
    is sorted into fresh images, copies and problems before its forward pass
    and stored, in order, after it. The allocator tuning (``mediret.encoders.tune_allocator``)
    is applied first, before the store's DuckDB starts threads, unless it already was
    (``load_encoder(..., tune_allocator=True)``, as ``mediret ingest`` loads) or is off.
    ``dicom``: how DICOM files are read (window,
    frame); recorded in the store, and a store that recorded others is refused.
    """
    from tqdm import tqdm

    tune_allocator()
    started = time.perf_counter()
    report = IngestReport(store=str(store_path), dataset=scan.name, found=len(scan.records),
                          problems=list(scan.problems))
    store = open_store_for(store_path, encoder, scan, dicom)
    try:
        store.set_label_names(scan.label_names)
        run = store.start_run(scan.root, scan.name, seed)
        stored = store.image_ids()
        todo, seen = [], set()
        for record in scan.records:
            if record.image_id in stored:
                report.already_stored += 1
            elif record.image_id in seen:
                report.problems.append(Problem(record.source, f"image id '{record.image_id}' "
                                               "appears twice in the dataset", "duplicate-id"))
            else:
                seen.add(record.image_id)
                todo.append(record)
        if limit is not None:
            todo = todo[:limit]
        known = store.hashes()
        stream = prepared_stream(todo, encoder.preprocess, workers, dict(known),
                                 prefetch=max(2 * batch_size, 4 * workers * DECODE_CHUNK), dicom=dicom)
        planned = _planned_batches(_batches(stream, batch_size), set(known))
        since_commit, last_commit_end, last_commit_seconds = 0, time.perf_counter(), 0.0
        bar = tqdm(total=len(todo), unit="img", desc=f"ingest {scan.name}", disable=not progress,
                   dynamic_ncols=True, smoothing=0.1)
        try:
            for plan, vectors in encoder.embed_stream(planned, lambda plan: [i.pixels for i in plan.fresh]):
                added = _store_batch(store, plan, vectors, known, scan.name, run, report)
                report.added += added
                since_commit += added
                bar.update(plan.size)
                if since_commit >= commit_every and commit_due(time.perf_counter() - last_commit_end,
                                                               last_commit_seconds):
                    commit_started = time.perf_counter()
                    store.commit()
                    last_commit_end = time.perf_counter()
                    last_commit_seconds = last_commit_end - commit_started
                    since_commit = 0
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            bar.close()
        store.commit()
        if not report.interrupted:
            assign_splits(store, seed, test_fraction)
        store.finish_run(run, report.added, report.already_stored, report.problems)
    finally:
        store.close()
    report.seconds = time.perf_counter() - started
    if report.added > report.duplicates:  # something went through the encoder
        report.precision = getattr(encoder, "precision", "")
    return report


@dataclass
class _Plan:
    """One batch of prepared items, sorted before its forward pass."""

    size: int
    fresh: list[_Prepared]  # to embed
    copies: list[_Prepared]  # same bytes as an image stored or embedded before: vector copied
    problems: list[Problem]


def _planned_batches(batches: Iterator[list[_Prepared]], hashes: set[str]) -> Iterator[_Plan]:
    """Sort each batch's items into fresh images, copies and problems.

    ``hashes`` holds the content hashes already stored; it gains each fresh
    image's as it is planned, so a copy of an image in a batch still in the
    encoder is a copy too: batches are stored in order, its original first.
    """
    for batch in batches:
        plan = _Plan(len(batch), [], [], [])
        for item in batch:
            if item.problem is not None:
                plan.problems.append(item.problem)
            elif item.content_hash in hashes:
                plan.copies.append(item)
            else:
                hashes.add(item.content_hash)
                plan.fresh.append(item)
        yield plan


def _store_batch(store: Store, plan: _Plan, vectors: np.ndarray, known: dict[str, tuple[int, str]],
                 dataset: str, run: int, report: IngestReport) -> int:
    """Add a batch's fresh images with their ``vectors``, and its copies with their originals' vectors."""
    fresh, copies = plan.fresh, plan.copies
    report.problems += plan.problems
    if fresh:
        ids = store.add([i.record for i in fresh], vectors, [i.content_hash for i in fresh],
                        [i.size for i in fresh], dataset=dataset, ingest_run=run)
        known.update((item.content_hash, (int(i), item.record.image_id))
                     for item, i in zip(fresh, ids))
    if copies:
        originals = [known[item.content_hash] for item in copies]
        vectors = store.vectors([first_id for first_id, _ in originals])
        store.add([i.record for i in copies], vectors, [i.content_hash for i in copies],
                  dataset=dataset, ingest_run=run)
        for item, (_, first) in zip(copies, originals):
            report.problems.append(Problem(item.record.source,
                                           f"same bytes as {first}: stored, vector copied",
                                           "duplicate-content"))
        report.duplicates += len(copies)
    return len(fresh) + len(copies)
