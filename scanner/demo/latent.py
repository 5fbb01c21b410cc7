"""Train the latent demo model: a tiny text-to-image Stable Diffusion, saved in an SD checkout's layout.

Three parts trained here on the demo corpus (32 x 32 RGB, captions="unique"), nothing downloaded:
- `AutoencoderKL` 32 x 32 x 3 -> 8 x 8 x 4 (three levels, x4 downsampling), trained on reconstruction with
  a small KL term; `scaling_factor` = 1 / std of the corpus latents, as SD's 0.18215 was chosen;
- `CLIPTextModel` (2 layers, width 64) over a word-level CLIP BPE vocabulary of the corpus captions, written
  by `write_tokenizer` (vocab.json + merges.txt, loadable by `CLIPTokenizer.from_pretrained`);
- `UNet2DConditionModel` on the latents with cross-attention to the caption, trained jointly with the text
  encoder, epsilon objective, SD's scaled-linear betas, the caption dropped to the empty prompt 10 % of the
  time so classifier-free guidance works. Planted `oversampled` images are drawn `oversample_factor` times as
  often; repeated groups memorize through their copies (verbatim groups also through their shared caption).

The saved directory (model_index.json, vae/, unet/, text_encoder/, tokenizer/, scheduler/, safetensors) loads
with `StableDiffusionPipeline.from_pretrained(dir)` and as memscan's `model.kind: latent`, exactly as an SD
v1.5 checkout does. Fixed seeded steps, so every machine trains the same model.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from scanner.demo.train import (
    _torch_threads,
    draw_batch,
    fit,
    load_images,
    noised,
    progress_bar,
    sample_weights,
    to_model_space,
)
from scanner.storage import write_json

log = logging.getLogger("memscan")

RESOLUTION = 32  # image side; the VAE's three levels make 8 x 8 x 4 latents (D = 256)
MAX_TOKENS = 24  # tokens per prompt, start and end included (SD: 77); the demo captions need <= 20
TEXT_WIDTH = 64  # text embedding width = the UNet's cross_attention_dim (SD v1: 768)
# Measured on the 2-core CPU (batch 64): the VAE 0.24 s a step, the UNet + text encoder 0.21 s a step.
LATENT_VAE_STEPS = 600
LATENT_STEPS = 2000
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
# CLIP's pre-tokenizer: letters runs, single digits, other non-space runs (what CLIPTokenizer splits on)
_WORDS = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def write_tokenizer(tok_dir: str | Path, texts: list[str], max_length: int = MAX_TOKENS) -> Path:
    """A CLIP BPE tokenizer for `texts`, written as an SD checkout's tokenizer/ holds it (no hub download).

    Vocabulary: the special tokens, every printable ASCII character alone and word-final ("x</w>"), and BPE
    merges learned on the words of `texts` until each is one token (an unseen word falls back to pieces and
    characters, never to an unknown token). Deterministic for the same texts.
    """
    tok_dir = Path(tok_dir)
    tok_dir.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab: dict[str, int] = {}
    for tok in (*_SPECIAL, *chars, *(c + "</w>" for c in chars)):
        vocab.setdefault(tok, len(vocab))
    merges = _learn_merges({w for t in texts for w in _WORDS.findall((t or "").lower()) if w.isascii()})
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=True))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": _SPECIAL[0],
        "eos_token": _SPECIAL[1], "unk_token": _SPECIAL[1], "pad_token": _SPECIAL[1], "do_lower_case": True}))
    (tok_dir / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": _SPECIAL[0], "eos_token": _SPECIAL[1], "unk_token": _SPECIAL[1], "pad_token": _SPECIAL[1]}))
    return tok_dir


def _learn_merges(words: set[str]) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first (ties: the smaller pair), until every word is one symbol.

    Replaying them by rank, as CLIPTokenizer does, segments each training word exactly as here: one token."""
    from collections import Counter

    segs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(words) if w}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for s in segs.values() for p in itertools.pairwise(s))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, s in segs.items():
            if len(s) > 1 and best in itertools.pairwise(s):
                out, i = [], 0
                while i < len(s):
                    if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                        out.append(s[i] + s[i + 1])
                        i += 2
                    else:
                        out.append(s[i])
                        i += 1
                segs[w] = tuple(out)


