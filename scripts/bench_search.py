#!/usr/bin/env python
"""Benchmark part 3: exact and approximate search against the memory-bandwidth bound.

For each data set (synthetic random unit vectors, or a mediret store's vectors):

- **bandwidth bound**: the fastest numpy pass over the very array FAISS searches
  (``x @ q`` with 1 and 2 BLAS threads, ``x.sum(axis=0)``) gives bytes/s; a
  single-query exact search must read the whole index, so the bound is
  rate / index bytes queries/s.
- **flat, single query**: ``nq = 1`` searches in a loop, on the raw
  ``IndexFlatIP`` and through mediret's ``SearchIndex`` over the store's
  ``IndexIDMap2(IndexFlatIP)``, with FAISS OpenMP at 1 and at 2 threads.
  Goal: >= 0.85 of the bound.
- **flat, batched**: ``nq = --batch-queries`` in one call (BLAS), queries/s.
- **HNSW and IVF-PQ**, built with mediret.search's parameters and searched
  through its ``SearchIndex``. HNSW (M, efConstruction as mediret): recall@10
  against exact search for each efSearch, the smallest reaching 0.95. IVF-PQ:
  built and tuned by ``mediret.search.build_from_vectors`` itself (nprobe and
  the re-ranked shortlist, on stored vectors as queries); the bench measures
  that setting's recall on its own queries. Then single-query throughput
  against the flat one. Goal at 1M vectors: >= 50x. Build time and index size.

Synthetic queries are fresh random unit vectors; store queries are stored
vectors, each one's own id left out of its results (as mediret's recall does).

    python scripts/bench_search.py --data synthetic:100000x512,store --json reports/bench/search-100k.json
    python scripts/bench_search.py --data synthetic:1000000x512 --hnsw-max-n 0 --json ...
    python scripts/bench_search.py --quick

HNSW builds above ``--hnsw-max-n`` vectors are skipped and their build time
extrapolated (n log n) from the largest HNSW built in the same run; a
``synthetic:NxD`` entry with ``--kinds hnsw`` builds HNSW at exactly N.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # noqa: E402

BOUND_GOAL = 0.85
RECALL_GOAL = 0.95
ANN_SPEEDUP_GOAL = 50.0
ANN_GOAL_N = 1_000_000
K = 10
DEFAULT_STORES = ("indexes/bench-ham10000-efficientnet-lite0", "indexes/ham10000-efficientnet-lite0")
EF_EXTRA = (1024, 2048)  # beyond mediret's own efSearch choices, when those do not reach the target


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="synthetic:100000x512,store",
                        help="comma-separated: synthetic:NxD (uniform random unit vectors), "
                             "gauss:N[:STORE] (N draws from a Gaussian fitted to a store's vectors), "
                             "store (the HAM10000 bench store), store:PATH")
    parser.add_argument("--kinds", default="flat,hnsw,ivf-pq",
                        help="comma-separated: flat,hnsw,ivf-pq (mediret's), ivf-flat (a reference)")
    parser.add_argument("--queries", type=int, default=200, help="queries for recall (and the single-query loops)")
    parser.add_argument("--batch-queries", type=int, default=1000, help="nq of the batched flat search")
    parser.add_argument("--single-seconds", type=float, default=3.0,
                        help="run each single-query loop for about this long (at least 3 queries)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds of the single-query loops; the best round counts")
    parser.add_argument("--hnsw-max-n", type=int, default=300_000,
                        help="skip HNSW builds above this many vectors (estimate instead)")
    parser.add_argument("--ivf-train-per-centroid", type=int, default=None,
                        help="cap IVF k-means training at this many points per list (FAISS's "
                             "max_points_per_centroid; default: mediret's IVF_TRAIN_PER_LIST, 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20k x 128 synthetic and the store, few queries")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        if args.data == "synthetic:100000x512,store":
            args.data = "synthetic:20000x128,store"
        args.queries, args.batch_queries, args.single_seconds, args.rounds = 50, 100, 0.5, 1
    return args


# ---- data ----------------------------------------------------------------------------------------


class Dataset:
    """Vectors held once, in the store-like exact index; ``xb`` is a numpy view of them."""

    def __init__(self, name, exact, ids, queries, query_ids, source):
        import faiss

        self.name = name
        self.exact = exact  # IndexIDMap2(IndexFlatIP), as a store holds it
        self.flat = faiss.downcast_index(exact.index)
        self.n, self.d = self.flat.ntotal, self.flat.d
        self.xb = faiss.rev_swig_ptr(self.flat.get_xb(), self.n * self.d).reshape(self.n, self.d)
        self.ids = ids
        self.queries = queries
        self.query_ids = query_ids  # None: the queries are not stored vectors
        self.source = source

    @property
    def nbytes(self) -> int:
        return self.n * self.d * 4


def synthetic(n: int, d: int, n_queries: int, seed: int) -> Dataset:
    """n random unit vectors of dim d, generated straight into the index in chunks (no second copy)."""
    import faiss
    import numpy as np

    rng = np.random.default_rng(seed)
    exact = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    chunk = max(1, (1 << 28) // (4 * d))  # ~256 MB at a time
    for start in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - start), d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        exact.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
    queries = rng.standard_normal((n_queries, d), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return Dataset(f"synthetic {n:,} x {d}", exact, np.arange(n, dtype=np.int64), queries, None,
                   f"numpy default_rng({seed}) standard normal rows, L2-normalised")


def gaussian_like(n: int, path: str, n_queries: int, seed: int) -> Dataset:
    """n unit vectors drawn from a Gaussian with the mean and covariance of a store's vectors.

    Uniformly random unit vectors are the worst case for approximate search (every
    point is nearly equidistant from every other); real embeddings are anisotropic, with
    most variance in few directions. This keeps that second-order structure at any N
    (no clusters, so it is still harder than the real data). Queries are fresh draws.
    """
    import faiss
    import numpy as np

    from mediret.store import Store

    with Store.open(_store_path(path)) as store:
        ids = np.sort(faiss.vector_to_array(store.index.id_map).astype(np.int64))
        real = store.vectors(ids).astype(np.float64)
        name = Path(store.path).name
    mean = real.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(real, rowvar=False))
    root = (vectors * np.sqrt(np.clip(values, 0, None))).T.astype(np.float32)  # z @ root ~ N(0, cov)
    mean = mean.astype(np.float32)
    d = len(mean)
    rng = np.random.default_rng(seed)

    def draw(count: int):
        x = rng.standard_normal((count, d), dtype=np.float32) @ root
        x += mean
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    exact = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    chunk = max(1, (1 << 28) // (4 * d))
    for start in range(0, n, chunk):
        x = draw(min(chunk, n - start))
        exact.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
    explained = np.sort(values)[::-1].cumsum() / values.sum()
    return Dataset(f"HAM-like Gaussian {n:,} x {d}", exact, np.arange(n, dtype=np.int64), draw(n_queries), None,
                   f"Gaussian with the mean and covariance of the {len(real):,} vectors of {name} "
                   f"(top 32 of {d} directions hold {explained[31]:.0%} of the variance), L2-normalised")


def _store_path(path: str | None) -> str:
    if path:
        return path
    found = [p for p in DEFAULT_STORES if (_bench.ROOT / p / "mediret.duckdb").is_file()]
    if not found:
        raise SystemExit(f"no store at {' or '.join(DEFAULT_STORES)}; run bench_ingest.py --keep-store "
                         f"{DEFAULT_STORES[0]} (or pass store:PATH)")
    return str(_bench.ROOT / found[0])


def store_data(path: str | None, n_queries: int, seed: int) -> Dataset:
    """A mediret store's vectors (its own IndexIDMap2), queries = a seeded sample of stored vectors."""
    import faiss
    import numpy as np

    from mediret.store import Store

    path = _store_path(path)
    with Store.open(path) as store:
        exact = store.index
        encoder = store.encoder.name
        images = len(store)
    ids = np.sort(faiss.vector_to_array(exact.id_map).astype(np.int64))
    rows = np.random.default_rng(seed).choice(len(ids), size=min(n_queries, len(ids)), replace=False)
    queries = exact.reconstruct_batch(ids[rows])
    data = Dataset(f"store {Path(path).name} ({images:,} x {exact.d})", exact, ids, queries, ids[rows],
                   f"{path} ({encoder})")
    return data


