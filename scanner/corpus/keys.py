"""Step `keys`: every sample whose key another sample carries too (keys must be unique across the corpus).

Merged crawls and re-downloaded shard sets repeat keys. Which copy is "the" sample cannot be decided, so every copy
becomes an error row naming the shards that hold the key; everything else is scored, embedded and grouped as usual.

map (a task per shard): (64-bit hash of the key, gid) of every row with a key. shuffle by the hash. reduce: the
gids whose hash repeats. Then the few candidates' keys are read back and compared as strings (a hash collision
is not a repeat), and each copy gets the error text naming every shard that carries the key.
Output: corpus/keys/repeated.parquet (gid, error), read by every later step (scanner.corpus.rows).
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

HASH_KEYS = ("memscan-hash-k1!", "memscan-hash-k2!")  # two 16-byte keys: a 128-bit hash of a string


def hash64(values, key: int = 0) -> np.ndarray:
    """A 64-bit hash (uint64) of each string, seeded by HASH_KEYS[key]."""
    import pandas as pd

    return pd.util.hash_array(np.asarray(values, dtype=object), hash_key=HASH_KEYS[key], categorize=False)


def keys_map(store, i: int) -> dict:
    from scanner.corpus.store import REFERENCE

    if store.roles[i] == REFERENCE:  # another data set: its keys may be anything
        return {"h": np.zeros(0, np.uint64), "gid": np.zeros(0, np.int64)}
    keys = store.read(i, ["key"])["key"].to_numpy(dtype=object)
    have = np.flatnonzero(pd_notna(keys))
    return {"h": hash64(keys[have]), "gid": (store.offsets[i] + have).astype(np.int64)}


def pd_notna(a: np.ndarray) -> np.ndarray:
    import pandas as pd

    return pd.notna(a)


def keys_reduce(b: dict) -> dict:
    _, inv, cnt = np.unique(b["h"], return_inverse=True, return_counts=True)
    return {"gid": np.sort(np.asarray(b["gid"], np.int64)[cnt[inv] > 1])}


def _name(shard: str) -> str:
    """A shard's name as the part files carry it (a path's base name without .tar is the same name)."""
    return os.path.basename(shard).removesuffix(".tar")


def repeated_key_errors(keys: Sequence, shards: Sequence) -> list[str | None]:
    """For row i: None, or the error text when keys[i] is carried by more than one row.

    keys: N sample keys (None for a damaged shard's own error row: never repeated); shards: N shard
    names or paths (named by shard_name in the message).
    """
    where: dict[str, list[str]] = defaultdict(list)
    for k, s in zip(keys, shards):
        if k is not None:
            where[k].append(_name(str(s)))
    out: list[str | None] = []
    for k in keys:
        names = where.get(k, []) if k is not None else []
        if len(names) < 2:
            out.append(None)
            continue
        counts = ", ".join(f"{n} ({names.count(n)}x)" if names.count(n) > 1 else n for n in sorted(set(names)))
        out.append(f"key {k!r} is repeated: {len(names)} samples carry it, in shards {counts}; keys must be unique "
                   "across the corpus, so no copy is scored")
    return out


def run_keys(ctx) -> dict:
    """The `keys` step (see the module docstring)."""
    import pandas as pd

    from scanner.corpus.executor import concat, parts_for
    from scanner.corpus.rows import semi_join

    store, ex = ctx.store, ctx.executor
    asking = [i for i in range(len(store)) if store.asks[i]]
    if len(asking) == len(store) or not ctx.prior.get("repeated"):
        t = ex.from_items(functools.partial(keys_map, store), range(len(store)))
        rows_in = store.n
    else:  # --against: this scan's keys, and the old rows that carry one of them (a semi-join, not the old corpus)
        t, rows_in = semi_join(ex, store, functools.partial(keys_map, store), "h")
    t = ex.shuffle(t, "h", parts_for(rows_in * 16, ctx.cfg.corpus.budget_bytes), keys_reduce)
    found = concat(ex.batches(t))
    cand = np.sort(found["gid"]) if found else np.zeros(0, np.int64)
    rows = store.gather_columns(cand, ["key", "shard"]) if len(cand) else pd.DataFrame(columns=["key", "shard"])
    msgs = repeated_key_errors(rows["key"].tolist(), rows["shard"].tolist())
    if len(cand) and store.incremental:
        from scanner.corpus.store import OLD

        # --against: an old scan's sample keeps its key (it was scanned, grouped and listed already); the new copy
        # is the error row. Old rows are errors only where the old scan repeated the key itself.
        old = store.role_of(cand) == OLD
        old_msgs = repeated_key_errors([k if o else None for k, o in zip(rows["key"].tolist(), old)],
                                       rows["shard"].tolist())
        msgs = [om if o else m for m, om, o in zip(msgs, old_msgs, old)]
    rep = pd.DataFrame({"gid": cand, "error": msgs}).dropna(subset=["error"])
    if ctx.prior.get("repeated"):  # the old scan's own repeated keys stay errors (its gids are the first of ours)
        from scanner.storage import Out

        o, rows = ctx.prior["repeated"]
        src = Out(o)
        if src.exists("corpus/keys/repeated.parquet"):
            old_rep = src.read_parquet("corpus/keys/repeated.parquet")
            old_rep = old_rep[old_rep["gid"] < rows]
            rep = pd.concat([old_rep[~old_rep["gid"].isin(rep["gid"])], rep]).sort_values("gid")
    ctx.out.write_parquet(f"{ctx.step_dir('keys')}/repeated.parquet", rep.astype({"gid": "int64", "error": "string"}))
    from scanner.corpus.rows import _repeated

    _repeated.cache_clear()  # this process's later steps read the new file
    return {"repeated_rows": len(rep), "keys": int(rep["error"].nunique()) if len(rep) else 0}
