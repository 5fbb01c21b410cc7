"""Duplicate links of a whole corpus, out of core: each pass is a disk shuffle by a hash, then one partition
at a time in memory.

- repeated keys: partitioned by a 64-bit hash of the key; equal hashes are checked on the key strings.
- byte copies: partitioned by a 128-bit hash of the sha256; every copy links to the lowest row id.
- pHash near-copies within r bits, by multi-index hashing (the idea of faiss's IndexBinaryMultiHash,
  made out of core): the 64 bits are cut into r + 1 chunks; two hashes within r bits agree exactly on
  at least one chunk (pigeonhole), so rows are partitioned by (chunk number, chunk value) and only
  rows sharing a chunk are compared. Never all pairs.
The grouping itself (scanner.neighbours.dedup) then runs on the rows that have a link only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from scanner.corpus.spill import Spill
from scanner.corpus.store import PartStore

Select = Callable[[int], np.ndarray]
HASH_KEYS = ("memscan-hash-k1!", "memscan-hash-k2!")  # two 16-byte keys: a 128-bit hash of a string


def hash64(values, key: int = 0) -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(np.asarray(values, dtype=object), hash_key=HASH_KEYS[key], categorize=False)


PART_BYTES = 32 << 20  # one partition read back at once (sorting it takes a few times that)
BUFFER_BYTES = 64 << 20  # records buffered before a flush to the partition files


def n_parts(rows: int, record_bytes: int, budget_bytes: int) -> int:
    """Partitions of at most PART_BYTES (less under a small budget): memory does not grow with the corpus."""
    return max(1, math.ceil(rows * record_bytes / max(min(budget_bytes // 16, PART_BYTES), 1 << 20)))


def buffer_bytes(budget_bytes: int) -> int:
    return max(min(budget_bytes // 16, BUFFER_BYTES), 1 << 20)


def repeated_keys(store: PartStore, work: Path, budget_bytes: int) -> dict[int, str]:
    """gid -> the repeated-key error (scanner.data.keys wording) for every copy of a key carried twice."""
    from scanner.data.keys import repeated_key_errors

    rec = np.dtype([("h", "<u8"), ("gid", "<i8")])
    parts = n_parts(store.n, rec.itemsize, budget_bytes)
    spill = Spill(work / "keys", parts, rec, buffer_bytes=buffer_bytes(budget_bytes))
    for i in range(len(store)):
        keys = store.read(i, ["key"])["key"].to_numpy(dtype=object)
        have = np.flatnonzero(pd_notna(keys))
        r = np.empty(len(have), rec)
        r["h"], r["gid"] = hash64(keys[have]), store.offsets[i] + have
        spill.add(r["h"] % np.uint64(parts), r)
    cand = []
    for r in spill.partitions():
        _, inv, cnt = np.unique(r["h"], return_inverse=True, return_counts=True)
        cand.append(r["gid"][cnt[inv] > 1])
    cand = np.sort(np.concatenate(cand)) if cand else np.zeros(0, np.int64)
    if not len(cand):
        return {}
    rows = store.gather_columns(cand, ["key", "shard"])
    msgs = repeated_key_errors(rows["key"].tolist(), rows["shard"].tolist())
    return {int(g): m for g, m in zip(cand, msgs) if m is not None}


def pd_notna(a: np.ndarray) -> np.ndarray:
    import pandas as pd

    return pd.notna(a)


def byte_copies(store: PartStore, select: Select, work: Path, budget_bytes: int) -> np.ndarray:
    """(E, 2) links copy -> lowest gid with the same sha256, over the selected rows."""
    rec = np.dtype([("h1", "<u8"), ("h2", "<u8"), ("gid", "<i8")])
    parts = n_parts(store.n, rec.itemsize, budget_bytes)
    spill = Spill(work / "bytes", parts, rec, buffer_bytes=buffer_bytes(budget_bytes))
    for i in range(len(store)):
        m = np.asarray(select(i), bool)
        sha = store.read(i, ["sha256"])["sha256"].to_numpy(dtype=object)
        m &= pd_notna(sha)
        if not m.any():
            continue
        r = np.empty(int(m.sum()), rec)
        r["h1"], r["h2"], r["gid"] = hash64(sha[m], 0), hash64(sha[m], 1), store.offsets[i] + np.flatnonzero(m)
        spill.add(r["h1"] % np.uint64(parts), r)
    edges = []
    for r in spill.partitions():
        r = r[np.lexsort((r["gid"], r["h2"], r["h1"]))]
        new = np.r_[True, (r["h1"][1:] != r["h1"][:-1]) | (r["h2"][1:] != r["h2"][:-1])]
        first = r["gid"][np.maximum.accumulate(np.where(new, np.arange(len(r)), 0))]
        c = ~new
        edges.append(np.stack([r["gid"][c], first[c]], axis=1))
    return np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)


def chunk_masks(max_dist: int) -> list[tuple[int, np.uint64]]:
    """(shift, mask) of the max_dist + 1 chunks the 64 bits are cut into."""
    t = max_dist + 1
    bounds = np.linspace(0, 64, t + 1).round().astype(int)
    return [(int(lo), np.uint64((1 << (hi - lo)) - 1)) for lo, hi in itertools.pairwise(bounds)]


def phash_links(store: PartStore, select: Select, max_dist: int, work: Path, budget_bytes: int) -> np.ndarray:
    """(E, 2) links between selected rows whose pHashes differ in at most max_dist bits (equal ones chained)."""
    chunks = chunk_masks(max_dist)
    rec = np.dtype([("part", "<u8"), ("h", "<u8"), ("gid", "<i8")])
    parts = n_parts(store.n * len(chunks), rec.itemsize, budget_bytes)
    spill = Spill(work / "phash", parts, rec, buffer_bytes=buffer_bytes(budget_bytes))
    for i in range(len(store)):
        m = np.asarray(select(i), bool)
        ph = store.read(i, ["phash"])["phash"]
        m &= ph.notna().to_numpy()
        if not m.any():
            continue
        h = ph.to_numpy()[m].astype(np.int64).view(np.uint64)
        gids = store.offsets[i] + np.flatnonzero(m)
        for t, (shift, mask) in enumerate(chunks):
            r = np.empty(len(h), rec)
            # the bucket: chunk number and chunk value, hashed together
            r["part"] = ((h >> np.uint64(shift)) & mask) * np.uint64(len(chunks)) + np.uint64(t)
            r["h"], r["gid"] = h, gids
            spill.add(hash64(r["part"]) % np.uint64(parts), r)
    edges = []
    for r in spill.partitions():
        edges += _bucket_links(r, max_dist)
    if not edges:
        return np.zeros((0, 2), np.int64)
    e = np.sort(np.concatenate(edges), axis=1)
    return np.unique(e, axis=0)


SMALL_BUCKET = 64  # distinct hashes in one bucket compared by shifted vectors; larger buckets block by block


def _bucket_links(r: np.ndarray, max_dist: int) -> list[np.ndarray]:
    """Links inside one partition of (bucket, hash, gid) records, vectorised over all its buckets: equal hashes
    chained, then every pair of distinct hashes of one bucket within max_dist bits."""
    from scanner.neighbours.phash import _popcount, hamming_pairs

    order = np.lexsort((r["gid"], r["h"], r["part"]))
    part, h, gid = r["part"][order], r["h"][order], r["gid"][order]
    same = (part[1:] == part[:-1]) & (h[1:] == h[:-1])
    out = [np.stack([gid[:-1][same], gid[1:][same]], axis=1)]
    if max_dist <= 0:
        return out
    first = np.r_[True, ~same]  # one record per distinct (bucket, hash)
    dp, dh, dg = part[first], h[first], gid[first]
    bucket = np.cumsum(np.r_[True, dp[1:] != dp[:-1]]) - 1
    sizes = np.bincount(bucket)
    big = sizes > SMALL_BUCKET
    small_max = int(sizes[~big].max()) if (~big).any() else 0
    for d in range(1, small_max):  # element k against element k + d of the same bucket
        a = np.arange(len(dh) - d)
        ok = (bucket[a] == bucket[a + d]) & ~big[bucket[a]]
        ok[ok] = _popcount(dh[a[ok]] ^ dh[a[ok] + d]) <= max_dist
        out.append(np.stack([dg[a[ok]], dg[a[ok] + d]], axis=1))
    starts = np.r_[0, np.cumsum(sizes)]
    for b in np.flatnonzero(big):
        s, e = starts[b], starts[b + 1]
        ab = hamming_pairs(dh[s:e], max_dist)  # blocked: memory stays linear in the bucket
        out.append(np.stack([dg[s:e][ab[:, 0]], dg[s:e][ab[:, 1]]], axis=1))
    return out
