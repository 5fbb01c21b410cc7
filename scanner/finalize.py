"""Finalize a scan: the corpus-wide steps that need every shard's rows.

Reads parts/*.parquet (+ vectors/*.npy) written by the streaming stage, then:
- neighbours (optional): embeddings, duplicate groups -> duplicates.parquet (scanner.neighbours.run);
- LID_* by local PCA on model-space neighbours (faiss exact kNN, batched eigendecompositions);
- mem_class from the detector column and LID_* (method.md §4), verdict combining both halves;
- scores/NAME.parquet per shard, errors.parquet, removal_list.{parquet,txt}; returns the summary.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from scanner.config import ScanConfig
from scanner.data.shards import REPEATED_KEY_ERROR, shard_name
from scanner.files import atomic_write_parquet, atomic_write_text

log = logging.getLogger("memscan")

SCORE_COLUMNS_FIRST = ["key", "shard", "caption", "width", "height", "lid_flipd", "lid_nb", "lid_lpca", "lid_gap"]
SCORE_COLUMNS_LAST = ["score_norm", "score_norm_cal", "cfg_norm", "mem_class", "verdict", "error"]
REMOVAL_ORDER = ["duplicate", "dd_mem", "od_mem", "replicated"]


def load_parts(out: Path, shards: list[str]) -> tuple[pd.DataFrame, np.ndarray | None]:
    frames, vecs = [], []
    for p in shards:
        name = shard_name(p)
        df = pd.read_parquet(out / "parts" / f"{name}.parquet")
        frames.append(df)
        vp = out / "vectors" / f"{name}.npy"
        if vp.exists():
            vecs.append(np.load(vp))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["key", "shard", "error"])
    vectors = np.concatenate(vecs) if vecs and sum(len(v) for v in vecs) == len(df) else None
    return df, vectors


def lid_lpca_model_space(vectors: np.ndarray, ok: np.ndarray, k: int, alpha: float, chunk: int = 512,
                         search: np.ndarray | None = None) -> np.ndarray:
    """LID_* of each ok row from its k nearest ok rows (itself included). NaN elsewhere.

    The local PCA always runs on `vectors` (model space, where LID_theta lives too); the neighbours
    are searched in `search` (e.g. CLIP embeddings, rows aligned with `vectors`) when given, else in
    model space. Searching in a compact embedding is what scales: model-space vectors of SD latents
    are 16384-d.
    """
    import faiss
    import torch

    from scanner.geometry.local_pca import local_pca

    out = np.full(len(vectors), np.nan, np.float32)
    idx = np.flatnonzero(ok)
    if len(idx) < 2:
        return out
    x = np.ascontiguousarray(vectors[idx], dtype=np.float32)
    q = x if search is None else np.ascontiguousarray(search[idx], dtype=np.float32)
    kk = min(k + 1, len(idx))
    index = faiss.IndexFlatL2(q.shape[1])
    index.add(q)
    for s in range(0, len(idx), chunk):
        _, nn = index.search(q[s:s + chunk], kk)
        out[idx[s:s + chunk]] = local_pca(torch.from_numpy(x[nn]), alpha).numpy()
    return out


def _embeddings_aligned(data: dict, keys: pd.Series, ok: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """CLIP vectors (`data` as store.load_embeddings gives it) row-aligned with `keys`, zeros where a key has
    none, and `ok` narrowed to keys that have one."""
    if not len(data["keys"]):
        return None, ok
    row = {k: i for i, k in enumerate(data["keys"])}
    pos = keys.map(row)
    have = pos.notna().to_numpy()
    out = np.zeros((len(keys), data["vectors"].shape[1]), np.float32)
    out[have] = data["vectors"][pos[have].astype(int).to_numpy()]
    return out, ok & have


def classify(df: pd.DataFrame, cfg: ScanConfig) -> dict:
    """Adds `flagged` and `mem_class`; returns the thresholds used (for summary.json and the report)."""
    c = cfg.classify
    col = c.detector
    ok = df["error"].isna()
    if col not in df.columns or not df.loc[ok, col].notna().any():
        df["flagged"] = False
        df["mem_class"] = np.where(ok, "none", None)
        return {"detector": col, "note": "detector column absent: no model scores", "threshold": None}
    vals = df[col].astype(float)
    if c.detector_threshold is not None:
        thr = float(c.detector_threshold)
    else:
        q = c.detector_quantile if c.detector_direction == "low" else 1.0 - c.detector_quantile
        thr = float(np.nanquantile(vals[ok], q))
    flagged = ok & ((vals <= thr) if c.detector_direction == "low" else (vals >= thr))
    low_lid = df["lid_lpca"].astype(float) < c.lpca_low
    gap_ok = df["lid_gap"].isna() | (df["lid_gap"].astype(float) > c.gap_margin)
    df["flagged"] = flagged
    df["mem_class"] = np.select([~ok, flagged & low_lid, flagged & ~low_lid & gap_ok], [None, "dd", "od"], "none")
    return {"detector": col, "direction": c.detector_direction, "threshold": thr,
            "quantile": None if c.detector_threshold is not None else c.detector_quantile,
            "lpca_low": c.lpca_low, "gap_margin": c.gap_margin,
            "rule": (f"flagged when {col} is {'<=' if c.detector_direction == 'low' else '>='} {thr:.4g}; "
                     f"flagged and lid_lpca < {c.lpca_low} -> dd (data-driven: deduplicate); "
                     f"flagged otherwise -> od (overfitting-driven: regularize)")}


def verdicts(df: pd.DataFrame, dups: pd.DataFrame | None, replicated: set[str]) -> None:
    in_group = df["key"].isin(set(dups["key"])) if dups is not None and len(dups) else pd.Series(False, df.index)
    dropped = df["key"].isin(set(dups.loc[~dups["keep"], "key"])) if dups is not None and len(dups) else in_group
    confirmed_by = in_group | df["key"].isin(replicated)
    df["verdict"] = np.select(
        [df["error"].notna(), df["flagged"] & confirmed_by, df["flagged"], dropped],
        [None, "confirmed", "suspected", "duplicate"], "clear")


def removal_list(df: pd.DataFrame, dups: pd.DataFrame | None, replicated: set[str]) -> pd.DataFrame:
    """One row per key to remove, with the first applicable reason of REMOVAL_ORDER.

    Duplicates: every group member but the kept one. DD-Mem: only when not in a duplicate group
    (deduplication already fixes the others; the kept copy stays). OD-Mem and replicated: always.
    """
    rows = []
    grouped = set(dups["key"]) if dups is not None and len(dups) else set()
    if dups is not None and len(dups):
        rows += [(k, "duplicate") for k in dups.loc[~dups["keep"], "key"]]
    rows += [(k, "dd_mem") for k in df.loc[(df["mem_class"] == "dd") & ~df["key"].isin(grouped), "key"]]
    rows += [(k, "od_mem") for k in df.loc[df["mem_class"] == "od", "key"]]
    rows += [(k, "replicated") for k in sorted(replicated)]
    rem = pd.DataFrame(rows, columns=["key", "reason"]).drop_duplicates("key", keep="first")
    shard_of = dict(zip(df["key"], df["shard"]))
    rem.insert(1, "shard", rem["key"].map(shard_of))
    return rem.sort_values(["reason", "key"], key=lambda s: s.map(REMOVAL_ORDER.index) if s.name == "reason" else s,
                           ignore_index=True)


def finalize(cfg: ScanConfig, out: Path, shards: list[str], progress: bool = False) -> dict:
    t0 = time.time()
    df, vectors = load_parts(out, shards)
    shard_errors = df[df["key"].isna()]
    has_key = df["key"].notna().to_numpy()
    df = df[has_key].reset_index(drop=True)
    if vectors is not None:
        vectors = vectors[has_key]

    # The same key in two shards is reported, not merged: both rows stay, each gets an error.
    dup_key = df["key"].duplicated(keep=False)
    if dup_key.any():
        df.loc[dup_key & df["error"].isna(), "error_stage"] = "read"
        df.loc[dup_key & df["error"].isna(), "error"] = REPEATED_KEY_ERROR

    summary: dict = {"timings_s": {}}
    dups = None
    embeddings = None
    replicated: set[str] = set()
    if cfg.neighbours.enabled:
        from scanner.neighbours.run import dedup_corpus

        model_dir = cfg.model.path if cfg.model.kind != "none" else None
        summary["neighbours"], embeddings = dedup_corpus(shards, out, cfg.neighbours, log=log.info,
                                                         model_dir=model_dir, allow_pickle=cfg.model.allow_pickle,
                                                         use_ray=True, progress=progress)
        dups = pd.read_parquet(out / "duplicates.parquet")
        if (out / "replications.parquet").exists() and model_dir and cfg.neighbours.generations > 0:
            reps = pd.read_parquet(out / "replications.parquet")
            replicated = set(reps.loc[reps["replicated"], "matched_key"])
        summary["timings_s"]["neighbours"] = round(time.time() - t0, 1)

    ok = df["error"].isna().to_numpy()
    if vectors is not None and cfg.model.kind != "none":
        t1 = time.time()
        search = None
        if cfg.geometry.lpca_space == "clip" and embeddings is not None:
            search, ok = _embeddings_aligned(embeddings, df["key"], ok)
        df["lid_lpca"] = lid_lpca_model_space(vectors, ok, cfg.geometry.lpca_k, cfg.geometry.lpca_alpha,
                                              search=search)
        summary["lpca_neighbours"] = "clip" if search is not None else "model"
        summary["timings_s"]["local_pca"] = round(time.time() - t1, 1)
    else:
        df["lid_lpca"] = np.nan
    df["lid_gap"] = df["lid_lpca"] - df["lid_flipd"] if "lid_flipd" in df else np.nan
    thresholds = classify(df, cfg)
    verdicts(df, dups, replicated)

    # scores/: the interface columns first, every configured p-Laplace column, then the rest.
    for col in ("lid_flipd", "lid_nb", "score_norm", "score_norm_cal", "cfg_norm"):
        if col not in df:
            df[col] = np.nan
    p_cols = sorted(c for c in df.columns if c.startswith("p_laplace_"))
    cols = SCORE_COLUMNS_FIRST + p_cols + SCORE_COLUMNS_LAST
    for name, part in df.groupby("shard", sort=True):
        atomic_write_parquet(part[cols].reset_index(drop=True), out / "scores" / f"{name}.parquet")

    errors = pd.concat([
        df.loc[df["error"].notna(), ["key", "shard", "error_stage", "error"]],
        shard_errors[["key", "shard", "error_stage", "error"]].assign(error_stage="read"),
    ], ignore_index=True).rename(columns={"error_stage": "stage"})
    if embeddings is not None:  # samples the embedder could not read (dedup_corpus already loaded them)
        emb_err = embeddings["errors"].assign(stage="embed")
        errors = pd.concat([errors, emb_err[~emb_err["key"].isin(set(errors["key"]))]], ignore_index=True)
    atomic_write_parquet(errors[["key", "shard", "stage", "error"]], out / "errors.parquet")

    rem = removal_list(df, dups, replicated)
    atomic_write_parquet(rem, out / "removal_list.parquet")
    atomic_write_text("".join(f"{k}\n" for k in rem["key"]), out / "removal_list.txt")

    summary["counts"] = {
        "seen": len(df),
        "scored": int(df["error"].isna().sum()),
        "errors": len(errors),
        "shard_errors": len(shard_errors),
        "duplicates": int((~dups["keep"]).sum()) if dups is not None and len(dups) else 0,
        "removed": len(rem),
        "removed_by_reason": rem["reason"].value_counts().to_dict(),
        "mem_class": df["mem_class"].value_counts().to_dict(),
        "verdict": df["verdict"].value_counts().to_dict(),
    }
    summary["thresholds"] = thresholds
    summary["timings_s"]["finalize"] = round(time.time() - t0, 1)
    return summary
