"""Train the demo diffusion model: a small pixel-space diffusers UNet that memorizes the planted images.

The model is a 3-level `UNet2DModel` without attention (docs/method.md §9) with a `DDPMScheduler`
(1000 steps, linear betas), trained with the epsilon objective on the demo corpus read straight
from its tar shards. The sampler draws the planted `oversampled` keys `oversample_factor` times as
often as the others (OD-Mem); the `repeated` images memorize because the corpus holds many copies
(DD-Mem). The EMA weights are saved with `save_pretrained`, so the scanner loads the demo model
through the same `from_pretrained(local_dir)` path as any diffusers checkpoint.

Two checks say whether it memorized:
- `eps_norm_auroc`: ||eps_theta(psi x, t)|| at the clean image; memorized images have a low norm.
- `sample_check`: generate, find each generation's nearest training image, count planted matches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scanner.procfs import machine
from scanner.storage import write_json

log = logging.getLogger("memscan")

# Measured on the idle 2-core CPU (2026-11-23), 10 minutes of training on the default demo corpus:
# (32, 64, 64) ran 0.39 s/step, 1,535 steps, and memorized nothing (||eps|| AUROC ~0.5); (16, 32, 64)
# runs 0.21 s/step, 2,870 steps, AUROC 0.89 / 0.93 (repeated / oversampled) at t = 400. Exposure
# per planted image, not capacity, is what a 10-minute budget lacks.
DEFAULT_CHANNELS = (16, 32, 64)


@dataclass
class DemoImages:
    """Decoded training images of a demo corpus."""

    keys: list[str]
    images: np.ndarray  # (N, H, W, C) uint8 at the model resolution
    planted: list[str]  # per key, from truth.parquet ("unknown" without it)
    skipped: int  # samples whose image could not be decoded, or that a damaged shard cut off
    captions: list[str | None] = field(default_factory=list)  # per key, None without a .txt member


def load_images(corpus_dir: str | Path, resolution: int = 16, channels: int = 3) -> DemoImages:
    """Every decodable image of `corpus_dir/shards/*.tar`, sorted by key, decoded exactly as the scan decodes it.

    The scanner's own loader (scanner.data.load, i.e. decode_image) is used so the model is trained
    on the very pixels it is later scored on. Corrupt images and members cut off by a truncated shard
    are skipped and counted; the training set is what a real loader would have seen.
    """
    from scanner.data.load import load_images as load_corpus

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    corpus_dir = Path(corpus_dir)
    shards = sorted((corpus_dir / "shards").glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shards in {corpus_dir / 'shards'}; build one with build_demo_corpus()")
    stats: dict = {}
    keys, images, captions, _ = load_corpus([str(p) for p in shards], resolution, channels, stats=stats)
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)  # a key in two shards: train on it once
    keys = sorted(first)
    planted = ["unknown"] * len(keys)
    truth = corpus_dir / "truth.parquet"
    if truth.is_file():
        import pandas as pd

        by_key = pd.read_parquet(truth, columns=["key", "planted"]).set_index("key").planted
        planted = [str(by_key.get(k, "unknown")) for k in keys]
    return DemoImages(keys, images[[first[k] for k in keys]], planted, stats["skipped"],
                      [captions[first[k]] for k in keys])


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def sample_weights(planted: list[str], oversample_factor: float) -> torch.Tensor:
    """(N,) sampling weights: `oversample_factor` for planted oversampled images, 1 otherwise."""
    if not oversample_factor >= 1:
        raise ValueError(f"oversample_factor must be >= 1, got {oversample_factor!r}")
    return torch.tensor([oversample_factor if p == "oversampled" else 1.0 for p in planted], dtype=torch.float64)


def draw_batch(weights: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(batch_size,) indices drawn with replacement, P(i) proportional to weights[i]."""
    return torch.multinomial(weights, batch_size, replacement=True, generator=generator)


def make_unet(resolution: int = 16, channels: int = 3, block_out_channels: tuple[int, ...] = DEFAULT_CHANNELS,
              layers_per_block: int = 1, norm_num_groups: int = 8):
    """A UNet2DModel with one down/up level per entry of `block_out_channels` and no attention."""
    from diffusers import UNet2DModel

    levels = len(block_out_channels)
    if resolution % 2 ** (levels - 1):
        raise ValueError(f"resolution must be divisible by {2 ** (levels - 1)} for {levels} levels, got {resolution}")
    return UNet2DModel(sample_size=resolution, in_channels=channels, out_channels=channels,
                       layers_per_block=layers_per_block, block_out_channels=tuple(block_out_channels),
                       down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
                       norm_num_groups=norm_num_groups)