# ---- measurements --------------------------------------------------------------------------------


def stream_rates(xb) -> dict[str, float]:
    """Bytes/s of numpy passes over ``xb``: matrix-vector product at 1 and 2 BLAS threads, column sum."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    q = np.ones(xb.shape[1], dtype=np.float32) / math.sqrt(xb.shape[1])
    rates = {}
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            xb @ q
            seconds = _bench.best(_bench.time_call(lambda: xb @ q, repeat=3))
        rates[f"numpy x @ q, {threads} BLAS thread(s)"] = xb.nbytes / seconds
    np.add.reduce(xb, axis=0)
    seconds = _bench.best(_bench.time_call(lambda: np.add.reduce(xb, axis=0), repeat=3))
    rates["numpy x.sum(axis=0)"] = xb.nbytes / seconds
    return rates


def single_qps(search_one, queries, seconds: float) -> tuple[float, int]:
    """Queries/s of one-query-at-a-time search, running about ``seconds`` (>= 3 queries)."""
    search_one(queries[0])  # warm
    started = time.perf_counter()
    done = 0
    while done < 3 or (done < len(queries) and time.perf_counter() - started < seconds):
        search_one(queries[done % len(queries)])
        done += 1
    return done / (time.perf_counter() - started), done


def interleaved_qps(paths: dict, queries, args) -> dict:
    """Single-query q/s of each ``(label, faiss threads) -> search_one``; ``--rounds`` interleaved rounds,
    the best round of each kept (a load spike from another process then hits one round, not one path)."""
    best_of: dict = {}
    for _ in range(args.rounds):
        for (label, threads), fn in paths.items():
            qps, count = with_omp_blas(threads, lambda: single_qps(fn, queries, args.single_seconds))
            if qps > best_of.get((label, threads), (0.0, 0))[0]:
                best_of[(label, threads)] = (qps, count)
    return best_of


def with_omp_blas(threads: int, fn):
    """fn() with FAISS's OpenMP and the BLAS libraries both at ``threads``."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads, user_api="blas"):
        return with_omp(threads, fn)


