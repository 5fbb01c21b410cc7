"""Finalize a scan: the corpus-wide steps that need every shard's rows, out of core.

Reads parts/*.parquet (+ vectors/*.npy, embeddings/*.npy) written by the stages, shard by shard
(scanner/corpus/), within corpus.memory_gb:
1. repeated keys (a disk shuffle by key hash);
2. neighbours (when embedded): byte and pHash copies, embedding links, groups that do not chain,
   replications (scanner.corpus.groups, scanner.corpus.search, scanner.neighbours.dedup);
3. LID_* by local PCA on each row's neighbours (searched in model space, or in the embedding with
   geometry.lpca_space clip, and auto above 4,096 dimensions), the neighbours' model-space vectors read by id;
4. the detector threshold (a quantile over the scored rows; a seeded sample above corpus.detector_sample);
5. one pass over the shards: mem_class (docs/method.md §4) and verdict per row, and the tables.
It is the one writer of every user-facing table: scores/NAME.parquet per shard, duplicates.parquet,
replications.parquet, errors.parquet, removal_list.{parquet,txt}. Returns the summary.

Memory: one shard, one inverted list or query block, and what grows with the number of images that have a
duplicate link (edges, group members). Work files go to a local folder (work_dir: OUT/corpus-work for a local --out)
and are removed at the end; a job
killed here leaves the tables of the previous run (every write is atomic) and a rerun redoes this step.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from scanner.calibrate import flagged_at
from scanner.config import ScanConfig
from scanner.corpus.store import PartStore
from scanner.procfs import memory_mb
from scanner.schema import DUPLICATES, ERRORS, P_LAPLACE_PREFIX, REMOVAL, REPLICATIONS, scores_schema

log = logging.getLogger("memscan")

REMOVAL_ORDER = ["duplicate", "dd_mem", "od_mem", "replicated"]
LIGHT = ["key", "error", "error_stage", "embed_error"]
PCA_CHUNK = 512  # queries per batched local PCA
TYPICAL_MIN_ROWS = 30  # rows behind each LID_* value's typical lid_flipd (typical_flipd)


def member(sorted_ids: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x in sorted_ids, elementwise (sorted_ids: sorted int64), by binary search."""
    if not len(sorted_ids):
        return np.zeros(len(x), bool)
    j = np.minimum(np.searchsorted(sorted_ids, x), len(sorted_ids) - 1)
    return sorted_ids[j] == x


class Masks:
    """Per-shard row masks, bit-packed (N / 8 bytes in all): which rows have a key, are scored, are searched."""

    def __init__(self, store: PartStore, repeated: np.ndarray):
        self.store = store
        self.n = {k: [] for k in ("has_key", "ok", "searched")}
        self.counts = {k: 0 for k in self.n}
        for i in range(len(store)):
            df = store.read(i, LIGHT)
            gids = store.offsets[i] + np.arange(len(df))
            has_key = df["key"].notna().to_numpy()
            rep = member(repeated, gids)
            ok = has_key & df["error"].isna().to_numpy() & ~rep
            searched = (has_key & df["embed_error"].isna().to_numpy() & ~rep
                        & ~df["error_stage"].isin(["read", "decode"]).to_numpy()
                        & store.has_array("embeddings", i))
            for k, m in (("has_key", has_key), ("ok", ok), ("searched", searched)):
                self.n[k].append(np.packbits(m))
                self.counts[k] += int(m.sum())

    def get(self, name: str, i: int) -> np.ndarray:
        return np.unpackbits(self.n[name][i], count=int(self.store.sizes[i])).astype(bool)

    def select(self, name: str, exclude: np.ndarray | None = None):
        """A Select for scanner.corpus.search: shard index -> mask, minus the sorted gids `exclude`."""
        def f(i: int) -> np.ndarray:
            m = self.get(name, i)
            if exclude is not None and len(exclude):
                lo, hi = np.searchsorted(exclude, self.store.offsets[i:i + 2])
                m[exclude[lo:hi] - self.store.offsets[i]] = False
            return m
        return f


