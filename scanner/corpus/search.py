"""k nearest neighbours of every selected row of a PartStore, in a fixed memory budget, as corpus tasks.

Two plans, chosen by size (`make_plan`):
- exact: blocked brute force in this process, for a corpus of at most neighbours.flat_max rows. Query blocks as
  large as the budget allows; every block streams the array shard by shard through `faiss.knn` and keeps a
  running top-k. O(N^2 d) work, O(block) memory.
- ivf: an inverted file built as tasks. k-means (faiss, on a GPU where this node has one) on a seeded sample gives
  `nlist` lists; a coarse quantizer over the centroids (exact up to EXACT_MAX_LISTS centroids, where one BLAS
  product per batch of rows is the cheapest, then an HNSW graph, whose cost per row stops growing with nlist)
  puts every row in the lists of its `spill` nearest centroids (a task per
  shard); the records are shuffled by list (scanner.corpus.executor), and each partition's lists are searched
  exactly, a query in its nearest list only. A neighbour is missed only when the query's nearest centroid is not
  among the neighbour's `spill` nearest (or the quantizer missed it).
Recall@k of the ivf plan is measured against exact search on held-out queries (drawn with another seed than the
k-means sample; nothing is tuned on them), the exact side as a task per shard, and reported.

A search hands each answered query to a consumer (a picklable function run where the answer is: in the list
task), which turns (query gids, neighbour gids, similarities, list rows) into the step's records.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from scanner.corpus.store import PartStore

BLOCK_BYTES = 16 << 20  # largest query block (float32)
DB_BLOCK = 8192  # rows of the searched array streamed at once against a query block
TRAIN_PER_LIST = 40  # k-means training vectors per list (faiss warns below 39)
TRAIN_MAX = 131072  # and at most this many (64 MiB at d = 128), but never under 8 per list: the lists only
# partition the space
KMEANS_ITER = 10
# The coarse quantizer: exact (a flat index, one BLAS product per batch of rows) up to this many lists, an HNSW graph
# above. The crossover where the graph walk gets cheaper than the product: `bench_corpus.py --assignment`
# (benchmarks/results/corpus_ray.md).
EXACT_MAX_LISTS = 50_000  # 128-d, one core: exact 143 µs a row, HNSW 139 µs at 50,000 lists; 498 vs 126 µs at 200,000
HNSW_M = 32  # the graph's degree
HNSW_EF = 64  # its search breadth (raised to 4 x spill when that is larger)

Select = Callable[[int], np.ndarray]  # shard index -> bool mask over its rows: the rows taking part
# consumer(query gids (Q,), neighbour gids (Q, kk) with -1 padding, similarities (Q, kk), list rows or None) -> batch
# (or None); list rows = (gids, vectors) of the ivf list searched, for neighbour payloads without another read.
Consumer = Callable


@dataclass
class Plan:
    kind: str  # exact | ivf
    n: int
    dim: int
    k: int  # neighbours returned per query, itself included (kk = k + 1 of the caller's k)
    metric: str  # ip | l2
    nlist: int = 1
    spill: int = 1
    block: int = 0  # exact: query rows per block

    def info(self) -> dict:
        out = {"kind": self.kind, "n": self.n, "dim": self.dim, "metric": self.metric}
        if self.kind == "ivf":
            out.update(nlist=self.nlist, spill=self.spill)
        else:
            out.update(block=self.block)
        return out


def search_knobs(cfg):
    """What make_plan reads of a ScanConfig: neighbours.index / flat_max and corpus.list_size / spill."""
    from types import SimpleNamespace

    n, c = cfg.neighbours, cfg.corpus
    return SimpleNamespace(index=n.index, flat_max=n.flat_max, list_size=c.list_size, spill=c.spill)


def make_plan(n: int, dim: int, k: int, metric: str, cfg, budget_bytes: int, itemsize: int = 4) -> Plan:
    """cfg: search_knobs(scan config): index, flat_max, list_size, spill.

    A query block (float32 in memory, whatever the disk dtype) takes at most an eighth of the budget and
    16 MiB, so memory stops growing with the corpus once a block is full.
    """
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    work = max(min(budget_bytes // 8, BLOCK_BYTES), 1 << 20)
    row = 4 * max(dim, 1) + 8 * (k + 1) * 2
    block = max(256, work // row)
    kind = cfg.index
    if kind == "auto":
        kind = "exact" if n <= cfg.flat_max else "ivf"
    if kind == "flat":
        kind = "exact"
    if kind == "exact" or n < 2:
        return Plan("exact", n, dim, k, metric, block=int(min(block, max(n, 1))))
    spill = int(cfg.spill)
    list_rows = max(k + 1, min(int(cfg.list_size), block // (spill + 1)))
    nlist = max(1, math.ceil(n / list_rows))
    return Plan("ivf", n, dim, k, metric, nlist=int(nlist), spill=min(spill, nlist), block=int(block))


def _knn(q: np.ndarray, x: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    m = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    k = min(k, len(x))
    if faiss.get_num_gpus() > 0 and hasattr(faiss, "knn_gpu"):
        return faiss.knn_gpu(_gpu_resources(), q, x, k, metric=m)
    return faiss.knn(q, x, k, metric=m)


_RES = None


def _gpu_resources():
    global _RES
    if _RES is None:
        import faiss

        _RES = faiss.StandardGpuResources()
    return _RES


def _worst(metric: str) -> float:
    return -np.inf if metric == "ip" else np.inf


def _pad(sims: np.ndarray, ids: np.ndarray, kk: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    if sims.shape[1] >= kk:
        return sims, ids
    q = len(sims)
    s = np.full((q, kk), _worst(metric), np.float32)
    i = np.full((q, kk), -1, np.int64)
    s[:, :sims.shape[1]], i[:, :ids.shape[1]] = sims, ids
    return s, i


def _merge(a: tuple, b: tuple, kk: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Two (sims, ids) top lists of the same queries -> the best kk of both."""
    s = np.concatenate([a[0], b[0]], axis=1)
    i = np.concatenate([a[1], b[1]], axis=1)
    key = -s if metric == "ip" else s
    order = np.argsort(key, axis=1, kind="stable")[:, :kk]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def shard_rows(store: PartStore, folder: str, select: Select, i: int, dtype=np.float32):
    """(gids, vectors) of shard i's selected rows; empty when the shard has no aligned array."""
    mask = np.asarray(select(i), dtype=bool)
    if not mask.any() or not store.has_array(folder, i):
        return np.zeros(0, np.int64), None
    x = store.array(folder, i)[mask]
    return store.offsets[i] + np.flatnonzero(mask), np.ascontiguousarray(x, dtype=dtype)


