"""In-memory faiss indexes over unit vectors (inner product = cosine), with measured recall.

Scans no longer use these: the corpus steps search out of core (scanner/corpus/search.py). They remain
the reference for benchmarks/bench_index.py (flat vs IVF vs HNSW held in memory), the exact search of
scanner.neighbours.dedup.find_duplicate_groups, and the replication unit tests.

- flat: exact `IndexFlatIP`; the recall reference.
- ivf:  `IndexIVFFlat` with nlist = 2 sqrt(N) lists, k-means trained on a seeded sample of 64
        vectors per list; nprobe is raised until recall@k on sampled queries reaches the target (0.99).
- hnsw: `IndexHNSWFlat` (M = 32), efSearch tuned the same way.
A GPU copy of the index is used when faiss sees a GPU.
"""

from __future__ import annotations

import math
import time

import numpy as np

TARGET_RECALL = 0.99
IVF_LISTS_PER_SQRT_N = 2.0  # nlist = 2 sqrt(N): ~2000 lists at 10^6 vectors
IVF_TRAIN_PER_LIST = 64  # k-means training vectors per list


def _as_f32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be (N, d), got shape {x.shape}")
    return x


def knn(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """queries: (Q, d) unit rows -> (sims (Q, k) float32 descending, ids (Q, k) int64; -1 where fewer exist)."""
    return index.search(_as_f32(queries), k)


def exact_knn(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product kNN (the recall reference)."""
    import faiss

    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(_as_f32(vectors))
    return flat.search(_as_f32(queries), k)


def measure_recall(index, vectors: np.ndarray, k: int = 10, sample: int = 1000, seed: int = 0,
                   reference: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> float:
    """Recall@k of `index` against exact search for `sample` seeded queries drawn from vectors (N, d).

    A returned neighbour counts as correct when its similarity reaches the k-th exact similarity
    (minus 1e-5): exact duplicates tie, and any of the tied ids is a right answer.
    `reference` = (query_ids, exact_sims) from an earlier call skips the exact search.
    """
    vectors = _as_f32(vectors)
    k = min(k, len(vectors))
    if reference is None:
        reference = recall_reference(vectors, k, sample, seed)
    qids, exact_sims = reference
    sims, ids = knn(index, vectors[qids], k)
    kth = exact_sims[:, k - 1:k] - 1e-5
    hits = (sims >= kth) & (ids >= 0)
    return float(hits.sum() / hits.size)


def recall_reference(vectors: np.ndarray, k: int, sample: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(query_ids (Q,), exact_sims (Q, k)) for measure_recall."""
    rng = np.random.default_rng(seed)
    qids = np.sort(rng.choice(len(vectors), min(sample, len(vectors)), replace=False))
    sims, _ = exact_knn(vectors, vectors[qids], k)
    return qids, sims


def _maybe_gpu(index, info: dict):
    import faiss

    if faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources"):
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
        index._memscan_gpu_res = res  # keep the resources alive as long as the index
        info["device"] = "gpu"
    else:
        info["device"] = "cpu"
    return index


def _set_probe(index, kind: str, value: int) -> None:
    """nprobe (IVF) or efSearch (HNSW); ParameterSpace reaches CPU and GPU indexes alike."""
    import faiss

    faiss.ParameterSpace().set_index_parameter(index, "nprobe" if kind == "ivf" else "efSearch", value)


def _effort_ladder(top: int) -> list[int]:
    """1, 2, 3, 5, 8, 11, ... (steps of ~1.5x) up to and including top."""
    out = {top}
    v = 1.0
    while v < top:
        out.add(round(v))
        v *= 1.5
    return sorted(out)


def build_index(vectors: np.ndarray, cfg, seed: int = 0, target_recall: float = TARGET_RECALL):
    """vectors: (N, d) float32 unit rows -> (index, info).

    cfg: NeighboursConfig (index, flat_max, k, recall_sample). info: kind, n, dim, device, build_s,
    and for approximate kinds nlist/nprobe or efSearch and recall_at_k measured against exact search
    on cfg.recall_sample queries (the number summary.json reports).
    """
    import faiss

    x = _as_f32(vectors)
    n, d = x.shape
    kind = cfg.index
    if kind not in ("auto", "flat", "ivf", "hnsw"):
        raise ValueError(f"neighbours.index must be 'auto', 'flat', 'ivf' or 'hnsw', got {kind!r}")
    if kind == "auto":
        kind = "flat" if n <= cfg.flat_max else ("ivf" if faiss.get_num_gpus() > 0 else "hnsw")
    t0 = time.time()
    info: dict = {"kind": kind, "n": n, "dim": d}
    if kind == "flat":
        index = _maybe_gpu(faiss.IndexFlatIP(d), info)
        index.add(x)
        info["build_s"] = round(time.time() - t0, 3)
        info["recall_at_k"] = 1.0
        return index, info
    if kind == "ivf":
        nlist = int(max(1, min(IVF_LISTS_PER_SQRT_N * math.sqrt(n), n // 39)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = x[np.sort(rng.choice(n, min(n, IVF_TRAIN_PER_LIST * nlist), replace=False))]
        index.cp.seed = seed
        index.train(train)
        index = _maybe_gpu(index, info)
        index.add(x)
        info["nlist"] = nlist
        probes = _effort_ladder(nlist)
        knob = "nprobe"
    else:
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.add(x)  # HNSW has no GPU implementation in faiss
        info["device"] = "cpu"
        probes = [p for p in _effort_ladder(2048) if p >= 16]
        knob = "efSearch"
    info["build_s"] = round(time.time() - t0, 3)
    # Raise the search effort until recall on the sample reaches the target (or effort is exhausted).
    k = min(cfg.k, n)
    ref = recall_reference(x, k, cfg.recall_sample, seed)
    for p in sorted(set(probes)):
        _set_probe(index, kind, p)
        recall = measure_recall(index, x, k, reference=ref)
        if recall >= target_recall:
            break
    info[knob], info["recall_at_k"], info["recall_k"] = p, round(recall, 5), k
    info["recall_sample"] = len(ref[0])
    return index, info
