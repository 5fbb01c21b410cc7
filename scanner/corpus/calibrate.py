"""The detector's cut from held-out images: a false-positive rate on non-members, the same for every model.

A fixed cut on a memorization score (score_norm_cal <= 0.8) means different things under different models: a
model that memorized less, or whose ratios sit lower everywhere, flags far fewer or far more images at the same
number (benchmarks/results/detection.md: 171 vs 477 of 480 repeated images over two demo models). Membership
inference sets its threshold where it flags a chosen share of images the model never trained on; memscan does
the same when `classify.calibration_shards` names such images: they go through the scan's own read and score
stages as held-out rows (the score stage computes the detector alone for them, the value it gives in a full scan)
and land in heldout/; the cut is the detector's `calibration_fpr` quantile over them (its `calibration_fpr`
lowest values for a low-flags column). This module reads part files only: it loads no model.

Members sit lower than non-members on every image, memorized or not: the model's membership signal. At the held-out
cut the demo flags 2-4 % of its unique members, not 1 %. With `classify.calibration_members` the cut must also
flag no more than `calibration_fpr` of the corpus's ordinary members (`member_cut`): the corpus' own values, a few of
them memorized, read through their median and MAD, which a memorized tail does not move.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("memscan")


def _finite(values: np.ndarray, direction: str, where: str) -> np.ndarray:
    """The finite detector values, after checking there are some and that `direction` is low or high."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        raise ValueError(f"no finite detector value on {where}")
    if direction not in ("low", "high"):
        raise ValueError(f"direction must be 'low' or 'high', got {direction!r}")
    return v


def flagged_at(values, cut: float, direction: str) -> np.ndarray:
    """Which values a cut flags: at or below it for a low-flags column, at or above it for a high one."""
    v = np.asarray(values, dtype=float)
    return v <= cut if direction == "low" else v >= cut


def calibrated_cut(values: np.ndarray, fpr: float, direction: str) -> float:
    """The cut that flags a share `fpr` of `values` (the detector on held-out images) in `direction`."""
    v = _finite(values, direction, "the held-out images")
    return float(np.quantile(v, fpr if direction == "low" else 1.0 - fpr))


def member_cut(values: np.ndarray, fpr: float, direction: str) -> dict:
    """The cut that flags a share `fpr` of a corpus's ordinary members: the detector over the scanned rows, some of
    them memorized, modelled as a normal law with a robust centre and spread (median m, s = 1.4826 x the median
    absolute deviation, which estimates the standard deviation of a normal; a memorized tail of a few % moves them
    little, and a larger one only outwards, so that the cut flags fewer ordinary members, not more): m - z s for a
    low-flags column, m + z s for a high one, z = Phi^-1(1 - fpr).

    Returns {"cut", "median", "scale", "z", "rows"}."""
    from scipy.stats import norm

    v = _finite(values, direction, "the corpus")
    m = float(np.median(v))
    s = 1.4826 * float(np.median(np.abs(v - m)))
    z = float(norm.ppf(1.0 - fpr))
    return {"cut": m - z * s if direction == "low" else m + z * s, "median": m, "scale": s, "z": z, "rows": len(v)}


def cut_fpr_interval(n: int, fpr: float, level: float = 0.95) -> tuple[float, float]:
    """Where the false-positive rate of `calibrated_cut` on `n` held-out images really lies, over draws of them.

    The cut is (interpolated between) the k-th and (k+1)-th lowest of n values, k = floor(fpr (n - 1)) + 1; for
    n i.i.d. non-member values from any continuous distribution F, F(k-th lowest) ~ Beta(k, n - k + 1)
    (order statistics of uniforms). The interval runs from the lower quantile of the k-th's law to the upper
    one of the (k+1)-th's, so it covers the interpolated cut too: with n = 500 and fpr = 0.01 the rate the
    scan applies lies in about 0.3-2.3 %, and only more held-out images narrow it.
    """
    from scipy.stats import beta

    if n < 1 or not 0.0 < fpr < 1.0:
        raise ValueError(f"need n >= 1 held-out images and 0 < fpr < 1, got n={n}, fpr={fpr}")
    k = int(np.floor(fpr * (n - 1))) + 1
    tail = (1.0 - level) / 2
    lo = float(beta.ppf(tail, k, n - k + 1))
    hi = float(beta.ppf(1.0 - tail, min(k + 1, n), n - min(k + 1, n) + 1))
    return lo, hi


def heldout_scores(cfg, out) -> dict:
    """The detector on this scan's held-out shards (heldout/_shards.json: classify.calibration_shards, by name), as the
    scan's score stage wrote it into `out` (a path, URL or scanner.storage.Out; heldout/NAME.parquet: those shards
    went through the scan's read and score stages as held-out rows, the detector alone).

    Returns {"values": the detector on each readable, finitely scored image, the first
    classify.calibration_max_images in shard order, "images", "errors" (rows that failed to read or score),
    "shards"}.
    """
    import pandas as pd

    from scanner.errors import ScanIncomplete
    from scanner.storage import HELDOUT_LIST, Out, part_name

    out = out if isinstance(out, Out) else Out(out)
    c = cfg.classify
    if not out.exists(HELDOUT_LIST):
        raise ScanIncomplete(f"{out.uri(HELDOUT_LIST)} is missing: the scan did not list its held-out shards; rerun the "
                             "same command")
    shards = out.read_json(HELDOUT_LIST)
    values, errors = [], 0
    for s in shards:
        rel = part_name(s, "heldout")
        if not out.exists(rel):
            raise ScanIncomplete(f"the held-out shard {s} has no scored part ({out.uri(rel)}): rerun the same command")
        df = out.read_parquet(rel)
        df = df[df["key"].notna()]
        col = df[c.detector].astype(float) if c.detector in df else pd.Series(np.nan, index=df.index)
        ok = df["error"].isna() & np.isfinite(col)
        errors += int((~ok).sum())
        values.append(col[ok].to_numpy())
    vals = np.concatenate(values)[:c.calibration_max_images] if values else np.zeros(0)
    if not len(vals):
        from scanner.errors import ConfigError

        raise ConfigError(f"classify.calibration_shards: none of the held-out images in {', '.join(shards)} could be "
                          f"read and scored ({errors} error rows), so there is no cut; fix or unset it and rerun into "
                          "a new --out")
    log.info("classify: %d held-out images scored for the detector's cut (%d unreadable or unscored)", len(vals),
             errors)
    return {"values": vals, "images": len(vals), "errors": errors, "shards": [str(s) for s in shards]}
