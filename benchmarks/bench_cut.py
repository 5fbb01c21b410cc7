"""The detector's cut: a fixed number against a false-positive rate on held-out images, across demo models.

    python benchmarks/bench_cut.py --runs runs/d0 runs/d1 runs/d2     # writes results/cut.{md,json}

Each run is a finished `memscan demo --out DIR` (DIR/corpus, DIR/model, DIR/scan). Per run: the held-out
images the demo corpus builder now writes for that corpus' seed (built again in a temporary folder; its
training shards are checked byte-identical to the run's), scored by the run's model through the scan's own
stages (scanner.calibrate.heldout_scores), then the run's scores classified (scanner.finalize.classify, the
run's LID medians) under (a) the run's fixed cut (classify.detector_threshold) and (b) the cut at
classify.calibration_fpr of the held-out images. Reported: share flagged and share classed per planted kind.
The FPR (1 %, the usual membership-inference operating point) was fixed on demo seed 0; other seeds are held out.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from results_file import write_results

from scanner.calibrate import calibrated_cut, heldout_scores
from scanner.config import config_from_dict
from scanner.data.demo import build_demo_corpus
from scanner.finalize import classify

KINDS = ("repeated", "oversampled", "unique")


def heldout_for(run: Path, tmp: Path) -> Path:
    """The held-out shard of run's corpus, built again; refuses when the corpus would not be the same."""
    params = json.loads((run / "corpus" / "demo_corpus.json").read_text())["params"]
    kw = {k: params[k] for k in ("seed", "n_unique", "n_repeated", "repeat_copies", "n_oversampled",
                                 "n_exact_dup_groups", "n_near_dup_groups", "n_corrupt", "n_no_caption", "size",
                                 "samples_per_shard", "truncate_last_shard")}
    kw.update({k: tuple(params[k]) if isinstance(params[k], list) else params[k]
               for k in ("dose_copies", "dose_groups", "captions", "near_dup_edits") if k in params})
    build_demo_corpus(tmp, **kw)
    for f in sorted((run / "corpus" / "shards").glob("*.tar")):
        if not filecmp.cmp(f, tmp / "shards" / f.name, shallow=False):
            raise SystemExit(f"{f} differs from the corpus built again: not the corpus this memscan builds")
    return tmp / "heldout"


def shares(df: pd.DataFrame) -> dict:
    out = {}
    for k in KINDS:
        d = df[df["planted"] == k]
        out[k] = {"n": len(d), "flagged": float(d["flagged"].mean()),
                  "dd": float((d["mem_class"] == "dd").mean()), "od": float((d["mem_class"] == "od").mean()),
                  "any_class": float(d["mem_class"].isin(["dd", "od"]).mean())}
    return out


def one(run: Path, fpr: float) -> dict:
    summary = json.loads((run / "scan" / "summary.json").read_text())
    raw = summary["config"]
    with tempfile.TemporaryDirectory() as tmp:
        held_dir = heldout_for(run, Path(tmp) / "corpus")
        raw = {**raw, "classify": {**raw["classify"], "calibration_shards": str(held_dir),
                                   "calibration_fpr": fpr}}
        raw["model"] = {**raw["model"], "path": str(run / "model"), "device": "cpu"}
        cfg = config_from_dict(raw)
        t0 = time.time()
        held = heldout_scores(cfg)
        seconds = time.time() - t0
    scores = pd.read_parquet(run / "scan" / "scores")
    truth = pd.read_parquet(run / "corpus" / "truth.parquet")[["key", "planted"]]
    df = scores.merge(truth, on="key")
    df = df[df["error"].isna()].reset_index(drop=True)
    col = cfg.classify.detector
    base = {k: v for k, v in summary["thresholds"].items() if k in ("detector", "direction", "lid_medians")}
    fixed_thr = summary["thresholds"]["threshold"]
    cut = calibrated_cut(held["values"], fpr, cfg.classify.direction)
    res = {"run": str(run), "seed": json.loads((run / "corpus" / "demo_corpus.json").read_text())["params"]["seed"],
           "model_kind": cfg.model.kind, "detector": col, "heldout_images": held["images"],
           "heldout_seconds": round(seconds, 1), "heldout_median": float(np.median(held["values"])),
           "unique_member_median": float(df.loc[df["planted"] == "unique", col].median())}
    for name, thr in (("fixed", fixed_thr), ("calibrated", cut)):
        d = df.copy()
        classify(d, cfg, {**base, "threshold": float(thr)})
        res[name] = {"threshold": float(thr), "by_kind": shares(d)}
    return res


def render(runs: list[dict], fpr: float) -> str:
    out = ["# The detector's cut: fixed, or a false-positive rate on held-out images (benchmarks/bench_cut.py)", "",
           (f"Held-out images: the demo corpus builder's `heldout/` shard for the run's seed (never trained on), "
            f"scored by the run's model through the scan's stages. Calibrated cut: the {fpr:g} quantile of the "
            "detector over them (classify.calibration_fpr). Classes by the shipped rule (classify.*, the run's LID "
            "medians). Seed 0 is where the FPR was fixed; other seeds are held out."), "",
           ("| run | model | seed | cut | threshold | repeated flagged / dd | oversampled flagged / od | "
           "unique flagged / any class |"), "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for name in ("fixed", "calibrated"):
            k = r[name]["by_kind"]
            out.append(f"| {Path(r['run']).name} | {r['model_kind']} | {r['seed']} | {name} | "
                       f"{r[name]['threshold']:.3f} | {k['repeated']['flagged']:.3f} / {k['repeated']['dd']:.3f} | "
                       f"{k['oversampled']['flagged']:.3f} / {k['oversampled']['od']:.3f} | "
                       f"{k['unique']['flagged']:.4f} / {k['unique']['any_class']:.4f} |")
    out += ["", "| run | held-out images | scoring s | detector median: held-out / unique members |", "|---|---|---|---|"]
    for r in runs:
        out.append(f"| {Path(r['run']).name} | {r['heldout_images']} | {r['heldout_seconds']:.1f} | "
                   f"{r['heldout_median']:.3f} / {r['unique_member_median']:.3f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="finished `memscan demo --out` folders")
    ap.add_argument("--fpr", type=float, default=0.01)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    runs = [one(r, a.fpr) for r in a.runs]
    write_results(a.out, "cut", {"fpr": a.fpr, "runs": runs}, render(runs, a.fpr))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
