"""Do two scans of the same corpus give the same answers? (e.g. before and after a pipeline change)

    python benchmarks/compare_scans.py --a OLD_SCAN_DIR --b NEW_SCAN_DIR --truth CORPUS/truth.parquet \
        --name pipeline_ab

Compares rows (keys), every score column (largest absolute and relative difference), mem_class, verdicts,
errors, duplicate groups (as pairs), the removal list, and, against the planted truth, duplicate pair
precision / recall and every column's AUROC (scanner.demo.evaluate on each). Writes
benchmarks/results/NAME.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def pairs(dups: pd.DataFrame) -> set[tuple[str, str]]:
    return {tuple(sorted(p)) for _, g in dups.groupby("group_id") for p in combinations(g["key"], 2)}


def compare(a: Path, b: Path, truth: Path) -> dict:
    from scanner.demo.evaluate import evaluate

    sa, sb = (pd.read_parquet(d / "scores").set_index("key").sort_index() for d in (a, b))
    out: dict = {"rows": [len(sa), len(sb)], "same_keys": bool(sa.index.equals(sb.index))}
    common = sa.index.intersection(sb.index)
    sa, sb = sa.loc[common], sb.loc[common]
    cols = {}
    for c in sa.columns:
        if c in sb.columns and pd.api.types.is_numeric_dtype(sa[c]) and c not in ("width", "height"):
            x, y = sa[c].astype(float).to_numpy(), sb[c].astype(float).to_numpy()
            both = np.isfinite(x) & np.isfinite(y)
            d = np.abs(x[both] - y[both])
            cols[c] = {"max_abs": float(d.max()) if len(d) else 0.0,
                       "max_rel": float((d / np.maximum(np.abs(x[both]), 1e-12)).max()) if len(d) else 0.0,
                       "nan_differs": int((np.isfinite(x) != np.isfinite(y)).sum())}
    out["score_columns"] = cols
    for c in ("mem_class", "verdict"):
        out[f"{c}_differs"] = int((sa[c].fillna("") != sb[c].fillna("")).sum())
    out["error_differs"] = int((sa["error"].isna() != sb["error"].isna()).sum())
    da, db = (pd.read_parquet(d / "duplicates.parquet") for d in (a, b))
    pa_, pb_ = pairs(da), pairs(db)
    out["duplicate_pairs"] = {"a": len(pa_), "b": len(pb_), "only_a": len(pa_ - pb_), "only_b": len(pb_ - pa_)}
    ra, rb = (pd.read_parquet(d / "removal_list.parquet") for d in (a, b))
    ka, kb = set(zip(ra["key"], ra["reason"])), set(zip(rb["key"], rb["reason"]))
    out["removal"] = {"a": len(ka), "b": len(kb), "only_a": sorted(ka - kb)[:20], "only_b": sorted(kb - ka)[:20],
                      "identical": ka == kb}
    ma, mb = (evaluate(d, truth, write=False) for d in (a, b))
    out["duplicates_pr"] = {k: [ma["duplicates"][k], mb["duplicates"][k]] for k in ("pair_precision", "pair_recall")}
    auroc = {}
    for task, colsa in ma["scores"].items():
        for col, m in colsa.items():
            other = mb["scores"].get(task, {}).get(col)
            if other:
                auroc[f"{col} {task}"] = [m["auroc"], other["auroc"]]
    out["auroc"] = auroc
    out["max_auroc_change"] = max((abs(x - y) for x, y in auroc.values()), default=0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--truth", required=True)
    ap.add_argument("--name", default="pipeline_ab")
    ap.add_argument("--note", default="", help="one line on what A and B are, for the results file")
    args = ap.parse_args()
    r = compare(Path(args.a), Path(args.b), Path(args.truth))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{args.name}.json").write_text(json.dumps(r, indent=2) + "\n")
    worst = max(r["score_columns"].items(), key=lambda kv: kv[1]["max_rel"], default=("-", {"max_rel": 0}))
    lines = [f"# Same answers? (`benchmarks/compare_scans.py --name {args.name}`)", "", args.note, "",
             "| check | A | B |", "|---|---|---|",
             f"| rows | {r['rows'][0]} | {r['rows'][1]} (same keys: {r['same_keys']}) |",
             (f"| mem_class / verdict / error rows that differ | | {r['mem_class_differs']} / {r['verdict_differs']} / "
             f"{r['error_differs']} |"),
             f"| largest relative score difference | | {worst[1]['max_rel']:.2e} ({worst[0]}) |",
             (f"| duplicate pairs | {r['duplicate_pairs']['a']} | {r['duplicate_pairs']['b']} (only A "
             f"{r['duplicate_pairs']['only_a']}, only B {r['duplicate_pairs']['only_b']}) |"),
             (f"| removal list (key, reason) | {r['removal']['a']} | {r['removal']['b']} (identical: "
             f"{r['removal']['identical']}) |"),
             (f"| duplicate pair precision | {r['duplicates_pr']['pair_precision'][0]:.4f} | "
             f"{r['duplicates_pr']['pair_precision'][1]:.4f} |"),
             (f"| duplicate pair recall | {r['duplicates_pr']['pair_recall'][0]:.4f} | "
             f"{r['duplicates_pr']['pair_recall'][1]:.4f} |"),
             f"| largest AUROC change | | {r['max_auroc_change']:.4f} |", ""]
    lines += ["| column vs class | AUROC A | AUROC B |", "|---|---|---|"]
    lines += [f"| {k} | {x:.4f} | {y:.4f} |" for k, (x, y) in sorted(r["auroc"].items())]
    (HERE / "results" / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
