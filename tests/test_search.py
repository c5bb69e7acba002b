"""Search: FAISS against brute-force numpy, filters, group exclusion, indexes, sheet, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mediret.cli import common as cli_common
from mediret.cli import search as cli_module
from mediret import search as search_module
from mediret.index import cache as index_cache
from mediret.index import exact as exact_module
from mediret.index import ivf_pq as ivf_pq_module
from mediret.index import recall as recall_module
from mediret.cli import cli
from mediret.errors import SearchError
from mediret.records import ImageRecord
from mediret.index import open_index
from mediret.query import query_from_file, query_from_id
from mediret.search import search
from mediret.sheet import (BACKGROUND, MATCH_COLOUR, MISMATCH_COLOUR, PLACEHOLDER_COLOUR,
                           QUERY_COLOUR, contact_sheet)
from mediret.sources import open_source
from mediret.store import EncoderInfo, Filters, Store

from .conftest import MEDMNIST, ham_image_path, requires_data
from .vector_stores import ham_vector_store, one_faiss_thread  # noqa: F401 (autouse fixture)

pytestmark = requires_data


@pytest.fixture(scope="module")
def vs(tmp_path_factory):
    return ham_vector_store(tmp_path_factory.mktemp("search") / "ham")


def brute_force(X, query, k, mask):
    """Top-k ids (= row numbers) and scores among rows where ``mask`` holds, by numpy."""
    scores = X @ query
    candidates = np.flatnonzero(mask)
    order = candidates[np.argsort(-scores[candidates], kind="stable")[:k]]
    return order, scores[order]


def assert_same_hits(result, ids, scores):
    assert [h.image.id for h in result.hits] == ids.tolist()
    np.testing.assert_allclose([h.score for h in result.hits], scores, atol=1e-5)


def exact_index(X, ids):
    """A store's kind of exact index (IndexIDMap2 over IndexFlatIP) holding the rows of ``X`` as ``ids``."""
    import faiss

    index = faiss.IndexIDMap2(faiss.IndexFlatIP(X.shape[1]))
    index.add_with_ids(X, ids)
    return index


def test_query_by_id_matches_brute_force_and_never_returns_itself(vs):
    with Store.open(vs.path) as store:
        for row in (0, 17, 1234):
            query = query_from_id(store, vs.rows[row]["image_id"])
            np.testing.assert_array_equal(query.vector, vs.X[row])
            result = search(store, query, k=10)
            mask = np.ones(len(vs.X), bool)
            mask[row] = False
            assert_same_hits(result, *brute_force(vs.X, vs.X[row], 10, mask))
            assert row not in [h.image.id for h in result.hits]
            assert [h.rank for h in result.hits] == list(range(1, 11))
            hit = result.hits[0]
            assert hit.image.image_id == vs.rows[hit.image.id]["image_id"]
            assert hit.image.labels == vs.labels[hit.image.id]
            assert hit.image.group_id == vs.groups[hit.image.id]


def test_filters_apply_before_ranking(vs):
    with Store.open(vs.path) as store:
        matrix = store.labelled_matrix("random")
        split = dict(zip(matrix.ids, matrix.split))
        filters = Filters(labels=("mel", "bkl"), split="train", split_scheme="random",
                          where="meta->>'sex' = 'male' AND CAST(meta->>'age' AS DOUBLE) >= 50")
        mask = np.array([r["dx"] in ("mel", "bkl") and split[i] == "train" and r["sex"] == "male"
                         and r["age"] != "" and float(r["age"]) >= 50
                         for i, r in enumerate(vs.rows)])
        for row in (3, 400):
            result = search(store, query_from_id(store, vs.rows[row]["image_id"]), k=8,
                            filters=filters)
            mask_q = mask.copy()
            mask_q[row] = False
            assert result.candidates == mask_q.sum()
            assert_same_hits(result, *brute_force(vs.X, vs.X[row], 8, mask_q))


def test_field_conditions_select_what_a_plain_filter_over_the_metadata_selects(vs):
    """Structured conditions (no SQL text) over metadata keys and columns, against the rows'
    own values; an unknown field or operator names the valid ones."""
    from mediret.store import FieldCondition

    cases = [
        ("sex=male", lambda r: r["sex"] == "male"),
        ("age>=60", lambda r: r["age"] != "" and float(r["age"]) >= 60),
        ("age<30", lambda r: r["age"] != "" and float(r["age"]) < 30),
        ("localization=back|trunk", lambda r: r["localization"] in ("back", "trunk")),
        ("localization~EXTREM", lambda r: "extrem" in r["localization"]),
        ("sex!=female", lambda r: r["sex"] != "female"),
        (f"group_id={vs.rows[5]['lesion_id']}", lambda r: r["lesion_id"] == vs.rows[5]["lesion_id"]),
    ]
    with Store.open(vs.path) as store:
        for text, keep in cases:
            selected = store.select_ids(Filters(fields=(FieldCondition.parse(text),)))
            expected = [i for i, r in enumerate(vs.rows) if keep(r)]
            assert 0 < len(expected) < len(vs.rows), text  # the case selects something, not all
            assert selected.tolist() == expected, text
        both = store.select_ids(Filters(fields=(FieldCondition.parse("sex=male"),
                                                FieldCondition("age", ">", 70))))
        assert both.tolist() == [i for i, r in enumerate(vs.rows)
                                 if r["sex"] == "male" and r["age"] != "" and float(r["age"]) > 70]
        with pytest.raises(SearchError, match="unknown field 'colour'.*localization"):
            store.select_ids(Filters(fields=(FieldCondition("colour", "=", "red"),)))
        with pytest.raises(SearchError, match="unknown operator 'LIKE'"):
            store.select_ids(Filters(fields=(FieldCondition("sex", "LIKE", "m%"),)))
        hostile = FieldCondition("sex", "=", "male' OR 1=1 --")  # a value is a parameter, never SQL
        assert store.select_ids(Filters(fields=(hostile,))).tolist() == []
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        FieldCondition.parse("no operator here")