def lid_lpca(store: PartStore, masks: Masks, cfg: ScanConfig, work: Path) -> tuple[dict, object]:
    """The local-PCA spectrum of every ok row's lpca_k nearest ok rows (itself included), spilled by shard: the
    eigenvalues, largest first (scanner.geometry.local_pca.local_spectra). LID_* is counted from them once the corpus
    level is known (`lpca_count`). Returns (summary info, a Spill of (gid, spec) records by shard index, or None)."""
    import torch

    from scanner.corpus.groups import buffer_bytes
    from scanner.corpus.search import count_rows, make_plan, search, search_knobs
    from scanner.corpus.spill import Spill
    from scanner.geometry.local_pca import local_spectra

    g = cfg.geometry
    want = g.lpca_space
    if want == "auto":
        from scanner.config import LPCA_MODEL_MAX_DIM

        want = "model" if (store.dim("vectors") or 0) <= LPCA_MODEL_MAX_DIM else "clip"
    space = "embeddings" if want == "clip" and masks.counts["searched"] else "vectors"
    select = masks.select("ok") if space == "vectors" else _both(masks.select("ok"), masks.select("searched"))
    n = int(count_rows(store, space, select).sum())
    if n < 2:
        return {"n": n, "space": space}, None
    dim = store.dim(space)
    k = min(g.lpca_k + 1, n)
    plan = make_plan(n, dim, k, "l2", search_knobs(cfg), cfg.corpus.budget_bytes)
    rec = np.dtype([("gid", "<i8"), ("spec", "<f4", (min(k, store.dim("vectors")),))])
    out = Spill(work / "lid", len(store), rec, buffer_bytes=buffer_bytes(cfg.corpus.budget_bytes))

    def consume(qg, nbr, _sims, rows):
        for s in range(0, len(qg), PCA_CHUNK):
            ids = nbr[s:s + PCA_CHUNK]
            if space == "vectors" and rows is not None:  # the list holds the neighbours' model vectors
                order = np.argsort(rows[0])
                pos = order[np.searchsorted(rows[0], ids, sorter=order)]
                x = rows[1][pos]
            else:
                x = store.gather("vectors", ids.ravel()).reshape(*ids.shape, -1)
            r = np.empty(len(ids), rec)
            r["gid"], r["spec"] = qg[s:s + PCA_CHUNK], local_spectra(torch.from_numpy(x)).numpy()
            out.add(store.shard_of(r["gid"]), r)

    info = search(store, space, select, plan, consume, work, seed=cfg.seed,
                  recall_sample=cfg.neighbours.recall_sample, log=log.info, budget_bytes=cfg.corpus.budget_bytes)
    out.flush()
    info["space"] = "clip" if space == "embeddings" else "model"
    return info, out


def lpca_count(spec: np.ndarray, thresholds: dict, cfg: ScanConfig) -> np.ndarray:
    """LID_* (float32) from local-PCA spectra: eigenvalues above lpca_alpha x the level (geometry.lpca_scale: the
    corpus reference in `thresholds`, or each row's own largest eigenvalue)."""
    import torch

    from scanner.geometry.local_pca import lid_from_spectra

    ref = thresholds.get("lpca_reference") if cfg.geometry.lpca_scale == "corpus" else None
    if cfg.geometry.lpca_scale == "corpus" and not ref:  # no neighbourhood has any spread: every LID_* is 0
        return np.zeros(len(spec), np.float32)
    return lid_from_spectra(torch.from_numpy(np.asarray(spec, np.float64)), cfg.geometry.lpca_alpha, ref).numpy()


def typical_flipd(lid_lpca: np.ndarray, lid_flipd: np.ndarray, top: int) -> list[float | None]:
    """The corpus's typical lid_flipd for each LID_* value 0..top: the median lid_flipd of the rows with that LID_*,
    pooled with the nearest values until TYPICAL_MIN_ROWS rows (all rows when fewer). What OD-Mem compares to:
    the model's LID at an image against what the model gives images whose data neighbourhood has the same
    dimension, so a simple image (low LID_* and low LID_theta alike) is not called overfitted for being simple."""
    v = np.asarray(lid_lpca, float)
    f = np.asarray(lid_flipd, float)
    keep = np.isfinite(v) & np.isfinite(f)
    v, f = np.clip(np.rint(v[keep]), 0, top).astype(np.int64), f[keep]
    if not len(v):
        return [None] * (top + 1)
    order = np.argsort(v, kind="stable")
    v, f = v[order], f[order]  # rows of one LID_* value, and of a window of values, are one slice
    counts = np.bincount(v, minlength=top + 1)
    starts = np.r_[0, np.cumsum(counts)]
    need = min(TYPICAL_MIN_ROWS, len(v))
    out = []
    for u in range(top + 1):
        w = 0
        while starts[min(u + w, top) + 1] - starts[max(u - w, 0)] < need:
            w += 1
        out.append(float(np.median(f[starts[max(u - w, 0)]:starts[min(u + w, top) + 1]])))
    return out


