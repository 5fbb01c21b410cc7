"""Replications (Somepalli et al. 2023): generate with the scanned model, find the nearest training image.

    images, meta = generate_samples(model_dir, n=64, seed=0, steps=50, captions=train_captions)
    reps = find_replications(embedder.embed(images), meta, index, train_keys, threshold=cfg.rep_threshold)

The diffusers pipeline is loaded from the local model directory, the same one the scores use:
- pixel layout (`model_dir/unet` = UNet2DModel, `model_dir/scheduler`) or a saved DDPMPipeline /
  DDIMPipeline: unconditional samples with a DDIM sampler (deterministic for a seed, eta = 0);
- Stable Diffusion layout (`model_index.json` naming StableDiffusionPipeline, or unet + vae +
  text_encoder + tokenizer): one image per training caption.
Generation i uses torch.Generator seeded with seed + i, so each row can be regenerated alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


def _is_sd(model_dir: Path) -> bool:
    index = model_dir / "model_index.json"
    if index.is_file():
        return "StableDiffusion" in json.loads(index.read_text()).get("_class_name", "")
    return all((model_dir / d).is_dir() for d in ("unet", "vae", "text_encoder", "tokenizer"))


def load_pipeline(model_dir: str | Path, device: str = "cpu", allow_pickle: bool = False):
    """The diffusers pipeline stored in model_dir (see module docstring); raises naming the layouts accepted.

    Weights load from safetensors only unless allow_pickle (a .bin pickle can run code when loaded).
    """
    import diffusers

    safe = {"use_safetensors": True} if not allow_pickle else {}
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {str(d)!r} does not exist")
    if _is_sd(d):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(d, safety_checker=None, requires_safety_checker=False,
                                                              **safe)
    elif (d / "unet").is_dir() and (d / "scheduler").is_dir():
        unet = diffusers.UNet2DModel.from_pretrained(d / "unet", low_cpu_mem_usage=False, **safe)
        sched_cfg = diffusers.DDPMScheduler.load_config(d / "scheduler")
        pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler.from_config(sched_cfg))
    elif (d / "model_index.json").is_file():
        pipe = diffusers.DiffusionPipeline.from_pretrained(d, **safe)
        if isinstance(pipe, diffusers.DDPMPipeline):
            pipe = diffusers.DDIMPipeline(unet=pipe.unet, scheduler=diffusers.DDIMScheduler.from_config(
                pipe.scheduler.config))
    else:
        raise ValueError(f"{str(d)!r} is not a diffusers model directory: expected unet/ + scheduler/ (pixel "
                         "UNet2DModel), a saved pipeline with model_index.json, or a Stable Diffusion layout "
                         "(unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _to_uint8_rgb(images: np.ndarray) -> np.ndarray:
    """(B, H, W, C) float in [0, 1] -> (B, H, W, 3) uint8."""
    x = (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def generate_samples(model_dir: str | Path, n: int, seed: int = 0, steps: int = 50,
                     captions: list[str | None] | None = None, batch_size: int = 16, guidance_scale: float = 7.5,
                     device: str = "auto", allow_pickle: bool = False) -> tuple[np.ndarray, list[dict]]:
    """n generations -> (images (n, H, W, 3) uint8, meta: n dicts of gen_id, caption, seed).

    captions: prompts for a text-conditional model (the i-th generation uses captions[i % len]; None or NaN, a
    sample without a caption, is the empty prompt);
    ignored (caption None) for an unconditional pixel model. steps: sampler steps.
    """
    import torch

    from scanner.neighbours.embed import pick_device

    if n < 0 or steps < 1:
        raise ValueError(f"n must be >= 0 and steps >= 1, got n={n}, steps={steps}")
    dev = pick_device(device)
    pipe = load_pipeline(model_dir, dev, allow_pickle=allow_pickle)
    text = hasattr(pipe, "text_encoder")
    if text and not captions:
        raise ValueError(f"{model_dir} is text-conditional: pass training captions to generate from")
    images, meta = [], []
    for start in range(0, n, batch_size):
        ids = list(range(start, min(n, start + batch_size)))
        gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in ids]
        with torch.inference_mode():
            if text:
                prompts = [c if isinstance(c, str) else "" for c in (captions[i % len(captions)] for i in ids)]
                out = pipe(prompt=prompts, num_inference_steps=steps, generator=gens, guidance_scale=guidance_scale,
                           output_type="np")
            else:
                prompts = [None] * len(ids)
                out = pipe(batch_size=len(ids), num_inference_steps=steps, generator=gens, eta=0.0,
                           output_type="np")
        images.append(_to_uint8_rgb(np.asarray(out.images)))
        meta += [{"gen_id": i, "caption": p, "seed": seed + i} for i, p in zip(ids, prompts)]
    if not images:
        return np.zeros((0, 1, 1, 3), dtype=np.uint8), []
    return np.concatenate(images), meta


def find_replications(generated_vectors: np.ndarray, gen_meta: list[dict], index, train_keys: list[str],
                      threshold: float, keep_all: bool = False) -> pd.DataFrame:
    """Match each generation to its nearest training image.

    generated_vectors: (G, d) unit rows, embedded like the training images; index: anything with faiss's
    search(queries, k) -> (sims, ids) over the training vectors, row j = train_keys[j] (the scan's StreamedIndex).
    Returns gen_id, caption, seed, matched_key, similarity (cosine) and replicated (similarity >= threshold); only
    replicated rows unless keep_all.
    """
    cols = ["gen_id", "caption", "seed", "matched_key", "similarity", "replicated"]
    if len(generated_vectors) != len(gen_meta):
        raise ValueError(f"{len(generated_vectors)} vectors but {len(gen_meta)} generation records")
    if len(generated_vectors) == 0:
        return pd.DataFrame(columns=cols)
    sims, ids = index.search(np.ascontiguousarray(generated_vectors, dtype=np.float32), 1)
    df = pd.DataFrame({
        "gen_id": [m["gen_id"] for m in gen_meta],
        "caption": [m.get("caption") for m in gen_meta],
        "seed": [m["seed"] for m in gen_meta],
        "matched_key": [train_keys[j] if j >= 0 else None for j in ids[:, 0]],
        "similarity": sims[:, 0].astype(np.float32),
    })
    df["replicated"] = df["similarity"] >= threshold
    df = df.astype({"gen_id": "int64", "seed": "int64"})
    return df if keep_all else df[df["replicated"]].reset_index(drop=True)