def test_cli_field_filter(vs):
    row = vs.rows[0]
    result = CliRunner().invoke(cli, ["search", "--id", row["image_id"], "-k", "5", "--store", str(vs.path),
                                      "--field", "sex=female", "--field", "age>=40", "--format", "json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)["hits"]
    assert len(hits) == 5 and all(h["meta"]["sex"] == "female" and h["meta"]["age"] >= 40 for h in hits)
    bad = CliRunner().invoke(cli, ["search", "--id", row["image_id"], "--store", str(vs.path), "--field", "sex"])
    assert bad.exit_code == 2 and "FIELD=VALUE" in bad.output


def test_a_rare_label_still_gives_k_hits(vs):
    """Over-fetching k*c and dropping would come back short; a selector does not."""
    rare = np.array([r["dx"] == "df" for r in vs.rows])
    query_row = int(np.flatnonzero(np.array([r["dx"] == "nv" for r in vs.rows]))[0])
    unfiltered, _ = brute_force(vs.X, vs.X[query_row], 100, np.ones(len(vs.X), bool))
    assert rare[unfiltered].sum() < 5
    with Store.open(vs.path) as store:
        result = search(store, query_from_id(store, vs.rows[query_row]["image_id"]), k=5,
                        filters=Filters(labels=("df",)))
    assert_same_hits(result, *brute_force(vs.X, vs.X[query_row], 5, rare))


def test_exclude_group_leaves_out_the_query_lesion(vs):
    groups = np.array(vs.groups)
    with Store.open(vs.path) as store:
        checked = 0
        for row in range(len(vs.rows)):
            mates = np.flatnonzero(groups == groups[row])
            if len(mates) < 3:
                continue
            query = query_from_id(store, vs.rows[row]["image_id"])
            plain = search(store, query, k=5)
            assert {h.image.group_id for h in plain.hits} & {groups[row]}  # mates rank high
            result = search(store, query, k=5, exclude_group=True)
            assert groups[row] not in {h.image.group_id for h in result.hits}
            assert result.excluded_group == groups[row]
            assert_same_hits(result, *brute_force(vs.X, vs.X[row], 5, groups != groups[row]))
            checked += 1
            if checked == 3:
                break
        assert checked == 3


def test_group_filter_keeps_only_that_group(vs):
    groups = np.array(vs.groups)
    wanted = [g for g in sorted(set(vs.groups)) if (groups == g).sum() >= 2][:2]
    with Store.open(vs.path) as store:
        result = search(store, query_from_id(store, vs.rows[0]["image_id"]), k=10,
                        filters=Filters(groups=tuple(wanted)))
    mask = np.isin(groups, wanted)
    mask[0] = False
    assert {h.image.group_id for h in result.hits} <= set(wanted)
    assert_same_hits(result, *brute_force(vs.X, vs.X[0], 10, mask))


def test_bad_queries_and_filters_fail_clearly(vs):
    with Store.open(vs.path) as store:
        query = query_from_id(store, vs.rows[0]["image_id"])
        with pytest.raises(SearchError, match="no image 'ISIC_9999999'"):
            query_from_id(store, "ISIC_9999999")
        with pytest.raises(SearchError, match="unknown label.*MEL.*the store has: akiec"):
            search(store, query, filters=Filters(labels=("MEL",)))
        with pytest.raises(SearchError,
                           match="split 'validation' is not in scheme 'group'.*test, train"):
            search(store, query, filters=Filters(split="validation", split_scheme="group"))
        with pytest.raises(SearchError, match="--where.*Binder Error.*columns are id, image_id"):
            search(store, query, filters=Filters(where="patient_sex = 'male'"))
        with pytest.raises(SearchError, match="Parser Error"):
            search(store, query, filters=Filters(where="1=1; DROP TABLE images"))
        with pytest.raises(SearchError, match="no stored image passes the filters"):
            search(store, query, filters=Filters(where="image_id = 'nothing'"))
        with pytest.raises(SearchError, match="k must be at least 1"):
            search(store, query, k=0)
        assert len(store) == len(vs.rows)  # the DROP never ran


def test_approximate_indexes_recall_and_cache(vs, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(vs.path, path)
    rng = np.random.default_rng(1)
    query_rows = rng.choice(len(vs.X), 100, replace=False)
    with Store.open(path) as store:
        for kind, floor in (("hnsw", 0.97), ("ivf-pq", 0.9)):
            index = open_index(store, kind)
            assert index.build_seconds is not None
            assert set(index.recall) == {1, 10, 50}
            assert min(index.recall.values()) >= floor
            # recall measured here, independently of the index's own report
            found = []
            for row in query_rows:
                mask = np.ones(len(vs.X), bool)
                mask[row] = False
                truth, _ = brute_force(vs.X, vs.X[row], 10, mask)
                result = search(store, query_from_id(store, vs.rows[row]["image_id"]), k=10,
                                index=index)
                assert result.index_used == kind
                found.append(len(set(truth) & {h.image.id for h in result.hits}) / 10)
            assert np.mean(found) >= floor
            assert abs(np.mean(found) - index.recall[10]) < 0.05
            cached = open_index(store, kind)
            assert cached.build_seconds is None and cached.params == index.params
            assert (path / f"seeded-test.{kind}.faiss").is_file()
        params = open_index(store, "ivf-pq").params
        assert 32 % params["m"] == 0 and 1 <= params["nprobe"] <= params["nlist"] <= len(vs.X) // 39
        assert params["opq"] and params["nbits"] == 4
        import faiss

        cached = open_index(store, "ivf-pq")  # as read back from the cache
        ivf = faiss.extract_index_ivf(cached.index)
        assert isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)
        assert isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQFastScan) and ivf.by_residual
    meta_path = path / "seeded-test.ivf-pq.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format": 1}))  # a cache of the older IVF-PQ layout
    with Store.open(path) as store:
        assert open_index(store, "ivf-pq").build_seconds is not None  # rebuilt, not read
        assert json.loads(meta_path.read_text())["format"] == index_cache.CACHE_FORMAT
        assert open_index(store, "hnsw").params["M"] == 32
    with Store.open(path, read_only=False) as store:  # one more vector: caches are stale
        store.add([ImageRecord("extra", "extra.jpg", ("nv",))], vs.X[:1])
        store.commit()
    with Store.open(path) as store:
        rebuilt = open_index(store, "hnsw")
        assert rebuilt.build_seconds is not None and rebuilt.index.ntotal == len(vs.X) + 1


