"""Tests for mediret.metrics: classification against scikit-learn, retrieval by hand."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    hamming_loss,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from mediret.errors import ClassifyError, SearchError
from mediret.metrics import (
    RETRIEVAL_DEFINITIONS,
    RetrievalAtK,
    _weighted_auc,
    acc_at_k,
    auc_per_class,
    average_precision_at_k,
    class_sizes,
    classification_report,
    majority_vote_at_k,
    map_at_k,
    precision_at_k,
    precision_at_k_denner,
    relevance_from_label_sets,
    relevance_from_labels,
    retrieval_report,
    roc_curves,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HAM_CSV = DATA / "ham10000" / "HAM10000_metadata.csv"
ODIR_CSV = DATA / "odir" / "full_df.csv"
ODIR_FLAGS = ["N", "D", "G", "C", "A", "H", "M", "O"]


def _read_csv(path: Path, columns: list[str]) -> list[list[str]]:
    if not path.exists():
        pytest.skip(f"real data not found: {path}")
    with path.open(newline="") as f:
        return [[row[c] for c in columns] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def ham():
    """HAM10000 diagnoses of 2,000 seeded rows: (class indices, class names)."""
    dx = np.array([row[0] for row in _read_csv(HAM_CSV, ["dx"])])
    names = sorted(set(dx.tolist()))
    rows = np.random.default_rng(0).choice(len(dx), size=2000, replace=False)
    return np.searchsorted(names, dx[rows]), names


@pytest.fixture(scope="module")
def odir():
    """ODIR patient-level flags N..O of 1,500 seeded rows: (N, 8) 0/1."""
    flags = np.array(_read_csv(ODIR_CSV, ODIR_FLAGS), dtype=int)
    rows = np.random.default_rng(0).choice(len(flags), size=1500, replace=False)
    return flags[rows]


def noisy_scores(y_onehot: np.ndarray, seed: int, signal: float = 1.5) -> np.ndarray:
    """Decision-like scores: the true columns shifted up by ``signal``, plus N(0, 1) noise."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=y_onehot.shape) + signal * y_onehot


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------
# Classification vs scikit-learn


def test_multiclass_matches_sklearn(ham):
    y, names = ham
    proba = softmax(noisy_scores(np.eye(len(names))[y], seed=1))
    report = classification_report(y, proba, names, n_bootstrap=0)
    labels = list(range(len(names)))

    assert report.auc == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    assert report.accuracy == pytest.approx(accuracy_score(y, proba.argmax(1)))
    assert report.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, proba.argmax(1)))
    p, r, f, _ = precision_recall_fscore_support(
        y, proba.argmax(1), labels=labels, average="macro", zero_division=0
    )
    assert (report.precision, report.recall, report.f1) == pytest.approx((p, r, f))
    p, r, f, support = precision_recall_fscore_support(
        y, proba.argmax(1), labels=labels, average=None, zero_division=0
    )
    assert [row.name for row in report.per_class] == names
    assert [row.precision for row in report.per_class] == pytest.approx(p)
    assert [row.recall for row in report.per_class] == pytest.approx(r)
    assert [row.f1 for row in report.per_class] == pytest.approx(f)
    assert [row.support for row in report.per_class] == support.tolist()
    assert [row.auc for row in report.per_class] == pytest.approx(
        [roc_auc_score(y == c, proba[:, c]) for c in labels]
    )
    np.testing.assert_array_equal(
        report.confusion_matrix, confusion_matrix(y, proba.argmax(1), labels=labels)
    )
    assert report.auc_skipped == [] and report.auc_ci is None and report.hamming_accuracy is None


def test_multiclass_decision_values_with_ties(ham):
    """Decision values (not probabilities) with many ties: macro AUC = mean per-column AUC."""
    y, names = ham
    scores = np.round(noisy_scores(np.eye(len(names))[y], seed=2), 1)
    assert len(np.unique(scores[:, 0])) < len(y) // 10  # ties really are present
    report = classification_report(y, scores, names, n_bootstrap=0)
    per_column = [roc_auc_score(y == c, scores[:, c]) for c in range(len(names))]
    assert report.auc == pytest.approx(np.mean(per_column))
    np.testing.assert_allclose(auc_per_class(y, scores), per_column)


