"""LID of the model manifold on a trained demo model: which estimator gives a dimension, and what it separates.

    python benchmarks/bench_lid_theta.py --demo runs/demo                   # writes results/lid_theta.{md,json}
    python benchmarks/bench_lid_theta.py --demo runs/demo-seed1 --tag seed1  # a held-out corpus and model

`--demo` is a `memscan demo` directory (corpus/ with truth.parquet, model/). Images are decoded as the scan
decodes them. The sample (seeded): every oversampled image, `--copies` copies of every repeated group and
`--unique` unique images. Intervals: 95 % bootstrap over independent units (a repeated group counts once,
scanner.demo.evaluate.bootstrap_metrics). "Low flags memorization" for every LID (scanner/columns.py).

1. FLIPD at the clean point psi x (docs/method.md §2) and at noised points psi x + sigma z (§10) over a t0 grid:
   median per class, the share inside [0, D], AUROC of repeated and oversampled against unique.
2. t0 without labels: the knee of the median noised curve over all sampled images (Kneedle, flipd_sweep) and
   the t0 with the most values inside [0, D].
3. Precision of the noised estimator at `--t0`: noises x probes variants, each run with two seeds; the rank
   correlation of the two runs says how much of an image's value is the estimator's own noise.
4. NB (normal bundle, D + 16 score calls per image) on `--nb` images as the slow reference: its values,
   and each estimator's rank agreement with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from scipy.stats import spearmanr

from scanner.demo.evaluate import bootstrap_metrics
from scanner.geometry.flipd import find_knee, flipd, flipd_noised
from scanner.geometry.normal_bundle import nb_lid

T0S = [0.02, 0.05, 0.1, 0.2, 0.4]
VARIANTS = [(1, 4), (2, 4), (4, 1), (4, 4), (8, 1), (8, 2), (16, 1), (8, 8)]  # (noises, probes)


def load(demo: Path):
    import pandas as pd

    from scanner.config import ModelConfig
    from scanner.demo.train import load_images, to_model_space
    from scanner.models.loading import load_score_model

    info = json.loads((demo / "model" / "train_info.json").read_text())
    imgs = load_images(demo / "corpus", info.get("resolution", 16), info.get("channels", 3))
    truth = pd.read_parquet(demo / "corpus" / "truth.parquet").set_index("key")
    model = load_score_model(ModelConfig(kind="pixel", path=str(demo / "model"), device="cpu"))
    return model, imgs.keys, to_model_space(imgs.images), truth, info


def classes(keys: list[str], truth) -> tuple[np.ndarray, np.ndarray]:
    """Per key: its planted class and its group id ("" outside groups)."""
    planted = truth.reindex(keys)["planted"].to_numpy()
    groups = truth.reindex(keys)["group_id"].astype("string").fillna("").to_numpy().astype(str)
    return planted, groups


def units_of(rows: np.ndarray, keys: list[str], planted: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """The independent unit of each row: its group for repeated copies, else its key."""
    return np.array([str(g) if p == "repeated" else keys[i] for i, g, p in
                     zip(rows, groups[rows], planted[rows])], dtype=object)


def pick(keys: list[str], truth, unique: int, copies: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices, their class and their unit (group id, else key)."""
    rng = np.random.default_rng(seed)
    planted, groups = classes(keys, truth)
    rows: list[int] = list(np.flatnonzero(planted == "oversampled"))
    for g in sorted({g for g, p in zip(groups, planted) if p == "repeated"}):
        members = np.flatnonzero((groups == g) & (planted == "repeated"))
        rows += list(rng.choice(members, min(copies, members.size), replace=False))
    rows += list(rng.choice(np.flatnonzero(planted == "unique"), unique, replace=False))
    rows = np.array(sorted(rows))
    return rows, planted[rows], units_of(rows, keys, planted, groups)


def separation(values: np.ndarray, cls: np.ndarray, units: np.ndarray, seed: int = 0) -> dict:
    """AUROC ("low flags") of repeated and of oversampled rows against unique ones, with the 95 % bootstrap
    interval over `units`."""
    out = {}
    for pos in ("repeated", "oversampled"):
        sel = np.isin(cls, [pos, "unique"])
        y = cls[sel] == pos
        b = bootstrap_metrics(y, -values[sel], units[sel], n_boot=400, seed=seed)
        from sklearn.metrics import roc_auc_score

        out[pos] = {"auroc": float(roc_auc_score(y, -values[sel])), "auroc_ci": b["auroc_ci"]}
    return out


