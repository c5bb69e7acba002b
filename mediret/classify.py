"""Classifiers over a store's embeddings: the paper's grid-searched LR/SVM, and kNN over FAISS.

The protocol follows McMillan & Khoiwal 2024 (arXiv 2412.09445): stored vectors
(reconstructed from the FAISS index, never re-embedded) of the training split
go through ``GridSearchCV`` over C with 5-fold cross-validation, the best
setting is refitted on the whole training split, and the test split (or
another store, for external validation) is scored once. For the group split
the CV folds are group-disjoint too (``StratifiedGroupKFold``), so model
selection does not leak patients/lesions either.

Scores for AUC: ``predict_proba`` for logistic regression and kNN; the
``decision_function`` for the SVMs (as the paper; no calibration), which AUC
only ranks. Single-label predictions are the argmax of the scores.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from .errors import ClassifyError, SearchError
from .metrics import ClassificationMetrics, classification_report
from .splits import check_group_disjoint
from .store import SavedClassifier, Store

CLASSIFIER_KINDS = ("lr", "svm", "linearsvc", "knn")
SPLIT_SCHEMES = ("random", "group", "given")
PAPER_C_GRID = (0.1, 1.0, 10.0, 100.0)
DEFAULT_K_GRID = (5, 10, 20)
KNN_WEIGHTS = ("uniform", "distance")
TEST_SPLIT = "test"

# lbfgs on the unit-length embeddings needs up to ~370 iterations at C=100 on HAM10000
# (tol 1e-4); a fit that stops at the cap is flagged in the results (``converged``).
LR_MAX_ITER = 1000
LINEAR_SVC_MAX_ITER = 5000

DESCRIPTIONS = {
    "lr": "LogisticRegression (lbfgs; multinomial when multiclass), grid over C",
    "svm": "SVC, grid over C x {kernel linear; kernel rbf with gamma scale, auto}",
    "linearsvc": "LinearSVC, grid over C x loss {hinge, squared_hinge}",
    "knn": "kNN over a flat inner-product FAISS index (cosine), grid over k x weights",
}


# ---- kNN over FAISS -----------------------------------------------------------------------


class FaissKNNClassifier(ClassifierMixin, BaseEstimator):
    """k-nearest-neighbour classifier by cosine similarity, searched with FAISS.

    ``fit`` L2-normalises X and puts it in a flat inner-product index (exact
    search); queries are normalised the same way, so on a store's vectors the
    similarity is the store's own inner product.

    n_neighbors: neighbours that vote.
    weights: 'uniform' (one vote each) or 'distance' (vote 1 / (1 - cosine);
        neighbours at distance 0 take the whole vote, as in scikit-learn).

    Single-label: ``predict_proba`` columns follow ``classes_``. Multi-label
    (y a 0/1 indicator matrix): ``predict_proba`` is the (n, L) weighted share of
    neighbours carrying each label and ``predict`` marks labels with share >= 0.5.
    """

    def __init__(self, n_neighbors: int = 5, weights: str = "uniform"):
        self.n_neighbors = n_neighbors
        self.weights = weights

    def fit(self, X, y):
        X, y = validate_data(self, X, y, multi_output=True, dtype=[np.float32, np.float64])
        if y.ndim == 2 and y.shape[1] == 1:
            from sklearn.exceptions import DataConversionWarning

            warnings.warn("a column-vector y was passed when a 1-D array was expected; "
                          "it was flattened", DataConversionWarning, stacklevel=2)
            y = y.ravel()
        check_classification_targets(y)
        self._check_params()
        if y.ndim == 2:
            if type_of_target(y) != "multilabel-indicator":
                raise ValueError("multi-output y must be a 0/1 multi-label indicator matrix; "
                                 "multiclass-multioutput targets are not supported")
            self.classes_ = np.arange(y.shape[1])
            self._targets = np.asarray(y, dtype=np.float64)
            self.multilabel_ = True
        else:
            self.classes_, encoded = np.unique(y, return_inverse=True)
            self._targets = np.eye(len(self.classes_))[encoded]
            self.multilabel_ = False
        self._fit_X = _unit_rows(X)
        self.index_ = _flat_ip_index(self._fit_X)
        self.n_samples_fit_ = len(self._fit_X)
        return self

    def _check_params(self) -> None:
        if (isinstance(self.n_neighbors, bool) or not isinstance(self.n_neighbors, (int, np.integer))
                or self.n_neighbors < 1):
            raise ValueError(f"n_neighbors must be a positive integer, got {self.n_neighbors!r}")
        if self.weights not in KNN_WEIGHTS:
            raise ValueError(f"weights must be one of {KNN_WEIGHTS}, got {self.weights!r}")

    def kneighbors(self, X, n_neighbors: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarities, row indices into the fitted X), each (n, k), nearest first."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if k > self.n_samples_fit_:
            raise ValueError(f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k}, "
                             f"n_samples_fit = {self.n_samples_fit_}")
        similarities, indices = self.index_.search(_unit_rows(X), k)
        return similarities, indices

    def predict_proba(self, X) -> np.ndarray:
        similarities, indices = self.kneighbors(X)
        w = _vote_weights(similarities, self.weights)
        votes = np.einsum("nk,nkc->nc", w, self._targets[indices])
        return votes / w.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)
        if self.multilabel_:
            return (proba >= 0.5).astype(np.int64)
        return self.classes_[proba.argmax(axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.classifier_tags.multi_label = True
        tags.input_tags.sparse = False
        return tags

    # FAISS indexes do not pickle: keep the vectors, rebuild the index on load.
    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("index_", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_fit_X" in state:
            self.index_ = _flat_ip_index(self._fit_X)


def _unit_rows(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.ascontiguousarray(X / np.maximum(norms, np.finfo(np.float32).tiny))


def _flat_ip_index(X: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(X.shape[1])
    index.add(X)
    return index


def _vote_weights(similarities: np.ndarray, weights: str) -> np.ndarray:
    if weights == "uniform":
        return np.ones_like(similarities, dtype=np.float64)
    distance = np.maximum(1.0 - similarities.astype(np.float64), 0.0)
    # float32 inner products of identical unit vectors land within ~1e-7 of 1
    exact = distance <= 1e-6
    with np.errstate(divide="ignore"):
        inverse = 1.0 / distance
    return np.where(exact.any(axis=1, keepdims=True), exact.astype(np.float64), inverse)


# ---- settings and data ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifySettings:
    """How classifiers are trained and evaluated; recorded with every result.

    standardize: z-score features (fitted on the training folds) before LR and the
        SVMs. Off by default, as in the paper: the C grid suits unit-length embeddings,
        and on standardised 1280-d HAM10000 vectors every C in it overfits (CV accuracy
        0.69-0.72 against 0.77 raw). kNN always uses cosine similarity on the stored vectors.
    jobs: ``n_jobs`` of the grid search (None: 1, -1: every core); each fit uses one
        BLAS thread, so parallelism comes from here.
    """

    split: str = "random"
    cv: int = 5
    C: tuple[float, ...] = PAPER_C_GRID
    k: tuple[int, ...] = DEFAULT_K_GRID
    knn_weights: tuple[str, ...] = KNN_WEIGHTS
    standardize: bool = False
    seed: int = 0
    jobs: int | None = None
    n_bootstrap: int = 1000

    def __post_init__(self):
        if self.split not in SPLIT_SCHEMES:
            raise ClassifyError(f"unknown split '{self.split}'; choose one of {', '.join(SPLIT_SCHEMES)}")
        if self.cv < 2:
            raise ClassifyError(f"cv needs at least 2 folds, got {self.cv}")
        if not self.C or any(c <= 0 for c in self.C):
            raise ClassifyError(f"C values must be positive, got {list(self.C)}")
        if not self.k or any(k < 1 for k in self.k):
            raise ClassifyError(f"k values must be positive integers, got {list(self.k)}")
        unknown = [w for w in self.knn_weights if w not in KNN_WEIGHTS]
        if not self.knn_weights or unknown:
            raise ClassifyError(f"kNN weights must be among {', '.join(KNN_WEIGHTS)}, "
                                f"got {list(self.knn_weights)}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "C": list(self.C), "k": list(self.k),
                "knn_weights": list(self.knn_weights)}


@dataclass(frozen=True)
class LabelledSet:
    """Vectors with class targets (indices into class_names, or a 0/1 matrix) and groups."""

    ids: np.ndarray
    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class SplitSummary:
    """Which images trained and which were scored, and how many groups they share.

    groups_shared: groups (patients/lesions; an image without one is its own group)
        with images on both sides; test_images_in_shared_groups: test images whose
        group also has training images -- the leakage a random image-level split allows.
    duplicates_shared: test images byte-identical to a training image (content hash).
    """

    scheme: str
    evaluated_on: str
    n_train: int
    n_test: int
    groups_train: int
    groups_test: int
    groups_shared: int
    test_images_in_shared_groups: int
    duplicates_shared: int
    group_disjoint: bool
    claims_group_disjoint: bool
    cv: str
    train_class_counts: dict[str, int] = field(default_factory=dict)
    classes_absent: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClassifyData:
    """A store's training split and the images to score, ready for scikit-learn."""

    store: str
    dataset: str | None
    encoder: dict[str, Any]
    class_names: list[str]
    multilabel: bool
    train: LabelledSet
    test: LabelledSet
    split: SplitSummary


