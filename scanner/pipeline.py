"""The scan job: stream shards through Ray Data, score every image, write per-shard outputs, finalize.

    shards ──read+decode (Ray tasks, one per shard)──► score (Ray actor pool, model loaded once)
          ──► driver: collect rows per shard; a shard's rows are written to parts/NAME.parquet
              (atomic) once its end-of-shard marker and all its rows have arrived
          ──► finalize (driver): neighbours, local PCA, classes, verdicts -> scores/, removal list,
              errors.parquet, summary.json

Resume: a shard whose parts/NAME.parquet exists is done and is not read again; a shard that was in
flight when the job died has no part file and is redone whole. So a killed job, rerun, gives exactly
one row per sample. Finalize is recomputed on every run (it is cheap next to scoring).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from scanner.config import ScanConfig
from scanner.data.shards import expand_shards, shard_name
from scanner.errors import ScanIncomplete
from scanner.files import atomic_write_npy, atomic_write_parquet, write_json
from scanner.progress import ShardProgress
from scanner.raystart import start_ray

log = logging.getLogger("memscan")

ROWS_PER_BATCH = 256
META_COLUMNS = ["key", "shard", "caption", "width", "height", "error", "error_stage"]
TEXT_COLUMNS = ("key", "caption", "error", "error_stage")


def text_column(values) -> np.ndarray:
    """An object array of str or None.

    Between stages Ray Data stores a batch as Arrow; a text column that is None on every row of a block
    becomes Arrow `null` and comes back from `to_numpy` as float NaN. Read as is, a shard without a
    single error had NaN in `error` (no row looked scoreable) and a block of it could not be merged
    with a block that had a string error. Every stage reads its batches through with_text_columns.
    """
    return np.array([None if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)) else str(v)
                     for v in values], dtype=object)


def with_text_columns(batch: dict) -> dict:
    """`batch` with every TEXT_COLUMNS column read through text_column."""
    return {k: text_column(v) if k in TEXT_COLUMNS else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# stage 1: read + decode one shard (a Ray task; never raises on data)


def read_decode_shard(path: str, resolution: int, channels: int, max_pixels: int,
                      rows_per_batch: int = ROWS_PER_BATCH) -> Iterator[dict]:
    """Yield numpy batches for one shard; the last batch ends with one marker row (`n_rows` = rows sent).

    Batch columns: key, shard, caption, width, height, error, error_stage (object / int arrays),
    image (B, R, R, C) uint8 (zeros where error), marker (bool), n_rows (int64, -1 but on the marker),
    row (int64: the sample's position in the shard, -1 on the marker; the driver drops a row it already
    has, so a task that Ray retries after a killed worker cannot double a row).
    """
    from scanner.data.decode import DecodeError, decode_image
    from scanner.data.shards import iter_tar_samples

    name = shard_name(path)
    rows: list[dict] = []
    sent = 0
    blank = np.zeros((resolution, resolution, channels), np.uint8)

    def pack(rs: list[dict]) -> dict:
        return {
            "key": np.array([r["key"] for r in rs], dtype=object),
            "shard": np.array([name] * len(rs), dtype=object),
            "caption": np.array([r["caption"] for r in rs], dtype=object),
            "width": np.array([r["width"] for r in rs], dtype=np.int64),
            "height": np.array([r["height"] for r in rs], dtype=np.int64),
            "error": np.array([r["error"] for r in rs], dtype=object),
            "error_stage": np.array([r["error_stage"] for r in rs], dtype=object),
            "image": np.stack([r["image"] for r in rs]),
            "marker": np.array([r["marker"] for r in rs], dtype=bool),
            "n_rows": np.array([r["n_rows"] for r in rs], dtype=np.int64),
            "row": np.array([r["row"] for r in rs], dtype=np.int64),
        }

    for s in iter_tar_samples(path):
        row = {"key": s["key"], "caption": s["caption"], "width": -1, "height": -1, "error": s["error"],
               "error_stage": "read" if s["error"] else None, "image": blank, "marker": False, "n_rows": -1,
               "row": sent + len(rows)}
        if s["error"] is None:
            try:
                row["image"], row["width"], row["height"] = decode_image(s["image"], resolution, channels, max_pixels)
            except DecodeError as e:
                row["error"], row["error_stage"] = str(e), "decode"
        rows.append(row)
        if len(rows) >= rows_per_batch:
            sent += len(rows)
            yield pack(rows)
            rows = []
    sent += len(rows)
    rows.append({"key": None, "caption": None, "width": -1, "height": -1, "error": None, "error_stage": None,
                 "image": blank, "marker": True, "n_rows": sent, "row": -1})
    yield pack(rows)


def _read_batch(batch: dict, resolution: int, channels: int, max_pixels: int) -> Iterator[dict]:
    for path in batch["path"]:
        yield from read_decode_shard(str(path), resolution, channels, max_pixels)


# --------------------------------------------------------------------------------------------------
# stage 2: score (a Ray actor: the model is loaded once per actor)


class ScoreStage:
    """Adds every geometry column, plus `vector` (the image in model space, float16, for local PCA)."""

    def __init__(self, cfg: dict, threads: int | None = None):
        """cfg: ScanConfig.to_dict() (plain data: Ray keeps no object-store reference it could lose when it
        restarts this actor, ray#53727), already checked by preflight.check_scan on the driver."""
        import torch

        from scanner.config import config_from_dict
        from scanner.geometry.scores import score_columns
        from scanner.models.loading import load_score_model, model_resolution

        if threads:
            torch.set_num_threads(threads)
        cfg = config_from_dict(cfg)
        self.cfg = cfg
        self.model = load_score_model(cfg.model)
        res = model_resolution(self.model)
        if res != cfg.data.resolution:
            raise ValueError(f"data.resolution={cfg.data.resolution} but the model at {cfg.model.path} expects "
                             f"{res}x{res} images: set data.resolution: {res}")
        self.use_cond = bool(self.model.conditional)
        self.columns = score_columns(cfg.geometry, self.use_cond)

    def __call__(self, batch: dict) -> dict:
        import torch

        from scanner.geometry.scores import compute_scores
        from scanner.geometry.trace import row_seeds

        batch = with_text_columns(batch)
        n = len(batch["key"])
        ok = np.array([(not m) and (e is None) for m, e in zip(batch["marker"], batch["error"])], dtype=bool)
        out = {c: np.full(n, np.nan, np.float32) for c in self.columns}
        vec = np.zeros((n, self.model.dim), np.float16)
        error = batch["error"].copy()
        stage = batch["error_stage"].copy()
        idx = np.flatnonzero(ok)
        for start in range(0, len(idx), self.cfg.model.batch_size):
            sel = idx[start:start + self.cfg.model.batch_size]
            try:
                x = self.model.encode_images(torch.from_numpy(batch["image"][sel]))
                cond = self.model.encode_text(list(batch["caption"][sel])) if self.use_cond else None
                seeds = row_seeds(batch["key"][sel], self.cfg.geometry.seed)
                scores = compute_scores(self.model, x, self.cfg.geometry, cond, seeds=seeds)
                for c in self.columns:
                    out[c][sel] = scores[c].numpy()
                vec[sel] = x.detach().reshape(len(sel), -1).cpu().numpy().astype(np.float16)
            except Exception as e:  # noqa: BLE001 - one bad batch must not kill the job: its rows become error rows
                for i in sel:
                    error[i], stage[i] = f"scoring failed: {type(e).__name__}: {e}", "score"
        for i in idx:
            if error[i] is None:
                bad = [c for c in self.columns if not np.isfinite(out[c][i])]
                if bad:
                    error[i], stage[i] = f"non-finite score in {', '.join(bad)}", "score"
        result = {k: v for k, v in batch.items() if k != "image"}
        result.update(out)
        result["vector"] = vec
        result["error"], result["error_stage"] = error, stage
        return result


# --------------------------------------------------------------------------------------------------
# driver side: collect per shard, write atomically


class ShardCollector:
    """Buffers rows per shard; writes parts/NAME.parquet (+ vectors/NAME.npy) when the shard is complete."""

    def __init__(self, out: Path):
        self.out = out
        self.rows: dict[str, list] = {}
        self.vectors: dict[str, list] = {}
        self.expected: dict[str, int] = {}
        self.seen: dict[str, set[int]] = {}  # row numbers received per unfinished shard
        self.done: list[str] = []
        self.failed: dict[str, str] = {}  # shard -> why its output could not be written
        self.images = 0  # samples collected (rows with a key: a damaged shard's own error row is not one)

    def add(self, batch: dict) -> list[str]:
        """Take one batch; write every shard it completes. Returns the shards written now."""
        import pandas as pd

        finished = []
        batch = with_text_columns(batch)
        cols = [c for c in batch if c not in ("image", "vector", "marker", "n_rows", "row")]
        for shard in np.unique(batch["shard"]):
            if shard in self.done or shard in self.failed:
                continue  # a retried task re-sent a finished shard
            m = batch["shard"] == shard
            markers = m & batch["marker"]
            rows = m & ~batch["marker"]
            if rows.any():
                seen = self.seen.setdefault(shard, set())
                new = np.array([int(r) not in seen for r in batch["row"]]) & rows
                seen.update(int(r) for r in batch["row"][new])
                if new.any():
                    self.rows.setdefault(shard, []).append(pd.DataFrame({c: batch[c][new] for c in cols}))
                    if "vector" in batch:
                        self.vectors.setdefault(shard, []).append(batch["vector"][new])
                self.images += sum(k is not None for k in batch["key"][new])  # not a damaged shard's row
            if markers.any():
                self.expected[shard] = int(batch["n_rows"][markers][0])
            if shard in self.expected and len(self.seen.get(shard, ())) == self.expected[shard]:
                try:
                    self._write(shard)
                except OSError as e:  # disk full, permissions, a vanished mount: this shard only, rerun resumes it
                    self.failed[shard] = f"{type(e).__name__}: {e}"
                    self.rows.pop(shard, None)
                    self.vectors.pop(shard, None)
                    log.error("could not write the scores of shard %s (%s); the other shards go on, and a rerun "
                              "scores this one again", shard, self.failed[shard])
                    continue
                self.seen.pop(shard, None)
                finished.append(shard)
        return finished

    def _write(self, shard: str) -> None:
        import pandas as pd

        df = pd.concat(self.rows.pop(shard, []), ignore_index=True) if shard in self.rows else pd.DataFrame()
        if shard in self.vectors:
            atomic_write_npy(np.concatenate(self.vectors.pop(shard)), self.out / "vectors" / f"{shard}.npy")
        # The part file is written last: its presence is the shard's completion marker.
        atomic_write_parquet(df, self.out / "parts" / f"{shard}.parquet")
        self.done.append(shard)


def init_ray(cfg: ScanConfig) -> None:
    start_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.dashboard)