def batched(fn, x: torch.Tensor, batch: int = 64) -> np.ndarray:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)]).double().numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, required=True)
    ap.add_argument("--tag", default="seed0")
    ap.add_argument("--unique", type=int, default=300)
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--nb", type=int, default=40)
    ap.add_argument("--t0", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    model, keys, x_all, truth, info = load(a.demo)
    rows, cls, units = pick(keys, truth, a.unique, a.copies, a.seed)
    x = x_all[rows]
    dim = model.dim
    res: dict = {"tag": a.tag, "demo": str(a.demo), "model_steps": info.get("steps"), "dim": dim,
                 "corpus_seed": info.get("seed"), "sample": {c: int((cls == c).sum()) for c in np.unique(cls)},
                 "units": {c: len(set(units[cls == c])) for c in np.unique(cls)}, "grid": []}
    print(f"{a.tag}: {len(rows)} images {res['sample']}, D = {dim}", flush=True)

    # 1. clean vs noised over t0
    curves = {}
    for at in ("clean", "noised"):
        for t0 in T0S:
            t = time.time()
            if at == "clean":
                v = batched(lambda b, t0=t0: flipd(model, b, t0, probes=4, jvp="vjp", seed=a.seed), x)
            else:
                v = batched(lambda b, t0=t0: flipd_noised(model, b, t0, noises=2, probes=4, jvp="vjp", seed=a.seed), x)
            curves[(at, t0)] = v
            row = {"at": at, "t0": t0, "seconds": round(time.time() - t, 1),
                   "median": {c: float(np.median(v[cls == c])) for c in ("unique", "repeated", "oversampled")},
                   "in_range": float(((v >= 0) & (v <= dim)).mean()), **separation(v, cls, units, a.seed)}
            res["grid"].append(row)
            print(f"  {at:6} t0={t0:<5} medians {row['median']} in [0,D] {row['in_range']:.2f} "
                  f"AUROC rep {row['repeated']['auroc']:.3f} ovs {row['oversampled']['auroc']:.3f}", flush=True)

    # 2. t0 without labels
    med = [float(np.median(curves[("noised", t0)])) for t0 in T0S]
    inr = [float(((curves[("noised", t0)] >= 0) & (curves[("noised", t0)] <= dim)).mean()) for t0 in T0S]
    knee = find_knee(T0S, med)
    res["t0_choice"] = {"knee_t0": T0S[knee], "median_curve": med, "most_in_range_t0": T0S[int(np.argmax(inr))],
                        "in_range_curve": inr}
    print(f"  knee of the noised median curve: t0 = {T0S[knee]}; most in range: {res['t0_choice']['most_in_range_t0']}")

    # 3. precision of the noised estimator at a.t0
    res["variants"] = []
    for noises, probes in VARIANTS:
        runs = [batched(lambda b, n=noises, p=probes, s=s: flipd_noised(model, b, a.t0, noises=n, probes=p, jvp="vjp",
                                                                         seed=s), x)
                for s in (a.seed, a.seed + 1000)]
        row = {"noises": noises, "probes": probes, "repeat_spearman": float(spearmanr(*runs)[0]),
               "repeat_sd": float(np.std(runs[0] - runs[1]) / np.sqrt(2)), **separation(runs[0], cls, units, a.seed)}
        curves[("variant", noises, probes)] = runs[0]
        res["variants"].append(row)
        print(f"  noises {noises} x probes {probes}: repeat rho {row['repeat_spearman']:.3f} sd {row['repeat_sd']:.1f} "
              f"AUROC rep {row['repeated']['auroc']:.3f} ovs {row['oversampled']['auroc']:.3f}", flush=True)

    # 4. NB reference on a subsample (a third from each class where possible)
    rng = np.random.default_rng(a.seed + 1)
    sub = np.concatenate([rng.choice(np.flatnonzero(cls == c), min(int((cls == c).sum()), n), replace=False)
                          for c, n in (("unique", a.nb // 2), ("repeated", a.nb // 4), ("oversampled", a.nb // 4))])
    t = time.time()
    # rank by the count of singular values above 1 % of the largest: the largest log-gap (NB's other rule) reads
    # 1-2 dimensions for every image of this model at every t (measured), the threshold gives a dimension
    nb = batched(lambda b: nb_lid(model, b, 0.01, seed=a.seed, chunk=1024, rank="threshold", rel_threshold=0.01),
                 x[sub], batch=4)
    res["nb"] = {"n": int(sub.size), "seconds": round(time.time() - t, 1), "t": 0.01, "samples": dim + 16,
                 "rank": "threshold 0.01",
                 "median": {c: float(np.median(nb[cls[sub] == c])) for c in ("unique", "repeated", "oversampled")},
                 "in_range": float(((nb >= 0) & (nb <= dim)).mean()), "spearman": {}}
    for name, v in (("clean t0=0.1", curves[("clean", 0.1)]), ("noised t0=0.1", curves[("noised", 0.1)]),
                    (f"noised t0={T0S[knee]} (knee)", curves[("noised", T0S[knee])]),
                    (f"noised 8x1 t0={a.t0:g}", curves[("variant", 8, 1)]),
                    (f"noised 8x8 t0={a.t0:g}", curves[("variant", 8, 8)])):
        res["nb"]["spearman"][name] = float(spearmanr(v[sub], nb)[0])
    print(f"  NB: {res['nb']}", flush=True)

    # 5. what the noised estimator costs in a scan: compute_scores with the demo config, lid_flipd at the clean
    # point (shares the p-Laplace pass) against noised points, same images, same run, best of 3
    from scanner.config import load_config, shipped_config
    from scanner.geometry.scores import compute_scores

    geo = load_config(shipped_config("demo"), [f"model.path={a.demo / 'model'}"]).geometry
    xb = x[:128]
    cost = {}
    for at in ("clean", "noised"):
        cfg = dataclasses.replace(geo, flipd_at=at, t0=geo.t_laplace if at == "clean" else geo.t0)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            for i in range(0, 128, 32):
                compute_scores(model, xb[i:i + 32], cfg)
            times.append(time.perf_counter() - t)
        cost[at] = min(times)
    res["cost"] = {"images": 128, "clean_s": round(cost["clean"], 2), "noised_s": round(cost["noised"], 2),
                   "ratio": round(cost["noised"] / cost["clean"], 2), "flipd_noises": geo.flipd_noises,
                   "flipd_probes": geo.flipd_probes}
    print(f"  cost: {res['cost']}", flush=True)
    res["seconds"] = round(time.time() - t_start, 1)
    res["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "threads": a.threads}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "lid_theta.json"
    allres = json.loads(path.read_text()) if path.exists() else {}
    allres[a.tag] = res
    path.write_text(json.dumps(allres, indent=1))
    (a.out / "lid_theta.md").write_text(render(allres))
    print(f"wrote {path} and lid_theta.md in {res['seconds']} s")
    return 0


def render(allres: dict) -> str:
    out = ["# LID of the model manifold on the trained demo model (benchmarks/bench_lid_theta.py)", "",
           ("Low flags memorization. AUROC against unique images, 95 % bootstrap interval over independent units "
           "(a repeated group counts once). D = 768 (16 x 16 x 3)."), ""]
    for tag, r in allres.items():
        out += [f"## {tag}: {r['demo']} (model {r['model_steps']} steps, corpus seed {r['corpus_seed']})", "",
                f"Sample: {r['sample']} images, {r['units']} independent units.", "",
                "| at | t0 | median unique / repeated / oversampled | in [0, D] | AUROC repeated | AUROC oversampled |",
                "|---|---|---|---|---|---|"]
        for g in r["grid"]:
            m = g["median"]
            out.append(f"| {g['at']} | {g['t0']} | {m['unique']:.0f} / {m['repeated']:.0f} / {m['oversampled']:.0f} | "
                       f"{g['in_range']:.2f} | {g['repeated']['auroc']:.3f} ({g['repeated']['auroc_ci'][0]:.3f}-"
                       f"{g['repeated']['auroc_ci'][1]:.3f}) | {g['oversampled']['auroc']:.3f} "
                       f"({g['oversampled']['auroc_ci'][0]:.3f}-{g['oversampled']['auroc_ci'][1]:.3f}) |")
        c = r["t0_choice"]
        out += ["", (f"t0 without labels: the knee of the noised median curve is t0 = {c['knee_t0']}; the most values "
                f"inside [0, D] at t0 = {c['most_in_range_t0']}."), "",
                "Noised estimator, noises x probes (two seeds: rank correlation and per-image SD of one run):", "",
                "| noises x probes | repeat Spearman | per-image SD | AUROC repeated | AUROC oversampled |",
                "|---|---|---|---|---|"]
        for v in r["variants"]:
            out.append(f"| {v['noises']} x {v['probes']} | {v['repeat_spearman']:.3f} | {v['repeat_sd']:.1f} | "
                       f"{v['repeated']['auroc']:.3f} ({v['repeated']['auroc_ci'][0]:.3f}-{v['repeated']['auroc_ci'][1]:.3f}) | "
                       f"{v['oversampled']['auroc']:.3f} ({v['oversampled']['auroc_ci'][0]:.3f}-"
                       f"{v['oversampled']['auroc_ci'][1]:.3f}) |")
        nb = r["nb"]
        out += ["", f"NB reference (t = {nb['t']}, {nb['samples']} score calls per image, rank: "
                f"{nb.get('rank', 'gap')}, {nb['n']} images, "
                f"{nb['seconds']} s): medians unique / repeated / oversampled {nb['median']['unique']:.0f} / "
                f"{nb['median']['repeated']:.0f} / {nb['median']['oversampled']:.0f}, in [0, D] {nb['in_range']:.2f}. "
                "Spearman with NB: " + ", ".join(f"{k} {v:.2f}" for k, v in nb["spearman"].items()) + ".",
                ""]
        if "cost" in r:
            c = r["cost"]
            out += [(f"Cost in a scan (compute_scores with the demo config, {c['images']} images, best of 3, one run): "
                    f"lid_flipd at noised points ({c['flipd_noises']} x {c['flipd_probes']}) {c['noised_s']} s against "
                    f"{c['clean_s']} s at the clean point: {c['ratio']}x for all the geometry columns together."), ""]
        out += [f"{r['seconds']} s on {r['machine']['threads']} threads.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
