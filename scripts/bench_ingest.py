#!/usr/bin/env python
"""Benchmark part 2: `mediret ingest` end to end against a naive loop and the bare encoder forward.

On the same real HAM10000 images (a seeded sample of the metadata rows, as a
DatasetScan limited to them), in one run:

- **ingest**: ``mediret.ingest.ingest`` with its defaults (batch 32, 2 decode
  workers) into a fresh temporary store, with the default (optimized) encoder;
- **naive** (in a fresh process, without mediret's allocator setting): for each image, PIL open, the
  transform its model's library applies (torchvision's / timm's PIL transforms: PIL resize,
  centre crop, to tensor, normalise; ``get_preset(..., resampler="pil")`` reproduces them
  exactly), the plain eager model (``optimize=False``) on that one image, ``add_with_ids``
  of its vector to a FAISS IndexIDMap2(IndexFlatIP), and one autocommitted DuckDB INSERT
  (the index file is written once at the end). For reference, the same loop with
  mediret's own per-image preprocessing (torch's resize) is timed beside it; until
  2026-12-03 11:30 UTC it was the goal's baseline;
- **bare forward**: the optimized encoder's ``embed_batch`` over the same images
  already decoded and preprocessed in memory, at ingest's batch size, in the
  memory layout ingest hands the model (channels-last where the encoder runs so).

With ``--decoded-bound``, each round also runs an ingest whose decoding is
free: every chunk of records is served from images decoded, resized and
hashed once before the rounds; the rest (normalisation, forward, store writes)
is ingest's own. Its ratio to the bare forward is what ingest reaches when
decoding costs nothing: the part of the gap that decoding is.

Goals: ingest >= 3x the naive loop, >= 0.9x the bare forward. The bare forward
and ingest run in rounds (one pass of each, back to back); the ratio is given
of their fastest passes and as the median of the rounds' own ratios, which the
VM's drift between rounds moves less. Then peak RSS of
an ingest of 1,000 images against one of all 8,013, each in its own child process:
within 1.2x. The peak is the child's ``VmHWM`` (its own address space's high-water
mark since exec). ``ru_maxrss`` (``os.wait4``, RUSAGE_CHILDREN) is printed too but
is not used: Linux carries the forking parent's RSS over into the child's
ru_maxrss at exec, so it reads this script's own RSS (~2 GB with the decoded
images held for the bare forward) for both sizes.

    python scripts/bench_ingest.py --json reports/bench/ingest.json
    python scripts/bench_ingest.py --quick
    python scripts/bench_ingest.py --rss-sizes '' --breakdown   # the speed part, plus where ingest's time goes
    python scripts/bench_ingest.py --rss-sizes '' --decoded-bound   # the speed part, plus ingest with free decoding
    python scripts/bench_ingest.py --rss-sizes 1000,8013 --keep-store indexes/bench-ham10000-efficientnet-lite0

``--keep-store`` keeps the largest RSS run's store (parts 3 and 4 use the full one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # noqa: E402

NAIVE_GOAL = 3.0
BARE_GOAL = 0.9
RSS_GOAL = 1.2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="HAM10000 images of the speed comparison")
    parser.add_argument("--naive-images", type=int, default=None,
                        help="run the naive loop on only the first N of them (default: all)")
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--weights", default=None, help="weights file (default: the encoder's own)")
    parser.add_argument("--batch-size", type=int, default=32, help="ingest's default")
    parser.add_argument("--workers", type=int, default=2, help="decode threads (ingest's default)")
    parser.add_argument("--repeat", type=int, default=6,
                        help="rounds of one bare-forward pass then one ingest pass; the fastest passes count, "
                             "and the median of the rounds' ratios is printed too (single rounds spread by "
                             "+-5 %% on a shared 2-core VM, so two rounds decide little)")
    parser.add_argument("--sweep-workers", default="",
                        help="also time ingest with each of these decode-thread counts (e.g. 0,1,2,3), "
                             "--repeat interleaved rounds, in this process")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time one more ingest by component (forward, normalisation, store, waiting "
                             "for decoding) between two bare-forward passes: where the ratio to the bare forward goes")
    parser.add_argument("--decoded-bound", action="store_true",
                        help="each round also times an ingest whose decoding is free (images decoded once "
                             "beforehand): how close ingest comes to the bare forward once decoding costs nothing")
    parser.add_argument("--preprocess-paths", action="store_true",
                        help="only time decode + preprocess alone, the previous path against the current one")
    parser.add_argument("--rss-sizes", default="1000,8013",
                        help="image counts of the peak-RSS ingests (each in a child process); '' skips")
    parser.add_argument("--keep-store", type=Path, default=None,
                        help="keep the largest RSS ingest's store here (must not exist; e.g. indexes/bench-...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="100 images, naive on 30, RSS at 100 and 300")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-store", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--naive-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.naive_images, args.repeat = 100, 30, 1
        if args.rss_sizes == "1000,8013":
            args.rss_sizes = "100,300"
    return args


def load(args, optimize: bool = True):
    from mediret.encoders import load_encoder

    return load_encoder(args.encoder, weights=args.weights, optimize=optimize, tune_allocator=True)


# ---- the three contenders ------------------------------------------------------------------


def opened_batches(records, batch_size: int, per_image):
    """For each batch of ``records``: [per_image(PIL image) for its images], files opened as ingest does."""
    from PIL import Image

    for i in range(0, len(records), batch_size):
        batch = []
        for record in records[i:i + batch_size]:
            with Image.open(record.source) as image:
                batch.append(per_image(image))
        yield batch


def decoded_batches(records, preprocess, batch_size: int):
    """For each batch of ``records``: ingest's prepared items (``.pixels`` resized), decoded inline
    by ingest's own code (``prepared_stream`` without threads: files read, hashed, decoded,
    resized per chunk)."""
    from mediret.ingest import _batches, prepared_stream

    return _batches(prepared_stream(records, preprocess, 0, {}, prefetch=0), batch_size)


def run_ingest(scan, encoder, args) -> tuple[float, dict]:
    from mediret.ingest import ingest

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        started = time.perf_counter()
        report = ingest(scan, Path(tmp) / "store", encoder, batch_size=args.batch_size,
                        workers=args.workers, progress=False)
        seconds = time.perf_counter() - started
    if report.added != len(scan.records):
        raise SystemExit(f"ingest added {report.added} of {len(scan.records)} images: {report.problems[:3]}")
    return seconds, {"added": report.added, "duplicates": report.duplicates, "problems": len(report.problems)}


def decoded_ahead(items):
    """A stand-in for ingest's ``_prepare_chunk`` serving each chunk from ``items``, decoded beforehand
    (``decoded_batches``: inline, in ingest's own chunks)."""
    from dataclasses import replace

    ready = {item.record.image_id: item for item in items}

    def prepare_chunk(records, preprocess, known_hashes):
        return [replace(ready[record.image_id]) for record in records]

    return prepare_chunk


def run_bare(batch, encoder, batch_size: int) -> float:
    """The encoder's own way with a stream of batches (``embed_stream``: ``forward_streams`` at once), as ingest."""
    started = time.perf_counter()
    for _ in encoder.embed_stream(batch[i:i + batch_size] for i in range(0, len(batch), batch_size)):
        pass
    return time.perf_counter() - started


def run_one_stream(batch, encoder, batch_size: int) -> float:
    """One batch at a time on all of torch's threads (``embed_batch``): mediret's forward before 2026-12-03."""
    started = time.perf_counter()
    for i in range(0, len(batch), batch_size):
        encoder.embed_batch(batch[i:i + batch_size])
    return time.perf_counter() - started


def run_naive(records, reference, transform) -> float:
    """One image at a time: open, ``transform``, forward, index add, one autocommitted INSERT."""
    import duckdb
    import faiss
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="bench-naive-") as tmp:
        started = time.perf_counter()
        con = duckdb.connect(str(Path(tmp) / "naive.duckdb"))
        con.execute("CREATE TABLE images (id BIGINT PRIMARY KEY, image_id TEXT, source TEXT, "
                    "label TEXT, group_id TEXT, meta JSON)")
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(reference.dim))
        for i, record in enumerate(records):
            with Image.open(record.source) as image:
                tensor = transform(image.convert("RGB"))
            vector = reference.embed_batch(tensor[None])
            index.add_with_ids(vector, np.array([i], dtype=np.int64))
            con.execute("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?)",
                        [i, record.image_id, record.source, record.labels[0], record.group,
                         json.dumps(record.meta)])
        faiss.write_index(index, str(Path(tmp) / "naive.faiss"))
        con.close()
        return time.perf_counter() - started


