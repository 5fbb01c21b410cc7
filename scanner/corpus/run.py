"""The corpus steps of a scan: the workflow of named steps after the stages, and the summary they make.

    summary = corpus_steps(cfg, out, shards, embedder=..., embedder_trained=..., executor=None)

    keys -> copies -> units -> links -> aligned -> groups   (duplicates; with an embedder)
         -> lid                                            (LID_*; with a model)
         -> replications                                   (with generations from the generate stage)
         -> cut -> tables -> outputs

Each step is resumable on its own (scanner.corpus.workflow): a job killed inside the corpus steps restarts at the
step that did not finish. Each runs in this process for a small corpus and as Ray tasks above corpus.ray_min_rows
(scanner.corpus.executor). No step reads a shard or loads a model: they read the part files the stages wrote.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from scanner.corpus.store import REFERENCE, ROLES

SHARDS_JSON = "corpus/shards.json"  # the shards the steps read, in gid order: {name, out, role[, file]}
EDGES_JSON = "corpus/edges.json"  # the links the groups were made of (_edges_record)

log = logging.getLogger("memscan")


def work_dir(cfg, out) -> Path:
    """The corpus steps' local work folder: corpus.work_dir, else OUT/corpus-work for a local --out, else a folder
    in the system's temp directory named after the --out (arrays copied from object storage are memory-mapped)."""
    import hashlib
    import tempfile

    if cfg.corpus.work_dir:
        return Path(cfg.corpus.work_dir).expanduser().resolve()
    if out.local:
        return out.local_path("corpus-work")
    return Path(tempfile.gettempdir()) / f"memscan-work-{hashlib.sha256(out.uri().encode()).hexdigest()[:12]}"


def build_steps(cfg, store, embedder: str | None, has_generations: bool) -> list:
    from scanner.corpus.classify import run_cut
    from scanner.corpus.copies import run_copies
    from scanner.corpus.keys import run_keys
    from scanner.corpus.lid import run_lid
    from scanner.corpus.neighbours import run_aligned, run_groups, run_links, run_units
    from scanner.corpus.replications import run_replications
    from scanner.corpus.tables import run_outputs, run_tables
    from scanner.corpus.workflow import Step

    n = "neighbours."
    steps = [Step("keys", ("parts:key",), run_keys)]
    dup = ("keys",)
    if embedder is not None and store.dim("embeddings"):
        steps += [Step("copies", ("parts:sha256,phash", "keys"), run_copies, (n + "phash_max_dist",)),
                  Step("units", ("parts:width,height,key", "copies"), run_units),
                  Step("links", ("parts:embedding", "units"), run_links,
                       tuple(n + k for k in ("dup_threshold", "k", "index", "flat_max", "recall_sample", "align_size",
                                             "align_min_cosine")) + ("corpus.list_size", "corpus.spill", "seed"))]
        dup = ("links",)
        if cfg.neighbours.align_size > 0 and cfg.neighbours.align_min_cosine < cfg.neighbours.dup_threshold:
            steps.append(Step("aligned", ("parts:thumb", "links"), run_aligned,
                              tuple(n + k for k in ("align_max_rmse", "align_max_shift", "verifier", "verify_min_score",
                                                    "verify_min_detail"))))
            dup = ("aligned",)
        steps.append(Step("groups", ("parts:width,height,key,embedding", *dup), run_groups))
        dup = ("groups",)
    after = dup
    if cfg.model.kind != "none" and store.dim("vectors"):
        steps.append(Step("lid", ("parts:vector", "keys"), run_lid,
                          tuple(f"geometry.{k}" for k in ("lpca_k", "lpca_space")) + ("corpus.list_size", "corpus.spill",
                                                                                       "neighbours.flat_max", "seed")))
        after = (*after, "lid")
    if has_generations and embedder is not None and "groups" in [s.name for s in steps]:
        steps.append(Step("replications", ("parts:embedding", "groups"), run_replications, (n + "rep_threshold",)))
        after = (*after, "replications")
    cut_inputs = ("lid",) if "lid" in after else ("keys",)
    steps += [Step("cut", ("parts:detector", *cut_inputs), run_cut,
                   ("classify", "geometry.lpca_scale", "geometry.lpca_alpha", "corpus.detector_sample")),
              Step("tables", ("parts:*", *after, "cut"), run_tables, ("classify", "geometry.lpca_alpha",
                                                                     "geometry.lpca_scale")),
              Step("outputs", ("tables",), run_outputs)]
    return steps