def test_binary_matches_sklearn(ham):
    """Melanoma vs the rest, scores for both columns; AUC is the positive column's."""
    y, names = ham
    y_mel = (y == names.index("mel")).astype(int)
    # Two independent decision columns, so the columns' one-vs-rest AUCs differ.
    proba = noisy_scores(np.eye(2)[y_mel], seed=3, signal=1.0)
    report = classification_report(y_mel, proba, ["other", "mel"], n_bootstrap=0)
    assert report.auc == pytest.approx(roc_auc_score(y_mel, proba[:, 1]))
    assert report.auc != pytest.approx(roc_auc_score(1 - y_mel, proba[:, 0]))
    assert report.per_class[0].auc == pytest.approx(roc_auc_score(1 - y_mel, proba[:, 0]))
    assert report.accuracy == pytest.approx(accuracy_score(y_mel, proba.argmax(1)))
    predicted = proba.argmax(1)
    assert report.balanced_accuracy == pytest.approx(balanced_accuracy_score(y_mel, predicted))
    p, r, f, _ = precision_recall_fscore_support(
        y_mel, predicted, average="macro", zero_division=0
    )
    assert (report.precision, report.recall, report.f1) == pytest.approx((p, r, f))
    np.testing.assert_array_equal(report.confusion_matrix, confusion_matrix(y_mel, predicted))


def test_multilabel_matches_sklearn(odir):
    y = odir
    proba = 1 / (1 + np.exp(-noisy_scores(y, seed=4, signal=2.0) + 1.0))
    report = classification_report(y, proba, ODIR_FLAGS, multilabel=True, n_bootstrap=0)
    predicted = (proba >= 0.5).astype(int)

    assert report.auc == pytest.approx(roc_auc_score(y, proba, average="macro"))
    assert report.accuracy == pytest.approx(accuracy_score(y, predicted))  # subset accuracy
    assert report.hamming_accuracy == pytest.approx(1 - hamming_loss(y, predicted))
    p, r, f, _ = precision_recall_fscore_support(y, predicted, average="macro", zero_division=0)
    assert (report.precision, report.recall, report.f1) == pytest.approx((p, r, f))
    assert [row.accuracy for row in report.per_class] == pytest.approx((y == predicted).mean(0))
    assert [row.support for row in report.per_class] == y.sum(0).tolist()
    np.testing.assert_array_equal(
        report.confusion_matrix, multilabel_confusion_matrix(y, predicted)
    )
    assert report.balanced_accuracy is None and report.threshold == 0.5


def test_multilabel_threshold_zero_for_decision_values(odir):
    y = odir
    # Rounded so that many scores sit exactly on the threshold: a score equal to it is positive.
    scores = np.round(noisy_scores(y, seed=5, signal=2.0) - 1.0, 1)
    assert (scores == 0).sum() > 100
    report = classification_report(
        y, scores, ODIR_FLAGS, multilabel=True, n_bootstrap=0, threshold=0
    )
    assert report.accuracy == pytest.approx(accuracy_score(y, (scores >= 0).astype(int)))
    assert report.hamming_accuracy == pytest.approx(1 - hamming_loss(y, (scores >= 0).astype(int)))
    assert report.threshold == 0


def test_single_class_columns_are_skipped_and_named(ham, odir):
    # Multi-label: a label nobody in the subset carries.
    y = odir.copy()
    y[:, ODIR_FLAGS.index("H")] = 0
    scores = noisy_scores(y, seed=6)
    report = classification_report(
        y, scores, ODIR_FLAGS, multilabel=True, n_bootstrap=0, threshold=0
    )
    kept = [c for c, name in enumerate(ODIR_FLAGS) if name != "H"]
    assert report.auc_skipped == ["H"]
    assert report.per_class[ODIR_FLAGS.index("H")].auc is None
    assert report.auc == pytest.approx(roc_auc_score(y[:, kept], scores[:, kept], average="macro"))

    # Multiclass: the test rows hold no dermatofibroma.
    labels, names = ham
    rows = labels != names.index("df")
    y1, s1 = labels[rows], softmax(noisy_scores(np.eye(len(names))[labels[rows]], seed=7))
    report = classification_report(y1, s1, names, n_bootstrap=0)
    assert report.auc_skipped == ["df"]
    present = [c for c in range(len(names)) if names[c] != "df"]
    per_class = [roc_auc_score(y1 == c, s1[:, c]) for c in present]
    assert report.auc == pytest.approx(np.mean(per_class))
    assert (s1.argmax(1) == names.index("df")).any()  # df is predicted, though absent
    with pytest.warns(UserWarning, match="not in y_true"):
        expected = balanced_accuracy_score(y1, s1.argmax(1))
    assert report.balanced_accuracy == pytest.approx(expected)


