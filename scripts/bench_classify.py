#!/usr/bin/env python
"""Benchmark part 4: the paper's LR and SVM grid searches on the full HAM10000 store, wall time.

Timed with mediret.classify itself: ``load_data`` then ``fit_and_evaluate``,
whose ``fit_seconds`` is the wall time of the GridSearchCV fit (the paper's
4 C values x 5 folds, plus the refit on the whole training split; for SVM the
grid is C x {linear; rbf with gamma scale, auto}). Test scoring and bootstrap
intervals come after and are not timed. LR runs at ``--jobs 1`` (the CLI default)
and ``--jobs 2`` (both cores); SVM, whose grid is 3x larger, at ``--jobs 2``.

Baseline in the same run: the same grid written as plain scikit-learn,
``GridSearchCV(LogisticRegression(max_iter=1000), {"C": ...}, cv=StratifiedKFold(5))``
with default threading (BLAS free to use both cores, n_jobs=None).

    python scripts/bench_classify.py --json reports/bench/classify.json
    python scripts/bench_classify.py --quick          # LR only, 3 folds, 2 C values
    python scripts/bench_classify.py --store PATH     # another store

Goal: LR under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # noqa: E402

LR_GOAL_S = 60.0
DEFAULT_STORES = ("indexes/bench-ham10000-efficientnet-lite0", "indexes/ham10000-efficientnet-lite0")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=None,
                        help=f"store to classify (default: the first of {', '.join(DEFAULT_STORES)})")
    parser.add_argument("--kinds", default="lr,svm", help="comma-separated: lr,svm,linearsvc,knn")
    parser.add_argument("--jobs", default="1,2", help="comma-separated n_jobs values to time LR (and linearsvc, knn)")
    parser.add_argument("--svm-jobs", default="2", help="comma-separated n_jobs values to time SVM "
                        "(its 12-candidate grid is the slow one; both cores by default)")
    parser.add_argument("--split", default="random", help="random (the paper's) or group")
    parser.add_argument("--cv", type=int, default=5)
    parser.add_argument("--C", default="0.1,1,10,100", help="the paper's grid")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain scikit-learn baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="LR only, 3 folds, C in {1, 10}")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.kinds, args.cv, args.C, args.jobs = "lr", 3, "1,10", "1"
    return args


def find_store(path: Path | None) -> Path:
    if path is not None:
        return path
    for candidate in DEFAULT_STORES:
        if (_bench.ROOT / candidate / "mediret.duckdb").is_file():
            return _bench.ROOT / candidate
    raise SystemExit(f"no store at {' or '.join(DEFAULT_STORES)}; run scripts/bench_ingest.py "
                     f"--keep-store {DEFAULT_STORES[0]} or pass --store")


def baseline_lr(data, settings) -> tuple[float, dict]:
    """The grid as plain scikit-learn with default threading."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    search = GridSearchCV(LogisticRegression(max_iter=1000), {"C": list(settings.C)}, scoring="accuracy",
                          cv=StratifiedKFold(settings.cv, shuffle=True, random_state=settings.seed))
    started = time.perf_counter()
    search.fit(data.train.X, data.train.y)
    return time.perf_counter() - started, {"best_params": search.best_params_,
                                           "cv_accuracy": float(search.best_score_)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np  # noqa: F401
    import sklearn  # noqa: F401

    from mediret.classify import ClassifySettings, fit_and_evaluate, load_data
    from mediret.store import Store

    info = _bench.print_header("Classification: the paper's LR / SVM grid searches on the HAM10000 store")
    store_path = find_store(args.store)
    C = tuple(float(c) for c in args.C.split(","))
    base = ClassifySettings(split=args.split, cv=args.cv, C=C, seed=args.seed, n_bootstrap=0)
    with Store.open(store_path) as store:
        images, dim = len(store), store.encoder.dim
        data = load_data(store, base)
    print(f"store {store_path}: {images:,} images x {dim}; split '{args.split}': "
          f"{len(data.train):,} training images go through the grid search, {len(data.test):,} are scored; "
          f"{args.cv}-fold CV, C in {list(C)}\n", flush=True)
    rows = []
    lr_seconds = {}
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        for jobs in [int(j) for j in (args.svm_jobs if kind == "svm" else args.jobs).split(",")]:
            settings = ClassifySettings(split=args.split, cv=args.cv, C=C, seed=args.seed, n_bootstrap=0,
                                        jobs=jobs)
            started = time.perf_counter()
            result = fit_and_evaluate(kind, data, settings)
            wall = time.perf_counter() - started
            fits = len(result.cv_results) * args.cv + 1
            rows.append({"model": f"mediret {kind}", "n_jobs": jobs, "candidates": len(result.cv_results),
                         "fits": fits, "grid search s": result.fit_seconds,
                         "incl. test scoring s": wall, "best": result.best_params,
                         "cv accuracy": result.cv_accuracy, "converged": result.converged})
            if kind == "lr":
                lr_seconds[jobs] = result.fit_seconds
            print(f"  {kind} n_jobs={jobs}: grid search {result.fit_seconds:.1f} s "
                  f"({fits} fits), best {result.best_params}, CV accuracy {result.cv_accuracy:.4f}", flush=True)
    if not args.no_baseline and "lr" in args.kinds:
        seconds, detail = baseline_lr(data, base)
        rows.append({"model": "plain sklearn LR (default threads)", "n_jobs": None, "candidates": len(C),
                     "fits": len(C) * args.cv + 1, "grid search s": seconds, "incl. test scoring s": None,
                     "best": detail["best_params"], "cv accuracy": detail["cv_accuracy"], "converged": None})
        print(f"  baseline plain sklearn LR: {seconds:.1f} s, best {detail['best_params']}", flush=True)
    print()
    print(_bench.table(rows))
    print()
    goals = []
    if lr_seconds:
        fastest = min(lr_seconds.values())
        if not args.no_baseline and "lr" in args.kinds:
            print(f"RATIO plain sklearn LR / mediret LR (fastest n_jobs): {rows[-1]['grid search s'] / fastest:.2f}x")
        goals.append(_bench.goal_line("LR grid search wall time", fastest, LR_GOAL_S, unit=" s", higher=False))
    end_load = _bench.machine()["loadavg"]
    print(f"\nload average at end: {' '.join(str(x) for x in end_load)}")
    _bench.write_json(args.json, {"benchmark": "classify", "command": _bench.command_line(), "machine": info,
                                  "load_at_end": end_load, "args": vars(args), "store": str(store_path),
                                  "images": images, "train": len(data.train), "test": len(data.test),
                                  "results": rows, "goals": goals})
    return 0


if __name__ == "__main__":
    sys.exit(main())
