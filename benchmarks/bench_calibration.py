"""The score-norm calibration on a trained demo model: raw norm against the mirror ratio, which mirrors, which t.

    python benchmarks/bench_calibration.py --demo runs/demo --tag "seed 0"     # writes results/calibration.{md,json}

Every image of the demo corpus (decoded as the scan decodes it), forwards only. AUROC ("low flags") of repeated
and of oversampled images against unique ones, with the 95 % bootstrap interval over independent units (a
repeated group counts once, scanner.demo.evaluate.bootstrap_metrics), for
- the raw norm |eps(psi x, t)| and score_norm_cal with [hflip, vflip] over a grid of t (the t_cal sweep);
- at t_cal = 0.1: one mirror alone (hflip, vflip, rot180), both, and a one-pixel horizontal shift as the
  reference (an image just as simple as x and almost the same, but not the one the model saw).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench_lid_theta import classes, load, separation, units_of

from scanner.geometry.mirror import mirror
from scanner.geometry.trace import bview, time_vector

T_GRID = [0.02, 0.06, 0.1, 0.15, 0.2, 0.4]


def norms(model, x: torch.Tensor, t: float, ref: str | None = None, batch: int = 256) -> np.ndarray:
    """|eps(psi r(x), t)| for every image, r a mirror, "shift" (one pixel, horizontal, wrapped) or None."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            b = x[i:i + batch]
            if ref == "shift":
                b = torch.roll(b, 1, dims=-1)
            elif ref is not None:
                b = mirror(b, ref)
            tv = time_vector(t, b)
            psi, _ = model.psi_sigma(tv)
            out.append(model.eps(bview(psi, b) * b, tv).flatten(1).norm(dim=1))
    return torch.cat(out).double().numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, required=True)
    ap.add_argument("--tag", default="seed 0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    model, keys, x, truth, info = load(a.demo)
    planted, groups = classes(keys, truth)
    keep = np.isin(planted, ["repeated", "oversampled", "unique"])
    rows = np.flatnonzero(keep)
    x, cls, units = x[keep], planted[keep], units_of(rows, keys, planted, groups)
    res: dict = {"tag": a.tag, "demo": str(a.demo), "model_steps": info.get("steps"), "images": int(keep.sum()),
                 "sweep": [], "refs": []}
    for t in T_GRID:
        raw = norms(model, x, t)
        both = raw / np.exp((np.log(norms(model, x, t, "hflip")) + np.log(norms(model, x, t, "vflip"))) / 2)
        res["sweep"].append({"t": t, "raw": separation(raw, cls, units), "cal": separation(both, cls, units)})
        print(f"t={t}: raw {res['sweep'][-1]['raw']['repeated']['auroc']:.3f} cal "
              f"{res['sweep'][-1]['cal']['repeated']['auroc']:.3f}", flush=True)
    raw = norms(model, x, 0.1)
    refs = {r: norms(model, x, 0.1, r) for r in ("hflip", "vflip", "rot180", "shift")}
    for name, ref in (("hflip", refs["hflip"]), ("vflip", refs["vflip"]), ("rot180", refs["rot180"]),
                      ("hflip+vflip", np.exp((np.log(refs["hflip"]) + np.log(refs["vflip"])) / 2)),
                      ("one-pixel shift", refs["shift"])):
        res["refs"].append({"ref": name, **separation(raw / ref, cls, units)})
    res["seconds"] = round(time.time() - t_start, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "calibration.json"
    allres = json.loads(path.read_text()) if path.exists() else {}
    allres[a.tag] = res
    path.write_text(json.dumps(allres, indent=1))
    (a.out / "calibration.md").write_text(render(allres))
    print(render(allres))
    return 0


def _cell(s: dict) -> str:
    return f"{s['auroc']:.3f} ({s['auroc_ci'][0]:.3f}-{s['auroc_ci'][1]:.3f})"


def render(allres: dict) -> str:
    out = ["# Score-norm calibration on the trained demo model (benchmarks/bench_calibration.py)", "",
           ("AUROC (95 % bootstrap interval over independent units) of repeated / oversampled images against unique "
           "ones, low flags. score_norm_cal = |eps(psi x, t)| / geometric mean of the same at the mirrored images."), ""]
    for tag, r in allres.items():
        out += [f"## {tag}: {r['demo']} (model {r['model_steps']} steps, {r['images']} images)", "",
                "| t | raw norm: repeated | oversampled | score_norm_cal (hflip, vflip): repeated | oversampled |",
                "|---|---|---|---|---|"]
        out += [f"| {s['t']} | {_cell(s['raw']['repeated'])} | {_cell(s['raw']['oversampled'])} | "
                f"{_cell(s['cal']['repeated'])} | {_cell(s['cal']['oversampled'])} |" for s in r["sweep"]]
        out += ["", "Reference image at t = 0.1:", "", "| reference | repeated | oversampled |", "|---|---|---|"]
        out += [f"| {f['ref']} | {_cell(f['repeated'])} | {_cell(f['oversampled'])} |" for f in r["refs"]]
        out += ["", f"{r['seconds']} s.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
