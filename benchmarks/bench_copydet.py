"""Copy detection on held-out copy corpora: recall per edit at pair precision >= 0.99, calibration, speed, cost.

    taskset -c 1 python benchmarks/bench_copydet.py --work runs/copydet      # results/copydet.{md,json} and
                                                                             # scanner/neighbours/shipped/calibration.json
    python benchmarks/bench_copydet.py --work runs/copydet --time-only      # results/copydet_time.{md,json}: the
                                                                             # `memscan dedup` wall time alone (run it
                                                                             # on a quiet machine)

The copy corpus (COPY_CORPUS): the demo builder at 96 px with 1,600 unique images (digits, LFW faces, photo crops),
30 groups of byte-identical copies and 300 near-duplicate groups, each an original and 1-3 copies drawing from every
edit (scanner.demo.corpus.ALL_EDITS: JPEG q20-40, shift, colour, down-up resize, crop 5-25 %, horizontal flip, rotation
3-15 degrees, text overlay, 5-10 % border, grayscale): about 2,570 images, the size of the outside corpus of issue #34.

Seeds and what each is for, fixed before any was looked at:
- seed 0 (tuning): the in-memory reference of the scan's grouping (inmemory.find_duplicate_groups) with the shipped
  embedder, over GRID; among the settings at pair precision >= TUNE_PRECISION (a margin over the 0.99 goal; when none
  reaches it, the settings within PRECISION_SLACK of the most precise one: 2026-12-07, on the first look at seed 0's
  grid, none did, so this fallback was written before any other seed was looked at), those
  within RECALL_SLACK of the highest smallest per-edit recall, and of them the one with the fewest candidate pairs
  to verify per image (the cost at scale), then the higher pair recall;
- seeds 5 and 6 (calibration): the same reference at that setting; every group member's link kind and score, and
  whether it is right (in its kept image's planted group), give the table from score to precision
  (scanner/neighbours/calibrated.py) that `memscan dedup` applies;
- seeds 1-4 (report): the real `memscan dedup` at its defaults (which carry the tuned setting), evaluated with
  `memscan evaluate`'s functions: pair precision and recall, recall per edit pooled over the four seeds with the
  one-sided 95 % Clopper-Pearson bound over groups (bench_detection.pooled_recall), and the calibrated precision
  against the share right on these seeds.
Timings say the machine's load average beside them; --time-only reruns the timing alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench_detection import pooled_recall
from results_file import write_results

COPY_CORPUS = {"n_unique": 1600, "n_repeated": 0, "n_oversampled": 0, "n_exact_dup_groups": 30,
               "n_near_dup_groups": 300, "n_corrupt": 0, "n_no_caption": 0, "size": 96, "samples_per_shard": 500,
               "truncate_last_shard": False, "n_heldout": 0}
TUNE, CALIBRATION, REPORT = 0, (5, 6), (1, 2, 3, 4)
GRID = {"dup_threshold": (0.93, 0.95, 0.97, 0.98, 0.99, 1.0), "align_min_cosine": (0.6, 0.8),
        "verify_min_score": (0.98, 0.99, 0.995), "verify_min_detail": (0.0, 0.02, 0.025, 0.03)}
TUNE_PRECISION = 0.995
PRECISION_SLACK = 0.002
RECALL_SLACK = 0.01
K = 20


def corpus(work: Path, seed: int) -> Path:
    from scanner.demo.corpus import build_demo_corpus

    c = work / f"seed{seed}" / "corpus"
    if not (c / "truth.parquet").exists():
        build_demo_corpus(c, seed=seed, **COPY_CORPUS)
    return c


def planted(truth: pd.DataFrame, keys) -> pd.DataFrame:
    return truth[truth["group_id"].notna() & truth["key"].isin(set(keys))]


class Reference:
    """One corpus in memory: keys, embeddings, pHashes and thumbnails as the scan makes them, and the verifier's
    scores cached over calls."""

    def __init__(self, c: Path, n_cfg):
        from scanner.data.load import load_images
        from scanner.neighbours.align import thumbnails
        from scanner.neighbours.embed import load_embedder
        from scanner.neighbours.phash import phash64

        self.keys, images, _, self.hashes = load_images(str(c / "shards"), n_cfg.image_size)
        self.vectors = load_embedder(n_cfg, "cpu").embed(images)
        self.phashes = phash64(images)
        self.thumbs = thumbnails(images, n_cfg.align_size)
        self.truth = pd.read_parquet(c / "truth.parquet")
        self.cache: dict = {}
        from inmemory import exact_knn

        sims, ids = exact_knn(self.vectors, self.vectors, K + 1)
        q = np.repeat(np.arange(len(ids)), ids.shape[1]).reshape(ids.shape)
        real = (ids >= 0) & (ids != q)
        pairs = np.sort(np.stack([q[real], ids[real]], 1), 1)
        _, first = np.unique(pairs, axis=0, return_index=True)
        self.pair_sims = sims[real][first]  # each neighbour pair once, for the cost of a setting

    def candidates_per_image(self, threshold: float, floor: float) -> float:
        """Pairs the verifier checks per image at this setting (an upper bound: the scan asks from distinct bytes
        only, among units' kept members)."""
        return float(((self.pair_sims >= floor) & (self.pair_sims < threshold)).sum() / len(self.keys))

    def groups(self, threshold: float, floor: float, min_score: float, min_detail: float, n_cfg) -> pd.DataFrame:
        from inmemory import find_duplicate_groups

        return find_duplicate_groups(self.keys, self.vectors, self.hashes, threshold, k=K, phashes=self.phashes,
                                     phash_max_dist=n_cfg.phash_max_dist, thumbs=self.thumbs,
                                     verify=(n_cfg.align_size, floor, min_score, min_detail), verify_cache=self.cache)


def metrics(dups: pd.DataFrame, truth: pd.DataFrame, keys) -> dict:
    from scanner.demo.evaluate import duplicates_by_edit
    from scanner.neighbours.dedup import pair_precision_recall

    p = planted(truth, keys)
    pr = pair_precision_recall(dict(zip(dups["key"], dups["group_id"])), dict(zip(p["key"], p["group_id"])))
    return {**pr, "recall_by_edit": duplicates_by_edit(dups, p)}


def members_right(dups: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Every non-kept member with its link, score, calibrated precision and whether it is right."""
    from scanner.demo.evaluate import removals_against_truth

    r = removals_against_truth(dups, truth)
    m = dups[~dups["keep"]].merge(r[["key", "right"]], on="key")
    return m[["key", "link", "score", "precision", "right"]]


def tune(work: Path, n_cfg) -> dict:
    import itertools

    ref = Reference(corpus(work, TUNE), n_cfg)
    rows = []
    for thr, floor, ms, md in itertools.product(*GRID.values()):
        m = metrics(ref.groups(thr, floor, ms, md, n_cfg), ref.truth, ref.keys)
        edits = {e["edit"]: e["recall"] for e in m["recall_by_edit"] if e["planted"] == "near_dup"}
        rows.append({"dup_threshold": thr, "align_min_cosine": floor, "verify_min_score": ms, "verify_min_detail": md,
                     "pair_precision": m["pair_precision"], "pair_recall": m["pair_recall"],
                     "min_edit_recall": min(edits.values()), "near_dup_recall": edits,
                     "candidates_per_image": ref.candidates_per_image(thr, floor)})
    return select(rows, len(ref.cache) - 1)


def select(rows: list[dict], verified_pairs: int) -> dict:
    """The setting kept from the tuning seed's grid (the rule in the module docstring)."""
    ok = [r for r in rows if r["pair_precision"] >= TUNE_PRECISION]
    if not ok:  # no setting reaches the target: the most precise ones (within PRECISION_SLACK of the best)
        best_p = max(r["pair_precision"] for r in rows)
        ok = [r for r in rows if r["pair_precision"] >= best_p - PRECISION_SLACK]
    # the most recall on the hardest edit; within RECALL_SLACK of it, the fewest pairs to verify (the cost at
    # scale), then the higher pair recall
    top = max(r["min_edit_recall"] for r in ok)
    best = min((r for r in ok if r["min_edit_recall"] >= top - RECALL_SLACK),
               key=lambda r: (r["candidates_per_image"], -r["pair_recall"]))
    return {"seed": TUNE, "grid": rows, "chosen": {k: best[k] for k in GRID}, "chosen_row": best,
            "verified_pairs": verified_pairs}


def calibrate(work: Path, n_cfg, chosen: dict) -> dict:
    from scanner.neighbours.calibrated import build_table, settings_of
    from scanner.neighbours.checkpoint import checkpoint_digest
    from scanner.neighbours.run import shipped_embedder

    frames = []
    for seed in CALIBRATION:
        ref = Reference(corpus(work, seed), n_cfg)
        dups = ref.groups(chosen["dup_threshold"], chosen["align_min_cosine"], chosen["verify_min_score"],
                          chosen["verify_min_detail"], n_cfg)
        frames.append(members_right(dups, ref.truth).assign(seed=seed))
    m = pd.concat(frames, ignore_index=True)
    thr, ms = chosen["dup_threshold"], chosen["verify_min_score"]
    edges = {"embedding": sorted({thr, *np.round(np.linspace(thr, 1.0, 5)[1:-1], 4).tolist(), 1.0001}),
             "verified": sorted({ms, *np.round(np.linspace(ms, 1.0, 4)[1:-1], 5).tolist(), 1.0001}),
             "phash": [1 - n_cfg.phash_max_dist / 64, 1.0001]}
    # the phash rows' scores: the in-memory reference leaves them NaN; the scan computes 1 - Hamming / 64, within the
    # phash pass's radius by construction, so one bin over that radius holds them all
    m.loc[m["link"] == "phash", "score"] = 1.0
    kinds = build_table(m["link"].to_numpy(), m["score"].to_numpy(), m["right"].to_numpy(), edges)
    table = {"embedder_digest": checkpoint_digest(shipped_embedder()), "settings": settings_of(n_cfg),
             "measured_on": f"demo copy corpora, seeds {', '.join(map(str, CALIBRATION))} (benchmarks/bench_copydet.py)",
             "kinds": kinds}
    return {"table": table, "members": len(m),
            "by_link": m.groupby("link")["right"].agg(["size", "mean"]).reset_index().to_dict("records")}


def dedup(c: Path, out: Path, extra: list[str] | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    load0 = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "scanner", "dedup", "--shards", str(c / "shards"), "--out", str(out),
                           "--no-progress", *(extra or [])], env=env, capture_output=True, text=True, check=False)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"memscan dedup failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": round(wall, 1), "load_1min_before": load0, "load_1min_after": os.getloadavg()[0],
            "timings_s": summary.get("timings_s"), "neighbours": summary.get("neighbours"),
            "samples": summary.get("counts", {}).get("seen")}