def speed(args) -> tuple[list[dict], list[dict], dict]:
    import torch

    scan = _bench.ham_scan(args.images, seed=args.seed)
    records = scan.records
    encoder = load(args)
    print(f"{len(records)} HAM10000 images; encoder {encoder.name} ({encoder.preprocess.name}); "
          f"batch {args.batch_size}, {args.workers} decode workers, torch threads {torch.get_num_threads()}\n",
          flush=True)
    for record in records:  # the files into the page cache, as for every timed pass after this one
        Path(record.source).read_bytes()
    # Not a contender: the bare forward's input, and the cost of decoding + preprocessing alone,
    # batch by batch as ingest does (one thread decoding; the normalisation uses torch's threads).
    # The batches are in the layout ingest hands the model (channels-last for most encoders),
    # so the bare forward pays no layout conversion either.
    started = time.perf_counter()
    batches, decoded = [], []
    for items in decoded_batches(records, encoder.preprocess, args.batch_size):
        batches.append(encoder.preprocess.normalise_batch([item.pixels for item in items], encoder.channels_last))
        if args.decoded_bound:
            decoded += items  # for the ingest with decoding free: the same images, decoded once
    decode_seconds = time.perf_counter() - started
    batch = torch.cat(batches).contiguous(memory_format=torch.channels_last if encoder.channels_last
                                          else torch.contiguous_format)
    del batches
    print(f"  decode + preprocess alone (1 decoding thread, no forward): {decode_seconds:.2f} s", flush=True)
    encoder.embed_batch(batch[: args.batch_size])  # warm-up: the bf16 check, if any
    run_bare(batch[: 4 * args.batch_size], encoder, args.batch_size)  # and the forward threads
    # The baselines run twice, before and after the mediret passes, and the faster pass counts.
    naive_records = records[: args.naive_images] if args.naive_images else records
    first_naive = naive_in_child(len(records), len(naive_records), args)
    times: dict[str, list[float]] = {"bare": [], "ingest": [], "free decoding": [], "one stream": []}
    prepare_decoded = decoded_ahead(decoded) if args.decoded_bound else None
    detail = {}
    for _ in range(args.repeat):
        times["one stream"].append(run_one_stream(batch, encoder, args.batch_size))
        print(f"  bare forward, one batch at a time on {torch.get_num_threads()} threads: "
              f"{times['one stream'][-1]:.2f} s", flush=True)
        times["bare"].append(run_bare(batch, encoder, args.batch_size))
        print(f"  bare forward ({encoder.forward_streams} streams): {times['bare'][-1]:.2f} s", flush=True)
        seconds, detail = run_ingest(scan, encoder, args)
        times["ingest"].append(seconds)
        print(f"  mediret ingest: {seconds:.2f} s", flush=True)
        if prepare_decoded is not None:
            with mock.patch("mediret.ingest._prepare_chunk", prepare_decoded):
                times["free decoding"].append(run_ingest(scan, encoder, args)[0])
            print(f"  mediret ingest, decoding free: {times['free decoding'][-1]:.2f} s", flush=True)
    breakdown_rows = breakdown(scan, encoder, batch, args) if args.breakdown else []
    del batch
    naive = [first_naive, naive_in_child(len(records), len(naive_records), args)]
    eager_one = min(n["eager_batch1_s"] for n in naive)
    naive_seconds = min(n["naive_s"] for n in naive)
    naive_mediret_seconds = min(n["naive_mediret_preprocess_s"] for n in naive)
    raw_naive = {"eager_batch1_s (both passes)": [n["eager_batch1_s"] for n in naive],
                 "naive_s (both passes)": [n["naive_s"] for n in naive],
                 "naive_mediret_preprocess_s (both passes)": [n["naive_mediret_preprocess_s"] for n in naive]}
    print(f"  eager model, batch 1, tensors in memory (child process): {eager_one:.2f} s", flush=True)
    print(f"  naive loop (child process): {naive_seconds:.2f} s for {len(naive_records)} images; with "
          f"mediret's per-image preprocessing {naive_mediret_seconds:.2f} s", flush=True)
    n = len(records)
    ingest_ips = n / _bench.best(times["ingest"])
    bare_ips = n / _bench.best(times["bare"])
    naive_ips = len(naive_records) / naive_seconds
    rows = [
        {"contender": "mediret ingest (optimized encoder, batch %d, %d workers)" % (args.batch_size,
                                                                                  args.workers),
         "images": n, "seconds": _bench.best(times["ingest"]), "img/s": ingest_ips, "ingest / this": 1.0},
        {"contender": "bare forward (optimized, preprocessed tensors in memory, batch %d, %d streams)"
                      % (args.batch_size, encoder.forward_streams),
         "images": n, "seconds": _bench.best(times["bare"]), "img/s": bare_ips, "ingest / this": ingest_ips / bare_ips},
        {"contender": "naive loop (library's PIL transforms, eager model, one image at a time, INSERT per image)",
         "images": len(naive_records), "seconds": naive_seconds, "img/s": naive_ips,
         "ingest / this": ingest_ips / naive_ips},
        {"contender": "(for reference) the naive loop with mediret's per-image preprocessing",
         "images": len(naive_records), "seconds": naive_mediret_seconds,
         "img/s": len(naive_records) / naive_mediret_seconds,
         "ingest / this": ingest_ips * naive_mediret_seconds / len(naive_records)},
        {"contender": "(for reference) eager model, batch 1, preprocessed tensors in memory",
         "images": n, "seconds": eager_one, "img/s": n / eager_one, "ingest / this": ingest_ips * eager_one / n},
        {"contender": "(for reference) bare forward, one batch at a time on %d threads (embed_batch)"
                      % torch.get_num_threads(),
         "images": n, "seconds": _bench.best(times["one stream"]), "img/s": n / _bench.best(times["one stream"]),
         "ingest / this": ingest_ips * _bench.best(times["one stream"]) / n},
        {"contender": "(for reference) decode + preprocess only, 1 decoding thread, no forward",
         "images": n, "seconds": decode_seconds, "img/s": n / decode_seconds, "ingest / this": None},
    ]
    # Each round times the bare forward and then ingest, back to back: their ratio within a round is
    # spared the VM's drift between rounds, which moves the ratio of the fastest passes.
    paired = [bare / ingest for bare, ingest in zip(times["bare"], times["ingest"])]
    goals = [_bench.goal_line("ingest vs naive loop", ingest_ips / naive_ips, NAIVE_GOAL),
             _bench.goal_line("ingest vs bare forward (fastest passes)", ingest_ips / bare_ips, BARE_GOAL),
             _bench.goal_line(f"ingest vs bare forward (median of {len(paired)} paired rounds)",
                              _bench.median(paired), BARE_GOAL)]
    paired_free = [bare / free for bare, free in zip(times["bare"], times["free decoding"])]
    if paired_free:
        free_s = _bench.best(times["free decoding"])
        rows.insert(1, {"contender": "(bound) mediret ingest with decoding free, images decoded beforehand",
                        "images": n, "seconds": free_s, "img/s": n / free_s, "ingest / this": free_s * ingest_ips / n})
        print(f"  ingest with decoding free vs bare forward: {_bench.median(paired_free):.3f}x (median of "
              f"{len(paired_free)} rounds), real ingest {_bench.median(paired):.3f}x in the same rounds", flush=True)
    raw = {"ingest_s": times["ingest"], "bare_s": times["bare"], "bare / ingest per round": paired,
           "one_stream_s": times["one stream"], "forward_streams": encoder.forward_streams,
           "free_decoding_s": times["free decoding"], "bare / free decoding per round": paired_free,
           "naive_s": naive_seconds, "naive_mediret_preprocess_s": naive_mediret_seconds,
           "decode_preprocess_s": decode_seconds, "eager_batch1_s": eager_one, "ingest_report": detail,
           "breakdown": breakdown_rows, **raw_naive}
    return rows, goals, raw