def _both(a, b):
    return lambda i: a(i) & b(i)


def detector_threshold(store: PartStore, masks: Masks, cfg: ScanConfig, lids=None) -> dict:
    """The classify thresholds: the detector's (given, or its detector_quantile over the ok rows), the corpus level
    of local PCA (`lids`: lid_lpca's spill of spectra), the medians of lid_flipd and lid_lpca and lid_flipd's
    typical value per LID_* (what OD-Mem compares to). Exact up to corpus.detector_sample rows, else from a seeded
    Bernoulli sample of about that many (the same rows for every column)."""
    c = cfg.classify
    col = c.detector
    if cfg.model.kind == "none" or col not in store.columns:
        return {"detector": col, "note": "detector column absent: no model scores", "threshold": None}
    rate = min(1.0, cfg.corpus.detector_sample / max(masks.counts["ok"], 1))
    want = [col] + [x for x in ("lid_flipd",) if x in store.columns and x != col]
    vals: dict[str, list] = {k: [] for k in want}
    spectra: list[np.ndarray] = []
    for i in range(len(store)):
        ok = masks.get("ok", i)
        keep = np.random.default_rng([cfg.seed, i]).random(int(ok.sum())) < rate if rate < 1.0 else slice(None)
        df = store.read(i, want)
        for k in want:
            vals[k].append(df[k].astype(float).to_numpy()[ok][keep])
        if lids is not None:  # one record per ok row the search asked for, in any order: align them to the ok rows
            r = lids.read(i)
            spec = np.full((int(ok.sum()), lids.dtype["spec"].shape[0]), np.nan, np.float32)
            spec[np.searchsorted(store.offsets[i] + np.flatnonzero(ok), r["gid"])] = r["spec"]
            spectra.append(spec[keep])
    v = {k: np.concatenate(x) if x else np.zeros(0) for k, x in vals.items()}
    lpca: dict = {}
    if spectra:
        spec = np.concatenate(spectra)
        top = spec[:, 0][np.isfinite(spec[:, 0])]
        lpca = {"lpca_scale": cfg.geometry.lpca_scale, "lpca_alpha": cfg.geometry.lpca_alpha,
                "lpca_reference": float(np.median(top[top > 0]))
                if cfg.geometry.lpca_scale == "corpus" and (top > 0).any() else None}
        v["lid_lpca"] = np.where(np.isfinite(spec[:, 0]), lpca_count(np.nan_to_num(spec), lpca, cfg), np.nan)
        if "lid_flipd" in v:
            lpca["lid_flipd_typical"] = typical_flipd(v["lid_lpca"], v["lid_flipd"], spec.shape[1])
    medians = {k: float(np.nanmedian(v[k])) if np.isfinite(v[k]).any() else None for k in ("lid_flipd", "lid_lpca")
               if k in v}
    if medians.get("lid_flipd") is not None and medians["lid_flipd"] <= 0:
        log.warning("classify: the corpus median of lid_flipd is %.4g, not a dimension (geometry.flipd_at: clean on "
                    "a trained UNet?): OD-Mem compares dimensions, so no image is classed od in this run",
                    medians["lid_flipd"])
    vals = v[col]
    calibration = None
    if c.calibration_shards:
        from scanner.calibrate import calibrated_cut, cut_fpr_interval, heldout_scores, member_cut

        held = heldout_scores(cfg, store.out)
        thr = held_cut = calibrated_cut(held["values"], c.calibration_fpr, c.direction)
        members = None
        if c.calibration_members and np.isfinite(vals).sum() >= 100:  # fewer rows: no spread to read
            members = member_cut(vals, c.calibration_fpr, c.direction)
            thr = min(thr, members["cut"]) if c.direction == "low" else max(thr, members["cut"])
            members["binding"] = thr == members["cut"]
            log.info("classify: the members' cut %.4g (median %.4g %s %.3g x %.4g over %d corpus rows) is %s than the "
                     "held-out cut %.4g: %s applies", members["cut"], members["median"],
                     "-" if c.direction == "low" else "+", members["z"], members["scale"], members["rows"],
                     "stricter" if members["binding"] else "looser", held_cut,
                     "it" if members["binding"] else "the held-out cut")
        flagged_held = float(np.mean(flagged_at(held["values"], thr, c.direction)))
        level = 0.95
        lo, hi = cut_fpr_interval(held["images"], c.calibration_fpr, level)
        log.info("classify: the held-out cut %.4g flags %g %% of the %d held-out images; the false-positive rate it "
                 "applies to non-members lies in %.2f-%.2f %% (%g %%; more held-out images narrow it)%s", held_cut,
                 c.calibration_fpr * 100, held["images"], lo * 100, hi * 100, level * 100,
                 f"; the members' cut {thr:.4g} applies, flagging {flagged_held * 100:.2f} % of them"
                 if members and members["binding"] else "")
        calibration = {"fpr": c.calibration_fpr, "fpr_interval": [lo, hi], "fpr_interval_level": level,
                       "images": held["images"], "errors": held["errors"],
                       "shards": held["shards"],
                       "median": float(np.median(held["values"])), "heldout_cut": held_cut,
                       "flagged_share_of_heldout": flagged_held,
                       **({"members": members} if members else {}),
                       "flagged_share_of_corpus": float(np.mean(flagged_at(vals, thr, c.direction)))
                       if len(vals) else None}
        how = f" (the {c.calibration_fpr:g} quantile of {held['images']} held-out images)"
        if members:
            how = (f" (the stricter of the {c.calibration_fpr:g} quantile of {held['images']} held-out images, "
                   f"{held_cut:.4g}, and of the corpus's ordinary members, {members['cut']:.4g} = its median "
                   f"{'-' if c.direction == 'low' else '+'} {members['z']:.3g} x 1.4826 x its MAD)")
    elif not np.isfinite(vals).any() and c.detector_threshold is None:
        return {"detector": col, "note": "detector column has no values", "threshold": None}
    elif c.detector_threshold is not None:
        thr, how = float(c.detector_threshold), ""
    else:
        q = c.detector_quantile if c.direction == "low" else 1.0 - c.detector_quantile
        thr, how = float(np.nanquantile(vals, q)), f" (the {c.detector_quantile:g} quantile of the corpus)"
    fixed = calibration is not None or c.detector_threshold is not None
    return {"detector": col, "direction": c.direction, "threshold": thr,
            "quantile": None if fixed else c.detector_quantile,
            "quantile_from": None if fixed else "all scored rows" if rate >= 1.0
            else f"a seeded sample of {len(vals)} scored rows",
            **({"calibration": calibration} if calibration else {}),
            "lpca_low": c.lpca_low, "gap_margin": c.gap_margin, "lid_medians": medians, **lpca,
            "rule": (f"flagged when {col} is {'<=' if c.direction == 'low' else '>='} {thr:.4g}{how}; "
                     f"flagged and (lid_lpca < {c.lpca_low} or in a group of byte copies) -> dd (data-driven: "
                     "deduplicate); "
                     f"flagged and lid_gap_rel > {c.gap_margin} -> od (overfitting-driven: regularize), lid_gap_rel = "
                     "(the corpus's median lid_flipd among images of the same lid_lpca - lid_flipd) / "
                     f"{medians.get('lid_flipd') or float('nan'):.4g} (the median lid_flipd); "
                     "flagged otherwise -> none (suspected, no class)")}


