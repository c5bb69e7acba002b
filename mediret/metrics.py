"""Classification and retrieval metrics on plain numpy arrays, with bootstrap intervals.

Classification: :func:`classification_report` (AUC, accuracy, balanced accuracy,
macro precision/recall/F1, per-class table, confusion matrix, ROC points,
95% percentile-bootstrap intervals for AUC and accuracy).

Retrieval: the core functions take ``relevant`` (Q, K) bool, row ``q`` saying
which of query ``q``'s top-K database hits (in rank order) are relevant, and
``n_relevant`` (Q,) int, the number R_q of relevant items in the whole
database. :func:`relevance_from_labels` (single-label) and
:func:`relevance_from_label_sets` (multi-label: relevant = sharing at least one
label) build both from labels; :func:`retrieval_report` gathers everything per
k, overall and per class. :data:`RETRIEVAL_DEFINITIONS` states every formula.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from mediret.errors import ClassifyError, SearchError

CI_LEVEL = 0.95
# Bootstrap weights are built in chunks of about this many cells (resamples x rows)
# so that memory stays bounded for large test sets.
_BOOTSTRAP_CHUNK_CELLS = 2_000_000

CLASSIFICATION_DEFINITIONS: dict[str, str] = {
    "auc": (
        "ROC AUC (Mann-Whitney, ties count 1/2) of one score column against one class. "
        "Binary: the positive (second) column. Multiclass: macro one-vs-rest = mean over "
        "classes c of AUC(score[:, c], y == c), valid for probabilities and decision values "
        "alike; equals scikit-learn's roc_auc_score(multi_class='ovr', average='macro') on "
        "probabilities. Multi-label: mean of the per-label AUCs. Classes/labels whose true "
        "column holds a single class are left out and listed in auc_skipped."
    ),
    "accuracy": (
        "Single-label: fraction of samples whose argmax class is the true class. "
        "Multi-label: subset accuracy, fraction of samples with every label right."
    ),
    "hamming_accuracy": (
        "Multi-label only: fraction of (sample, label) pairs right = 1 - Hamming loss "
        "= mean of the per-label accuracies."
    ),
    "balanced_accuracy": "Single-label only: mean recall over the classes present in y_true.",
    "precision": "Macro precision: unweighted mean over all classes/labels; 0 where undefined.",
    "recall": "Macro recall: unweighted mean over all classes/labels; 0 where undefined.",
    "f1": (
        "Macro F1: unweighted mean over all classes/labels of 2TP/(2TP+FP+FN); "
        "0 where undefined."
    ),
    "prediction": (
        "Single-label: argmax of the scores (first column wins ties). "
        "Multi-label: score >= threshold (0.5 for probabilities, 0 for decision values)."
    ),
    "ci": (
        "95% percentile bootstrap: rows resampled with replacement (seeded); resamples in "
        "which the AUC is undefined (a class/label has a single class) are left out and "
        "n_used says how many were kept."
    ),
}

RETRIEVAL_DEFINITIONS: dict[str, str] = {
    "relevant": (
        "A hit is relevant when it has the query's label (multi-label: shares at least one "
        "label with the query); R_q = number of relevant items in the database."
    ),
    "precision": "P@k: mean over queries of (relevant hits in the top k) / k.",
    "map": (
        "mAP@k: mean over queries of AP@k = (1/min(k, R_q)) * sum_{i<=k} P@i * rel_i; "
        "0 when R_q = 0."
    ),
    "map_retrieved": (
        "mAP@k as computed by Mahbod et al. 2024: AP@k = (1/H) * sum_{i<=k} P@i * rel_i with "
        "H = relevant hits within the top k (0 when H = 0); never below map."
    ),
    "acc": (
        "ACC@k (Mahbod et al. 2024): fraction of queries with at least one relevant hit "
        "in the top k."
    ),
    "majority_vote": (
        "mMV@k: fraction of queries whose label is the majority label of the top k hits; "
        "single-label only. ties='first': the highest-ranked tied label is the vote; "
        "ties='any': correct if any tied label is the query's (Mahbod et al.'s code)."
    ),
    "precision_denner": (
        "P@k (Denner et al. 2024), micro: mean over queries of (relevant hits in the top n) / n "
        "with n = min(k, R_q); 0 when R_q = 0."
    ),
    "precision_denner_macro": (
        "P@k (Denner et al. 2024), macro: mean over query classes of the per-class mean of the "
        "same per-query value (multi-label: a query counts in every class it carries)."
    ),
}


# ---------------------------------------------------------------------------
# Result types


def _jsonable(value: Any) -> Any:
    """Turn numpy values, tuples and nested containers into JSON-ready Python values."""
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


class _Record:
    """Mixin: ``to_dict()`` over the dataclass fields, JSON-ready."""

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: _jsonable(getattr(self, f.name))
            for f in fields(self)  # type: ignore[arg-type]
        }


@dataclass(frozen=True)
class BootstrapCI(_Record):
    """Percentile bootstrap interval; ``n_used`` of ``n_requested`` resamples were defined."""

    low: float
    high: float
    n_used: int
    n_requested: int
    level: float = CI_LEVEL


@dataclass(frozen=True)
class ClassMetrics(_Record):
    """One row of the per-class (per-label) table.

    support: samples of this class in y_true (multi-label: samples carrying the label).
    auc: None when y_true holds a single class for this column.
    accuracy: per-label accuracy (multi-label only, else None).
    """

    name: str
    support: int
    precision: float
    recall: float
    f1: float
    auc: float | None
    accuracy: float | None = None


@dataclass(frozen=True, eq=False)
class RocCurve(_Record):
    """ROC points of one class, one per distinct score (thresholds descending)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


