"""The ivf-pq index kind: an OPQ rotation, then ``IndexIVFPQFastScan``, the shortlist re-scored exactly.

nlist = min(4 sqrt(N), N / 39) inverted lists (at least 39 training points per
centroid, FAISS's minimum; spherical k-means on at most 64 points per list, which
at 1M x 512 cut training from 195 to 53 s for -0.02 recall), found through an
HNSW graph over the centroids; the residual to the list's centroid coded by
m = dim / 4 sub-quantizers (4-d sub-vectors; the divisor of dim nearest dim / 4
otherwise) of 4 bits, dim / 8 bytes per vector, which FAISS scans with SIMD
table look-ups. The OPQ rotation (20 iterations up to 512-d, fewer above, see
``opq_iterations``; on at most 65,536 vectors, trained for those very 4-bit
codes; only from 4 training vectors per dimension up, as FAISS's OPQ training
crashes on fewer vectors than dimensions) spreads the variance of anisotropic
embeddings over the sub-vectors. A PQ shortlist of max(refine_factor * k, 100)
ids is re-scored with the stored vectors (IVFADC+R), so scores are exact
cosines. nprobe (1, 2, 3, 4, 6, ... in ~1.5x steps) and refine_factor (10 to 200)
are tuned together: of the settings whose recall@10 minus two standard errors
reaches the target (0.95 by default), the fastest on the tuning queries (see
``tune``). Stores under 160 vectors (10 per 4-bit code word) are refused. At
1M x 512 (BENCHMARKS.md), 8-bit PQ with 32-byte codes and no rotation needed
2,000 re-scored candidates per query and ran at a quarter of this layout's speed
at the same recall.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import SearchError
from . import recall
from .base import SearchIndex
from .hnsw import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M

IVF_REFINE_FACTORS = (10, 20, 30, 50, 100, 200)  # PQ shortlist = max(factor * k, REFINE_MIN) ids
IVF_NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
IVF_TRAIN_PER_LIST = 64  # k-means training sample: at most this many vectors per inverted list
IVF_SUBVECTOR = 4  # dimensions per PQ sub-quantizer
IVF_NBITS = 4  # bits per sub-quantizer code: FAISS's fast-scan (SIMD) PQ
IVF_MIN_VECTORS = 10 * 2 ** IVF_NBITS  # 10 training points per PQ code word
OPQ_ITERATIONS = 20  # at <= 512-d (FAISS's default is 50); fewer above, see opq_iterations
OPQ_MIN_ITERATIONS = 4
OPQ_MIN_PER_DIM = 4  # OPQ only with at least this many training vectors per dimension
OPQ_TRAIN_POINTS = 65536
ADD_CHUNK = 65536
REFINE_MIN = 100


def opq_iterations(dim: int) -> int:
    """OPQ training iterations: OPQ_ITERATIONS up to 512-d, fewer in proportion to dim**2 above
    (one took about 1.3 s at 512-d and 4.5 s at 1280-d on 2 cores in ad hoc timings; 20 at
    1280-d made an 8k store's build 91 s, BENCHMARKS.md), at least OPQ_MIN_ITERATIONS."""
    return max(OPQ_MIN_ITERATIONS, min(OPQ_ITERATIONS, round(OPQ_ITERATIONS * (512 / dim) ** 2)))


def ivf_pq_shape(n: int, dim: int) -> tuple[int, int, int]:
    """(nlist, m, nbits) for N vectors of ``dim`` (see the module docstring)."""
    nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    m = min(divisors, key=lambda d: (abs(d - dim / IVF_SUBVECTOR), d))
    return nlist, m, IVF_NBITS


def build(vectors: np.ndarray, ids: np.ndarray, seed: int) -> tuple[Any, dict[str, Any]]:
    """OPQ rotation (from OPQ_MIN_PER_DIM training vectors per dimension up), then IVF over
    spherical k-means lists, then 4-bit fast-scan PQ of the residuals, trained on one seeded
    sample and filled in chunks."""
    import faiss

    n, dim = vectors.shape
    if n < IVF_MIN_VECTORS:
        raise SearchError(f"an ivf-pq index needs at least {IVF_MIN_VECTORS} vectors, the store holds {n}; "
                          "exact search over so few is already instant")
    nlist, m, nbits = ivf_pq_shape(n, dim)
    sample = np.random.default_rng(seed).permutation(n)[:min(n, nlist * IVF_TRAIN_PER_LIST)]
    train = vectors[np.sort(sample)]
    coarse = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)  # nearest lists without a scan of all
    coarse.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    ivf = faiss.IndexIVFPQFastScan(coarse, dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    ivf.by_residual = True
    kmeans_index = faiss.IndexFlatIP(dim)
    ivf.quantizer_trains_alone, ivf.clustering_index = 2, kmeans_index  # k-means exact, then the graph
    ivf.cp.seed = ivf.pq.cp.seed = seed
    ivf.pq.cp.min_points_per_centroid = 10  # IVF_MIN_VECTORS keeps N >= 10 * 2**nbits
    opq = None
    if len(train) >= OPQ_MIN_PER_DIM * dim:  # FAISS's OPQ training crashes when N < dim
        opq = faiss.OPQMatrix(dim, m)
        opq_pq = faiss.ProductQuantizer(dim, m, nbits)  # rotate for the very codes the index stores
        opq_pq.cp.min_points_per_centroid, opq_pq.cp.seed = 10, seed
        opq.pq, opq.niter, opq.max_train_points = opq_pq, opq_iterations(dim), OPQ_TRAIN_POINTS
        index = faiss.IndexPreTransform(opq, ivf)
    else:
        index = ivf
    index.train(train)
    ivf.clustering_index = None  # only for training; the index must not point at it
    if opq is not None:
        opq.pq = None  # likewise
    for start in range(0, n, ADD_CHUNK):  # each chunk is rotated on its own: no rotated copy of all N
        index.add_with_ids(vectors[start:start + ADD_CHUNK], ids[start:start + ADD_CHUNK])
    params = {"nlist": nlist, "m": m, "nbits": nbits, "opq": opq is not None,
              "opq_iterations": opq.niter if opq is not None else 0, "coarse": "hnsw", "nprobe": 1,
              "refine_factor": IVF_REFINE_FACTORS[0], "train_points": len(train)}
    return index, params


def search(index: SearchIndex, queries: np.ndarray, k: int, sel) -> tuple[np.ndarray, np.ndarray]:
    """IVF-PQ shortlist of max(refine_factor * k, REFINE_MIN) ids, re-ranked exactly."""
    import faiss

    nprobe = index.params["nprobe"]
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    # the graph over the centroids finds the nprobe nearest lists (a pointer: keep it referenced)
    graph_params = faiss.SearchParametersHNSW(efSearch=max(nprobe, HNSW_EF_SEARCH[0]))
    if index.params.get("coarse") == "hnsw":
        params.quantizer_params = graph_params
    if sel is not None:
        params.sel = sel
    shortlist_size = max(index.params["refine_factor"] * k, REFINE_MIN)
    _, shortlist = index.index.search(queries, shortlist_size, params=params)
    del graph_params
    return index.exact_scan.rescore(queries, shortlist, k)


def tune(index: SearchIndex, queries: np.ndarray, query_ids: np.ndarray, vectors: np.ndarray,
         ids: np.ndarray, truth: np.ndarray) -> None:
    """(nprobe, refine_factor) reaching the target recall in the least measured search time.

    Recall grows with both knobs. For each shortlist factor (ascending) the nprobe
    sweep stops at the first value reaching the target (see ``recall.recall10``), or when
    recall stops growing (the shortlist, not nprobe, is then the limit); a longer shortlist
    never needs more nprobe than a shorter one did. Of the settings reaching the target the
    fastest, timed on the tuning queries, wins; when none does, the cheapest within
    0.01 of the best recall seen.
    """
    nlist, target = index.params["nlist"], index.params["target_recall"]
    nprobes = tuple(p for p in IVF_NPROBES if p < nlist) + (nlist,)
    reached: list[tuple[float, int, int]] = []  # (seconds, nprobe, factor)
    seen: list[tuple[float, int, int]] = []  # (recall, nprobe, factor)
    for factor in IVF_REFINE_FACTORS:
        index.params["refine_factor"] = factor
        previous = -1.0
        for nprobe in nprobes:
            index.params["nprobe"] = nprobe
            mean, lower, seconds = recall.recall10(index, queries, query_ids, vectors, ids, truth)
            seen.append((mean, nprobe, factor))
            if lower >= target:
                reached.append((seconds, nprobe, factor))
                nprobes = tuple(p for p in nprobes if p <= nprobe)
                break
            if mean < previous + 0.002:
                break  # plateau: this shortlist caps recall
            previous = mean
        if reached and reached[-1][1] == nprobes[0]:
            break  # nprobe cannot go lower; longer shortlists only cost more
    if reached:
        _, nprobe, factor = min(reached)
    else:
        best = max(r for r, _, _ in seen)
        _, nprobe, factor = min((p * f, p, f) for r, p, f in seen if r >= best - 0.01)
    index.params.update(nprobe=nprobe, refine_factor=factor)