def report(work: Path, seeds=REPORT) -> list[dict]:
    from scanner.demo.evaluate import evaluate

    runs = []
    for seed in seeds:
        c = corpus(work, seed)
        out = work / f"seed{seed}" / "dedup"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        t = dedup(c, out)
        m = evaluate(out, c / "truth.parquet", write=False, n_boot=0)["duplicates"]
        cal = members_right(pd.read_parquet(out / "duplicates.parquet"), pd.read_parquet(c / "truth.parquet"))
        runs.append({"seed": seed, "timing": t, "duplicates": m, "members": cal.to_dict("list")})
        print(f"report: seed {seed} P {m['pair_precision']:.4f} R {m['pair_recall']:.4f} wall {t['wall_s']} s",
              flush=True)
    return runs


def costs(work: Path, n_cfg) -> dict:
    """Per image: the flip-pooled embedding (and without pooling), and the verifier per candidate pair, one thread."""
    import dataclasses

    import torch

    from scanner.data.load import load_images
    from scanner.neighbours.align import thumbnails
    from scanner.neighbours.embed import load_embedder
    from scanner.neighbours.verify import verify_pairs

    torch.set_num_threads(1)
    _, images, _, _ = load_images(str(corpus(work, TUNE) / "shards"), n_cfg.image_size)
    images = images[:2048]
    out = {"threads": 1, "load_1min": os.getloadavg()[0]}
    for flip in (True, False):
        emb = load_embedder(dataclasses.replace(n_cfg, flip_invariant=flip), "cpu")
        emb.embed(images[:64])
        t0 = time.time()
        emb.embed(images)
        out[f"embed_ms_per_image{'_flip' if flip else ''}"] = (time.time() - t0) / len(images) * 1e3
    th = thumbnails(images, n_cfg.align_size)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(th), 2048), rng.integers(0, len(th), 2048)
    verify_pairs(th[a[:64]], th[b[:64]], n_cfg.align_size)
    t0 = time.time()
    verify_pairs(th[a], th[b], n_cfg.align_size)
    out["verify_ms_per_pair"] = (time.time() - t0) / len(a) * 1e3
    return out


