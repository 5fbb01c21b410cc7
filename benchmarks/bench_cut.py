"""The detector's cut: a fixed number against a false-positive rate on held-out images, across demo models and
detectors.

    python benchmarks/bench_cut.py --runs runs/d0 runs/d1 runs/d2     # writes results/cut.{md,json}
    python benchmarks/bench_cut.py --runs runs/d0 runs/d1 --scan scan_loss --detectors score_norm_cal loss_cal

Each run is a finished `memscan demo --out DIR` (DIR/corpus, DIR/model, DIR/<--scan>, a scan of DIR/corpus whose
scores hold every detector asked for). Per run and detector: the held-out images the demo corpus builder writes
for that corpus' seed (built again in a temporary folder; its training shards are checked byte-identical to the
run's), scored by the run's model through the scan's own stages in this process (inmemory.score_heldout_locally, read by
scanner.corpus.calibrate.heldout_scores), then the
run's scores classified (scanner.corpus.classify.classify, the run's LID medians, typical lid_flipd per LID_* and
groups of byte copies) under (a) the detector's fixed cut (FIXED, chosen on demo seed 0) and (b) the cut at classify.calibration_fpr of the held-out images. Reported:
share flagged and share classed per planted kind, and the share of oversampled images whose LID_* is below
classify.lpca_low (the rule calls those dd whatever the detector says: a ceiling on oversampled -> od).
The FPR (1 %, the usual membership-inference operating point) was fixed on demo seed 0; other seeds are held out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from inmemory import score_heldout_locally
from results_file import write_results

from scanner.columns import direction
from scanner.config import config_from_dict
from scanner.corpus.calibrate import calibrated_cut, cut_fpr_interval, heldout_scores
from scanner.corpus.classify import classify, copy_groups
from scanner.demo.corpus import HELDOUT_IMAGES, build_demo_corpus_again

KINDS = ("repeated", "oversampled", "unique")
# the fixed cuts, chosen on demo seed 0: score_norm_cal's by eye (85 % of repeated, 1.1 % of unique flagged);
# loss_cal's is seed 0's calibrated cut (1 % of its held-out images) rounded to two decimals
FIXED = {"score_norm_cal": 0.8, "loss_cal": 0.81}
# what the scan's corpus steps measured for the class rule: LID medians, local PCA's level, lid_flipd's typical value
# per LID_* (scanner.finalize.detector_threshold); reused as they are, only the detector's cut changes
LID_KEYS = ("lid_medians", "lid_flipd_typical", "lpca_scale", "lpca_alpha", "lpca_reference")


def heldout_for(run: Path, tmp: Path) -> Path:
    """The held-out shard of run's corpus, built again; refuses when the corpus would not be the same."""
    try:
        build_demo_corpus_again(run / "corpus", tmp, n_heldout=HELDOUT_IMAGES)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return tmp / "heldout"


def shares(df: pd.DataFrame) -> dict:
    out = {}
    for k in KINDS:
        d = df[df["planted"] == k]
        out[k] = {"n": len(d), "flagged": float(d["flagged"].mean()),
                  "dd": float((d["mem_class"] == "dd").mean()), "od": float((d["mem_class"] == "od").mean()),
                  "any_class": float(d["mem_class"].isin(["dd", "od"]).mean())}
    return out