def relative_gap(df: pd.DataFrame, thresholds: dict) -> pd.Series:
    """lid_gap_rel = (the typical lid_flipd for this image's LID_* - its lid_flipd) / the median lid_flipd: how far the
    model's manifold at the image drops below what the model gives images whose data neighbourhood has the same
    dimension (`typical_flipd`), in units of the typical image's LID_theta. The two estimators do not share a scale
    (local PCA counts at most lpca_k directions, FLIPD every direction the noise at t0 does not swamp), so LID_*
    enters through the images that share it rather than as a number of its own. NaN where a LID, the table or the
    median is missing, and for every row when the median lid_flipd is not a positive dimension."""
    t = thresholds or {}
    mf = (t.get("lid_medians") or {}).get("lid_flipd")
    typical = t.get("lid_flipd_typical")
    if "lid_flipd" not in df or "lid_lpca" not in df or not mf or mf <= 0 or not typical:
        return pd.Series(np.nan, index=df.index, dtype="float32")
    table = np.array([np.nan if x is None else x for x in typical], float)
    lid = df["lid_lpca"].astype(float).to_numpy()
    expected = np.full(len(df), np.nan)
    have = np.isfinite(lid)
    expected[have] = table[np.clip(np.rint(lid[have]).astype(np.int64), 0, len(table) - 1)]
    return pd.Series((expected - df["lid_flipd"].astype(float).to_numpy()) / mf, index=df.index, dtype="float32")


