"""From a `model:` config section to a ScoreModel: pick the adapter, the device and the dtype.

    model = load_score_model(cfg.model)          # PixelScoreModel or LatentSDScoreModel
    side = model_resolution(model)               # resize + centre-crop images to side x side

The directory is inspected before anything is loaded, so a wrong `kind` or path fails in
milliseconds with a message saying what was found there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scanner.config import ModelConfig
from scanner.models.base import ScoreModel
from scanner.models.safe_load import resolve_device, resolve_dtype


def detect_kind(model_dir: Path) -> tuple[str | None, str]:
    """Guess 'pixel' | 'latent' | None from a directory's contents; also return what was found, for errors."""
    unet_class = None
    if (model_dir / "unet" / "config.json").is_file():
        try:
            unet_class = json.loads((model_dir / "unet" / "config.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            unet_class = "unreadable config.json"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in model_dir.iterdir())
    found = ", ".join(entries[:20]) or "nothing"
    if unet_class:
        found += f"; unet/config.json names {unet_class}"
    if (model_dir / "vae").is_dir() or unet_class == "UNet2DConditionModel":
        return "latent", found
    if unet_class == "UNet2DModel":
        return "pixel", found
    return None, found


def load_score_model(cfg: ModelConfig, allow_pickle: bool | None = None) -> ScoreModel:
    """Load the model `cfg` describes.

    cfg.device 'auto' means cuda when torch sees a GPU, else cpu. cfg.dtype is the UNet's forward dtype
    on a GPU; on the CPU the model always runs in float32 (half precision there is slow and gains nothing).
    allow_pickle: also load `.bin` / `.ckpt` pickles (they can run code); safetensors only by default.
    """
    from scanner.models.latent import LATENT_LAYOUT, LatentSDScoreModel
    from scanner.models.pixel import PIXEL_LAYOUT, PixelScoreModel

    adapters = {"pixel": (PixelScoreModel, PIXEL_LAYOUT), "latent": (LatentSDScoreModel, LATENT_LAYOUT)}
    if cfg.kind not in adapters:
        raise ValueError(f"model.kind must be 'pixel' or 'latent' to load a score model, got {cfg.kind!r} "
                         "('none' scans neighbours only and loads no model)")
    cls, layout = adapters[cfg.kind]
    if not cfg.path:
        raise ValueError(f"model.path must be a local model directory for model.kind {cfg.kind!r}, got {cfg.path!r}")
    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model.path {str(path)!r} does not exist or is not a directory; expected {layout}")
    kind, found = detect_kind(path)
    if kind != cfg.kind:
        what = f"looks like a {kind} model" if kind else "is not a diffusers model directory memscan recognises"
        hint = f"; set model.kind: {kind}" if kind else ""
        raise ValueError(f"model.kind is {cfg.kind!r} but {str(path)!r} {what} (found: {found}); "
                         f"{cfg.kind} expects {layout}{hint}")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype) if device.type == "cuda" else torch.float32
    allow_pickle = cfg.allow_pickle if allow_pickle is None else allow_pickle
    return cls.from_pretrained(path, device=device, dtype=dtype, allow_pickle=allow_pickle)


def model_resolution(model: ScoreModel) -> int:
    """Side in pixels of the square images `model.encode_images` expects.

    Pixel model: the UNet's sample_size. Latent model: the UNet's sample_size x the VAE's downsampling
    factor (64 x 8 = 512 for SD v1.5).
    """
    resolution = getattr(model, "resolution", None)
    if resolution is None:
        raise TypeError(f"{type(model).__name__} has no image resolution; only image models "
                        "(PixelScoreModel, LatentSDScoreModel) encode images")
    return int(resolution)