@dataclass(eq=False)
class ClassificationMetrics(_Record):
    """What :func:`classification_report` returns; see CLASSIFICATION_DEFINITIONS.

    confusion_matrix: single-label (C, C), rows true class, columns predicted;
        multi-label (L, 2, 2) per label [[tn, fp], [fn, tp]].
    auc_skipped: classes/labels left out of the AUC average (one class in y_true).
    threshold: the decision threshold (multi-label only, else None).
    roc: per-class ROC points for plotting; left out of ``to_dict()`` unless asked.
    """

    multilabel: bool
    class_names: list[str]
    n_samples: int
    auc: float | None
    auc_ci: BootstrapCI | None
    auc_skipped: list[str]
    accuracy: float
    accuracy_ci: BootstrapCI | None
    balanced_accuracy: float | None
    hamming_accuracy: float | None
    precision: float
    recall: float
    f1: float
    per_class: list[ClassMetrics]
    confusion_matrix: np.ndarray
    threshold: float | None
    seed: int
    roc: dict[str, RocCurve] = field(default_factory=dict, repr=False)
    definitions: dict[str, str] = field(
        default_factory=lambda: dict(CLASSIFICATION_DEFINITIONS), repr=False
    )

    def to_dict(self, include_roc: bool = False) -> dict[str, Any]:
        out = super().to_dict()
        if not include_roc:
            del out["roc"]
        return out


@dataclass(frozen=True)
class RetrievalAtK(_Record):
    """Retrieval metrics of one group of queries at one k (means over its queries).

    majority_vote: None for multi-label queries.
    precision_denner_macro: over all queries only; None in per-class rows.
    """

    k: int
    n_queries: int
    precision: float
    map: float
    map_retrieved: float
    acc: float
    majority_vote: float | None
    precision_denner: float
    precision_denner_macro: float | None = None


@dataclass
class RetrievalMetrics(_Record):
    """What :func:`retrieval_report` returns; see RETRIEVAL_DEFINITIONS.

    overall: one entry per k, in ``ks`` order.
    per_class: class name -> one entry per k (multi-label: queries carrying the label).
    n_queries_without_relevant: queries with R_q = 0 (scored 0 by map and precision_denner).
    """

    ks: list[int]
    n_queries: int
    multilabel: bool
    overall: list[RetrievalAtK]
    per_class: dict[str, list[RetrievalAtK]]
    n_queries_without_relevant: int
    ties: str
    definitions: dict[str, str] = field(
        default_factory=lambda: dict(RETRIEVAL_DEFINITIONS), repr=False
    )

    def at(self, k: int) -> RetrievalAtK:
        """The overall metrics at ``k``."""
        for entry in self.overall:
            if entry.k == k:
                return entry
        raise SearchError(f"k={k} was not evaluated; evaluated ks: {self.ks}")