def corpus_steps(cfg, out, shards: list[str], embedder: str | None = None, embedder_trained: bool = False,
                 inside_step=None, prior: dict | None = None) -> dict:
    """Run the corpus steps into `out` (a scanner.storage.Out, path or URL) over the part files of `shards` (their
    names, or local paths). Returns the summary's corpus part. inside_step: see workflow.run_workflow.
    prior: {"order": scanner.preflight.shard_order(...), "olds": [Prior], "refs": [Prior]} for a scan --against finished
    scans or with --reference sets (None: this run's shards alone)."""
    from scanner.corpus.executor import choose
    from scanner.corpus.replications import GENERATIONS
    from scanner.corpus.store import PartStore
    from scanner.corpus.workflow import Context, run_workflow
    from scanner.procfs import memory_mb
    from scanner.storage import Out

    t0 = time.time()
    out = out if isinstance(out, Out) else Out(out)
    work = work_dir(cfg, out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start_mem = memory_mb()
    order = (prior or {}).get("order") or [{"name": os.path.basename(str(n)).removesuffix(".tar"), "out": out.uri(),
                                            "role": "new"} for n in shards]
    store = PartStore(out, [o["name"] for o in order], cache=work / "cache", sources=[o["out"] for o in order],
                      roles=[o["role"] for o in order], files=[o.get("file", o["name"]) for o in order])
    out.write_json(SHARDS_JSON, order)
    ctx_prior = _prior_context(store, prior or {})
    ex = choose(store.n, cfg.corpus.ray_min_rows, cfg.corpus.executor, cfg.corpus.budget_bytes)
    log.info(f"corpus steps: {store.n:,} rows in {len(store):,} shards within corpus.memory_gb = "
             f"{cfg.corpus.memory_gb:g} per task, {'in this process' if ex.kind == 'local' else 'as Ray tasks'}")
    ctx = Context(cfg=cfg, out=out, store=store, work=work, executor=ex, embedder=embedder,
                  embedder_trained=embedder_trained, prior=ctx_prior)
    steps = build_steps(cfg, store, embedder, out.exists(GENERATIONS))
    info = run_workflow(ctx, steps, inside_step=inside_step)
    out.write_json(EDGES_JSON, _edges_record(out, store, ctx_prior, info))
    shutil.rmtree(work, ignore_errors=True)
    summary = summarize(cfg, out, store, info, embedder, embedder_trained, start_mem, t0)
    if prior and (prior.get("olds") or prior.get("refs")):
        summary["against"] = [p.record() for p in prior.get("olds", [])]
        summary["reference"] = [p.record() for p in prior.get("refs", [])]
        summary["corpus"]["rows_by_role"] = {r: int(sum(store.sizes[i] for i in store.shards_of(c)))
                                             for r, c in ROLES.items()}
        summary["corpus"]["asking_rows"] = int(store.sizes[store.asks].sum())
        summary["counts"]["removed_old"] = info["tables"].get("removed_old", 0)
    return summary


def _prior_context(store, prior: dict) -> dict:
    """What the steps take from the scans read with this one: which shards ask the neighbour searches, the first
    --against scan's links (its gids are the first of ours) and cut."""
    from scanner.corpus.store import OLD

    olds = prior.get("olds") or []
    ctx: dict = {}
    if not olds:
        store.asks[:] = store.roles != REFERENCE
        return ctx
    first = olds[0]
    reused = {(s["out"], s["name"]) for s in first.shards}
    store.asks[:] = [(r != REFERENCE) and not (r == OLD and (src, f) in reused)
                     for src, f, r in zip(store.source, store.files, store.roles)]
    from scanner.storage import Out

    o = Out(first.uri)
    ctx["edges"] = o.read_json(EDGES_JSON)
    ctx["repeated"] = (first.uri, int(sum(store.sizes[i] for i in range(len(store)) if not store.asks[i]
                                          and store.roles[i] == OLD)))
    from scanner.corpus.neighbours import INDEX_DIR

    if o.exists(f"{INDEX_DIR}/meta.json"):  # its inverted lists: the new rows are searched against them
        ctx["index"] = o.read_json(f"{INDEX_DIR}/meta.json")
        # and its groups: a component without a new row keeps them (by shard: its label there)
        listed = o.read_json(SHARDS_JSON)
        ctx["old_groups"] = {"out": first.uri, "rows": ctx["repeated"][1],
                             "labels": {f"{x['out']}|{x.get('file', x['name'])}": x["name"] for x in listed}}
    if first.cut is not None:
        ctx["cut"], ctx["cut_from"] = first.cut, first.uri
    return ctx


def _edges_record(out, store, ctx_prior: dict, info: dict) -> list[dict]:
    """corpus/edges.json: the copy, embedding and checked links this scan's groups were made of, where they are (this
    scan's corpus/copies, corpus/links and corpus/aligned, and those its --against scan reused), each valid below
    `rows` (the corpus rows, not a reference set's, of the scan that wrote it). A scan --against this one reuses
    them."""
    rows = int(store.sizes[store.roles != REFERENCE].sum())
    counted = (("copies", "links"), ("links", "embedding"), ("aligned", "linked"))  # step, its count of links
    mine = [{"out": out.uri(), "folder": f"corpus/{step}", "rows": rows, "links": int(info[step].get(n, 0))}
            for step, n in counted if step in info]
    return list(ctx_prior.get("edges", [])) + mine


def summarize(cfg, out, store, info: dict, embedder, embedder_trained, start_mem, t0) -> dict:
    """summary.json's corpus part from the steps' records (this run's or the recorded ones)."""
    from scanner.procfs import memory_mb

    tables = info["tables"]
    counts = dict(tables["counts"])
    groups = info.get("groups", {})
    links = info.get("links", {})
    summary: dict = {
        "corpus": {"memory_gb": cfg.corpus.memory_gb, "rows": store.n, "shards": len(store),
                   "executor": info["keys"].get("executor"), "memory_mb": {"start": start_mem, "end": memory_mb()},
                   "steps": {k: {kk: vv for kk, vv in v.items() if kk in ("seconds", "executor", "resumed")}
                             for k, v in info.items()}},
        "timings_s": {k: v.get("seconds") for k, v in info.items()},
        "thresholds": tables["thresholds"],
    }
    n_rep = info["keys"].get("repeated_rows", 0)
    counts.update(embedded=counts.get("embedded", 0) if embedder is not None else 0,
                  duplicate_groups=groups.get("groups", 0),
                  duplicates=(groups.get("members", 0) - groups.get("groups", 0)) if groups else 0,
                  removed=info["outputs"]["removed"], repeated_key_rows=n_rep)
    summary["counts"] = counts
    if embedder is not None:
        from scanner.neighbours.dedup import GROUP_RULE, KEEP_RULE

        n_cfg = cfg.neighbours
        aligned = info.get("aligned")
        rest = "verified" if n_cfg.verifier == "affine" else "aligned"
        summary["neighbours"] = {
            "thresholds": {"dup_threshold": n_cfg.dup_threshold, "phash_max_dist": n_cfg.phash_max_dist,
                           "keep_rule": KEEP_RULE, "group_rule": GROUP_RULE,
                           "aligned": {k: getattr(n_cfg, k) for k in ("align_size", "align_min_cosine", "verifier",
                                                                       "verify_min_score", "verify_min_detail",
                                                                       "align_max_rmse", "align_max_shift")}
                           if aligned is not None else None,
                           "calibration": groups.get("calibration")},
            "embedder": {"checkpoint": embedder, "dim": links.get("dim"), "image_size": n_cfg.image_size,
                         "trained_on_this_corpus": embedder_trained or embedder == out.uri("embedder")},
            "index": links.get("index"),
            "links": {"bytes": info.get("copies", {}).get("bytes", 0), "phash": info.get("copies", {}).get("phash", 0),
                      "embedding": links.get("embedding", 0), rest: (aligned or {}).get("linked", 0)},
            "aligned_candidates": {k: v for k, v in aligned.items() if k in ("checked", "linked")}
            if aligned is not None else None,
            "members_by_link": groups.get("by_link", {}),
            "groups": {"count": groups.get("groups", 0), "largest": groups.get("largest", 0),
                       "min_similarity_to_kept": groups.get("min_similarity_to_kept"),
                       "min_similarity_to_kept_embedding_links": groups.get("min_similarity_to_kept_embedding_links")},
            "replications": {k: v for k, v in info["replications"].items() if k not in ("seconds", "executor")}
            if "replications" in info else None,
        }
        log.info(f"neighbours: {groups.get('groups', 0)} duplicate groups over {counts['embedded']} searched "
                 f"images ({summary['neighbours']['links']['bytes']} byte, {summary['neighbours']['links']['phash']} "
                 f"pHash, {links.get('embedding', 0)} embedding, {(aligned or {}).get('linked', 0)} {rest} links)")
    if "lid" in info:
        summary["local_pca"] = {k: v for k, v in info["lid"].items() if k not in ("seconds", "executor")}
        summary["lpca_neighbours"] = info["lid"].get("space")
    n = counts["seen"]
    se = tables["stage_errors"]
    summary["stages"] = {"read": {"rows_in": n, "rows_out": n, "error_rows": se["read"],
                                  "shard_errors": counts["shard_errors"]}}
    if embedder is not None:
        summary["stages"]["embed"] = {"rows_in": n, "rows_out": n, "error_rows": se["embed"]}
    if cfg.model.kind != "none":
        summary["stages"]["score"] = {"rows_in": n, "rows_out": n, "error_rows": se["score"]}
    summary["timings_s"]["corpus_steps"] = round(time.time() - t0, 1)
    return summary
