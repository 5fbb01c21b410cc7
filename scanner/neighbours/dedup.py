"""Duplicate groups: byte-identical copies, near-exact perceptual-hash matches, then cosine >= threshold.

Two kinds of link, and two rules for turning them into groups:
- **copies** (the same picture): raw-byte hash equality (sha256 of the file bytes) and, optionally,
  perceptual hashes (phash.py) within `phash_max_dist` bits. Copies group transitively (connected
  components): a re-encode of a re-encode is still the same image. Each such component is a *unit*,
  represented by its kept member (the keep rule below).
- **embedding neighbours** (near-duplicates): each row of distinct bytes asks for its k nearest units'
  kept members (a byte copy has its original's embedding; a pHash copy has its own) with cosine >= threshold, and the
  pixel-checked near-misses below it (align.py); a link of any member links its unit. These do not
  chain: groups are formed greedily, as SemDeDup keeps one image per epsilon-ball. Units are taken in
  keep-rule order; an ungrouped unit becomes a group's centre, and every ungrouped unit linked to it
  joins. So every member joined by the embedding is within the threshold of the group's kept image (or
  of a pHash copy of it), and a run of near-identical images (flat sky tiles, a slow pan) is cut into
  balls instead of one group of unrelated ends.

Keep rule (one member per group survives): the largest image (width x height, when sizes are given),
then the unit linked to the most units not yet grouped (greedy set cover), then the lowest key. The links
break ties between images of one size because the original of a near-duplicate family is linked to each
of its edits while two edits of it (a shifted and a resized copy) often are not linked to each other: taken
first, the original's ball holds the whole family, where an edit taken first would leave its siblings out;
and a chain is cut into balls that leave no image with a free neighbour alone. `similarity` is each member's
cosine to the kept member. The same functions group
the out-of-core corpus steps (scanner/corpus/copies.py, neighbours.py), which only find the links differently.
"""

from __future__ import annotations

import heapq
from collections import Counter

import numpy as np
import pandas as pd

KEEP_RULE = ("keep the largest image (width x height, when known), then the one linked to the most images not yet "
             "in a group, then the lowest key")
GROUP_RULE = ("byte and pHash copies group transitively; near-duplicates join the group of the first linked "
              "unit in keep-rule order, so every embedding-linked member is within the threshold of the kept image "
              "or of a pHash copy of it")