# ---------------------------------------------------------------------------
# AUC via weighted Mann-Whitney


def _weighted_auc(score: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of ``score`` for each row of ``weights`` (B, N); NaN where undefined.

    A weight row holds how many times each sample occurs (a bootstrap resample,
    or all ones), so one sort of the original scores serves every resample:
    AUC = sum over positive/negative pairs of w_i w_j ([s_i > s_j] + [s_i = s_j] / 2),
    divided by (positive weight) x (negative weight).
    """
    order = np.argsort(score, kind="stable")
    sorted_score = score[order]
    tie_starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    w = weights[:, order]
    pos = positive[order]
    pos_by_value = np.add.reduceat(w * pos, tie_starts, axis=1)
    neg_by_value = np.add.reduceat(w * ~pos, tie_starts, axis=1)
    neg_below = np.cumsum(neg_by_value, axis=1) - neg_by_value
    wins = (pos_by_value * (neg_below + 0.5 * neg_by_value)).sum(axis=1)
    pairs = pos_by_value.sum(axis=1) * neg_by_value.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def _positives(y_true: np.ndarray, n_columns: int, multilabel: bool) -> np.ndarray:
    """(N, C) bool: which samples are positive for each column's one-vs-rest AUC."""
    if multilabel:
        return y_true.astype(bool)
    return y_true[:, None] == np.arange(n_columns)[None, :]


def _auc_columns(positives: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B, C) AUC of each column for each weight row; NaN where undefined."""
    return np.stack(
        [_weighted_auc(y_score[:, c], positives[:, c], weights) for c in range(y_score.shape[1])],
        axis=1,
    )


def auc_per_class(y_true: Any, y_score: Any, multilabel: bool = False) -> np.ndarray:
    """One-vs-rest ROC AUC of every score column, NaN where y_true has one class only.

    y_true: (N,) class indices, or (N, L) 0/1 when ``multilabel``.
    y_score: (N, C) probabilities or decision values.
    """
    y, scores = _check_classification_arrays(y_true, y_score, None, multilabel)
    positives = _positives(y, scores.shape[1], multilabel)
    return _auc_columns(positives, scores, np.ones((1, len(y))))[0]


def roc_curves(
    y_true: Any, y_score: Any, class_names: Sequence[str], multilabel: bool = False
) -> dict[str, RocCurve]:
    """ROC points (fpr, tpr) per class/label, for plotting; undefined classes are omitted.

    Points are the same as scikit-learn's ``roc_curve(..., drop_intermediate=False)``.
    """
    y, scores = _check_classification_arrays(y_true, y_score, class_names, multilabel)
    positives = _positives(y, scores.shape[1], multilabel)
    curves: dict[str, RocCurve] = {}
    for c, name in enumerate(class_names):
        pos = positives[:, c]
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        s = scores[order, c]
        last_of_value = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
        tps = np.cumsum(pos[order])[last_of_value]
        fps = (last_of_value + 1) - tps
        curves[str(name)] = RocCurve(
            fpr=np.r_[0.0, fps / n_neg],
            tpr=np.r_[0.0, tps / n_pos],
            thresholds=np.r_[np.inf, s[last_of_value]],
        )
    return curves


# ---------------------------------------------------------------------------
# Classification


def _check_classification_arrays(
    y_true: Any, y_score: Any, class_names: Sequence[str] | None, multilabel: bool
) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(y_score, dtype=float)
    if scores.ndim != 2:
        raise ClassifyError(
            f"y_score must be 2-D (samples, classes), got shape {scores.shape}; for a binary "
            "decision function d pass np.column_stack([-d, d])"
        )
    n, n_columns = scores.shape
    if n == 0:
        raise ClassifyError("no samples to evaluate: y_score has 0 rows")
    if not np.isfinite(scores).all():
        raise ClassifyError("y_score contains NaN or infinite values")
    if class_names is not None and len(class_names) != n_columns:
        raise ClassifyError(
            f"y_score has {n_columns} columns but {len(class_names)} class names were given"
        )
    y = np.asarray(y_true)
    if multilabel:
        if y.shape != scores.shape:
            raise ClassifyError(
                f"multi-label y_true must have the shape of y_score {scores.shape}, got {y.shape}"
            )
        if not np.isin(y, (0, 1)).all():
            raise ClassifyError("multi-label y_true must hold only 0 and 1")
        return y.astype(bool), scores
    if n_columns < 2:
        raise ClassifyError(f"single-label y_score needs at least 2 columns, got {n_columns}")
    if y.shape != (n,):
        raise ClassifyError(f"y_true must have shape ({n},) to match y_score, got {y.shape}")
    if y.dtype.kind not in "iub":
        if y.dtype.kind != "f" or not np.array_equal(y, np.round(y)):
            raise ClassifyError(
                f"y_true must hold integer class indices, got dtype {y.dtype}; map labels to "
                "indices into class_names first"
            )
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= n_columns:
        raise ClassifyError(
            f"y_true holds class index {int(y.min()) if y.min() < 0 else int(y.max())}, "
            f"outside 0..{n_columns - 1} (one per y_score column)"
        )
    return y, scores


def _bootstrap_weights(n: int, n_bootstrap: int, seed: int) -> Iterator[np.ndarray]:
    """Yield (b, n) float arrays of per-row counts, one row per resample, seeded."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_CELLS // n)
    done = 0
    while done < n_bootstrap:
        b = min(chunk, n_bootstrap - done)
        idx = rng.integers(0, n, size=(b, n))
        flat = (idx + (np.arange(b) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(float)
        done += b


def _interval(values: np.ndarray, n_requested: int) -> BootstrapCI | None:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    tail = (1 - CI_LEVEL) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return BootstrapCI(float(low), float(high), int(len(values)), int(n_requested))


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (scikit-learn's zero_division=0)."""
    return np.divide(num, den, out=np.zeros_like(num, dtype=float), where=den > 0)


def classification_report(
    y_true: Any,
    y_score: Any,
    class_names: Sequence[str],
    multilabel: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
) -> ClassificationMetrics:
    """Classification metrics of scores against true labels, with bootstrap intervals.

    y_true: (N,) class indices into ``class_names``; multi-label: (N, L) 0/1.
    y_score: (N, C) probabilities or decision values (binary: both columns, the
        second is the positive class; for a 1-D decision function d pass
        ``np.column_stack([-d, d])``).
    multilabel: predictions are ``y_score >= threshold``; pass ``threshold=0``
        for decision values. Single-label predictions are the argmax and ignore it.
    n_bootstrap: resamples for the 95% intervals of AUC and accuracy (0: none).
    """
    is_count = isinstance(n_bootstrap, (int, np.integer)) and not isinstance(n_bootstrap, bool)
    if not is_count or n_bootstrap < 0:
        raise ClassifyError(f"n_bootstrap must be a non-negative integer, got {n_bootstrap!r}")
    names = [str(name) for name in class_names]
    y, scores = _check_classification_arrays(y_true, y_score, names, multilabel)
    n, n_columns = scores.shape
    positives = _positives(y, n_columns, multilabel)

    class_auc = _auc_columns(positives, scores, np.ones((1, n)))[0]
    defined = np.isfinite(class_auc)
    # Binary single-label reports the positive column; everything else averages columns.
    auc_columns = np.array([1]) if (not multilabel and n_columns == 2) else np.flatnonzero(defined)
    auc_columns = auc_columns[defined[auc_columns]]
    auc = float(class_auc[auc_columns].mean()) if len(auc_columns) else None

    if multilabel:
        predicted = scores >= threshold
        correct = (predicted == y).all(axis=1)
        tp = (predicted & y).sum(axis=0)
        fp = (predicted & ~y).sum(axis=0)
        fn = (~predicted & y).sum(axis=0)
        support = y.sum(axis=0)
        label_accuracy = (predicted == y).mean(axis=0)
        tn = n - tp - fp - fn
        confusion = np.stack([np.stack([tn, fp], axis=1), np.stack([fn, tp], axis=1)], axis=1)
        balanced_accuracy = None
        hamming_accuracy = float(label_accuracy.mean())
    else:
        predicted = scores.argmax(axis=1)
        correct = predicted == y
        confusion = np.bincount(y * n_columns + predicted, minlength=n_columns**2).reshape(
            n_columns, n_columns
        )
        tp = np.diag(confusion)
        fp = confusion.sum(axis=0) - tp
        fn = confusion.sum(axis=1) - tp
        support = confusion.sum(axis=1)
        label_accuracy = None
        present = support > 0
        balanced_accuracy = float((tp[present] / support[present]).mean())
        hamming_accuracy = None

    precision = _safe_ratio(tp, tp + fp)
    recall = _safe_ratio(tp, tp + fn)
    f1 = _safe_ratio(2 * tp, 2 * tp + fp + fn)
    per_class = [
        ClassMetrics(
            name=name,
            support=int(support[c]),
            precision=float(precision[c]),
            recall=float(recall[c]),
            f1=float(f1[c]),
            auc=float(class_auc[c]) if defined[c] else None,
            accuracy=None if label_accuracy is None else float(label_accuracy[c]),
        )
        for c, name in enumerate(names)
    ]

    auc_ci = accuracy_ci = None
    if n_bootstrap > 0:
        boot_auc, boot_accuracy = [], []
        correct_f = correct.astype(float)
        for weights in _bootstrap_weights(n, n_bootstrap, seed):
            boot_accuracy.append(weights @ correct_f / n)
            if len(auc_columns):
                per_column = _auc_columns(
                    positives[:, auc_columns], scores[:, auc_columns], weights
                )
                # A resample missing a class of the point estimate is undefined, not
                # averaged over fewer classes: NaN propagates through the mean.
                boot_auc.append(per_column.mean(axis=1))
        accuracy_ci = _interval(np.concatenate(boot_accuracy), n_bootstrap)
        if boot_auc:
            auc_ci = _interval(np.concatenate(boot_auc), n_bootstrap)

    return ClassificationMetrics(
        multilabel=multilabel,
        class_names=names,
        n_samples=n,
        auc=auc,
        auc_ci=auc_ci,
        auc_skipped=[names[c] for c in np.flatnonzero(~defined)],
        accuracy=float(correct.mean()),
        accuracy_ci=accuracy_ci,
        balanced_accuracy=balanced_accuracy,
        hamming_accuracy=hamming_accuracy,
        precision=float(precision.mean()),
        recall=float(recall.mean()),
        f1=float(f1.mean()),
        per_class=per_class,
        confusion_matrix=confusion,
        threshold=float(threshold) if multilabel else None,
        seed=seed,
        roc=roc_curves(y, scores, names, multilabel),
    )


# ---------------------------------------------------------------------------
# Retrieval: relevance


def class_sizes(db_labels: Any) -> dict[Any, int]:
    """Number of database items per label, for ``db_class_sizes``."""
    return dict(Counter(np.asarray(db_labels).tolist()))


def _single_label_arrays(query_labels: Any, retrieved_labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """(Q,) query labels and (Q, K) retrieved labels as arrays, or a SearchError saying what is wrong."""
    queries = np.asarray(query_labels)
    retrieved = np.asarray(retrieved_labels)
    if queries.ndim != 1 or retrieved.ndim != 2 or len(retrieved) != len(queries):
        raise SearchError(
            f"query_labels must be (Q,) and retrieved_labels (Q, K); got {queries.shape} "
            f"and {retrieved.shape}"
        )
    return queries, retrieved


def relevance_from_labels(
    query_labels: Any, retrieved_labels: Any, db_class_sizes: Mapping[Any, int] | Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Single-label relevance: ``(relevant (Q, K) bool, n_relevant (Q,) int)``.

    query_labels: (Q,) labels; retrieved_labels: (Q, K) labels of each query's top-K
    database hits in rank order; db_class_sizes: label -> database count (a sequence
    is indexed by integer label). A label missing from it has R_q = 0.
    """
    queries, retrieved = _single_label_arrays(query_labels, retrieved_labels)
    sizes = (
        db_class_sizes if isinstance(db_class_sizes, Mapping) else dict(enumerate(db_class_sizes))
    )
    n_relevant = np.array([int(sizes.get(label, 0)) for label in queries.tolist()], dtype=np.int64)
    return retrieved == queries[:, None], n_relevant


def relevance_from_label_sets(
    query_labels: Any, retrieved_labels: Any, db_labels: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-label relevance (sharing at least one label): ``(relevant, n_relevant)``.

    query_labels: (Q, L) 0/1; retrieved_labels: (Q, K, L) 0/1 label rows of the hits
    (``db_labels[ids]``; drop FAISS's -1 padding first); db_labels: (N, L) 0/1, the
    whole database, used to count R_q.
    """
    queries = np.asarray(query_labels).astype(bool)
    retrieved = np.asarray(retrieved_labels).astype(bool)
    database = np.asarray(db_labels).astype(bool)
    if (
        queries.ndim != 2
        or retrieved.ndim != 3
        or database.ndim != 2
        or retrieved.shape[0] != queries.shape[0]
        or not queries.shape[1] == retrieved.shape[2] == database.shape[1]
    ):
        raise SearchError(
            "expected query_labels (Q, L), retrieved_labels (Q, K, L) and db_labels (N, L); "
            f"got {queries.shape}, {retrieved.shape} and {database.shape}"
        )
    relevant = (retrieved & queries[:, None, :]).any(axis=2)
    # Few distinct label sets exist, so count overlaps against those, not every row.
    patterns, counts = np.unique(database, axis=0, return_counts=True)
    overlaps = (queries.astype(np.int64) @ patterns.T.astype(np.int64)) > 0
    return relevant, (overlaps @ counts).astype(np.int64)


def _check_relevance(
    relevant: Any, n_relevant: Any, k: int | None
) -> tuple[np.ndarray, np.ndarray | None]:
    rel = np.asarray(relevant)
    if rel.ndim != 2 or rel.shape[0] == 0 or rel.shape[1] == 0:
        raise SearchError(f"relevant must be a non-empty (Q, K) array, got shape {rel.shape}")
    if rel.dtype != bool:
        if not np.isin(rel, (0, 1)).all():
            raise SearchError("relevant must hold only True/False (or 0/1)")
        rel = rel.astype(bool)
    if k is not None and not 1 <= k <= rel.shape[1]:
        raise SearchError(f"k={k} is outside 1..{rel.shape[1]} (hits retrieved per query)")
    if n_relevant is None:
        return rel, None
    n_rel = np.asarray(n_relevant)
    if n_rel.shape != (rel.shape[0],) or n_rel.dtype.kind not in "iu" or (n_rel < 0).any():
        raise SearchError(
            f"n_relevant must be ({rel.shape[0]},) non-negative integers, got shape {n_rel.shape} "
            f"dtype {n_rel.dtype}"
        )
    too_many = np.flatnonzero(rel.sum(axis=1) > n_rel)
    if len(too_many):
        q = int(too_many[0])
        raise SearchError(
            f"query {q} has {int(rel[q].sum())} relevant hits but n_relevant says the database "
            f"holds only {int(n_rel[q])} ({len(too_many)} such queries); pass the class sizes of "
            "the searched database (the train split), and no duplicate hits"
        )
    return rel, n_rel.astype(np.int64)


# ---------------------------------------------------------------------------
# Retrieval: per-query metrics


def precision_at_k(relevant: Any, k: int) -> np.ndarray:
    """P@k per query: fraction of the top k hits that are relevant. Shape (Q,)."""
    rel, _ = _check_relevance(relevant, None, k)
    return rel[:, :k].mean(axis=1)


def acc_at_k(relevant: Any, k: int) -> np.ndarray:
    """ACC@k per query (Mahbod et al.): 1.0 if any of the top k hits is relevant. Shape (Q,)."""
    rel, _ = _check_relevance(relevant, None, k)
    return rel[:, :k].any(axis=1).astype(float)


def average_precision_at_k(
    relevant: Any, n_relevant: Any, k: int, normalize: str = "database"
) -> np.ndarray:
    """AP@k per query, shape (Q,).

    AP@k = (1/D) * sum_{i<=k} P@i * rel_i, where D is
      ``normalize="database"`` (default): min(k, R_q), R_q = ``n_relevant``;
      ``normalize="retrieved"``: the relevant hits within the top k, as in
      Mahbod et al. 2024 (``n_relevant`` may then be None).
    AP is 0 when D is 0.
    """
    if normalize not in ("database", "retrieved"):
        raise SearchError(f"normalize must be 'database' or 'retrieved', got {normalize!r}")
    if normalize == "database" and n_relevant is None:
        raise SearchError("normalize='database' needs n_relevant (R_q per query)")
    rel, n_rel = _check_relevance(relevant, n_relevant, k)
    top = rel[:, :k].astype(float)
    hits_so_far = np.cumsum(top, axis=1)
    summed = (hits_so_far / np.arange(1, k + 1) * top).sum(axis=1)
    denominator = np.minimum(k, n_rel) if normalize == "database" else hits_so_far[:, -1]
    return _safe_ratio(summed, denominator.astype(float))


def map_at_k(relevant: Any, n_relevant: Any, k: int, normalize: str = "database") -> float:
    """mAP@k: mean of :func:`average_precision_at_k` over queries."""
    return float(average_precision_at_k(relevant, n_relevant, k, normalize).mean())


def majority_vote_at_k(
    query_labels: Any, retrieved_labels: Any, k: int, ties: str = "first"
) -> np.ndarray:
    """mMV@k per query: 1.0 if the majority label of the top k hits is the query's label.

    ties="first": among labels tied for most votes the highest-ranked one is the vote;
    ties="any": correct when the query's label is any of the tied labels (as in
    Mahbod et al.'s published code). Shape (Q,).
    """
    if ties not in ("first", "any"):
        raise SearchError(f"ties must be 'first' or 'any', got {ties!r}")
    queries, retrieved = _single_label_arrays(query_labels, retrieved_labels)
    if not 1 <= k <= retrieved.shape[1]:
        raise SearchError(f"k={k} is outside 1..{retrieved.shape[1]} (hits retrieved per query)")
    top = retrieved[:, :k]
    votes = (top[:, :, None] == top[:, None, :]).sum(axis=2)  # votes for the label at each rank
    is_top_label = votes == votes.max(axis=1, keepdims=True)
    matches_query = top == queries[:, None]
    if ties == "any":
        return (is_top_label & matches_query).any(axis=1).astype(float)
    first_top = is_top_label.argmax(axis=1)
    return matches_query[np.arange(len(top)), first_top].astype(float)


def _query_groups(
    query_labels: np.ndarray, class_names: Sequence[str] | None
) -> list[tuple[str, np.ndarray]]:
    """(name, row mask) per class: 1-D labels group by value, 2-D 0/1 by column."""
    if query_labels.ndim == 2:
        names = class_names
        if names is None:
            names = [str(c) for c in range(query_labels.shape[1])]
        if len(names) != query_labels.shape[1]:
            raise SearchError(
                f"{len(names)} class names for {query_labels.shape[1]} label columns"
            )
        columns = query_labels.astype(bool)
        return [
            (str(names[c]), columns[:, c])
            for c in range(columns.shape[1])
            if columns[:, c].any()
        ]
    groups = []
    for label in np.unique(query_labels):
        name = label
        if class_names is not None and np.issubdtype(type(label), np.integer):
            name = class_names[int(label)]
        groups.append((str(name), query_labels == label))
    return groups


def precision_at_k_denner(
    relevant: Any,
    n_relevant: Any,
    k: int,
    query_labels: Any = None,
    average: str | None = "micro",
) -> float | np.ndarray:
    """P@k as Denner et al. 2024: per query, relevant hits in the top n over n, n = min(k, R_q).

    average="micro": mean over queries; "macro": mean over query classes of the
    per-class mean (needs ``query_labels``: (Q,) labels, or (Q, L) 0/1 where a query
    counts in each of its classes); None: the (Q,) per-query values.
    Queries with R_q = 0 score 0.
    """
    if average not in ("micro", "macro", None):
        raise SearchError(f"average must be 'micro', 'macro' or None, got {average!r}")
    rel, n_rel = _check_relevance(relevant, n_relevant, k)
    n = np.minimum(k, n_rel)
    hits_so_far = np.cumsum(rel[:, :k], axis=1)
    hits = np.where(n > 0, hits_so_far[np.arange(len(rel)), np.maximum(n - 1, 0)], 0)
    per_query = _safe_ratio(hits.astype(float), n.astype(float))
    if average is None:
        return per_query
    if average == "micro":
        return float(per_query.mean())
    if query_labels is None:
        raise SearchError("average='macro' needs query_labels to group queries by class")
    labels = np.asarray(query_labels)
    if len(labels) != len(rel):
        raise SearchError(f"query_labels has {len(labels)} rows for {len(rel)} queries")
    return float(np.mean([per_query[mask].mean() for _, mask in _query_groups(labels, None)]))


# ---------------------------------------------------------------------------
# Retrieval: report


def retrieval_report(
    query_labels: Any,
    retrieved_labels: Any = None,
    db_class_sizes: Mapping[Any, int] | Sequence[int] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    *,
    relevant: Any = None,
    n_relevant: Any = None,
    class_names: Sequence[str] | None = None,
    ties: str = "first",
) -> RetrievalMetrics:
    """All retrieval metrics per k, overall and per query class.

    Single-label: query_labels (Q,), retrieved_labels (Q, K) in rank order,
    db_class_sizes (label -> count in the searched database, e.g. ``class_sizes(train)``).
    Multi-label: query_labels (Q, L) 0/1 plus ``relevant`` and ``n_relevant`` from
    :func:`relevance_from_label_sets`; majority vote is then None.
    ``relevant``/``n_relevant`` may also be passed for single-label data; they then
    replace the label comparison. class_names: names for integer labels / label columns.
    """
    labels = np.asarray(query_labels)
    if labels.ndim not in (1, 2) or len(labels) == 0:
        raise SearchError(
            f"query_labels must be a non-empty (Q,) or (Q, L) array, got {labels.shape}"
        )
    multilabel = labels.ndim == 2
    if relevant is None:
        if multilabel:
            raise SearchError(
                "multi-label queries need relevant and n_relevant; build them with "
                "relevance_from_label_sets(query_labels, db_labels[ids], db_labels)"
            )
        if retrieved_labels is None or db_class_sizes is None:
            raise SearchError(
                "pass retrieved_labels and db_class_sizes, or relevant and n_relevant"
            )
        relevant, n_relevant = relevance_from_labels(labels, retrieved_labels, db_class_sizes)
    elif n_relevant is None:
        raise SearchError(
            "relevant needs n_relevant (R_q, relevant items in the database per query)"
        )
    rel, n_rel = _check_relevance(relevant, n_relevant, None)
    if len(rel) != len(labels):
        raise SearchError(f"relevance has {len(rel)} rows for {len(labels)} queries")
    k_list = sorted({int(k) for k in ks})
    if not k_list or k_list[0] < 1 or k_list[-1] > rel.shape[1]:
        raise SearchError(
            f"ks must lie in 1..{rel.shape[1]} (hits retrieved per query), got {list(ks)}"
        )
    with_votes = not multilabel and retrieved_labels is not None
    groups = _query_groups(labels, class_names)

    overall: list[RetrievalAtK] = []
    per_class: dict[str, list[RetrievalAtK]] = {name: [] for name, _ in groups}
    for k in k_list:
        per_query = {
            "precision": precision_at_k(rel, k),
            "map": average_precision_at_k(rel, n_rel, k, "database"),
            "map_retrieved": average_precision_at_k(rel, None, k, "retrieved"),
            "acc": acc_at_k(rel, k),
            "majority_vote": (
                majority_vote_at_k(labels, retrieved_labels, k, ties) if with_votes else None
            ),
            "precision_denner": precision_at_k_denner(rel, n_rel, k, average=None),
        }

        def summary(mask: np.ndarray, macro: float | None) -> RetrievalAtK:
            means = {
                name: None if values is None else float(values[mask].mean())
                for name, values in per_query.items()
            }
            return RetrievalAtK(
                k=k, n_queries=int(mask.sum()), precision_denner_macro=macro, **means
            )

        class_means = [per_query["precision_denner"][mask].mean() for _, mask in groups]
        macro = float(np.mean(class_means)) if class_means else None
        overall.append(summary(np.ones(len(rel), dtype=bool), macro))
        for name, mask in groups:
            per_class[name].append(summary(mask, None))

    return RetrievalMetrics(
        ks=k_list,
        n_queries=len(rel),
        multilabel=multilabel,
        overall=overall,
        per_class=per_class,
        n_queries_without_relevant=int((n_rel == 0).sum()),
        ties=ties,
    )
