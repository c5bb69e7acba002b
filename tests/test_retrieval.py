"""Retrieval evaluation: test queries against the train database, checked against numpy by hand."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from mediret.cli import cli
from mediret.datasets import read_dataset
from mediret.errors import SearchError
from mediret.retrieval import evaluate_retrieval
from mediret.index import open_index
from mediret.store import EncoderInfo, Store

from .conftest import MEDMNIST, requires_data
from .vector_stores import ham_vector_store, odir_multilabel_store, one_faiss_thread  # noqa: F401

pytestmark = requires_data
KS = (1, 3, 5, 10)


@pytest.fixture(scope="module")
def ham(tmp_path_factory):
    return ham_vector_store(tmp_path_factory.mktemp("retrieval") / "ham", n=1200, seed=3)


@pytest.fixture(scope="module")
def odir(tmp_path_factory):
    return odir_multilabel_store(tmp_path_factory.mktemp("retrieval") / "odir", n=600, seed=4)


def split_of(path, scheme):
    with Store.open(path) as store:
        rows = store.sql("SELECT split FROM splits WHERE scheme = ? ORDER BY id", [scheme])
    return np.array([r[0] for r in rows])


def by_hand(X, label_sets, groups, split, k_list, exclude_group=False):
    """Per-query metrics from first principles: loops over numpy brute-force rankings."""
    test, train = np.flatnonzero(split == "test"), np.flatnonzero(split == "train")
    out = {k: {"precision": [], "acc": [], "map": [], "majority_vote": [], "precision_denner": [],
               "class": []} for k in k_list}
    for q in test:
        database = train
        if exclude_group:
            database = train[np.array([groups[t] != groups[q] for t in train])]
        relevant_db = [t for t in database if set(label_sets[t]) & set(label_sets[q])]
        ranked = database[np.argsort(-(X[database] @ X[q]), kind="stable")]
        for k in k_list:
            top = ranked[:k]
            rel = np.array([bool(set(label_sets[t]) & set(label_sets[q])) for t in top])
            ap = sum(rel[:i + 1].mean() for i in range(k) if rel[i])
            n = min(k, len(relevant_db))
            first = [(label_sets[t] or ("",))[0] for t in top]  # single-label: the label
            votes = Counter(first)
            vote = next(label for label in first if votes[label] == max(votes.values()))
            out[k]["precision"].append(rel.mean())
            out[k]["acc"].append(rel.any())
            out[k]["map"].append(ap / n if n else 0.0)
            out[k]["majority_vote"].append(vote == (label_sets[q] or ("",))[0])
            out[k]["precision_denner"].append(rel[:n].sum() / n if n else 0.0)
            out[k]["class"].append(label_sets[q])
    return out


def assert_matches(evaluation, expected, multilabel=False):
    for entry in evaluation.metrics.overall:
        hand = expected[entry.k]
        for name in ("precision", "acc", "map", "precision_denner"):
            assert getattr(entry, name) == pytest.approx(np.mean(hand[name]), abs=1e-9), name
        if multilabel:
            assert entry.majority_vote is None
        else:
            assert entry.majority_vote == pytest.approx(np.mean(hand["majority_vote"]), abs=1e-9)
        classes = sorted({c for labels in hand["class"] for c in labels})
        per_class = [np.mean([d for d, labels in zip(hand["precision_denner"], hand["class"])
                              if c in labels]) for c in classes]
        assert entry.precision_denner_macro == pytest.approx(np.mean(per_class), abs=1e-9)


def test_single_label_evaluation_matches_a_hand_computation(ham):
    with Store.open(ham.path) as store:
        evaluation = evaluate_retrieval(store, "random", ks=KS)
    split = split_of(ham.path, "random")
    assert evaluation.n_queries == (split == "test").sum()
    assert evaluation.n_database == (split == "train").sum()
    assert evaluation.scheme == "random" and evaluation.metrics.ks == list(KS)
    assert_matches(evaluation, by_hand(ham.X, ham.labels, ham.groups, split, KS))
    test_classes = Counter(ham.labels[i][0] for i in np.flatnonzero(split == "test"))
    assert {c: e[0].n_queries for c, e in evaluation.metrics.per_class.items()} == test_classes
    assert "cosine similarity on L2-normalised vectors (inner product)" in evaluation.protocol


def test_exclude_group_under_the_random_split(ham):
    split = split_of(ham.path, "random")
    with Store.open(ham.path) as store:
        plain = evaluate_retrieval(store, "random", ks=KS)
        excluded = evaluate_retrieval(store, "random", ks=KS, exclude_group=True)
    assert excluded.queries_with_group_in_database > 10  # lesions straddle a random split
    assert_matches(excluded, by_hand(ham.X, ham.labels, ham.groups, split, KS, exclude_group=True))
    # other images of the same lesion were the easiest hits
    assert excluded.metrics.at(1).precision < plain.metrics.at(1).precision


def test_exclude_group_changes_nothing_under_the_group_split(ham):
    with Store.open(ham.path) as store:
        plain = evaluate_retrieval(store, "group", ks=KS)
        excluded = evaluate_retrieval(store, "group", ks=KS, exclude_group=True)
    assert excluded.queries_with_group_in_database == 0
    assert excluded.metrics.overall == plain.metrics.overall
    assert_matches(plain, by_hand(ham.X, ham.labels, ham.groups, split_of(ham.path, "group"), KS))


def test_multilabel_relevance_is_sharing_a_label(odir):
    with Store.open(odir.path) as store:
        assert store.is_multilabel()
        evaluation = evaluate_retrieval(store, "group", ks=(1, 5, 10))
    split = split_of(odir.path, "group")
    expected = by_hand(odir.X, odir.labels, odir.groups, split, (1, 5, 10))
    assert_matches(evaluation, expected, multilabel=True)
    carrying = Counter(c for i in np.flatnonzero(split == "test") for c in odir.labels[i])
    assert {c: e[0].n_queries for c, e in evaluation.metrics.per_class.items()} == carrying


def test_pneumoniamnist_uses_its_given_splits(tmp_path):
    """Real images; their centred, normalised pixels stand in for embeddings."""
    scan = read_dataset(MEDMNIST)
    X = np.stack([r.pixels.reshape(-1).astype(np.float32) for r in scan.records])
    X -= X.mean(axis=1, keepdims=True)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    store = Store.create(tmp_path / "pneumonia", EncoderInfo("pixels", X.shape[1], "none", "none"))
    store.set_label_names(scan.label_names)
    store.set_info("multilabel", "false")
    ids = store.add(scan.records, X)
    store.commit()
    store.set_splits("given", ids, [r.split for r in scan.records])  # what ingest stores as 'given'
    evaluation = evaluate_retrieval(store, ks=(1, 5))
    store.close()
    assert evaluation.scheme == "given"
    assert (evaluation.n_queries, evaluation.n_database) == (624, 3882)  # val is left out
    split = np.array([r.split for r in scan.records])
    labels = [r.labels for r in scan.records]
    test, train = np.flatnonzero(split == "test"), np.flatnonzero(split == "train")
    nearest = train[np.argmax(X[test] @ X[train].T, axis=1)]
    p_at_1 = np.mean([labels[t] == labels[q] for q, t in zip(test, nearest)])
    assert evaluation.metrics.at(1).precision == pytest.approx(p_at_1, abs=1e-9)
    assert set(evaluation.metrics.per_class) == {"normal", "pneumonia"}


def test_approximate_index_evaluation_is_close_to_exact(ham, tmp_path):
    import shutil

    shutil.copytree(ham.path, tmp_path / "s")
    with Store.open(tmp_path / "s") as store:
        exact = evaluate_retrieval(store, "group", ks=(1, 10))
        approx = evaluate_retrieval(store, "group", ks=(1, 10), index=open_index(store, "hnsw"))
    assert approx.index["kind"] == "hnsw" and approx.index["recall"]["recall@10"] > 0.95
    assert abs(approx.metrics.at(10).map - exact.metrics.at(10).map) < 0.02


def test_bad_evaluations_fail_clearly(ham):
    with Store.open(ham.path) as store:
        with pytest.raises(SearchError, match="k=5000 exceeds the .* database images"):
            evaluate_retrieval(store, "group", ks=(1, 5000))
        with pytest.raises(SearchError, match="also in the database"):
            evaluate_retrieval(store, "group", query_split="test",
                               database_splits=("train", "test"))
        with pytest.raises(SearchError, match="no 'val' images; it has: test, train"):
            evaluate_retrieval(store, "group", query_split="val")
        with pytest.raises(Exception, match="split 'given' is not in"):
            evaluate_retrieval(store, "given")


def test_cli_evaluate_retrieval(ham):
    runner = CliRunner()
    table = runner.invoke(cli, ["evaluate-retrieval", "-k", "1,5,10", "--split", "group",
                                "--store", str(ham.path)])
    assert table.exit_code == 0, table.output
    text = table.stdout
    assert "cosine similarity on L2-normalised vectors (inner product)" in text
    assert "queries: the" in text and "'test' images of split scheme 'group'" in text
    for name in ("map:", "acc:", "majority_vote:", "precision_denner:", "precision_denner_macro:"):
        assert f"  {name}" in text
    per_class = text.split("per class, in %")[1].split("definitions")[0]
    assert sum(line.startswith("mel ") for line in per_class.splitlines()) == 3

    as_json = runner.invoke(cli, ["evaluate-retrieval", "-k", "5,1", "--split", "group",
                                  "--store", str(ham.path), "--format", "json"])
    data = json.loads(as_json.stdout)
    with Store.open(ham.path) as store:
        direct = evaluate_retrieval(store, "group", ks=(1, 5))
    assert [e["k"] for e in data["overall"]] == [1, 5]
    assert data["overall"][1]["map"] == pytest.approx(direct.metrics.at(5).map)
    assert data["similarity"] == "cosine similarity on L2-normalised vectors (inner product)"
    assert set(data["definitions"]) >= {"map", "acc", "majority_vote", "precision_denner_macro"}

    for bad in ("0,5", "one,five", ""):
        result = runner.invoke(cli, ["evaluate-retrieval", "-k", bad, "--store", str(ham.path)])
        assert result.exit_code == 2 and "Invalid value for '-k'" in result.output
    missing = runner.invoke(cli, ["evaluate-retrieval", "--store", str(ham.path / "nope")])
    assert missing.exit_code == 1 and "no store at" in missing.output