def _encoder_dict(store: Store) -> dict[str, Any]:
    return asdict(store.encoder)


def load_data(store: Store, settings: ClassifySettings, external: Store | None = None) -> ClassifyData:
    """Training side of ``store``'s split and its test side (or every image of ``external``).

    The test side is the images whose split is 'test'; every other image trains
    (for ``given`` splits with a validation part, such as MedMNIST's, train + val:
    the grid search's CV does the validating). Single-label classes without any image in ``store`` are left out (listed in
    ``classes_absent``); a class with images but none in training is an error.
    Raises ClassifyError when the group split is not group-disjoint.
    """
    matrix = store.labelled_matrix(settings.split)
    if len(matrix.ids) == 0:
        raise ClassifyError(f"{store.path} holds no images to classify")
    names = list(matrix.label_names)
    y = matrix.y
    absent: list[str] = []
    if not matrix.multilabel:
        counts = np.bincount(y, minlength=len(names))
        kept = np.flatnonzero(counts > 0)
        absent = [names[c] for c in np.flatnonzero(counts == 0)]
        remap = np.full(len(names), -1)
        remap[kept] = np.arange(len(kept))
        y = remap[y]
        names = [names[c] for c in kept]
    is_test = matrix.split == TEST_SPLIT
    if external is None and not is_test.any():
        raise ClassifyError(f"split '{settings.split}' of {store.path} has no '{TEST_SPLIT}' images; "
                            f"it has: {', '.join(sorted(set(matrix.split.tolist())))}")
    if not (~is_test).any():
        raise ClassifyError(f"split '{settings.split}' of {store.path} has no training images")
    train = LabelledSet(matrix.ids[~is_test], matrix.X[~is_test], y[~is_test], matrix.groups[~is_test])
    if not matrix.multilabel:
        missing = sorted(set(range(len(names))) - set(train.y.tolist()))
        if missing:
            raise ClassifyError(
                f"classes {', '.join(names[c] for c in missing)} have images in {store.path} but "
                f"none in the training side of split '{settings.split}'; use another --split")
    if len(names) < 2 and not matrix.multilabel:
        raise ClassifyError(f"{store.path} holds images of one class only ({', '.join(names)}); "
                            "classification needs two or more")
    claims_disjoint = settings.split == "group"
    if claims_disjoint:
        shared = check_group_disjoint(matrix.split, matrix.groups)
        if shared:
            raise ClassifyError(
                f"split 'group' of {store.path} is not group-disjoint: {len(shared)} groups have "
                f"images on both sides (e.g. {', '.join(shared[:5])}); re-run `mediret ingest` "
                "to recompute the splits")
    if external is None:
        test = LabelledSet(matrix.ids[is_test], matrix.X[is_test], y[is_test], matrix.groups[is_test])
        evaluated_on = f"'{TEST_SPLIT}' side of split '{settings.split}' of {store.path}"
        duplicates = _shared_hashes(store, train.ids, store, test.ids)
    else:
        test = _external_set(store, external, names, matrix.multilabel)
        evaluated_on = f"every image of external store {external.path}"
        duplicates = _shared_hashes(store, train.ids, external, test.ids)
    summary = _split_summary(settings, train, test, evaluated_on, duplicates, claims_disjoint,
                             names, matrix.multilabel, absent)
    return ClassifyData(store=str(store.path), dataset=store.get_info("format"),
                        encoder=_encoder_dict(store), class_names=names,
                        multilabel=matrix.multilabel, train=train, test=test, split=summary)


