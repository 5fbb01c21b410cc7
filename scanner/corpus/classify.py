"""The classes, verdicts and removal reasons of a scored row, and the cut that flags it (docs/method.md §4, §13).

- thresholds(cfg, values, spectra, held): the `cut` step's arithmetic on a sample of the corpus: the detector's
  cut (a quantile of the corpus, a fixed number, or from held-out images: scanner.corpus.calibrate), the corpus
  level of local PCA (LID_*), the medians and the typical lid_flipd per LID_* that OD-Mem compares to;
- classify / verdicts / removal_reasons: what the `tables` step applies to each shard's rows with them.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from scanner.corpus.calibrate import flagged_at

log = logging.getLogger("memscan")

REMOVAL_ORDER = ["reference", "duplicate", "dd_mem", "od_mem", "replicated"]
TYPICAL_MIN_ROWS = 30  # rows behind each LID_* value's typical lid_flipd (typical_flipd)


def copy_groups(dups: pd.DataFrame) -> set:
    """The duplicate groups that hold byte-identical images (a `bytes` link): copies for certain, where an embedding
    link may join two distinct look-alikes (on demo seed 0, 53 of 1,990 unique images sit in such groups)."""
    return set(dups.loc[dups["link"] == "bytes", "group_id"])


def lpca_count(spec: np.ndarray, thresholds: dict, cfg) -> np.ndarray:
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


def classify(df: pd.DataFrame, cfg, thresholds: dict | None = None,
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


def removal_reasons(df: pd.DataFrame, in_group: np.ndarray, dropped: np.ndarray, replicated: np.ndarray,
                    reference: np.ndarray | None = None) -> pd.Series:
    """The first applicable reason of REMOVAL_ORDER per row (None: kept).

    Reference: in a group with a reference set's image. Duplicates: every group member but the kept one. DD-Mem:
    only when not in a duplicate group (deduplication already fixes the others; the kept copy stays). OD-Mem and
    replicated: always.
    """
    mc = df["mem_class"].to_numpy()
    ref = np.zeros(len(df), bool) if reference is None else reference
    reason = np.select([ref, dropped, (mc == "dd") & ~in_group, mc == "od", replicated],
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


def thresholds(cfg, values: dict[str, np.ndarray], spectra: np.ndarray | None, held: dict | None,
               rate: float = 1.0) -> dict:
    """The classify thresholds from a (seeded Bernoulli, `rate`) sample of the scored rows: values[column] for the
    detector and lid_flipd, spectra: the same rows' local-PCA spectra (None: no LID_*), held: heldout_scores'
    result (None: no calibration_shards). The detector's cut (given, the detector_quantile of the corpus, or from the
    held-out images and the corpus's ordinary members), the corpus level of local PCA, the medians of lid_flipd and
    lid_lpca and lid_flipd's typical value per LID_* (what OD-Mem compares to)."""
    from scanner.corpus.calibrate import calibrated_cut, cut_fpr_interval, member_cut

    c = cfg.classify
    col = c.detector
    if col not in values:
        return {"detector": col, "note": "detector column absent: no model scores", "threshold": None}
    v = {k: np.asarray(x, float) for k, x in values.items()}
    lpca: dict = {}
    if spectra is not None and len(spectra):
        spec = np.asarray(spectra, np.float32)
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
    if held is not None:
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
                       "images": held["images"], "errors": held["errors"], "shards": held["shards"],
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


# ---- the `cut` step

def _cut_map(store, cols: list[str], rate: float, seed: int, has_lid: bool, i: int) -> dict | None:
    """A seeded Bernoulli sample of shard i's ok rows: the columns and, with `has_lid`, their spectra."""
    from scanner.corpus.rows import masks, read_shard_file

    ok = masks(store, i)["ok"]
    if not ok.any():
        return None
    keep = np.random.default_rng([seed, i]).random(int(ok.sum())) < rate if rate < 1.0 else np.ones(int(ok.sum()),
                                                                                                     bool)
    df = store.read(i, cols)
    out = {c: df[c].astype(float).to_numpy()[ok][keep] for c in cols}
    if has_lid:
        r = read_shard_file(store, "lid", i)
        width = len(r["spec"].iloc[0]) if r is not None and len(r) else 1
        spec = np.full((int(ok.sum()), width), np.nan, np.float32)
        if r is not None and len(r):  # one record per ok row the search asked for: align them to the ok rows
            spec[np.searchsorted(store.offsets[i] + np.flatnonzero(ok), r["gid"].to_numpy())] = np.stack(
                r["spec"].to_numpy())
        out["_spec"] = spec[keep]
    return out


def run_cut(ctx) -> dict:
    """The `cut` step: thresholds() on a sample of at most corpus.detector_sample scored rows (a task per shard),
    written to corpus/cut/thresholds.json."""
    from scanner.corpus.executor import concat

    cfg, store, ex = ctx.cfg, ctx.store, ctx.executor
    col = cfg.classify.detector
    if ctx.prior.get("cut") is not None:  # --against: the old scan's cut, so that old and new rows mean the same
        t = {**ctx.prior["cut"], "from_scan": ctx.prior["cut_from"]}
        ctx.out.write_json(f"{ctx.step_dir('cut')}/thresholds.json", t)
        return {"threshold": t.get("threshold"), "detector": t.get("detector"), "from_scan": ctx.prior["cut_from"]}
    if cfg.model.kind == "none" or col not in store.columns:
        t = {"detector": col, "note": "detector column absent: no model scores", "threshold": None}
    else:
        cols = [col] + [x for x in ("lid_flipd",) if x in store.columns and x != col]
        ok_rows = int(ctx.info.get("lid", {}).get("n") or store.n)
        rate = min(1.0, cfg.corpus.detector_sample / max(ok_rows, 1))
        has_lid = ctx.has("lid") and bool(ctx.info["lid"].get("rows"))
        import functools

        sample = concat(ex.batches(ex.from_items(functools.partial(_cut_map, store, cols, rate, cfg.seed, has_lid),
                                                 range(len(store)))))
        values = {c: sample[c] if sample else np.zeros(0) for c in cols}
        spectra = sample["_spec"] if sample and has_lid else None
        held = None
        if cfg.classify.calibration_shards:
            from scanner.corpus.calibrate import heldout_scores

            held = heldout_scores(cfg, ctx.out)
        t = thresholds(cfg, values, spectra, held, rate)
    ctx.out.write_json(f"{ctx.step_dir('cut')}/thresholds.json", t)
    return {"threshold": t.get("threshold"), "detector": col}