def _iter_blocks(store: PartStore, folder: str, select: Select, block: int):
    """(gids, float32 vectors) blocks of about `block` selected rows, shard by shard."""
    gs, xs, size = [], [], 0
    for i in range(len(store)):
        g, x = shard_rows(store, folder, select, i)
        if not len(g):
            continue
        gs.append(g)
        xs.append(x)
        size += len(g)
        if size >= block:
            yield np.concatenate(gs), np.concatenate(xs)
            gs, xs, size = [], [], 0
    if gs:
        yield np.concatenate(gs), np.concatenate(xs)


def exact_neighbours(store: PartStore, folder: str, select: Select, queries: tuple[np.ndarray, np.ndarray],
                     kk: int, metric: str, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-kk (sims, gids) of the given (gids, vectors) queries among every selected row, streamed."""
    qx = np.ascontiguousarray(queries[1], dtype=np.float32)
    best = (np.full((len(qx), 0), _worst(metric), np.float32), np.zeros((len(qx), 0), np.int64))
    for g, x in _iter_blocks(store, folder, select, min(block, DB_BLOCK)):
        s, i = _knn(qx, x, kk, metric)
        best = _merge(best, (s.astype(np.float32), np.where(i >= 0, g[np.maximum(i, 0)], -1)), kk, metric)
    return _pad(*best, kk, metric)


def count_rows(store: PartStore, folder: str, select: Select) -> np.ndarray:
    """Selected rows with an aligned array, per shard (in this process: exact plans and tests)."""
    return np.array([int(np.asarray(select(i), bool).sum()) if store.has_array(folder, i) else 0
                     for i in range(len(store))], np.int64)


def search_list(recs: dict, kk: int, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One inverted list: its queries (the rows whose nearest list it is) against all its indexed rows, exactly
    (a query-only row, `indexed` False, is never a neighbour). recs: columns gid, primary, indexed, x. Returns
    (query gids, neighbour gids (Q, kk), similarities (Q, kk))."""
    q = np.asarray(recs["primary"], bool)
    idx = np.asarray(recs["indexed"], bool)
    x = np.ascontiguousarray(recs["x"], dtype=np.float32)
    s, i = _knn(x[q], x[idx], kk, metric)
    g = np.asarray(recs["gid"])[idx]
    s, i = _pad(s.astype(np.float32), np.where(i >= 0, g[np.maximum(i, 0)], -1), kk, metric)
    return np.asarray(recs["gid"])[q], i, s


# ---- the inverted file as tasks

def _count_map(store, folder: str, select: Select, i: int) -> dict:
    n = int(np.asarray(select(i), bool).sum()) if store.has_array(folder, i) else 0
    return {"shard": np.array([i], np.int64), "n": np.array([n], np.int64)}


def _sample_map(store, folder: str, select: Select, want: dict, i: int) -> dict | None:
    """Shard i's rows at the sampled positions `want[i]` (positions among its selected rows)."""
    pos = want.get(i)
    if pos is None or not len(pos):
        return None
    g, x = shard_rows(store, folder, select, i)
    return {"gid": g[pos], "x": x[pos]}


def _sample_positions(counts: np.ndarray, size: int, seed: int) -> dict[int, np.ndarray]:
    """A seeded uniform sample of `size` selected rows, as positions per shard."""
    n = int(counts.sum())
    pos = np.sort(np.random.default_rng(seed).choice(n, min(size, n), replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    out = {}
    for i in np.flatnonzero(counts):
        lo, hi = np.searchsorted(pos, [starts[i], starts[i + 1]])
        if hi > lo:
            out[int(i)] = pos[lo:hi] - starts[i]
    return out


def train_kmeans(x: np.ndarray, nlist: int, metric: str, seed: int) -> np.ndarray:
    """faiss k-means (spherical for ip) of nlist centroids on the sample x, on a GPU where faiss sees one."""
    import faiss

    km = faiss.Kmeans(x.shape[1], nlist, niter=KMEANS_ITER, seed=seed, spherical=metric == "ip",
                      gpu=faiss.get_num_gpus() > 0, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def coarse_quantizer(centroids: np.ndarray, metric: str, spill: int, exact_max: int | None = None):
    """The index that finds a row's nearest lists: every centroid compared (exact) up to `exact_max` centroids
    (EXACT_MAX_LISTS), an HNSW graph over them above, whose walk costs about the same per row at any number of
    lists but may miss the nearest."""
    import faiss

    m = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    d = centroids.shape[1]
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if len(centroids) <= (EXACT_MAX_LISTS if exact_max is None else exact_max):
        q = faiss.IndexFlat(d, m)
        q.add(centroids)
        return q
    q = faiss.IndexHNSWFlat(d, HNSW_M, m)
    q.hnsw.efConstruction = 80
    q.add(centroids)
    q.hnsw.efSearch = max(HNSW_EF, 4 * spill)
    return q


def quantizer_name(q) -> str:
    """How coarse_quantizer's index finds the lists, for summary.json."""
    if hasattr(q, "hnsw"):
        return f"HNSW over the centroids (M={HNSW_M}, efSearch={q.hnsw.efSearch})"
    return "exact over the centroids"


def _assign_map(store, folder: str, select: Select, queries: Select | None, quantizer: np.ndarray, spill: int,
                held: np.ndarray, i: int) -> dict | None:
    """Shard i's rows in the lists of their `spill` nearest centroids: (list, gid, primary, indexed, held, x)."""
    import faiss

    indexed = np.asarray(select(i), dtype=bool)
    asks = indexed if queries is None else np.asarray(queries(i), dtype=bool)
    mask = indexed | asks
    if not mask.any() or not store.has_array(folder, i):
        return None
    raw = store.array(folder, i)[mask]
    indexed, asks = indexed[mask], asks[mask]
    gids = store.offsets[i] + np.flatnonzero(mask)
    q = _quantizer(quantizer.tobytes()) if isinstance(quantizer, np.ndarray) else quantizer
    x32 = np.ascontiguousarray(raw, dtype=np.float32)
    _, lists = q.search(x32, spill)
    out = {c: [] for c in ("list", "gid", "primary", "indexed", "x")}
    for j in range(lists.shape[1]):
        primary = asks & (j == 0)  # a row asks in its nearest list only
        keep = (indexed | primary) & (lists[:, j] >= 0)  # so a query-only row goes there alone
        out["list"].append(lists[keep, j].astype(np.int64))
        out["gid"].append(gids[keep])
        out["primary"].append(primary[keep])
        out["indexed"].append(indexed[keep])
        out["x"].append(raw[keep])
    res = {c: np.concatenate(v) for c, v in out.items()}
    res["held"] = np.isin(res["gid"], held) & res["primary"]
    del faiss
    return res


@functools.lru_cache(maxsize=2)
def _quantizer(blob: bytes):
    import faiss

    return faiss.deserialize_index(np.frombuffer(blob, np.uint8))


INDEX_BUCKET_BYTES = 128 << 20  # a kept index's bucket files: about this many bytes of records per bucket


def _search_lists(cols: dict, kk: int, metric: str, consumer: Consumer, held: tuple[list, list]):
    """Every list of these records (columns list, gid, primary, indexed, held, x) searched exactly: the consumer's
    records; the held-out queries' similarities appended to held = (gids, sims)."""
    lst = np.asarray(cols["list"])
    order = np.argsort(lst, kind="stable")
    cols = {c: np.asarray(cols[c])[order] for c in ("list", "gid", "primary", "indexed", "held", "x")}
    _, starts = np.unique(cols["list"], return_index=True)
    ends = np.r_[starts[1:], len(cols["list"])]
    for lo, hi in zip(starts, ends):
        recs = {c: v[lo:hi] for c, v in cols.items()}
        if not recs["primary"].any():
            continue
        qg, nbr, sims = search_list(recs, kk, metric)
        ix = recs["indexed"]
        res = consumer(qg, nbr, sims, (recs["gid"][ix], np.ascontiguousarray(recs["x"][ix], dtype=np.float32)))
        if res is not None:
            yield res
        h = recs["held"][recs["primary"]]
        if h.any():
            held[0].append(qg[h])
            held[1].append(sims[h])


def _write_held(side, held: tuple[list, list]) -> None:
    if held[0]:
        import uuid

        import pyarrow as pa

        out, folder = side
        out.write_parquet(f"{folder}/{uuid.uuid4().hex}.parquet", pa.table(
            {"gid": np.concatenate(held[0]), "sims": list(np.concatenate(held[1]).astype(np.float32))}))


def _keep_index(keep, b: dict) -> None:
    """The indexed records of this partition into the kept index (keep = (Out, folder, n_buckets)): one file per
    bucket (list % n_buckets) it holds, OUT/folder/bNNNNNN/UUID.parquet: list, gid, x."""
    if keep is None:
        return
    import uuid

    import pyarrow as pa

    out, folder, n_buckets = keep
    ix = np.asarray(b["indexed"], bool)
    lst, gid, x = np.asarray(b["list"])[ix], np.asarray(b["gid"])[ix], np.asarray(b["x"])[ix]
    bucket = lst % n_buckets
    for bk in np.unique(bucket):
        m = bucket == bk
        xs = np.ascontiguousarray(x[m])
        arr = pa.FixedSizeListArray.from_arrays(pa.array(xs.reshape(-1)), xs.shape[1])
        out.write_parquet(f"{folder}/b{int(bk):06d}/{uuid.uuid4().hex}.parquet",
                          pa.table({"list": lst[m].astype(np.int64), "gid": gid[m].astype(np.int64), "x": arr}))


def _lists_reduce(kk: int, metric: str, consumer: Consumer, side, keep, b: dict):
    """Every list of this partition searched exactly: the consumer's records. The held-out queries' similarities
    (for recall@k) go to a side file, side = (Out, folder); keep: see _keep_index (None: the lists are not kept)."""
    held: tuple[list, list] = ([], [])
    yield from _search_lists(b, kk, metric, consumer, held)
    _write_held(side, held)
    _keep_index(keep, b)


def _read_bucket(sources: list[dict], bucket: int, dtype) -> dict | None:
    """A kept index's records of one bucket, from every scan of the chain (each below its `rows`: not a reference
    set's rows)."""
    import pyarrow as pa

    from scanner.storage import Out

    parts = []
    for src in sources:
        o = Out(src["out"])
        rel = f"{src['folder']}/b{bucket:06d}"
        for f in o.names(rel, ".parquet"):
            t = o.parquet_file(f"{rel}/{f}").read()
            g = t.column("gid").to_numpy()
            m = g < int(src["rows"])
            x = t.column("x").combine_chunks()
            xs = np.asarray(x.values.to_numpy(zero_copy_only=False)).reshape(len(x), -1)
            parts.append((t.column("list").to_numpy()[m], g[m], xs[m].astype(dtype, copy=False)))
    if not parts:
        return None
    del pa
    return {"list": np.concatenate([p[0] for p in parts]), "gid": np.concatenate([p[1] for p in parts]),
            "x": np.concatenate([p[2] for p in parts])}


def _reuse_reduce(kk: int, metric: str, consumer: Consumer, side, sources: list[dict], n_buckets: int, keep,
                  b: dict):
    """An --against scan's partition: its new records with the kept index's old records of the same buckets, every
    list searched for the new queries; the new indexed records kept in this scan's index."""
    bucket = np.asarray(b["list"]) % n_buckets
    held: tuple[list, list] = ([], [])
    for bk in np.unique(bucket):
        m = bucket == bk
        new = {c: np.asarray(b[c])[m] for c in ("list", "gid", "primary", "indexed", "held", "x")}
        old = _read_bucket(sources, int(bk), new["x"].dtype)
        if old is not None:
            n = len(old["gid"])
            new = {"list": np.r_[old["list"], new["list"]], "gid": np.r_[old["gid"], new["gid"]],
                   "primary": np.r_[np.zeros(n, bool), new["primary"]],
                   "indexed": np.r_[np.ones(n, bool), new["indexed"]],
                   "held": np.r_[np.zeros(n, bool), new["held"]], "x": np.concatenate([old["x"], new["x"]])}
        yield from _search_lists(new, kk, metric, consumer, held)
    _write_held(side, held)
    _keep_index(keep, {c: np.asarray(b[c]) for c in ("list", "gid", "indexed", "x")})


def _exact_held_map(store, folder: str, select: Select, qx: np.ndarray, kk: int, metric: str, i: int) -> dict | None:
    """Top-kk similarities of the held-out queries qx among shard i's selected rows."""
    g, x = shard_rows(store, folder, select, i)
    if not len(g):
        return None
    s, _ = _knn(np.ascontiguousarray(qx, dtype=np.float32), x, kk, metric)
    s, _ = _pad(s.astype(np.float32), np.zeros_like(s, dtype=np.int64), kk, metric)
    return {"shard": np.full(len(qx), i, np.int64), "q": np.arange(len(qx)), "s": s}


def search(store: PartStore, folder: str, select: Select, plan: Plan, consumer: Consumer, ex, seed: int = 0,
           recall_sample: int = 1000, log=None, budget_bytes: int = 4 << 30, queries: Select | None = None,
           side=None, keep=None, reuse: dict | None = None):
    """Runs `plan` over the selected rows of `folder`: every query row's kk = plan.k neighbours go to `consumer`
    (each query row is answered exactly once), whose records make the returned table (the executor's: a batch, or
    a Ray Dataset). Returns (table, info: the plan, timings and, for ivf, recall@k on held-out queries).
    side: (Out, folder) where the list tasks leave the held-out queries' answers (ivf; the folder is removed after).
    select / queries / consumer must be picklable (module-level functions, functools.partial) for a Ray executor.
    queries: the rows that ask (None: the selected rows); neighbours are always selected rows, so a query row
    outside `select` finds them without being found.
    keep: (Out, folder): an ivf search keeps its lists there (folder/meta.json, centroids.npy, bucket files), so
    that a later scan --against this one searches its new rows without building them again. reuse: such a kept
    index's meta.json (its "sources": every scan of a chain): the old rows are not assigned, shuffled nor asked;
    only the rows of shards that ask (store.asks) are assigned to the kept centroids and searched against the kept
    lists of the buckets they fall in."""
    from scanner.corpus.executor import concat

    t0 = time.time()
    kk = plan.k
    info = plan.info()
    if plan.kind == "exact":
        out = []
        for g, x in _iter_blocks(store, folder, queries or select, plan.block):
            s, i = exact_neighbours(store, folder, select, (g, x), kk, plan.metric, plan.block)
            r = consumer(g, i, s, None)
            if r is not None:
                out.append(r)
        info.update(recall_at_k=1.0, seconds=round(time.time() - t0, 2))
        return ex.from_batch(concat(out)), info

    if reuse is not None:
        return _search_reuse(store, folder, select, plan, consumer, ex, seed, recall_sample, log, budget_bytes,
                             queries, side, keep, reuse, t0)
    counts_t = concat(ex.batches(ex.from_items(functools.partial(_count_map, store, folder, select), range(len(store)))))
    counts = np.zeros(len(store), np.int64)
    counts[counts_t["shard"]] = counts_t["n"]
    n_train = min(TRAIN_PER_LIST * plan.nlist, max(TRAIN_MAX, 8 * plan.nlist))
    train = concat(ex.batches(ex.from_items(functools.partial(
        _sample_map, store, folder, select, _sample_positions(counts, n_train, seed)), range(len(store)))))
    centroids = train_kmeans(np.asarray(train["x"], np.float32), plan.nlist, plan.metric, seed)
    del train
    import faiss

    coarse = coarse_quantizer(centroids, plan.metric, plan.spill)
    quantizer_kind = quantizer_name(coarse)
    quantizer = faiss.serialize_index(coarse)
    del coarse
    t_train = time.time() - t0

    held_pos = _sample_positions(counts, recall_sample, seed + 1)  # another seed than the k-means sample
    held = concat(ex.batches(ex.from_items(functools.partial(_sample_map, store, folder, select, held_pos),
                                           range(len(store)))))
    held_g = np.sort(held["gid"]) if held else np.zeros(0, np.int64)
    rec_bytes = int(counts.sum()) * (plan.spill + 1) * (plan.dim * 4 + 24)
    from scanner.corpus.executor import parts_for

    t = ex.from_items(functools.partial(_assign_map, store, folder, select, queries, quantizer, plan.spill, held_g),
                      range(len(store)))
    if side is None:
        raise ValueError("an ivf search needs side=(Out, folder) for its held-out answers")
    side_out, side_dir = side
    side_out.remove(side_dir, recursive=True)
    kept = None
    if keep is not None:
        n_buckets = max(1, -(-rec_bytes // INDEX_BUCKET_BYTES))
        keep_out, keep_dir = keep
        keep_out.remove(keep_dir, recursive=True)
        kept = (keep_out, keep_dir, n_buckets)
    t = ex.shuffle(t, "list", parts_for(rec_bytes, budget_bytes, share=4),
                   functools.partial(_lists_reduce, kk, plan.metric, consumer, side, kept))
    t = ex.materialize(t)
    t_lists = time.time() - t0 - t_train
    if kept is not None:
        _write_meta(kept, centroids, plan, store, [])

    return t, _recall(store, folder, select, plan, ex, held, held_g, side, info, t0, t_train, t_lists,
                      quantizer_kind, log)


def _write_meta(kept, centroids: np.ndarray, plan: Plan, store, sources: list[dict], centroids_at: str | None = None):
    """A kept index's meta.json: what a later scan needs to add to it (its own centroids file, or the first scan's)."""
    import io

    out, folder, n_buckets = kept
    if centroids_at is None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(centroids, np.float32))
        out.write_bytes(f"{folder}/centroids.npy", buf.getvalue())
        centroids_at = out.uri(f"{folder}/centroids.npy")
    from scanner.corpus.store import REFERENCE

    rows = int(store.sizes[store.roles != REFERENCE].sum())
    out.write_json(f"{folder}/meta.json", {
        "nlist": plan.nlist, "spill": plan.spill, "metric": plan.metric, "dim": plan.dim, "n_buckets": n_buckets,
        "centroids": centroids_at, "sources": [*sources, {"out": out.uri(), "folder": folder, "rows": rows}]})


def _search_reuse(store, folder, select, plan, consumer, ex, seed, recall_sample, log, budget_bytes, queries, side,
                  keep, reuse: dict, t0: float):
    """search() against a kept index (see search's `reuse`)."""
    import io

    import faiss

    from scanner.corpus.executor import concat, parts_for
    from scanner.storage import Out

    kk = plan.k
    plan = Plan("ivf", plan.n, plan.dim, kk, plan.metric, nlist=int(reuse["nlist"]), spill=int(reuse["spill"]),
                block=plan.block)
    info = plan.info()
    cu = reuse["centroids"]
    src = Out(cu.rsplit("/", 1)[0])
    centroids = np.load(io.BytesIO(src.read_bytes(cu.rsplit("/", 1)[1])))
    coarse = coarse_quantizer(centroids, plan.metric, plan.spill)
    quantizer_kind = quantizer_name(coarse)
    quantizer = faiss.serialize_index(coarse)
    del coarse
    t_train = time.time() - t0
    asking = [i for i in range(len(store)) if store.asks[i]]
    sel_new = functools.partial(_asking_only, store, select)
    counts_t = concat(ex.batches(ex.from_items(functools.partial(_count_map, store, folder, sel_new), asking)))
    counts = np.zeros(len(store), np.int64)
    if counts_t:
        counts[counts_t["shard"]] = counts_t["n"]
    n_new = int(counts.sum())
    # recall@k on a sample of the new rows in proportion to them (at least 50): the exact side reads every row
    sample = min(recall_sample, max(50, int(recall_sample * n_new / max(plan.n, 1))))
    held_pos = _sample_positions(counts, sample, seed + 1)
    held = concat(ex.batches(ex.from_items(functools.partial(_sample_map, store, folder, sel_new, held_pos), asking)))
    held_g = np.sort(held["gid"]) if held else np.zeros(0, np.int64)
    n_buckets = int(reuse["n_buckets"])
    side_out, side_dir = side
    side_out.remove(side_dir, recursive=True)
    kept = None
    if keep is not None:
        keep_out, keep_dir = keep
        keep_out.remove(keep_dir, recursive=True)
        kept = (keep_out, keep_dir, n_buckets)
    t = ex.from_items(functools.partial(_assign_map, store, folder, sel_new, queries, quantizer, plan.spill, held_g),
                      asking)
    t = ex.map(t, functools.partial(_add_bucket, n_buckets))
    rec_bytes = n_new * (plan.spill + 1) * (plan.dim * 4 + 24)
    parts = max(1, min(n_buckets, parts_for(rec_bytes + n_buckets * INDEX_BUCKET_BYTES, budget_bytes, share=4)))
    t = ex.shuffle(t, "bucket", parts, functools.partial(_reuse_reduce, kk, plan.metric, consumer, side,
                                                        list(reuse["sources"]), n_buckets, kept))
    t = ex.materialize(t)
    t_lists = time.time() - t0 - t_train
    if kept is not None:
        _write_meta(kept, centroids, plan, store, list(reuse["sources"]), centroids_at=cu)
    info["reused_index"] = {"sources": len(reuse["sources"]), "new_rows": n_new}
    return t, _recall(store, folder, select, plan, ex, held, held_g, side, info, t0, t_train, t_lists,
                      quantizer_kind, log)


def _asking_only(store, select: Select, i: int) -> np.ndarray:
    if not store.asks[i]:
        return np.zeros(int(store.sizes[i]), bool)
    return np.asarray(select(i), bool)


def _add_bucket(n_buckets: int, b: dict) -> dict:
    return {**b, "bucket": np.asarray(b["list"], np.int64) % n_buckets}


def _recall(store, folder, select, plan, ex, held, held_g, side, info, t0, t_train, t_lists, quantizer_kind, log):
    """recall@k of the held-out queries' answers (the list tasks' side files) against exact search over every
    selected row (a task per shard); the search's info completed."""
    kk = plan.k
    side_out, side_dir = side
    got = {}
    for f in side_out.names(side_dir, ".parquet"):
        df = side_out.read_parquet(f"{side_dir}/{f}")
        got.update({int(g): np.asarray(s, np.float32) for g, s in zip(df["gid"], df["sims"])})
    side_out.remove(side_dir, recursive=True)
    recall = None
    if held is not None and len(held["gid"]):
        qx = np.asarray(held["x"], np.float32)
        best = np.full((len(qx), kk), _worst(plan.metric), np.float32)
        for b in ex.batches(ex.from_items(functools.partial(_exact_held_map, store, folder, select, qx, kk,
                                                            plan.metric), range(len(store)))):
            for sh in np.unique(b["shard"]):
                m = np.asarray(b["shard"]) == sh
                order = np.argsort(np.asarray(b["q"])[m])
                best = _top_rows(best, np.asarray(b["s"])[m][order], kk, plan.metric)
        exact_kth = best[:, -1:]
        res = np.stack([got.get(int(g), np.full(kk, _worst(plan.metric), np.float32)) for g in held["gid"]])
        tol = 1e-4 * np.maximum(1.0, np.abs(exact_kth))
        hits = (res >= exact_kth - tol) if plan.metric == "ip" else (res <= exact_kth + tol)
        recall = round(float(hits.mean()), 5)
    info.update(recall_at_k=recall, recall_k=kk, recall_sample=len(held_g),
                recall_queries="held out (not the k-means sample)", lists_as_tasks=ex.kind,
                quantizer=quantizer_kind,
                seconds={"train": round(t_train, 2), "lists": round(t_lists, 2),
                         "recall": round(time.time() - t0 - t_train - t_lists, 2)})
    if log:
        log(f"neighbours: ivf over {plan.n} vectors, {plan.nlist} lists (spill {plan.spill}), recall@{kk} "
            f"{recall} on {len(held_g)} held-out queries")
    return info


def _top_rows(a: np.ndarray, b: np.ndarray, kk: int, metric: str) -> np.ndarray:
    """Row-wise best kk similarities of two (Q, *) arrays."""
    s = np.concatenate([a, b], axis=1)
    s = -np.sort(-s, axis=1) if metric == "ip" else np.sort(s, axis=1)
    return s[:, :kk]
