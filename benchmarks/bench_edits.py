"""Duplicate recall per copy edit, with the common edits the default demo corpus does not plant.

    python benchmarks/bench_edits.py --work runs/edits --seeds 1 2        # writes results/edits.{md,json}

Per seed: a demo corpus whose near-duplicate groups draw from every edit (jpeg, shift, color, resize and
the SSCD-style crop 5-20 %, horizontal flip, rotation 3-10 degrees, text overlay; 120 near-duplicate groups
so that each edit has ~30 members), then `memscan dedup --config demo` on it as a user runs it (the
copy-detection embedder trained on that corpus with the shipped settings, the shipped threshold), then
recall per planted kind and edit (`scanner.demo.evaluate.duplicates_by_edit`) and pair precision / recall.
Seeds 1 and 2 are held out: no setting was chosen on them.

--variants shipped edits: `edits` trains the embedder with the copy edits added to its training views
(EDIT_VIEWS: horizontal flips, rotations, a 'text' overlay; augment.py), with the shipped steps and threshold
otherwise, and passes it to dedup as --clip-checkpoint.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from results_file import write_results

from scanner.demo.corpus import COPY_EDITS, MORE_EDITS, build_demo_corpus
from scanner.demo.evaluate import duplicates_by_edit
from scanner.neighbours.dedup import pair_precision_recall

EDIT_VIEWS = {"flip_p": 0.5, "max_rotate_deg": 12.0, "overlay_p": 0.3}


def one(work: Path, seed: int, variant: str = "shipped") -> dict:
    corpus = work / f"seed{seed}" / "corpus"
    if not (corpus / "truth.parquet").exists():
        build_demo_corpus(corpus, seed=seed, n_near_dup_groups=120, near_dup_edits=COPY_EDITS + MORE_EDITS)
    out = work / f"seed{seed}" / ("dedup" if variant == "shipped" else f"dedup-{variant}")
    extra = []
    if variant == "edits":
        from scanner.config import NEIGHBOUR_SECTIONS, load_config, shipped_config
        from scanner.neighbours.train_embedder import train_embedder

        emb = work / f"seed{seed}" / "embedder-edits"
        if not (emb / "open_clip_config.json").exists():
            cfg = load_config(shipped_config("demo"), sections=NEIGHBOUR_SECTIONS).neighbours
            train_embedder(str(corpus / "shards"), emb, cfg, edits=EDIT_VIEWS)
        extra = ["--clip-checkpoint", str(emb)]
    if not (out / "duplicates.parquet").exists():
        proc = subprocess.run([sys.executable, "-m", "scanner", "dedup", "--config", "demo", "--shards",
                               str(corpus / "shards"), "--out", str(out), "--no-progress", *extra],
                              check=False, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"memscan dedup failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    truth = pd.read_parquet(corpus / "truth.parquet")
    dups = pd.read_parquet(out / "duplicates.parquet")
    scores = pd.read_parquet(out / "scores")
    present = set(scores.loc[scores["error"].isna(), "key"])
    planted = truth[truth["group_id"].notna() & truth["readable"] & truth["key"].isin(present)
                    & truth["planted"].isin(["exact_dup", "near_dup", "repeated"])]
    pr = pair_precision_recall(dict(zip(dups["key"], dups["group_id"])), dict(zip(planted["key"], planted["group_id"])))
    return {"seed": seed, "variant": variant, "pairs": pr,
            "recall_by_edit": duplicates_by_edit(dups, planted)}


def render(runs: list[dict]) -> str:
    out = ["# Duplicate recall per copy edit (benchmarks/bench_edits.py)", "",
           ("Near-duplicate groups drawing from every edit (the default four and the SSCD-style crop, flip, rotation "
            "and overlay), found by `memscan dedup --config demo` with the shipped embedder training and threshold. "
            "Recall: the share of a kind/edit's members found in one duplicate group with another member of their "
            "planted group. Seeds: " + ", ".join(str(r["seed"]) for r in runs) + " (held out unless 0)."), "",
           "| kind / edit | " + " | ".join(f"seed {r['seed']}, {r['variant']}" for r in runs) + " |",
           "|---|" + "---|" * len(runs)]
    keys = sorted({(e["planted"], e["edit"]) for r in runs for e in r["recall_by_edit"]})
    for kind, edit in keys:
        cells = []
        for r in runs:
            e = [x for x in r["recall_by_edit"] if (x["planted"], x["edit"]) == (kind, edit)]
            cells.append(f"{e[0]['recall']:.3f} ({e[0]['members']})" if e else "–")
        out.append(f"| {kind} / {edit} | " + " | ".join(cells) + " |")
    out += ["", "| seed | embedder | pair precision | pair recall |", "|---|---|---|---|"]
    for r in runs:
        out.append(f"| {r['seed']} | {r['variant']} | {r['pairs']['pair_precision']:.4f} | "
                   f"{r['pairs']['pair_recall']:.4f} |")
    out += ["", f"`edits`: the embedder's training views add {EDIT_VIEWS} (augment.py)."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="where corpora and dedup runs go (reused if present)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--variants", nargs="+", default=["shipped"], choices=["shipped", "edits"])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    runs = [one(a.work, s, v) for v in a.variants for s in a.seeds]
    write_results(a.out, "edits", {"runs": runs}, render(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
