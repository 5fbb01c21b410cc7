"""k nearest neighbours of every selected row of a PartStore, in a fixed memory budget.

Two plans, chosen by size (`plan`):
- exact: blocked brute force. Query blocks as large as the budget allows; every block streams the
  array shard by shard through `faiss.knn` and keeps a running top-k. O(N^2 d) work, O(block) memory:
  what an exact flat index costs, without holding the corpus.
- ivf: an inverted file on disk. Spherical (IP) or Euclidean (L2) k-means on a seeded sample gives
  `nlist` lists; every row is written to the lists of its `spill` nearest centroids (soft assignment),
  and queries only its nearest list. One list at a time is read back and searched exactly, so memory is
  one list, work is O(N * list size * d), and each list is an independent task. A neighbour is missed
  only when the query's nearest centroid is not among the neighbour's `spill` nearest.
Recall@k of the ivf plan is measured against exact search on held-out queries (drawn with another seed
than the k-means sample; nothing is tuned on them) and reported.

faiss.knn does the search (faiss.knn_gpu where faiss sees a GPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scanner.corpus.groups import buffer_bytes
from scanner.corpus.spill import Spill
from scanner.corpus.store import PartStore
from scanner.procfs import memory_mb

BLOCK_BYTES = 16 << 20  # largest query block (float32)
DB_BLOCK = 8192  # rows of the searched array streamed at once against a query block
TRAIN_PER_LIST = 40  # k-means training vectors per list (faiss warns below 39)
TRAIN_MAX = 131072  # and at most this many (64 MiB at d = 128), but never under 8 per list: the lists only
# partition the space
KMEANS_ITER = 10

Select = Callable[[int], np.ndarray]  # shard index -> bool mask over its rows: the rows taking part
# consumer(query gids (Q,), neighbour gids (Q, kk) with -1 padding, similarities (Q, kk), list rows or None):
# list rows = (gids, vectors) of the ivf list searched, for neighbour payloads without another read.
Consumer = Callable[[np.ndarray, np.ndarray, np.ndarray, tuple | None], None]


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
        res = _gpu_resources()
        return faiss.knn_gpu(res, q, x, k, metric=m)
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
    """Selected rows with an aligned array, per shard."""
    return np.array([int(np.asarray(select(i), bool).sum()) if store.has_array(folder, i) else 0
                     for i in range(len(store))], np.int64)


def _sample(store, folder, select, counts, size, seed) -> tuple[np.ndarray, np.ndarray]:
    """A seeded uniform sample of `size` selected rows: (gids, float32 vectors)."""
    n = int(counts.sum())
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.choice(n, min(size, n), replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    gs, xs = [], []
    for i in range(len(store)):
        lo, hi = np.searchsorted(pos, [starts[i], starts[i + 1]])
        if hi > lo:
            g, x = shard_rows(store, folder, select, i)
            take = pos[lo:hi] - starts[i]
            gs.append(g[take])
            xs.append(x[take])
    return np.concatenate(gs), np.concatenate(xs)


def search_list(recs: np.ndarray, kk: int, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One inverted list: its queries (the rows whose nearest list it is) against all its indexed rows, exactly
    (a query-only row, `indexed` False, is never a neighbour). Returns (query gids, neighbour gids (Q, kk),
    similarities (Q, kk))."""
    q = recs["primary"]
    x = np.ascontiguousarray(recs["x"], dtype=np.float32)
    idx = recs["indexed"] if "indexed" in recs.dtype.names else np.ones(len(recs), bool)
    s, i = _knn(x[q], x[idx], kk, metric)
    g = recs["gid"][idx]
    s, i = _pad(s.astype(np.float32), np.where(i >= 0, g[np.maximum(i, 0)], -1), kk, metric)
    return recs["gid"][q], i, s


