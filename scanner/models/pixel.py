"""Pixel-space diffusion model: a diffusers `UNet2DModel` + a discrete-time VP scheduler.

Directory layout (what `DDPMPipeline.save_pretrained` or `unet.save_pretrained(dir / "unet")` plus
`scheduler.save_pretrained(dir / "scheduler")` write):

    model_dir/unet/config.json, model_dir/unet/diffusion_pytorch_model.safetensors
    model_dir/scheduler/scheduler_config.json

Time: t in [0, 1] maps to the training timestep round(t * T), clamped to [0, T - 1] (T =
`num_train_timesteps`, 1000 for DDPM and Stable Diffusion), and psi / sigma are read from the
scheduler's `alphas_cumprod` at that same timestep, so `psi_sigma(t)` and `eps(x, t)` always describe
the same noise level (docs/method.md §1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from scanner.models.base import ScoreModel
from scanner.models.safe_load import frozen, require_files, resolve_device, resolve_dtype, use_safetensors

PIXEL_LAYOUT = ("a diffusers pixel model directory: unet/config.json + unet/*.safetensors (a UNet2DModel) and "
                "scheduler/scheduler_config.json")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def load_scheduler(scheduler_dir: Path) -> Any:
    """The scheduler class named in scheduler_config.json (DDPM, PNDM, DDIM, Euler, ...).

    Any of them exposes the training `alphas_cumprod`; the named class is used rather than
    DDPMScheduler so that SD's PNDM config loads without unexpected-key warnings, and a scheduler of
    another family (flow matching) fails clearly in `DiscreteVPSchedule` instead of being reinterpreted.
    """
    import diffusers

    config = json.loads((scheduler_dir / "scheduler_config.json").read_text())
    cls = getattr(diffusers, str(config.get("_class_name", "DDPMScheduler")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        cls = diffusers.DDPMScheduler  # unknown name: the beta-schedule keys are shared by all VP schedulers
    return cls.from_pretrained(scheduler_dir)


def square_size(sample_size: Any, what: str) -> int:
    """A config `sample_size` (int, or [h, w] with h == w) -> int."""
    if isinstance(sample_size, int):
        return sample_size
    if isinstance(sample_size, (list, tuple)) and len(sample_size) == 2 and sample_size[0] == sample_size[1]:
        return int(sample_size[0])
    raise ValueError(f"{what} must be an int or a square [h, w], got {sample_size!r}; memscan scans square images")


class DiscreteVPSchedule:
    """The noise schedule of a discrete-time VP scheduler: t in [0, 1] -> timestep, psi, sigma.

    Shared by the pixel and latent adapters. `alphas_cumprod` is kept in float64 on the model device
    so psi^2 + sigma^2 = 1 holds to float32 precision after the cast.
    """

    def __init__(self, scheduler: Any, device: torch.device):
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod; memscan needs a discrete-time "
                             "variance-preserving scheduler (DDPM, DDIM, PNDM, Euler, ...), not flow matching")
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).to(device)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                             f"got {self.prediction_type!r}")

    def timesteps(self, t: torch.Tensor, batch_size: int) -> torch.Tensor:
        """t: (B,) or scalar in [0, 1] -> (B,) int64 timesteps round(t * T) clamped to [0, T - 1]."""
        steps = torch.round(t.to(torch.float64) * self.num_train_timesteps).long()
        steps = steps.clamp(0, self.num_train_timesteps - 1).to(self.alphas_cumprod.device)
        if steps.numel() not in (1, batch_size):
            raise ValueError(f"t must be a scalar or have one entry per sample ({batch_size}), got {tuple(t.shape)}")
        return steps.reshape(-1).expand(batch_size)

    def psi_sigma_at(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """steps: (B,) int64 timesteps -> (psi, sigma), each (B,) float32 on the schedule's device."""
        alpha_bar = self.alphas_cumprod[steps]
        return alpha_bar.sqrt().float(), (1.0 - alpha_bar).sqrt().float()

    def psi_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t: (B,) in [0, 1] -> (psi, sigma), each (B,) float32 on t's device."""
        psi, sigma = self.psi_sigma_at(self.timesteps(t, t.numel()))
        return psi.to(t.device), sigma.to(t.device)

    def to_eps(self, out: torch.Tensor, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Convert the network output to a noise prediction.

        With x = psi x0 + sigma eps: v = psi eps - sigma x0, so eps = sigma x + psi v (v_prediction);
        eps = (x - psi x0) / sigma (sample prediction). out, x: (B, ...) float32; steps: (B,).
        """
        if self.prediction_type == "epsilon":
            return out
        psi, sigma = self.psi_sigma_at(steps)
        shape = (-1,) + (1,) * (x.dim() - 1)
        psi, sigma = psi.to(x.device).view(shape), sigma.to(x.device).view(shape)
        if self.prediction_type == "v_prediction":
            return sigma * x + psi * out
        return (x - psi * out) / sigma


class PixelScoreModel(ScoreModel):
    """Unconditional pixel-space score model from a diffusers `UNet2DModel` and its scheduler.

    x: (B, C, H, W) float32, pixels scaled to [-1, 1] (what `encode_images` returns). The UNet runs
    in `dtype` (float16 / bfloat16 make sense on a GPU only; norm layers stay float32, see
    `safe_load.frozen`); inputs are cast to it and outputs back to float32, so the geometry always sees
    float32. Differentiable in x with autograd and
    `torch.func.jvp` (UNet2DModel attention blocks need `with model.jvp_context():` around the JVP).
    """

    conditional = False

    def __init__(self, unet: Any, scheduler: Any, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = torch.float32):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.unet = frozen(unet, self.device, self.dtype)
        self.schedule = DiscreteVPSchedule(scheduler, self.device)
        self.resolution = square_size(unet.config.sample_size, "unet sample_size")
        self.sample_shape = (int(unet.config.in_channels), self.resolution, self.resolution)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = torch.float32, allow_pickle: bool = False) -> PixelScoreModel:
        """Load `model_dir/unet` (UNet2DModel, safetensors unless allow_pickle) and `model_dir/scheduler`."""
        from diffusers import UNet2DModel

        root = Path(model_dir).expanduser()
        require_files(root, ["unet/config.json", "scheduler/scheduler_config.json"], PIXEL_LAYOUT)
        unet = UNet2DModel.from_pretrained(root / "unet", use_safetensors=use_safetensors(root / "unet", allow_pickle),
                                           torch_dtype=resolve_dtype(dtype))
        return cls(unet, load_scheduler(root / "scheduler"), device=device, dtype=dtype)

    def psi_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t: (B,) in [0, 1] -> (psi, sigma) of timestep round(t * T), each (B,) float32 on t's device."""
        return self.schedule.psi_sigma(t)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """x: (B, C, H, W) float32 on `self.device`, t: (B,) or scalar in [0, 1] -> eps: (B, C, H, W) float32."""
        if cond is not None:
            raise ValueError(f"PixelScoreModel is unconditional; cond must be None, got {type(cond).__name__}")
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"x must be (B, {', '.join(map(str, self.sample_shape))}), got {tuple(x.shape)}")
        steps = self.schedule.timesteps(t, x.shape[0])
        out = self.unet(x.to(self.dtype), steps).sample.to(torch.float32)
        return self.schedule.to_eps(out, x, steps)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, H, W, C) uint8, H = W = `resolution`, C = 1 or 3 -> x: (B, *sample_shape) float32 in [-1, 1].

        A 1-channel model gets the mean of R, G, B; a 3-channel model gets a gray image repeated.
        """
        x = to_unit_range(images, self.resolution).to(self.device)
        return match_channels(x, self.sample_shape[0])


def to_unit_range(images: Any, resolution: int) -> torch.Tensor:
    """images: (B, H, W, C) uint8 (torch or numpy), H = W = resolution -> (B, C, H, W) float32 in [-1, 1]."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:3]) != (resolution, resolution):
        raise ValueError(f"images must be (B, {resolution}, {resolution}, C) uint8 at the model resolution "
                         f"{resolution}, got {tuple(images.shape)} {images.dtype}")
    return images.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """x: (B, C, H, W) with C in {1, 3} -> (B, channels, H, W): RGB -> gray by the mean, gray -> RGB by repeating."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 3 and channels == 1:
        return x.mean(dim=1, keepdim=True)
    if x.shape[1] == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    raise ValueError(f"images must have 1 or 3 channels for a {channels}-channel model, got {x.shape[1]}")