def _split_summary(settings: ClassifySettings, train: LabelledSet, test: LabelledSet,
                   evaluated_on: str, duplicates: int, claims_disjoint: bool, names: list[str],
                   multilabel: bool, absent: list[str]) -> SplitSummary:
    train_groups, test_groups = set(train.groups.tolist()), set(test.groups.tolist())
    shared = train_groups & test_groups
    per_class = (train.y.sum(axis=0) if multilabel else np.bincount(train.y, minlength=len(names)))
    return SplitSummary(
        scheme=settings.split, evaluated_on=evaluated_on, n_train=len(train), n_test=len(test),
        groups_train=len(train_groups), groups_test=len(test_groups), groups_shared=len(shared),
        test_images_in_shared_groups=int(sum(g in shared for g in test.groups.tolist())),
        duplicates_shared=duplicates, group_disjoint=not shared,
        claims_group_disjoint=claims_disjoint,
        cv=describe_cv(settings.split, multilabel, settings.cv, settings.seed),
        train_class_counts={n: int(c) for n, c in zip(names, per_class)}, classes_absent=absent)


def _shared_hashes(store: Store, ids: np.ndarray, other: Store, other_ids: np.ndarray) -> int:
    """Images among ``other_ids`` whose bytes equal an image among ``ids``."""
    mine = set(store.content_hashes(ids))
    return sum(h in mine for h in other.content_hashes(other_ids))