def copy_groups(dups: pd.DataFrame) -> set:
    """The duplicate groups that hold byte-identical images (a `bytes` link): copies for certain, where an embedding
    link may join two distinct look-alikes (on demo seed 0, 53 of 1,990 unique images sit in such groups)."""
    return set(dups.loc[dups["link"] == "bytes", "group_id"])


def classify(df: pd.DataFrame, cfg: ScanConfig, thresholds: dict | None = None,
             copies: np.ndarray | None = None) -> dict:
    """Adds `flagged`, `lid_gap_rel` and `mem_class` to one shard's rows (or any frame); `thresholds` from
    detector_threshold (None: the quantile and LID medians of this frame's rows); `copies`: rows in a duplicate
    group of byte-identical images (`copy_groups`; None: no neighbours). Returns the thresholds used.

    The manifold memorization hypothesis (docs/method.md §4) on flagged rows: LID_* below lpca_low, or a group of
    copies (a point of the data at any scale; local PCA sees copies only where an image has about lpca_k of
    them) -> dd (the data is low-dimensional there: duplicates, templates); else lid_gap_rel above gap_margin
    -> od (the model's manifold is lower than at images of the same LID_*, `relative_gap`); else none (flagged,
    but neither LID explains it)."""
    c = cfg.classify
    col = c.detector
    ok = df["error"].isna()
    if thresholds is None:
        if col not in df.columns or not df.loc[ok, col].notna().any():
            thresholds = {"detector": col, "note": "detector column absent: no model scores", "threshold": None}
        elif c.detector_threshold is not None:
            thresholds = {"detector": col, "direction": c.direction, "threshold": float(c.detector_threshold)}
        else:
            q = c.detector_quantile if c.direction == "low" else 1.0 - c.detector_quantile
            thresholds = {"detector": col, "direction": c.direction,
                          "threshold": float(np.nanquantile(df.loc[ok, col].astype(float), q)),
                          "quantile": c.detector_quantile}
        if "lid_flipd" in df and "lid_lpca" in df:
            thresholds["lid_medians"] = {k: float(np.nanmedian(df.loc[ok, k].astype(float)))
                                         if df.loc[ok, k].notna().any() else None for k in ("lid_flipd", "lid_lpca")}
            lid = df.loc[ok, "lid_lpca"].astype(float)
            if lid.notna().any():
                thresholds["lid_flipd_typical"] = typical_flipd(lid, df.loc[ok, "lid_flipd"], int(np.nanmax(lid)))
    df["lid_gap_rel"] = relative_gap(df, thresholds)
    thr = thresholds.get("threshold")
    if thr is None or col not in df.columns:
        df["flagged"] = False
        df["mem_class"] = np.where(ok, "none", None)
        return thresholds
    vals = df[col].astype(float)
    flagged = ok & flagged_at(vals, thr, c.direction)
    data_driven = df["lid_lpca"].astype(float) < c.lpca_low
    if copies is not None:
        data_driven = data_driven | np.asarray(copies, bool)
    gap = df["lid_gap_rel"].astype(float)
    df["flagged"] = flagged
    df["mem_class"] = np.select([~ok, flagged & data_driven, flagged & (gap > c.gap_margin)], [None, "dd", "od"],
                                "none")
    return thresholds


