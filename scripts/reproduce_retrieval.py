"""Retrieval evaluation on the four real datasets, as a markdown table beside Mahbod et al. 2024.

Ingests each dataset from ../shared/data into indexes/<dataset>-<encoder> when
that store does not exist yet (resuming one that is incomplete), then runs
`evaluate-retrieval`: test-split queries against the train-split database,
MedMNIST with its given split and the others with the group-aware split.

    python scripts/reproduce_retrieval.py                      # efficientnet-lite0
    python scripts/reproduce_retrieval.py --encoder squeezenet1_1 \
        --weights ../shared/weights/squeezenet1_1/squeezenet1_1_imagenet_features.pth
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASETS = {  # name in ../shared/data -> split scheme used
    "medmnist": "given",
    "ham10000": "group",
    "odir": "group",
    "pad-ufes-20": "group",
}

# Mahbod et al. 2024 (arXiv 2409.09430), PneumoniaMNIST 28x28, their Table: mAP@5 and ACC@1 in %.
MAHBOD = [("ResNet50 (ImageNet)", 86.29, 82.85), ("BiomedCLIP", 88.26, 85.74)]


def ensure_store(dataset: str, encoder_name: str, weights: str | None, data: Path,
                 precision: str = "fp32") -> Path:
    from mediret.datasets import read_dataset
    from mediret.encoders import load_encoder
    from mediret.ingest import ingest
    from mediret.store import Store

    path = REPO / "indexes" / f"{dataset}-{encoder_name}"
    scan = read_dataset(data / dataset)
    if Store.exists(path):
        with Store.open(path) as store:
            complete = len(store) + sum(p.kind == "unreadable-image" for p in scan.problems) >= \
                len(scan.records) and store.split_schemes()
        if complete:
            return path
    encoder = load_encoder(encoder_name, weights=weights, precision=precision, tune_allocator=True)
    report = ingest(scan, path, encoder, progress=True)
    print(f"ingested {dataset}: {report.added} added in {report.seconds:.0f} s", file=sys.stderr)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--precision", choices=("fp32", "auto"), default="fp32",
                        help="encoder arithmetic for new stores (RESULTS.md was made in fp32; auto may "
                             "use bf16, see README)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--json", type=Path, default=None, help="Also write every number here.")
    args = parser.parse_args()

    from mediret.retrieval import evaluate_retrieval
    from mediret.store import Store

    rows, dumps = [], {}
    for dataset, scheme in DATASETS.items():
        path = ensure_store(dataset, args.encoder, args.weights, args.data, args.precision)
        with Store.open(path) as store:
            result = evaluate_retrieval(store, scheme=scheme, ks=(1, 3, 5, 10))
        m = {r.k: r for r in result.metrics.overall}
        dumps[dataset] = result.to_dict()
        rows.append(
            f"| {dataset} | {scheme} | {result.n_queries}/{result.n_database} "
            f"| {100 * m[5].map_retrieved:.2f} | {100 * m[5].map:.2f} | {100 * m[1].acc:.2f} "
            f"| {100 * m[3].acc:.2f} | {100 * m[5].acc:.2f} | {100 * m[5].majority_vote:.2f} "
            f"| {100 * m[10].precision_denner:.2f} / {100 * m[10].precision_denner_macro:.2f} |")
    print(f"Encoder: {args.encoder}; exact search, cosine similarity on L2-normalised vectors.\n")
    print("| dataset | split | queries/database | mAP@5 (Mahbod) | mAP@5 (min(k,R)) | ACC@1 "
          "| ACC@3 | ACC@5 | mMV@5 | P@10 Denner micro / macro |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nMahbod et al. 2024, PneumoniaMNIST 28x28 (their train split: 4,708 images; "
          "ours lacks 826 normal ones):\n")
    print("| model | mAP@5 | ACC@1 |\n|---|---|---|")
    for name, map5, acc1 in MAHBOD:
        print(f"| {name} | {map5:.2f} | {acc1:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(dumps, indent=2, default=str))


if __name__ == "__main__":
    main()
