"""In-memory references of the out-of-core corpus steps, for benchmarks and tests (never a scan's code path).

The scan searches out of core (scanner/corpus/search.py) and groups through scanner/corpus/neighbours.py; these
hold a whole (small) corpus in memory instead: faiss indexes over unit vectors with measured recall
(benchmarks/bench_index.py compares them), and find_duplicate_groups, the same grouping rule on arrays
(bench_embedder.py scores embedder recipes with it; the tests check the rule on it).

- flat: exact `IndexFlatIP`; the recall reference.
- ivf:  `IndexIVFFlat` with nlist = 2 sqrt(N) lists, k-means trained on a seeded sample of 64
        vectors per list; nprobe is raised until recall@k on sampled queries reaches the target (0.99).
- hnsw: `IndexHNSWFlat` (M = 32), efSearch tuned the same way.
A GPU copy of the index is used when faiss sees a GPU.
"""

from __future__ import annotations

import math
import time
from collections import Counter

import numpy as np
import pandas as pd

from scanner.neighbours.dedup import copy_units, group_table, keep_rank, leader_groups, link_names, member_links

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
    """nprobe (IVF) or efSearch (HNSW). faiss.ParameterSpace only knows CPU indexes: on an index moved to a GPU it
    raises, so a GPU IVF index gets its nprobe through GpuParameterSpace."""
    import faiss

    if kind != "ivf":
        index.hnsw.efSearch = value
        return
    gpu_ivf = getattr(faiss, "GpuIndexIVF", None)
    if gpu_ivf is not None and isinstance(index, gpu_ivf):
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", value)
    else:
        faiss.extract_index_ivf(index).nprobe = value


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


