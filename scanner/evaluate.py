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

from scanner.files import write_json

log = logging.getLogger("memscan")
from scanner.schema import SCORES_META


def tpr_at_fpr(y: np.ndarray, s: np.ndarray, fpr_max: float = 0.01) -> float:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, s)
    return float(tpr[fpr <= fpr_max].max()) if (fpr <= fpr_max).any() else 0.0


def column_metrics(scores: pd.DataFrame, truth: pd.DataFrame, positive: str, negative: str = "unique",
                   warnings: list | None = None) -> dict:
    """Per numeric column: auroc and tpr_at_1pct_fpr in the column's registered direction, with the direction,
    where it came from and the counts. Disagreements with the data go to `warnings`."""
    from sklearn.metrics import roc_auc_score

    from scanner.columns import direction as registered

    df = scores.merge(truth[["key", "planted"]], on="key")
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
                    "direction": direction, "direction_source": source,
                    "n_pos": int(y[keep].sum()), "n_neg": int((~y[keep]).sum())}
        if auroc < 0.5 and warnings is not None:
            warnings.append(f"{col} vs {positive}: AUROC {auroc:.3f} in its registered direction ({direction}); "
                            f"the other tail would give {1 - auroc:.3f}, so on this data the column flags the "
                            "opposite of what the method says")
    return out


def evaluate(out: Path, truth_path: Path, write: bool = True) -> dict:
    """metrics.json's content for the scan in `out` (written there unless `write` is False)."""
    from scanner.neighbours.dedup import pair_precision_recall

    truth = pd.read_parquet(truth_path)
    files = sorted((out / "scores").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{out / 'scores'} has no parquet files: run `memscan scan` first")
    scores = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    metrics: dict = {"scores": {}, "warnings": []}
    for positive in ("repeated", "oversampled"):
        metrics["scores"][f"{positive}_vs_unique"] = column_metrics(scores, truth, positive,
                                                                    warnings=metrics["warnings"])
    for w in metrics["warnings"]:
        log.warning("evaluate: %s", w)
    dup_path = out / "duplicates.parquet"
    if dup_path.exists():
        dups = pd.read_parquet(dup_path)
        planted = truth[truth["group_id"].notna() & truth["planted"].isin(["exact_dup", "near_dup", "repeated"])]
        if "readable" in planted:
            planted = planted[planted["readable"]]
        present = set(scores.loc[scores["error"].isna(), "key"])
        planted = planted[planted["key"].isin(present)]
        metrics["duplicates"] = pair_precision_recall(dict(zip(dups["key"], dups["group_id"])),
                                                      dict(zip(planted["key"], planted["group_id"])))
    ct = scores.merge(truth[["key", "planted"]], on="key")
    metrics["mem_class_by_planted"] = pd.crosstab(ct["planted"], ct["mem_class"].fillna("error")).to_dict()
    if write:
        write_json(metrics, out / "metrics.json")
    return metrics


def format_metrics(metrics: dict) -> str:
    lines = [f"{'column':<16} {'vs':<12} {'AUROC':>6} {'TPR@1%FPR':>10}  direction"]
    for comp, cols in metrics["scores"].items():
        for col, m in sorted(cols.items()):
            lines.append(f"{col:<16} {comp.split('_vs_')[0]:<12} {m['auroc']:>6.3f} {m['tpr_at_1pct_fpr']:>10.3f}  "
                         f"{m['direction']}{'' if m.get('direction_source', 'registry') == 'registry' else ' (data)'}")
    if "duplicates" in metrics:
        d = metrics["duplicates"]
        lines.append(f"duplicate pairs: precision {d.get('pair_precision', float('nan')):.4f}, "
                     f"recall {d.get('pair_recall', float('nan')):.4f}")
    lines += [f"warning: {w}" for w in metrics.get("warnings", [])]
    return "\n".join(lines)
