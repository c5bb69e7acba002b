#!/usr/bin/env python
"""Reproduce Table 2 of McMillan & Khoiwal 2024 (arXiv 2412.09445) with an offline encoder.

For each dataset: ingest it from ../shared/data into indexes/<dataset>-<encoder>
(resumes; images already stored are skipped), then train and score LR, SVM and
kNN with the paper's protocol on the random (paper) and group-aware splits, and
print a markdown table with 95% bootstrap CIs beside the paper's AUC.

    python scripts/reproduce_paper.py --out RESULTS-table.md
    python scripts/reproduce_paper.py --limit 400 --clf lr,knn      # a quick check

With --limit N the stores are seeded subsets of about N images (whole groups)
under indexes/<dataset>-<encoder>-limit<N>, so full stores are never mixed with them.
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mediret.classify import ClassifySettings, classify  # noqa: E402
from mediret.report import PAPER, paper_text, write_report  # noqa: E402

DATASETS = {"ham10000": "ham10000", "odir": "odir", "pad-ufes-20": "pad-ufes-20"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="folder holding ham10000/, odir/, pad-ufes-20/ (default: %(default)s)")
    parser.add_argument("--indexes", type=Path, default=ROOT / "indexes", help="where stores go")
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--weights", default=None, help="encoder weights file (default: its own)")
    parser.add_argument("--precision", choices=("fp32", "auto"), default="fp32",
                        help="encoder arithmetic for new stores (RESULTS.md was made in fp32; auto may "
                             "use bf16, see README)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated")
    parser.add_argument("--clf", default="lr,svm,knn", help="comma-separated: lr,svm,linearsvc,knn")
    parser.add_argument("--splits", default="random,group", help="comma-separated")
    parser.add_argument("--limit", type=int, default=None, help="about N images per dataset")
    parser.add_argument("--cv", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1, help="parallel fits of each grid search")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--reports", type=Path, default=None,
                        help="write a full report (JSON, ROC PNGs, summary) per dataset and split here")
    return parser.parse_args(argv)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def subset(scan, limit: int, seed: int):
    """Whole groups of ``scan`` in seeded order until about ``limit`` images."""
    by_group: dict[str, list] = {}
    for record in scan.records:
        by_group.setdefault(record.group or record.image_id, []).append(record)
    keys = sorted(by_group)
    random.Random(seed).shuffle(keys)
    chosen = []
    for key in keys:
        if len(chosen) >= limit:
            break
        chosen.extend(by_group[key])
    return replace(scan, records=chosen)


def ensure_store(name: str, args) -> Path:
    """Ingest dataset ``name`` into its store (a no-op for images already stored)."""
    from mediret.datasets import read_dataset
    from mediret.encoders import load_encoder
    from mediret.ingest import ingest

    suffix = f"-limit{args.limit}" if args.limit else ""
    store = args.indexes / f"{name}-{args.encoder}{suffix}"
    scan = read_dataset(args.data / DATASETS[name], name)
    if args.limit:
        scan = subset(scan, args.limit, args.seed)
    encoder = load_encoder(args.encoder, weights=args.weights, precision=args.precision, tune_allocator=True)
    log(f"{name}: {len(scan.records)} images -> {store}")
    report = ingest(scan, store, encoder, seed=args.seed, progress=sys.stderr.isatty())
    log(f"{name}: {report.added} added, {report.already_stored} already stored, "
        f"{len(report.problems)} problems, {report.seconds:.0f} s")
    return store


def ci(value, interval) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f} [{interval.low:.3f}, {interval.high:.3f}]" if interval else f"{value:.4f}"


def table_rows(result) -> list[dict[str, str]]:
    s = result.split
    rows = []
    for m in result.models:
        x = m.metrics
        rows.append({
            "dataset": result.dataset, "split": s.scheme, "train / test": f"{s.n_train} / {s.n_test}",
            "test images sharing a group with train": str(s.test_images_in_shared_groups),
            "model": m.kind, "AUC (95% CI)": ci(x.auc, x.auc_ci),
            "accuracy (95% CI)": ci(x.accuracy, x.accuracy_ci),
            "bal. acc": "n/a" if x.balanced_accuracy is None else f"{x.balanced_accuracy:.4f}",
            "macro F1": f"{x.f1:.4f}",
            "best": ", ".join(f"{k}={v}" for k, v in m.best_params.items()),
            "fit s": f"{m.fit_seconds:.0f}",
            "paper AUC": paper_text(result.dataset, m.kind),
        })
    return rows


def markdown(rows: list[dict[str, str]], args, argv: list[str], seconds: float) -> str:
    columns = list(rows[0]) if rows else []
    lines = [
        f"# {PAPER}, reproduced with {args.encoder}",
        "",
        f"Command: `{shlex.join(['python', 'scripts/reproduce_paper.py', *argv])}`",
        "",
        f"Protocol: GridSearchCV over C in {{0.1, 1, 10, 100}} (svm: kernel linear, rbf with gamma "
        f"scale/auto; knn: k in {{5, 10, 20}} x uniform/distance votes), {args.cv}-fold CV on the "
        "training side (group-disjoint folds for the group split), refit, one evaluation on the "
        "test side. AUC: macro one-vs-rest, from predict_proba (lr, knn) or the SVM decision "
        f"function. 95% CIs: {args.bootstrap} bootstrap resamples of the test images (seed "
        f"{args.seed}). The paper used CLIP and ResNet50 embeddings; {args.encoder} here."
        + (f" Subsets of about {args.limit} images per dataset." if args.limit else ""),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(r[c] for c in columns) + " |" for r in rows),
        "",
        f"Total time {seconds / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    kinds = [k for k in args.clf.split(",") if k]
    rows = []
    for name in [d for d in args.datasets.split(",") if d]:
        if name not in DATASETS:
            sys.exit(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
        store = ensure_store(name, args)
        for split in [s for s in args.splits.split(",") if s]:
            settings = ClassifySettings(split=split, cv=args.cv, seed=args.seed, jobs=args.jobs,
                                        n_bootstrap=args.bootstrap)
            result = classify(store, kinds, settings,
                              progress=lambda line, n=name, s=split: log(f"{n} {s}: {line}"))
            if args.reports:
                write_report(result, args.reports / f"{name}-{split}")
            rows.extend(table_rows(result))
    text = markdown(rows, args, argv, time.perf_counter() - started)
    print(text)
    if args.out:
        args.out.write_text(text)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
