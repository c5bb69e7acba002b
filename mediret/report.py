"""Classification results for people: table rows, the paper's Table 2 beside ours, report files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .classify import ClassifyResult, ModelResult

PAPER = "McMillan & Khoiwal 2024 (arXiv 2412.09445), Table 2"


@dataclass(frozen=True)
class PaperAUC:
    """One AUC the paper reports for a dataset, with the embedding + classifier behind it."""

    model: str
    auc: float
    kind: str | None  # our classifier kind of the same family; None: not stated


# Keyed by the store's dataset format (``store.get_info('format')``).
PAPER_TABLE2: dict[str, tuple[PaperAUC, ...]] = {
    "ham10000": (PaperAUC("CLIP + LR", 0.9586, "lr"), PaperAUC("ResNet50 + SVM", 0.935, "svm")),
    "odir": (PaperAUC("CLIP + SVM", 0.8577, "svm"),),
    "pad-ufes-20": (PaperAUC("CLIP + LR", 0.9145, "lr"),),
    "cbis-ddsm": (PaperAUC("best reported", 0.5052, None),),
    "chexpert": (PaperAUC("best reported", 0.7490, None),),
}


def paper_aucs(dataset: str | None, kind: str | None = None) -> list[PaperAUC]:
    """The paper's AUCs for ``dataset``; with ``kind``, those of the same classifier family."""
    family = {"linearsvc": "svm"}.get(kind, kind)
    return [p for p in PAPER_TABLE2.get(dataset or "", ())
            if kind is None or p.kind in (family, None)]


def paper_text(dataset: str | None, kind: str | None = None) -> str:
    return "; ".join(f"{p.model} {p.auc:.4f}" for p in paper_aucs(dataset, kind)) or "-"


def encoder_note(result: ClassifyResult) -> str:
    return (f"The paper embeds with CLIP and ResNet50; this store uses {result.encoder['name']}, "
            "so a comparison is of the protocol and data, not of the same encoder.")


def result_document(result: ClassifyResult, include_roc: bool = False) -> dict[str, Any]:
    """The result as JSON-ready data, with the paper's numbers for the same dataset."""
    return {**result.to_dict(include_roc=include_roc),
            "paper": {"source": PAPER, "dataset": result.dataset,
                      "auc": [{"model": p.model, "auc": p.auc} for p in paper_aucs(result.dataset)],
                      "note": encoder_note(result)}}


def _ci(ci) -> str:
    return "" if ci is None else f"[{ci.low:.4f}, {ci.high:.4f}]"


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def header_lines(result: ClassifyResult) -> list[str]:
    """What was trained on what: store, encoder, split and its group overlap, CV, scores."""
    s = result.split
    enc = result.encoder
    lines = [
        f"store      {result.store} ({result.dataset or 'unknown format'}), "
        f"{len(result.class_names)} {'labels' if result.multilabel else 'classes'}",
        f"encoder    {enc['name']} (dim {enc['dim']}, preprocess {enc['preprocess']})",
        f"split      {s.scheme}: {s.n_train} training images; evaluated on {s.evaluated_on} "
        f"({s.n_test} images)",
        f"groups     {s.groups_train} in training, {s.groups_test} evaluated, "
        f"{s.groups_shared} on both sides ({s.test_images_in_shared_groups} evaluated images "
        f"share a group with training); "
        + ("group-disjoint, as the split claims (checked)" if s.claims_group_disjoint
           else "group-disjoint" if s.group_disjoint else "NOT group-disjoint"),
        f"cv         {s.cv}, scoring accuracy, refit on all training images",
        "scores     AUC from predict_proba (lr, knn) / decision_function (svm, linearsvc: "
        "uncalibrated, as the paper)",
    ]
    if s.duplicates_shared:
        lines.append(f"duplicates {s.duplicates_shared} evaluated images are byte-identical to a "
                     "training image")
    rare = {name: n for name, n in s.train_class_counts.items() if n < result.settings.cv}
    if rare:
        lines.append("rare       fewer training images than CV folds: "
                     + ", ".join(f"{name} {n}" for name, n in rare.items()))
    if s.classes_absent:
        lines.append(f"absent     classes without images, left out: {', '.join(s.classes_absent)}")
    return lines


def summary_rows(result: ClassifyResult) -> list[dict[str, Any]]:
    """One row per model: AUC and accuracy with their 95% CIs, the macro scores, best params."""
    rows = []
    for m in result.models:
        x = m.metrics
        rows.append({
            "model": m.kind, "AUC": _number(x.auc), "AUC 95% CI": _ci(x.auc_ci),
            "accuracy": _number(x.accuracy), "acc 95% CI": _ci(x.accuracy_ci),
            "bal. acc": _number(x.balanced_accuracy), "precision": _number(x.precision),
            "recall": _number(x.recall), "F1": _number(x.f1), "best": _params(m.best_params),
            "cv acc": _number(m.cv_accuracy), "fit s": f"{m.fit_seconds:.1f}",
            "converged": {None: "", True: "yes", False: "NO"}[m.converged],
        })
    return rows


