"""Score the scan against planted truth: AUROC and TPR@1%FPR per score column, duplicate pair P/R.

Each score column is evaluated in the direction registered for it (scanner/columns.py: fixed by the
method, not chosen on this data). A column that flags the wrong tail here reports AUROC < 0.5 and a
warning, instead of a flipped number that would look like a working detector. Columns with no registered
direction (a new score) are evaluated in the better tail and marked `direction_source: data`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("memscan")
from scanner.schema import SCORES_META


def tpr_at_fpr(y: np.ndarray, s: np.ndarray, fpr_max: float = 0.01) -> float:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, s)
    return float(tpr[fpr <= fpr_max].max()) if (fpr <= fpr_max).any() else 0.0


def _roc_curves(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(AUROC, TPR at 1 % FPR, TPR at 0.1 % FPR) of "high s flags y" for each row of weights w (R, N) at once:
    one sort, then cumulative sums at the distinct thresholds (ties handled as sklearn's roc_curve does)."""
    order = np.argsort(-s, kind="stable")
    ends = np.r_[np.flatnonzero(np.diff(s[order]) != 0), s.size - 1]  # last row of each distinct value
    wy = w[:, order] * y[order]
    tp = np.cumsum(wy, axis=1)[:, ends]
    fp = np.cumsum(w[:, order] - wy, axis=1)[:, ends]
    tpr = np.c_[np.zeros(len(w)), tp / tp[:, -1:]]
    fpr = np.c_[np.zeros(len(w)), fp / fp[:, -1:]]
    auc = np.sum((fpr[:, 1:] - fpr[:, :-1]) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
    at = [np.where(fpr <= f, tpr, 0.0).max(axis=1) for f in (0.01, 0.001)]
    return auc, at[0], at[1]


def bootstrap_metrics(y: np.ndarray, s: np.ndarray, units: np.ndarray, n_boot: int = 400, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Percentile intervals of AUROC and TPR at 1 % / 0.1 % FPR ("high s flags y") from a bootstrap over
    independent units, not rows: `units` (one label per row) groups rows that are copies of one base image
    (a repeated group) so that its 24 copies count once. Positives and negatives are resampled separately
    (stratified), so every replicate has both classes. Seeded."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y, bool)
    codes = pd.factorize(pd.Series(units, dtype=object).astype(str) + np.where(y, "|p", "|n"))[0]
    n_units = codes.max() + 1
    unit_pos = np.zeros(n_units, bool)
    unit_pos[codes] = y
    pos_units, neg_units = np.flatnonzero(unit_pos), np.flatnonzero(~unit_pos)
    reps = []
    for r0 in range(0, n_boot, 64):  # 64 replicates' weights at a time
        w = np.stack([np.bincount(np.concatenate([rng.choice(pos_units, pos_units.size),
                                                  rng.choice(neg_units, neg_units.size)]), minlength=n_units)[codes]
                      for _ in range(min(64, n_boot - r0))]).astype(float)
        reps.append(np.stack(_roc_curves(y, np.asarray(s, float), w), axis=1))
    lo, hi = np.quantile(np.concatenate(reps), [(1 - level) / 2, (1 + level) / 2], axis=0)
    names = ("auroc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr")
    return {f"{n}_ci": [float(a), float(b)] for n, a, b in zip(names, lo, hi)} | {
        "ci_level": level, "ci_units": {"positive": int(pos_units.size), "negative": int(neg_units.size)},
        "n_boot": n_boot}


def planted_units(df: pd.DataFrame) -> pd.Series:
    """The independent unit of each row: its planted group (truth's group_id), else its own key."""
    return df["group_id"].astype("string").fillna(df["key"]) if "group_id" in df else df["key"]


def column_metrics(scores: pd.DataFrame, truth: pd.DataFrame, positive: str, negative: str = "unique",
                   warnings: list | None = None, n_boot: int = 400) -> dict:
    """Per numeric column: auroc and TPR at 1 % and 0.1 % FPR in the column's registered direction, with
    bootstrap intervals over independent units (a planted group counts once: truth's group_id, else the key;
    n_boot = 0: none), the direction, where it came from and the counts. Disagreements with the data go to
    `warnings`."""
    from sklearn.metrics import roc_auc_score

    from scanner.columns import direction as registered

    cols = ["key", "planted"] + (["group_id"] if "group_id" in truth else [])
    df = scores.merge(truth[cols], on="key")
    df = df[df["planted"].isin([positive, negative]) & df["error"].isna()]
    y = (df["planted"] == positive).to_numpy()
    out = {}
    if y.all() or not y.any():
        return out
    for col in scores.columns:
        if col in SCORES_META or not np.issubdtype(df[col].dtype, np.number):
            continue
        s = df[col].to_numpy(dtype=float)
        keep = np.isfinite(s)
        if keep.sum() < 2 or y[keep].all() or not y[keep].any():
            continue
        auc_high = float(roc_auc_score(y[keep], s[keep]))  # AUROC when high values flag
        direction, source = registered(col), "registry"
        if direction is None:
            direction, source = ("high" if auc_high >= 0.5 else "low"), "data"
        sign = 1.0 if direction == "high" else -1.0
        auroc = auc_high if direction == "high" else 1.0 - auc_high
        out[col] = {"auroc": auroc, "tpr_at_1pct_fpr": tpr_at_fpr(y[keep], sign * s[keep]),
                    "tpr_at_0_1pct_fpr": tpr_at_fpr(y[keep], sign * s[keep], 0.001),
                    "direction": direction, "direction_source": source,
                    "n_pos": int(y[keep].sum()), "n_neg": int((~y[keep]).sum())}
        if n_boot:
            units = planted_units(df).to_numpy()
            out[col] |= bootstrap_metrics(y[keep], sign * s[keep], units[keep], n_boot=n_boot)
        if auroc < 0.5 and warnings is not None:
            warnings.append(f"{col} vs {positive}: AUROC {auroc:.3f} in its registered direction ({direction}); "
                            f"the other tail would give {1 - auroc:.3f}, so on this data the column flags the "
                            "opposite of what the method says")
    return out


def duplicates_by_edit(dups: pd.DataFrame, planted: pd.DataFrame) -> list[dict]:
    """Recall per planted kind and edit (truth's `edit`: "copy" = the base image's own bytes, else jpeg, shift,
    color, resize): the share of members found in one duplicate group with another member of their planted
    group. The edited rows are the non-identical pairs byte hashes cannot find. groups_found: the planted groups
    whose every member of this kind and edit is found (groups, not copies, are the independent units). Empty
    without `edit`."""
    if "edit" not in planted or planted["edit"].isna().all():
        return []
    pred = dict(zip(dups["key"], dups["group_id"]))
    df = planted.assign(pred=planted["key"].map(pred))
    linked = df.groupby(["group_id", "pred"])["key"].transform("size") > 1  # shares its group and a prediction
    df = df.assign(found=linked & df["pred"].notna())
    out = []
    for (kind, edit), g in df.groupby(["planted", "edit"]):
        out.append({"planted": kind, "edit": edit, "members": len(g), "groups": int(g["group_id"].nunique()),
                    "groups_found": int(g.groupby("group_id")["found"].all().sum()),  # every such member found
                    "recall": float(g["found"].mean())})
    return out


def removals_against_truth(dups: pd.DataFrame, planted: pd.DataFrame) -> pd.DataFrame:
    """Every removed member (keep False) with its group's kept member (`kept`) and whether the removal is right:
    both in one planted group (planted: key, group_id; keys absent or with a null group_id are in none), so the
    image it leaves in the corpus is a copy of it."""
    truth = dict(zip(planted["key"], planted["group_id"]))
    kept = dups.loc[dups["keep"], ["group_id", "key"]].set_index("group_id")["key"]
    removed = dups.loc[~dups["keep"], ["key", "group_id"]]
    out = pd.DataFrame({"key": removed["key"].to_numpy(), "kept": removed["group_id"].map(kept).to_numpy()})
    mine, theirs = out["key"].map(truth), out["kept"].map(truth)
    out["right"] = (mine.notna() & theirs.notna() & (mine == theirs)).to_numpy(bool)
    return out


def removal_precision_recall(dups: pd.DataFrame, planted: pd.DataFrame) -> dict:
    """The duplicate removals a user acts on, against the planted groups (removals_against_truth).

    Precision: right removals / removals. Recall: right removals / the images a perfect list removes (each
    planted group's size minus one). Unlike pair precision, one stranger joined to a group of 24 copies costs
    one removal here (or 24, if it is the one kept), not 24 pairs.
    """
    removed = removals_against_truth(dups, planted)
    right = int(removed["right"].sum())
    redundant = int((planted.groupby("group_id").size() - 1).sum()) if len(planted) else 0
    return {"removal_precision": right / len(removed) if len(removed) else 1.0,
            "removal_recall": right / redundant if redundant else 1.0,
            "removed": len(removed), "removed_right": right, "redundant": redundant}


def dose_response(scores: pd.DataFrame, truth: pd.DataFrame) -> list[dict]:
    """Detection against the number of copies (a corpus built with dose_copies): per copy count, the share of
    images flagged at the run's threshold (verdict confirmed or suspected), classed dd / od, and the groups.
    Unique images are the one-copy row (their flagged share is the false-positive rate); the repeated class
    adds its own copy count. Empty without planted "dose" groups."""
    if "copies" not in truth or not (truth["planted"] == "dose").any():
        return []
    df = scores[scores["error"].isna()].merge(truth[["key", "planted", "copies", "group_id"]], on="key")
    df = df[df["planted"].isin(["unique", "dose", "repeated"])]
    out = []
    for k, g in df.groupby("copies"):
        flagged = g["verdict"].isin(["confirmed", "suspected"])
        units = planted_units(g)
        per_unit = flagged.groupby(units.to_numpy()).mean()  # a group counts once in the spread
        out.append({"copies": int(k), "planted": sorted(set(g["planted"])), "images": len(g),
                    "units": int(units.nunique()), "flagged": float(flagged.mean()),
                    "flagged_units_min_max": [float(per_unit.min()), float(per_unit.max())],
                    "dd": float((g["mem_class"] == "dd").mean()), "od": float((g["mem_class"] == "od").mean()),
                    **{f"median_{c}": float(g[c].median()) for c in ("score_norm_cal", "loss_cal") if c in g}})
    return out


def by_caption_kind(truth: pd.DataFrame) -> pd.DataFrame | None:
    """truth with each repeated row's `planted` replaced by its caption kind ("verbatim": every copy has the same
    caption, "varied"), for the text-conditional comparisons; None when truth has no caption kinds."""
    if "caption_kind" not in truth or not truth["caption_kind"].notna().any():
        return None
    kinds = truth["caption_kind"].astype(object)
    return truth.assign(planted=kinds.where(truth["planted"].eq("repeated") & kinds.notna(), truth["planted"]))


def replication_by_caption(reps: pd.DataFrame, scores: pd.DataFrame, truth: pd.DataFrame) -> list[dict]:
    """For generations from training captions: per kind of the caption's training images (verbatim / varied
    repeated groups, oversampled, unique, ...), how many generations, the share that replicated a training image,
    and the share that replicated the image trained with that very caption (any copy of it: its planted group).
    Empty without captions."""
    if reps.empty or reps["caption"].isna().all():
        return []
    t = by_caption_kind(truth)
    t = truth if t is None else t
    rows = scores.loc[scores["caption"].notna(), ["key", "caption"]].merge(t[["key", "planted"]], on="key")
    unit = dict(zip(t["key"], planted_units(t)))
    kind_of = rows.groupby("caption")["planted"].agg(lambda v: v.mode().iloc[0])
    units_of = rows.groupby("caption")["key"].agg(lambda keys: {unit.get(k, k) for k in keys})
    df = reps.assign(kind=reps["caption"].map(kind_of).fillna("unknown"))
    own = [bool(r.replicated) and unit.get(r.matched_key, r.matched_key) in units_of.get(r.caption, ())
           for r in df.itertuples()]
    df = df.assign(own=own)
    return [{"caption_kind": k, "generations": len(g), "replicated": float(g["replicated"].mean()),
             "replicated_own_image": float(g["own"].mean())} for k, g in df.groupby("kind")]


def _part_column(out, cols: list[str]) -> pd.DataFrame | None:
    """`cols` of every part file that has them, concatenated (None without such files). out: a storage.Out."""
    parts = [f"parts/{f}" for f in out.names("parts", ".parquet")]
    frames = [out.read_parquet(f, columns=cols) for f in parts
              if set(cols) <= set(out.parquet_file(f).schema_arrow.names)]
    return pd.concat(frames, ignore_index=True) if frames else None


def _content_hashes(out) -> dict[str, str]:
    """key -> sha256 of the image bytes, from the scan's part files ({} without them)."""
    df = _part_column(out, ["key", "sha256"])
    if df is None:
        return {}
    df = df.dropna()
    return dict(zip(df["key"], df["sha256"]))


def evaluate(out, truth_path: Path, write: bool = True, n_boot: int = 400) -> dict:
    """metrics.json's content for the scan in `out` (a local path or an object-storage URL; written there unless
    `write` is False). n_boot: bootstrap
    replicates of the intervals (0: none; seeded, so the same scan gives the same metrics.json).

    A folder with duplicates.parquet and parts/ but no scores/ gets the duplicate metrics alone (parts/ say
    which images were read); `memscan dedup` writes scores/ without score values, whose columns are skipped."""
    from scanner.neighbours.dedup import pair_precision_recall
    from scanner.storage import Out

    out = out if isinstance(out, Out) else Out(out)
    truth = pd.read_parquet(truth_path)
    files = [f"scores/{f}" for f in out.names("scores", ".parquet")]
    has_dups = out.exists("duplicates.parquet")
    if not files and not has_dups:
        raise FileNotFoundError(f"{out} has neither scores/ nor duplicates.parquet: run `memscan scan` or "
                                "`memscan dedup` first")
    metrics: dict = {"scores": {}, "warnings": []}
    scores = pd.concat([out.read_parquet(f) for f in files], ignore_index=True) if files else None
    if scores is not None:
        for positive in ("repeated", "oversampled"):
            metrics["scores"][f"{positive}_vs_unique"] = column_metrics(scores, truth, positive,
                                                                        warnings=metrics["warnings"], n_boot=n_boot)
        captioned = by_caption_kind(truth)  # a text-conditional corpus: repeated groups by how their captions repeat
        for kind in ("verbatim", "varied"):
            if captioned is not None and (captioned["planted"] == kind).any():
                metrics["scores"][f"{kind}_vs_unique"] = column_metrics(scores, captioned, kind,
                                                                        warnings=metrics["warnings"], n_boot=n_boot)
    for w in metrics["warnings"]:
        log.warning("evaluate: %s", w)
    if has_dups:
        dups = out.read_parquet("duplicates.parquet")
        grouped = ["exact_dup", "near_dup", "repeated", "dose"]
        planted = truth[truth["group_id"].notna() & truth["planted"].isin(grouped)]
        if "readable" in planted:
            planted = planted[planted["readable"]]
        rows = scores if scores is not None else _part_column(out, ["key", "error"])
        if rows is None:
            raise FileNotFoundError(f"{out} has duplicates.parquet but no scores/ or parts/ with key and error "
                                    "columns: which images were read is unknown")
        present = set(rows.loc[rows["error"].isna(), "key"])
        planted = planted[planted["key"].isin(present)]
        pred, true = dict(zip(dups["key"], dups["group_id"])), dict(zip(planted["key"], planted["group_id"]))
        metrics["duplicates"] = pair_precision_recall(pred, true)
        metrics["duplicates"].update(removal_precision_recall(dups, planted))
        sha = _content_hashes(out)
        if sha:  # the pairs a byte hash cannot find: the embedder's and the pixel check's share of the work
            metrics["duplicates"]["non_identical"] = pair_precision_recall(pred, true, content=sha)
        by_edit = duplicates_by_edit(dups, planted)
        if by_edit:
            metrics["duplicates"]["recall_by_edit"] = by_edit
    if scores is not None:
        if out.exists("replications.parquet"):
            by_cap = replication_by_caption(out.read_parquet("replications.parquet"), scores, truth)
            if by_cap:
                metrics["replications_by_caption"] = by_cap
        dose = dose_response(scores, truth)
        if dose:
            metrics["dose_response"] = dose
        ct = scores.merge(truth[["key", "planted"]], on="key")
        metrics["mem_class_by_planted"] = pd.crosstab(ct["planted"], ct["mem_class"].fillna("error")).to_dict()
    if write:
        out.write_json("metrics.json", metrics)
    return metrics


def format_metrics(metrics: dict) -> str:
    lines = [f"{'column':<16} {'vs':<12} {'AUROC':>6} {'95% CI':>13} {'TPR@1%FPR':>10} {'@0.1%':>6}  direction"]
    for comp, cols in metrics["scores"].items():
        for col, m in sorted(cols.items()):
            ci = m.get("auroc_ci")
            ci_s = f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "-"
            lines.append(f"{col:<16} {comp.split('_vs_')[0]:<12} {m['auroc']:>6.3f} {ci_s:>13} "
                         f"{m['tpr_at_1pct_fpr']:>10.3f} {m.get('tpr_at_0_1pct_fpr', float('nan')):>6.3f}  "
                         f"{m['direction']}{'' if m.get('direction_source', 'registry') == 'registry' else ' (data)'}")
    if "duplicates" in metrics:
        d = metrics["duplicates"]
        lines.append(f"duplicate pairs: precision {d.get('pair_precision', float('nan')):.4f}, "
                     f"recall {d.get('pair_recall', float('nan')):.4f}")
        if "non_identical" in d:
            ni = d["non_identical"]
            lines.append(f"duplicate pairs of distinct bytes: precision {ni['pair_precision']:.4f}, recall "
                         f"{ni['pair_recall']:.4f} ({ni['true_pairs']} true pairs)")
        if "removal_precision" in d:
            lines.append(f"duplicate removals: precision {d['removal_precision']:.4f} ({d['removed_right']} of "
                         f"{d['removed']} removed), recall {d['removal_recall']:.4f} (of {d['redundant']})")
    for r in (metrics.get("duplicates") or {}).get("recall_by_edit", []):
        lines.append(f"duplicate recall, {r['planted']} / {r['edit']}: {r['recall']:.3f} ({r['members']} members)")
    if metrics.get("dose_response"):
        lines.append("dose-response (flagged share at the run's threshold, by copies in the corpus): " + ", ".join(
            f"{d['copies']}: {d['flagged']:.2f}" for d in metrics["dose_response"]))
    for r in metrics.get("replications_by_caption", []):
        lines.append(f"generations from {r['caption_kind']} captions: {r['generations']}, replicated "
                     f"{r['replicated']:.2f}, of their own training image {r['replicated_own_image']:.2f}")
    lines += [f"warning: {w}" for w in metrics.get("warnings", [])]
    return "\n".join(lines)
