"""How loss_cal's time and noise count were chosen: a grid on the tuning seed's model, nothing else.

    python benchmarks/bench_loss_cal.py --demo runs/demo     # writes results/loss_cal.{md,json}

`--demo` is a finished `memscan demo` directory (seed 0: where every default was chosen). The sample (seeded):
every oversampled image, 3 copies of every repeated group, 400 unique images, and the run's held-out images
(the demo corpus builder's heldout/ shard for the run's seed, built again and checked against the run's
training shards). Per detector variant: the cut at 1 % of the held-out images (classify.calibration_fpr) and
the share of each planted kind at or below it, and the AUROC of repeated against unique images (low flags).
Variants: score_norm_cal (the clean-point norm ratio) and loss_cal (the noised-point loss ratio) at
t = 0.05 / 0.1 / 0.2; loss_cal at t = 0.05 with 1-16 noises; the reference's noise mirrored (shipped) or not.
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
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench_cut import heldout_for
from bench_lid_theta import pick
from results_file import write_results
from sklearn.metrics import roc_auc_score

from scanner.config import ModelConfig
from scanner.demo.train import load_images, to_model_space
from scanner.geometry.mirror import denoising_loss, loss_noise, mirror, mirror_calibrated_loss, mirror_calibrated_norm
from scanner.geometry.trace import row_seeds, time_vector
from scanner.models.loading import load_score_model

REFS = ["hflip", "vflip"]
KINDS = ("repeated", "oversampled", "unique")


def sample(demo: Path, res: int, seed: int = 0) -> tuple[list[str], torch.Tensor, np.ndarray]:
    """The sampled corpus images (bench_lid_theta's pick: every oversampled image, 3 copies per repeated group,
    400 unique): their keys, model-space images and planted kinds."""
    mem = load_images(demo / "corpus", res, 3)
    truth = pd.read_parquet(demo / "corpus" / "truth.parquet").set_index("key")
    rows, kind, _ = pick(mem.keys, truth, unique=400, copies=3, seed=seed)
    return [mem.keys[i] for i in rows], to_model_space(mem.images[rows]), kind


def batched(fn, x: torch.Tensor, seeds: torch.Tensor, bs: int = 256) -> np.ndarray:
    return torch.cat([fn(x[i:i + bs], seeds[i:i + bs]) for i in range(0, len(x), bs)]).numpy()


def same_noise_loss(model, x: torch.Tensor, t: float, seeds: torch.Tensor, noises: int) -> torch.Tensor:
    """The probe's first pairing: each mirror noised by the unmirrored noise."""
    tv = time_vector(t, x)
    z = loss_noise(tuple(x.shape), noises, seeds)
    ref = torch.stack([denoising_loss(model, mirror(x, r), tv, z).log() for r in REFS]).mean(0).exp()
    return denoising_loss(model, x, tv, z) / ref


def metrics(values: np.ndarray, kind: np.ndarray) -> dict:
    held = kind == "heldout"
    cut = float(np.quantile(values[held], 0.01))
    rep_u = np.isin(kind, ["repeated", "unique"])
    return {"cut": cut, **{k: float((values[kind == k] <= cut).mean()) for k in KINDS},
            "auroc_repeated": float(roc_auc_score(kind[rep_u] == "repeated", -values[rep_u]))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    t_start = time.time()
    info = json.loads((a.demo / "model" / "train_info.json").read_text())
    res = info.get("resolution", 16)
    keys, x, kind = sample(a.demo, res)
    with tempfile.TemporaryDirectory() as tmp:
        held = heldout_for(a.demo, Path(tmp) / "corpus")
        hk, hx = load_images_from(held, res)
    keys, x = keys + hk, torch.cat([x, hx])
    kind = np.concatenate([kind, np.array(["heldout"] * len(hk))])
    seeds = row_seeds(keys, 0) + 3  # the scan's per-row noise seeds for loss_cal
    model = load_score_model(ModelConfig(kind="pixel", path=str(a.demo / "model"), device="cpu"))
    rows = []
    with torch.no_grad():
        for t in (0.05, 0.1, 0.2):
            v = batched(lambda xb, sb, t=t: mirror_calibrated_norm(model, xb, t, REFS), x, seeds)
            rows.append({"variant": "score_norm_cal", "t": t, "noises": None, "pairing": None, **metrics(v, kind)})
            v = batched(lambda xb, sb, t=t: mirror_calibrated_loss(model, xb, t, REFS, noises=8, seed=sb), x, seeds)
            rows.append({"variant": "loss_cal", "t": t, "noises": 8, "pairing": "mirrored", **metrics(v, kind)})
        for k in (1, 2, 4, 16):
            v = batched(lambda xb, sb, k=k: mirror_calibrated_loss(model, xb, 0.05, REFS, noises=k, seed=sb), x, seeds)
            rows.append({"variant": "loss_cal", "t": 0.05, "noises": k, "pairing": "mirrored", **metrics(v, kind)})
        v = batched(lambda xb, sb: same_noise_loss(model, xb, 0.05, sb, 8), x, seeds)
        rows.append({"variant": "loss_cal", "t": 0.05, "noises": 8, "pairing": "same", **metrics(v, kind)})
    n = {k: int((kind == k).sum()) for k in (*KINDS, "heldout")}
    out = ["# loss_cal: its time, noise count and pairing on the tuning seed (benchmarks/bench_loss_cal.py)", "",
           (f"{a.demo} (seed {json.loads((a.demo / 'corpus' / 'demo_corpus.json').read_text())['params']['seed']}, "
            f"model {info['steps']} steps). Sample: {n}. Cut: the 1 % quantile of the held-out images; shares at "
            "or below it; AUROC repeated vs unique over the sampled images (copies, not groups: a grid for choosing, "
            "not an evaluation; results/detection.md has the intervals). Shipped: loss_cal, t = 0.05, 8 noises, "
            "mirrored pairing."), "",
           "| variant | t | noises | pairing | cut | repeated | oversampled | unique | AUROC repeated |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['variant']} | {r['t']} | {r['noises'] or '–'} | {r['pairing'] or '–'} | {r['cut']:.3f} | "
                   f"{r['repeated']:.3f} | {r['oversampled']:.3f} | {r['unique']:.4f} | {r['auroc_repeated']:.3f} |")
    out += ["", f"{time.time() - t_start:.0f} s on {torch.get_num_threads()} threads."]
    write_results(a.out, "loss_cal", {"demo": str(a.demo), "sample": n, "rows": rows}, "\n".join(out) + "\n")
    return 0


def load_images_from(held_dir: Path, res: int) -> tuple[list[str], torch.Tensor]:
    """The held-out shard's images, decoded as the scan decodes them."""
    from scanner.data.load import load_images as load_corpus

    keys, images, _, _ = load_corpus([str(p) for p in sorted(held_dir.glob("*.tar"))], res, 3, stats={})
    return list(keys), to_model_space(images)


if __name__ == "__main__":
    raise SystemExit(main())