def test_restrictive_filter_on_hnsw_is_ranked_exactly(vs, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(vs.path, path)
    rare = np.array([r["dx"] == "vasc" for r in vs.rows])
    with Store.open(path) as store:
        index = open_index(store, "hnsw")
        result = search(store, query_from_id(store, vs.rows[0]["image_id"]), k=5,
                        filters=Filters(labels=("vasc",)), index=index)
    assert result.index_used == "exact" and "ranked them exactly" in result.notes[0]
    assert_same_hits(result, *brute_force(vs.X, vs.X[0], 5, rare))


def test_ivf_pq_shape_fits_faiss_constraints():
    for n, dim in ((8013, 1280), (5030, 512), (686, 2048), (160, 192), (1000, 30)):
        nlist, m, nbits = ivf_pq_module.ivf_pq_shape(n, dim)
        assert dim % m == 0 and 1 <= nlist <= max(1, n // 39) and nbits == 4
    assert ivf_pq_module.ivf_pq_shape(8013, 1280) == (205, 320, 4)  # 4-d sub-vectors
    assert ivf_pq_module.ivf_pq_shape(1_000_000, 512) == (4000, 128, 4)
    assert ivf_pq_module.ivf_pq_shape(1000, 30)[1] == 6  # 30 / 4 = 7.5: the nearest divisor, 5-d


def test_ivf_pq_refuses_a_store_too_small_to_train_its_codes():
    from mediret.index import build_from_vectors
    from mediret.index.ivf_pq import IVF_MIN_VECTORS

    X = np.eye(IVF_MIN_VECTORS - 1, 8 * 4, dtype=np.float32)
    exact = exact_index(X, np.arange(len(X), dtype=np.int64))
    with pytest.raises(SearchError, match=f"at least {IVF_MIN_VECTORS} vectors, the store holds {len(X)}"):
        build_from_vectors("ivf-pq", X, np.arange(len(X), dtype=np.int64), exact)


# ---- contact sheet ---------------------------------------------------------------------

def tile_cells(image, columns, rows, tile=160, border=4, caption=34, gap=8):
    """(frame pixel, image-centre pixel, image-area std) of each grid cell, measured on the PNG."""
    pixels = np.asarray(image.convert("RGB"))
    cells = []
    for r in range(rows):
        for c in range(columns):
            left = gap + c * (tile + 2 * border + gap)
            top = gap + r * (tile + 2 * border + caption + gap)
            # lower half of the image area: below any placeholder text
            inner = pixels[top + border + tile // 2: top + border + tile - 10,
                           left + border + 10: left + border + tile - 10]
            centre = tuple(inner[len(inner) // 2, len(inner) // 2])
            cells.append((tuple(pixels[top + 1, left + 1]), centre, float(inner.std())))
    return cells


def test_contact_sheet_draws_query_and_hits(vs, tmp_path):
    with Store.open(vs.path) as store:
        query = query_from_id(store, vs.rows[5]["image_id"])
        result = search(store, query, k=7)
    gone = dataclasses.replace(result.hits[2].image, source=str(tmp_path / "gone.jpg"))
    result.hits[2] = dataclasses.replace(result.hits[2], image=gone)
    sheet = contact_sheet(result, tmp_path / "out" / "hits.png")
    png = Image.open(tmp_path / "out" / "hits.png")
    assert png.format == "PNG"
    assert png.size == (6 * 176 + 8, 2 * 210 + 8)  # 8 tiles: 6 columns, 2 rows
    cells = tile_cells(png, columns=6, rows=2)
    frames = [frame for frame, _, _ in cells]
    assert frames[0] == QUERY_COLOUR
    expected = [MATCH_COLOUR if set(h.image.labels) & set(query.image.labels) else MISMATCH_COLOUR
                for h in result.hits]
    assert frames[1:8] == expected
    assert frames[8:] == [BACKGROUND] * 4
    assert sum(f != BACKGROUND for f in frames) == 8
    # real dermoscopy images are textured; the missing file is a flat placeholder
    assert all(std > 5 for i, (_, _, std) in enumerate(cells[:8]) if i != 3)
    assert cells[3][1] == PLACEHOLDER_COLOUR and cells[3][2] == 0
    assert sheet.missing == [str(tmp_path / "gone.jpg")]


def test_medmnist_sources_open_from_the_npz():
    arrays = np.load(MEDMNIST)
    image = open_source(f"{MEDMNIST}#test/3")
    np.testing.assert_array_equal(np.asarray(image), arrays["test_images"][3])
    with pytest.raises(SearchError, match="index 9999 is out of range"):
        open_source(f"{MEDMNIST}#test/9999")
    with pytest.raises(SearchError, match="no 'dev_images' array"):
        open_source(f"{MEDMNIST}#dev/0")


# ---- real embeddings -------------------------------------------------------------------

@pytest.mark.slow
def test_file_query_embeds_like_the_store(ham_store, efficientnet_lite0, tmp_path):
    """A stored image's file, embedded again, comes back as itself with cosine 1."""
    with Store.open(ham_store) as store:
        stored = store.records(store.ids()[[4]])[0]
        query = query_from_file(store, stored.source)
        assert query.image.id == stored.id and query.group_id == stored.group_id
        np.testing.assert_allclose(query.vector, store.vectors([stored.id])[0], atol=1e-4)
        result = search(store, query, k=5)
        assert result.hits[0].image.id == stored.id and result.hits[0].score > 0.9999
        excluded = search(store, query, k=5, exclude_group=True)
        assert stored.group_id not in {h.image.group_id for h in excluded.hits}
        X = store.vectors(store.ids())
        mask = np.array([r.group_id != stored.group_id for r in store.records(store.ids())])
        ids, scores = brute_force(X, query.vector, 5, mask)
        assert_same_hits(excluded, store.ids()[ids], scores)
        # a file the store does not hold: its group is named with --group-of
        outside = tmp_path / "outside.png"
        Image.open(stored.source).convert("L").convert("RGB").save(outside)
        query = query_from_file(store, str(outside), encoder=efficientnet_lite0)
        assert query.image is None and query.group_of is None
        assert "no group is excluded" in search(store, query, exclude_group=True).notes[0]
        other = store.records(store.ids()[[9]])[0]
        query = query_from_file(store, str(outside), group_of=other.image_id,
                                encoder=efficientnet_lite0)
        result = search(store, query, k=20, exclude_group=True)
        assert result.excluded_group == other.group_id
        assert other.group_id not in {h.image.group_id for h in result.hits}


@pytest.mark.slow
def test_cli_several_file_queries_load_the_encoder_once(ham_store, efficientnet_lite0, tmp_path, monkeypatch):
    """Each query file's hits are those of its own embedding; an unreadable one is skipped, exit 1."""
    from mediret import encoders

    loads = []
    monkeypatch.setattr(encoders, "load_encoder", lambda *a, **kw: loads.append(a) or efficientnet_lite0)
    with Store.open(ham_store) as store:
        ids = store.ids()
        sources = [r.source for r in store.records(ids[[2, 7, 11]])]
        X = store.vectors(ids)
    queries = [sources[0], str(tmp_path / "missing.png"), *sources[1:]]
    result = CliRunner().invoke(cli, ["search", *queries, "-k", "4", "--store", str(ham_store),
                                      "--format", "json", "--sheet", str(tmp_path / "hits.png")])
    assert result.exit_code == 1
    assert "1 of 4 query images could not be read" in result.stderr and "missing.png" in result.stderr
    assert len(loads) == 1
    data = json.loads(result.stdout)
    assert [r["query"]["source"] for r in data] == sources
    for source, got in zip(sources, data):
        with Image.open(source) as image:  # embedded here, on its own, by the library
            vector = efficientnet_lite0.embed_images([image.convert("RGB")])[0]
        expected, scores = brute_force(X, vector, 4, np.ones(len(X), bool))
        assert [h["id"] for h in got["hits"]] == ids[expected].tolist()
        assert [h["score"] for h in got["hits"]] == pytest.approx(scores, abs=1e-5)
    # sheets numbered by the query's place on the command line (the 2nd was skipped)
    assert sorted(p.name for p in tmp_path.glob("hits*.png")) == ["hits-1.png", "hits-3.png", "hits-4.png"]


@pytest.mark.parametrize("weights_source, message", [
    ("local file /gone/squeezenet.pth", "weights file /gone/squeezenet.pth, which is gone"),
    ("random (untrained initialisation; for tests and benchmarks only)", "query it with --id"),
])
def test_file_query_needs_the_store_weights(tmp_path, vs, weights_source, message):
    store = Store.create(tmp_path / "s", EncoderInfo("efficientnet-lite0", 1280,
                                                     "efficientnet-lite", weights_source))
    query = tmp_path / "q.png"
    Image.open(ham_image_path(vs.rows[0]["image_id"])).save(query)
    with pytest.raises(SearchError, match=message):
        query_from_file(store, str(query))
    store.close()


# ---- command line ----------------------------------------------------------------------

def test_cli_constants_match_the_library():
    from mediret import index, store

    choices = {p.name: p.type.choices for p in cli_module.search.params if p.name == "index_kind"}
    assert tuple(choices["index_kind"]) == index.kind_names() == ("exact", "hnsw", "ivf-pq")
    assert cli_common.SPLIT_SCHEMES == store.SPLIT_SCHEMES
    assert cli_module.SIMILARITY == search_module.SIMILARITY == index.SIMILARITY


def test_cli_search_table_json_and_sheet(vs, tmp_path):
    runner = CliRunner()
    image_id = vs.rows[0]["image_id"]
    mask = np.ones(len(vs.X), bool)
    mask[0] = False
    ids, scores = brute_force(vs.X, vs.X[0], 4, mask)
    result = runner.invoke(cli, ["search", "--id", image_id, "-k", "4", "--store", str(vs.path),
                                "--sheet", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[2].split() == ["rank", "id", "label", "group", "score", "path"]
    table = [line.split() for line in lines[4:]]
    assert [row[1] for row in table] == [vs.rows[i]["image_id"] for i in ids]
    assert [float(row[4]) for row in table] == pytest.approx(scores, abs=1e-4)
    assert "cosine similarity on L2-normalised vectors" in lines[1]
    assert Image.open(tmp_path / "s.png").size == (5 * 176 + 8, 218)
    assert "contact sheet" in result.stderr

    as_json = runner.invoke(cli, ["search", "--id", image_id, "-k", "4", "-s", str(vs.path),
                                  "--label", "nv", "--where", "meta->>'sex' = 'female'",
                                  "--exclude-group", "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    mask &= np.array([r["dx"] == "nv" and r["sex"] == "female" for r in vs.rows])
    mask &= np.array(vs.groups) != vs.groups[0]
    ids, scores = brute_force(vs.X, vs.X[0], 4, mask)
    assert [h["id"] for h in data["hits"]] == ids.tolist()
    assert [h["score"] for h in data["hits"]] == pytest.approx(scores, abs=1e-5)
    assert data["query"]["image_id"] == image_id and data["excluded_group"] == vs.groups[0]
    assert data["filters"]["labels"] == ["nv"]


@pytest.mark.parametrize("args, code, message", [
    (["--id", "ISIC_9999999"], 1, "no image 'ISIC_9999999'"),
    (["--id", "{id}", "--where", "sex = 'male'"], 1, "--where \"sex = 'male'\" failed"),
    (["--id", "{id}", "--label", "melanoma"], 1, "unknown label(s) melanoma"),
    (["--id", "{id}", "--split", "train", "--split-scheme", "given"], 1,
     "split scheme 'given' is not in"),
    (["missing.png"], 1, "query image missing.png not found"),
    (["."], 1, "query . is a folder; give one image file"),
    ([], 2, "give either IMAGE files or --id"),
    (["x.png", "--id", "{id}"], 2, "give either IMAGE files or --id"),
    (["x.png", "y.png", "--group-of", "{id}"], 2, "--group-of applies to a single image-file query"),
    (["--id", "{id}", "--id", "ISIC_9999999"], 1, "no image 'ISIC_9999999'"),
    (["--id", "{id}", "--index", "lsh"], 2, "'lsh' is not one of"),
])
def test_cli_search_errors(vs, args, code, message):
    args = [a.replace("{id}", vs.rows[0]["image_id"]) for a in args]
    result = CliRunner().invoke(cli, ["search", "--store", str(vs.path), *args])
    assert result.exit_code == code
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_several_queries_stop_when_the_store_encoder_cannot_load(vs, tmp_path):
    """The encoder's failure is the store's, not one query's: no query is skipped, nothing printed."""
    shutil.copytree(vs.path, tmp_path / "s")
    with Store.open(tmp_path / "s", read_only=False) as store:  # as if embedded with random weights
        store.sql("UPDATE encoders SET weights_source = 'random (untrained initialisation)'")
    image = str(ham_image_path(vs.rows[0]["image_id"]))
    result = CliRunner().invoke(cli, ["search", str(tmp_path / "missing.png"), image, image,
                                      "--store", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert result.stderr.count("query it with --id") == 1
    assert result.stderr.count("skipped") == 1 and result.stdout == ""


@pytest.mark.parametrize("ascending", [True, False])
def test_blas_and_faiss_exact_paths_agree_with_brute_force(vs, ascending):
    """Few queries are scored with numpy on the index's memory, many with FAISS: same hits either way."""
    from mediret.index import SMALL_BATCH, SearchIndex, Selection

    rng = np.random.default_rng(3)
    X = vs.X.astype(np.float32)
    ids = np.arange(1000, 1000 + len(X), dtype=np.int64)
    if not ascending:
        ids = rng.permutation(ids)
    index = exact_index(X, ids)
    searcher = SearchIndex("exact", index, index)
    queries = X[rng.choice(len(X), SMALL_BATCH + 1, replace=False)]
    few, many = queries[:3], queries  # 3 -> numpy/BLAS; SMALL_BATCH + 1 -> FAISS
    nearest = ids[np.argsort(-(X @ few.T), axis=0)[:20].ravel()]  # what the queries would find
    absent = np.array([1, 10**9], dtype=np.int64)  # ids not in the index are ignored
    selections = {
        "all": Selection(),
        "excluded": Selection(excluded=np.concatenate([nearest[::2], absent])),
        "small allowed (gathered)": Selection(allowed=np.concatenate([nearest, absent]),
                                              excluded=nearest[1::3]),
        "large allowed (scanned)": Selection(allowed=np.concatenate([rng.choice(ids, len(X) // 2, replace=False),
                                                                      nearest[:7], absent])),
        "fewer allowed than k": Selection(allowed=ids[[7, 3, 11]]),
    }
    k = 10
    for name, selection in selections.items():
        mask = np.ones(len(X), bool) if selection.allowed is None else np.isin(ids, selection.allowed)
        mask &= ~np.isin(ids, selection.excluded)
        blas_scores, blas_ids = searcher.search(few, k, selection)
        faiss_scores, faiss_ids = searcher.search(many, k, selection)
        for q in range(len(few)):
            rows, scores = brute_force(X, few[q], k, mask)
            n = len(rows)
            assert set(blas_ids[q, :n].tolist()) == set(ids[rows].tolist()), name
            np.testing.assert_allclose(blas_scores[q, :n], scores, atol=1e-5, err_msg=name)
            np.testing.assert_allclose(faiss_scores[q, :n], scores, atol=1e-5, err_msg=name)
            assert (blas_ids[q, n:] == -1).all() and np.isneginf(blas_scores[q, n:]).all(), name
            assert set(faiss_ids[q, :n].tolist()) == set(blas_ids[q, :n].tolist()), name


@pytest.mark.parametrize("faster", ["blas", "faiss"])
def test_one_unfiltered_query_takes_the_scan_that_was_faster(vs, monkeypatch, faster):
    """A single query without an allow-list runs the scan timed faster once; others keep BLAS."""
    from mediret.index import SearchIndex, Selection
    from mediret.index.exact import ExactScan

    X = vs.X.astype(np.float32)
    ids = np.arange(len(X), dtype=np.int64)
    index = exact_index(X, ids)
    searcher = SearchIndex("exact", index, index)
    timed, blas_calls = [], []
    monkeypatch.setattr(exact_module, "_fastest", lambda calls, repeat: timed.append(sorted(calls)) or faster)
    blas = ExactScan.search_blas
    monkeypatch.setattr(ExactScan, "search_blas",
                        lambda self, queries, *a: blas_calls.append(len(queries)) or blas(self, queries, *a))
    excluded = Selection(excluded=ids[[5, 8]])
    mask = ~np.isin(ids, excluded.excluded)
    for q in (0, 5, 17):
        scores, found = searcher.search(X[q], 10, excluded)
        rows, expected = brute_force(X, X[q], 10, mask)
        assert set(found[0].tolist()) == set(rows.tolist())
        np.testing.assert_allclose(scores[0], expected, atol=1e-5)
    assert timed == [["blas", "faiss"]]  # timed once, then kept
    assert blas_calls == ([1, 1, 1] if faster == "blas" else [])
    searcher.search(X[:3], 10)  # several queries: BLAS whichever won
    searcher.search(X[0], 10, Selection(allowed=ids[:50]))  # an allow-list: BLAS gathers those rows
    assert blas_calls[-2:] == [3, 1]


def test_the_single_query_scan_is_timed_for_real_on_a_sample(vs, monkeypatch):
    import faiss

    from mediret.index import SearchIndex
    from mediret.index.exact import ExactScan

    X = vs.X.astype(np.float32)
    index = exact_index(X, np.arange(len(X), dtype=np.int64))
    searcher = SearchIndex("exact", index, index)
    monkeypatch.setattr(exact_module, "SCAN_PROBE_BYTES", X[0].nbytes * 10)  # the probe scans 10 rows
    scanned, knn = [], faiss.knn
    blas = ExactScan.search_blas
    monkeypatch.setattr(ExactScan, "search_blas",
                        lambda self, queries, k, sel, vectors, *a: scanned.append(len(vectors))
                        or blas(self, queries, k, sel, vectors, *a))
    monkeypatch.setattr(faiss, "knn", lambda q, xb, *a: scanned.append(len(xb)) or knn(q, xb, *a))
    _, found = searcher.search(X[4], 3)
    assert found[0, 0] == 4 and searcher.exact_scan.single_query_scan in ("blas", "faiss")
    assert scanned[:10] == [10] * 10  # five timed runs of each scan, on the sample


def test_ivf_pq_tunes_a_longer_shortlist_when_the_short_one_caps_recall():
    """Uniform random 128-d vectors: 16-byte PQ codes rank them coarsely, so max(10k, 100) candidates
    cannot reach recall@10 0.95 at any nprobe; the tuning must lengthen the shortlist."""
    from mediret.index import build_from_vectors
    from mediret.index.kinds import KINDS
    IVF_TARGET_RECALL = KINDS["ivf-pq"].target_recall

    rng = np.random.default_rng(0)
    X = rng.standard_normal((16000, 128)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    ids = np.arange(len(X), dtype=np.int64) * 3 + 7
    exact = exact_index(X, ids)
    built = build_from_vectors("ivf-pq", X, ids, exact, seed=0)
    assert built.params["refine_factor"] > 10
    # recall of the chosen setting, computed here on fresh queries
    queries = rng.standard_normal((200, 128)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argsort(-(queries @ X.T), axis=1)[:, :10]
    _, found = built.search(queries, 10)
    recall = np.mean([len(set(ids[t]) & set(f)) / 10 for t, f in zip(truth, found)])
    assert recall >= IVF_TARGET_RECALL - 0.03
    built.params["refine_factor"] = 10  # the old fixed shortlist, same nprobe: clearly worse
    _, short = built.search(queries, 10)
    assert np.mean([len(set(ids[t]) & set(f)) / 10 for t, f in zip(truth, short)]) < recall - 0.05


def test_few_queries_run_faiss_on_one_thread_and_restore_the_setting(vs):
    import faiss

    from mediret.index import SearchIndex

    X = vs.X.astype(np.float32)
    hnsw = faiss.IndexIDMap2(faiss.IndexHNSWFlat(X.shape[1], 16, faiss.METRIC_INNER_PRODUCT))
    hnsw.add_with_ids(X, np.arange(len(X), dtype=np.int64))
    searcher = SearchIndex("hnsw", hnsw, hnsw, params={"efSearch": 64})
    seen = []
    original = faiss.IndexIDMap2.search

    def spy(self, *args, **kwargs):
        seen.append(faiss.omp_get_max_threads())
        return original(self, *args, **kwargs)

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        faiss.IndexIDMap2.search = spy
        searcher.search(X[:1], 5)
        searcher.search(X[:40], 5)
        after = faiss.omp_get_max_threads()
    finally:
        faiss.IndexIDMap2.search = original
        faiss.omp_set_num_threads(before)
    assert seen == [1, 2] and after == 2


def test_target_recall_tunes_hnsw_and_keys_the_cache(vs, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(vs.path, path)
    with Store.open(path) as store:
        loose = open_index(store, "hnsw", target_recall=0.8)
        strict = open_index(store, "hnsw", target_recall=0.995)
        assert loose.params["target_recall"] == 0.8 and strict.params["target_recall"] == 0.995
        assert strict.build_seconds is not None  # another target: rebuilt, not the cached one
        assert loose.params["efSearch"] < strict.params["efSearch"]
        assert loose.recall[10] >= 0.8 - 0.05 and strict.recall[10] >= 0.98
        assert open_index(store, "hnsw", target_recall=0.995).build_seconds is None  # cached
        # a smaller efSearch reaches less: the tuning did not stop early for nothing
        strict.params["efSearch"] = loose.params["efSearch"]
        rows = np.random.default_rng(5).choice(len(vs.X), 200, replace=False)
        from mediret.index import recall_at_k

        assert recall_at_k(strict, vs.X[rows], rows, vs.X, np.arange(len(vs.X)), (10,))[10] < 0.995
    with pytest.raises(SearchError, match="target recall"):
        with Store.open(path) as store:
            index_cache.build_index(store, "hnsw", target_recall=1.5)


def test_cli_target_recall_reaches_the_index(vs, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(vs.path, path)
    result = CliRunner().invoke(cli, ["search", "--id", vs.rows[0]["image_id"], "-k", "3", "--store", str(path),
                                      "--index", "hnsw", "--target-recall", "0.9", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert "target_recall=0.9" in result.stderr and "built hnsw index" in result.stderr
    assert f"building hnsw index over {len(vs.X):,} vectors (tuned to recall@10 0.9;" in result.stderr
    again = CliRunner().invoke(cli, ["search", "--id", vs.rows[0]["image_id"], "-k", "3", "--store", str(path),
                                     "--index", "hnsw", "--target-recall", "0.9"])
    assert again.exit_code == 0 and "building" not in again.stderr  # read from the cache
    assert json.loads((path / "seeded-test.hnsw.json").read_text())["params"]["target_recall"] == 0.9
    bad = CliRunner().invoke(cli, ["search", "--id", vs.rows[0]["image_id"], "--store", str(path),
                                   "--index", "hnsw", "--target-recall", "1.5"])
    assert bad.exit_code == 2 and "1.5" in bad.output


def test_tuning_asks_the_target_of_the_recall_minus_its_standard_error(monkeypatch):
    """A setting whose mean recall just reaches the target, but not with the margin of
    standard errors to spare, is not taken: it would fall under the target on other queries."""
    from mediret.index import SearchIndex
    from mediret.index.hnsw import tune as _tune_hnsw
    from mediret.index.ivf_pq import tune as _tune_ivf_pq

    def fake_recall(mean_of):
        def recall10(index, *args):
            mean = mean_of(index.params)
            return mean, mean - 0.01, 1.0 / index.params.get("nprobe", 1)  # more nprobe: slower
        return recall10

    monkeypatch.setattr(recall_module, "recall10", fake_recall(lambda p: 0.9 + 0.016 * math.log2(p["nprobe"])))
    ivf = SearchIndex("ivf-pq", None, None, params={"nlist": 100, "target_recall": 0.95})
    _tune_ivf_pq(ivf, *[None] * 5)
    # mean 0.946 / 0.957 / 0.964 at nprobe 8 / 12 / 16: 12 reaches 0.95 on the mean, 16 with the margin
    assert ivf.params["nprobe"] == 16
    monkeypatch.setattr(recall_module, "recall10", fake_recall(lambda p: 0.95 + p["efSearch"] / 1000))
    hnsw = SearchIndex("hnsw", None, None, params={"target_recall": 0.985})
    _tune_hnsw(hnsw, *[None] * 5)
    # mean 0.982 / 0.990 / 0.998 at efSearch 32 / 40 / 48: 40 reaches 0.985 on the mean, 48 with the margin
    assert hnsw.params["efSearch"] == 48


def test_recall10_reports_the_mean_and_the_mean_minus_the_margin_of_standard_errors(vs):
    """On the real-id store's vectors, with an HNSW index at a small efSearch (so recall varies
    between queries), against a per-query count made here with numpy."""
    import faiss

    from mediret.index import SearchIndex
    from mediret.index.recall import exact_scores as _exact_scores, recall10 as _recall10

    X = vs.X.astype(np.float32)
    ids = np.arange(len(X), dtype=np.int64)
    exact = exact_index(X, ids)
    hnsw = faiss.IndexHNSWFlat(X.shape[1], 4, faiss.METRIC_INNER_PRODUCT)
    graph = faiss.IndexIDMap2(hnsw)
    graph.add_with_ids(X, ids)
    index = SearchIndex("hnsw", graph, exact, params={"efSearch": 1})
    rows = np.random.default_rng(3).choice(len(X), 300, replace=False)
    mean, lower, seconds = _recall10(index, X[rows], rows, X, ids, _exact_scores(index, X[rows], 10))
    _, found = index.search(X[rows], 11)
    per_query = []
    for row, hits in zip(rows, found):
        others = np.delete(np.arange(len(X)), row)
        tenth = np.sort(X[others] @ X[row])[-10]
        hits = [h for h in hits if h not in (row, -1)][:10]
        per_query.append(np.sum(X[hits] @ X[row] >= tenth - 1e-5) / 10)
    assert 0.3 < np.mean(per_query) < 0.99  # recall that varies, so the error is not 0
    assert mean == pytest.approx(np.mean(per_query))
    error = np.std(per_query, ddof=1) / np.sqrt(len(rows))
    assert mean - lower == pytest.approx(recall_module.RECALL_MARGIN * error)
    assert recall_module.RECALL_MARGIN >= 1
    assert seconds > 0


def test_opq_iterations_shrink_with_the_square_of_the_dimension():
    from mediret.index.ivf_pq import OPQ_ITERATIONS, OPQ_MIN_ITERATIONS, opq_iterations

    assert opq_iterations(32) == opq_iterations(512) == OPQ_ITERATIONS
    assert opq_iterations(1024) == round(OPQ_ITERATIONS / 4)
    assert opq_iterations(2048) == opq_iterations(4096) == OPQ_MIN_ITERATIONS


def test_ivf_pq_on_fewer_vectors_than_dimensions_builds_without_opq():
    """300 x 512 (PAD-UFES-20 is 686 x 1280): FAISS's OPQ training aborts the process on fewer
    vectors than dimensions, so the index is built without the rotation, and still finds
    the exact neighbours of the stored vectors."""
    from mediret.index import build_from_vectors

    rng = np.random.default_rng(4)
    centres = rng.standard_normal((6, 512)).astype(np.float32)
    X = centres[rng.integers(0, 6, 300)] + 0.5 * rng.standard_normal((300, 512)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    ids = np.arange(len(X), dtype=np.int64) + 100
    exact = exact_index(X, ids)
    built = build_from_vectors("ivf-pq", X, ids, exact, seed=0)
    assert built.params["opq"] is False and built.params["opq_iterations"] == 0
    _, found = built.search(X[:50], 10)
    truth = np.argsort(-(X[:50] @ X.T), axis=1)[:, :10]
    assert np.mean([len(set(ids[t]) & set(f)) / 10 for t, f in zip(truth, found)]) >= 0.9