def breakdown(scan, encoder, batch, args) -> list[dict]:
    """One more ingest, its main thread's time split by component, between two bare-forward passes.

    The main thread's rows add up to the ingest's wall time: waiting for the
    forward passes (``embed_stream``), waiting for decoded images, and its own
    serial work (store writes, opening the store, split assignment, the rest).
    The forward passes and their normalisation run in the encoder's forward
    threads: their rows are thread-seconds, summed over those threads, and the
    forward's is compared with the bare forward's own thread-seconds (timed the
    same way in the pass before the ingest): what the decoding threads cost the
    forward passes. Decoding (``_prepare_chunk``) runs in the decoding threads,
    timed the same way. "CPU s" is the CPU time the thread spent in each part
    (``time.thread_time``), and for the whole passes the process's: wall time in
    a thread counts time it waited for a core, CPU time does not. Wrappers around
    the encoder's methods and the store's, for these passes only.
    """
    import threading
    from collections import Counter
    from contextlib import ExitStack

    import mediret.ingest as ingest_module
    from mediret.store import Store

    spent: Counter = Counter()
    cpu: Counter = Counter()
    lock = threading.Lock()  # the forward threads add up their time concurrently

    def timed(name, function):
        def wrapper(*args, **kwargs):
            started, started_cpu = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                with lock:
                    spent[name] += time.perf_counter() - started
                    cpu[name] += time.thread_time() - started_cpu
        return wrapper

    def with_process_cpu(run):
        """(``run()``'s result, the process's CPU time during it)."""
        before = os.times()
        result = run()
        after = os.times()
        return result, (after.user - before.user) + (after.system - before.system)

    def pop_part(name) -> tuple[float, float]:
        """(wall seconds, CPU seconds) of a timed part, taken out of the tallies."""
        return spent.pop(name), cpu.pop(name)

    def timed_generator(name, function):
        def wrapper(*args, **kwargs):
            items = function(*args, **kwargs)
            while True:
                started = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    spent[name] += time.perf_counter() - started
                yield item
        return wrapper

    forward_patches = ((encoder, "embed_batch", "forward"), (encoder, "embed_pixels", "embed_pixels"))
    with ExitStack() as patches:
        for owner, name, label in forward_patches:
            patches.enter_context(mock.patch.object(owner, name, timed(label, getattr(owner, name))))
        bare_before, bare_cpu = with_process_cpu(lambda: run_bare(batch, encoder, args.batch_size))
    bare_thread_seconds, bare_thread_cpu = pop_part("forward")
    spent.clear()
    cpu.clear()
    with ExitStack() as patches:  # every wrapper is removed again on leaving
        for owner, name, label in (*forward_patches, (ingest_module, "open_store_for", "opening the store"),
                                   (ingest_module, "assign_splits", "split assignment"),
                                   (Store, "add", "store writes (add)"), (Store, "commit", "commits"),
                                   (ingest_module, "_prepare_chunk", "decoding")):
            patches.enter_context(mock.patch.object(owner, name, timed(label, getattr(owner, name))))
        patches.enter_context(mock.patch.object(
            encoder, "embed_stream", timed_generator("waiting for the forward passes", encoder.embed_stream)))
        patches.enter_context(mock.patch.object(
            ingest_module, "_batches", timed_generator("waiting for decoded images", ingest_module._batches)))
        (seconds, _), ingest_cpu = with_process_cpu(lambda: run_ingest(scan, encoder, args))
    bare_after = run_bare(batch, encoder, args.batch_size)
    bare = min(bare_before, bare_after)
    forward, forward_cpu = pop_part("forward")
    embed_pixels, embed_pixels_cpu = pop_part("embed_pixels")  # normalising, then the forward pass
    threads = {"forward passes (thread-seconds in the forward threads)": (forward, forward_cpu),
               "normalising batches (thread-seconds in the forward threads)":
                   (embed_pixels - forward, embed_pixels_cpu - forward_cpu),
               "decoding: read, hash, decode, resize (thread-seconds)": pop_part("decoding")}
    spent["waiting for the forward passes"] -= spent["waiting for decoded images"]  # decoding is pulled inside it
    spent["other (main thread)"] = seconds - sum(spent.values())
    rows = [{"part of the ingest": "whole ingest", "seconds": seconds, "share": 1.0, "x bare forward": seconds / bare,
             "CPU s": ingest_cpu},
            {"part of the ingest": "bare forward, same images (faster of the passes before and after; CPU: before)",
             "seconds": bare, "share": None, "x bare forward": 1.0, "CPU s": bare_cpu}]
    rows += [{"part of the ingest": name, "seconds": value, "share": value / seconds, "x bare forward": None,
              "CPU s": cpu.get(name)} for name, value in spent.most_common()]
    rows += [{"part of the ingest": "bare forward's own forward passes (thread-seconds)",
              "seconds": bare_thread_seconds, "share": None, "x bare forward": 1.0, "CPU s": bare_thread_cpu}]
    rows += [{"part of the ingest": name, "seconds": value, "share": None,
              "x bare forward": value / bare_thread_seconds if name.startswith("forward") else None,
              "CPU s": value_cpu}
             for name, (value, value_cpu) in threads.items()]
    print(f"\none more ingest by component (bare forward {bare_before:.2f} s before it, {bare_after:.2f} s after):\n")
    print(_bench.table(rows))
    print(flush=True)
    return rows