def verdicts(df: pd.DataFrame, in_group: np.ndarray, dropped: np.ndarray, replicated: np.ndarray) -> None:
    confirmed_by = in_group | replicated
    df["verdict"] = np.select(
        [df["error"].notna().to_numpy(), df["flagged"].to_numpy() & confirmed_by, df["flagged"].to_numpy(), dropped],
        [None, "confirmed", "suspected", "duplicate"], "clear")


def removal_reasons(df: pd.DataFrame, in_group: np.ndarray, dropped: np.ndarray, replicated: np.ndarray) -> pd.Series:
    """The first applicable reason of REMOVAL_ORDER per row (None: kept).

    Duplicates: every group member but the kept one. DD-Mem: only when not in a duplicate group
    (deduplication already fixes the others; the kept copy stays). OD-Mem and replicated: always.
    """
    mc = df["mem_class"].to_numpy()
    reason = np.select([dropped, (mc == "dd") & ~in_group, mc == "od", replicated],
                       REMOVAL_ORDER, None)
    return pd.Series(reason, index=df.index, dtype=object)


def removal_list(df: pd.DataFrame, dups: pd.DataFrame | None, replicated: set[str]) -> pd.DataFrame:
    """The removal list of a frame held in memory (tests, small tables): one row per key to remove."""
    keys = df["key"]
    in_group = keys.isin(set(dups["key"])).to_numpy() if dups is not None and len(dups) else np.zeros(len(df), bool)
    dropped = (keys.isin(set(dups.loc[~dups["keep"], "key"])).to_numpy() if dups is not None and len(dups)
               else np.zeros(len(df), bool))
    reason = removal_reasons(df, in_group, dropped, keys.isin(replicated).to_numpy())
    rem = pd.DataFrame({"key": keys, "shard": df["shard"], "reason": reason})[reason.notna().to_numpy()]
    return rem.sort_values(["reason", "key"], key=lambda s: s.map(REMOVAL_ORDER.index) if s.name == "reason" else s,
                           ignore_index=True)


class TableWriter:
    """A parquet table streamed row group by row group into `out` (a scanner.storage.Out: a local NAME.tmp renamed
    at close, or an object that appears whole at close)."""

    def __init__(self, out, rel: str, schema):
        import pyarrow.parquet as pq

        self.out, self.rel = out, rel
        self.schema = schema
        self.rows = 0
        self.upload = out.writer(rel)
        self.w = pq.ParquetWriter(self.upload.f, schema)

    def write(self, df: pd.DataFrame) -> None:
        from scanner.schema import to_arrow

        if len(df):
            self.w.write_table(to_arrow(df, self.schema))
            self.rows += len(df)

    def close(self) -> None:
        self.w.close()
        self.upload.commit()


def work_dir(cfg: ScanConfig, out) -> Path:
    """The corpus steps' local work folder: corpus.work_dir, else OUT/corpus-work for a local --out, else a folder
    in the system's temp directory named after the --out (work files are memory-mapped and appended to: they
    need a local disk)."""
    import hashlib
    import tempfile

    if cfg.corpus.work_dir:
        return Path(cfg.corpus.work_dir).expanduser().resolve()
    if out.local:
        return out.local_path("corpus-work")
    return Path(tempfile.gettempdir()) / f"memscan-work-{hashlib.sha256(out.uri().encode()).hexdigest()[:12]}"