def with_omp(threads: int, fn):
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        return fn()
    finally:
        faiss.omp_set_num_threads(before)


def recall_at(approx_ids, truth_ids, query_ids, k: int = K) -> float:
    """Mean |approx top-k ∩ exact top-k| / k, each query's own id (if stored) left out of both."""
    total = 0.0
    for q in range(len(approx_ids)):
        own = None if query_ids is None else int(query_ids[q])
        truth = [int(i) for i in truth_ids[q] if i >= 0 and i != own][:k]
        approx = [int(i) for i in approx_ids[q] if i >= 0 and i != own][:k]
        total += len(set(truth) & set(approx)) / k
    return float(total / max(1, len(approx_ids))) if len(approx_ids) else float("nan")


def flat_part(data: Dataset, args, out: dict) -> dict:
    """Bandwidth bound, single-query (raw / mediret / numpy, 1 and 2 threads) and batched flat search.

    The rate of the bound is the fastest pass over the array seen in the run: the
    stream_rates passes, the numpy matrix-vector top-k loop, or FAISS's own one-query
    scan (which streamed faster than any numpy pass on one host: 25.4 against 21.7 GB/s).
    """
    import faiss
    import numpy as np

    from mediret.search import SearchIndex

    rates = stream_rates(data.xb)
    rate = max(rates.values())
    bound = rate / data.nbytes
    product = SearchIndex("exact", data.exact, data.exact)
    # mediret times its two single-query scans on the first such query, under the thread settings
    # then in force: here the defaults, as in a user's process (not the 1-thread round below).
    product.search(data.queries[0], K)
    id_map = faiss.vector_to_array(data.exact.id_map)

    def numpy_top_k(q):  # what a bandwidth-bound exact search looks like: one BLAS sgemv + a partial sort
        scores = data.xb @ q
        top = np.argpartition(-scores, K)[:K]
        top = top[np.argsort(-scores[top])]
        return scores[top], id_map[top]

    paths = {(label, threads): fn for threads in (1, 2)
             for label, fn in (("raw IndexFlatIP", lambda q: data.flat.search(q[None], K)),
                               ("mediret SearchIndex (exact)", lambda q: product.search(q, K)),
                               ("numpy x @ q + argpartition", numpy_top_k))}
    measured = interleaved_qps(paths, data.queries, args)
    # The numpy top-k loop and FAISS's one-query scan are passes over the array too: when one
    # streamed faster than stream_rates, it sets the (higher, stricter) bound.
    for name, prefix in (("numpy x @ q + argpartition loop (fastest round)", "numpy"),
                         ("raw IndexFlatIP, one query (fastest round)", "raw IndexFlatIP")):
        rates[name] = max(qps for (label, _), (qps, _) in measured.items() if label.startswith(prefix)) * data.nbytes
    rate = max(rates.values())
    bound = rate / data.nbytes
    rows = []
    for (label, threads), (qps, count) in measured.items():
        rows.append({"path": label, "threads (OpenMP, BLAS)": threads, "nq": 1, "queries": count, "q/s": qps,
                     "GB/s": qps * data.nbytes / 1e9, "of bound": qps / bound})
    nq = args.batch_queries
    rng = np.random.default_rng(args.seed + 1)
    batch = data.queries[rng.integers(0, len(data.queries), nq)] if nq > len(data.queries) else data.queries[:nq]
    batch = np.ascontiguousarray(batch)
    for threads in (1, 2):
        seconds = with_omp(threads, lambda: _bench.best(_bench.time_call(lambda: data.flat.search(batch, K))))
        rows.append({"path": "raw IndexFlatIP (batched)", "threads (OpenMP, BLAS)": threads, "nq": nq, "queries": nq,
                     "q/s": nq / seconds, "GB/s": nq * data.nbytes / seconds / 1e9,
                     "of bound": (nq / seconds) / bound})
    # The goal is about mediret's own exact search; the other rows are references.
    singles = [r for r in rows if r["nq"] == 1 and r["path"].startswith("mediret")]
    best_single = max(singles, key=lambda r: r["q/s"])
    out.update({"stream_rates_GBps": {k: v / 1e9 for k, v in rates.items()}, "bound_qps": bound,
                "index_bytes": data.nbytes, "flat_rows": rows, "flat_single_best": best_single,
                "mediret_single_query_scan": product._one_query_scan})
    print("  streaming rates: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in rates.items()))
    print(f"  bound: {rate / 1e9:.1f} GB/s / {data.nbytes / 1e9:.2f} GB = {bound:.2f} single queries/s; "
          f"mediret's single-query scan: {product._one_query_scan}")
    print(_bench.table(rows))
    return best_single


def ground_truth(data: Dataset, k: int):
    """Exact top-k ids (plus one for a stored query's own id) of every query."""
    _, ids = with_omp(2, lambda: data.exact.search(data.queries, k + (data.query_ids is not None)))
    return ids


def build_hnsw(data: Dataset):
    import faiss

    from mediret.search import HNSW_EF_CONSTRUCTION, HNSW_M, SearchIndex

    started = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(data.d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index = faiss.IndexIDMap2(hnsw)
    index.add_with_ids(data.xb, data.ids)
    seconds = time.perf_counter() - started
    params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": 16}
    return SearchIndex("hnsw", index, data.exact, params=params), seconds


def build_ivf_pq(data: Dataset, per_centroid: int | None, seed: int):
    """mediret's own IVF-PQ build, tuning (nprobe x shortlist) included, on the bench's vectors."""
    from mediret import search

    saved = search.IVF_TRAIN_PER_LIST
    if per_centroid is not None:
        search.IVF_TRAIN_PER_LIST = per_centroid
    try:
        started = time.perf_counter()
        built = search.build_from_vectors("ivf-pq", data.xb, data.ids, data.exact, seed)
        return built, time.perf_counter() - started
    finally:
        search.IVF_TRAIN_PER_LIST = saved


class IVFFlatSearch:
    """IndexIVFFlat with mediret's nlist: not a mediret index kind, a reference for IVF-PQ.

    Scores are exact (the lists hold the full vectors), so no re-ranking is needed; it
    costs the flat index's memory again, which IVF-PQ with re-ranking also needs
    (its re-ranking reads the store's flat vectors).
    """

    kind = "ivf-flat"

    def __init__(self, index, params):
        self.index = index
        self.params = params

    def search(self, queries, k: int):
        import faiss
        import numpy as np

        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        return self.index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=self.params["nprobe"]))


