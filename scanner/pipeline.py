"""The scan job: one Ray Data pipeline from shards to part files, then the corpus-wide steps.

    shards ──read (Ray task per shard: each tar opened once, each image decoded once)
           ──► embed (actor: copy-detection embedding + pHash)      when neighbours are on
           ──► score (actor pool: every geometry column)            when a diffusion model is given
           ──► sink (driver: parts/NAME.parquet + vectors/ + embeddings/, atomically, per shard)
           ──► finalize (driver): duplicate groups, replications, LID_*, classes, verdicts, every table

`memscan dedup` is the same pipeline without the score stage. Resume: a shard whose part file exists
is done and is not read again; parts/_run.json records what the parts were made with, and a rerun
with another model, geometry or embedder into the same --out is refused rather than mixed. The
stages are in scanner/stages/; this module wires them and decides nothing about resources
(scanner.stages.base.plan does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from scanner.config import ScanConfig
from scanner.data.shards import expand_shards, shard_name
from scanner.errors import ConfigError, ScanIncomplete
from scanner.files import write_json
from scanner.procfs import machine
from scanner.progress import ShardProgress
from scanner.raystart import start_ray
from scanner.stages.base import READ_CPUS, apply, plan
from scanner.stages.read import ReadSpec, read_batch

log = logging.getLogger("memscan")


def init_ray(cfg: ScanConfig) -> None:
    start_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.dashboard)


# geometry keys only the corpus steps read (LID_* by local PCA): the part files do not depend on them, so a rerun
# with other values redoes the corpus steps on the same parts
CORPUS_STEP_GEOMETRY = ("lpca_k", "lpca_alpha", "lpca_space", "lpca_scale")


def _stage_geometry(geometry: dict | None) -> dict | None:
    return None if geometry is None else {k: v for k, v in geometry.items() if k not in CORPUS_STEP_GEOMETRY}


def run_manifest(cfg: ScanConfig, embedder: str | None) -> dict:
    """What the part files depend on: a rerun into the same --out must match it (parts/_run.json)."""
    from scanner.neighbours.embed import checkpoint_digest

    m = {"data": {k: getattr(cfg.data, k) for k in ("resolution", "channels", "max_image_pixels")},
         "model": None, "geometry": None,
         # the embedder by its bytes, not its path: a checkpoint moved elsewhere is still the same embedder
         "embedder": {"digest": checkpoint_digest(embedder), "image_size": cfg.neighbours.image_size,
                      "align_size": cfg.neighbours.align_size}
         if embedder else None}
    if cfg.model.kind != "none":
        m["model"] = {"kind": cfg.model.kind, "path": cfg.model.path, "dtype": cfg.model.dtype}
        m["geometry"] = _stage_geometry(dataclasses.asdict(cfg.geometry))
    return m


def check_manifest(out: Path, manifest: dict) -> None:
    """Write parts/_run.json, or refuse a rerun whose parts would mix two models, geometries or embedders."""
    path = out / "parts" / "_run.json"
    if path.is_file():
        before = json.loads(path.read_text())
        before["geometry"] = _stage_geometry(before.get("geometry"))  # a manifest written before they were left out
        diff = sorted(k for k in manifest if json.dumps(before.get(k), sort_keys=True, default=str)
                      != json.dumps(manifest[k], sort_keys=True, default=str))
        if diff and any((out / "parts").glob("*.parquet")):
            raise ConfigError(f"{out} holds part files made with another {', '.join(diff)} ({path}); a rerun "
                              f"would mix the two. Use a new --out, or delete {out / 'parts'} to redo every shard")
    write_json(manifest, path)


def run_stages(cfg: ScanConfig, out: Path, shards: list[str], embedder: str | None, progress: bool = True,
               label: str = "scan") -> dict:
    """Read, embed and score the shards that have no part file yet, into part files.

    embedder: the copy-detection checkpoint (None: no embedding stage). Returns {'pending', 'done',
    'seconds', 'images', 'stages': {name: actor seconds}}.
    """
    import ray

    from scanner.stages.embed import EmbedStage
    from scanner.stages.score import ScoreStage
    from scanner.stages.sink import ShardCollector

    check_manifest(out, run_manifest(cfg, embedder))
    pending = [p for p in shards if not (out / "parts" / f"{shard_name(p)}.parquet").exists()]
    t0 = time.time()
    if not pending:
        log.info("all %d shards already done in %s (resume)", len(shards), out)
        return {"pending": 0, "done": 0, "seconds": 0.0, "images": 0, "stages": {}}
    if len(pending) < len(shards):
        log.info("resuming: %d of %d shards already done, %d to go", len(shards) - len(pending), len(shards),
                 len(pending))
    score = cfg.model.kind != "none"
    init_ray(cfg)
    resources = ray.cluster_resources()
    use_gpu = _cuda_available() and cfg.model.device != "cpu"
    placements = plan(resources.get("CPU", 1.0), resources.get("GPU", 0.0), cfg.ray.actors if score else None,
                      cfg.ray.gpus_per_actor, embed=embedder is not None, use_gpu=use_gpu,
                      node_cpus=cfg.ray.num_cpus or os.cpu_count() or 1)
    log.info("%s: %s", label, ", ".join(f"{n}: {p.actors} actor(s) x ({p.cpus:g} CPU, {p.gpus:g} GPU)"
                                        for n, p in placements.items()) or "read only")
    spec = ReadSpec(model_side=cfg.data.resolution if score else 0, model_channels=cfg.data.channels,
                    embed_side=cfg.neighbours.image_size if embedder else 0, max_pixels=cfg.data.max_image_pixels)
    ds = ray.data.from_items([{"path": p} for p in pending], override_num_blocks=len(pending))
    # Reading is its own task per shard (num_cpus differs from the actors', so Ray Data does not fuse them):
    # fused, an actor's batch_size was applied to the *paths*, one task took up to 64 shards and the driver
    # saw nothing until all of them were done, so a kill lost all of them.
    ds = ds.map_batches(read_batch, batch_size=1, num_cpus=READ_CPUS, fn_kwargs={"spec": dataclasses.asdict(spec)})
    if embedder is not None:
        ncfg = dataclasses.asdict(dataclasses.replace(cfg.neighbours, clip_checkpoint=embedder))
        ds = apply(ds, EmbedStage, ncfg, placements["embed"], cfg.data.batch_size)
    if score:
        ds = apply(ds, ScoreStage, cfg.to_dict(), placements["score"], cfg.data.batch_size)
    collector = ShardCollector(out)
    with ShardProgress(len(pending), label, progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            before = collector.images
            finished = collector.add(batch)
            bar.update(len(finished), collector.images - before)
    if collector.failed:
        raise ScanIncomplete(
            f"{len(collector.failed)} of {len(pending)} shards could not be written to {out / 'parts'}: "
            + "; ".join(f"{k}: {v}" for k, v in sorted(collector.failed.items())[:5])
            + f". The other {len(collector.done)} are saved; fix the cause and rerun the same command to "
              f"do only these.")
    missing = [shard_name(p) for p in pending if shard_name(p) not in collector.done]
    if missing:
        raise ScanIncomplete(f"the pipeline ended without completing shards {missing[:5]}: rerun to resume")
    return {"pending": len(pending), "done": len(collector.done), "seconds": round(time.time() - t0, 1),
            "images": collector.images, "stages": {k: round(v, 1) for k, v in collector.stage_seconds.items()}}


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no usable CUDA however it fails
        return False


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
    out_dir/summary.json. `label` names the progress line and the log."""
    from scanner.finalize import finalize
    from scanner.preflight import check_scan

    cfg = check_scan(cfg)  # paths made absolute and the model checked before Ray starts
    shards = expand_shards(cfg.data.shards)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    embedder, trained = None, False
    if cfg.neighbours.enabled:
        from scanner.neighbours.run import ensure_embedder

        # trained (when no checkpoint is given) before Ray starts, so it has the CPUs to itself
        embedder, trained = ensure_embedder(shards, out, cfg.neighbours, log=log.info)
    t_embedder = time.time() - t0
    stages = run_stages(cfg, out, shards, embedder, progress, label)
    summary = finalize(cfg, out, shards, embedder=embedder, embedder_trained=trained)
    for name, seconds in stages["stages"].items():  # actor seconds of the shards done in this run
        summary["stages"].setdefault(name, {})["seconds_this_run"] = seconds
    summary["timings_s"] = {"train_embedder": round(t_embedder, 1), "stages": stages["seconds"],
                            **summary.get("timings_s", {}), "total": round(time.time() - t0, 1)}
    summary["resume"] = {"shards": len(shards), "done_this_run": stages["done"]}
    summary["versions"] = versions()
    summary["machine"] = machine(threads=False)  # the scoring actors' threads are Ray's to set, not the driver's
    summary["config"] = cfg.to_dict()
    write_json(summary, out / "summary.json")
    from scanner.report.html import write_report

    try:
        write_report(out)
    except Exception as e:  # noqa: BLE001 - the report is a view of the parquet outputs; never fail the scan for it
        log.warning("report.html not written (%s: %s); rerun `memscan report --out %s`", type(e).__name__, e, out)
    log.info("results in %s (scores/, errors.parquet, removal_list.parquet, summary.json, report.html)", out)
    return summary


def run_dedup(shards, out_dir, cfg, train_steps: int | None = None, progress: bool = False,
              data: dict | None = None, ray: dict | None = None) -> dict:
    """`memscan dedup`: the scan's pipeline (read -> embed -> parts) and corpus steps, with no diffusion model.

    cfg: a NeighboursConfig; data / ray: the config's data and ray sections as dicts (defaults when None).
    Writes what a scan writes, less the model's columns: scores/ (keys, sizes, errors), duplicates.parquet,
    removal_list.{parquet,txt}, errors.parquet, summary.json, report.html. Returns the summary.
    """
    from scanner.config import config_from_dict

    if train_steps:
        cfg = dataclasses.replace(cfg, train_steps=train_steps)
    raw = ScanConfig().to_dict()
    raw.update(data=dict(data or raw["data"], shards=[str(s) for s in ([shards] if isinstance(shards, (str, Path))
                                                                         else shards)]),
               model={"kind": "none"}, neighbours=dataclasses.asdict(cfg), ray=ray or raw["ray"])
    return run_scan(config_from_dict(raw), out_dir, progress=progress, label="dedup")
