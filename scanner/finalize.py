"""Finalize a scan: the corpus-wide steps that need every shard's rows.

Reads parts/*.parquet (+ vectors/*.npy, embeddings/*.npy) written by the stages, then:
- neighbours (when embedded): duplicate groups and replications (scanner.neighbours.run);
- LID_* by local PCA on model-space neighbours (faiss exact kNN, batched eigendecompositions);
- mem_class from the detector column and LID_* (method.md §4), verdict combining both halves;
and is the one writer of every user-facing table: scores/NAME.parquet per shard, duplicates.parquet,
replications.parquet, errors.parquet, removal_list.{parquet,txt}. Returns the summary.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from scanner.config import ScanConfig
from scanner.data.keys import repeated_key_errors
from scanner.data.shards import shard_name
from scanner.files import atomic_write_parquet, atomic_write_text
from scanner.schema import DUPLICATES, ERRORS, P_LAPLACE_PREFIX, REMOVAL, REPLICATIONS, scores_schema

log = logging.getLogger("memscan")

REMOVAL_ORDER = ["duplicate", "dd_mem", "od_mem", "replicated"]


def load_parts(out: Path, shards: list[str]) -> tuple[pd.DataFrame, np.ndarray | None, np.ndarray | None]:
    """Every shard's part rows, and the model-space vectors and embeddings row-aligned with them (None when
    that stage did not run)."""
    frames: list[pd.DataFrame] = []
    arrays: dict[str, list[np.ndarray]] = {"vectors": [], "embeddings": []}
    for p in shards:
        name = shard_name(p)
        frames.append(pd.read_parquet(out / "parts" / f"{name}.parquet"))
        for folder, got in arrays.items():
            f = out / folder / f"{name}.npy"
            if f.exists():
                got.append(np.load(f))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["key", "shard", "error"])
    for c in ("error", "error_stage", "embed_error", "caption", "sha256"):
        if c not in df:
            df[c] = None
    aligned = {k: np.concatenate(v) if v and sum(len(a) for a in v) == len(df) else None for k, v in arrays.items()}
    return df, aligned["vectors"], aligned["embeddings"]


def neighbour_rows(df: pd.DataFrame, embeddings: np.ndarray) -> tuple[dict, np.ndarray]:
    """The rows duplicate search runs on, as scanner.neighbours.run.neighbours takes them, and their mask.

    A row is searched when it has a key, was read and decoded (a scoring failure does not exclude it:
    the picture is still there), embedded, and its key is not repeated.
    """
    ok = (df["key"].notna() & df["embed_error"].isna() & ~df["error_stage"].isin(["read", "decode"])
          & ~df["key"].duplicated(keep=False)).to_numpy()  # a repeated key whose copy failed scoring, too
    good = df[ok]
    data = {"keys": good["key"].tolist(), "shards": good["shard"].tolist(), "captions": good["caption"].tolist(),
            "sha256": good["sha256"].tolist(), "pixels": (good["width"] * good["height"]).astype("int64").tolist(),
            "phash": good["phash"].astype("int64").to_numpy().view(np.uint64),
            "vectors": np.ascontiguousarray(embeddings[ok], dtype=np.float32)}
    return data, ok


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


def finalize(cfg: ScanConfig, out: Path, shards: list[str], embedder: str | None = None,
             embedder_trained: bool = False) -> dict:
    """The corpus steps and every table. embedder: the checkpoint the embed stage used (None: no neighbours)."""
    t0 = time.time()
    df, vectors, embeddings = load_parts(out, shards)
    shard_errors = df[df["key"].isna()]
    has_key = df["key"].notna().to_numpy()
    df = df[has_key].reset_index(drop=True)
    vectors = vectors[has_key] if vectors is not None else None
    embeddings = embeddings[has_key] if embeddings is not None else None

    # The same key in two shards is reported, not merged: both rows stay, each gets an error.
    repeated = pd.Series(repeated_key_errors(df["key"].tolist(), df["shard"].tolist()), index=df.index, dtype=object)
    fill = repeated.notna() & df["error"].isna()
    if fill.any():
        df.loc[fill, "error_stage"] = "read"
        df.loc[fill, "error"] = repeated[fill]

    summary: dict = {"timings_s": {}}
    dups, reps = None, None
    replicated: set[str] = set()
    searched = None
    if embedder is not None and embeddings is not None:
        from scanner.neighbours.run import neighbours

        data, searched = neighbour_rows(df, embeddings)
        model_dir = cfg.model.path if cfg.model.kind != "none" else None
        summary["neighbours"], dups, reps = neighbours(data, cfg.neighbours, embedder, embedder_trained, out,
                                                       model_dir=model_dir, allow_pickle=cfg.model.allow_pickle,
                                                       seed=cfg.seed, log=log.info)
        if reps is not None:
            replicated = set(reps.loc[reps["replicated"], "matched_key"])
        summary["timings_s"]["neighbours"] = round(time.time() - t0, 1)

    ok = df["error"].isna().to_numpy()
    if vectors is not None and cfg.model.kind != "none":
        t1 = time.time()
        search = None
        if cfg.geometry.lpca_space == "clip" and searched is not None:
            search, ok = embeddings, ok & searched
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
    schema = scores_schema([c for c in df.columns if c.startswith(P_LAPLACE_PREFIX)])
    for name, part in df.groupby("shard", sort=True):
        atomic_write_parquet(part, out / "scores" / f"{name}.parquet", schema)

    embed_errors = df.loc[df["embed_error"].notna() & df["error"].isna(), ["key", "shard", "embed_error"]]
    errors = pd.concat([
        df.loc[df["error"].notna(), ["key", "shard", "error_stage", "error"]],
        shard_errors[["key", "shard", "error_stage", "error"]].assign(error_stage="read"),
        embed_errors.rename(columns={"embed_error": "error"}).assign(error_stage="embed"),
    ], ignore_index=True).rename(columns={"error_stage": "stage"})
    atomic_write_parquet(errors, out / "errors.parquet", ERRORS)

    if dups is not None:
        atomic_write_parquet(dups, out / "duplicates.parquet", DUPLICATES)
    if reps is not None:
        atomic_write_parquet(reps, out / "replications.parquet", REPLICATIONS)
    rem = removal_list(df, dups, replicated)
    atomic_write_parquet(rem, out / "removal_list.parquet", REMOVAL)
    atomic_write_text("".join(f"{k}\n" for k in rem["key"]), out / "removal_list.txt")

    summary["counts"] = {
        "seen": len(df),
        "scored": int(df["error"].isna().sum()) if cfg.model.kind != "none" else 0,
        "embedded": int(searched.sum()) if searched is not None else 0,
        "errors": len(errors),
        "shard_errors": len(shard_errors),
        "duplicate_groups": int(dups["group_id"].nunique()) if dups is not None and len(dups) else 0,
        "duplicates": int((~dups["keep"]).sum()) if dups is not None and len(dups) else 0,
        "removed": len(rem),
        "removed_by_reason": rem["reason"].value_counts().to_dict(),
        "mem_class": df["mem_class"].value_counts().to_dict(),
        "verdict": df["verdict"].value_counts().to_dict(),
    }
    summary["stages"] = stage_counts(df, shard_errors, cfg, embedder is not None)
    summary["thresholds"] = thresholds
    summary["timings_s"]["finalize"] = round(time.time() - t0, 1)
    return summary


def stage_counts(df: pd.DataFrame, shard_errors: pd.DataFrame, cfg: ScanConfig, embedded: bool) -> dict:
    """Rows in and out and error rows of each stage that ran, over every part (this run's and resumed ones)."""
    stage = df["error_stage"]
    n = len(df)
    out = {"read": {"rows_in": n, "rows_out": n, "error_rows": int(stage.isin(["read", "decode"]).sum()),
                    "shard_errors": len(shard_errors)}}
    if embedded:
        out["embed"] = {"rows_in": n, "rows_out": n, "error_rows": int(df["embed_error"].notna().sum())}
    if cfg.model.kind != "none":
        out["score"] = {"rows_in": n, "rows_out": n, "error_rows": int((stage == "score").sum())}
    return out
