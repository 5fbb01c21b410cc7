"""Step `replications`: each generation the scan's generate stage made (generations/: gen_id, caption, seed, and
its embedding) matched to its nearest training image by exact search over every searched row, a task per shard
(each returns its best row per generation; the best of those wins). A match at cosine >= neighbours.rep_threshold
replicates that training image. Output corpus/replications/replications.parquet."""

from __future__ import annotations

import functools

import numpy as np

GENERATIONS = "generations/generations.parquet"
GEN_EMBEDDINGS = "generations/embeddings.npy"


def _best_map(store, q: np.ndarray, i: int) -> dict | None:
    from scanner.corpus.neighbours import select_searched
    from scanner.corpus.search import shard_rows

    g, x = shard_rows(store, "embeddings", functools.partial(select_searched, store), i)
    if not len(g):
        return None
    s = q @ x.T
    j = np.argmax(s, axis=1)
    return {"gen": np.arange(len(q)), "sim": s[np.arange(len(q)), j].astype(np.float32), "gid": g[j]}


def run_replications(ctx) -> dict:
    import io

    import pandas as pd

    from scanner.corpus.executor import concat

    out, store, ex, n_cfg = ctx.out, ctx.store, ctx.executor, ctx.cfg.neighbours
    gens = out.read_parquet(GENERATIONS)
    q = np.load(io.BytesIO(out.read_bytes(GEN_EMBEDDINGS))).astype(np.float32)
    best = concat(ex.batches(ex.from_items(functools.partial(_best_map, store, q), range(len(store)))))
    sim = np.full(len(q), -np.inf, np.float32)
    gid = np.full(len(q), -1, np.int64)
    if best:
        for k, s, g in zip(best["gen"], best["sim"], best["gid"]):
            if s > sim[k] or (s == sim[k] and g < gid[k]):
                sim[k], gid[k] = s, g
    matched = gid >= 0
    keys = np.full(len(q), None, object)
    if matched.any():
        order = np.argsort(gid[matched])
        got = store.gather_columns(np.unique(gid[matched]), ["key"])["key"].to_numpy()
        keys[np.flatnonzero(matched)[order]] = got[np.searchsorted(np.unique(gid[matched]), gid[matched][order])]
    reps = pd.DataFrame({"gen_id": gens["gen_id"].astype("int64"), "caption": gens["caption"],
                         "seed": gens["seed"].astype("int64"), "matched_key": keys,
                         "similarity": np.where(matched, sim, np.nan).astype(np.float32),
                         "replicated": matched & (sim >= n_cfg.rep_threshold)})
    out.write_parquet(f"{ctx.step_dir('replications')}/replications.parquet", reps)
    return {"generations": len(reps), "threshold": n_cfg.rep_threshold, "replicated": int(reps["replicated"].sum()),
            "rate": float(reps["replicated"].mean()) if len(reps) else 0.0,
            "distinct_training_images": int(reps.loc[reps["replicated"], "matched_key"].nunique())}
