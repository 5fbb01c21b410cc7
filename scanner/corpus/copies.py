"""Step `copies`: byte-identical files and perceptual-hash near-copies among the searched rows, as links.

map (a task per shard), two kinds of record per searched row:
- bytes: (128-bit hash of the sha256, gid), shuffled by the hash: every copy links to the lowest gid of its hash;
- pHash within r bits by multi-index hashing (the idea of faiss's IndexBinaryMultiHash, made out of core): the
  64 bits are cut into r + 1 chunks; two hashes within r bits agree exactly on at least one chunk (pigeonhole), so
  each row is shuffled once per chunk by (chunk number, chunk value), and only rows sharing a bucket are
  compared. Equal hashes are chained (linear links), distinct ones within r bits linked. Never all pairs.
Output: corpus/copies/ (a, b, kind) with kind 0 = bytes, 1 = pHash; a pair can appear twice (two buckets).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

from scanner.corpus.keys import hash64

BYTES, PHASH = 0, 1
SMALL_BUCKET = 64  # distinct hashes in one bucket compared by shifted vectors; larger buckets block by block


def chunk_masks(max_dist: int) -> list[tuple[int, np.uint64]]:
    """(shift, mask) of the max_dist + 1 chunks the 64 bits are cut into."""
    t = max_dist + 1
    bounds = np.linspace(0, 64, t + 1).round().astype(int)
    return [(int(lo), np.uint64((1 << (hi - lo)) - 1)) for lo, hi in itertools.pairwise(bounds)]


def copies_map(store, phash_max_dist: int, i: int) -> dict | None:
    from scanner.corpus.rows import LIGHT, masks

    df = store.read(i, [*LIGHT, "sha256", "phash"])
    m = masks(store, i, df)["searched"]
    gids = store.offsets[i] + np.flatnonzero(m)
    sha = df["sha256"].to_numpy(dtype=object)[m]
    has_sha = np.asarray([isinstance(x, str) and bool(x) for x in sha], bool)
    kinds, keys, hs, bks, gs = [], [], [], [], []
    if has_sha.any():
        kinds.append(np.full(int(has_sha.sum()), BYTES, np.int8))
        keys.append(hash64(sha[has_sha], 0))
        hs.append(hash64(sha[has_sha], 1))
        bks.append(np.zeros(int(has_sha.sum()), np.uint64))
        gs.append(gids[has_sha])
    if phash_max_dist >= 0 and "phash" in df:
        ph = df["phash"][m]
        have = ph.notna().to_numpy()
        h = ph.to_numpy()[have].astype(np.int64).view(np.uint64)
        chunks = chunk_masks(phash_max_dist)
        for t, (shift, mask) in enumerate(chunks):
            bucket = ((h >> np.uint64(shift)) & mask) * np.uint64(len(chunks)) + np.uint64(t)
            kinds.append(np.full(len(h), PHASH, np.int8))
            keys.append(hash64(bucket.astype(object)))
            hs.append(h)
            bks.append(bucket)
            gs.append(gids[have])
    if not kinds:
        return None
    return {"kind": np.concatenate(kinds), "key": np.concatenate(keys), "h": np.concatenate(hs),
            "bucket": np.concatenate(bks), "gid": np.concatenate(gs).astype(np.int64)}


def copies_reduce(phash_max_dist: int, b: dict) -> dict:
    kind = np.asarray(b["kind"])
    out = [_byte_links(np.asarray(b["key"])[kind == BYTES], np.asarray(b["h"])[kind == BYTES],
                       np.asarray(b["gid"])[kind == BYTES])]
    if (kind == PHASH).any():
        m = kind == PHASH
        e = np.concatenate(_bucket_links(np.asarray(b["bucket"])[m], np.asarray(b["h"])[m], np.asarray(b["gid"])[m],
                                         phash_max_dist))
        if len(e):
            e = np.unique(np.sort(e, axis=1), axis=0)
        out.append(np.column_stack([e, np.full(len(e), PHASH)]) if len(e) else np.zeros((0, 3), np.int64))
    e = np.concatenate(out).astype(np.int64)
    e = e[np.lexsort((e[:, 1], e[:, 0], e[:, 2]))]
    return {"a": e[:, 0], "b": e[:, 1], "kind": e[:, 2].astype(np.int8)}


def _byte_links(h1: np.ndarray, h2: np.ndarray, gid: np.ndarray) -> np.ndarray:
    """(E, 3) links copy -> lowest gid with the same (h1, h2), kind BYTES."""
    if not len(gid):
        return np.zeros((0, 3), np.int64)
    o = np.lexsort((gid, h2, h1))
    h1, h2, gid = h1[o], h2[o], gid[o]
    new = np.r_[True, (h1[1:] != h1[:-1]) | (h2[1:] != h2[:-1])]
    first = gid[np.maximum.accumulate(np.where(new, np.arange(len(gid)), 0))]
    c = ~new
    return np.column_stack([gid[c], first[c], np.full(int(c.sum()), BYTES)])


def _bucket_links(part: np.ndarray, h: np.ndarray, gid: np.ndarray, max_dist: int) -> list[np.ndarray]:
    """Links inside (bucket, hash, gid) records, vectorised over all buckets: equal hashes chained, then every pair
    of distinct hashes of one bucket within max_dist bits."""
    from scanner.neighbours.phash import _popcount, hamming_pairs

    order = np.lexsort((gid, h, part))
    part, h, gid = part[order], h[order], gid[order]
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


def run_copies(ctx) -> dict:
    """The `copies` step (see the module docstring)."""
    from scanner.corpus.executor import parts_for
    from scanner.corpus.rows import semi_join

    store, ex, n = ctx.store, ctx.executor, ctx.cfg.neighbours
    r = n.phash_max_dist if "phash" in store.columns else -1
    asking = [i for i in range(len(store)) if store.asks[i]]
    if len(asking) == len(store) or not ctx.prior.get("edges"):
        t = ex.from_items(functools.partial(copies_map, store, r), range(len(store)))
        rows_in = store.n
    else:  # --against: this scan's records and the old ones sharing a bucket (the old scan's links are reused)
        t, rows_in = semi_join(ex, store, functools.partial(copies_map, store, r), "key")
    t = ex.shuffle(t, "key", parts_for(rows_in * 33 * (2 + max(r, 0)), ctx.cfg.corpus.budget_bytes),
                   functools.partial(copies_reduce, r))
    t = ex.materialize(t)
    rows = ex.write(t, ctx.out, ctx.step_dir("copies"))
    links = {"bytes": 0, "phash": 0}
    for b in ex.batches(t):
        links["bytes"] += int((b["kind"] == BYTES).sum())
        links["phash"] += int((b["kind"] == PHASH).sum())
    return {"links": rows, **links}