def _external_set(store: Store, external: Store, class_names: list[str], multilabel: bool) -> LabelledSet:
    """Every image of ``external``, its targets mapped onto ``class_names``; mismatches raise."""
    mine, theirs = store.encoder, external.encoder
    problems = [f"{what} {a!r} here, {b!r} there" for what, a, b in (
        ("encoder", mine.name, theirs.name), ("dimension", mine.dim, theirs.dim),
        ("preprocessing", mine.preprocess, theirs.preprocess)) if a != b]
    if problems:
        raise ClassifyError(f"cannot validate on {external.path}: its vectors are not comparable "
                            f"with {store.path} ({'; '.join(problems)}); ingest the external data "
                            "with the same --encoder and --preprocess")
    if external.is_multilabel() != multilabel:
        raise ClassifyError(f"cannot validate on {external.path}: one store is multi-label, "
                            "the other single-label")
    here, there = set(store.label_names()), set(external.label_names())
    if here != there:
        detail = []
        if there - here:
            detail.append(f"only there: {', '.join(sorted(there - here))}")
        if here - there:
            detail.append(f"only here: {', '.join(sorted(here - there))}")
        raise ClassifyError(f"cannot validate on {external.path}: its label set differs from "
                            f"{store.path} ({'; '.join(detail)})")
    schemes = external.split_schemes()
    if not schemes:
        raise ClassifyError(f"{external.path} has no split assignment; re-run `mediret ingest` on it")
    matrix = external.labelled_matrix(schemes[0])  # every image; its split is not used
    if len(matrix.ids) == 0:
        raise ClassifyError(f"external store {external.path} holds no images")
    position = {name: c for c, name in enumerate(class_names)}
    if multilabel:
        Y = np.zeros((len(matrix.ids), len(class_names)), dtype=matrix.y.dtype)
        for c, name in enumerate(matrix.label_names):
            Y[:, position[name]] = matrix.y[:, c]
        y = Y
    else:
        unknown = sorted({matrix.label_names[c] for c in matrix.y.tolist()} - set(position))
        if unknown:
            raise ClassifyError(f"external store {external.path} has images of "
                                f"{', '.join(unknown)}, which {store.path} has no images of")
        y = np.array([position[matrix.label_names[c]] for c in matrix.y], dtype=np.int64)
    return LabelledSet(matrix.ids, matrix.X, y, matrix.groups)


