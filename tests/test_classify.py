"""Classification on stored embeddings: the paper's protocol, kNN over FAISS, saving, the CLI.

Everything runs on real HAM10000 images embedded with the real efficientnet-lite0
weights (the session ``ham_store`` of conftest), and is checked against scikit-learn
or brute-force numpy on the same arrays.
"""

from __future__ import annotations

import json
import pickle
import shutil

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner
from sklearn import metrics as skm
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.utils.estimator_checks import parametrize_with_checks
from threadpoolctl import threadpool_limits

from mediret.classify import (
    ClassifySettings,
    FaissKNNClassifier,
    class_scores,
    classify,
    cv_splitter,
    list_classifiers,
    load_classifier,
    load_data,
    predict_images,
)
from mediret.cli import cli
from mediret.errors import ClassifyError
from mediret.records import ImageRecord
from mediret.store import EncoderInfo, Store

FAST = dict(n_bootstrap=50, cv=3)


@pytest.fixture(scope="module")
def ham_data(ham_store):
    """Training and test sides of the random split of the real HAM10000 store."""
    with Store.open(ham_store) as store:
        return load_data(store, ClassifySettings(**FAST))


@pytest.fixture(scope="module")
def lr_svm_result(ham_store):
    return classify(ham_store, ["lr", "svm"], ClassifySettings(**FAST))


@pytest.fixture
def writable_store(ham_store, tmp_path):
    """A private copy of the shared store, for tests that write to it."""
    return shutil.copytree(ham_store, tmp_path / "ham")


def _copy_store(src, dest, encoder: EncoderInfo | None = None, drop_label: str | None = None):
    """A new store holding the real vectors and records of ``src`` (optionally one label fewer)."""
    from mediret.ingest import assign_splits

    with Store.open(src) as source:
        ids = source.ids()
        records = [ImageRecord(r.image_id, r.source, r.labels, group=r.group_id)
                   for r in source.records(ids)]
        keep = [i for i, r in enumerate(records) if drop_label not in r.labels]
        vectors = source.vectors(ids)[keep]
        digest = dict(source.sql("SELECT id, content_hash FROM images"))
        hashes = [digest[int(ids[i])] for i in keep]
        names = [n for n in source.label_names() if n != drop_label]
        encoder = encoder or source.encoder
        fmt = source.get_info("format")
    with Store.create(dest, encoder) as store:
        store.add([records[i] for i in keep], vectors, content_hashes=hashes)
        store.commit()
        store.set_label_names(names)
        store.set_info("multilabel", "false")
        store.set_info("format", fmt)
        assign_splits(store, seed=0, test_fraction=0.2)
    return dest


# ---- the matrices come from the store ---------------------------------------------------


def test_matrices_are_the_stored_faiss_vectors(ham_store, ham_data):
    with Store.open(ham_store) as store:
        np.testing.assert_array_equal(ham_data.train.X, store.index.reconstruct_batch(ham_data.train.ids))
        names = store.label_names()
        labels = {r.id: r.labels[0] for r in store.records(ham_data.test.ids)}
        splits = dict(store.sql("SELECT id, split FROM splits WHERE scheme = 'random'"))
    assert [ham_data.class_names[c] for c in ham_data.test.y] == [labels[i] for i in ham_data.test.ids]
    assert set(ham_data.class_names) <= set(names)
    assert {splits[i] for i in ham_data.test.ids} == {"test"}
    assert {splits[i] for i in ham_data.train.ids} == {"train"}


# ---- metrics of the pipeline against scikit-learn -----------------------------------------


def _sklearn_metrics(y, scores, n_classes):
    predicted = scores.argmax(axis=1)
    present = np.unique(y)
    return {
        "auc": np.mean([skm.roc_auc_score(y == c, scores[:, c]) for c in present]),
        "accuracy": skm.accuracy_score(y, predicted),
        "balanced_accuracy": skm.balanced_accuracy_score(y, predicted),
        "precision": skm.precision_score(y, predicted, labels=range(n_classes), average="macro",
                                         zero_division=0),
        "recall": skm.recall_score(y, predicted, labels=range(n_classes), average="macro",
                                   zero_division=0),
        "f1": skm.f1_score(y, predicted, labels=range(n_classes), average="macro", zero_division=0),
        "confusion": skm.confusion_matrix(y, predicted, labels=range(n_classes)),
    }