def test_roc_points_match_sklearn(ham):
    y, names = ham
    scores = np.round(noisy_scores(np.eye(len(names))[y], seed=8), 1)
    curves = roc_curves(y, scores, names)
    assert list(curves) == names
    for c, name in enumerate(names):
        fpr, tpr, thresholds = roc_curve(y == c, scores[:, c], drop_intermediate=False)
        np.testing.assert_allclose(curves[name].fpr, fpr)
        np.testing.assert_allclose(curves[name].tpr, tpr)
        np.testing.assert_allclose(curves[name].thresholds, thresholds)
        assert np.trapezoid(curves[name].tpr, curves[name].fpr) == pytest.approx(
            roc_auc_score(y == c, scores[:, c])
        )


def test_weighted_auc_equals_sklearn_with_sample_weight(ham):
    """The vectorised bootstrap AUC (resample = row counts) equals sklearn on the resample."""
    y, names = ham
    positive = y == names.index("mel")
    score = np.round(noisy_scores(positive[:, None].astype(float), seed=9)[:, 0], 1)
    rng = np.random.default_rng(10)
    counts = np.stack(
        [np.bincount(rng.integers(0, len(y), len(y)), minlength=len(y)) for _ in range(5)]
    )
    got = _weighted_auc(score, positive, counts.astype(float))
    for row, value in zip(counts, got):
        expected = roc_auc_score(np.repeat(positive, row), np.repeat(score, row))
        assert value == pytest.approx(expected, rel=1e-12)
    only_negatives = np.where(positive, 0.0, 1.0)[None, :]
    assert np.isnan(_weighted_auc(score, positive, only_negatives))[0]


# ---------------------------------------------------------------------------
# Bootstrap intervals


def test_bootstrap_ci_brackets_point_and_is_seeded(ham):
    y, names = ham
    proba = softmax(noisy_scores(np.eye(len(names))[y], seed=11))
    a = classification_report(y, proba, names, n_bootstrap=200, seed=3)
    b = classification_report(y, proba, names, n_bootstrap=200, seed=3)
    c = classification_report(y, proba, names, n_bootstrap=200, seed=4)
    assert a.auc_ci.low < a.auc < a.auc_ci.high
    assert a.accuracy_ci.low < a.accuracy < a.accuracy_ci.high
    assert a.auc_ci == b.auc_ci and a.accuracy_ci == b.accuracy_ci
    assert a.auc_ci != c.auc_ci
    assert a.auc_ci.n_used == a.auc_ci.n_requested == 200


def test_bootstrap_ci_widens_when_n_shrinks(ham):
    y, names = ham
    proba = softmax(noisy_scores(np.eye(len(names))[y], seed=12))
    y_mel = (y == names.index("mel")).astype(int)
    binary = np.column_stack([1 - proba[:, names.index("mel")], proba[:, names.index("mel")]])
    big = classification_report(y_mel, binary, ["other", "mel"], n_bootstrap=300)
    small = classification_report(y_mel[:200], binary[:200], ["other", "mel"], n_bootstrap=300)
    width = lambda ci: ci.high - ci.low  # noqa: E731
    assert width(small.auc_ci) > 2 * width(big.auc_ci)
    assert width(small.accuracy_ci) > 2 * width(big.accuracy_ci)


def test_bootstrap_skips_resamples_without_both_classes(ham):
    """12 rows with 2 positives: many resamples hold no positive; they are counted out."""
    y, names = ham
    y_small = np.array([1, 1] + [0] * 10)
    score = np.linspace(0, 1, 12)[::-1]
    report = classification_report(
        y_small, np.column_stack([-score, score]), ["no", "yes"], n_bootstrap=500
    )
    # P(no positive in a resample) = (10/12)^12 ~ 0.11, so roughly 55 of 500 are dropped.
    assert 350 < report.auc_ci.n_used < 500
    assert report.accuracy_ci.n_used == 500


