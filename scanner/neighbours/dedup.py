"""Duplicate groups: byte-identical copies, near-exact perceptual-hash matches, then cosine >= threshold.

Every link found by any of the three passes joins two images; groups are the connected components
(clip-retrieval's rule). Passes, cheapest first:
1. raw-byte hash equality (sha256 of the file bytes): exact copies, free.
2. optional perceptual hash (phash.py), Hamming distance <= phash_max_dist: re-encodes and
   resizes that kept the picture intact; catches them without the embedder at scale.
3. embedding kNN (k neighbours each, over one representative per byte hash, so a 30x repeated
   image fills no neighbour list) with cosine >= threshold.

Keep rule (one member per group survives): the largest image (width x height, when sizes are given),
then the lowest key. `similarity` is each member's cosine to the kept member.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

KEEP_RULE = "keep the largest image (width x height, when known), ties broken by the lowest key"


def find_duplicate_groups(keys: list[str], vectors: np.ndarray, raw_hashes: list[str] | None, threshold: float,
                          k: int = 20, index=None, phashes: np.ndarray | None = None, phash_max_dist: int = -1,
                          sizes: list[int] | None = None) -> pd.DataFrame:
    """Duplicate groups of a corpus.

    keys: N unique sample keys; vectors: (N, d) float32 unit rows (row i embeds keys[i]);
    raw_hashes: N hashes of the raw bytes (None: skip pass 1); threshold: cosine for pass 3;
    k: neighbours searched per image; index: a faiss index over exactly these N vectors in this
    order (None: exact search over one representative per byte hash); phashes: (N,) uint64 perceptual hashes with phash_max_dist
    >= 0 to enable pass 2; sizes: N pixel counts for the keep rule.

    Returns one row per member of a group of >= 2: key, group_id (int, groups numbered by their
    kept key), similarity (float, cosine to the kept member), keep (bool), link (what first joined
    the group: 'bytes', 'phash' or 'embedding').
    """
    n = len(keys)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape[0] != n:
        raise ValueError(f"{n} keys but {vectors.shape[0]} vectors")
    if len(set(keys)) != n:
        dup = next(key for key, c in Counter(keys).items() if c > 1)
        raise ValueError(f"keys must be unique across the corpus; {dup!r} appears more than once")
    edges: list[np.ndarray] = []  # (E, 2) index pairs, one array per pass
    link = np.full(n, "", dtype=object)  # the pass that first linked each row

    def add(pairs: np.ndarray, name: str) -> None:
        if len(pairs):
            edges.append(pairs)
            touched = np.unique(pairs)
            link[touched] = np.where(link[touched] == "", name, link[touched])

    # 1. byte-identical copies: link each copy to the first row with its hash
    rep = np.arange(n)
    if raw_hashes is not None:
        _, first, inverse = np.unique(np.asarray(raw_hashes, dtype=object).astype(str), return_index=True,
                                      return_inverse=True)
        rep = first[inverse]
        copies = np.flatnonzero(rep != np.arange(n))
        add(np.stack([copies, rep[copies]], axis=1), "bytes")
    reps = np.flatnonzero(rep == np.arange(n))

    # 2. perceptual hash: near-exact copies among the representatives
    if phashes is not None and phash_max_dist >= 0:
        from scanner.neighbours.phash import hamming_pairs

        add(reps[hamming_pairs(np.asarray(phashes, dtype=np.uint64)[reps], phash_max_dist)], "phash")

    # 3. embedding kNN from each representative, cosine >= threshold
    if len(reps) > 1:
        kk = min(k + 1, len(reps))
        if index is None:
            from scanner.neighbours.index import exact_knn

            sims, ids = exact_knn(vectors[reps], vectors[reps], kk)
            ids = np.where(ids >= 0, reps[ids], -1)
        else:
            from scanner.neighbours.index import knn

            sims, ids = knn(index, vectors[reps], kk)
        q = np.repeat(reps, kk).reshape(len(reps), kk)
        ok = (sims >= threshold) & (ids >= 0) & (ids != q)
        add(np.stack([q[ok], ids[ok]], axis=1), "embedding")

    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    e = np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64)
    graph = coo_matrix((np.ones(len(e), dtype=np.int8), (e[:, 0], e[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    sizes_arr = np.asarray(sizes if sizes is not None else np.zeros(n), dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    groups = [m for m in np.split(order, bounds) if len(m) > 1]
    kept = [min(m.tolist(), key=lambda i: (-sizes_arr[i], keys[i])) for m in groups]
    rows = []
    for gid, (members, keep) in enumerate(sorted(zip(groups, kept), key=lambda t: keys[t[1]])):
        sim = np.minimum(vectors[members] @ vectors[keep], 1.0)
        for i, s in zip(members, sim):
            rows.append((keys[i], gid, 1.0 if i == keep else float(s), bool(i == keep), link[i] or "embedding"))
    df = pd.DataFrame(rows, columns=["key", "group_id", "similarity", "keep", "link"])
    return df.astype({"group_id": "int64", "similarity": "float32", "keep": "bool"})


def duplicate_removals(dups: pd.DataFrame, shard_of: dict[str, str] | None = None) -> pd.DataFrame:
    """Removal-list rows (key, shard, reason='duplicate') for every group member that is not kept."""
    drop = dups.loc[~dups["keep"], "key"]
    return pd.DataFrame({"key": drop.values,
                         "shard": [(shard_of or {}).get(k) for k in drop],
                         "reason": "duplicate"})


def pair_precision_recall(pred: dict[str, object], truth: dict[str, object]) -> dict:
    """Pair-level precision/recall of predicted groups against true groups.

    pred / truth: key -> group id for keys in a group (keys absent or mapped to None are singletons).
    A pair of keys is positive when both share a group. Counted from group sizes, not enumerated.
    """
    def pairs(c):
        return sum(v * (v - 1) // 2 for v in c.values())

    p = {k: g for k, g in pred.items() if g is not None}
    t = {k: g for k, g in truth.items() if g is not None and not (isinstance(g, float) and np.isnan(g))}
    tp = pairs(Counter((p[k], t[k]) for k in p.keys() & t.keys()))
    n_pred, n_true = pairs(Counter(p.values())), pairs(Counter(t.values()))
    return {"pair_precision": tp / n_pred if n_pred else 1.0, "pair_recall": tp / n_true if n_true else 1.0,
            "true_pairs": n_true, "predicted_pairs": n_pred, "correct_pairs": tp}
