"""The scan job: one Ray Data pipeline from shards to part files, then the corpus-wide steps.

    shards ──read (Ray task per shard: each tar opened once, each image decoded once)
           ──► embed (actor: copy-detection embedding + pHash)      when neighbours are on
           ──► score (actor pool: every geometry column)            when a diffusion model is given
           ──► sink (driver: parts/NAME.parquet + vectors/ + embeddings/ + thumbs/ + previews/, per shard)
           ──► corpus steps: duplicate groups, replications, LID_*, the cut, classes, verdicts, every table

The held-out shards of classify.calibration_shards go through the same read and score stages as `heldout` rows
(the detector alone; heldout/NAME.parquet), so the cut is a corpus step that reads part files like the others.
`memscan dedup` is the same pipeline without the score stage. Resume: a shard whose part file exists is done and
is not read again; parts/_run.json records what the parts were made with, and a rerun with another model,
geometry or embedder into the same --out is refused rather than mixed. The stages are in scanner/stages/; this
module wires them (build_steps) and decides nothing about resources (scanner.stages.cluster.plan does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from scanner.config import ScanConfig
from scanner.config import stage_geometry as _stage_geometry
from scanner.data.shards import expand_shards, shard_name
from scanner.errors import ConfigError, ScanIncomplete
from scanner.procfs import machine
from scanner.progress import ShardProgress
from scanner.stages.cluster import plan, start_ray
from scanner.stages.read import ROWS_PER_BATCH
from scanner.storage import Out

log = logging.getLogger("memscan")


def init_ray(cfg: ScanConfig) -> None:
    start_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.dashboard)




def run_manifest(cfg: ScanConfig, embedder: str | None) -> dict:
    """What the part files depend on: a rerun into the same --out must match it (parts/_run.json)."""
    from scanner.neighbours.checkpoint import checkpoint_digest

    m = {"data": {k: getattr(cfg.data, k) for k in ("resolution", "channels", "max_image_pixels")},
         "model": None, "geometry": None,
         # the embedder by its bytes, not its path: a checkpoint moved elsewhere is still the same embedder
         "embedder": {"digest": checkpoint_digest(embedder), "image_size": cfg.neighbours.image_size,
                      "align_size": cfg.neighbours.align_size,
                      **({"flip_invariant": True} if cfg.neighbours.flip_invariant else {})}
         if embedder else None}
    if cfg.model.kind != "none":
        m["model"] = {"kind": cfg.model.kind, "path": cfg.model.path, "dtype": cfg.model.dtype}
        m["geometry"] = _stage_geometry(dataclasses.asdict(cfg.geometry))
    return m


def check_manifest(out: Out, manifest: dict) -> None:
    """Write parts/_run.json, or refuse a rerun whose parts would mix two models, geometries or embedders."""
    if out.exists("parts/_run.json"):
        before = out.read_json("parts/_run.json")
        before["geometry"] = _stage_geometry(before.get("geometry"))  # a manifest written before they were left out
        diff = sorted(k for k in manifest if json.dumps(before.get(k), sort_keys=True, default=str)
                      != json.dumps(manifest[k], sort_keys=True, default=str))
        if diff and out.names("parts", ".parquet"):
            raise ConfigError(f"{out} holds part files made with another {', '.join(diff)} "
                              f"({out.uri('parts/_run.json')}); a rerun would mix the two. Use a new --out, or "
                              f"delete {out.uri('parts')} to redo every shard")
    out.write_json("parts/_run.json", manifest)


def build_steps(cfg: ScanConfig, embedder: str | None, out: Out, placements: dict) -> list:
    """The scan's stages in order, each with its own config section: read -> embed (when neighbours are on) ->
    score (when a model is given) -> sink. check_flow has checked that their columns connect."""
    from scanner.stages.base import READ, Step, check_flow
    from scanner.stages.embed import EmbedStage
    from scanner.stages.read import ReadSpec, ReadStage
    from scanner.stages.score import ScoreSpec, ScoreStage
    from scanner.stages.sink import SinkSpec, SinkStage

    score = cfg.model.kind != "none"
    spec = ReadSpec(model_side=cfg.data.resolution if score else 0, model_channels=cfg.data.channels,
                    embed_side=cfg.neighbours.image_size if embedder else 0, max_pixels=cfg.data.max_image_pixels,
                    preview_size=cfg.data.preview_size, rows_per_batch=ROWS_PER_BATCH)
    steps = [Step(ReadStage, spec, READ)]
    if embedder is not None:
        steps.append(Step(EmbedStage, dataclasses.replace(cfg.neighbours, clip_checkpoint=embedder),
                          placements["embed"]))
    if score:
        steps.append(Step(ScoreStage, ScoreSpec.of(cfg), placements["score"]))
    steps.append(Step(SinkStage, SinkSpec(out.uri())))
    check_flow(steps)
    return steps


def shard_jobs(cfg: ScanConfig, shards: list[str], out: Out) -> list[dict]:
    """The shards still to read: {path, split} for every corpus shard and held-out shard (classify.calibration_shards,
    scored for the cut) without a part file in `out` (one listing per folder)."""
    from scanner.stages.sink import done_shards

    held = list(cfg.classify.calibration_shards or []) if cfg.model.kind != "none" else []
    jobs = [{"path": p, "split": "corpus"} for p in shards] + [{"path": p, "split": "heldout"} for p in held]
    done = {split: done_shards(out, split) for split in ("corpus", "heldout")}
    return [j for j in jobs if shard_name(j["path"]) not in done[j["split"]]]


def _placements(cfg: ScanConfig, embedder: str | None) -> dict:
    import ray

    r = ray.cluster_resources()
    return plan(r.get("CPU", 1.0), r.get("GPU", 0.0), cfg.ray.actors if cfg.model.kind != "none" else None,
                cfg.ray.gpus_per_actor, embed=embedder is not None, use_gpu=cfg.model.device != "cpu",
                node_cpus=cfg.ray.num_cpus or os.cpu_count() or 1)


def run_stages(cfg: ScanConfig, out: Out, shards: list[str], embedder: str | None, progress: bool = True,
               label: str = "scan") -> dict:
    """Read, embed and score the shards that have no part file yet, into part files.

    embedder: the copy-detection checkpoint (None: no embedding stage). Returns {'pending', 'done',
    'seconds', 'images', 'stages': {name: {seconds, devices, nodes, warnings}}, 'placements'}.
    """
    import ray

    from scanner.stages.base import apply

    check_manifest(out, run_manifest(cfg, embedder))
    jobs = shard_jobs(cfg, shards, out)
    t0 = time.time()
    total = len(shards) + len(cfg.classify.calibration_shards or [] if cfg.model.kind != "none" else [])
    if not jobs:
        log.info("all %d shards already done in %s (resume)", total, out)
        return {"pending": 0, "done": 0, "seconds": 0.0, "images": 0, "stages": {}, "placements": {}}
    if len(jobs) < total:
        log.info("resuming: %d of %d shards already done, %d to go", total - len(jobs), total, len(jobs))
    init_ray(cfg)
    # the GPUs the cluster has, not the driver's: under `ray job submit` the driver often runs on a head with none
    placements = _placements(cfg, embedder)
    log.info("%s: %s", label, ", ".join(f"{n}: {p.actors} actor(s) x ({p.cpus:g} CPU, {p.gpus:g} GPU)"
                                        for n, p in placements.items()) or "read only")
    steps = build_steps(cfg, embedder, out, placements)
    ds = ray.data.from_items(jobs, override_num_blocks=len(jobs))
    # Reading is its own task per shard (num_cpus differs from the actors', so Ray Data does not fuse them):
    # fused, an actor's batch_size was applied to the *paths*, one task took up to 64 shards and the driver
    # saw nothing until all of them were done, so a kill lost all of them.
    for step in steps[:-1]:
        ds = apply(ds, step, cfg.data.batch_size)
    sink_step = steps[-1]
    sink = sink_step.stage(sink_step.cfg)
    n_corpus = sum(j["split"] == "corpus" for j in jobs)
    with ShardProgress(len(jobs), label, progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            before = sink.images
            finished = sink.add(batch)
            bar.update(len(finished), sink.images - before)
    if sink.failed:
        raise ScanIncomplete(
            f"{len(sink.failed)} of {len(jobs)} shards could not be written to {out}: "
            + "; ".join(f"{k[1]}: {v}" for k, v in sorted(sink.failed.items())[:5])
            + f". The other {len(sink.done)} are saved; fix the cause and rerun the same command to "
              f"do only these.")
    missing = [shard_name(j["path"]) for j in jobs if (j["split"], shard_name(j["path"])) not in sink.done]
    if missing:
        raise ScanIncomplete(f"the pipeline ended without completing shards {missing[:5]}: rerun to resume")
    stages = sink.stages_summary()
    for name, seconds in sink.stage_seconds.items():
        stages.setdefault(name, {})["seconds"] = round(seconds, 1)
    return {"pending": n_corpus, "done": sum(k[0] == "corpus" for k in sink.done),
            "seconds": round(time.time() - t0, 1), "images": sink.images, "stages": stages,
            "placements": {n: dataclasses.asdict(p) for n, p in placements.items()}}


def run_generations(cfg: ScanConfig, out: Out, shards: list[str], embedder: str | None, placements: dict) -> dict | None:
    """The replication check's generations (neighbours.generations images from the scanned model, captioned by the
    corpus's first training captions for a text-conditional model), embedded by the scan's embedder, through the
    generate stage (an actor: a GPU one where the cluster has one). Written to generations/ (the corpus step
    `replications` matches them) and replications/gen_N.png (report.html shows them). Done once per --out."""
    import io

    import numpy as np
    import pandas as pd
    import ray

    from scanner.corpus.replications import GEN_EMBEDDINGS, GENERATIONS
    from scanner.stages.base import Step, apply
    from scanner.stages.cluster import Placement
    from scanner.stages.generate import GenerateSpec, GenerateStage

    n = cfg.neighbours.generations
    if cfg.model.kind == "none" or embedder is None or n <= 0:
        return None
    if out.exists(GENERATIONS):
        return {"resumed": True}
    captions: list[str] = []
    if cfg.model.kind == "latent":  # a text-conditional model generates from training captions, in row order
        for p in shards:
            rel = f"parts/{shard_name(p)}.parquet"
            if len(captions) >= n or not out.exists(rel):
                break
            df = out.read_parquet(rel, columns=["caption", "error_stage"]) if "error_stage" in \
                out.parquet_file(rel).schema_arrow.names else out.read_parquet(rel, columns=["caption"])
            ok = ~df["error_stage"].isin(["read", "decode"]) if "error_stage" in df else pd.Series(True, df.index)
            captions += [c for c in df.loc[ok, "caption"].tolist() if isinstance(c, str) and c]
        if not captions:
            raise ConfigError("neighbours.generations > 0 with a text-conditional model, but no training caption was "
                              "read: set neighbours.generations: 0 or give shards with captions")
    items = [{"gen_id": i, "caption": captions[i % len(captions)] if captions else None, "seed": cfg.seed + i}
             for i in range(n)]
    log.info(f"replications: generating {n} images with {cfg.model.path} ({cfg.neighbours.gen_steps} steps each)")
    t0 = time.time()
    p = placements.get("score") or Placement(1, 1.0, 0.0, None)
    spec = GenerateSpec(cfg.model.path, dataclasses.replace(cfg.neighbours, clip_checkpoint=embedder),
                        cfg.neighbours.gen_steps, cfg.model.allow_pickle, cfg.model.device)
    ds = ray.data.from_items(items)
    ds = apply(ds, Step(GenerateStage, spec, Placement(1, p.cpus, p.gpus, p.threads)), 16)
    rows = sorted((r for b in ds.iter_batches(batch_size=None, batch_format="numpy")
                   for r in zip(b["gen_id"], b["caption"], b["seed"], b["embedding"], b["png"])), key=lambda r: r[0])
    for gid, _, _, _, png in rows:
        out.write_bytes(f"replications/gen_{int(gid)}.png", bytes(png))
    buf = io.BytesIO()
    np.save(buf, np.stack([r[3] for r in rows]).astype(np.float32))
    out.write_bytes(GEN_EMBEDDINGS, buf.getvalue())
    out.write_parquet(GENERATIONS, pd.DataFrame({"gen_id": [int(r[0]) for r in rows], "caption": [r[1] for r in rows],
                                                 "seed": [int(r[2]) for r in rows]}))
    return {"generations": len(rows), "seconds": round(time.time() - t0, 1)}


def _use_prior_embedder(cfg: ScanConfig) -> None:
    """--against / --reference without neighbours.clip_checkpoint: the embedder the first --against scan (else
    reference scan) embedded with, so that old and new embeddings compare (check_prior checks its digest)."""
    from scanner.preflight import is_scan, peek_embedder

    if cfg.neighbours.clip_checkpoint:
        return
    for uri in list(cfg.incremental.against) + [r for r in cfg.incremental.reference if is_scan(r)]:
        emb = peek_embedder(uri)
        if emb:
            log.info("neighbours: embedding with %s's embedder (%s)", uri, emb)
            cfg.neighbours.clip_checkpoint = emb
            return


def check_prior(cfg: ScanConfig, out: Out, shards: list[str], embedder: str | None) -> dict | None:
    """The finished scans (--against) and reference sets (--reference) this run reads, checked before any work:
    {"olds": [Prior], "refs": a Prior per finished reference scan, {"spec", "shards", "index"} per reference given as
    shards (embedded by stage_references)}; None without any."""
    from scanner.preflight import is_scan, open_against, open_scan, shard_order

    inc = cfg.incremental
    if not (inc.against or inc.reference):
        return None
    manifest = run_manifest(cfg, embedder)
    olds = open_against(list(inc.against), manifest)
    for o in olds:
        if Out(o.uri).uri() == out.uri():
            raise ConfigError(f"--against {o.uri} is this run's --out: scan new shards into a new --out")
    refs: list = []
    for j, r in enumerate(inc.reference):
        if is_scan(r):
            refs.append(open_scan(r, "reference", manifest, "--reference"))
            continue
        try:
            ref_shards = expand_shards(r, strict=True)
        except Exception as e:
            raise ConfigError(f"--reference {r} cannot be read: it is neither a finished scan's --out nor shards "
                              f"({e})") from e
        if not len(ref_shards):
            raise ConfigError(f"--reference {r} cannot be read: no shard there, and it is not a finished scan")
        refs.append({"spec": r, "shards": list(ref_shards), "index": j})
    shard_order(olds, [shard_name(p) for p in shards], out.uri(), [r for r in refs if not isinstance(r, dict)])
    return {"olds": olds, "refs": refs}


def stage_references(cfg: ScanConfig, out: Out, shards: list[str], embedder: str | None, prior: dict,
                     progress: bool) -> dict:
    """Reference shards read and embedded (no score) into OUT/reference/J/ (resumable like any scan), then every
    reference as a finished scan's shards; the shard order of the corpus steps."""
    from scanner.preflight import Prior, shard_order

    refs = []
    for r in prior["refs"]:
        if not isinstance(r, dict):
            refs.append(r)
            continue
        rcfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kind="none", path=None),
                                   classify=dataclasses.replace(cfg.classify, calibration_shards=None))
        rout = Out(out.uri(f"reference/{r['index']}"))
        rout.makedirs()
        run_stages(rcfg, rout, r["shards"], embedder, progress, label=f"reference {r['index']}")
        refs.append(Prior(uri=rout.uri(), role="reference",
                          shards=[{"name": shard_name(p), "out": rout.uri()} for p in r["shards"]]))
    order = shard_order(prior["olds"], [shard_name(p) for p in shards], out.uri(), refs)
    return {"olds": prior["olds"], "refs": refs, "order": order}


