"""Cost and accuracy of the geometry columns on diffusers UNets, in forward-equivalents, in one run.

    python benchmarks/bench_geometry.py                      # writes results/geometry.{md,json}
    python benchmarks/bench_geometry.py --threads 2 --repeats 5 --out /tmp/x
    python benchmarks/bench_geometry.py --trained DEMO_DIR/model --images DEMO_DIR/corpus/shards/00000.tar

Models, built in code with random weights (ratios need no training): the demo UNet2DModel (16 x 16 x 3,
block_out_channels (32, 64, 64), layers_per_block 1, DownBlock2D x 3 / UpBlock2D x 3, diffusers'
default mid-block attention) and a 4x wider one (128, 256, 256), wrapped in PixelScoreModel (or a
local wrapper if scanner.models.pixel is absent) with DDPM's linear schedule. Batch 8, t = 0.1.

Per model: the median of `--repeats` timings after one warm-up of
- one forward eps(x, t);
- compute_scores with 1 probe (lid_flipd, score_norm, p_laplace_1/2/3) for each derivative mode:
  autograd (forward-mode JVP), fd central, fd forward-difference, vjp (reverse mode);
- the flux p-Laplace (128 directions) against the JVP p-Laplace (autograd, 1 probe);
- NB (K = D + 16 score calls per image) against FLIPD (autograd, 1 probe): demo model only, as NB on the
  wide model would take minutes; its cost there is extrapolated from the measured forward.
Accuracy, demo model, 2 images: the Hutchinson trace of each mode against the exact trace (768 forward-mode
JVPs), as RMS relative error over probe groups of 1, 8 and 64 probes, and the FLIPD error it causes
(sigma * trace error, in dimensions); with --trained, the same on a trained pixel model and real images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from scanner.config import GeometryConfig
from scanner.geometry import compute_scores, flipd, nb_lid, p_laplace, p_laplace_flux
from scanner.geometry.trace import Linearization, time_vector

MODES = [("autograd", "central"), ("fd", "central"), ("fd", "forward"), ("vjp", "central")]


def build_model(widths: tuple[int, ...]):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=widths, layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3)
    try:
        from scanner.models.pixel import PixelScoreModel
    except ImportError:
        return LocalPixelModel(unet, DDPMScheduler(num_train_timesteps=1000))
    return PixelScoreModel(unet, DDPMScheduler(num_train_timesteps=1000))


class LocalPixelModel:
    """Fallback ScoreModel: eps = unet(x, round(t * 1000)); psi / sigma from alphas_cumprod at that step."""

    conditional = False

    def __init__(self, unet, scheduler):
        from scanner.models.base import ScoreModel

        self.unet = unet.eval().requires_grad_(False)
        self.ac = scheduler.alphas_cumprod.to(torch.float64)
        self.sample_shape = (3, 16, 16)
        self.dim = 768
        self.jvp_context = ScoreModel.jvp_context.__get__(self)

    def _steps(self, t, n):
        return torch.round(t.to(torch.float64) * 1000).long().clamp(0, 999).reshape(-1).expand(n)

    def psi_sigma(self, t):
        ab = self.ac[self._steps(t, t.numel())]
        return ab.sqrt().float(), (1 - ab).sqrt().float()

    def eps(self, x, t, cond=None):
        return self.unet(x, self._steps(t, x.shape[0])).sample


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_costs(model, x: torch.Tensor, repeats: int, with_nb: bool) -> dict:
    # cal_refs=[]: the JVP columns of issue #4; score_norm_cal adds one plain forward per mirror on top
    cfg = GeometryConfig(t0=0.1, t_laplace=0.1, probes=1, p_values=[1.0, 2.0, 3.0], cal_refs=[])
    t = time_vector(0.1, x)
    psi, _ = model.psi_sigma(t)
    xt = psi.view(-1, 1, 1, 1) * x
    res: dict = {}
    with torch.no_grad():
        fwd = timed(lambda: model.eps(x, t), repeats)
    res["forward_s"] = fwd
    for jvp, scheme in MODES:
        name = jvp if jvp != "fd" else f"fd_{scheme}"
        s = timed(lambda jvp=jvp, scheme=scheme: compute_scores(model, x, cfg, jvp=jvp, fd_scheme=scheme), repeats)
        res[f"all_columns_{name}_s"], res[f"all_columns_{name}_fwd_eq"] = s, s / fwd
    pl_jvp = timed(lambda: p_laplace(model, xt, 0.1, cfg.p_values, trace="hutchinson", probes=1), repeats)
    pl_flux = timed(lambda: p_laplace_flux(model, xt, 0.1, cfg.p_values, radius=0.01, directions=128,
                                           chunk=2 * x.shape[0]), 1)
    res.update(p_laplace_jvp_s=pl_jvp, p_laplace_flux_s=pl_flux, flux_over_jvp=pl_flux / pl_jvp,
               p_laplace_jvp_fwd_eq=pl_jvp / fwd, p_laplace_flux_fwd_eq=pl_flux / fwd)
    fl = timed(lambda: flipd(model, x, 0.1, probes=1), repeats)
    res.update(flipd_autograd_s=fl, flipd_autograd_fwd_eq=fl / fwd)
    k = model.dim + 16
    if with_nb:
        t0 = time.perf_counter()  # one run: K = D + 16 forwards per image is already many repeats
        nb_lid(model, x, 0.01, chunk=8 * x.shape[0])
        nb = time.perf_counter() - t0
        res.update(nb_s=nb, nb_measured=True)
    else:
        res.update(nb_s=k * fwd, nb_measured=False)  # K plain forwards of the batch, extrapolated
    res.update(nb_samples=k, nb_over_flipd=res["nb_s"] / fl, nb_fwd_eq=res["nb_s"] / fwd)
    return res


def bench_accuracy(model, x: torch.Tensor, probes: int = 64) -> dict:
    """RMS relative error of P-probe Hutchinson traces (P = 1, 8, 64) against the exact trace, per mode."""
    t = time_vector(0.1, x)
    psi, sigma = model.psi_sigma(t)
    xt = psi.view(-1, 1, 1, 1) * x
    out: dict = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        exact_lin = Linearization(model, xt, t, jvp="autograd", chunk=64 * x.shape[0])
        exact = exact_lin.trace("exact")[0]
        out["exact_trace"] = exact.tolist()
        out["exact_s"] = time.perf_counter() - t0
        out["flipd_exact"] = (model.dim - sigma * exact + exact_lin.eps.flatten(1).pow(2).sum(1)).tolist()
        g = torch.Generator().manual_seed(0)
        probes_v = torch.randint(0, 2, (probes, *x.shape), generator=g).to(x.dtype) * 2 - 1  # Rademacher
        for jvp, scheme in MODES:
            name = jvp if jvp != "fd" else f"fd_{scheme}"
            lin = Linearization(model, xt, t, jvp=jvp, scheme=scheme, chunk=16 * x.shape[0])
            q = lin.quads(probes_v)  # (probes, B)
            entry = {}
            if jvp != "autograd":  # derivative error alone: the same probes through both modes
                ref = exact_lin.quads(probes_v)
                entry["quad_rel_err_vs_autograd"] = ((q - ref).abs().max() / ref.abs().max()).item()
            for p in (1, 8, 64):
                est = q.view(probes // p, p, -1).mean(1)  # (groups, B)
                rel = ((est - exact) / exact.abs()).pow(2).mean().sqrt().item()
                flipd_err = (sigma * (est - exact)).pow(2).mean().sqrt().item()
                entry[f"trace_rms_rel_err_{p}_probes"] = rel
                entry[f"flipd_rms_err_{p}_probes"] = flipd_err
            out[name] = entry
    return out


def bench_trained_diagnostics(model, x: torch.Tensor) -> dict:
    """Why FD and FLIPD behave as they do on a trained UNet: the FD derivative error against fd_eps, and
    sigma * tr(d eps/dx) at the clean psi x (where FLIPD evaluates) against a noised psi x + sigma eps."""
    t = time_vector(0.1, x)
    psi, sigma = model.psi_sigma(t)
    xt = psi.view(-1, 1, 1, 1) * x
    g = torch.Generator().manual_seed(1)
    v = torch.randint(0, 2, (8, *x.shape), generator=g).to(x.dtype) * 2 - 1
    out: dict = {"fd_rel_err": {}}
    with torch.no_grad():
        ref = Linearization(model, xt, t, jvp="vjp").quads(v)
        for h in (1e-2, 1e-3, 1e-4, 1e-5):
            for scheme in ("central", "forward"):
                q = Linearization(model, xt, t, jvp="fd", fd_eps=h, scheme=scheme).quads(v)
                out["fd_rel_err"][f"{scheme}_{h:g}"] = ((q - ref).abs().max() / ref.abs().max()).item()
        noised = xt + sigma.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)
        out["sigma_trace_clean"] = (sigma * ref.mean(0)).tolist()
        out["sigma_trace_noised"] = (sigma * Linearization(model, noised, t, jvp="vjp").quads(v).mean(0)).tolist()
    return out


def write_results(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "geometry.json"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(js)
    md = out_dir / "geometry.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(render_md(results))
    tmp.replace(md)


def render_md(r: dict) -> str:
    env = r["environment"]
    lines = [
        "# Geometry cost and accuracy (benchmarks/bench_geometry.py)",
        "",
        (f"{env['date']}, torch {env['torch']}, diffusers {env['diffusers']}, {env['threads']} torch thread(s) on "
        f"{env['cpus']} CPU(s) ({env['device']}), load average at start {env['load_avg']}; batch {r['batch']}, "
        f"t = 0.1, median of {r['repeats']} after a warm-up. Random-weight UNets (ratios need no training)."),
        "",
        "## Cost in forward-equivalents (time / one forward of the batch)",
        "",
        ("| model | params | forward (ms) | all columns, autograd JVP | fd central | fd forward | vjp | "
        "flux / JVP p-Laplace | NB / FLIPD |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in r["models"].items():
        c = m["cost"]
        nb = f"{c['nb_over_flipd']:.0f}" + ("" if c["nb_measured"] else " (extrapolated)")
        lines.append(
            f"| {name} {tuple(m['widths'])} | {m['params'] / 1e6:.2f} M | {1e3 * c['forward_s']:.1f} | "
            f"{c['all_columns_autograd_fwd_eq']:.2f} | {c['all_columns_fd_central_fwd_eq']:.2f} | "
            f"{c['all_columns_fd_forward_fwd_eq']:.2f} | {c['all_columns_vjp_fwd_eq']:.2f} | "
            f"{c['flux_over_jvp']:.1f} ({c['p_laplace_flux_fwd_eq']:.0f} vs {c['p_laplace_jvp_fwd_eq']:.1f} fwd) | "
            f"{nb} |")
    best = {name: min((m["cost"][f"all_columns_{k}_fwd_eq"], k) for k in ("autograd", "fd_central",
                                                                          "fd_forward", "vjp"))
            for name, m in r["models"].items()}
    lines += ["", "All columns = lid_flipd, score_norm, p_laplace_1/2/3 with 1 Hutchinson probe (t0 = t_laplace, "
              "so one forward, the probe and the e_hat direction serve them all). Cheapest mode per model: "
              + ", ".join(f"{n}: {k} {v:.2f}" for n, (v, k) in best.items())
              + f". Target: <= 3 forward-equivalents. {r['verdict']}", ""]
    for key, title in (("accuracy", "random-weight demo model, uniform-noise inputs"),
                       ("accuracy_trained", "trained demo model, corpus images")):
        if key in r:
            lines += accuracy_md(r[key], title)
    if "trained_diagnostics" in r:
        d = r["trained_diagnostics"]
        lines += ["## Trained model diagnostics (t = 0.1, 8 Rademacher probes, vjp as reference)", "",
                  "| fd_eps | " + " | ".join(f"{h:g}" for h in (1e-2, 1e-3, 1e-4, 1e-5)) + " |",
                  "|---|---|---|---|---|"]
        for scheme in ("central", "forward"):
            lines.append(f"| FD {scheme} rel. error | "
                         + " | ".join(f"{d['fd_rel_err'][f'{scheme}_{h:g}']:.1e}" for h in (1e-2, 1e-3, 1e-4, 1e-5))
                         + " |")
        lines += ["", ("sigma * tr(d eps/dx), per image (D = 768; an ideal denoiser near a d-dim manifold gives "
                       "~D - d): "
                  f"at the clean psi x where FLIPD evaluates {', '.join(f'{v:.0f}' for v in d['sigma_trace_clean'])}; "
                  f"at a noised psi x + sigma eps {', '.join(f'{v:.0f}' for v in d['sigma_trace_noised'])}."), ""]
    return "\n".join(lines)


def accuracy_md(acc: dict, title: str) -> list[str]:
    lines = [
        (f"## Accuracy against the exact trace ({title}; {acc['images']} images, exact = 768 JVPs, "
        f"{acc['exact_s']:.0f} s)"),
        "",
        (f"Exact tr(d eps/dx): {', '.join(f'{v:.1f}' for v in acc['exact_trace'])}; FLIPD there "
         f"{', '.join(f'{v:.1f}' for v in acc['flipd_exact'])}."),
        "",
        ("| mode | derivative error vs autograd (same probes) | trace RMS rel. error, 1 / 8 / 64 probes | "
         "FLIPD RMS error (dims), 1 / 8 / 64 probes |"),
        "|---|---|---|---|",
    ]
    for k in ("autograd", "fd_central", "fd_forward", "vjp"):
        e = acc[k]
        d = e.get("quad_rel_err_vs_autograd")
        lines.append(f"| {k} | {'reference' if d is None else f'{d:.1e}'} | "
                     + " / ".join(f"{e[f'trace_rms_rel_err_{p}_probes']:.3f}" for p in (1, 8, 64)) + " | "
                     + " / ".join(f"{e[f'flipd_rms_err_{p}_probes']:.1f}" for p in (1, 8, 64)) + " |")
    lines += ["", ("Derivative error: max |q - q_autograd| / max |q_autograd| over the 64 probes' quadratic forms. "
                   "All modes see the same probes, so the probe count, not the mode, sets the trace error."), ""]
    return lines


def load_images(tar_path: Path, n: int, size: int = 16) -> torch.Tensor:
    """The first n images of a webdataset tar, RGB, resized to size x size: (n, size, size, 3) uint8."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    out = []
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if m.name.lower().endswith((".jpg", ".jpeg", ".png", ".webp")):
                img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB").resize((size, size),
                                                                                           Image.BICUBIC)
                out.append(torch.from_numpy(np.asarray(img).copy()))
                if len(out) == n:
                    break
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine OpenMP threads spin against other "
                         "processes and make timings erratic; 1 thread gives stable ratios)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--trained", type=Path, default=None,
                    help="optional trained pixel model dir (unet/ + scheduler/): adds an accuracy table on it")
    ap.add_argument("--images", type=Path, default=None, help="webdataset tar whose first images --trained scores")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers

    start = time.perf_counter()
    results: dict = {
        "environment": {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                        "diffusers": diffusers.__version__, "threads": args.threads, "cpus": os.cpu_count(),
                        "device": platform.processor() or platform.machine(),
                        "load_avg": [round(v, 2) for v in os.getloadavg()]},
        "batch": args.batch, "repeats": args.repeats, "models": {},
    }
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, 16, 16, generator=g) * 2 - 1
    for name, widths, with_nb in (("demo", (32, 64, 64), True), ("wide", (128, 256, 256), False)):
        model = build_model(widths)
        params = sum(p.numel() for p in model.unet.parameters())
        print(f"[{time.perf_counter() - start:.0f}s] {name}: {params / 1e6:.2f} M parameters", flush=True)
        results["models"][name] = {"widths": list(widths), "params": params,
                                   "cost": bench_costs(model, x, args.repeats, with_nb)}
        print(json.dumps(results["models"][name]["cost"], indent=1), flush=True)
        if name == "demo":
            print(f"[{time.perf_counter() - start:.0f}s] accuracy", flush=True)
            results["accuracy"] = {"images": 2, **bench_accuracy(model, x[:2])}
    if args.trained is not None:
        from scanner.models.pixel import PixelScoreModel

        print(f"[{time.perf_counter() - start:.0f}s] accuracy on {args.trained}", flush=True)
        trained = PixelScoreModel.from_pretrained(args.trained)
        xt = trained.encode_images(load_images(args.images, 2, trained.resolution))
        results["accuracy_trained"] = {"images": 2, "model_dir": str(args.trained), "images_from": str(args.images),
                                       **bench_accuracy(trained, xt)}
        results["trained_diagnostics"] = bench_trained_diagnostics(trained, xt)
    best = {n: min(m["cost"][f"all_columns_{k}_fwd_eq"] for k in ("autograd", "fd_central", "fd_forward", "vjp"))
            for n, m in results["models"].items()}
    results["verdict"] = " ".join(f"{n}: {'met' if v <= 3.0 else 'missed'} ({v:.2f})." for n, v in best.items())
    results["total_s"] = time.perf_counter() - start
    write_results(results, args.out)
    print(f"[{results['total_s']:.0f}s] wrote {args.out / 'geometry.md'}")


if __name__ == "__main__":
    main()