# ---- the paper's estimators and grids --------------------------------------------------------


def cv_splitter(scheme: str, multilabel: bool, n_splits: int, seed: int):
    """CV folds over the training split: group-disjoint for the group split, stratified when single-label."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    if scheme == "group":
        if multilabel:
            return GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    if multilabel:
        return KFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)


def describe_cv(scheme: str, multilabel: bool, n_splits: int, seed: int) -> str:
    splitter = type(cv_splitter(scheme, multilabel, n_splits, seed)).__name__
    disjoint = ", folds group-disjoint" if scheme == "group" else ""
    return f"{n_splits}-fold {splitter} (shuffled, seed {seed}) on the training side{disjoint}"


def make_search(kind: str, settings: ClassifySettings, multilabel: bool):
    """The GridSearchCV of the paper's protocol for ``kind`` (refit on all training data)."""
    from sklearn.model_selection import GridSearchCV

    estimator, grid = _estimator_and_grid(kind, settings, multilabel)
    return GridSearchCV(estimator, grid, scoring="accuracy",
                        cv=cv_splitter(settings.split, multilabel, settings.cv, settings.seed),
                        n_jobs=settings.jobs, refit=True, error_score="raise")


def _estimator_and_grid(kind: str, settings: ClassifySettings, multilabel: bool):
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    C = [float(c) for c in settings.C]
    if kind == "knn":
        # multi-label natively; cosine on the stored vectors, so never standardised
        return FaissKNNClassifier(), {"n_neighbors": [int(k) for k in settings.k],
                                      "weights": list(settings.knn_weights)}
    if kind == "lr":
        base = LogisticRegression(solver="lbfgs", max_iter=LR_MAX_ITER)
        grids = [{"C": C}]
    elif kind == "linearsvc":
        base = LinearSVC(dual="auto", max_iter=LINEAR_SVC_MAX_ITER, random_state=settings.seed)
        grids = [{"loss": ["hinge", "squared_hinge"], "C": C}]
    elif kind == "svm":
        # break_ties: predict is then the argmax of decision_function, which the metrics use
        base = SVC(break_ties=True, random_state=settings.seed)
        grids = [{"kernel": ["linear"], "C": C},
                 {"kernel": ["rbf"], "gamma": ["scale", "auto"], "C": C}]
    else:
        raise ClassifyError(f"unknown classifier '{kind}'; choose from {', '.join(CLASSIFIER_KINDS)}")
    prefix = "clf__"
    if multilabel:
        base, prefix = OneVsRestClassifier(base), "clf__estimator__"
    steps = [("scale", StandardScaler())] if settings.standardize else []
    pipeline = Pipeline(steps + [("clf", base)])
    return pipeline, [{prefix + key: values for key, values in grid.items()} for grid in grids]


def class_scores(model, X: np.ndarray) -> tuple[np.ndarray, str]:
    """(n, C) scores for AUC and argmax: probabilities when the model has them, else decision values."""
    if hasattr(model, "predict_proba"):
        return np.asarray(model.predict_proba(X), dtype=np.float64), "predict_proba"
    scores = np.asarray(model.decision_function(X), dtype=np.float64)
    if scores.ndim == 1:
        scores = np.column_stack([-scores, scores])
    return scores, "decision_function"