def per_class_rows(model: ModelResult) -> list[dict[str, Any]]:
    return [{"class": c.name, "support": c.support, "AUC": _number(c.auc),
             "precision": _number(c.precision), "recall": _number(c.recall), "F1": _number(c.f1)}
            for c in model.metrics.per_class]


def confusion_rows(model: ModelResult) -> list[dict[str, Any]]:
    """Single-label: rows true class, columns predicted; multi-label: tn/fp/fn/tp per label."""
    m = model.metrics
    if m.multilabel:
        return [{"label": name, "tn": int(cm[0, 0]), "fp": int(cm[0, 1]), "fn": int(cm[1, 0]),
                 "tp": int(cm[1, 1])} for name, cm in zip(m.class_names, m.confusion_matrix)]
    return [{"true \\ predicted": name, **{p: int(v) for p, v in zip(m.class_names, row)}}
            for name, row in zip(m.class_names, m.confusion_matrix)]


def paper_rows(result: ClassifyResult) -> list[dict[str, Any]]:
    return [{"paper model": p.model, "paper AUC": f"{p.auc:.4f}"} for p in paper_aucs(result.dataset)]


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown_summary(result: ClassifyResult, roc_files: dict[str, str] | None = None) -> str:
    """The report's summary.md: setup, results beside the paper's AUC, per-class tables."""
    settings = result.settings
    out = [f"# Classification of {result.dataset or result.store}\n"]
    out += [f"- {line.split(None, 1)[0]}: {line.split(None, 1)[1]}" for line in header_lines(result)]
    out.append(f"- grid: C in {{{', '.join(f'{c:g}' for c in settings.C)}}}; kNN k in "
               f"{{{', '.join(map(str, settings.k))}}}, weights {', '.join(settings.knn_weights)}; "
               f"features {'standardised' if settings.standardize else 'raw'} for lr/svm/linearsvc")
    out.append(f"- 95% CIs: percentile bootstrap of the evaluated images, {settings.n_bootstrap} "
               f"resamples, seed {settings.seed}\n")
    out.append("## Results\n")
    rows = [{**{k: v for k, v in row.items() if k not in ("fit s", "converged")},
             "paper AUC": paper_text(result.dataset, row["model"])} for row in summary_rows(result)]
    out.append(_markdown_table(rows))
    out.append(f"Paper AUC: {PAPER}, same classifier family; all the paper reports for "
               f"{result.dataset}: {paper_text(result.dataset)}. {encoder_note(result)}\n")
    for model in result.models:
        out.append(f"## {model.kind}: {model.description}\n")
        out.append(f"Best {_params(model.best_params)} (CV accuracy {model.cv_accuracy:.4f}), "
                   f"fitted in {model.fit_seconds:.1f} s; scores from {model.score_source}.\n")
        out.append(_markdown_table(per_class_rows(model)))
        out.append("Confusion matrix:\n")
        out.append(_markdown_table(confusion_rows(model)))
        if roc_files and model.kind in roc_files:
            out.append(f"![ROC curves of {model.kind}]({roc_files[model.kind]})\n")
    return "\n".join(out)


def plot_roc(model: ModelResult, path: Path, title: str) -> None:
    """One PNG of the model's ROC curves, one per class (binary: the positive class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = model.metrics
    names = list(metrics.roc)
    if not metrics.multilabel and len(metrics.class_names) == 2:
        names = [n for n in names if n == metrics.class_names[1]]
    auc_of = {c.name: c.auc for c in metrics.per_class}
    fig, ax = plt.subplots(figsize=(6, 5.5))
    try:
        for name in names:
            curve = metrics.roc[name]
            ax.plot(curve.fpr, curve.tpr, lw=1.4, label=f"{name} (AUC {_number(auc_of[name], 3)})")
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate",
               ylabel="true positive rate", title=f"{title}: AUC {_number(metrics.auc, 4)}")
        ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def write_report(result: ClassifyResult, directory: str | Path) -> list[Path]:
    """Write result.json (every number, ROC points included), roc-<model>.png and summary.md."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    json_path = directory / "result.json"
    json_path.write_text(json.dumps(result_document(result, include_roc=True), indent=2, default=str))
    written.append(json_path)
    roc_files = {}
    for model in result.models:
        png = directory / f"roc-{model.kind}.png"
        plot_roc(model, png, f"{result.dataset or 'store'} {model.kind} ({result.split.scheme} split)")
        roc_files[model.kind] = png.name
        written.append(png)
    md_path = directory / "summary.md"
    md_path.write_text(markdown_summary(result, roc_files))
    written.append(md_path)
    return written