def _ray_tasks(plan: Plan):
    """search_list as a Ray task when a Ray with more than one CPU is up (a scan's, or a cluster's), else None."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized() or ray.cluster_resources().get("CPU", 0) < 2 or plan.nlist < 2:
        return None
    return ray.remote(num_cpus=1, max_retries=3)(search_list)


def _list_results(spill: Spill, kk: int, metric: str, task=None):
    """(list records, search_list result) for every list with a query: here, or as Ray tasks (the list's
    records travel through the object store, so any node can take one; a few lists in flight per CPU)."""
    lists = [b for b in range(spill.n_parts) if spill.counts[b]]
    if task is None:
        for b in lists:
            recs = spill.read(b)
            if recs["primary"].any():
                yield recs, search_list(recs, kk, metric)
        return
    import ray

    inflight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict = {}
    for b in lists + [None]:
        if b is not None:
            recs = spill.read(b)
            if recs["primary"].any():
                pending[task.remote(recs, kk, metric)] = recs
        while pending and (len(pending) >= inflight or b is None):
            done, _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(done[0]), ray.get(done[0])


def search(store: PartStore, folder: str, select: Select, plan: Plan, consumer: Consumer, work: Path,
           seed: int = 0, recall_sample: int = 1000, log=None, budget_bytes: int = 4 << 30,
           parallel: bool = True, queries: Select | None = None) -> dict:
    """Runs `plan` over the selected rows of `folder`, feeding every query's kk = plan.k neighbours to
    `consumer` (each query row is a query exactly once). Returns the plan's info with timings and,
    for ivf, recall@k measured on held-out queries. parallel: the ivf lists go out as Ray tasks when Ray is up.
    queries: the rows that ask (None: the selected rows; else it must hold them, as the held-out recall asks
    through them); neighbours are always selected rows, so a query row outside `select` finds them without being
    found. The rows consumer gets with an ivf list are its indexed rows.
    """
    t0 = time.time()
    kk = plan.k
    info = plan.info()
    counts = count_rows(store, folder, select)
    if plan.kind == "exact":
        for g, x in _iter_blocks(store, folder, queries or select, plan.block):
            s, i = exact_neighbours(store, folder, select, (g, x), kk, plan.metric, plan.block)
            consumer(g, i, s, None)
        info.update(recall_at_k=1.0, seconds=round(time.time() - t0, 2))
        return info

    import faiss

    d = plan.dim
    n_train = min(TRAIN_PER_LIST * plan.nlist, max(TRAIN_MAX, 8 * plan.nlist))
    train_g, train_x = _sample(store, folder, select, counts, n_train, seed)
    km = faiss.Kmeans(d, plan.nlist, niter=KMEANS_ITER, seed=seed, spherical=plan.metric == "ip",
                      gpu=faiss.get_num_gpus() > 0, min_points_per_centroid=1)
    km.train(train_x)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    del train_g, train_x
    t_train = time.time() - t0
    mem = {"train": memory_mb()}

    # held-out recall queries: another seed than the k-means sample
    held_g, held_x = _sample(store, folder, select, counts, recall_sample, seed + 1)
    held_pos = {int(g): j for j, g in enumerate(held_g)}
    held_res = [None] * len(held_g)

    src_dtype = None
    spill = None
    for i in range(len(store)):
        indexed = np.asarray(select(i), dtype=bool)
        asks = indexed if queries is None else np.asarray(queries(i), dtype=bool)
        mask = indexed | asks
        if not mask.any() or not store.has_array(folder, i):
            continue
        raw = store.array(folder, i)[mask]
        indexed, asks = indexed[mask], asks[mask]
        if spill is None:
            src_dtype = raw.dtype
            rec = np.dtype([("gid", "<i8"), ("primary", "?"), ("indexed", "?"), ("x", src_dtype, (d,))])
            spill = Spill(work / f"ivf-{folder}", plan.nlist, rec, buffer_bytes=buffer_bytes(budget_bytes))
        gids = store.offsets[i] + np.flatnonzero(mask)
        _, lists = _knn(np.ascontiguousarray(raw, dtype=np.float32), centroids, plan.spill, plan.metric)
        for j in range(lists.shape[1]):
            primary = asks & (j == 0)  # a row asks in its nearest list only
            keep = indexed | primary  # so a query-only row goes there alone
            recs = np.empty(int(keep.sum()), dtype=spill.dtype)
            recs["gid"], recs["primary"], recs["indexed"], recs["x"] = gids[keep], primary[keep], indexed[keep], \
                raw[keep]
            spill.add(lists[keep, j], recs)
    spill.flush()
    t_assign = time.time() - t0 - t_train
    mem["assign"] = memory_mb()
    sizes = spill.counts
    tasks = _ray_tasks(plan) if parallel else None
    for recs, (qg, i, s) in _list_results(spill, kk, plan.metric, tasks):
        ix = recs["indexed"]
        consumer(qg, i, s, (recs["gid"][ix], np.ascontiguousarray(recs["x"][ix], dtype=np.float32)))
        for r in np.flatnonzero(np.isin(qg, held_g)):
            held_res[held_pos[int(qg[r])]] = s[r].copy()  # a copy: a view would keep the list's whole result alive
    spill.close()
    t_lists = time.time() - t0 - t_train - t_assign
    mem["lists"] = memory_mb()

    exact_s, _ = exact_neighbours(store, folder, select, (held_g, held_x), kk, plan.metric, plan.block)
    got = np.stack([r if r is not None else np.full(kk, _worst(plan.metric), np.float32) for r in held_res])
    tol = 1e-4 * np.maximum(1.0, np.abs(exact_s[:, -1:]))
    hits = (got >= exact_s[:, -1:] - tol) if plan.metric == "ip" else (got <= exact_s[:, -1:] + tol)
    info.update(recall_at_k=round(float(hits.mean()), 5), recall_k=kk, recall_sample=len(held_g),
                recall_queries="held out (not the k-means sample)",
                largest_list=int(sizes.max()), mean_list=round(float(sizes.mean()), 1),
                lists_as_ray_tasks=tasks is not None, memory_mb=mem,
                seconds={"train": round(t_train, 2), "assign": round(t_assign, 2), "lists": round(t_lists, 2),
                         "recall": round(time.time() - t0 - t_train - t_assign - t_lists, 2)})
    if log:
        log(f"neighbours: ivf over {plan.n} vectors, {plan.nlist} lists (spill {plan.spill}), recall@{kk} "
            f"{info['recall_at_k']:.4f} on {len(held_g)} held-out queries")
    return info