def _plain_params(params: dict[str, Any]) -> dict[str, Any]:
    """Grid keys without their pipeline prefixes: {'clf__estimator__C': 1} -> {'C': 1}."""
    return {key.rsplit("__", 1)[-1]: value for key, value in params.items()}


def _converged(model) -> bool | None:
    """False when an iterative solver of the fitted model stopped at max_iter; None for kNN."""
    final = model[-1] if hasattr(model, "steps") else model
    iterative = [e for e in getattr(final, "estimators_", [final]) if hasattr(e, "n_iter_")]
    if not iterative:
        return None
    # SVC's max_iter is -1 (no limit): it always runs to its tolerance
    return all(e.max_iter <= 0 or np.max(e.n_iter_) < e.max_iter for e in iterative)


# ---- fitting and evaluation ------------------------------------------------------------------


@dataclass
class ModelResult:
    """One classifier kind: its grid search, the refitted model and its test metrics."""

    kind: str
    description: str
    best_params: dict[str, Any]
    cv_accuracy: float
    cv_results: list[dict[str, Any]]
    fit_seconds: float
    converged: bool | None
    score_source: str
    metrics: ClassificationMetrics
    model: Any = field(repr=False, default=None)
    saved_as: str | None = None

    def to_dict(self, include_roc: bool = False) -> dict[str, Any]:
        return {
            "kind": self.kind, "description": self.description, "best_params": self.best_params,
            "cv_accuracy": self.cv_accuracy, "cv_results": self.cv_results,
            "fit_seconds": round(self.fit_seconds, 3), "converged": self.converged,
            "score_source": self.score_source, "saved_as": self.saved_as,
            "metrics": self.metrics.to_dict(include_roc=include_roc),
        }


@dataclass
class ClassifyResult:
    """Everything one `mediret classify` run found."""

    store: str
    dataset: str | None
    encoder: dict[str, Any]
    class_names: list[str]
    multilabel: bool
    split: SplitSummary
    external: dict[str, Any] | None
    settings: ClassifySettings
    models: list[ModelResult]

    def to_dict(self, include_roc: bool = False) -> dict[str, Any]:
        return {
            "store": self.store, "dataset": self.dataset, "encoder": self.encoder,
            "class_names": self.class_names, "multilabel": self.multilabel,
            "split": self.split.to_dict(), "external": self.external,
            "settings": self.settings.to_dict(),
            "scores": "AUC from predict_proba for lr/knn and from decision_function (uncalibrated) "
                      "for svm/linearsvc; single-label predictions are the argmax of the scores",
            "models": [m.to_dict(include_roc=include_roc) for m in self.models],
        }