class _EMA:
    """Exponential moving average of parameters, with the usual warm-up (1 + n) / (10 + n)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.n = decay, 0
        self.params = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.params, [p.detach() for p in model.parameters()], 1 - d)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for e, p in zip(self.params, model.parameters()):
            p.copy_(e)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def noised(x0: torch.Tensor, alphas: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The epsilon objective's seeded input: (x_t = sqrt(a) x0 + sqrt(1 - a) eps at a uniform timestep t, t, eps)."""
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, len(alphas), (x0.shape[0],), generator=gen)
    a = alphas[t].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise


@dataclass
class Fit:
    """What `fit` ran: the loss of every step, wall and CPU seconds of the loop."""

    losses: list[float]
    train_s: float
    cpu_s: float  # CPU seconds per step does not depend on how many other jobs share the machine; wall time does

    def record(self, total_s: float) -> dict:
        """train_info.json's timing and loss-curve keys (total_s: the whole training function's seconds)."""
        n, losses = max(1, len(self.losses)), self.losses
        window = max(1, len(losses) // 20)
        return {"train_s": round(self.train_s, 1), "total_s": round(total_s, 1), "s_per_step": round(self.train_s / n, 4),
                "cpu_s_per_step": round(self.cpu_s / n, 4),
                "loss_first": float(np.mean(losses[:window])), "loss_last": float(np.mean(losses[-window:])),
                "loss_curve": [float(np.mean(losses[i:i + window])) for i in range(0, len(losses), window)],
                "loss_curve_window": window, "machine": machine()}


def progress_bar(progress: bool, total: int, desc: str):
    """A tqdm bar of `total` steps, or None without progress."""
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", mininterval=5)


def fit(module: torch.nn.Module, batch_loss, steps: int, lr: float, warmup_steps: int, ema_decay: float, *,
        desc: str, progress: bool, deadline: float | None = None, on_deadline=None) -> Fit:
    """Train module for `steps` steps of `batch_loss()` (the loss of one seeded batch: it draws its own noise):
    AdamW without weight decay (the demo wants memorization), a linear warm-up over warmup_steps, an EMA of the
    weights (copied into module at the end), a tqdm bar. deadline: a time.time() after which training stops early,
    first calling on_deadline(steps run)."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    ema = _EMA(module, ema_decay)
    losses: list[float] = []
    bar = progress_bar(progress, steps, desc)
    t_train, cpu_train = time.time(), time.process_time()
    module.train()
    for step in range(steps):
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update(module)
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if deadline is not None and time.time() > deadline and step + 1 < steps:
            if on_deadline is not None:
                on_deadline(step + 1)
            break
    if bar is not None:
        bar.close()
    done = Fit(losses, time.time() - t_train, time.process_time() - cpu_train)
    ema.copy_to(module)
    return done


# The demo model trains for a fixed number of seeded steps, so every machine trains the same model (a wall-clock
# budget would train a different one on a faster or slower CPU). 3,700 steps: what 10 minutes gave on the
# 2-core CPU (0.16 s a step), the model every shipped threshold was chosen on (demo seed 0).
DEMO_STEPS = 3700


def train_demo(corpus_dir: str | Path, out_dir: str | Path, resolution: int = 16, channels: int = 3,
               steps: int = DEMO_STEPS, batch_size: int = 64, lr: float = 1e-3, oversample_factor: float = 30,
               seed: int = 0, time_budget_s: float | None = None, progress: bool = True,
               block_out_channels: tuple[int, ...] = DEFAULT_CHANNELS, layers_per_block: int = 1,
               norm_num_groups: int = 8, ema_decay: float = 0.999, warmup_steps: int = 100,
               num_threads: int | None = None) -> Path:
    """Train on `corpus_dir` (shards/ + truth.parquet) and save to out_dir/{unet,scheduler,train_info.json}.

    Runs `steps` seeded optimizer steps; `time_budget_s` may stop it earlier, with a warning naming the steps
    run (train_info.json records `stopped_by`: "steps" or "time_budget").
    train_info.json is written last, so its presence means the model directory is complete.
    `num_threads` (None = leave torch's setting) applies during training only. On the idle 2-core CPU
    two threads take 0.34 s a step and one 0.48 s; when other jobs share the CPU, one thread is faster.
    Returns out_dir.
    """
    from diffusers import DDPMScheduler

    for name, v, lo in (("steps", steps, 1), ("batch_size", batch_size, 1), ("resolution", resolution, 4)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    with _torch_threads(num_threads):
        t_start = time.time()
        data = load_images(corpus_dir, resolution, channels)
        x_all = to_model_space(data.images)
        weights = sample_weights(data.planted, oversample_factor)
        oversampled = [k for k, p in zip(data.keys, data.planted) if p == "oversampled"]

        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        unet = make_unet(resolution, channels, block_out_channels, layers_per_block, norm_num_groups)
        scheduler = DDPMScheduler(num_train_timesteps=1000)
        alphas = scheduler.alphas_cumprod.float()

        def batch_loss():
            xt, t, noise = noised(x_all[draw_batch(weights, batch_size, gen)], alphas, gen)
            return torch.nn.functional.mse_loss(unet(xt, t).sample, noise)

        def warn(done: int) -> None:
            log.warning("train-demo: the time budget (%.0f s) stopped training after %d of %d steps: this model "
                        "differs from the %d-step model the shipped thresholds were chosen on", time_budget_s,
                        done, steps, steps)

        run = fit(unet, batch_loss, steps, lr, warmup_steps, ema_decay, desc="train-demo", progress=progress,
                  deadline=None if time_budget_s is None else t_start + time_budget_s, on_deadline=warn)
        info = {
            "steps": len(run.losses), "steps_requested": steps,
            "stopped_by": "steps" if len(run.losses) == steps else "time_budget", **run.record(time.time() - t_start),
            "resolution": resolution, "channels": channels, "batch_size": batch_size, "lr": lr,
            "block_out_channels": list(block_out_channels), "layers_per_block": layers_per_block,
            "ema_decay": ema_decay, "oversample_factor": oversample_factor, "seed": seed,
            "n_images": len(data.keys), "n_skipped": data.skipped, "oversampled_keys": oversampled,
            "n_params": sum(p.numel() for p in unet.parameters()), "torch_threads": torch.get_num_threads(),
            "corpus_dir": str(Path(corpus_dir).resolve()),
        }
    return _save(Path(out_dir), unet, scheduler, info)


def _save(out_dir: Path, unet, scheduler, info: dict) -> Path:
    """save_pretrained unet/ and scheduler/ via tmp + rename, then train_info.json as the completion marker."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_info.json").unlink(missing_ok=True)  # incomplete until rewritten below
    for name, obj in (("unet", unet), ("scheduler", scheduler)):
        tmp = out_dir / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        obj.save_pretrained(tmp, **({"safe_serialization": True} if name == "unet" else {}))
        shutil.rmtree(out_dir / name, ignore_errors=True)
        os.replace(tmp, out_dir / name)
    write_json(info, out_dir / "train_info.json")
    return out_dir


# ------------------------------------------------------------------------------------------------
# memorization checks


def load_demo_model(model_dir: str | Path):
    """(UNet2DModel in eval mode, DDPMScheduler) from a train_demo output directory."""
    from diffusers import DDPMScheduler, UNet2DModel

    model_dir = Path(model_dir)
    # low_cpu_mem_usage=False: the default asks for `accelerate` and warns without it; the model is small.
    unet = UNet2DModel.from_pretrained(model_dir / "unet", low_cpu_mem_usage=False).eval()
    return unet, DDPMScheduler.from_pretrained(model_dir / "scheduler")


@torch.no_grad()
def eps_norms(unet, scheduler, x: torch.Tensor, t: int = 100, batch_size: int = 256) -> np.ndarray:
    """||eps_theta(psi_t x, t)|| per image at the clean, un-noised point. x: (N, C, H, W) in [-1, 1] -> (N,)."""
    psi = float(scheduler.alphas_cumprod[t].sqrt())
    out = []
    for i in range(0, len(x), batch_size):
        xb = psi * x[i:i + batch_size]
        eps = unet(xb, torch.full((len(xb),), t, dtype=torch.long)).sample
        out.append(eps.flatten(1).norm(dim=1))
    return torch.cat(out).numpy()


def eps_norm_auroc(model_dir: str | Path, corpus_dir: str | Path, t: int = 100) -> dict:
    """AUROC of a low ||eps|| at t (of 1000) for planted repeated vs unique and oversampled vs unique.

    One row per decodable corpus sample (every copy of a repeated image counts).
    """
    from sklearn.metrics import roc_auc_score

    unet, scheduler = load_demo_model(model_dir)
    res, ch = unet.config.sample_size, unet.config.in_channels
    data = load_images(corpus_dir, res, ch)
    norms = eps_norms(unet, scheduler, to_model_space(data.images), t)
    planted = np.array(data.planted)
    out = {"t": t, "n": len(norms)}
    for cls in ("repeated", "oversampled"):
        pos, neg = norms[planted == cls], norms[planted == "unique"]
        if len(pos) and len(neg):
            y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
            out[f"auroc_{cls}"] = float(roc_auc_score(y, -np.r_[pos, neg]))  # low norm = memorized
            out[f"median_norm_{cls}"] = float(np.median(pos))
    out["median_norm_unique"] = float(np.median(norms[planted == "unique"]))
    return out


@torch.no_grad()
def sample_check(model_dir: str | Path, corpus_dir: str | Path, n: int = 256, seed: int = 0,
                 num_inference_steps: int = 50, match_rmse: float = 0.05, batch_size: int = 128) -> dict:
    """Generate n images (DDIM, `num_inference_steps`) and match each to its nearest training image.

    Distance: RMSE in [0, 1] pixel units at the model resolution. A generation "copies" a training
    image when that RMSE is below `match_rmse`. Reports, per planted class, the fraction of
    generations whose nearest neighbour is of that class (and copied) next to the class's share of
    the corpus and of the training draws (oversampling included).
    """
    from diffusers import DDIMScheduler

    unet, ddpm = load_demo_model(model_dir)
    info = json.loads((Path(model_dir) / "train_info.json").read_text())
    res, ch = unet.config.sample_size, unet.config.in_channels
    data = load_images(corpus_dir, res, ch)
    ddim = DDIMScheduler.from_config(ddpm.config)
    ddim.set_timesteps(num_inference_steps)
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(0, n, batch_size):
        x = torch.randn((min(batch_size, n - i), ch, res, res), generator=gen)
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x).prev_sample
        samples.append(x.clamp(-1, 1))
    gen_flat = ((torch.cat(samples) + 1) / 2).flatten(1).double()
    train_flat = torch.from_numpy(data.images).permute(0, 3, 1, 2).flatten(1).double() / 255
    d2 = torch.cdist(gen_flat, train_flat).pow(2) / gen_flat.shape[1]
    rmse, nn = d2.min(dim=1)
    rmse = rmse.sqrt().numpy()
    planted = np.array(data.planted)
    nn_class = planted[nn.numpy()]
    copied = rmse < match_rmse
    w = sample_weights(data.planted, info.get("oversample_factor", 1)).numpy()
    out = {"n": n, "match_rmse": match_rmse, "num_inference_steps": num_inference_steps,
           "copied": float(copied.mean()), "median_nn_rmse": float(np.median(rmse))}
    for cls in ("repeated", "oversampled", "unique"):
        out[cls] = {
            "nearest": float((nn_class == cls).mean()),
            "copied": float(((nn_class == cls) & copied).mean()),
            "share_of_corpus": float((planted == cls).mean()),
            "share_of_draws": float(w[planted == cls].sum() / w.sum()),
            "distinct_images_copied": len(set(nn.numpy()[(nn_class == cls) & copied])),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    """python -m scanner.demo.train CORPUS OUT [--steps N] [--budget S] [--check]"""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--budget", type=float, default=None, help="seconds")
    ap.add_argument("--layers-per-block", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--check", action="store_true", help="only run eps_norm_auroc and sample_check")
    a = ap.parse_args(argv)
    if not a.check:
        train_demo(a.corpus, a.out, steps=a.steps, time_budget_s=a.budget, layers_per_block=a.layers_per_block,
                   num_threads=a.threads)
    if a.threads:
        torch.set_num_threads(a.threads)
    for t in (20, 100, 200):
        print(json.dumps(eps_norm_auroc(a.out, a.corpus, t=t)))
    print(json.dumps(sample_check(a.out, a.corpus), indent=1))


if __name__ == "__main__":
    main()