def finalize(cfg: ScanConfig, out, shards: list[str], embedder: str | None = None,
             embedder_trained: bool = False) -> dict:
    """The corpus steps and every table. out: the scan's --out (a scanner.storage.Out, a path or a URL); embedder:
    the checkpoint the embed stage used (None: no neighbours)."""
    from scanner.corpus.groups import repeated_keys
    from scanner.storage import Out

    t0 = time.time()
    out = out if isinstance(out, Out) else Out(out)
    budget = cfg.corpus.budget_bytes
    work = work_dir(cfg, out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start_mem = memory_mb()
    store = PartStore(out, shards, cache=work / "cache")
    log.info(f"corpus steps: {store.n:,} rows in {len(store):,} shards within corpus.memory_gb = "
             f"{cfg.corpus.memory_gb:g} (work files in {work})")
    summary: dict = {"timings_s": {}, "corpus": {"memory_gb": cfg.corpus.memory_gb, "rows": store.n,
                                                 "shards": len(store)}}
    repeated = repeated_keys(store, work, budget)
    rep_gids = np.array(sorted(repeated), dtype=np.int64)
    masks = Masks(store, rep_gids)
    summary["timings_s"]["keys"] = round(time.time() - t0, 1)
    mem = summary["corpus"]["memory_mb"] = {"start": start_mem, "keys": memory_mb()}

    dups, reps = None, None
    dup_gids = dropped_gids = copy_gids = np.zeros(0, np.int64)
    replicated: set[str] = set()
    if embedder is not None and masks.counts["searched"]:
        from scanner.corpus.neighbours import corpus_neighbours

        t1 = time.time()
        model_dir = cfg.model.path if cfg.model.kind != "none" else None
        summary["neighbours"], dups, reps = corpus_neighbours(
            store, masks.select("searched"), cfg, embedder, embedder_trained, out, work, model_dir=model_dir)
        dup_gids = np.sort(dups["gid"].to_numpy())
        dropped_gids = np.sort(dups.loc[~dups["keep"], "gid"].to_numpy())
        copy_gids = np.sort(dups.loc[dups["group_id"].isin(copy_groups(dups)), "gid"].to_numpy())
        if reps is not None:
            replicated = set(reps.loc[reps["replicated"], "matched_key"])
        summary["timings_s"]["neighbours"] = round(time.time() - t1, 1)
        mem["neighbours"] = memory_mb()

    lids = None
    if cfg.model.kind != "none" and masks.counts["ok"]:
        t1 = time.time()
        summary["local_pca"], lids = lid_lpca(store, masks, cfg, work)
        summary["lpca_neighbours"] = summary["local_pca"].get("space")
        summary["timings_s"]["local_pca"] = round(time.time() - t1, 1)
        mem["local_pca"] = memory_mb()
    thresholds = detector_threshold(store, masks, cfg, lids)

    # one pass over the shards: classes, verdicts, scores/, errors and removal rows
    t1 = time.time()
    log.info(f"corpus steps: writing the tables of {len(store):,} shards")
    schema = scores_schema(sorted(c for c in store.columns if c.startswith(P_LAPLACE_PREFIX)))
    errors_w = TableWriter(out, "errors.parquet", ERRORS)
    removal_w = {r: TableWriter(Out(work), f"removal-{r}.parquet", REMOVAL) for r in REMOVAL_ORDER}
    mem_class, verdict = pd.Series(dtype="int64"), pd.Series(dtype="int64")
    shard_errors = scored = 0
    stage_errors = {"read": 0, "embed": 0, "score": 0}
    for i, name in enumerate(store.names):
        df = store.read(i)
        for c in ("error", "error_stage", "embed_error", "caption", "sha256"):
            if c not in df:
                df[c] = None
        has_key = df["key"].notna().to_numpy()
        bad = df.loc[~has_key, ["key", "shard", "error"]].assign(stage="read")
        shard_errors += len(bad)
        gids = store.offsets[i] + np.flatnonzero(has_key)
        df = df[has_key].reset_index(drop=True)
        for j in np.flatnonzero(member(rep_gids, gids)):
            if pd.isna(df.at[j, "error"]):
                df.at[j, "error_stage"], df.at[j, "error"] = "read", repeated[int(gids[j])]
        stage_errors["read"] += int(df["error_stage"].isin(["read", "decode"]).sum())
        stage_errors["embed"] += int(df["embed_error"].notna().sum())
        stage_errors["score"] += int((df["error_stage"] == "score").sum())
        lid = np.full(len(df), np.nan, np.float32)
        if lids is not None:
            r = lids.read(i)
            lid[np.searchsorted(gids, r["gid"])] = lpca_count(r["spec"], thresholds, cfg)
        df["lid_lpca"] = lid
        df["lid_gap"] = df["lid_lpca"] - df["lid_flipd"] if "lid_flipd" in df else np.nan
        in_group = member(dup_gids, gids)
        classify(df, cfg, thresholds, copies=member(copy_gids, gids))
        dropped = member(dropped_gids, gids)
        rep = df["key"].isin(replicated).to_numpy()
        verdicts(df, in_group, dropped, rep)
        for col in ("lid_flipd", "lid_nb", "score_norm", "score_norm_cal", "loss_cal", "cfg_norm"):
            if col not in df:
                df[col] = np.nan
        out.write_parquet(f"scores/{name}.parquet", df, schema)

        emb = df.loc[df["embed_error"].notna() & df["error"].isna(), ["key", "shard", "embed_error"]]
        errors_w.write(pd.concat([
            df.loc[df["error"].notna(), ["key", "shard", "error_stage", "error"]].rename(columns={"error_stage": "stage"}),
            bad, emb.rename(columns={"embed_error": "error"}).assign(stage="embed")], ignore_index=True))
        reason = removal_reasons(df, in_group, dropped, rep)
        rem = pd.DataFrame({"key": df["key"], "shard": df["shard"], "reason": reason})[reason.notna().to_numpy()]
        for r, part in rem.sort_values("key").groupby("reason", sort=False):
            removal_w[r].write(part)
        mem_class = mem_class.add(df["mem_class"].value_counts(), fill_value=0)
        verdict = verdict.add(df["verdict"].value_counts(), fill_value=0)
        scored += int(df["error"].isna().sum())
        if len(store) >= 20 and (i + 1) % max(1, len(store) // 10) == 0:
            log.info(f"corpus steps: tables of {i + 1:,}/{len(store):,} shards written")
    errors_w.close()
    for w in removal_w.values():
        w.close()
    removed = write_removal_list(out, [work / f"removal-{r}.parquet" for r in REMOVAL_ORDER])

    if dups is not None:
        out.write_parquet("duplicates.parquet", dups.drop(columns="gid"), DUPLICATES)
    if reps is not None:
        out.write_parquet("replications.parquet", reps, REPLICATIONS)
    summary["timings_s"]["tables"] = round(time.time() - t1, 1)
    mem["tables"] = memory_mb()

    by_reason = {r: removal_w[r].rows for r in REMOVAL_ORDER if removal_w[r].rows}
    summary["counts"] = {
        "seen": masks.counts["has_key"],
        "scored": scored if cfg.model.kind != "none" else 0,
        "embedded": masks.counts["searched"] if embedder is not None else 0,
        "errors": errors_w.rows,
        "shard_errors": shard_errors,
        "duplicate_groups": int(dups["group_id"].nunique()) if dups is not None and len(dups) else 0,
        "duplicates": int((~dups["keep"]).sum()) if dups is not None and len(dups) else 0,
        "removed": removed,
        "removed_by_reason": by_reason,
        "mem_class": {k: int(v) for k, v in mem_class.items()},
        "verdict": {k: int(v) for k, v in verdict.items()},
    }
    n = masks.counts["has_key"]
    summary["stages"] = {"read": {"rows_in": n, "rows_out": n, "error_rows": stage_errors["read"],
                                  "shard_errors": shard_errors}}
    if embedder is not None:
        summary["stages"]["embed"] = {"rows_in": n, "rows_out": n, "error_rows": stage_errors["embed"]}
    if cfg.model.kind != "none":
        summary["stages"]["score"] = {"rows_in": n, "rows_out": n, "error_rows": stage_errors["score"]}
    summary["thresholds"] = thresholds
    shutil.rmtree(work, ignore_errors=True)
    summary["timings_s"]["finalize"] = round(time.time() - t0, 1)
    return summary


def write_removal_list(out, parts: list[Path]) -> int:
    """removal_list.parquet and .txt into `out` (a scanner.storage.Out) from the local per-reason files, in
    REMOVAL_ORDER, streamed. Returns the rows."""
    import pyarrow.parquet as pq

    w = TableWriter(out, "removal_list.parquet", REMOVAL)
    txt = out.writer("removal_list.txt")
    for p in parts:
        f = pq.ParquetFile(p)
        for b in range(f.num_row_groups):
            t = f.read_row_group(b)
            w.w.write_table(t)
            w.rows += t.num_rows
            txt.f.write("".join(f"{k}\n" for k in t.column("key").to_pylist()).encode("utf-8"))
    w.close()
    txt.commit()
    return w.rows