def find_duplicate_groups(keys: list[str], vectors: np.ndarray, raw_hashes: list[str] | None, threshold: float,
                          k: int = 20, index=None, phashes: np.ndarray | None = None, phash_max_dist: int = -1,
                          sizes: list[int] | None = None, thumbs: np.ndarray | None = None,
                          align: tuple[int, float, float, int] | None = None,
                          verify: tuple | None = None,
                          verify_cache: dict | None = None) -> pd.DataFrame:
    """Duplicate groups of a corpus held in memory (the corpus steps do the same out of core).

    keys: N unique sample keys; vectors: (N, d) float32 unit rows (row i embeds keys[i]);
    raw_hashes: N hashes of the raw bytes (None: no byte pass); threshold: cosine of the embedding
    links; k: neighbours each row of distinct bytes asks for; index: a faiss index over exactly these N vectors in this
    order (None: exact search); phashes: (N,) uint64 perceptual hashes with phash_max_dist >= 0 to
    enable the pHash pass; sizes: N pixel counts for the keep rule; thumbs: (N, S*S*C) uint8 rows
    (scanner.neighbours.align.thumbnails) with align = (S, min_cosine, max_rmse, max_shift): neighbours at cosine
    in [min_cosine, threshold) are linked when their thumbnails agree (the corpus steps' 'aligned' links);
    verify = (S, min_cosine, min_score[, min_detail]) instead: they are linked when scanner.neighbours.verify scores them
    >= min_score and both thumbnails' detail is >= min_detail (the 'verified' links of neighbours.verifier: affine);
    verify_cache: a dict (i, j) -> score kept between calls
    (the verifier runs once per pair over several thresholds).

    Returns one row per member of a group of >= 2: key, group_id (int, groups numbered by their
    kept key), similarity (float, cosine to the kept member), keep (bool), link (what first linked
    the member: 'bytes', 'phash', 'embedding', 'aligned' or 'verified'), score (dedup.member_links: the cosine or the
    verifier's score of the edge that joined the member to its group; 1 for bytes; phash: NaN here) and precision
    (NaN: the scan's calibration table is not applied here).
    """
    n = len(keys)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape[0] != n:
        raise ValueError(f"{n} keys but {vectors.shape[0]} vectors")
    if len(set(keys)) != n:
        dup = next(key for key, c in Counter(keys).items() if c > 1)
        raise ValueError(f"keys must be unique across the corpus; {dup!r} appears more than once")
    rank = keep_rank(keys, sizes)
    none = np.zeros((0, 2), np.int64)

    # copies: byte hashes, then pHash among one row per byte hash
    bytes_edges, rep = none, np.arange(n)
    if raw_hashes is not None:
        _, first, inverse = np.unique(np.asarray(raw_hashes, dtype=object).astype(str), return_index=True,
                                      return_inverse=True)
        rep = first[inverse]
        copies = np.flatnonzero(rep != np.arange(n))
        bytes_edges = np.stack([copies, rep[copies]], axis=1)
    phash_edges = none
    if phashes is not None and phash_max_dist >= 0:
        from scanner.neighbours.phash import hamming_pairs

        reps = np.flatnonzero(rep == np.arange(n))
        phash_edges = reps[hamming_pairs(np.asarray(phashes, dtype=np.uint64)[reps], phash_max_dist)]
    unit, kept = copy_units(n, np.concatenate([bytes_edges, phash_edges]), rank)

    # embedding links: every row of distinct bytes asks for its neighbours among the units' kept members (a pHash
    # copy has its own embedding and neighbours)
    emb_edges, emb_sims = none, np.zeros(0, np.float32)
    align_edges = none
    askers = np.flatnonzero(rep == np.arange(n))
    if len(kept) > 1:
        kk = min(k + 1, len(kept))
        if index is None:
            sims, ids = exact_knn(vectors[kept], vectors[askers], kk)
            ids = np.where(ids >= 0, kept[np.maximum(ids, 0)], -1)
        else:
            sims, ids = knn(index, vectors[askers], kk)
        q = np.repeat(askers, kk).reshape(len(askers), kk)
        is_kept = np.zeros(n, bool)
        is_kept[kept] = True
        real = (ids >= 0) & (ids != q) & is_kept[np.maximum(ids, 0)]
        ok = (sims >= threshold) & real
        emb_edges, emb_sims = np.stack([q[ok], ids[ok]], axis=1), sims[ok]
        if thumbs is not None and align is not None:
            from scanner.neighbours.align import aligned_match

            size, min_cos, max_rmse, max_shift = align
            near = (sims >= min_cos) & ~ok & real
            cand = np.stack([q[near], ids[near]], axis=1)
            hit = aligned_match(thumbs[cand[:, 0]], thumbs[cand[:, 1]], size, max_shift, max_rmse)
            align_edges = cand[hit]
            emb_edges, emb_sims = np.concatenate([emb_edges, align_edges]), np.r_[emb_sims, sims[near][hit]]
        edge_score = emb_sims
        if thumbs is not None and verify is not None:
            from scanner.neighbours.verify import detail, verify_pairs

            size, min_cos, min_score, min_detail = (*verify, 0.0)[:4]
            near = (sims >= min_cos) & ~ok & real
            cand = np.sort(np.stack([q[near], ids[near]], axis=1), axis=1)
            cache = verify_cache if verify_cache is not None else {}
            todo = np.array([p for p in dict.fromkeys(map(tuple, cand.tolist())) if p not in cache], np.int64)
            if len(todo):
                v = verify_pairs(thumbs[todo[:, 0]], thumbs[todo[:, 1]], size)[0]
                cache.update(zip(map(tuple, todo.tolist()), v.tolist()))
            v = np.array([cache[p] for p in map(tuple, cand.tolist())], np.float32)
            if "detail" not in cache:
                cache["detail"] = detail(thumbs, size)
            hit = (v >= min_score) & (np.minimum(cache["detail"][cand[:, 0]], cache["detail"][cand[:, 1]]) >= min_detail)
            align_edges = cand[hit]
            emb_edges = np.concatenate([emb_edges, align_edges])
            emb_sims, edge_score = np.r_[emb_sims, sims[near][hit]], np.r_[emb_sims, v[hit]]
    else:
        edge_score = emb_sims
    group = leader_groups(unit, kept, rank, emb_edges, emb_sims, sizes)
    sim = np.ones(n, np.float32)
    members = np.flatnonzero(group >= 0)
    if len(members):
        sim[members] = np.einsum("ij,ij->i", vectors[members], vectors[kept[group[members]]])
    n_emb = len(emb_edges) - len(align_edges)
    rest = "verified" if verify is not None else "aligned"
    link = link_names(n, bytes_edges, phash_edges, emb_edges[:n_emb], rest=rest)
    cross = unit[emb_edges[:, 0]] != unit[emb_edges[:, 1]]
    kinds = np.array(["embedding"] * n_emb + [rest] * (len(emb_edges) - n_emb), dtype=object)
    _, score = member_links(unit, group, emb_edges[cross], np.asarray(edge_score)[cross], kinds[cross])
    copy = (group >= 0) & (unit == group)
    score[copy & (link == "bytes")] = 1.0
    df = group_table(keys, group, kept, sim, link, score=score)
    return df.astype({"key": object, "link": object})


def score_heldout_locally(cfg, out):
    """The scan's read -> score -> sink stages on cfg.classify.calibration_shards, in this process (no Ray): the
    heldout/ part files a scan writes, in `out` (scanner.corpus.calibrate.heldout_scores reads them). Returns `out`."""
    from scanner.data.shards import expand_shards
    from scanner.stages.base import run_local
    from scanner.stages.read import ReadSpec, read_shard
    from scanner.stages.score import ScoreSpec, ScoreStage
    from scanner.stages.sink import SinkSpec, SinkStage

    shards = expand_shards(cfg.classify.calibration_shards)
    stage, sink = ScoreStage(ScoreSpec.of(cfg)), SinkStage(SinkSpec(str(out)))
    spec = ReadSpec(model_side=cfg.data.resolution, model_channels=cfg.data.channels,
                    max_pixels=cfg.data.max_image_pixels, rows_per_batch=cfg.data.batch_size)
    for path in shards:
        for batch in read_shard(path, spec, "heldout"):
            sink.add(run_local(stage, batch))
    if sink.failed or len(sink.done) != len(shards):
        raise RuntimeError(f"held-out shards not all written: {sink.failed}")
    from scanner.data.shards import shard_name
    from scanner.storage import HELDOUT_LIST, Out

    Out(out).write_json(HELDOUT_LIST, [shard_name(p) for p in shards])  # what the scan writes beside them
    return out