def fit_and_evaluate(kind: str, data: ClassifyData, settings: ClassifySettings) -> ModelResult:
    """Grid-search ``kind`` on the training side, refit on all of it, score the test side."""
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    if len(set(data.train.groups.tolist())) < settings.cv:
        raise ClassifyError(f"{settings.cv}-fold CV needs at least {settings.cv} training groups; "
                            f"there are {len(set(data.train.groups.tolist()))}")
    if kind == "knn" and max(settings.k) > len(data.train) * (settings.cv - 1) // settings.cv:
        raise ClassifyError(f"k up to {max(settings.k)} is more than the images of a CV training "
                            f"fold (about {len(data.train) * (settings.cv - 1) // settings.cv})")
    search = make_search(kind, settings, data.multilabel)
    started = time.perf_counter()
    # only group-aware CV takes groups (StratifiedKFold warns that it ignores them)
    groups = {"groups": data.train.groups} if settings.split == "group" else {}
    # One BLAS thread per fit: on a shared 2-core machine multi-threaded BLAS thrashed
    # (an lbfgs fit of HAM10000 took 14.7 s with 2 threads under load, 1.1 s with 1);
    # --jobs runs whole fits in parallel instead.
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        # Reported in the results instead of printed per fold: non-convergence per model
        # (``converged``), classes rarer than the folds in ``train_class_counts``.
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", "The least populated class in y has only")
        warnings.filterwarnings("ignore", "Label .*is present in all training examples")
        search.fit(data.train.X, data.train.y, **groups)
    seconds = time.perf_counter() - started
    model = search.best_estimator_
    scores, source = class_scores(model, data.test.X)
    metrics = classification_report(
        data.test.y, scores, data.class_names, multilabel=data.multilabel,
        n_bootstrap=settings.n_bootstrap, seed=settings.seed,
        threshold=0.5 if source == "predict_proba" else 0.0)
    cv = search.cv_results_
    cv_results = [{"params": _plain_params(p), "mean_accuracy": float(m), "std_accuracy": float(s),
                   "mean_fit_seconds": float(t)}
                  for p, m, s, t in zip(cv["params"], cv["mean_test_score"], cv["std_test_score"],
                                        cv["mean_fit_time"])]
    description = DESCRIPTIONS[kind] + _standardized(kind, settings)
    if data.multilabel and kind != "knn":
        description += "; one-vs-rest over the labels"
    return ModelResult(kind=kind, description=description,
                       best_params=_plain_params(search.best_params_),
                       cv_accuracy=float(search.best_score_), cv_results=cv_results,
                       fit_seconds=seconds, converged=_converged(model), score_source=source,
                       metrics=metrics, model=model)


def _standardized(kind: str, settings: ClassifySettings) -> str:
    if kind == "knn":
        return ""
    return "; features standardised" if settings.standardize else "; raw features"


def classify(store_path: str | Path, kinds: Sequence[str], settings: ClassifySettings | None = None,
             external: str | Path | None = None, save: bool = False, model_name: str | None = None,
             progress: Callable[[str], None] | None = None) -> ClassifyResult:
    """Train each of ``kinds`` on the store's training split and score the test split.

    external: another store to score instead (all of its images).
    save: keep the fitted models in the store's ``classifiers`` table, named
        ``model_name`` (one kind), ``model_name-kind`` (several) or ``kind-split``.
    progress: called with a line of text before and after each model.
    """
    settings = settings or ClassifySettings()
    kinds = list(dict.fromkeys(kinds))
    for kind in kinds:
        if kind not in CLASSIFIER_KINDS:
            raise ClassifyError(f"unknown classifier '{kind}'; choose from {', '.join(CLASSIFIER_KINDS)}")
    say = progress or (lambda line: None)
    with Store.open(store_path) as store:
        if external is None:
            data = load_data(store, settings)
            external_info = None
        else:
            with Store.open(external) as other:
                data = load_data(store, settings, other)
                external_info = {"store": str(other.path), "dataset": other.get_info("format"),
                                 "encoder": _encoder_dict(other)}
    results = []
    for kind in kinds:
        say(f"{kind}: grid search on {len(data.train)} training images ...")
        result = fit_and_evaluate(kind, data, settings)
        say(f"{kind}: done in {result.fit_seconds:.1f} s, best {result.best_params}")
        results.append(result)
    outcome = ClassifyResult(store=data.store, dataset=data.dataset, encoder=data.encoder,
                             class_names=data.class_names, multilabel=data.multilabel,
                             split=data.split, external=external_info, settings=settings,
                             models=results)
    if save:
        with Store.open(store_path, read_only=False) as store:
            for result in results:
                name = _model_name(model_name, result.kind, settings.split, len(results))
                save_classifier(store, name, result, outcome)
                result.saved_as = name
    return outcome


def _model_name(given: str | None, kind: str, split: str, n_models: int) -> str:
    if given is None:
        return f"{kind}-{split}"
    return given if n_models == 1 else f"{given}-{kind}"


# ---- classifiers kept in the store --------------------------------------------------------------