@pytest.mark.parametrize("kind", ["lr", "svm"])
def test_pipeline_metrics_match_sklearn(lr_svm_result, ham_data, kind):
    model = next(m for m in lr_svm_result.models if m.kind == kind)
    y, X = ham_data.test.y, ham_data.test.X
    if kind == "lr":
        scores = model.model.predict_proba(X)
        assert model.score_source == "predict_proba"
    else:
        scores = model.model.decision_function(X)
        assert model.score_source == "decision_function"
        # break_ties: the SVM's own predictions are the argmax the metrics use
        np.testing.assert_array_equal(model.model.predict(X), scores.argmax(axis=1))
    expected = _sklearn_metrics(y, scores, len(ham_data.class_names))
    m = model.metrics
    for name in ("auc", "accuracy", "balanced_accuracy", "precision", "recall", "f1"):
        assert getattr(m, name) == pytest.approx(expected[name], abs=1e-12), name
    np.testing.assert_array_equal(m.confusion_matrix, expected["confusion"])
    if set(range(len(ham_data.class_names))) == set(y.tolist()) and kind == "lr":
        assert m.auc == pytest.approx(skm.roc_auc_score(y, scores, multi_class="ovr"), abs=1e-12)
    assert m.auc_ci.low <= m.auc <= m.auc_ci.high
    assert m.accuracy_ci.low <= m.accuracy <= m.accuracy_ci.high
    assert m.n_samples == len(ham_data.test)


def _multilabel_store(src, dest):
    """The real vectors of ``src`` with two labels per image: the diagnosis and the patient's sex."""
    from mediret.ingest import assign_splits

    with Store.open(src) as source:
        ids = source.ids()
        records = [ImageRecord(r.image_id, r.source, (r.labels[0], r.meta["sex"]), group=r.group_id)
                   for r in source.records(ids)]
        vectors, encoder = source.vectors(ids), source.encoder
    with Store.create(dest, encoder) as store:
        store.add(records, vectors)
        store.commit()
        store.set_label_names(sorted({label for r in records for label in r.labels}))
        store.set_info("multilabel", "true")
        assign_splits(store, seed=0, test_fraction=0.2)
    return dest


def test_multilabel_pipeline_matches_sklearn(ham_store, tmp_path):
    store = _multilabel_store(ham_store, tmp_path / "multilabel")
    settings = ClassifySettings(split="group", **FAST)
    result = classify(store, ["lr", "svm", "knn"], settings)
    with Store.open(store) as opened:
        data = load_data(opened, settings)
    Y = data.test.y
    assert Y.ndim == 2 and {"male", "female", "nv"} <= set(result.class_names)
    for model in result.models:
        if model.kind != "knn":
            assert type(model.model[-1]).__name__ == "OneVsRestClassifier"
        scores, source = class_scores(model.model, data.test.X)
        threshold = 0.5 if source == "predict_proba" else 0.0
        defined = [c for c in range(Y.shape[1]) if 0 < Y[:, c].sum() < len(Y)]
        assert model.metrics.auc == pytest.approx(
            skm.roc_auc_score(Y[:, defined], scores[:, defined], average="macro"), abs=1e-12)
        assert model.metrics.accuracy == pytest.approx(skm.accuracy_score(Y, scores >= threshold))
        assert model.metrics.f1 == pytest.approx(
            skm.f1_score(Y, scores >= threshold, average="macro", zero_division=0))


def test_grid_search_follows_the_protocol(lr_svm_result, ham_data):
    lr, svm = lr_svm_result.models
    assert {r["params"]["C"] for r in lr.cv_results} == {0.1, 1.0, 10.0, 100.0}
    searched = {(r["params"]["kernel"], r["params"].get("gamma")) for r in svm.cv_results}
    assert searched == {("linear", None), ("rbf", "scale"), ("rbf", "auto")}
    assert len(svm.cv_results) == 12
    # refit on all training images, with the best C
    from sklearn.linear_model import LogisticRegression

    with threadpool_limits(1):
        refit = LogisticRegression(C=lr.best_params["C"], max_iter=1000).fit(ham_data.train.X,
                                                                            ham_data.train.y)
    np.testing.assert_allclose(lr.model[-1].coef_, refit.coef_, rtol=1e-5, atol=1e-6)
    assert lr.cv_accuracy == max(r["mean_accuracy"] for r in lr.cv_results)
    assert lr.converged is True


# ---- kNN over FAISS --------------------------------------------------------------------


def _brute_force_knn(X_train, y_onehot, X_test, k, weights):
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = unit(X_test.astype(np.float64)) @ unit(X_train.astype(np.float64)).T
    neighbours = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(sims, neighbours, axis=1)
    w = np.ones_like(top) if weights == "uniform" else 1.0 / np.maximum(1.0 - top, 1e-300)
    votes = np.einsum("nk,nkc->nc", w, y_onehot[neighbours])
    return neighbours, votes / w.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.parametrize("k", [1, 5, 15])
