#!/usr/bin/env python
"""Ingest throughput of two (or more) checkouts of mediret, in alternating fresh processes.

For a change whose gain is smaller than this machine's drift between runs: each
round runs every checkout once, in turn, each in its own process (its own code,
the same interpreter and data), and each process ingests the same seeded 1,000
HAM10000 images ``--passes`` times (library call, defaults) into fresh temporary
stores after a 64-image warm-up. The best pass of each process counts; the table
gives each checkout's best and median over rounds, and its ratio to the first.

    git worktree add ../mediret-before <commit>
    python scripts/ab_ingest.py ../mediret-before . --rounds 2 --json reports/bench/ab-ingest.json

A checkout needs ``../shared/data`` beside it, as this one does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="+", type=Path, help="repository roots; the first is the baseline")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--passes", type=int, default=3, help="timed ingests per process (best counts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(args) -> int:
    """Runs inside one checkout (its mediret first on sys.path): print one JSON line of img/s per pass."""
    root = args.checkouts[0].resolve()
    sys.path.insert(0, str(root))  # before anything imports mediret: the checkout's own package
    from mediret.encoders import load_encoder
    from mediret.ingest import ingest

    if Path(sys.modules["mediret"].__file__).resolve().parent != root / "mediret":
        raise SystemExit(f"imported {sys.modules['mediret'].__file__}, not {root}'s mediret")
    scan = _bench.ham_scan(args.images, seed=args.seed)  # this script's sample, the same for every checkout
    encoder = load_encoder(args.encoder, tune_allocator=True)
    with tempfile.TemporaryDirectory(prefix="ab-ingest-") as tmp:
        ingest(scan, Path(tmp) / "warm-up", encoder, progress=False, limit=64)
    rates, cpu = [], []
    for _ in range(args.passes):
        with tempfile.TemporaryDirectory(prefix="ab-ingest-") as tmp:
            started, started_cpu = time.perf_counter(), time.process_time()
            report = ingest(scan, Path(tmp) / "store", encoder, progress=False)
            rates.append(report.added / (time.perf_counter() - started))
            cpu.append(time.process_time() - started_cpu)
    print(json.dumps({"img_s": rates, "cpu_s": cpu}))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    info = _bench.print_header("A/B ingest throughput: checkouts in alternating processes")
    best: dict[str, list[float]] = {str(c): [] for c in args.checkouts}
    raw = []
    for round_ in range(args.rounds):
        for checkout in args.checkouts:
            command = [sys.executable, __file__, str(checkout), "--child", "--images", str(args.images),
                       "--encoder", args.encoder, "--passes", str(args.passes), "--seed", str(args.seed)]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True,
                                               cwd=checkout).stdout.strip().splitlines()[-1])
            best[str(checkout)].append(max(result["img_s"]))
            raw.append({"round": round_, "checkout": str(checkout), **result})
            print(f"  round {round_ + 1}, {checkout}: passes "
                  f"{', '.join(f'{r:.1f}' for r in result['img_s'])} img/s", flush=True)
    base = statistics.median(best[str(args.checkouts[0])])
    rows = [{"checkout": name, "best img/s": max(rates), "median of rounds": statistics.median(rates),
             "x first (medians)": statistics.median(rates) / base} for name, rates in best.items()]
    print()
    print(_bench.table(rows))
    _bench.write_json(args.json, {"benchmark": "ab-ingest", "command": _bench.command_line(), "machine": info,
                                  "args": {k: str(v) for k, v in vars(args).items()}, "results": rows,
                                  "raw": raw})
    return 0


if __name__ == "__main__":
    sys.exit(main())