def run_scoring(cfg: ScanConfig, out: Path, shards: list[str], progress: bool = True) -> dict:
    """Score the shards that have no part file yet. Returns {'pending': n, 'done': n, 'seconds': s}."""
    import ray

    pending = [p for p in shards if not (out / "parts" / f"{shard_name(p)}.parquet").exists()]
    t0 = time.time()
    if not pending:
        log.info("all %d shards already scored in %s (resume)", len(shards), out)
        return {"pending": 0, "done": 0, "seconds": 0.0}
    if len(pending) < len(shards):
        log.info("resuming: %d of %d shards already done, %d to go", len(shards) - len(pending), len(shards),
                 len(pending))
    init_ray(cfg)
    use_gpu = _cuda_available() and cfg.model.device != "cpu"
    ds = ray.data.from_items([{"path": p} for p in pending], override_num_blocks=len(pending))
    # Reading is its own task per shard (num_cpus differs from the scoring actor's, so Ray Data does not
    # fuse the two): fused, the actor's batch_size was applied to the *paths*, one task took up to 64
    # shards and the driver saw nothing until all of them were scored, so a kill lost all of them.
    ds = ds.map_batches(_read_batch, batch_size=1, num_cpus=READ_CPUS,
                        fn_kwargs={"resolution": cfg.data.resolution, "channels": cfg.data.channels,
                                   "max_pixels": cfg.data.max_image_pixels})
    if cfg.model.kind != "none":
        threads = None if use_gpu else max(1, (cfg.ray.num_cpus or os.cpu_count() or 1) // cfg.ray.actors)
        ds = ds.map_batches(ScoreStage, fn_constructor_kwargs={"cfg": cfg.to_dict(), "threads": threads},
                            batch_size=cfg.data.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.ray.actors),
                            num_gpus=cfg.ray.gpus_per_actor if use_gpu else 0,
                            num_cpus=0 if use_gpu else actor_cpus(ray.cluster_resources().get("CPU", 1.0),
                                                                   cfg.ray.actors))
    collector = ShardCollector(out)
    with ShardProgress(len(pending), "scan", progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            before = collector.images
            finished = collector.add(batch)
            bar.update(len(finished), collector.images - before)
    if collector.failed:
        raise ScanIncomplete(
            f"{len(collector.failed)} of {len(pending)} shards could not be written to {out / 'parts'}: "
            + "; ".join(f"{k}: {v}" for k, v in sorted(collector.failed.items())[:5])
            + f". The other {len(collector.done)} are saved; fix the cause and rerun the same command to "
              f"score only these.")
    missing = [shard_name(p) for p in pending if shard_name(p) not in collector.done]
    if missing:
        raise ScanIncomplete(f"scoring ended without completing shards {missing[:5]}: rerun to resume")
    return {"pending": len(pending), "done": len(collector.done), "seconds": round(time.time() - t0, 1),
            "images": collector.images}


READ_CPUS = 0.5  # CPU reserved by each read + decode task


def actor_cpus(cluster_cpus: float, actors: int) -> float:
    """CPUs each CPU scoring actor asks Ray for: 1, or less when `actors` x 1 would leave no room for a read task.

    The actor pool holds its CPUs for the whole run; with 2 actors on a 2-CPU machine at 1 CPU each, no read
    task could ever be scheduled and the scan waited forever (found by benchmarks/cluster_check.py).
    """
    share = min(1.0, (cluster_cpus - READ_CPUS) / actors)
    if share <= 0:
        raise ValueError(f"ray.actors={actors} scoring actors do not fit beside a read task on {cluster_cpus:g} CPUs")
    if share < 1.0:
        log.info("%d scoring actors on %g CPUs: each asks Ray for %.2f CPU so that reading can run beside them",
                 actors, cluster_cpus, share)
    return round(share, 3)


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


def run_scan(cfg: ScanConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """The whole job. Returns the summary (also written to out_dir/summary.json)."""
    from scanner.finalize import finalize
    from scanner.preflight import check_scan

    cfg = check_scan(cfg)  # paths made absolute and the model checked before Ray starts
    shards = expand_shards(cfg.data.shards)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    scoring = run_scoring(cfg, out, shards, progress)
    summary = finalize(cfg, out, shards, progress)
    summary["timings_s"] = {"scoring": scoring["seconds"], **summary.get("timings_s", {}),
                            "total": round(time.time() - t0, 1)}
    summary["resume"] = {"shards": len(shards), "scored_this_run": scoring["done"]}
    summary["versions"] = versions()
    summary["config"] = cfg.to_dict()
    write_json(summary, out / "summary.json")
    from scanner.report.html import write_report

    try:
        write_report(out)
    except Exception as e:  # noqa: BLE001 - the report is a view of the parquet outputs; never fail the scan for it
        log.warning("report.html not written (%s: %s); rerun `memscan report --out %s`", type(e).__name__, e, out)
    log.info("results in %s (scores/, errors.parquet, removal_list.parquet, summary.json, report.html)", out)
    return summary