def keep_rank(keys, sizes) -> np.ndarray:
    """Rank of each node under the keep rule (0 = kept first): largest size, then lowest key.

    keys: a list or a pyarrow string array (compact: the corpus steps never make Python strings of them)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    k = keys if isinstance(keys, (pa.Array, pa.ChunkedArray)) else pa.array(list(keys), pa.string())
    sizes = np.asarray(sizes if sizes is not None else np.zeros(len(k)), dtype=np.int64)
    order = pc.sort_indices(pa.table({"size": sizes, "key": k}),
                            sort_keys=[("size", "descending"), ("key", "ascending")]).to_numpy()
    rank = np.empty(len(k), np.int64)
    rank[order] = np.arange(len(k))
    return rank


def copy_units(n: int, copy_edges: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the copy links. Returns (unit label (n,), kept node of each unit)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    e = np.asarray(copy_edges, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(e), dtype=np.int8), (e[:, 0], e[:, 1])), shape=(n, n))
    n_units, unit = connected_components(graph, directed=False)
    kept = np.full(n_units, -1, np.int64)
    order = np.argsort(rank, kind="stable")  # best first: the first node seen of each unit is its kept one
    first = np.unique(unit[order], return_index=True)[1]
    kept[unit[order][first]] = order[first]
    return unit, kept


def leader_groups(unit: np.ndarray, kept: np.ndarray, rank: np.ndarray, emb_edges: np.ndarray,
                  emb_sims: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray:
    """Group of every node: the unit id of its group's centre (-1: in no group of >= 2 nodes).

    emb_edges: (F, 2) node pairs with cosine >= threshold (both ends units' kept nodes), emb_sims: (F,);
    rank: keep_rank of every node; sizes: every node's pixel count (None: all equal). Centres are taken
    largest first, then the unit linked to the most units not yet grouped, then by rank (the keep rule).
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    n_units = len(kept)
    e = np.asarray(emb_edges, dtype=np.int64).reshape(-1, 2)
    ua, ub = unit[e[:, 0]], unit[e[:, 1]]
    ne = ua != ub
    ua, ub = ua[ne], ub[ne]
    adj = csr_matrix((np.ones(2 * len(ua), np.int8), (np.r_[ua, ub], np.r_[ub, ua])), shape=(n_units, n_units))
    adj.sum_duplicates()  # a pair found from both ends is one link
    degree = np.diff(adj.indptr)
    pixels = np.zeros(n_units, np.int64) if sizes is None else np.asarray(sizes, np.int64)[kept]
    r = rank[kept]
    centre = np.full(n_units, -1, np.int64)
    # greedy set cover with lazy updates: a unit's count of ungrouped neighbours only falls, so an entry whose
    # count is still current when it is popped is the best unit left. Connected components do not interact:
    # one heap per component, so the heap's memory is bounded by the largest component, not the corpus.
    linked = np.flatnonzero(degree)
    _, comp = connected_components(adj, directed=False)
    linked = linked[np.argsort(comp[linked], kind="stable")]
    bounds = np.flatnonzero(np.diff(comp[linked])) + 1
    for part in np.split(linked, bounds):
        heap = [(-int(pixels[u]), -int(degree[u]), int(r[u]), int(u)) for u in part]
        heapq.heapify(heap)
        while heap:
            neg_size, neg_free, ru, u = heapq.heappop(heap)
            if centre[u] >= 0:
                continue
            nb = adj.indices[adj.indptr[u]:adj.indptr[u + 1]]
            free = nb[centre[nb] < 0]
            if len(free) != -neg_free:
                heapq.heappush(heap, (neg_size, -len(free), ru, u))
                continue
            centre[u] = u
            centre[free] = u
    alone = np.flatnonzero(centre < 0)
    centre[alone] = alone
    group = centre[unit]
    size = np.bincount(group, minlength=n_units)
    return np.where(size[group] > 1, group, -1)


def link_names(n: int, bytes_edges: np.ndarray, phash_edges: np.ndarray, embedding_edges: np.ndarray,
               rest: str = "aligned") -> np.ndarray:
    """What first linked each node: 'bytes', else 'phash', else 'embedding' (an edge of embedding_edges: cosine >=
    dup_threshold), else `rest`: 'aligned' (a candidate below it whose pixels agree at a shift:
    scanner.neighbours.align) or 'verified' (one whose thumbnails fit under an affine map: scanner.neighbours.verify).
    member_links then names a group member by the edge that joined it to its group."""
    link = np.full(n, rest, dtype=object)
    link[np.unique(np.asarray(embedding_edges, dtype=np.int64).reshape(-1, 2))] = "embedding"
    for edges, name in ((phash_edges, "phash"), (bytes_edges, "bytes")):  # bytes last: it wins
        e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
        link[np.unique(e)] = name
    return link


def member_links(unit: np.ndarray, group: np.ndarray, edges: np.ndarray, scores: np.ndarray,
                 kinds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The edge that joined each node's unit to its group's centre: (kind (n,) object, None where none: the centre's
    own unit, or no group; score (n,) float32, NaN there).

    unit: each node's copy unit; group: each node's centre unit (leader_groups, -1: none); edges: (F, 2) node pairs
    of the embedding and checked links, scores: (F,) their scores (cosine, or the verifier's), kinds: (F,) their
    names. leader_groups joins a unit to a centre it has an edge to, so every member outside the centre's unit has
    one; of several, an 'embedding' edge wins, then the highest score.
    """
    n = len(unit)
    kind = np.full(n, None, dtype=object)
    score = np.full(n, np.nan, np.float32)
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if not len(e):
        return kind, score
    ua, ub = unit[e[:, 0]], unit[e[:, 1]]
    ga, gb = group[e[:, 0]], group[e[:, 1]]
    # an edge serves the end whose group's centre is the other end's unit
    serves_a, serves_b = (ga == ub) & (ga >= 0) & (ua != ub), (gb == ua) & (gb >= 0) & (ua != ub)
    mem = np.r_[ua[serves_a], ub[serves_b]]
    idx = np.r_[np.flatnonzero(serves_a), np.flatnonzero(serves_b)]
    if not len(mem):
        return kind, score
    k = np.asarray(kinds, dtype=object)[idx]
    sc = np.asarray(scores, np.float32)[idx]
    order = np.lexsort((-sc, k != "embedding", mem))  # per unit: embedding first, then the highest score
    mem, k, sc = mem[order], k[order], sc[order]
    first = np.r_[True, mem[1:] != mem[:-1]]
    best_kind = dict(zip(mem[first].tolist(), k[first]))
    best_score = dict(zip(mem[first].tolist(), sc[first]))
    nodes = np.flatnonzero(np.isin(unit, mem[first]))
    kind[nodes] = [best_kind[u] for u in unit[nodes].tolist()]
    score[nodes] = [best_score[u] for u in unit[nodes].tolist()]
    return kind, score


def group_table(keys, group: np.ndarray, kept: np.ndarray, similarity: np.ndarray, link: np.ndarray,
                ids: np.ndarray | None = None, score: np.ndarray | None = None,
                precision: np.ndarray | None = None) -> pd.DataFrame:
    """duplicates.parquet rows of the nodes with a group, ordered by group then key: group ids numbered by their
    kept key. group: each node's centre unit (-1: none), kept: each unit's kept node, keys: list or pyarrow
    strings (kept as Arrow strings in the frame), ids: the corpus steps' row ids (a `gid` column); score and
    precision: each node's link score and its calibrated precision (NaN: none; the kept member always NaN)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    k = keys if isinstance(keys, (pa.Array, pa.ChunkedArray)) else pa.array(list(keys), pa.string())
    members = np.flatnonzero(group >= 0)
    centres = np.unique(group[members])
    kept_nodes = kept[centres]
    by_key = pc.sort_indices(k.take(pa.array(kept_nodes))).to_numpy()  # centres in kept-key order
    number = np.empty(len(centres), np.int64)
    number[by_key] = np.arange(len(centres))
    gid = number[np.searchsorted(centres, group[members])]
    is_kept = kept[group[members]] == members
    t = pa.table({"key": k.take(pa.array(members)), "group_id": gid,
                  "similarity": np.where(is_kept, 1.0, np.minimum(similarity[members], 1.0)).astype(np.float32),
                  "keep": is_kept, "link": pa.array(link[members].astype(str), pa.string()),
                  "score": np.where(is_kept, np.nan, np.full(len(group), np.nan, np.float32)[members]
                                    if score is None else score[members]).astype(np.float32),
                  "precision": np.where(is_kept, np.nan, np.full(len(group), np.nan, np.float32)[members]
                                        if precision is None else precision[members]).astype(np.float32)})
    if ids is not None:
        t = t.append_column("gid", pa.array(np.asarray(ids, dtype=np.int64)[members]))
    t = t.take(pc.sort_indices(t, sort_keys=[("group_id", "ascending"), ("key", "ascending")]))
    df = t.to_pandas(types_mapper={pa.string(): pd.ArrowDtype(pa.string())}.get)
    return df


def duplicate_removals(dups: pd.DataFrame, shard_of: dict[str, str] | None = None) -> pd.DataFrame:
    """Removal-list rows (key, shard, reason='duplicate') for every group member that is not kept."""
    drop = dups.loc[~dups["keep"], "key"]
    return pd.DataFrame({"key": drop.values,
                         "shard": [(shard_of or {}).get(k) for k in drop],
                         "reason": "duplicate"})


def pair_precision_recall(pred: dict[str, object], truth: dict[str, object],
                          content: dict[str, object] | None = None) -> dict:
    """Pair-level precision/recall of predicted groups against true groups.

    pred / truth: key -> group id for keys in a group (keys absent or mapped to None are singletons).
    A pair of keys is positive when both share a group. Counted from group sizes, not enumerated.
    content: key -> the bytes' hash (sha256); with it, pairs of byte-identical keys are left out of every count:
    the non-identical pairs, the ones a byte hash cannot find (keys without a hash count as distinct bytes).
    """
    def pairs(c):
        return sum(v * (v - 1) // 2 for v in c.values())

    def same(k):  # only called with content
        h = content.get(k)
        return ("bytes", h) if isinstance(h, str) and h else ("key", k)

    p = {k: g for k, g in pred.items() if g is not None}
    t = {k: g for k, g in truth.items() if g is not None and not (isinstance(g, float) and np.isnan(g))}
    both = p.keys() & t.keys()
    tp = pairs(Counter((p[k], t[k]) for k in both))
    n_pred, n_true = pairs(Counter(p.values())), pairs(Counter(t.values()))
    if content is not None:  # minus the byte-identical pairs inside each group (and inside each agreeing pair)
        tp -= pairs(Counter((p[k], t[k], same(k)) for k in both))
        n_pred -= pairs(Counter((g, same(k)) for k, g in p.items()))
        n_true -= pairs(Counter((g, same(k)) for k, g in t.items()))
    return {"pair_precision": tp / n_pred if n_pred else 1.0, "pair_recall": tp / n_true if n_true else 1.0,
            "true_pairs": n_true, "predicted_pairs": n_pred, "correct_pairs": tp}
