"""Step `lid`: the local-PCA spectrum of every scored row's neighbourhood, for LID_* (docs/method.md §3).

The lpca_k nearest ok rows of every ok row (itself included) are searched in model space (the images as the model
sees them; the copy-detection embedding with geometry.lpca_space clip, and auto above LPCA_MODEL_MAX_DIM
dimensions: SD latents), and their covariance's eigenvalues kept, largest first
(scanner.geometry.local_pca.local_spectra). LID_* is counted from them once the corpus level is known (step
`cut`, classify.lpca_count). The spectra are computed where the neighbours are (in the inverted list's task, whose
rows carry the neighbours' vectors) and written per shard: corpus/lid/NAME.parquet (gid, spec).
"""

from __future__ import annotations

import functools
import logging

import numpy as np

log = logging.getLogger("memscan")
PCA_CHUNK = 512  # queries per batched local PCA


def select_ok(store, i: int) -> np.ndarray:
    from scanner.corpus.rows import masks

    return masks(store, i)["ok"]


def select_ok_searched(store, i: int) -> np.ndarray:
    from scanner.corpus.rows import masks

    m = masks(store, i)
    return m["ok"] & m["searched"]


def select_ok_asking(store, space: str, i: int) -> np.ndarray:
    """The rows whose LID_* is computed: ok rows of the shards that ask (--against: not the old scan's)."""
    if not store.asks[i]:
        return np.zeros(int(store.sizes[i]), bool)
    return select_ok(store, i) if space == "vectors" else select_ok_searched(store, i)


def _spectra_consumer(store, space: str, qg, nbr, _sims, rows):
    """(gid, spec) of the queries: local_spectra of their neighbours' model-space vectors (from the list's rows when
    the search ran in model space, else read by gid)."""
    import torch

    from scanner.geometry.local_pca import local_spectra

    gids, specs = [], []
    for s in range(0, len(qg), PCA_CHUNK):
        ids = nbr[s:s + PCA_CHUNK]
        if space == "vectors" and rows is not None:
            order = np.argsort(rows[0])
            pos = order[np.searchsorted(rows[0], ids, sorter=order)]
            x = rows[1][pos]
        else:
            x = store.gather("vectors", ids.ravel()).reshape(*ids.shape, -1)
        gids.append(qg[s:s + PCA_CHUNK])
        specs.append(local_spectra(torch.from_numpy(np.asarray(x, np.float32))).numpy().astype(np.float32))
    return {"gid": np.concatenate(gids).astype(np.int64), "spec": np.concatenate(specs)}


def run_lid(ctx) -> dict:
    from scanner.config import LPCA_MODEL_MAX_DIM
    from scanner.corpus.rows import write_by_shard
    from scanner.corpus.search import count_rows, make_plan, search, search_knobs

    store, ex, cfg = ctx.store, ctx.executor, ctx.cfg
    g = cfg.geometry
    want = g.lpca_space
    if want == "auto":
        want = "model" if (store.dim("vectors") or 0) <= LPCA_MODEL_MAX_DIM else "clip"
    space = "embeddings" if want == "clip" and store.dim("embeddings") else "vectors"
    select = functools.partial(select_ok if space == "vectors" else select_ok_searched, store)
    if ex.kind == "local":
        n = int(count_rows(store, space, select).sum())
    else:
        from scanner.corpus.executor import concat
        from scanner.corpus.search import _count_map

        c = concat(ex.batches(ex.from_items(functools.partial(_count_map, store, space, select), range(len(store)))))
        n = int(c["n"].sum()) if c else 0
    if n < 2:
        return {"n": n, "space": "clip" if space == "embeddings" else "model"}
    k = min(g.lpca_k + 1, n)
    plan = make_plan(n, store.dim(space), k, "l2", search_knobs(cfg), cfg.corpus.budget_bytes)
    queries = functools.partial(select_ok_asking, store, space) if not store.asks.all() else None
    t, info = search(store, space, select, plan, functools.partial(_spectra_consumer, store, space), ex,
                     seed=cfg.seed, recall_sample=cfg.neighbours.recall_sample, log=log.info,
                     budget_bytes=cfg.corpus.budget_bytes, side=(ctx.out, f"{ctx.step_dir('lid')}/_recall"),
                     queries=queries)
    info["rows"] = write_by_shard(ex, t, store, "lid", n * (8 + 4 * k), cfg.corpus.budget_bytes)
    info["space"] = "clip" if space == "embeddings" else "model"
    return info