def save_classifier(store: Store, name: str, result: ModelResult, run: ClassifyResult) -> None:
    """Keep ``result.model`` in the store under ``name`` (replacing one of that name), in one transaction."""
    import sklearn

    store.classifiers.save(
        SavedClassifier(name=name, kind=result.kind, encoder=asdict(store.encoder), split=run.split.scheme,
                        class_names=run.class_names, multilabel=run.multilabel,
                        score_source=result.score_source, params=result.best_params,
                        metrics=result.metrics.to_dict(), n_train=run.split.n_train,
                        created_at=datetime.now(timezone.utc).replace(tzinfo=None), model=result.model),
        settings=run.settings.to_dict(), sklearn_version=sklearn.__version__)


def list_classifiers(store: Store) -> list[SavedClassifier]:
    """The classifiers kept in ``store``, newest first, without their models."""
    return store.classifiers.list()


def load_classifier(store: Store, name: str | None = None) -> SavedClassifier:
    """The classifier ``name`` (default: the newest) with its unpickled model.

    Models are pickles: load only stores you trust, as you would any pickle.
    """
    saved = store.classifiers.list()
    if not saved:
        raise ClassifyError(f"no classifier is saved in {store.path}; train one first, e.g. "
                            f"`mediret classify --clf lr --store {store.path}`")
    chosen = saved[0] if name is None else next((s for s in saved if s.name == name), None)
    if chosen is None:
        raise ClassifyError(f"no classifier '{name}' in {store.path}; it has: "
                            f"{', '.join(s.name for s in saved)}")
    chosen.model = store.classifiers.load_model(chosen.name)
    return chosen


# ---- labelling new images ---------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePrediction:
    """Class scores of one new image, highest first.

    scores: probabilities when the model's score source is 'predict_proba', else SVM
        decision values.
    predicted: the argmax class (multi-label: every label at or above the threshold).
    """

    image: str
    scores: dict[str, float]
    predicted: list[str]


@dataclass(frozen=True)
class Predictions:
    """New images labelled by a saved classifier, and how their vectors were made.

    warnings: things a person should check, e.g. weights loaded from another file
        than the store's vectors came from.
    """

    model: str
    kind: str
    score_source: str
    encoder: str
    weights: str
    warnings: list[str]
    images: list[ImagePrediction]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predict_images(store_path: str | Path, images: Sequence[str | Path], model_name: str | None = None,
                   weights: str | None = None, device: str = "cpu") -> Predictions:
    """Embed ``images`` with the store's encoder (``mediret.query``: DICOM and ``file.npz#split/i``
    read as ingest reads them) and label them with a saved classifier.

    weights: the encoder weights to load (default: the store's recorded weights file, or the
        encoder's own source); they must be those the store was built with, or the vectors
        are not comparable.
    """
    from .query import QueryEncoder, read_image

    with Store.open(store_path) as store:
        saved = load_classifier(store, model_name)
        stored = store.encoder
        embedder = QueryEncoder(store, weights=weights, device=device)
    try:
        vectors = embedder.embed_images([read_image(str(image), embedder.dicom) for image in images])
    except SearchError as exc:
        raise ClassifyError(str(exc)) from exc
    if not len(vectors):
        raise ClassifyError("no images to label")
    scores, source = class_scores(saved.model, vectors)
    threshold = 0.5 if source == "predict_proba" else 0.0
    labelled = []
    for image, row in zip(images, scores):
        order = np.argsort(-row, kind="stable")
        if saved.multilabel:
            predicted = [saved.class_names[c] for c in order if row[c] >= threshold]
        else:
            predicted = [saved.class_names[order[0]]]
        labelled.append(ImagePrediction(image=str(image), predicted=predicted,
                                        scores={saved.class_names[c]: float(row[c]) for c in order}))
    return Predictions(model=saved.name, kind=saved.kind, score_source=source, encoder=stored.name,
                       weights=embedder.encoder.weights_source, warnings=embedder.warnings, images=labelled)
