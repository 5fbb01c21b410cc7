"""Which rows of a shard take part in which corpus step, and the per-shard files steps write for later ones.

Every corpus task reads what it needs of its own shard: these masks are recomputed there from the part file and
the repeated keys (step `keys`), never held for the whole corpus.

    has_key   a sample (a damaged shard's own error row has no key)
    ok        a sample without error and whose key is not repeated: scored, classed, in LID_*
    searched  a sample whose image was read and embedded (the duplicate steps; an image that failed to score is
              still grouped)
"""

from __future__ import annotations

import functools

import numpy as np

from scanner.corpus.store import REFERENCE

LIGHT = ["key", "error", "error_stage", "embed_error"]
REPEATED = "corpus/keys/repeated.parquet"


def member(sorted_ids: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x in sorted_ids, elementwise (sorted_ids: sorted int64), by binary search."""
    if not len(sorted_ids):
        return np.zeros(len(x), bool)
    j = np.minimum(np.searchsorted(sorted_ids, x), len(sorted_ids) - 1)
    return sorted_ids[j] == x


def semi_join(ex, store, map_fn, column: str):
    """--against: map_fn(i) of this scan's shards, and of each old shard only the records whose `column` (a uint64
    hash) one of this scan's records carries: a semi-join, so the step's shuffle moves this scan's records and their
    matches, not the old corpus. Returns (the table, the rows it is sized for)."""
    asking = [i for i in range(len(store)) if store.asks[i]]
    t = ex.materialize(ex.from_items(map_fn, asking))
    wanted = np.unique(np.concatenate([np.zeros(0, np.uint64)] + [np.asarray(b[column], np.uint64)
                                                                  for b in ex.batches(t)]))
    old = [i for i in range(len(store)) if not store.asks[i]]
    t = ex.union(t, ex.from_items(functools.partial(_matching, map_fn, column, np.sort(wanted.view(np.int64))), old))
    return t, int(store.sizes[asking].sum()) * 2


def _matching(map_fn, column: str, sorted_ids: np.ndarray, i: int) -> dict | None:
    b = map_fn(i)
    if b is None:
        return None
    m = member(sorted_ids, np.asarray(b[column]).view(np.int64))  # member: sorted as int64
    return {k: np.asarray(v)[m] for k, v in b.items()}  # no rows: still its columns (executor._map_items)


@functools.lru_cache(maxsize=4)
def _repeated(uri: str) -> tuple[np.ndarray, dict]:
    from scanner.storage import Out

    out = Out(uri)
    if not out.exists(REPEATED):
        return np.zeros(0, np.int64), {}
    df = out.read_parquet(REPEATED)
    order = np.argsort(df["gid"].to_numpy())
    gids = df["gid"].to_numpy()[order].astype(np.int64)
    return gids, dict(zip(gids.tolist(), df["error"].to_numpy()[order]))


def repeated(store) -> tuple[np.ndarray, dict]:
    """(sorted gids of every copy of a repeated key, gid -> its error text), from step `keys`."""
    return _repeated(store.out.uri())


def masks(store, i: int, df=None) -> dict[str, np.ndarray]:
    """has_key / ok / searched of shard i's rows (df: its LIGHT columns when already read)."""
    df = store.read(i, LIGHT) if df is None else df
    gids = store.offsets[i] + np.arange(len(df))
    has_key = df["key"].notna().to_numpy()
    rep = member(repeated(store)[0], gids)
    # a reference set's rows are searched and grouped, never scored, classed or in LID_*
    ok = has_key & df["error"].isna().to_numpy() & ~rep & (store.roles[i] != REFERENCE)
    searched = (has_key & df["embed_error"].isna().to_numpy() & ~rep
                & ~df["error_stage"].isin(["read", "decode"]).to_numpy() & store.has_array("embeddings", i))
    return {"has_key": has_key, "ok": ok, "searched": searched}


# ---- per-shard outputs: a step writes one file per shard so that a later step's task reads only its own shard

def shard_rel(step: str, name: str) -> str:
    return f"corpus/{step}/{name}.parquet"


def write_by_shard(ex, t, store, step: str, bytes_hint: int = 0, budget_bytes: int = 1 << 30) -> int:
    """Rows of table t (a `gid` column) as one parquet file per shard, corpus/STEP/NAME.parquet, sorted by gid, written
    by the tasks that hold them (bytes_hint: about how much t holds, to size the shuffle). Returns the rows written."""
    from scanner.corpus.executor import parts_for

    if t is None:
        return 0
    t = ex.map(t, functools.partial(_add_shard, store))
    done = ex.shuffle(t, "shard", min(len(store), parts_for(bytes_hint, budget_bytes, share=4)),
                      functools.partial(_write_shards, store, step))
    return int(sum(int(b["rows"].sum()) for b in ex.batches(done)))


def _add_shard(store, b: dict) -> dict:
    return {**b, "shard": store.shard_of(np.asarray(b["gid"], np.int64)).astype(np.int64)}


def _write_shards(store, step: str, b: dict) -> dict:
    import pyarrow as pa

    rows = []
    order = np.lexsort((b["gid"], b["shard"]))
    b = {k: np.asarray(v)[order] for k, v in b.items()}
    shards, starts = np.unique(b["shard"], return_index=True)
    ends = np.r_[starts[1:], len(b["shard"])]
    for s, lo, hi in zip(shards, starts, ends):
        cols = {k: (list(v[lo:hi]) if v.ndim > 1 else v[lo:hi]) for k, v in b.items() if k != "shard"}
        if any(np.asarray(b[k]).ndim > 1 for k in cols):
            cols = {k: (pa.array(list(np.asarray(b[k][lo:hi]))) if np.asarray(b[k]).ndim > 1 else b[k][lo:hi])
                    for k in cols}
        store.out.write_parquet(shard_rel(step, store.names[int(s)]), pa.table(cols))
        rows.append(hi - lo)
    return {"rows": np.array(rows or [0], np.int64)}


def read_shard_file(store, step: str, i: int, columns: list[str] | None = None):
    """Shard i's rows of a per-shard step output as a DataFrame (None when the step wrote none for it)."""
    rel = shard_rel(step, store.names[i])
    if not store.out.exists(rel):
        return None
    return store.out.read_parquet(rel, columns=columns)
