"""Latent text-conditional diffusion model: a local Stable Diffusion (v1.x / v2.x) checkout.

Directory layout (a diffusers `StableDiffusionPipeline.save_pretrained` directory, e.g. a local clone
of stable-diffusion-v1-5):

    model_index.json
    vae/           AutoencoderKL            config.json + *.safetensors
    unet/          UNet2DConditionModel     config.json + *.safetensors
    text_encoder/  CLIPTextModel            config.json + *.safetensors
    tokenizer/     CLIPTokenizer            vocab.json + merges.txt (+ tokenizer_config.json)
    scheduler/     PNDM / DDIM / DDPM / ... scheduler_config.json

Model space is the VAE latent: x = (posterior mean - shift_factor) x scaling_factor, (B, 4, 64, 64)
for SD at 512 px, D = 16384. The posterior *mean* rather than a sample, so the same image always
gives the same point (docs/method.md §1). Conditioning is CLIP's last hidden state (B, 77, 768) for SD v1,
exactly what the pipeline passes to the UNet as encoder_hidden_states.

Precision: the UNet, which every score and JVP goes through, runs in `dtype` (float16 / bfloat16 on a
GPU) with its GroupNorm / LayerNorm layers kept in float32 (their JVP overflows in float16, see
`safe_load.frozen`); the VAE and the text encoder run once per image / caption and stay in float32, so
the point x and the conditioning are not rounded before the geometry starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from scanner.models.base import ScoreModel
from scanner.models.pixel import DiscreteVPSchedule, load_scheduler, match_channels, square_size, to_unit_range
from scanner.models.safe_load import frozen, require_files, resolve_device, resolve_dtype, use_safetensors

LATENT_LAYOUT = ("a local Stable Diffusion checkout (diffusers layout): model_index.json, vae/, unet/ "
                 "(UNet2DConditionModel), text_encoder/, tokenizer/, scheduler/, each with its config and "
                 "*.safetensors weights")


class LatentSDScoreModel(ScoreModel):
    """Text-conditional latent score model: AutoencoderKL + UNet2DConditionModel + CLIP text encoder.

    x: (B, C_lat, h, w) float32 latents from `encode_images`; cond: (B, L, E) float32 from `encode_text`
    (or (1, L, E), broadcast). `eps(x, t)` with cond None is the unconditional (empty-prompt) prediction.
    JVPs through the UNet's attention need `with model.jvp_context():`.
    """

    conditional = True
    mirrors_in_pixels = True  # score_norm_cal mirrors the image and encodes it: a flipped latent is not its encoding

    def __init__(self, vae: Any, unet: Any, text_encoder: Any, tokenizer: Any, scheduler: Any,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.unet = frozen(unet, self.device, self.dtype)
        self.vae = frozen(vae, self.device, torch.float32)
        self.text_encoder = frozen(text_encoder, self.device, torch.float32)
        self.tokenizer = tokenizer
        self.schedule = DiscreteVPSchedule(scheduler, self.device)

        latent_channels = int(vae.config.latent_channels)
        if int(unet.config.in_channels) != latent_channels:
            raise ValueError(f"unet in_channels ({unet.config.in_channels}) must equal vae latent_channels "
                             f"({latent_channels}); inpainting / depth UNets with extra input channels are not supported")
        self.latent_size = square_size(unet.config.sample_size, "unet sample_size")
        # diffusers' vae_scale_factor: every encoder block but the last halves the resolution.
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = self.latent_size * self.vae_scale_factor
        self.sample_shape = (latent_channels, self.latent_size, self.latent_size)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.get("shift_factor") or 0.0)  # SD 1/2: none; SD3-style VAEs: set
        self._uncond: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = torch.float32, allow_pickle: bool = False) -> LatentSDScoreModel:
        """Load every component from `model_dir` (safetensors weights only unless allow_pickle)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        root = Path(model_dir).expanduser()
        require_files(root, ["vae/config.json", "unet/config.json", "text_encoder/config.json", "tokenizer",
                             "scheduler/scheduler_config.json"], LATENT_LAYOUT)
        # Check every component before loading any, so a refused pickle costs no loading time.
        safe = {name: use_safetensors(root / name, allow_pickle) for name in ("vae", "unet", "text_encoder")}
        return cls(
            vae=AutoencoderKL.from_pretrained(root / "vae", use_safetensors=safe["vae"]),
            unet=UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=safe["unet"],
                                                      torch_dtype=resolve_dtype(dtype)),
            text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", use_safetensors=safe["text_encoder"]),
            tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
            scheduler=load_scheduler(root / "scheduler"),
            device=device,
            dtype=dtype,
        )

    def psi_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t: (B,) in [0, 1] -> (psi, sigma) of timestep round(t * T), each (B,) float32 on t's device."""
        return self.schedule.psi_sigma(t)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C_lat, h, w) float32, t: (B,) or scalar in [0, 1], cond: (B or 1, L, E) or None (empty prompt).

        Returns eps: (B, C_lat, h, w) float32.
        """
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"x must be (B, {', '.join(map(str, self.sample_shape))}), got {tuple(x.shape)}")
        batch = x.shape[0]
        if cond is None:
            cond = self.uncond(batch)
        if not isinstance(cond, torch.Tensor) or cond.dim() != 3 or cond.shape[0] not in (1, batch):
            shape = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"cond must be encode_text's (B, L, E) tensor with B = {batch} or 1, got {shape}")
        steps = self.schedule.timesteps(t, batch)
        cond = cond.to(device=x.device, dtype=self.dtype).expand(batch, -1, -1)
        out = self.unet(x.to(self.dtype), steps, encoder_hidden_states=cond).sample.to(torch.float32)
        return self.schedule.to_eps(out, x, steps)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, H, W, C) uint8, H = W = `resolution` (512 for SD v1.5), C = 1 or 3.

        Returns x: (B, C_lat, h, w) float32 = (VAE posterior mean - shift_factor) x scaling_factor.
        """
        pixels = match_channels(to_unit_range(images, self.resolution), int(self.vae.config.in_channels))
        mean = self.vae.encode(pixels.to(self.device)).latent_dist.mean
        return (mean - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str | None]) -> torch.Tensor:
        """captions: B strings (None or '' = the empty prompt) -> (B, L, E) float32, L = tokenizer.model_max_length.

        Padded to the full length and truncated beyond it, as StableDiffusionPipeline does, so this is the
        conditioning the model was trained and sampled with.
        """
        if isinstance(captions, str):
            raise TypeError(f"captions must be a list of strings, got the single string {captions!r}")
        tokens = self.tokenizer([c or "" for c in captions], padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        # SD v1/v2 text encoders were trained without an attention mask; the pipeline passes one only if asked.
        mask = tokens.attention_mask.to(self.device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden.to(torch.float32)

    def uncond(self, batch_size: int) -> torch.Tensor:
        """The empty-prompt conditioning, (batch_size, L, E) float32; computed once and cached (a view: don't modify)."""
        if self._uncond is None:
            self._uncond = self.encode_text([""])
        return self._uncond.expand(batch_size, -1, -1)