def one(run: Path, fpr: float, scan: str, detectors: list[str]) -> dict:
    summary = json.loads((run / scan / "summary.json").read_text())
    raw = summary["config"]
    scores = pd.read_parquet(run / scan / "scores")
    truth = pd.read_parquet(run / "corpus" / "truth.parquet")[["key", "planted"]]
    df = scores.merge(truth, on="key")
    df = df[df["error"].isna()].reset_index(drop=True)
    base = {k: v for k, v in summary["thresholds"].items() if k in LID_KEYS}
    dups = run / scan / "duplicates.parquet"
    if dups.exists():
        dups = pd.read_parquet(dups)
        grouped = set(dups.loc[dups["group_id"].isin(copy_groups(dups)), "key"])
    else:
        grouped = set()
    over = df[df["planted"] == "oversampled"]
    res = {"run": str(run), "scan": scan,
           "seed": json.loads((run / "corpus" / "demo_corpus.json").read_text())["params"]["seed"],
           "model_kind": raw["model"]["kind"],
           "oversampled_low_lid_star": float((over["lid_lpca"] < raw["classify"]["lpca_low"]).mean()),
           "detectors": {}, "cost": scoring_cost(run, raw)}
    with tempfile.TemporaryDirectory() as tmp:
        held_dir = heldout_for(run, Path(tmp) / "corpus")
        for col in detectors:
            cfg = config_from_dict({**raw, "classify": {**raw["classify"], "calibration_shards": str(held_dir),
                                                        "calibration_fpr": fpr, "detector": col,
                                                        "detector_direction": direction(col)},
                                    "model": {**raw["model"], "path": str(run / "model"), "device": "cpu"}})
            t0 = time.time()
            held = heldout_scores(cfg, score_heldout_locally(cfg, Path(tmp) / f"held-{col}"))
            seconds = time.time() - t0
            cut = calibrated_cut(held["values"], fpr, cfg.classify.direction)
            r = {"heldout_images": held["images"], "heldout_seconds": round(seconds, 1),
                 "heldout_median": float(np.median(held["values"])),
                 "unique_member_median": float(df.loc[df["planted"] == "unique", col].median())}
            for name, thr in (("fixed", FIXED[col]), ("calibrated", cut)):
                d = df.copy()
                classify(d, cfg, {**base, "detector": col, "direction": cfg.classify.direction,
                                  "threshold": float(thr)}, copies=d["key"].isin(grouped).to_numpy())
                r[name] = {"threshold": float(thr), "by_kind": shares(d)}
            res["detectors"][col] = r
    return res


def scoring_cost(run: Path, raw: dict, images: int = 128, batch: int = 32) -> dict:
    """Seconds for compute_scores on the run's first `images` corpus images with the run's geometry config, without
    loss_cal (loss_noises 0) and with it: best of 3 each, same images, same run (a ratio, not a speed)."""
    import dataclasses

    import torch

    from scanner.config import ModelConfig
    from scanner.demo.train import load_images
    from scanner.geometry.mirror import pixel_mirrors
    from scanner.geometry.scores import compute_scores
    from scanner.models.loading import load_score_model

    cfg = config_from_dict(raw)
    model = load_score_model(ModelConfig(kind=cfg.model.kind, path=str(run / "model"), device="cpu"))
    pix = torch.from_numpy(load_images(run / "corpus", cfg.data.resolution, cfg.data.channels).images[:images])
    batches = []
    for i in range(0, len(pix), batch):
        x = model.encode_images(pix[i:i + batch])
        refs = pixel_mirrors(model, pix[i:i + batch], cfg.geometry.cal_refs) if getattr(
            model, "mirrors_in_pixels", False) else None
        cond = model.encode_text([""] * len(x)) if model.conditional else None
        batches.append((x, refs, cond))
    out = {}
    for name, geo in (("without", dataclasses.replace(cfg.geometry, loss_noises=0)), ("with", cfg.geometry)):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            for x, refs, cond in batches:
                compute_scores(model, x, geo, cond, x_refs=refs)
            times.append(time.perf_counter() - t)
        out[name] = min(times)
    return {"images": len(pix), "without_loss_cal_s": round(out["without"], 2), "with_loss_cal_s": round(out["with"], 2),
            "ratio": round(out["with"] / out["without"], 2), "loss_noises": cfg.geometry.loss_noises,
            "cal_refs": cfg.geometry.cal_refs}


