"""Copy-detection embedder recipes on the tuning seed: which training change buys recall per edit at P >= 0.99.

    python benchmarks/bench_embedder.py --work runs/embedder      # writes results/embedder.{md,json}

A demo corpus of seed 0 (the tuning seed) whose near-duplicate groups draw from every edit (the default four and
crop, hflip, rotate, overlay; 120 groups), then per recipe: the embedder trained on that corpus
(train_on_images, seed 0), every readable image embedded, duplicate groups as memscan forms them
(find_duplicate_groups: byte hashes, pHash radius 2, cosine links over k = 20 neighbours, the shipped pixel check
of near-misses) at several cosine thresholds, and the pair precision / recall and recall per near-duplicate edit
(evaluate.duplicates_by_edit).
Embedders are cached in WORK/emb_<recipe>; nothing here is measured on a held-out seed (bench_edits.py does
that for the shipped recipe and one other).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from inmemory import find_duplicate_groups
from results_file import write_results

from scanner.demo.corpus import COPY_EDITS, MORE_EDITS, build_demo_corpus
from scanner.demo.evaluate import duplicates_by_edit
from scanner.neighbours.dedup import pair_precision_recall

EDIT_VIEWS = {"flip_p": 0.5, "max_rotate_deg": 12.0, "overlay_p": 0.3}
# recipe -> train_on_images keywords (plus "width": the ResNet tower's width, 16 shipped)
RECIPES = {
    "shipped": {},
    "edits": {"edits": EDIT_VIEWS},
    "edits_w32": {"edits": EDIT_VIEWS, "width": 32},
    "edits_s2000": {"edits": EDIT_VIEWS, "steps": 2000},
    "edits_lp1": {"edits": EDIT_VIEWS, "input_lowpass": 1.0},
    "edits_bs512": {"edits": EDIT_VIEWS, "batch_size": 512},
}
THRESHOLDS = (0.97, 0.95, 0.93, 0.9)


def embedder(work: Path, name: str, recipe: dict) -> tuple[Path, float | None]:
    from scanner.neighbours import embed as E
    from scanner.neighbours.train_embedder import DEFAULT_ARCH, save_embedder, train_on_images, training_sample

    kw = dict(recipe)
    arch = DEFAULT_ARCH
    if "width" in kw:
        arch = f"memscan-copydet-rn{kw['width']}"
        base = E.ARCHITECTURES[DEFAULT_ARCH]
        E.ARCHITECTURES[arch] = {**base, "vision_cfg": {**base["vision_cfg"], "width": kw.pop("width")}}
    out = work / f"emb_{name}"
    if (out / "open_clip_config.json").exists():
        return out, None
    images, _, _, _ = training_sample(str(work / "corpus" / "shards"), 32, 50_000, 0)
    t0 = time.time()
    model, record = train_on_images(images, steps=kw.pop("steps", 600), arch=arch, seed=0, **kw)
    save_embedder(model, arch, 32, out, record)
    return out, time.time() - t0


def main(argv: list[str] | None = None) -> int:
    import torch

    from scanner.config import NEIGHBOUR_SECTIONS, load_config, shipped_config
    from scanner.data.load import load_images
    from scanner.neighbours.align import thumbnails
    from scanner.neighbours.embed import load_embedder
    from scanner.neighbours.phash import phash64

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="corpus and embedders (reused when present)")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    corpus = a.work / "corpus"
    if not (corpus / "truth.parquet").exists():
        build_demo_corpus(corpus, seed=0, n_near_dup_groups=120, near_dup_edits=COPY_EDITS + MORE_EDITS)
    keys, images, _, hashes = load_images(str(corpus / "shards"), 32)
    phashes = phash64(images)
    shipped = load_config(shipped_config("demo"), sections=NEIGHBOUR_SECTIONS).neighbours
    thumbs = thumbnails(images, shipped.align_size)  # the scan's pixel check of near-misses, as shipped
    align = (shipped.align_size, shipped.align_min_cosine, shipped.align_max_rmse, shipped.align_max_shift)
    truth = pd.read_parquet(corpus / "truth.parquet")
    planted = truth[truth["group_id"].notna() & truth["readable"] & truth["key"].isin(set(keys))
                    & truth["planted"].isin(["exact_dup", "near_dup", "repeated"])]
    runs = []
    for name in a.recipes:
        path, seconds = embedder(a.work, name, RECIPES[name])
        cfg = load_config(shipped_config("demo"), sections=NEIGHBOUR_SECTIONS).neighbours
        cfg.clip_checkpoint = str(path)
        vectors = load_embedder(cfg, "cpu").embed(images)
        rows = []
        for thr in THRESHOLDS:
            dups = find_duplicate_groups(keys, vectors, hashes, thr, k=20, phashes=phashes, phash_max_dist=2,
                                         thumbs=thumbs, align=align)
            pr = pair_precision_recall(dict(zip(dups["key"], dups["group_id"])),
                                       dict(zip(planted["key"], planted["group_id"])))
            edits = {e["edit"]: e["recall"] for e in duplicates_by_edit(dups, planted) if e["planted"] == "near_dup"}
            rows.append({"threshold": thr, "pair_precision": pr["pair_precision"], "pair_recall": pr["pair_recall"],
                         "near_dup_recall": edits})
        runs.append({"recipe": name, "train": RECIPES[name], "train_seconds": seconds, "rows": rows})
        print(name, "done", flush=True)
    edits = sorted({e for r in runs for row in r["rows"] for e in row["near_dup_recall"]})
    md = ["# Embedder recipes on the tuning seed (benchmarks/bench_embedder.py)", "",
          ("Demo seed 0 with every copy edit planted (120 near-duplicate groups); duplicate groups as memscan forms "
           "them at each cosine threshold. Recall per near-duplicate edit; `copy` is the group's original. Rows with "
           "pair precision >= 0.99 in bold. `edits` adds to the training views " + json.dumps(EDIT_VIEWS) + "."), "",
          "| recipe | threshold | pair P | pair R | " + " | ".join(edits) + " |", "|---|---|---|---|" + "---|" * len(edits)]
    for r in runs:
        for row in r["rows"]:
            b = "**" if row["pair_precision"] >= 0.99 else ""
            md.append(f"| {r['recipe']} | {row['threshold']} | {b}{row['pair_precision']:.4f}{b} | "
                      f"{row['pair_recall']:.4f} | " + " | ".join(f"{row['near_dup_recall'].get(e, float('nan')):.2f}"
                                                                  for e in edits) + " |")
    md += ["", "Recipes: " + "; ".join(f"`{r['recipe']}` {json.dumps(r['train'])}" for r in runs) + "."]
    write_results(a.out, "embedder", {"runs": runs}, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