def versions() -> dict:
    import importlib.metadata as md

    import scanner

    out = {"memscan": scanner.__version__}  # the code that ran, not whichever memscan pip has metadata for
    for pkg in ("torch", "diffusers", "ray", "open_clip_torch", "faiss-gpu", "pyarrow", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def run_scan(cfg: ScanConfig, out_dir: str | Path, progress: bool = True, label: str = "scan") -> dict:
    """The whole job (`memscan scan`; `memscan dedup` with model.kind none). Returns the summary, also written to
    OUT/summary.json. out_dir: a local directory or an object-storage URL (s3://bucket/prefix, gs://...). `label`
    names the progress line and the log."""
    from scanner.corpus.run import corpus_steps
    from scanner.data.img2dataset import download_stats
    from scanner.preflight import check_scan

    out = Out(out_dir)  # an unwritable scheme fails here, before anything else
    cfg = check_scan(cfg)  # paths made absolute and the model checked before Ray starts
    shards = expand_shards(cfg.data.shards, strict=cfg.data.strict_shards)
    out.makedirs()
    t0 = time.time()
    embedder, trained = None, False
    inc = cfg.incremental
    if inc.against or inc.reference:
        if not cfg.neighbours.enabled:
            raise ConfigError("incremental.against / reference group images by their embeddings: set "
                              "neighbours.enabled: true")
        _use_prior_embedder(cfg)
    if cfg.neighbours.enabled:
        from scanner.neighbours.run import ensure_embedder

        # trained (when no checkpoint is given) before Ray starts, so it has the CPUs to itself
        embedder, trained = ensure_embedder(shards, out, cfg.neighbours, log=log.info)
    prior = check_prior(cfg, out, shards, embedder)  # every --against / --reference checked before any work
    if inc.against and cfg.classify.calibration_shards:  # the cut is the old scan's: no held-out image to score
        log.info("--against: the cut is %s's; classify.calibration_shards are not scored again", inc.against[0])
        cfg = dataclasses.replace(cfg, classify=dataclasses.replace(cfg.classify, calibration_shards=None))
    t_embedder = time.time() - t0
    stages = run_stages(cfg, out, shards, embedder, progress, label)
    if prior is not None:
        prior = stage_references(cfg, out, shards, embedder, prior, progress)
    init_ray(cfg)  # the corpus steps' tasks (and the generate stage) run on the same Ray
    gens = run_generations(cfg, out, shards, embedder, _placements(cfg, embedder))
    if cfg.model.kind != "none" and cfg.classify.calibration_shards:
        from scanner.storage import HELDOUT_LIST

        out.write_json(HELDOUT_LIST, [shard_name(p) for p in cfg.classify.calibration_shards])
    summary = corpus_steps(cfg, out, [shard_name(p) for p in shards], embedder=embedder, embedder_trained=trained,
                           prior=prior)
    if gens:
        summary["timings_s"]["generations"] = gens.get("seconds", 0.0)
    for name, rec in stages["stages"].items():  # the shards done in this run: actor seconds, devices, nodes
        this_run = summary["stages"].setdefault(name, {})
        this_run["seconds_this_run"] = rec.pop("seconds", 0.0)
        this_run.update(rec)
    if stages["placements"]:
        summary["placements"] = stages["placements"]
    summary["timings_s"] = {"train_embedder": round(t_embedder, 1), "stages": stages["seconds"],
                            **summary.get("timings_s", {}), "total": round(time.time() - t0, 1)}
    summary["resume"] = {"shards": len(shards), "done_this_run": stages["done"]}
    summary["shards"] = {"listed": len(shards), "missing": len(getattr(shards, "missing", ())),
                         "missing_first": list(getattr(shards, "missing", ()))[:20]}
    downloads = download_stats(shards)
    if downloads["shards_with_stats"]:  # img2dataset's *_stats.json beside the shards: seen + failed = its urls
        summary["downloads"] = downloads
        log.info("img2dataset: %d urls in %d shards' lists, %d failed to download, %d to resize",
                 downloads["count"], downloads["shards_with_stats"], downloads["failed_to_download"],
                 downloads["failed_to_resize"])
    summary["versions"] = versions()
    summary["machine"] = machine(threads=False)  # the scoring actors' threads are Ray's to set, not the driver's
    summary["config"] = cfg.to_dict()
    out.write_json("summary.json", summary)
    from scanner.report import write_report

    try:
        write_report(out)
    except Exception as e:  # noqa: BLE001 - the report is a view of the parquet outputs; never fail the scan for it
        log.warning("report.html not written (%s: %s); rerun `memscan report --out %s`", type(e).__name__, e, out)
    log.info("results in %s (scores/, errors.parquet, removal_list.parquet, summary.json, report.html)", out)
    return summary