def test_multiclass_bootstrap_skips_resamples_missing_a_class(ham):
    """One vascular lesion and 10 each of nv, mel, bkl: resamples without it have no macro AUC."""
    y, names = ham
    rows = np.concatenate(
        [np.flatnonzero(y == names.index(name))[:count] for name, count in
         [("vasc", 1), ("nv", 10), ("mel", 10), ("bkl", 10)]]
    )
    scores = noisy_scores(np.eye(len(names))[y[rows]], seed=16)
    report = classification_report(y[rows], scores, names, n_bootstrap=1000)
    assert report.auc_skipped == ["akiec", "bcc", "df"]
    # P(the one vasc row is never drawn) = (30/31)^31 ~ 0.36 -> about 640 resamples kept.
    assert 560 < report.auc_ci.n_used < 720
    assert report.auc_ci.low <= report.auc <= report.auc_ci.high


def test_bootstrap_accuracy_ci_matches_binomial_width(ham):
    """A 95% percentile interval of an accuracy spans about 2 x 1.96 binomial standard errors."""
    y, names = ham
    scores = noisy_scores(np.eye(len(names))[y], seed=17)
    report = classification_report(y, scores, names, n_bootstrap=1000)
    p, n = report.accuracy, len(y)
    expected_width = 2 * 1.96 * np.sqrt(p * (1 - p) / n)
    width = report.accuracy_ci.high - report.accuracy_ci.low
    assert width == pytest.approx(expected_width, rel=0.15)


def test_bootstrap_is_fast(ham):
    y, names = ham
    scores = noisy_scores(np.eye(len(names))[y], seed=13)
    start = time.perf_counter()
    report = classification_report(y, scores, names, n_bootstrap=1000)
    assert time.perf_counter() - start < 5.0  # one sklearn call per class and resample takes ~10 s
    assert report.auc_ci.n_used == 1000


# ---------------------------------------------------------------------------
# Classification input errors and JSON


@pytest.mark.parametrize(
    ("y_true", "y_score", "message"),
    [
        ([0, 1, 2], np.zeros((3, 2)), "outside 0..1"),
        ([0, 1], np.zeros((3, 2)), "must have shape"),
        ([0, 1, 1], np.zeros(3), "must be 2-D"),
        ([0.5, 1, 0], np.zeros((3, 2)), "integer class indices"),
        ([0, 1, 0], [[0, 1], [np.nan, 0], [1, 0]], "NaN"),
    ],
)
def test_classification_input_errors(y_true, y_score, message):
    with pytest.raises(ClassifyError, match=message):
        classification_report(y_true, y_score, ["a", "b"], n_bootstrap=0)


def test_classification_to_dict_is_json(ham):
    y, names = ham
    proba = softmax(noisy_scores(np.eye(len(names))[y], seed=14))
    report = classification_report(y, proba, names, n_bootstrap=50)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["auc"] == pytest.approx(report.auc)
    assert data["auc_ci"]["n_used"] == 50
    assert data["per_class"][0]["name"] == names[0]
    assert len(data["confusion_matrix"]) == len(names)
    assert "roc" not in data
    with_roc = json.loads(json.dumps(report.to_dict(include_roc=True)))
    assert with_roc["roc"]["mel"]["fpr"][0] == 0.0


# ---------------------------------------------------------------------------
# Retrieval, hand-computed

# Three queries, five hits each, database class sizes a: 10, b: 2, c: 4.
#   q0 'a': a b a a c  -> relevant 1 0 1 1 0
#   q1 'b': c c b a b  -> relevant 0 0 1 0 1
#   q2 'c': a b a b a  -> relevant 0 0 0 0 0
QUERIES = np.array(["a", "b", "c"])
RETRIEVED = np.array([list("abaac"), list("ccbab"), list("ababa")])
DB_SIZES = {"a": 10, "b": 2, "c": 4}


