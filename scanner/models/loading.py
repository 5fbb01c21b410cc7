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
from scanner.errors import ConfigError, InputError, MissingPathError
from scanner.models.base import ScoreModel
from scanner.models.safe_load import require_files, resolve_device, resolve_dtype, use_safetensors

# what each kind's from_pretrained reads, checked before anything is loaded
REQUIRED = {"pixel": ["unet/config.json", "scheduler/scheduler_config.json"],
            "latent": ["vae/config.json", "unet/config.json", "text_encoder/config.json", "tokenizer",
                       "scheduler/scheduler_config.json"]}


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


def check_model_dir(cfg: ModelConfig, allow_pickle: bool | None = None) -> tuple[Path, int]:
    """Everything about `cfg.path` that can be checked without loading a weight, in milliseconds.

    Raises ConfigError (no path for a model kind), MissingPathError (no such directory or file),
    InputError (a directory of another kind, an unreadable config) or UnsafeCheckpointError (pickle
    weights without allow_pickle). Returns (the absolute directory, the image side the model takes).
    """
    from scanner.models.latent import LATENT_LAYOUT
    from scanner.models.pixel import PIXEL_LAYOUT, square_size

    layouts = {"pixel": PIXEL_LAYOUT, "latent": LATENT_LAYOUT}
    if cfg.kind not in layouts:
        raise ConfigError(f"model.kind must be 'pixel' or 'latent' to load a score model, got {cfg.kind!r} "
                          "('none' scans neighbours only and loads no model)")
    layout = layouts[cfg.kind]
    if not cfg.path:
        raise ConfigError(f"model.path must be a local model directory for model.kind {cfg.kind!r}, got {cfg.path!r}")
    path = Path(cfg.path).expanduser().resolve()
    if not path.is_dir():
        raise MissingPathError(f"model.path {str(path)!r} does not exist or is not a directory; expected {layout}")
    kind, found = detect_kind(path)
    if kind != cfg.kind:
        what = f"looks like a {kind} model" if kind else "is not a diffusers model directory memscan recognises"
        hint = f"; set model.kind: {kind}" if kind else ""
        raise InputError(f"model.kind is {cfg.kind!r} but {str(path)!r} {what} (found: {found}); "
                         f"{cfg.kind} expects {layout}{hint}")
    require_files(path, REQUIRED[kind], layout)
    allow_pickle = cfg.allow_pickle if allow_pickle is None else allow_pickle
    components = ("unet",) if kind == "pixel" else ("vae", "unet", "text_encoder")
    for name in components:
        use_safetensors(path / name, allow_pickle)  # raises for missing or refused weights
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
        side = square_size(unet.get("sample_size"), f"{path / 'unet' / 'config.json'} sample_size")
        if kind == "latent":  # the VAE halves the side once per block after the first (8 for SD's 4 blocks)
            vae = json.loads((path / "vae" / "config.json").read_text())
            side *= 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the model config under {str(path)!r}: {e}") from None
    return path, int(side)


def load_score_model(cfg: ModelConfig, allow_pickle: bool | None = None) -> ScoreModel:
    """Load the model `cfg` describes (check_model_dir first, so a wrong kind or path fails before loading).

    cfg.device 'auto' means cuda when torch sees a GPU, else cpu. cfg.dtype is the UNet's forward dtype
    on a GPU; on the CPU the model always runs in float32 (half precision there is slow and gains nothing).
    allow_pickle: also load `.bin` / `.ckpt` pickles (they can run code); safetensors only by default.
    """
    from scanner.models.latent import LatentSDScoreModel
    from scanner.models.pixel import PixelScoreModel

    path, _ = check_model_dir(cfg, allow_pickle)
    cls = {"pixel": PixelScoreModel, "latent": LatentSDScoreModel}[cfg.kind]
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