def render(runs: list[dict], fpr: float) -> str:
    out = ["# The detector's cut: fixed, or a false-positive rate on held-out images (benchmarks/bench_cut.py)", "",
           (f"Held-out images: the demo corpus builder's `heldout/` shard for the run's seed (never trained on), "
            f"scored by the run's model through the scan's stages. Calibrated cut: the {fpr:g} quantile of the "
            "detector over them (classify.calibration_fpr). Fixed cut: chosen on seed 0 (score_norm_cal 0.8 by eye; "
            "loss_cal 0.81, seed 0's calibrated cut rounded). Classes by the shipped rule (classify.*, the scan's LID "
            "medians, typical lid_flipd per LID_* and groups of byte copies). Seed 0 is where the FPR, the detectors' "
            "times and noises were fixed; other seeds are held out."), "",
           ("| run | model | seed | detector | cut | threshold | repeated flagged / dd | oversampled flagged / od | "
            "unique flagged / any class |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for col, d in r["detectors"].items():
            for name in ("fixed", "calibrated"):
                k = d[name]["by_kind"]
                out.append(f"| {Path(r['run']).name} | {r['model_kind']} | {r['seed']} | {col} | {name} | "
                           f"{d[name]['threshold']:.3f} | {k['repeated']['flagged']:.3f} / "
                           f"{k['repeated']['dd']:.3f} | {k['oversampled']['flagged']:.3f} / "
                           f"{k['oversampled']['od']:.3f} | {k['unique']['flagged']:.4f} / "
                           f"{k['unique']['any_class']:.4f} |")
    out += ["", (f"The calibrated cut's false-positive rate is itself an estimate: over draws of the held-out images "
                 f"it lies in the interval below (95 %, scanner.corpus.calibrate.cut_fpr_interval: order statistics; part "
                 f"of the seed-to-seed spread of the cuts above is this noise). By held-out set size, at "
                 f"calibration_fpr {fpr:g}: "
                 + "; ".join(f"{n:,} images {lo * 100:.2f}-{hi * 100:.2f} %" for n in (100, 500, 2000, 10000)
                             for lo, hi in [cut_fpr_interval(n, fpr)]) + "."), "",
            ("| run | detector | held-out images | FPR the cut applies, 95 % | scoring s | detector median: held-out / "
             "unique members | oversampled with LID_* < lpca_low (od ceiling) |"), "|---|---|---|---|---|---|---|"]
    for r in runs:
        for col, d in r["detectors"].items():
            lo, hi = cut_fpr_interval(d["heldout_images"], fpr)
            out.append(f"| {Path(r['run']).name} | {col} | {d['heldout_images']} | {lo * 100:.2f}-{hi * 100:.2f} % | "
                       f"{d['heldout_seconds']:.1f} | "
                       f"{d['heldout_median']:.3f} / {d['unique_member_median']:.3f} | "
                       f"{r['oversampled_low_lid_star']:.2f} |")
    out += ["", ("Scoring cost of loss_cal (scanner.geometry.scores.compute_scores with the run's geometry config, "
                 "every column, the run's first corpus images, best of 3, same run):"), "",
            "| run | images | without loss_cal s | with loss_cal s | ratio |", "|---|---|---|---|---|"]
    for r in runs:
        c = r["cost"]
        out.append(f"| {Path(r['run']).name} | {c['images']} | {c['without_loss_cal_s']:.2f} | "
                   f"{c['with_loss_cal_s']:.2f} | {c['ratio']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, nargs="+", help="finished `memscan demo --out` folders")
    ap.add_argument("--fpr", type=float, default=0.01)
    ap.add_argument("--scan", default="scan", help="the scan folder inside each run (default: the demo's own)")
    ap.add_argument("--detectors", nargs="+", default=["score_norm_cal"], choices=sorted(FIXED))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--render", action="store_true", help="rewrite cut.md from the results' cut.json, scoring nothing")
    a = ap.parse_args(argv)
    if a.render:
        done = json.loads((a.out / "cut.json").read_text())
        (a.out / "cut.md").write_text(render(done["runs"], done["fpr"]))
        return 0
    if not a.runs:
        ap.error("--runs is required (or --render)")
    runs = [one(r, a.fpr, a.scan, a.detectors) for r in a.runs]
    write_results(a.out, "cut", {"fpr": a.fpr, "runs": runs}, render(runs, a.fpr))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