def preprocess_paths(args) -> list[dict]:
    """Decode + preprocess alone (no forward), on one thread of decoding, two ways, interleaved rounds.

    before: PIL's resize, each image normalised on its own, the batch stacked, then
    copied into channels-last (mediret until 2026-12-02); now: ingest's own decoding
    (``prepared_stream`` inline, which also reads and hashes each file: plain RGB
    JPEGs decoded straight from their bytes since 2026-12-02 evening), torch's
    antialiased uint8 resize (one call per image size and decoding chunk, since
    2026-12-02 afternoon), the batch normalised once straight into channels-last.
    """
    import dataclasses

    import torch

    records = _bench.ham_scan(args.images, seed=args.seed).records
    now = load(args).preprocess
    before = dataclasses.replace(now, resampler="pil")

    def run_before():
        for tensors in opened_batches(records, args.batch_size, before):
            torch.stack(tensors).contiguous(memory_format=torch.channels_last)

    def run_now():
        for items in decoded_batches(records, now, args.batch_size):
            now.normalise_batch([item.pixels for item in items])

    best: dict[str, float] = {}
    for _ in range(max(args.repeat, 3)):
        for name, run in (("before", run_before), ("now", run_now)):
            started = time.perf_counter()
            run()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
    n = len(records)
    rows = [{"preprocessing": "before: PIL resize, per-image normalisation, stack, channels-last copy",
             "images": n, "seconds": best["before"], "img/s": n / best["before"], "x before": 1.0},
            {"preprocessing": "now: ingest's decoding, torch uint8 resize per size and chunk of 8, one normalisation per batch",
             "images": n, "seconds": best["now"], "img/s": n / best["now"], "x before": best["before"] / best["now"]}]
    print(f"\ndecode + preprocess alone, preset {now.name} ({now.interpolation}, shorter side {now.resize_size}), "
          f"best of {max(args.repeat, 3)} interleaved rounds:\n")
    print(_bench.table(rows))
    return rows


