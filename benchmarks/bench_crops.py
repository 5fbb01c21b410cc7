"""Which photo crops the duplicate detector groups wrongly, by their fine detail: the evidence for the corpus
builder's featureless-crop screen (scanner/demo/corpus.py, _MIN_CROP_DETAIL).

    python benchmarks/bench_crops.py runs/demo-seed0 [runs/demo-seed1 ...]   # writes results/crops.{md,json}

Each directory is a finished `memscan demo`. For every photo crop of the corpus (KEY.json's source names the photo
and the box), its fine detail: the RMSE in [0, 1] between the decoded 32 px image and its Gaussian blur (sigma 1
px), what the builder screens on. A crop is "in a wrong pair" when the scan's duplicate groups put it with an image
of another planted group (or a unique image): the look-alikes the truth calls distinct. The table gives the detail
quantiles of both sets and, per threshold, the share of all crops and of the wrong ones below it. The builder's
threshold (0.005) was read off seed 0's run before 5199043, the commit that added the screen.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench_detection import _crop, _sources
from results_file import write_results

from scanner.data.shards import iter_tar_samples
from scanner.demo.corpus import _detail

THRESHOLDS = (0.004, 0.005, 0.006, 0.008, 0.01)


def one(demo: Path) -> dict:
    src = _sources(demo)
    detail: dict[str, float] = {}
    for path in sorted((demo / "corpus" / "shards").glob("*.tar")):
        for s in iter_tar_samples(str(path)):
            if s.get("image") and _crop(src.get(s["key"], "")):
                try:
                    img = np.asarray(Image.open(io.BytesIO(s["image"])).convert("RGB"))
                except OSError:  # the planted corrupt images
                    continue
                detail[s["key"]] = _detail(img)
    dups = pd.read_parquet(demo / "scan" / "duplicates.parquet")
    truth = pd.read_parquet(demo / "corpus" / "truth.parquet").set_index("key")["group_id"]
    wrong: set[str] = set()
    for _, members in dups.groupby("group_id"):
        for a, b in itertools.combinations(members["key"].tolist(), 2):
            ga, gb = truth.get(a), truth.get(b)
            if not (pd.isna(ga) or pd.isna(gb)) and int(ga) == int(gb):
                continue
            wrong |= {k for k in (a, b) if k in detail}
    allv = np.array(list(detail.values()))
    wv = np.array([detail[k] for k in wrong])
    corpus = json.loads((demo / "corpus" / "demo_corpus.json").read_text())
    return {"demo": str(demo), "seed": corpus["params"]["seed"], "crops": len(allv), "wrong": len(wv),
            "quantiles_all": np.quantile(allv, [0.1, 0.25, 0.5]).tolist() if len(allv) else [],
            "quantiles_wrong": np.quantile(wv, [0.1, 0.25, 0.5]).tolist() if len(wv) else [],
            "below": {str(t): {"all": float((allv < t).mean()) if len(allv) else None,
                               "wrong": int((wv < t).sum())} for t in THRESHOLDS},
            "wrong_photos": sorted(src[k].split("[")[0].split(":")[-1] for k in wrong)}


def render(runs: list[dict]) -> str:
    out = ["# Fine detail of the photo crops the duplicate detector groups wrongly (benchmarks/bench_crops.py)", "",
           ("Fine detail: RMSE in [0, 1] between a 32 px crop and its Gaussian blur (sigma 1 px). Wrong: a crop the "
            "scan's duplicate groups put with an image of another planted group. The corpus builder refuses crops "
            "below 0.005 since 5199043 (read off the seed-0 run made before it)."), "",
           "| run | seed | crops | in wrong pairs | detail 10 / 25 / 50 % (all) | detail 10 / 25 / 50 % (wrong) | "
           + " | ".join(f"below {t}: all / wrong" for t in THRESHOLDS) + " |",
           "|---|---|---|---|---|---|" + "---|" * len(THRESHOLDS)]
    for r in runs:
        q = lambda v: " / ".join(f"{x:.4f}" for x in v) or "–"
        out.append(f"| {r['demo']} | {r['seed']} | {r['crops']} | {r['wrong']} | {q(r['quantiles_all'])} | "
                   f"{q(r['quantiles_wrong'])} | "
                   + " | ".join(f"{r['below'][str(t)]['all']:.3f} / {r['below'][str(t)]['wrong']}"
                                for t in THRESHOLDS) + " |")
    out += ["", "Photos of the crops in wrong pairs:", ""]
    for r in runs:
        counts = pd.Series(r["wrong_photos"], dtype=object).value_counts().to_dict()
        out.append(f"- {r['demo']} (seed {r['seed']}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demos", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    runs = [one(d) for d in a.demos]
    write_results(a.out, "crops", {"runs": runs}, render(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
