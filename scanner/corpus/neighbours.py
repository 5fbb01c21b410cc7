"""The duplicate steps, after `copies`: units of copies, embedding links, the pixel check, the groups.

- `units`: connected components of the copy links (bytes, pHash) are units: the same picture, grouped
  transitively, each represented by its kept member (keep rule: largest image, then lowest key). Output per
  shard, corpus/units/NAME.parquet: gid, unit (the kept member's gid), byte_copy (a byte copy of a lower gid).
- `links`: k nearest unit representatives of every row of distinct bytes (scanner.corpus.search), cosine >=
  neighbours.dup_threshold; neighbours just below it (>= align_min_cosine) are candidates for the pixel check.
  A byte copy has its original's embedding and does not ask; a unit's other members are not in the index, so a
  unit of many copies does not fill its members' k neighbours with each other. Output corpus/links/ (a, b, sim,
  kind: 2 embedding, 3 candidate).
- `aligned`: candidates whose stored thumbnails agree at a small shift (scanner.neighbours.align), checked in
  batches as tasks. Output corpus/aligned/ (a, b, sim, kind 4).
- `groups`: connected components of every link, then within each component (scanner.corpus.components) the
  units and groups that do not chain (scanner.neighbours.dedup.leader_groups: one image per ball); each member's
  similarity to its kept image from the two embeddings. Output per shard, corpus/groups/NAME.parquet.
- `replications`: the generations the scan's generate stage embedded (generations/), each matched to its nearest
  training image by exact search, a task per shard.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from scanner.corpus.copies import BYTES, PHASH
from scanner.corpus.store import NEW
from scanner.corpus.store import OLD as OLD_ROLE
from scanner.corpus.store import REFERENCE as REFERENCE_ROLE

LOG = logging.getLogger("memscan")
EMBEDDING, CANDIDATE, ALIGNED = 2, 3, 4
INDEX_DIR = "corpus/index"  # the links step's inverted lists, kept for a later --against scan (corpus.keep_index)
ALIGN_BATCH = 8192  # candidate pairs gathered and compared at once: 2 x 8192 x 3 KB thumbnails = 50 MB at 32 px


# ---- selections (picklable: they run in tasks)

def select_searched(store, i: int) -> np.ndarray:
    from scanner.corpus.rows import masks

    return masks(store, i)["searched"]


def _units_of(store, i: int):
    from scanner.corpus.rows import read_shard_file

    return read_shard_file(store, "units", i, ["gid", "unit", "byte_copy"])


def select_index(store, i: int) -> np.ndarray:
    """Searched rows minus the members of a unit of copies that are not its kept one."""
    m = select_searched(store, i)
    u = _units_of(store, i)
    if u is not None:
        drop = u["gid"].to_numpy()[u["gid"].to_numpy() != u["unit"].to_numpy()] - store.offsets[i]
        m[drop] = False
    return m


def select_askers(store, i: int) -> np.ndarray:
    """Searched rows minus byte copies (they have their original's embedding), of the shards that ask."""
    if not store.asks[i]:
        return np.zeros(int(store.sizes[i]), bool)
    m = select_searched(store, i)
    u = _units_of(store, i)
    if u is not None:
        m[u["gid"].to_numpy()[u["byte_copy"].to_numpy()] - store.offsets[i]] = False
    return m


# ---- node attributes, read per shard

def _attrs(store, b: dict) -> dict:
    """(gid, pixels, key) of the nodes of this batch (any shards), plus its other columns."""
    order = np.argsort(np.asarray(b["gid"]), kind="stable")
    cols = {k: np.asarray(v)[order] for k, v in b.items()}
    g = cols["gid"]
    sh = store.shard_of(g)
    keys = np.empty(len(g), object)
    pixels = np.zeros(len(g), np.int64)
    phash = np.zeros(len(g), np.int64)
    for s in np.unique(sh):
        m = sh == s
        df = store.read(int(s), ["key", "width", "height", "phash"])
        rows = g[m] - store.offsets[s]
        keys[m] = df["key"].to_numpy(dtype=object)[rows]
        w, h = (df[c].fillna(0).to_numpy(np.int64)[rows] for c in ("width", "height"))
        pixels[m] = np.maximum(w, 0) * np.maximum(h, 0)
        phash[m] = pd_int(df["phash"])[rows]
    return {**{k: v for k, v in cols.items() if k not in ("shard", "node")}, "gid": g, "pixels": pixels, "key": keys,
            "phash": phash, "role": store.role_of(g).astype(np.int8)}


def pd_int(col) -> np.ndarray:
    """An int64 column that may hold nulls (a part file without pHashes): nulls as 0."""
    return col.fillna(0).to_numpy().astype(np.int64)


def with_attrs(ex, comp_t, store, parts: int):
    """comp_t (node, comp) -> (gid, comp, pixels, key), reading each shard's rows in one task."""
    t = ex.map(comp_t, _node_to_gid)
    t = ex.map(t, functools.partial(_add_shard, store))
    return ex.shuffle(t, "shard", parts, functools.partial(_attrs, store))


def _node_to_gid(b: dict) -> dict:
    return {"gid": np.asarray(b["node"], np.int64), "comp": np.asarray(b["comp"], np.int64)}


def _add_shard(store, b: dict) -> dict:
    return {**b, "shard": store.shard_of(np.asarray(b["gid"], np.int64)).astype(np.int64)}


def _rank(pixels: np.ndarray, keys: np.ndarray) -> np.ndarray:
    from scanner.neighbours.dedup import keep_rank

    return keep_rank(list(keys), pixels)


# ---- step `units`

def _solve_units(edges: dict, nodes: dict) -> dict:
    """Per component of copy links: its kept node (largest, then lowest key), and which nodes are byte copies."""
    g, comp = nodes["gid"], nodes["comp"]
    rank = _rank(nodes["pixels"], nodes["key"])
    order = np.lexsort((rank, comp))
    first = np.r_[True, comp[order][1:] != comp[order][:-1]]
    kept_of_comp = dict(zip(comp[order][first].tolist(), g[order][first].tolist()))
    byte_copy = np.isin(g, np.asarray(edges["a"])[np.asarray(edges["kind"]) == BYTES])
    return {"gid": g, "unit": np.array([kept_of_comp[c] for c in comp.tolist()], np.int64), "byte_copy": byte_copy}


def _with_sim(b: dict) -> dict:
    """Links of any step as (a, b, sim, kind, score): a copy link has similarity 1, an embedding link its cosine as
    its score, a checked one the verifier's score."""
    sim = np.asarray(b["sim"], np.float32) if "sim" in b else np.ones(len(b["a"]), np.float32)
    return {"a": np.asarray(b["a"], np.int64), "b": np.asarray(b["b"], np.int64), "sim": sim,
            "kind": np.asarray(b["kind"], np.int8),
            "score": np.asarray(b["score"], np.float32) if "score" in b else sim}


def run_units(ctx) -> dict:
    from scanner.corpus.components import components, edges_with_component, per_component
    from scanner.corpus.executor import parts_for
    from scanner.corpus.rows import write_by_shard

    ex, store, budget = ctx.executor, ctx.store, ctx.cfg.corpus.budget_bytes
    n_edges = int(ctx.info["copies"].get("links", 0))
    old = [e for e in ctx.prior.get("edges", []) if e["folder"].endswith("copies")]  # --against: its copy links
    n_edges += sum(int(e.get("links", 0)) for e in old)
    if not n_edges:
        return {"units": 0, "nodes": 0}
    from scanner.storage import Out

    edges = ex.materialize(ex.union(ex.map(ex.read(ctx.out, ctx.step_dir("copies")), _with_sim),
                                    *[ex.map(ex.read(Out(e["out"]), e["folder"]), functools.partial(_below, int(e["rows"])))
                                      for e in old]))
    parts = parts_for(n_edges * 64, budget)
    comp = ex.materialize(components(ex, edges, parts, n_edges, budget))
    edges_c = edges_with_component(ex, edges, comp, parts, ("a", "b", "sim", "kind", "score"))
    # every component, old ones too: which rows are in the index (select_index) is what recall@k is measured against
    nodes = with_attrs(ex, comp, store, min(len(store), parts))
    units = ex.materialize(per_component(ex, edges_c, nodes, parts, _solve_units))
    written = write_by_shard(ex, units, store, "units", n_edges * 40, budget)
    n_units = sum(int(b["n"].sum()) for b in ex.batches(ex.map(units, _count_kept)))
    return {"nodes": written, "units": n_units}


def _count_kept(b: dict) -> dict:
    return {"n": np.array([int((np.asarray(b["gid"]) == np.asarray(b["unit"])).sum())], np.int64)}


# ---- step `links`

def _link_consumer(thr: float, min_cos: float | None, qg, nbr, s, _rows):
    q = np.broadcast_to(np.asarray(qg)[:, None], nbr.shape)
    real = (nbr >= 0) & (nbr != q)
    ok = (s >= thr) & real
    a, b, sim, kind = [q[ok]], [nbr[ok]], [s[ok]], [np.full(int(ok.sum()), EMBEDDING, np.int8)]
    if min_cos is not None:
        near = (s >= min_cos) & ~ok & real
        a.append(q[near])
        b.append(nbr[near])
        sim.append(s[near])
        kind.append(np.full(int(near.sum()), CANDIDATE, np.int8))
    a, b = np.concatenate(a), np.concatenate(b)
    if not len(a):
        return None
    lo, hi = np.minimum(a, b), np.maximum(a, b)  # a pair once, whichever end found the other
    return {"a": lo.astype(np.int64), "b": hi.astype(np.int64), "sim": np.concatenate(sim).astype(np.float32),
            "kind": np.concatenate(kind)}


def _dedupe_links(b: dict) -> dict:
    """One row per (a, b): an embedding link over a candidate, the highest similarity."""
    a, c, s, k = (np.asarray(b[x]) for x in ("a", "b", "sim", "kind"))
    o = np.lexsort((-s, k, c, a))
    a, c, s, k = a[o], c[o], s[o], k[o]
    first = np.r_[True, (a[1:] != a[:-1]) | (c[1:] != c[:-1])]
    return {"a": a[first], "b": c[first], "sim": s[first], "kind": k[first]}


def run_links(ctx) -> dict:
    from scanner.corpus.executor import parts_for
    from scanner.corpus.search import count_rows, make_plan, search, search_knobs

    ex, store, n_cfg, budget = ctx.executor, ctx.store, ctx.cfg.neighbours, ctx.cfg.corpus.budget_bytes
    dim = store.dim("embeddings")
    index = functools.partial(select_index, store)
    n = int(count_rows(store, "embeddings", index).sum()) if ex.kind == "local" else _count(ex, store, index)
    want_align = n_cfg.align_size > 0 and n_cfg.align_min_cosine < n_cfg.dup_threshold
    consumer = functools.partial(_link_consumer, n_cfg.dup_threshold, n_cfg.align_min_cosine if want_align else None)
    plan = make_plan(n, dim or 1, min(n_cfg.k + 1, max(n, 1)), "ip", search_knobs(ctx.cfg), budget)
    reuse = ctx.prior.get("index")  # --against a scan that kept its lists: only the new rows are assigned
    keep = (ctx.out, INDEX_DIR) if ctx.cfg.corpus.keep_index else None
    t, info = search(store, "embeddings", index, plan, consumer, ex, seed=ctx.cfg.seed,
                     recall_sample=n_cfg.recall_sample, log=LOG.info, budget_bytes=budget,
                     queries=functools.partial(select_askers, store),
                     side=(ctx.out, f"{ctx.step_dir('links')}/_recall"), keep=keep, reuse=reuse)
    t = ex.shuffle(t, "a", parts_for(n * 4 * 24, budget), _dedupe_links) if t is not None else None
    t = ex.materialize(t)
    rows = ex.write(t, ctx.out, ctx.step_dir("links"))
    counts = {EMBEDDING: 0, CANDIDATE: 0}
    for b in ex.batches(ex.map(t, _kind_counts) if t is not None else None):
        for k, c in zip(b["kind"], b["n"]):
            counts[int(k)] = counts.get(int(k), 0) + int(c)
    return {"index": info, "searched": n, "dim": dim, "rows": rows, "embedding": counts[EMBEDDING],
            "candidates": counts[CANDIDATE]}


def _kind_counts(b: dict) -> dict:
    k, c = np.unique(np.asarray(b["kind"]), return_counts=True)
    return {"kind": k.astype(np.int8), "n": c.astype(np.int64)}


def _count(ex, store, select) -> int:
    from scanner.corpus.executor import concat
    from scanner.corpus.search import _count_map

    c = concat(ex.batches(ex.from_items(functools.partial(_count_map, store, "embeddings", select),
                                        range(len(store)))))
    return int(c["n"].sum()) if c else 0


# ---- step `aligned`

def _aligned_reduce(store, n_cfg, b: dict) -> dict | None:
    """The candidates whose thumbnails pass neighbours.verifier's check: "affine", the verifier's score >=
    verify_min_score (verify.verify_pairs) and both thumbnails' detail >= verify_min_detail (verify.detail); "shift",
    agreement within align_max_rmse at some shift and better than a flat image would (align.aligned_match). Each
    kept pair's score: the verifier's (the cosine for "shift")."""
    from scanner.neighbours.align import aligned_match
    from scanner.neighbours.verify import detail, verify_pairs

    kind = np.asarray(b["kind"])
    m = kind == CANDIDATE
    a, c, s = np.asarray(b["a"])[m], np.asarray(b["b"])[m], np.asarray(b["sim"])[m]
    have = np.array([store.has_array("thumbs", i) for i in range(len(store))], bool)
    keep = have[store.shard_of(a)] & have[store.shard_of(c)] if len(a) else np.zeros(0, bool)
    a, c, s = a[keep], c[keep], s[keep]
    ok = np.zeros(len(a), bool)
    v = s.astype(np.float32).copy()
    size = n_cfg.align_size
    for lo in range(0, len(a), ALIGN_BATCH):
        ta = store.gather("thumbs", a[lo:lo + ALIGN_BATCH], dtype=np.uint8)
        tb = store.gather("thumbs", c[lo:lo + ALIGN_BATCH], dtype=np.uint8)
        if n_cfg.verifier == "affine":
            v[lo:lo + ALIGN_BATCH] = verify_pairs(ta, tb, size, device="auto")[0]
            rich = np.minimum(detail(ta, size), detail(tb, size)) >= n_cfg.verify_min_detail
            ok[lo:lo + ALIGN_BATCH] = (v[lo:lo + ALIGN_BATCH] >= n_cfg.verify_min_score) & rich
        else:
            ok[lo:lo + ALIGN_BATCH] = aligned_match(ta, tb, size, n_cfg.align_max_shift, n_cfg.align_max_rmse)
    return {"a": a[ok], "b": c[ok], "sim": s[ok], "kind": np.full(int(ok.sum()), ALIGNED, np.int8),
            "score": v[ok], "checked": np.full(int(ok.sum()), len(a), np.int64)}


def _candidates(b: dict) -> dict | None:
    m = np.asarray(b["kind"]) == CANDIDATE
    return {k: np.asarray(v)[m] for k, v in b.items()} if m.any() else None


def run_aligned(ctx) -> dict:
    from scanner.corpus.executor import parts_for

    ex, store, n_cfg = ctx.executor, ctx.store, ctx.cfg.neighbours
    cand = ex.materialize(ex.map(ex.read(ctx.out, ctx.step_dir("links")), _candidates))
    n = ex.count(cand)
    if not n:
        return {"checked": 0, "linked": 0}
    missing = sum(not store.has_array("thumbs", i) for i in range(len(store)))
    if missing:
        LOG.warning(f"neighbours: {missing} of {len(store)} shards have no thumbs/ file: their rows' candidates "
                    "below dup_threshold are not checked on pixels")
    t = ex.shuffle(cand, "a", parts_for(n * 2 * n_cfg.align_size ** 2 * 3, ctx.cfg.corpus.budget_bytes),
                   functools.partial(_aligned_reduce, store, n_cfg))
    t = ex.materialize(ex.map(t, _drop_checked))
    linked = ex.write(t, ctx.out, ctx.step_dir("aligned"))
    return {"checked": n, "linked": linked, "link": "verified" if n_cfg.verifier == "affine" else "aligned"}


def _drop_checked(b: dict) -> dict:
    return {k: v for k, v in b.items() if k != "checked"}


# ---- step `groups`

def _solve_groups(rest: str, table, keep_old: bool, edges: dict, nodes: dict) -> dict:
    """Units and one-per-ball groups of whole components: (gid, key, group_id, kept, keep, link, score, precision,
    copy_group, kept_key, kept_role) per member. rest: what a checked candidate's link is called (verified, aligned);
    table: the calibration table that applies (scanner.neighbours.calibrated; None: no precision).

    The groups are the same whatever the scans' order (scan A then B --against A, or A and B at once): they depend
    on the links and the keep rank (pixels, key) alone. Only which member is kept may differ: a reference image
    always, else (keep_old) an old scan's image, is kept over this scan's (the best of them by the keep rule)."""
    from scanner.neighbours.calibrated import precision_of
    from scanner.neighbours.dedup import copy_units, leader_groups, link_names, member_links
    from scanner.neighbours.phash import _popcount

    g = np.asarray(nodes["gid"], np.int64)
    order = np.argsort(g)
    g, pixels, keys = g[order], np.asarray(nodes["pixels"])[order], np.asarray(nodes["key"], dtype=object)[order]
    phash = np.asarray(nodes["phash"], np.int64)[order]
    role = np.asarray(nodes["role"], np.int8)[order]
    a, b = np.searchsorted(g, np.asarray(edges["a"], np.int64)), np.searchsorted(g, np.asarray(edges["b"], np.int64))
    kind, sims = np.asarray(edges["kind"]), np.asarray(edges["sim"], np.float32)
    escore = np.asarray(edges["score"], np.float32)
    copy = (kind == BYTES) | (kind == PHASH)
    rank = _rank(pixels, keys)
    unit, kept = copy_units(len(g), np.column_stack([a[copy], b[copy]]), rank)
    emb = ~copy
    ei = np.column_stack([a[emb], b[emb]])
    cross = unit[ei[:, 0]] != unit[ei[:, 1]]  # a pHash copy finding its own unit's kept member is no link
    group = leader_groups(unit, kept, rank, ei[cross], sims[emb][cross], pixels)
    ek = kind[emb][cross]
    link = link_names(len(g), np.column_stack([a[kind == BYTES], b[kind == BYTES]]),
                      np.column_stack([a[kind == PHASH], b[kind == PHASH]]), ei[cross][ek == EMBEDDING], rest=rest)
    # each member's link score: the edge that joined its unit to the centre (dedup.member_links); a copy of the
    # centre's own unit scores 1 (bytes) or 1 - Hamming bits / 64 to its unit's kept member (phash)
    names = np.where(ek == EMBEDDING, "embedding", rest).astype(object)
    lkind, score = member_links(unit, group, ei[cross], escore[emb][cross], names)
    own = (group >= 0) & (unit == group)
    lkind[own & (link == "bytes")], score[own & (link == "bytes")] = "bytes", 1.0
    ph = np.flatnonzero(own & (link == "phash"))
    if len(ph):
        lkind[ph] = "phash"
        score[ph] = 1 - _popcount(phash[ph].view(np.uint64) ^ phash[kept[unit[ph]]].view(np.uint64)).astype(
            np.float32) / 64
    precision = precision_of(table, lkind, score)
    members = np.flatnonzero(group >= 0)
    kept_node = kept[group[members]]
    if (role != NEW).any():  # priority: reference, then old (keep_old), then the keep rule
        from scanner.corpus.store import OLD, REFERENCE

        prio = np.where(role == REFERENCE, 0, np.where((role == OLD) & keep_old, 1, 2))
        o = np.lexsort((rank[members], prio[members], group[members]))
        gm = group[members][o]
        first = np.r_[True, gm[1:] != gm[:-1]]
        best = dict(zip(gm[first].tolist(), members[o][first].tolist()))
        kept_node = np.array([best[x] for x in group[members].tolist()], np.int64)
    # a group that holds byte-identical images is a group of copies for certain (DD-Mem at any scale)
    byte_groups = np.unique(group[np.flatnonzero(link == "bytes")])
    copy_group = np.isin(group[members], byte_groups[byte_groups >= 0])
    keep = kept_node == members
    return {"gid": g[members], "key": keys[members], "group_id": g[kept_node], "kept": g[kept_node], "keep": keep,
            "kept_key": keys[kept_node], "kept_role": role[kept_node],
            "link": link[members].astype(object), "copy_group": copy_group,
            "score": np.where(keep, np.nan, score[members]).astype(np.float32),
            "precision": np.where(keep, np.nan, precision[members]).astype(np.float32)}


def _emb_map(store, which: str, b: dict) -> dict:
    """Attach the embedding of column `which` (gid or kept) to every row, reading each shard once."""
    ids = np.asarray(b[which], np.int64)
    vec = store.gather("embeddings", ids)
    return {**b, f"v_{which}": vec}


def _similarity(b: dict) -> dict:
    s = np.einsum("ij,ij->i", np.asarray(b["v_gid"], np.float32), np.asarray(b["v_kept"], np.float32))
    keep = np.asarray(b["keep"], bool)
    out = {k: np.asarray(v) for k, v in b.items() if not k.startswith("v_")}
    out["similarity"] = np.where(keep, 1.0, np.minimum(s, 1.0)).astype(np.float32)
    return out


def _shard_key(store, which: str, b: dict) -> dict:
    return {**b, "shard": store.shard_of(np.asarray(b[which], np.int64)).astype(np.int64)}


def run_groups(ctx) -> dict:
    from scanner.corpus.components import components, edges_with_component, per_component
    from scanner.corpus.executor import parts_for
    from scanner.corpus.rows import write_by_shard

    ex, store, budget = ctx.executor, ctx.store, ctx.cfg.corpus.budget_bytes
    parts_in = [ex.map(ex.read(ctx.out, ctx.step_dir(s)), _with_sim) for s in ("copies", "links", "aligned")
                if ctx.has(s)]
    n_edges = (int(ctx.info.get("copies", {}).get("links", 0)) + int(ctx.info.get("links", {}).get("embedding", 0))
               + int(ctx.info.get("aligned", {}).get("linked", 0)))
    # --against: the old scan's embedding and checked links, where it wrote them (its gids are the first of ours)
    for e in ctx.prior.get("edges", []):
        from scanner.storage import Out

        parts_in.append(ex.map(ex.read(Out(e["out"]), e["folder"]), functools.partial(_below, int(e["rows"]))))
        n_edges += int(e.get("links", 0))
    if not n_edges:
        return {"groups": 0, "members": 0}
    edges = ex.materialize(ex.map(ex.union(*[p for p in parts_in if p is not None]), _no_candidates))
    parts = parts_for(n_edges * 64, budget)
    comp = ex.materialize(components(ex, edges, parts, n_edges, budget))
    edges_c = edges_with_component(ex, edges, comp, parts, ("a", "b", "sim", "kind", "score"))
    old_rows = None
    if ctx.prior.get("old_groups"):  # --against: only the components with a new row are solved again; the others
        comp, edges_c, nodes_in = _touched_only(ex, store, comp, edges_c)  # are the old scan's groups as it wrote them
        old_rows = ex.from_items(functools.partial(_old_groups, store, ctx.prior["old_groups"], nodes_in),
                                 [i for i in range(len(store)) if not store.asks[i] and store.roles[i] != REFERENCE_ROLE])
    nodes = with_attrs(ex, comp, store, min(len(store), parts))
    from scanner.neighbours.calibrated import load_table

    n_cfg = ctx.cfg.neighbours
    rest = "verified" if n_cfg.verifier == "affine" else "aligned"
    table, why = load_table(ctx.embedder, n_cfg)
    keep_old = ctx.cfg.incremental.keep_old
    members = per_component(ex, edges_c, nodes, parts, functools.partial(_solve_groups, rest, table, keep_old))
    # each member's cosine to its kept image: both embeddings read where their shards are
    dim = store.dim("embeddings") or 1
    sp = min(len(store), parts_for(n_edges * 8 * dim, budget))
    members = ex.shuffle(ex.map(members, functools.partial(_shard_key, store, "kept")), "shard", sp,
                         functools.partial(_emb_map, store, "kept"))
    members = ex.shuffle(ex.map(members, functools.partial(_shard_key, store, "gid")), "shard", sp,
                         functools.partial(_emb_map, store, "gid"))
    members = ex.materialize(ex.union(ex.map(ex.map(members, _similarity), _group_cols), old_rows))
    written = write_by_shard(ex, ex.map(members, _group_cols), store, "groups", n_edges * 80, budget)
    stats = {"groups": 0, "largest": 0, "min_similarity_to_kept": None,
             "min_similarity_to_kept_embedding_links": None, "by_link": {}}
    sizes: dict[int, int] = {}
    for b in ex.batches(members):
        for gid_, c in zip(*np.unique(np.asarray(b["group_id"]), return_counts=True)):
            sizes[int(gid_)] = sizes.get(int(gid_), 0) + int(c)
        sim, keep, link = np.asarray(b["similarity"]), np.asarray(b["keep"], bool), np.asarray(b["link"])
        for name in np.unique(link):
            stats["by_link"][str(name)] = stats["by_link"].get(str(name), 0) + int((link == name).sum())
        if len(sim):
            m = float(sim.min())
            stats["min_similarity_to_kept"] = min(m, stats["min_similarity_to_kept"] or 2.0)
        emb = ~keep & (link == "embedding")
        if emb.any():
            m = float(sim[emb].min())
            stats["min_similarity_to_kept_embedding_links"] = min(
                m, stats["min_similarity_to_kept_embedding_links"] or 2.0)
    stats["groups"], stats["largest"] = len(sizes), max(sizes.values(), default=0)
    stats["calibration"] = {"table": "scanner/neighbours/shipped/calibration.json" if table else None,
                            "applies": table is not None, "why_not": why or None,
                            "measured_on": (table or {}).get("measured_on")}
    return {**stats, "members": written}


def _below(rows: int, b: dict) -> dict | None:
    """An old scan's links among its own corpus rows (gid < rows: not its reference set's), as _with_sim's."""
    b = _with_sim(b)
    m = (b["a"] < rows) & (b["b"] < rows)
    return {k: v[m] for k, v in b.items()} if m.any() else None


def _touched_only(ex, store, comp, edges_c):
    """The components that hold a row of a shard that asks (this scan's): (their nodes, their edges, the sorted gids
    of those nodes)."""
    from scanner.corpus.executor import concat

    got = concat(ex.batches(ex.map(comp, functools.partial(_asking_comps, store))))
    touched = np.unique(np.asarray(got["comp"], np.int64)) if got else np.zeros(0, np.int64)
    comp = ex.materialize(ex.map(comp, functools.partial(_in_comps, touched, "comp")))
    edges_c = ex.map(edges_c, functools.partial(_in_comps, touched, "comp"))
    got = concat(ex.batches(ex.map(comp, _node_col)))
    nodes = np.unique(np.asarray(got["node"], np.int64)) if got else np.zeros(0, np.int64)
    return comp, edges_c, nodes


def _asking_comps(store, b: dict) -> dict:
    g = np.asarray(b["node"], np.int64)
    return {"comp": np.unique(np.asarray(b["comp"], np.int64)[store.asks[store.shard_of(g)]])}


def _in_comps(comps: np.ndarray, col: str, b: dict) -> dict:
    from scanner.corpus.rows import member

    m = member(comps, np.asarray(b[col], np.int64))
    return {k: np.asarray(v)[m] for k, v in b.items()}


def _node_col(b: dict) -> dict:
    return {"node": np.asarray(b["node"], np.int64)}


def _old_groups(store, old: dict, touched_nodes: np.ndarray, i: int) -> dict | None:
    """The old scan's group rows of shard i (its corpus/groups file), but for the rows of components this scan
    solved again, and for groups kept by one of its reference images (not read here)."""
    from scanner.corpus.rows import member
    from scanner.storage import Out

    label = old["labels"].get(f"{store.source[i]}|{store.files[i]}")
    src = Out(old["out"])
    rel = f"corpus/groups/{label}.parquet"
    if label is None or not src.exists(rel):
        return None
    df = src.read_parquet(rel)
    g = df["gid"].to_numpy(np.int64)
    keep = ~member(touched_nodes, g) & (df["group_id"].to_numpy(np.int64) < int(old["rows"]))
    df = df[keep].assign(kept_role=OLD_ROLE)  # its kept rows are old ones here, whatever they were there
    if not len(df):
        return None
    return {c: df[c].to_numpy(dtype=t) for c, t in GROUP_COLS.items()}


def _no_candidates(b: dict) -> dict | None:
    m = np.asarray(b["kind"]) != CANDIDATE
    return {k: np.asarray(v)[m] for k, v in b.items()} if m.any() else None


GROUP_COLS = {"gid": np.int64, "key": object, "group_id": np.int64, "similarity": np.float32, "keep": bool,
              "link": object, "copy_group": bool, "score": np.float32, "precision": np.float32, "kept_key": object,
              "kept_role": np.int8}  # corpus/groups/NAME.parquet


def _group_cols(b: dict) -> dict:
    return {c: np.asarray(b[c], dtype=t) for c, t in GROUP_COLS.items()}
