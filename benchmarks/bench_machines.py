"""The same demo seeds, run from scratch on two machines: how far apart are the numbers?

    git show REV:benchmarks/results/detection.json > /tmp/a.json   # bench_detection's results of machine A
    python benchmarks/bench_detection.py runs/seed0 ... --out /tmp/b   # the same seeds, run on machine B
    python benchmarks/bench_machines.py --a /tmp/a.json --b /tmp/b/detection.json --a-name "..." --b-name "..."

Writes results/machines.{md,json}. Per seed present in both: the largest AUROC difference over every score
column and both planted classes, the detector's AUROC and TPR, the cut, the classes and the duplicate figures
on each machine. The demo trains a fixed number of seeded steps, so one machine reproduces itself bit for bit,
but another core count or CPU capability gives another model (results/repro.md): this is what that costs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from results_file import write_results


def compare(a: dict, b: dict) -> dict:
    """One seed's run on machine A against machine B (bench_detection's per-run records)."""
    diffs = []
    for comp, cols in a["scores"].items():
        for col, m in cols.items():
            other = b["scores"].get(comp, {}).get(col)
            if other is not None:
                diffs.append((abs(m["auroc"] - other["auroc"]), comp, col))
    worst = max(diffs)
    det = a["detector"]
    pick = lambda r, comp, k: r["scores"][comp][det][k]
    dup = lambda r, k: (r.get("duplicates") or {}).get(k)
    return {
        "seed": a["seed"], "columns_compared": len(diffs), "identical_aurocs": sum(d == 0 for d, _, _ in diffs),
        "max_auroc_diff": worst[0], "max_auroc_diff_at": f"{worst[2]} ({worst[1].split('_vs_')[0]})",
        "detector": det,
        "detector_auroc": {c: [pick(a, f"{c}_vs_unique", "auroc"), pick(b, f"{c}_vs_unique", "auroc")]
                           for c in ("repeated", "oversampled")},
        "detector_tpr_1pct": {c: [pick(a, f"{c}_vs_unique", "tpr_at_1pct_fpr"), pick(b, f"{c}_vs_unique", "tpr_at_1pct_fpr")]
                              for c in ("repeated", "oversampled")},
        "cut": [a["cut"], b["cut"]],
        "classes": {k: [a["classes"][k], b["classes"][k]] for k in ("repeated_dd", "oversampled_od", "unique_any")},
        "duplicates": {k: [dup(a, k), dup(b, k)] for k in ("pair_precision", "pair_recall", "removal_precision",
                                                            "removal_recall", "predicted_pairs")},
    }


def render(res: dict) -> str:
    ab = lambda v, f="{:.3f}": f"{f.format(v[0])} / {f.format(v[1])}"
    out = ["# The same demo seeds on two machines (benchmarks/bench_machines.py)", "",
           (f"A: {res['a_name']}. B: {res['b_name']}. Each seed's corpus built, its model and embedder trained "
           "and its scan run on each machine (`memscan demo --seed S`); cells are A / B."), "",
           ("| seed | largest AUROC difference (column) | detector AUROC repeated | oversampled | detector TPR at 1 % "
           "FPR, repeated | cut | repeated -> dd | oversampled -> od | unique given a class | duplicate pairs P | "
           "duplicate removals P |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["seeds"]:
        out.append(
            f"| {r['seed']} | {r['max_auroc_diff']:.4f} ({r['max_auroc_diff_at']}) | "
            f"{ab(r['detector_auroc']['repeated'], '{:.4f}')} | {ab(r['detector_auroc']['oversampled'], '{:.4f}')} | "
            f"{ab(r['detector_tpr_1pct']['repeated'])} | {ab(r['cut'])} | {ab(r['classes']['repeated_dd'])} | "
            f"{ab(r['classes']['oversampled_od'])} | {ab(r['classes']['unique_any'], '{:.4f}')} | "
            f"{ab(r['duplicates']['pair_precision'], '{:.4f}')} | {ab(r['duplicates']['removal_precision'], '{:.4f}')} |")
    same = sum(r["identical_aurocs"] for r in res["seeds"])
    total = sum(r["columns_compared"] for r in res["seeds"])
    out += ["", f"AUROCs identical on both machines: {same} of {total} (column, class, seed) cells."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="machine A's detection.json (bench_detection)")
    ap.add_argument("--b", type=Path, required=True, help="machine B's detection.json, the same seeds")
    ap.add_argument("--a-name", required=True, help="what machine A was (CPU, cores, date)")
    ap.add_argument("--b-name", required=True)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    ra, rb = (json.loads(p.read_text())["runs"] for p in (a.a, a.b))
    by_seed = {r["seed"]: r for r in rb}
    seeds = [compare(r, by_seed[r["seed"]]) for r in ra if r["seed"] in by_seed]
    if not seeds:
        raise SystemExit("no seed is in both files")
    res = {"a_name": a.a_name, "b_name": a.b_name, "a": str(a.a), "b": str(a.b), "seeds": seeds}
    write_results(a.out, "machines", res, render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
