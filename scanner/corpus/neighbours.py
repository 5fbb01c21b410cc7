"""The neighbours half of the corpus steps: duplicate groups and replications, out of core.

1. copies: byte hashes, then pHash near-copies among one row per byte hash (scanner.corpus.groups);
   their connected components are units, each represented by its kept member;
2. embedding links: k nearest unit representatives of every row of distinct bytes (scanner.corpus.search), cosine >=
   neighbours.dup_threshold; neighbours just below it (>= align_min_cosine) are linked when their stored
   thumbnails agree at a small shift (scanner.neighbours.align: link "aligned");
3. groups that do not chain (scanner.neighbours.dedup.leader_groups) over the rows that have a link;
4. with a model: generations from training captions, each matched exactly against every embedded row.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from scanner.corpus.groups import byte_copies, phash_links
from scanner.corpus.search import count_rows, exact_neighbours, make_plan, search, search_knobs
from scanner.corpus.store import PartStore
from scanner.neighbours.dedup import (
    GROUP_RULE,
    KEEP_RULE,
    copy_units,
    group_table,
    keep_rank,
    leader_groups,
    link_names,
)
from scanner.procfs import memory_mb

LOG = logging.getLogger("memscan")
SIM_BATCH = 65536  # group members whose similarity to the kept image is computed at once


def _node_rank(store: PartStore, nodes: np.ndarray):
    """(keys as a pyarrow string array, keep-rule rank, pixel counts) of the sorted gids `nodes`."""
    keys, pixels = store.gather_keys(nodes)
    return keys, keep_rank(keys, pixels), pixels


def corpus_neighbours(store: PartStore, searched, cfg, checkpoint: str, trained: bool, out: Path, work: Path,
                      model_dir: str | None = None) -> tuple[dict, pd.DataFrame, pd.DataFrame | None]:
    """Duplicate groups (and replications when `model_dir` is given and neighbours.generations > 0).

    searched: Select of the rows duplicate search runs on. Returns (the summary's `neighbours` part,
    duplicates with a `gid` column, replications or None).
    """
    n_cfg, budget = cfg.neighbours, cfg.corpus.budget_bytes
    t0 = time.time()
    bytes_e = byte_copies(store, searched, work, budget)
    copies = np.unique(bytes_e[:, 0])
    phash_e = np.zeros((0, 2), np.int64)
    if n_cfg.phash_max_dist >= 0 and "phash" in store.columns:
        phash_e = phash_links(store, _minus(store, searched, copies), n_cfg.phash_max_dist, work, budget)
    copy_e = np.concatenate([bytes_e, phash_e])
    nodes = np.unique(copy_e)
    _, rank, _ = _node_rank(store, nodes)
    unit, kept = copy_units(len(nodes), np.searchsorted(nodes, copy_e), rank)
    not_kept = np.ones(len(nodes), bool)
    not_kept[kept] = False
    excluded = nodes[not_kept]  # copies of a unit's kept member: not in the index, found through it
    t_copies = time.time() - t0
    mem = {"copies": memory_mb()}

    # embedding links: every row of distinct bytes asks for its neighbours among the units' kept members. A
    # byte copy has its original's embedding; a pHash copy has its own, and its own neighbours (a shifted copy
    # may be near the original and not near the re-encode the keep rule keeps), but is not itself in the index,
    # so a unit of many copies does not fill its members' k neighbours with each other
    select = _minus(store, searched, excluded)
    askers = _minus(store, searched, copies)
    n = int(count_rows(store, "embeddings", select).sum())
    dim = store.dim("embeddings")
    edges: list[np.ndarray] = []
    sims: list[np.ndarray] = []
    want_align = n_cfg.align_size > 0 and n_cfg.align_min_cosine < n_cfg.dup_threshold
    thumbs = np.array([want_align and store.has_array("thumbs", i) for i in range(len(store))], bool)
    align = bool(thumbs.any())
    if want_align and not thumbs.all():
        LOG.warning(f"neighbours: {int((~thumbs).sum())} of {len(thumbs)} shards have no thumbs/ file: their rows' "
                    "candidates below dup_threshold are not checked on pixels")
    cand: list[np.ndarray] = []
    cand_s: list[np.ndarray] = []

    def consume(qg, nbr, s, _rows):
        q = np.broadcast_to(qg[:, None], nbr.shape)
        real = (nbr >= 0) & (nbr != q)
        ok = (s >= n_cfg.dup_threshold) & real
        if ok.any():
            edges.append(np.stack([q[ok], nbr[ok]], axis=1))
            sims.append(s[ok].astype(np.float32))
        if align:
            near = (s >= n_cfg.align_min_cosine) & ~ok & real
            if near.any():
                cand.append(np.stack([q[near], nbr[near]], axis=1))
                cand_s.append(s[near].astype(np.float32))

    plan = make_plan(n, dim, min(n_cfg.k + 1, max(n, 1)), "ip", search_knobs(cfg), budget)
    index_info = search(store, "embeddings", select, plan, consume, work, seed=cfg.seed,
                        recall_sample=n_cfg.recall_sample, log=LOG.info, budget_bytes=budget, queries=askers)
    emb_e = np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)
    emb_s = np.concatenate(sims) if sims else np.zeros(0, np.float32)
    align_e, checked = np.zeros((0, 2), np.int64), 0
    if align:
        align_e, align_s, checked = _aligned_links(store, cand, cand_s, n_cfg, thumbs)
        emb_e, emb_s = np.concatenate([emb_e, align_e]), np.concatenate([emb_s, align_s])
    t_search = time.time() - t0 - t_copies
    mem["search"] = memory_mb()

    # groups over every row with a link
    nodes = np.unique(np.concatenate([copy_e.ravel(), emb_e.ravel()]))
    keys, rank, pixels = _node_rank(store, nodes)
    unit, kept = copy_units(len(nodes), np.searchsorted(nodes, copy_e), rank)
    ei = np.searchsorted(nodes, emb_e)
    cross = unit[ei[:, 0]] != unit[ei[:, 1]]  # a pHash copy finding its own unit's kept member is no link
    n_align = int(cross[len(emb_e) - len(align_e):].sum())
    emb_e, emb_s, ei = emb_e[cross], emb_s[cross], ei[cross]
    n_emb = len(emb_e) - n_align
    group = leader_groups(unit, kept, rank, ei, emb_s, pixels)
    sim = np.ones(len(nodes), np.float32)
    members = np.flatnonzero(group >= 0)
    for s in range(0, len(members), SIM_BATCH):
        m = members[s:s + SIM_BATCH]
        k = kept[group[m]]
        a = store.gather("embeddings", nodes[m])
        b = store.gather("embeddings", nodes[k])
        sim[m] = np.einsum("ij,ij->i", a, b)
    link = link_names(len(nodes), np.searchsorted(nodes, bytes_e), np.searchsorted(nodes, phash_e),
                      ei[:n_emb])
    dups = group_table(keys, group, kept, sim, link, ids=nodes)
    emb_members = dups[~dups["keep"] & (dups["link"] == "embedding")]
    t_groups = time.time() - t0 - t_copies - t_search
    mem["groups"] = memory_mb()

    reps, rep_error, embedder = None, None, None
    if model_dir and n_cfg.generations > 0:
        from scanner.neighbours.embed import load_embedder

        embedder = load_embedder(dataclasses.replace(n_cfg, clip_checkpoint=checkpoint))
        try:
            reps = replications(store, searched, model_dir, embedder, cfg, out)
        except Exception as e:  # noqa: BLE001 - a failed generation check must not cost the scan's other tables
            rep_error = f"{type(e).__name__}: {e}"
            LOG.error("replications: the generation check failed (%s); every other table is written, and "
                      "summary.json says so", rep_error)
    summary = {
        "thresholds": {"dup_threshold": n_cfg.dup_threshold, "phash_max_dist": n_cfg.phash_max_dist,
                       "keep_rule": KEEP_RULE, "group_rule": GROUP_RULE,
                       "aligned": {k: getattr(n_cfg, k) for k in ("align_size", "align_min_cosine",
                                                                   "align_max_rmse", "align_max_shift")}
                       if align else None},
        "embedder": {"checkpoint": checkpoint, "architecture": embedder.name if embedder else n_cfg.clip_model,
                     "dim": dim, "image_size": n_cfg.image_size,
                     "trained_on_this_corpus": trained or checkpoint == store.out.uri("embedder")},
        "index": index_info,
        "links": {"bytes": len(bytes_e), "phash": len(phash_e), "embedding": n_emb, "aligned": n_align},
        "aligned_candidates": {"checked": checked, "linked": n_align} if align else None,
        "members_by_link": dups["link"].value_counts().to_dict(),
        "groups": {
            "count": int(dups["group_id"].nunique()) if len(dups) else 0,
            "largest": int(dups.groupby("group_id").size().max()) if len(dups) else 0,
            "min_similarity_to_kept": float(dups["similarity"].min()) if len(dups) else None,
            "min_similarity_to_kept_embedding_links": (float(emb_members["similarity"].min())
                                                      if len(emb_members) else None)},
        "replications": {"error": rep_error} if rep_error else None if reps is None else {
            "generations": int(n_cfg.generations), "threshold": n_cfg.rep_threshold,
            "replicated": int(reps["replicated"].sum()), "rate": float(reps["replicated"].mean()) if len(reps) else 0.0,
            "distinct_training_images": int(reps.loc[reps["replicated"], "matched_key"].nunique())},
        "memory_mb": mem,
        "timings_s": {"copies": round(t_copies, 1), "search": round(t_search, 1), "groups": round(t_groups, 1),
                      "replications": round(time.time() - t0 - t_copies - t_search - t_groups, 1)},
    }
    LOG.info(f"neighbours: {summary['groups']['count']} duplicate groups over {n} searched images "
             f"({len(bytes_e)} byte, {len(phash_e)} pHash, {n_emb} embedding, {n_align} aligned links)")
    return summary, dups, reps


ALIGN_BATCH = 8192  # candidate pairs gathered and compared at once: 2 x 8192 x 3 KB thumbnails = 50 MB at 32 px


def _aligned_links(store: PartStore, cand: list[np.ndarray], cand_s: list[np.ndarray], n_cfg, thumbs: np.ndarray):
    """The candidate pairs (cosine in [align_min_cosine, dup_threshold)) whose thumbnails agree within
    align_max_rmse at some shift and better than a flat image would (align.aligned_match): (E, 2) gids, (E,)
    cosines, and how many pairs were checked. thumbs: which shards have a thumbs/ file (pairs with an end
    elsewhere are not checked)."""
    from scanner.neighbours.align import aligned_match

    e = np.concatenate(cand) if cand else np.zeros((0, 2), np.int64)
    s = np.concatenate(cand_s) if cand_s else np.zeros(0, np.float32)
    e = np.sort(e, axis=1)  # each pair once, whichever end found the other
    e, first = np.unique(e, axis=0, return_index=True)
    s = s[first]
    have = thumbs[store.shard_of(e[:, 0])] & thumbs[store.shard_of(e[:, 1])] if len(e) else np.zeros(0, bool)
    e, s = e[have], s[have]
    ok = np.zeros(len(e), bool)
    for b in range(0, len(e), ALIGN_BATCH):
        pair = e[b:b + ALIGN_BATCH]
        ta = store.gather("thumbs", pair[:, 0], dtype=np.uint8)
        tb = store.gather("thumbs", pair[:, 1], dtype=np.uint8)
        ok[b:b + ALIGN_BATCH] = aligned_match(ta, tb, n_cfg.align_size, n_cfg.align_max_shift, n_cfg.align_max_rmse)
    return e[ok], s[ok], len(e)


def _minus(store: PartStore, select, gids: np.ndarray):
    """select minus the sorted gids."""
    def f(i: int) -> np.ndarray:
        m = np.array(select(i), dtype=bool)
        lo, hi = np.searchsorted(gids, store.offsets[i:i + 2])
        m[gids[lo:hi] - store.offsets[i]] = False
        return m
    return f


class StreamedIndex:
    """What scanner.neighbours.replicate.find_replications asks of an index: search(queries, k), exact, over
    the selected embedded rows, streamed shard by shard. Ids are gids."""

    def __init__(self, store: PartStore, select, block: int = 65536):
        self.store, self.select, self.block = store, select, block

    def search(self, q: np.ndarray, k: int):
        q = np.ascontiguousarray(q, dtype=np.float32)
        return exact_neighbours(self.store, "embeddings", self.select, (None, q), k, "ip", self.block)


class KeysById:
    """gid -> key, read from the part files when asked (a handful of matched generations)."""

    def __init__(self, store: PartStore):
        self.store = store

    def __getitem__(self, gid) -> str:
        return self.store.gather_columns(np.array([int(gid)]), ["key"])["key"].iloc[0]


def replications(store: PartStore, searched, model_dir, embedder, cfg, out_dir=None) -> pd.DataFrame:
    """Generate neighbours.generations images with the scanned model, match each to its nearest training image
    (exact search over every embedded row). Captions for a text-conditional model: the training captions in
    row order (the i-th generation uses caption i mod N, seed = cfg.seed + i), read from the first shards."""
    from scanner.neighbours.replicate import find_replications, generate_samples

    n_cfg = cfg.neighbours
    captions: list[str] = []
    for i in range(len(store)):
        if len(captions) >= n_cfg.generations or "caption" not in store.columns:
            break
        df = store.read(i, ["caption"])
        # a sample without a .txt reads back as None or NaN: neither is a prompt
        captions += [c for c in df["caption"][searched(i)].tolist() if isinstance(c, str) and c]
    captions = captions or None
    LOG.info(f"replications: generating {n_cfg.generations} images with {model_dir} ({n_cfg.gen_steps} steps each)")
    images, meta = generate_samples(model_dir, n_cfg.generations, seed=cfg.seed, steps=n_cfg.gen_steps,
                                    captions=captions, allow_pickle=cfg.model.allow_pickle)
    reps = find_replications(embedder.embed(images), meta, StreamedIndex(store, searched), KeysById(store),
                             n_cfg.rep_threshold, keep_all=True)
    if out_dir is not None:  # the report shows each generation beside its match
        import io

        from PIL import Image

        from scanner.storage import Out

        out = out_dir if isinstance(out_dir, Out) else Out(out_dir)
        for img, m in zip(images, meta):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            out.write_bytes(f"replications/gen_{m['gen_id']}.png", buf.getvalue())
    LOG.info(f"replications: {int(reps['replicated'].sum())} of {len(reps)} generations match a training image "
             f"at cosine >= {n_cfg.rep_threshold}")
    return reps