def render(data: dict) -> str:
    t = data["tune"]
    ch = t["chosen_row"]
    out = ["# Copy detection on held-out copy corpora (benchmarks/bench_copydet.py)", "",
           ("Copy corpora of the demo builder at 96 px (1,600 unique images, 30 byte-copy groups, 300 near-duplicate "
            "groups drawing from every edit). Seed 0 tuned the neighbours settings, seeds 5-6 measured the "
            "calibration table, the report seeds below ran the real `memscan dedup` at its defaults."), "",
           f"## Tuning (seed {t['seed']}, in-memory reference)", "",
           (f"Chosen: {t['chosen']}: pair P {ch['pair_precision']:.4f} / R {ch['pair_recall']:.4f}, smallest "
            f"near-duplicate edit recall {ch['min_edit_recall']:.3f}, {ch['candidates_per_image']:.2f} candidate pairs "
            f"per image to verify. The rule: at pair precision >= {TUNE_PRECISION} ("
            + ("some reached it" if any(r["pair_precision"] >= TUNE_PRECISION for r in t["grid"]) else
               f"none reached it, so: within {PRECISION_SLACK} of the most precise")
            + f"), the best smallest edit recall (within {RECALL_SLACK}), then the "
            f"fewest pairs to verify. {len(t['grid'])} settings tried, {t['verified_pairs']} candidate pairs "
            "verified."), ""]
    if t.get("departure"):
        out += [(f"**Departure from the rule**: the rule chose {t['rule_choice']}; this run reports {t['chosen']} "
                 f"because: {t['departure']}"), ""]
    runs = data["report"]
    seeds = ", ".join(str(r["seed"]) for r in runs)
    out += [f"## Held-out seeds {seeds} (`memscan dedup`, defaults)", "",
            ("| seed | pair P / R | pairs of distinct bytes P / R | removals P / R | wall s (1-min load before) | "
            "train / stages / finalize s |"), "|---|---|---|---|---|---|"]
    for r in runs:
        d, tm = r["duplicates"], r["timing"]
        ni = d.get("non_identical", {})
        ts = tm.get("timings_s") or {}
        out.append(f"| {r['seed']} | {d['pair_precision']:.4f} / {d['pair_recall']:.4f} | "
                   f"{ni.get('pair_precision', float('nan')):.4f} / {ni.get('pair_recall', float('nan')):.4f} | "
                   f"{d.get('removal_precision', float('nan')):.4f} / {d.get('removal_recall', float('nan')):.4f} | "
                   f"{tm['wall_s']} ({tm['load_1min_before']:.2f}) | {ts.get('train_embedder')} / "
                   f"{ts.get('stages')} / {ts.get('finalize')} |")
    edits = sorted({(e["planted"], e["edit"]) for r in runs for e in r["duplicates"]["recall_by_edit"]})
    out += ["", (f"Recall per planted kind and edit, pooled over seeds {seeds} (members found / members; groups whose "
                 "every such member is found / groups, one-sided 95 % Clopper-Pearson lower bound):"), "",
            "| kind / edit | " + " | ".join(f"seed {r['seed']}" for r in runs) + " | pooled |",
            "|---|" + "---|" * (len(runs) + 1)]
    for kind, edit in edits:
        rows = [next((e for e in r["duplicates"]["recall_by_edit"] if (e["planted"], e["edit"]) == (kind, edit)), None)
                for r in runs]
        out.append(f"| {kind} / {edit} | " + " | ".join("–" if e is None else f"{e['recall']:.3f}" for e in rows)
                   + f" | {pooled_recall([e for e in rows if e])} |")
    cal = data["calibration"]["table"]["kinds"]
    out += ["", f"## Calibration (seeds 5-6) and how it holds on seeds {seeds}", "",
            "| link | score bin | links (5-6) | precision (5-6) | links (report) | right share (report) |",
            "|---|---|---|---|---|---|"]
    held = pd.concat([pd.DataFrame(r["members"]) for r in runs], ignore_index=True)
    for kind, tb in cal.items():
        e = tb["edges"]
        for i in range(len(e) - 1):
            m = held[(held["link"] == kind) & (held["score"] >= e[i]) & (held["score"] < e[i + 1])]
            out.append(f"| {kind} | [{e[i]:.4f}, {min(e[i + 1], 1.0):.4f}] | {tb['links'][i]} | "
                       f"{tb['precision'][i]:.4f} | {len(m)} | "
                       f"{m['right'].mean() if len(m) else float('nan'):.4f} |")
    c = data["costs"]
    out += ["", "## Cost (one thread)", "",
            (f"Embedding {c['embed_ms_per_image_flip']:.3f} ms per image flip-pooled ({c['embed_ms_per_image']:.3f} "
             f"without); the verifier {c['verify_ms_per_pair']:.3f} ms per candidate pair; candidate pairs verified "
             f"per image on seeds {seeds}: {data['pairs_per_image']:.2f}; so {data['ms_per_image']:.3f} ms per image, "
             f"{data['core_hours_1e9']:.0f} core-hours at 10^9 images (1-min load during the cost run "
             f"{c['load_1min']:.2f})."), ""]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    from scanner.config import NeighboursConfig
    from scanner.neighbours.run import shipped_embedder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="corpora and dedup runs (corpora reused when present)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--time-only", action="store_true", help="only time `memscan dedup` on seed 1's corpus")
    ap.add_argument("--stage", choices=["tune", "all"], default="all", help="tune: stop after the tuning seed")
    ap.add_argument("--render", action="store_true", help="rewrite results/NAME.md from results/NAME.json")
    ap.add_argument("--name", default="copydet", help="results/NAME.{md,json}")
    ap.add_argument("--report-seeds", type=int, nargs="+", default=list(REPORT))
    ap.add_argument("--setting", nargs="*", default=[], metavar="KEY=VALUE",
                    help="replace a tuned value (say why with --why): the run then reports that setting")
    ap.add_argument("--why", default="", help="why --setting departs from the tuning rule (recorded)")
    a = ap.parse_args(argv)
    if a.render:
        data = json.loads((a.out / f"{a.name}.json").read_text())
        write_results(a.out, a.name, data, render(data))
        return 0
    if a.time_only:
        c = corpus(a.work, REPORT[0])
        out = a.work / "time-only"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        t = dedup(c, out)
        md = (f"# `memscan dedup` wall time (benchmarks/bench_copydet.py --time-only)\n\nSeed {REPORT[0]}'s copy corpus "
              f"({t['samples']} images at 96 px), defaults, Ray's start included: {t['wall_s']} s wall; 1-min load "
              f"average {t['load_1min_before']:.2f} before, {t['load_1min_after']:.2f} after; phases "
              f"{t['timings_s']}.\n")
        write_results(a.out, "copydet_time", t, md)
        return 0
    n_cfg = NeighboursConfig(clip_checkpoint=shipped_embedder())
    cache = a.work / "tune.json"  # the tuning seed's grid is deterministic: a rerun of the later stages reuses it
    if cache.is_file():
        t = json.loads(cache.read_text())
        tuned = select(t["grid"], t["verified_pairs"])
    else:
        tuned = tune(a.work, n_cfg)
    cache.write_text(json.dumps(tuned))
    print(json.dumps(tuned["chosen_row"], indent=1), flush=True)
    if a.stage == "tune":
        write_results(a.out, "copydet_tune", tuned, json.dumps(tuned["chosen_row"], indent=1) + "\n")
        return 0
    if a.setting:
        if not a.why:
            raise SystemExit("--setting needs --why: a departure from the tuning rule is recorded with its reason")
        tuned["rule_choice"] = dict(tuned["chosen"])
        tuned["chosen"] = {**tuned["chosen"], **{k: float(v) for k, v in (x.split("=", 1) for x in a.setting)}}
        row = [r for r in tuned["grid"] if all(r[k] == v for k, v in tuned["chosen"].items())]
        tuned["chosen_row"], tuned["departure"] = (row[0] if row else tuned["chosen_row"]), a.why
    for k, v in tuned["chosen"].items():
        setattr(n_cfg, k, v)
    cal = calibrate(a.work, n_cfg, tuned["chosen"])
    defaults = NeighboursConfig()
    if any(getattr(defaults, k) != v for k, v in tuned["chosen"].items()):
        raise SystemExit(f"set the tuned neighbours defaults {tuned['chosen']} in scanner/config.py and the three "
                         "configs first: the report runs `memscan dedup` at its defaults")
    from scanner.files import write_json

    from scanner.neighbours.calibrated import TABLE

    write_json(cal["table"], TABLE)
    runs = report(a.work, a.report_seeds)
    n = sum(r["timing"]["samples"] for r in runs)
    pairs = sum((r["timing"]["neighbours"].get("aligned_candidates") or {}).get("checked", 0) for r in runs)
    c = costs(a.work, n_cfg)
    data = {"tune": tuned, "calibration": cal, "report": runs, "costs": c, "pairs_per_image": pairs / n,
            "ms_per_image": c["embed_ms_per_image_flip"] + pairs / n * c["verify_ms_per_pair"]}
    data["core_hours_1e9"] = data["ms_per_image"] * 1e-3 * 1e9 / 3600
    write_results(a.out, a.name, data, render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