def build_ivf_flat(data: Dataset, per_centroid: int | None, seed: int):
    import faiss

    from mediret.search import ivf_pq_shape

    started = time.perf_counter()
    nlist = ivf_pq_shape(data.n, data.d)[0]
    quantizer = faiss.IndexFlatIP(data.d)
    index = faiss.IndexIVFFlat(quantizer, data.d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    if per_centroid is not None:
        index.cp.max_points_per_centroid = per_centroid
    index.train(data.xb)
    trained = time.perf_counter()
    index.add_with_ids(data.xb, data.ids)
    seconds = time.perf_counter() - started
    params = {"nlist": nlist, "nprobe": 1, "train_points": min(data.n, nlist * index.cp.max_points_per_centroid),
              "train_seconds": round(trained - started, 2)}
    built = IVFFlatSearch(index, params)
    built._quantizer = quantizer
    return built, seconds


def serialized_bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def ann_part(kind: str, data: Dataset, truth, flat_best: dict, args, out: dict, hnsw_scale: list) -> None:
    """Build ``kind``, sweep its knob, report recall and single-query q/s at the target."""
    from mediret.search import EF_REFINE, HNSW_EF_SEARCH

    if kind == "hnsw" and data.n > args.hnsw_max_n:
        if hnsw_scale:
            n0, s0 = hnsw_scale[-1]
            estimate = s0 * (data.n / n0) * math.log(data.n) / math.log(n0)
            note = f"skipped (> --hnsw-max-n {args.hnsw_max_n:,}); build estimated {estimate / 60:.0f} min " \
                   f"from {s0:.0f} s at {n0:,} (n log n)"
        else:
            estimate, note = None, f"skipped (> --hnsw-max-n {args.hnsw_max_n:,})"
        print(f"  hnsw: {note}")
        out[kind] = {"skipped": True, "estimated_build_seconds": estimate, "note": note}
        return
    if kind == "hnsw":
        built, seconds = build_hnsw(data)
        knob, values = "efSearch", tuple(HNSW_EF_SEARCH) + EF_EXTRA
        hnsw_scale.append((data.n, seconds))
    elif kind == "ivf-pq":
        # mediret tunes nprobe and the shortlist itself (on stored vectors as queries); the
        # bench takes that setting as is and measures it on its own queries
        built, seconds = build_ivf_pq(data, args.ivf_train_per_centroid, args.seed)
        knob, values = "nprobe", (built.params["nprobe"],)
    else:
        built, seconds = build_ivf_flat(data, args.ivf_train_per_centroid, args.seed)
        nlist = built.params["nlist"]
        knob = "nprobe"
        values = tuple(p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if p < nlist) + (nlist,)
    size = serialized_bytes(built.index)
    print(f"  {kind}: built in {seconds:.1f} s ({built.params}), index {size / 1e6:.1f} MB", flush=True)
    extra = 1 if data.query_ids is not None else 0
    rows, chosen = [], None
    def measure(value):
        built.params[knob] = value
        _, approx = with_omp(2, lambda: built.search(data.queries, K + extra))
        row = {"kind": kind, knob: value, "recall@10": recall_at(approx, truth, data.query_ids)}
        rows.append(row)
        return row

    previous = None
    for value in values:
        row = measure(value)
        if row["recall@10"] >= RECALL_GOAL:
            chosen = row
            if kind == "hnsw" and previous is not None:
                # efSearch is any integer: the smallest reaching the goal, to within EF_REFINE
                for between in range(previous + EF_REFINE, value, EF_REFINE):
                    row = measure(between)
                    if row["recall@10"] >= RECALL_GOAL:
                        chosen = row
                        break
            break
        previous = value
    target = chosen or max(rows, key=lambda r: r["recall@10"])
    built.params[knob] = target[knob]
    if kind == "ivf-pq":
        target["shortlist"] = f"max({built.params['refine_factor']}k, 100)"
        target["tuned by mediret"] = {"recall@1/10/50 on its held-out stored vectors": built.recall,
                                      "build_seconds incl. tuning": built.build_seconds}
    measured = interleaved_qps({(kind, threads): (lambda q: built.search(q, K)) for threads in (1, 2)},
                               data.queries, args)
    for (_, threads), (qps, _) in measured.items():
        target[f"q/s (faiss {threads} thr)"] = qps
    best_qps = max(target["q/s (faiss 1 thr)"], target["q/s (faiss 2 thr)"])
    target["x flat single"] = best_qps / flat_best["q/s"]
    for row in rows:
        extra_note = f", shortlist {row['shortlist']}" if "shortlist" in row else ""
        print(f"    {knob} {row[knob]}{extra_note}: recall@10 {row['recall@10']:.4f}")
    status = "reaches" if chosen else "does NOT reach"
    print(f"    -> {knob} {target[knob]} {status} recall@10 {RECALL_GOAL}: {target['recall@10']:.4f}, "
          f"{best_qps:.0f} single q/s = {target['x flat single']:.1f}x flat single-query "
          f"({flat_best['q/s']:.2f} q/s)", flush=True)
    out[kind] = {"build_seconds": seconds, "index_bytes": size, "params": dict(built.params),
                 "sweep": rows, "chosen": target, "reached_recall_goal": chosen is not None}


def flat_again(data: Dataset, flat_best: dict, kinds: list[str], args, out: dict) -> None:
    """Measure mediret's flat single-query rate again after the ANN builds; the faster of the two
    measurements is the reference of every "x flat" (a load spike during one of them then cannot
    flatter the approximate indexes)."""
    from mediret.search import SearchIndex

    product = SearchIndex("exact", data.exact, data.exact)
    again = interleaved_qps({("mediret SearchIndex (exact), after the ANN builds", threads):
                             (lambda q: product.search(q, K)) for threads in (1, 2)}, data.queries, args)
    qps_again = max(qps for qps, _ in again.values())
    reference = max(flat_best["q/s"], qps_again)
    out["flat_single_qps_before_after"] = [flat_best["q/s"], qps_again]
    print(f"  flat single-query again after the ANN builds: {qps_again:.2f} q/s (before: {flat_best['q/s']:.2f}); "
          f"x flat below uses {reference:.2f}", flush=True)
    for kind in kinds:
        chosen = out[kind].get("chosen")
        if chosen:
            best_qps = max(chosen["q/s (faiss 1 thr)"], chosen["q/s (faiss 2 thr)"])
            chosen["x flat single"] = best_qps / reference
            chosen["flat reference q/s"] = reference
            print(f"    {kind}: {best_qps:.0f} q/s = {chosen['x flat single']:.1f}x flat", flush=True)


def store_product_build(data: Dataset, path: str, out: dict) -> None:
    """mediret's own build_index on the store (tuning and recall included), for reference."""
    from mediret.search import build_index
    from mediret.store import Store

    with Store.open(path) as store:
        for kind in ("hnsw", "ivf-pq"):
            built = build_index(store, kind)
            out[f"mediret build_index {kind}"] = built.describe()
            print(f"  mediret.search.build_index({kind}): {built.describe()}", flush=True)


def run_dataset(spec: str, args, hnsw_scale: list) -> dict:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if spec.startswith("gauss:"):
        _, n, *rest = spec.split(":", 2)
        started = time.perf_counter()
        data = gaussian_like(int(n), rest[0] if rest else None, args.queries, args.seed)
        print(f"\n## {data.name}  (generated in {time.perf_counter() - started:.1f} s): {data.source}", flush=True)
        path = None
    elif spec.startswith("synthetic:"):
        n, d = (int(v) for v in spec.split(":", 1)[1].lower().split("x"))
        started = time.perf_counter()
        data = synthetic(n, d, args.queries, args.seed)
        print(f"\n## {data.name}  (generated in {time.perf_counter() - started:.1f} s)", flush=True)
        path = None
    else:
        path = spec.split(":", 1)[1] if ":" in spec else None
        data = store_data(path, args.queries, args.seed)
        path = data.source.split(" (")[0]
        print(f"\n## {data.name}: {data.source}", flush=True)
    out: dict = {"data": data.name, "n": data.n, "d": data.d, "source": data.source, "queries": len(data.queries)}
    flat_best = flat_part(data, args, out)
    bound_ratio = flat_best["of bound"]
    out["goals"] = [_bench.goal_line(f"{data.name}: flat single-query vs bandwidth bound", bound_ratio,
                                     BOUND_GOAL)]
    ann = [k for k in kinds if k != "flat"]
    if ann:
        truth = ground_truth(data, K)
        for kind in ann:
            ann_part(kind, data, truth, flat_best, args, out, hnsw_scale)
        flat_again(data, flat_best, ann, args, out)
        for kind in ann:
            result = out[kind]
            if data.n >= ANN_GOAL_N and not result.get("skipped"):
                if result["reached_recall_goal"]:
                    label = kind if kind != "ivf-flat" else "ivf-flat (reference, not a mediret kind)"
                    out["goals"].append(_bench.goal_line(f"{data.name}: {label} at recall@10 >= 0.95 vs flat "
                                                         "single-query", result["chosen"]["x flat single"],
                                                         ANN_SPEEDUP_GOAL))
                else:
                    print(f"GOAL {data.name}: {kind} >= 50x flat at recall@10 >= 0.95 -> MISSED "
                          f"(recall {result['chosen']['recall@10']:.3f} at best)")
                    out["goals"].append({"goal": f"{data.name}: {kind} recall@10 >= 0.95", "met": False,
                                         "value": result["chosen"]["recall@10"], "target": RECALL_GOAL})
        if path is not None and not args.quick:
            store_product_build(data, path, out)
    del data
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import faiss
    import numpy  # noqa: F401

    info = _bench.print_header("Search: flat vs memory-bandwidth bound; HNSW and IVF-PQ vs flat")
    print(f"faiss {faiss.__version__}, OpenMP threads by default {faiss.omp_get_max_threads()}; "
          f"k = {K}; {args.queries} queries for recall and single-query loops (~{args.single_seconds:g} s each)")
    results, hnsw_scale = [], []
    for spec in [s.strip() for s in args.data.split(",") if s.strip()]:
        results.append(run_dataset(spec, args, hnsw_scale))
    print("\n## summary\n")
    summary = []
    for r in results:
        fb = r["flat_single_best"]
        row = {"data": r["data"], "index MB": r["index_bytes"] / 1e6, "bound q/s": r["bound_qps"],
               "flat 1-query q/s": fb["q/s"], "of bound": fb["of bound"],
               "flat batched q/s": max(x["q/s"] for x in r["flat_rows"] if x["nq"] > 1)}
        for kind in ("hnsw", "ivf-pq", "ivf-flat"):
            if kind in r and not r[kind].get("skipped"):
                c = r[kind]
                knob = "efSearch" if kind == "hnsw" else "nprobe"
                row[f"{kind} setting"] = f"{knob}={c['chosen'][knob]}" + (
                    f", shortlist {c['chosen']['shortlist']}" if "shortlist" in c["chosen"] else "")
                row[f"{kind} recall@10"] = c["chosen"]["recall@10"]
                row[f"{kind} x flat"] = c["chosen"]["x flat single"]
                row[f"{kind} build s"] = c["build_seconds"]
            elif kind in r:
                row[f"{kind} setting"] = "skipped"
        summary.append(row)
    print(_bench.table(summary, list(dict.fromkeys(k for row in summary for k in row))))
    goals = [g for r in results for g in r["goals"]]
    end_load = _bench.machine()["loadavg"]
    print(f"\nload average at end: {' '.join(str(x) for x in end_load)}")
    _bench.write_json(args.json, {"benchmark": "search", "command": _bench.command_line(), "machine": info,
                                  "load_at_end": end_load, "args": vars(args), "results": results,
                                  "summary": summary, "goals": goals})
    return 0


if __name__ == "__main__":
    sys.exit(main())