def sweep_workers(args) -> list[dict]:
    """Ingest img/s at each decode-thread count, interleaved rounds, the best round of each kept."""
    counts = [int(c) for c in args.sweep_workers.split(",") if c.strip()]
    scan = _bench.ham_scan(args.images, seed=args.seed)
    encoder = load(args)
    best: dict[int, float] = {}
    for _ in range(args.repeat):
        for count in counts:
            seconds, _ = run_ingest(scan, encoder, argparse.Namespace(**{**vars(args), "workers": count}))
            best[count] = max(best.get(count, 0.0), len(scan.records) / seconds)
    rows = [{"decode workers": count, "images": len(scan.records), "ingest img/s": best[count],
             "x inline (0 workers)": best[count] / best[counts[0]] if counts[0] == 0 else None}
            for count in counts]
    print("\ningest by decode-thread count:\n")
    print(_bench.table(rows))
    return rows


def naive_in_child(images: int, naive_images: int, args) -> dict:
    """The naive loop and the eager batch-1 forward, timed in a fresh process.

    A plain script would not have mediret's allocator setting (``mediret.encoders.tune_allocator``,
    process-wide once an optimized encoder is loaded here as ingest loads it), so the baselines run
    where it was never applied.
    """
    command = [sys.executable, __file__, "--naive-child", str(images), "--naive-images", str(naive_images),
               "--encoder", args.encoder, "--seed", str(args.seed)]
    if args.weights:
        command += ["--weights", args.weights]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def naive_child(args) -> int:
    import torch

    from mediret.preprocess import get_preset

    records = _bench.ham_scan(args.naive_child, seed=args.seed).records
    reference = load(args, optimize=False)
    batch = torch.stack([reference.preprocess.load(r.source) for r in records])
    reference.embed_batch(batch[:1])  # warm-up
    eager_one = run_bare(batch, reference, 1)
    del batch
    library = get_preset(reference.preprocess.name, reference.spec.input_size, resampler="pil")
    naive_seconds = run_naive(records[: args.naive_images], reference, library)
    mediret_preprocess = run_naive(records[: args.naive_images], reference, reference.preprocess)
    print(json.dumps({"eager_batch1_s": eager_one, "naive_s": naive_seconds,
                      "naive_mediret_preprocess_s": mediret_preprocess}))
    return 0