def test_knn_matches_brute_force_cosine(ham_data, k, weights):
    train, test = ham_data.train, ham_data.test
    knn = FaissKNNClassifier(n_neighbors=k, weights=weights).fit(train.X, train.y)
    onehot = np.eye(len(knn.classes_))[np.searchsorted(knn.classes_, train.y)]
    neighbours, proba = _brute_force_knn(train.X, onehot, test.X, k, weights)
    np.testing.assert_array_equal(knn.kneighbors(test.X)[1], neighbours)
    np.testing.assert_allclose(knn.predict_proba(test.X), proba, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(knn.predict(test.X), knn.classes_[proba.argmax(axis=1)])


def test_knn_matches_sklearn_cosine_neighbours(ham_data):
    train, test = ham_data.train, ham_data.test
    ours = FaissKNNClassifier(n_neighbors=7).fit(train.X, train.y)
    theirs = KNeighborsClassifier(n_neighbors=7, metric="cosine", algorithm="brute").fit(train.X, train.y)
    np.testing.assert_allclose(ours.predict_proba(test.X), theirs.predict_proba(test.X), atol=1e-12)


def test_knn_distance_weights_give_exact_matches_the_vote(ham_data):
    train = ham_data.train
    knn = FaissKNNClassifier(n_neighbors=5, weights="distance").fit(train.X, train.y)
    # each training vector finds itself at distance 0 and takes the whole vote
    np.testing.assert_array_equal(knn.predict(train.X[:20]), train.y[:20])


def test_knn_multilabel_matches_brute_force(ham_data, ham_store):
    train, test = ham_data.train, ham_data.test
    with Store.open(ham_store) as store:
        meta = {r.id: r.meta for r in store.records(np.r_[train.ids, test.ids])}
    # a real multi-label target: the diagnosis is melanocytic (nv/mel), the patient is male
    mel_or_nv = np.isin(np.array(ham_data.class_names)[train.y], ["nv", "mel"])
    male = np.array([meta[i].get("sex") == "male" for i in train.ids])
    Y = np.column_stack([mel_or_nv, male]).astype(int)
    knn = FaissKNNClassifier(n_neighbors=5).fit(train.X, Y)
    _, proba = _brute_force_knn(train.X, Y.astype(float), test.X, 5, "uniform")
    np.testing.assert_allclose(knn.predict_proba(test.X), proba, atol=1e-12)
    np.testing.assert_array_equal(knn.predict(test.X), (proba >= 0.5).astype(int))


def test_knn_in_grid_search_and_pickle(ham_data):
    train, test = ham_data.train, ham_data.test
    search = GridSearchCV(FaissKNNClassifier(), {"n_neighbors": [1, 3, 9], "weights": ["uniform", "distance"]},
                          cv=3).fit(train.X, train.y)
    assert search.best_params_["n_neighbors"] in (1, 3, 9)
    manual = cross_val_score(FaissKNNClassifier(**search.best_params_), train.X, train.y, cv=3)
    assert manual.mean() == pytest.approx(search.best_score_)
    restored = pickle.loads(pickle.dumps(search.best_estimator_))
    np.testing.assert_array_equal(restored.predict_proba(test.X), search.best_estimator_.predict_proba(test.X))


def test_knn_refuses_more_neighbours_than_vectors(ham_data):
    knn = FaissKNNClassifier(n_neighbors=10).fit(ham_data.train.X[:5], ham_data.train.y[:5])
    with pytest.raises(ValueError, match="n_neighbors <= n_samples_fit"):
        knn.predict(ham_data.test.X)


_EXPECTED_FAILED_CHECKS = {
    # The check wants multi-label probabilities strictly inside (0, 1); a kNN vote share
    # is exactly 0 or 1 whenever the neighbours agree, and that is the right answer.
    "check_classifiers_multilabel_output_format_predict_proba":
        "kNN vote shares are legitimately exactly 0 or 1",
}


@parametrize_with_checks([FaissKNNClassifier(), FaissKNNClassifier(n_neighbors=3, weights="distance")],
                         expected_failed_checks=lambda est: _EXPECTED_FAILED_CHECKS)
def test_knn_estimator_checks(estimator, check):
    check(estimator)


# ---- splits and CV folds -------------------------------------------------------------------


def test_group_split_and_its_cv_folds_are_group_disjoint(ham_store):
    with Store.open(ham_store) as store:
        data = load_data(store, ClassifySettings(split="group", **FAST))
    assert data.split.group_disjoint and data.split.claims_group_disjoint
    assert data.split.groups_shared == 0
    assert not set(data.train.groups) & set(data.test.groups)
    folds = list(cv_splitter("group", False, 3, seed=0).split(data.train.X, data.train.y,
                                                             data.train.groups))
    assert len(folds) == 3
    for fit_rows, val_rows in folds:
        assert not set(data.train.groups[fit_rows]) & set(data.train.groups[val_rows])
    # HAM10000 has several images per lesion: image-level folds do mix lesions
    mixed = [set(data.train.groups[a]) & set(data.train.groups[b])
             for a, b in cv_splitter("random", False, 3, 0).split(data.train.X, data.train.y)]
    assert any(mixed)


def test_random_split_reports_its_group_leakage(ham_data):
    s = ham_data.split
    shared = set(ham_data.train.groups) & set(ham_data.test.groups)
    assert s.groups_shared == len(shared) > 0
    assert s.test_images_in_shared_groups == sum(g in shared for g in ham_data.test.groups)
    assert s.groups_train == len(set(ham_data.train.groups))
    assert not s.group_disjoint and not s.claims_group_disjoint


def test_broken_group_split_is_refused(writable_store):
    con = duckdb.connect(str(writable_store / "mediret.duckdb"))
    # move one image of a multi-image lesion to the other side
    image_id = con.execute(
        "SELECT s.id FROM splits s JOIN images i USING (id) WHERE s.scheme = 'group' AND i.group_id IN "
        "(SELECT group_id FROM images GROUP BY group_id HAVING count(*) > 1) LIMIT 1").fetchone()[0]
    con.execute("UPDATE splits SET split = CASE split WHEN 'test' THEN 'train' ELSE 'test' END "
                "WHERE scheme = 'group' AND id = ?", [image_id])
    con.close()
    with pytest.raises(ClassifyError, match="not group-disjoint"):
        classify(writable_store, ["lr"], ClassifySettings(split="group", **FAST))


def test_given_split_trains_on_everything_but_its_test_part(writable_store):
    with Store.open(writable_store, read_only=False) as store:
        ids = store.ids()
        given = np.array(["train", "val", "test"])[np.arange(len(ids)) % 3]
        store.set_splits("given", ids, given.tolist())
    result = classify(writable_store, ["knn"], ClassifySettings(split="given", **FAST))
    assert result.split.n_test == int((given == "test").sum())
    assert result.split.n_train == int((given != "test").sum())
    assert not result.split.claims_group_disjoint


# ---- external validation -------------------------------------------------------------------


def test_external_validation_scores_every_image_of_the_other_store(ham_store, tmp_path):
    other = _copy_store(ham_store, tmp_path / "site2")
    result = classify(ham_store, ["lr"], ClassifySettings(**FAST), external=other)
    with Store.open(other) as store:
        n_other = len(store)
    assert result.split.n_test == result.models[0].metrics.n_samples == n_other
    assert result.external["store"] == str(other)
    # the copy holds the training images too: the overlap checks must see every one
    assert result.split.duplicates_shared == result.split.n_train
    assert result.split.groups_shared == result.split.groups_train


@pytest.mark.parametrize("change, message", [
    ({"encoder": EncoderInfo("squeezenet1_1", 1280, "imagenet", "x")}, "encoder 'efficientnet-lite0' here"),
    ({"encoder": EncoderInfo("efficientnet-lite0", 1280, "imagenet", "x")}, "preprocessing"),
    ({"drop_label": "df"}, "only here: df"),
])
def test_external_mismatch_fails_clearly(ham_store, tmp_path, change, message):
    other = _copy_store(ham_store, tmp_path / "other", **change)
    with pytest.raises(ClassifyError, match=message):
        classify(ham_store, ["lr"], ClassifySettings(**FAST), external=other)


# ---- saved classifiers and --predict --------------------------------------------------------


def test_saved_classifier_round_trip(writable_store, ham_data):
    result = classify(writable_store, ["lr", "knn"], ClassifySettings(**FAST), save=True)
    with Store.open(writable_store) as store:
        saved = list_classifiers(store)
        assert {s.name for s in saved} == {"lr-random", "knn-random"}
        lr = load_classifier(store, "lr-random")
        newest = load_classifier(store)
        with pytest.raises(ClassifyError, match="no classifier 'svm-random'.*lr-random"):
            load_classifier(store, "svm-random")
    assert newest.name == saved[0].name
    assert lr.encoder["name"] == "efficientnet-lite0" and lr.split == "random"
    assert lr.class_names == ham_data.class_names and lr.params == result.models[0].best_params
    assert lr.metrics["auc"] == pytest.approx(result.models[0].metrics.auc)
    np.testing.assert_array_equal(lr.model.predict_proba(ham_data.test.X),
                                  result.models[0].model.predict_proba(ham_data.test.X))


def test_no_saved_classifier_is_a_clear_error(ham_store):
    with Store.open(ham_store) as store, pytest.raises(ClassifyError, match="no classifier is saved"):
        load_classifier(store)


@pytest.mark.slow
def test_predict_labels_a_new_image_like_its_stored_vector(writable_store, ham_data):
    classify(writable_store, ["lr"], ClassifySettings(**FAST), save=True)
    with Store.open(writable_store) as store:
        model = load_classifier(store).model
        record = store.records(ham_data.test.ids[:2])
    out = predict_images(writable_store, [r.source for r in record])
    assert out.model == "lr-random" and out.score_source == "predict_proba" and not out.warnings
    expected, _ = class_scores(model, ham_data.test.X[:2])
    for image, row in zip(out.images, expected):
        got = np.array([image.scores[name] for name in ham_data.class_names])
        np.testing.assert_allclose(got, row, atol=2e-3)
        assert image.predicted == [ham_data.class_names[int(row.argmax())]]
        assert sum(image.scores.values()) == pytest.approx(1.0)


# ---- settings and the CLI --------------------------------------------------------------------


def test_settings_are_checked():
    with pytest.raises(ClassifyError, match="unknown split"):
        ClassifySettings(split="patient")
    with pytest.raises(ClassifyError, match="positive"):
        ClassifySettings(C=(0.0, 1.0))


def test_cli_json_and_report(ham_store, tmp_path):
    report = tmp_path / "report"
    result = CliRunner().invoke(cli, ["classify", "--store", str(ham_store), "--clf", "lr",
                                      "--clf", "knn", "--cv", "3", "--bootstrap", "50", "--no-save",
                                      "--report", str(report), "--format", "json", "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [m["kind"] for m in data["models"]] == ["lr", "knn"]
    assert data["split"]["scheme"] == "random" and data["paper"]["auc"][0]["auc"] == 0.9586
    assert {p.name for p in report.iterdir()} == {"result.json", "roc-lr.png", "roc-knn.png", "summary.md"}
    written = json.loads((report / "result.json").read_text())
    assert written["models"][0]["metrics"]["auc"] == data["models"][0]["metrics"]["auc"]
    assert "roc" in written["models"][0]["metrics"]
    summary = (report / "summary.md").read_text()
    assert "0.9586" in summary and "efficientnet-lite0" in summary and "random" in summary
    assert (report / "roc-lr.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_cli_table_and_predict(writable_store):
    runner = CliRunner()
    trained = runner.invoke(cli, ["classify", "-s", str(writable_store), "--clf", "linearsvc",
                                  "--split", "group", "--cv", "3", "--bootstrap", "0", "-q"])
    assert trained.exit_code == 0, trained.output
    assert "group-disjoint, as the split claims (checked)" in trained.output
    assert "linearsvc-group" in trained.output
    with Store.open(writable_store) as store:
        image = store.records(store.ids()[:1])[0]
    predicted = runner.invoke(cli, ["classify", "-s", str(writable_store), "--predict", image.source,
                                    "--model", "linearsvc-group"])
    assert predicted.exit_code == 0, predicted.output
    assert "decision value" in predicted.output and image.source in predicted.output


@pytest.mark.parametrize("args, message", [
    (["--split", "given"], "split 'given' is not in"),
    (["--C", "one,ten"], "comma-separated float"),
    (["--predict", "{image}", "--report", "out"], "cannot be combined"),
    (["--predict", "{image}"], "no classifier is saved"),
    (["--external", "{missing}"], "no store at"),
    (["--clf", "knn", "-k", "500"], "k up to 500"),
])
def test_cli_error_exits(ham_store, tmp_path, args, message):
    with Store.open(ham_store) as store:
        image = store.records(store.ids()[:1])[0].source
    args = [a.format(image=image, missing=tmp_path / "nowhere") for a in args]
    result = CliRunner().invoke(cli, ["classify", "-s", str(ham_store), "--no-save", "-q", *args])
    assert result.exit_code in (1, 2)
    assert message in result.output
    assert "Traceback" not in result.output