def test_relevance_from_labels():
    relevant, n_relevant = relevance_from_labels(QUERIES, RETRIEVED, DB_SIZES)
    np.testing.assert_array_equal(relevant, [[1, 0, 1, 1, 0], [0, 0, 1, 0, 1], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(n_relevant, [10, 2, 4])
    assert class_sizes(["a"] * 10 + ["b"] * 2 + ["c"] * 4) == DB_SIZES
    # Integer labels with a sequence of sizes; a class absent from it has R_q = 0.
    _, n_relevant = relevance_from_labels([0, 2, 3], [[0], [1], [1]], [5, 6, 7])
    np.testing.assert_array_equal(n_relevant, [5, 7, 0])


def test_precision_and_acc_by_hand():
    relevant, _ = relevance_from_labels(QUERIES, RETRIEVED, DB_SIZES)
    # P@1 = [1, 0, 0]; P@5 = [3/5, 2/5, 0/5]
    np.testing.assert_allclose(precision_at_k(relevant, 1), [1, 0, 0])
    np.testing.assert_allclose(precision_at_k(relevant, 5), [3 / 5, 2 / 5, 0])
    # ACC@1 = [1, 0, 0]; ACC@3: q1's first hit is at rank 3 -> [1, 1, 0]
    np.testing.assert_allclose(acc_at_k(relevant, 1), [1, 0, 0])
    np.testing.assert_allclose(acc_at_k(relevant, 3), [1, 1, 0])


def test_average_precision_by_hand():
    relevant, n_relevant = relevance_from_labels(QUERIES, RETRIEVED, DB_SIZES)
    # q0: hits at ranks 1, 3, 4 -> P@i = 1/1, 2/3, 3/4; sum = 29/12
    # q1: hits at ranks 3, 5    -> P@i = 1/3, 2/5;      sum = 11/15
    # q2: no hit                -> sum = 0
    # normalize="database": divide by min(5, R_q) = 5, 2, 4
    database = [29 / 12 / 5, 11 / 15 / 2, 0]
    np.testing.assert_allclose(average_precision_at_k(relevant, n_relevant, 5), database)
    assert map_at_k(relevant, n_relevant, 5) == pytest.approx((29 / 60 + 22 / 60) / 3)  # 17/60
    # normalize="retrieved" (Mahbod et al.): divide by hits in the top 5 = 3, 2, 0 (-> AP 0)
    retrieved = [29 / 12 / 3, 11 / 15 / 2, 0]
    np.testing.assert_allclose(average_precision_at_k(relevant, None, 5, "retrieved"), retrieved)
    assert map_at_k(relevant, None, 5, "retrieved") == pytest.approx(211 / 540)
    # At k=1 both are P@1 for queries with R_q >= 1: [1, 0, 0]
    np.testing.assert_allclose(average_precision_at_k(relevant, n_relevant, 1), [1, 0, 0])


def test_average_precision_mahbod_example():
    # Mahbod et al.'s own docstring example: relevance 1 1 0 1 0 at k=5 gives 0.9167
    # = (1/1 + 2/2 + 3/4) / 3 with normalize="retrieved"; with R_q = 3 "database" agrees,
    # with R_q = 10 it is (1 + 1 + 3/4) / 5 = 0.55.
    relevant = np.array([[1, 1, 0, 1, 0]], dtype=bool)
    assert average_precision_at_k(relevant, None, 5, "retrieved")[0] == pytest.approx(11 / 12)
    assert average_precision_at_k(relevant, np.array([3]), 5)[0] == pytest.approx(11 / 12)
    assert average_precision_at_k(relevant, np.array([10]), 5)[0] == pytest.approx(0.55)


def test_majority_vote_by_hand():
    # q0 top 5 a b a a c: a has 3 votes -> 'a', right.
    # q1 top 5 c c b a b: c and b tie at 2; 'first' takes c (rank 1) -> wrong; 'any' -> right.
    # q2 top 5 a b a b a: a has 3 votes -> wrong (query is c).
    np.testing.assert_allclose(majority_vote_at_k(QUERIES, RETRIEVED, 5), [1, 0, 0])
    np.testing.assert_allclose(majority_vote_at_k(QUERIES, RETRIEVED, 5, ties="any"), [1, 1, 0])
    # k=4, q1 top 4 c c b a: c wins outright -> wrong either way.
    np.testing.assert_allclose(majority_vote_at_k(QUERIES, RETRIEVED, 4, ties="any"), [1, 0, 0])
    # k=1 is P@1.
    np.testing.assert_allclose(majority_vote_at_k(QUERIES, RETRIEVED, 1), [1, 0, 0])


def test_precision_denner_by_hand():
    # Four queries, k = 3, per-query value = (relevant hits in top n) / n, n = min(3, R_q):
    #   q0 class a, R=10, rel 1 1 0 0 0 -> n=3, 2 hits -> 2/3
    #   q1 class a, R=10, rel 0 0 0 1 1 -> n=3, 0 hits -> 0
    #   q2 class b, R=1,  rel 0 1 0 0 0 -> n=1, 0 hits in the top 1 -> 0
    #   q3 class c, R=2,  rel 1 0 1 0 0 -> n=2, 1 hit in the top 2 -> 1/2
    # micro = (2/3 + 0 + 0 + 1/2) / 4 = 7/24
    # macro = mean(a: (2/3 + 0)/2 = 1/3, b: 0, c: 1/2) = 5/18
    relevant = np.array(
        [[1, 1, 0, 0, 0], [0, 0, 0, 1, 1], [0, 1, 0, 0, 0], [1, 0, 1, 0, 0]], dtype=bool
    )
    n_relevant = np.array([10, 10, 1, 2])
    classes = np.array(["a", "a", "b", "c"])
    np.testing.assert_allclose(
        precision_at_k_denner(relevant, n_relevant, 3, average=None), [2 / 3, 0, 0, 1 / 2]
    )
    assert precision_at_k_denner(relevant, n_relevant, 3) == pytest.approx(7 / 24)
    macro = precision_at_k_denner(relevant, n_relevant, 3, classes, average="macro")
    assert macro == pytest.approx(5 / 18)


def test_retrieval_report_by_hand():
    report = retrieval_report(QUERIES, RETRIEVED, DB_SIZES, ks=(5, 1))
    assert report.ks == [1, 5] and report.n_queries == 3 and not report.multilabel
    at5 = report.at(5)
    # Values from the tests above; Denner at k=5: n = min(5, R) = 5, 2, 4 and hits in the
    # top n = 3, 0, 0 -> micro (3/5 + 0 + 0)/3 = 1/5; one query per class -> macro 1/5.
    assert at5 == RetrievalAtK(
        k=5,
        n_queries=3,
        precision=pytest.approx(1 / 3),
        map=pytest.approx(17 / 60),
        map_retrieved=pytest.approx(211 / 540),
        acc=pytest.approx(2 / 3),
        majority_vote=pytest.approx(1 / 3),
        precision_denner=pytest.approx(1 / 5),
        precision_denner_macro=pytest.approx(1 / 5),
    )
    assert report.at(1).precision == pytest.approx(1 / 3)
    # Class b alone at k=5: P = 2/5, AP = 11/30 (database) and 11/30 (retrieved), ACC = 1.
    b5 = report.per_class["b"][1]
    assert (b5.k, b5.n_queries, b5.acc) == (5, 1, 1.0)
    assert (b5.precision, b5.map) == pytest.approx((0.4, 11 / 30))
    assert b5.precision_denner_macro is None
    assert set(report.per_class) == {"a", "b", "c"}
    assert report.n_queries_without_relevant == 0
    # Every reported metric has a definition.
    metric_fields = set(RetrievalAtK.__dataclass_fields__) - {"k", "n_queries"}
    assert metric_fields <= set(report.definitions) == set(RETRIEVAL_DEFINITIONS)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["overall"][1]["map"] == pytest.approx(17 / 60)
    any_tie = retrieval_report(QUERIES, RETRIEVED, DB_SIZES, ks=(5,), ties="any")
    assert any_tie.at(5).majority_vote == pytest.approx(2 / 3)


def test_retrieval_report_integer_labels_get_class_names():
    report = retrieval_report(
        [0, 1], [[0, 1], [0, 0]], [3, 3], ks=(2,), class_names=["benign", "malignant"]
    )
    assert set(report.per_class) == {"benign", "malignant"}
    assert report.per_class["malignant"][0].precision == 0.0


def test_multilabel_relevance_and_report_by_hand():
    # Database label sets (labels 0..3; label 3 is carried by nobody):
    #   0:{0} 1:{1} 2:{0,1} 3:{2} 4:{} 5:{0,2}
    db = np.array(
        [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]]
    )
    # q0 {0}   shares a label with rows 0, 2, 5        -> R = 3; hits 3, 0, 2 -> 0 1 1
    # q1 {1,2} shares a label with rows 1, 2, 3, 5     -> R = 4; hits 4, 1, 0 -> 0 1 0
    # q2 {}    shares nothing                          -> R = 0; hits 0, 1, 2 -> 0 0 0
    queries = np.array([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    ids = np.array([[3, 0, 2], [4, 1, 0], [0, 1, 2]])
    relevant, n_relevant = relevance_from_label_sets(queries, db[ids], db)
    np.testing.assert_array_equal(relevant, [[0, 1, 1], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(n_relevant, [3, 4, 0])

    report = retrieval_report(
        queries, ks=(3,), relevant=relevant, n_relevant=n_relevant,
        class_names=["x", "y", "z", "w"],
    )
    at3 = report.at(3)
    # P@3 = [2/3, 1/3, 0] -> 1/3.  AP@3 (database): q0 (1/2 + 2/3)/min(3,3) = 7/18,
    # q1 (1/2)/min(3,4) = 1/6, q2 0 -> (7/18 + 3/18)/3 = 10/54 = 5/27.
    assert at3.precision == pytest.approx(1 / 3)
    assert at3.map == pytest.approx(5 / 27)
    assert at3.majority_vote is None and report.multilabel
    assert report.n_queries_without_relevant == 1
    # Label groups: x = {q0}, y = {q1}, z = {q1}, w = {} (left out);
    # Denner per query = [2/3, 1/3, 0]
    # -> macro = mean(2/3, 1/3, 1/3) = 4/9; micro = 1/3.
    assert set(report.per_class) == {"x", "y", "z"}
    assert at3.precision_denner == pytest.approx(1 / 3)
    assert at3.precision_denner_macro == pytest.approx(4 / 9)


def test_vectorised_retrieval_matches_plain_loops():
    """Random relevance: AP and Denner P@k equal straightforward per-query loops."""
    rng = np.random.default_rng(15)
    relevant = rng.random((60, 10)) < 0.4
    n_relevant = relevant.sum(1) + rng.integers(0, 8, 60)
    for k in (1, 4, 10):
        expected_db, expected_ret, expected_denner = [], [], []
        for rel, r in zip(relevant, n_relevant):
            hits, total = 0, 0.0
            for i in range(k):
                if rel[i]:
                    hits += 1
                    total += hits / (i + 1)
            expected_db.append(total / min(k, r) if min(k, r) else 0.0)
            expected_ret.append(total / hits if hits else 0.0)
            n = min(k, r)
            expected_denner.append(sum(rel[:n]) / n if n else 0.0)
        np.testing.assert_allclose(average_precision_at_k(relevant, n_relevant, k), expected_db)
        np.testing.assert_allclose(
            average_precision_at_k(relevant, None, k, "retrieved"), expected_ret
        )
        np.testing.assert_allclose(
            precision_at_k_denner(relevant, n_relevant, k, average=None), expected_denner
        )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: precision_at_k(np.ones((2, 3), bool), 4), "outside 1..3"),
        (lambda: average_precision_at_k(np.ones((1, 3), bool), np.array([2]), 3), "only 2"),
        (lambda: average_precision_at_k(np.ones((1, 3), bool), None, 3), "needs n_relevant"),
        (lambda: retrieval_report(QUERIES, RETRIEVED, DB_SIZES, ks=(6,)), "ks must lie in 1..5"),
        (lambda: retrieval_report(np.zeros((2, 3))), "multi-label queries need relevant"),
        (lambda: majority_vote_at_k(QUERIES, RETRIEVED, 3, ties="last"), "ties must be"),
        (
            lambda: precision_at_k_denner(np.ones((1, 2), bool), [2], 2, average="macro"),
            "needs query_labels",
        ),
    ],
)
def test_retrieval_input_errors(call, message):
    with pytest.raises(SearchError, match=message):
        call()