def make_components(vocab_size: int, max_length: int = MAX_TOKENS, resolution: int = RESOLUTION):
    """(AutoencoderKL, UNet2DConditionModel, CLIPTextModel), freshly initialised (seed torch first)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if resolution % 4:
        raise ValueError(f"resolution must be divisible by 4 (the VAE downsamples x4), got {resolution}")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                        layers_per_block=1, norm_num_groups=8, sample_size=resolution,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    unet = UNet2DConditionModel(sample_size=resolution // 4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=16, cross_attention_dim=TEXT_WIDTH,
                                attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return vae, unet, text


def _sd_schedulers():
    """(training DDPMScheduler, the DDIMScheduler saved for sampling): SD v1's scaled-linear betas."""
    from diffusers import DDIMScheduler, DDPMScheduler

    betas = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    return DDPMScheduler(**betas), DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def train_latent_demo(corpus_dir: str | Path, out_dir: str | Path, steps: int = LATENT_STEPS,
                      vae_steps: int = LATENT_VAE_STEPS, batch_size: int = 64, lr: float = 1e-3,
                      oversample_factor: float = 30, caption_dropout: float = 0.1, seed: int = 0,
                      time_budget_s: float | None = None, progress: bool = True, ema_decay: float = 0.999,
                      warmup_steps: int = 100, num_threads: int | None = None, kl_weight: float = 1e-6) -> Path:
    """Train VAE, then text encoder + UNet, on `corpus_dir`; save the SD layout to out_dir. Returns out_dir.

    `time_budget_s` may stop the UNet's training early, with a warning naming the steps run (train_info.json
    records `stopped_by`). The model is written to a temporary directory and renamed into place, with
    train_info.json inside, so a present out_dir/train_info.json means a complete model.
    """
    from transformers import CLIPTokenizer

    for name, v, lo in (("steps", steps, 1), ("vae_steps", vae_steps, 1), ("batch_size", batch_size, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not 0 <= caption_dropout < 1:
        raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout!r}")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _torch_threads(num_threads):
        t_start = time.time()
        data = load_images(corpus_dir, RESOLUTION, 3)
        captions = [c or "" for c in data.captions]
        x_all = to_model_space(data.images)
        weights = sample_weights(data.planted, oversample_factor)

        tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp / "tokenizer", captions))
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
        n_truncated = int(sum(len(t) > MAX_TOKENS for t in tokenizer(captions).input_ids))

        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        vae, unet, text = make_components(len(tokenizer), MAX_TOKENS)

        # 1. the autoencoder, on uniform draws of the corpus
        opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
        bar, t_vae = progress_bar(progress, vae_steps, "train-demo (latent: VAE)"), time.time()
        vae.train()
        vae_losses = []
        for step in range(vae_steps):
            x0 = x_all[torch.randint(0, len(x_all), (batch_size,), generator=gen)]
            post = vae.encode(x0).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
            rec = vae.decode(z).sample
            loss = torch.nn.functional.mse_loss(rec, x0) + kl_weight * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            vae_losses.append(loss.item())
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        vae_s = time.time() - t_vae
        vae.eval()
        with torch.no_grad():
            means = torch.cat([vae.encode(x_all[i:i + 256]).latent_dist.mean for i in range(0, len(x_all), 256)])
            recon = torch.cat([vae.decode(means[i:i + 256]).sample for i in range(0, len(means), 256)])
        scaling = float(1.0 / means.std())
        vae.register_to_config(scaling_factor=scaling)
        rec_rmse = float(((recon.clamp(-1, 1) - x_all) / 2).pow(2).flatten(1).mean(1).sqrt().median())
        latents = means * scaling

        # 2. text encoder + UNet, jointly, on the scaled posterior means (what memscan scores)
        ddpm, ddim = _sd_schedulers()
        alphas = ddpm.alphas_cumprod.float()
        both = torch.nn.ModuleList([unet, text])

        def batch_loss():
            idx = draw_batch(weights, batch_size, gen)
            tok = ids[idx].clone()
            tok[torch.rand(batch_size, generator=gen) < caption_dropout] = empty[0]
            zt, t, noise = noised(latents[idx], alphas, gen)
            pred = unet(zt, t, encoder_hidden_states=text(tok)[0]).sample
            return torch.nn.functional.mse_loss(pred, noise)

        def warn(done: int) -> None:
            log.warning("train-demo (latent): the time budget (%.0f s) stopped training after %d of %d UNet "
                        "steps: this model differs from the %d-step model", time_budget_s, done, steps, steps)

        run = fit(both, batch_loss, steps, lr, warmup_steps, ema_decay, desc="train-demo (latent: UNet)",
                  progress=progress, deadline=None if time_budget_s is None else t_start + time_budget_s,
                  on_deadline=warn)
        both.eval()

        info = {
            "kind": "latent", "steps": len(run.losses), "steps_requested": steps,
            "stopped_by": "steps" if len(run.losses) == steps else "time_budget", "vae_steps": vae_steps,
            "vae_s": round(vae_s, 1), "vae_loss_last": float(np.mean(vae_losses[-20:])),
            "vae_recon_rmse_median": rec_rmse, "scaling_factor": scaling, **run.record(time.time() - t_start),
            "resolution": RESOLUTION, "channels": 3, "batch_size": batch_size, "lr": lr,
            "caption_dropout": caption_dropout, "max_tokens": MAX_TOKENS, "vocab_size": len(tokenizer),
            "captions_truncated": n_truncated, "ema_decay": ema_decay, "oversample_factor": oversample_factor,
            "seed": seed, "n_images": len(data.keys), "n_skipped": data.skipped,
            "n_params": {"vae": sum(p.numel() for p in vae.parameters()),
                         "unet": sum(p.numel() for p in unet.parameters()),
                         "text_encoder": sum(p.numel() for p in text.parameters())},
            "torch_threads": torch.get_num_threads(), "corpus_dir": str(Path(corpus_dir).resolve()),
        }
        for name, module in (("vae", vae), ("unet", unet), ("text_encoder", text)):
            module.save_pretrained(tmp / name, safe_serialization=True)
        ddim.save_pretrained(tmp / "scheduler")
        write_json(model_index(), tmp / "model_index.json")
        write_json(info, tmp / "train_info.json")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def model_index(scheduler: str = "DDIMScheduler") -> dict:
    """What an SD v1.5 checkout's model_index.json says (no safety checker), for this layout; `scheduler` names the
    diffusers class saved in scheduler/ (SD v1.5's own is PNDMScheduler)."""
    import diffusers

    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", scheduler], "safety_checker": [None, None],
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}