# ---- peak RSS ------------------------------------------------------------------------------


def child(args) -> int:
    """Ingest ``args.child`` images into ``args.child_store`` and print one JSON line."""
    from mediret.ingest import ingest

    scan = _bench.ham_scan(args.child, seed=args.seed)
    encoder = load(args)
    loaded_rss = _bench.rss_mib_now()
    loaded_peak = _bench.peak_rss_mib()
    started = time.perf_counter()
    report = ingest(scan, args.child_store, encoder, batch_size=args.batch_size, workers=args.workers,
                    progress=False)
    seconds = time.perf_counter() - started
    print(json.dumps({"images": len(scan.records), "added": report.added, "seconds": seconds,
                      "rss_after_load_mib": loaded_rss, "peak_after_load_mib": loaded_peak,
                      "rss_end_mib": _bench.rss_mib_now(), "vm_hwm_mib": _bench.vm_hwm_mib()}))
    return 0


def peak_rss(sizes: list[int], args) -> tuple[list[dict], list[dict]]:
    rows = []
    keep_size = max(sizes) if args.keep_store else None
    if args.keep_store is not None and args.keep_store.exists():
        raise SystemExit(f"--keep-store {args.keep_store} exists; remove it or choose another path")
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
            store = args.keep_store if size == keep_size else Path(tmp) / "store"
            command = [sys.executable, __file__, "--child", str(size), "--child-store", str(store),
                       "--encoder", args.encoder, "--batch-size", str(args.batch_size),
                       "--workers", str(args.workers), "--seed", str(args.seed)]
            if args.weights:
                command += ["--weights", args.weights]
            started = time.perf_counter()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            out = process.stdout.read()
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - started
            if process.returncode != 0:
                raise SystemExit(f"child ingest of {size} images failed ({process.returncode})")
            result = json.loads(out.strip().splitlines()[-1])
            row = {"images": result["images"], "ingest s": result["seconds"],
                   "img/s": result["added"] / result["seconds"],
                   "RSS after encoder load MiB": result["rss_after_load_mib"],
                   "peak RSS MiB (VmHWM)": result["vm_hwm_mib"],
                   "ru_maxrss MiB (wait4)": usage.ru_maxrss / 1024,
                   "child wall s": wall}
            rows.append(row)
            print(f"  ingest of {size} images in a child: {result['seconds']:.1f} s, peak RSS "
                  f"{row['peak RSS MiB (VmHWM)']:.0f} MiB (after encoder load {result['rss_after_load_mib']:.0f})",
                  flush=True)
    if args.keep_store:
        print(f"  kept the {keep_size}-image store at {args.keep_store}")
    small, large = rows[0], rows[-1]
    ratio = large["peak RSS MiB (VmHWM)"] / small["peak RSS MiB (VmHWM)"]
    goals = [_bench.goal_line(f"peak RSS {large['images']} vs {small['images']} images", ratio, RSS_GOAL,
                              higher=False)]
    return rows, goals


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child(args)
    if args.naive_child is not None:
        return naive_child(args)
    import torch  # noqa: F401  (so the header reports torch's threads)

    if args.preprocess_paths:
        info = _bench.print_header("Decode + preprocess: the previous path vs the current one")
        rows = preprocess_paths(args)
        _bench.write_json(args.json, {"benchmark": "ingest-preprocess-paths", "command": _bench.command_line(),
                                      "machine": info, "args": vars(args), "results": rows})
        return 0
    info = _bench.print_header("Ingest end to end: mediret ingest vs naive loop vs bare forward")
    rows, goals, raw = speed(args)
    print()
    print(_bench.table(rows))
    print()
    sweep_rows = sweep_workers(args) if args.sweep_workers else []
    rss_rows: list[dict] = []
    sizes = [int(s) for s in args.rss_sizes.split(",") if s.strip()]
    if sizes:
        print(f"\npeak RSS, ingest of {' and '.join(map(str, sizes))} images, each in a child process:", flush=True)
        rss_rows, rss_goals = peak_rss(sorted(sizes), args)
        goals += rss_goals
        print()
        print(_bench.table(rss_rows))
    end_load = _bench.machine()["loadavg"]
    print(f"\nload average at end: {' '.join(str(x) for x in end_load)}")
    _bench.write_json(args.json, {"benchmark": "ingest", "command": _bench.command_line(), "machine": info,
                                  "load_at_end": end_load, "args": vars(args), "results": rows,
                                  "raw": raw, "rss": rss_rows, "workers_sweep": sweep_rows, "goals": goals})
    return 0


if __name__ == "__main__":
    sys.exit(main())
