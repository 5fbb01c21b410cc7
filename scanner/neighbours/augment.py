"""Copy-detection augmentations (SSCD style), batched in torch; JPEG through PIL.

Each view of an image goes through: a random resized crop with a small shift and an optional
horizontal flip (one affine resample), colour jitter (brightness, contrast, saturation), a
down-then-up resize, light blur or noise, and a JPEG re-encode. These are the edits that make a
"near-duplicate" in scraped data; the embedder is trained to be invariant to them and nothing else.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F


def _affine_crop(x: torch.Tensor, g: torch.Generator, min_scale: float, max_shift: float, flip_p: float,
                 max_rotate_deg: float = 0.0):
    """Per-image random crop (area in [min_scale, 1]), shift (fraction of the side), flip and rotation (uniform in
    +-max_rotate_deg; none drawn at 0); same output size."""
    b = x.shape[0]
    area = min_scale + (1 - min_scale) * torch.rand(b, generator=g)
    aspect = torch.exp((torch.rand(b, generator=g) - 0.5) * 0.4)  # aspect ratio in [0.82, 1.22]
    sx, sy = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    # the crop window may sit anywhere inside the image, plus a small shift beyond it (zero padding)
    tx = (1 - sx) * (2 * torch.rand(b, generator=g) - 1) + max_shift * (2 * torch.rand(b, generator=g) - 1)
    ty = (1 - sy) * (2 * torch.rand(b, generator=g) - 1) + max_shift * (2 * torch.rand(b, generator=g) - 1)
    flip = torch.where(torch.rand(b, generator=g) < flip_p, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    if max_rotate_deg > 0:
        a = torch.deg2rad(max_rotate_deg * (2 * torch.rand(b, generator=g) - 1))
        rot = torch.stack([torch.stack([a.cos(), -a.sin()], 1), torch.stack([a.sin(), a.cos()], 1)], 1)
        theta[:, :, :2] = rot @ theta[:, :, :2]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _colour(x: torch.Tensor, g: torch.Generator, strength: float):
    b = x.shape[0]

    def factor():
        return (1 + strength * (2 * torch.rand(b, 1, 1, 1, generator=g) - 1))

    x = x * factor()  # brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factor() + mean  # contrast
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * factor() + grey  # saturation
    gain = 1 + strength * (2 * torch.rand(b, 3, 1, 1, generator=g) - 1)  # per-channel gain: a colour cast
    return (x * gain).clamp(0, 1)


def _down_up(x: torch.Tensor, g: torch.Generator, p: float, min_factor: float):
    s = x.shape[-1]
    out = x.clone()
    for i in torch.nonzero(torch.rand(x.shape[0], generator=g) < p).flatten().tolist():
        f = min_factor + (1 - min_factor) * float(torch.rand(1, generator=g))
        small = F.interpolate(x[i:i + 1], size=max(4, round(s * f)), mode="bilinear", antialias=True)
        out[i:i + 1] = F.interpolate(small, size=s, mode="bilinear")
    return out


def _blur_noise(x: torch.Tensor, g: torch.Generator, p: float):
    """A 3x3 box blur on a fraction p of the images, Gaussian noise (sigma <= 0.03) on another p."""
    x = x.clone()
    idx = torch.nonzero(torch.rand(x.shape[0], generator=g) < p).flatten()
    if len(idx):
        x[idx] = F.avg_pool2d(x[idx], 3, stride=1, padding=1, count_include_pad=False)
    idx = torch.nonzero(torch.rand(x.shape[0], generator=g) < p).flatten()
    if len(idx):
        sigma = 0.03 * torch.rand(len(idx), 1, 1, 1, generator=g)
        x[idx] = x[idx] + sigma * torch.randn(x[idx].shape, generator=g)
    return x.clamp(0, 1)


def _jpeg(x: torch.Tensor, g: torch.Generator, p: float, quality: tuple[int, int]):
    from PIL import Image

    arr = (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    for i in torch.nonzero(torch.rand(x.shape[0], generator=g) < p).flatten().tolist():
        q = int(torch.randint(quality[0], quality[1] + 1, (1,), generator=g))
        buf = io.BytesIO()
        Image.fromarray(arr[i]).save(buf, format="JPEG", quality=q)
        arr[i] = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def _overlay(x: torch.Tensor, g: torch.Generator, p: float):
    """On a fraction p of the images, a solid block of 1-2 rows of 'text' (random dark or light strokes) in a
    corner, covering up to ~15 % of the area: the burnt-in caption or watermark of a reposted copy."""
    s = x.shape[-1]
    out = x.clone()
    for i in torch.nonzero(torch.rand(x.shape[0], generator=g) < p).flatten().tolist():
        h = max(2, int(s * (0.15 + 0.15 * float(torch.rand(1, generator=g)))))
        w = max(2, int(s * (0.3 + 0.3 * float(torch.rand(1, generator=g)))))
        y = 0 if float(torch.rand(1, generator=g)) < 0.5 else s - h
        x0 = 0 if float(torch.rand(1, generator=g)) < 0.5 else s - w
        ink = float(torch.rand(1, generator=g) < 0.5)
        strokes = torch.rand(h, w, generator=g) < 0.45
        patch = out[i, :, y:y + h, x0:x0 + w]
        out[i, :, y:y + h, x0:x0 + w] = torch.where(strokes, torch.full_like(patch, ink), patch)
    return out


def _border(x: torch.Tensor, g: torch.Generator, p: float, max_frac: float = 0.12):
    """On a fraction p of the images, the picture shrunk into a solid frame of 3-max_frac of the side on every edge
    (black, white or a random grey): the letterbox or passe-partout of a reposted copy."""
    s = x.shape[-1]
    out = x.clone()
    for i in torch.nonzero(torch.rand(x.shape[0], generator=g) < p).flatten().tolist():
        b = max(1, round(s * (0.03 + (max_frac - 0.03) * float(torch.rand(1, generator=g)))))
        inner = F.interpolate(x[i:i + 1], size=s - 2 * b, mode="bilinear", antialias=True, align_corners=False)
        black_or_white, grey = float(torch.rand(1, generator=g).round()), float(torch.rand(1, generator=g))
        out[i] = black_or_white if float(torch.rand(1, generator=g)) < 0.7 else grey
        out[i, :, b:s - b, b:s - b] = inner[0]
    return out


def _grayscale(x: torch.Tensor, g: torch.Generator, p: float):
    """On a fraction p of the images, their luminance in all three channels."""
    out = x.clone()
    idx = torch.nonzero(torch.rand(x.shape[0], generator=g) < p).flatten()
    if len(idx):
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        out[idx] = (x[idx] * w).sum(1, keepdim=True).expand(-1, 3, -1, -1)
    return out


# The copy-detector views (issue #34, SSCD's recipe at this scale): the shipped views plus the copies people make,
# stronger crops (down to 60 % of the area), rotations up to 18 degrees, overlays, borders and grayscale. Flips are
# not drawn: the flip-invariant embedding (embed.py, neighbours.flip_invariant) is invariant to them by construction.
COPY_VIEWS = {"min_area": 0.6, "max_rotate_deg": 18.0, "overlay_p": 0.3, "border_p": 0.25, "grayscale_p": 0.2,
              "jpeg_quality": (20, 95)}


def augment(images: torch.Tensor, g: torch.Generator, strength: float = 1.0, flip_p: float = 0.0,
            max_rotate_deg: float = 0.0, overlay_p: float = 0.0, border_p: float = 0.0, grayscale_p: float = 0.0,
            min_area: float | None = None, jpeg_quality: tuple[int, int] = (25, 95)) -> torch.Tensor:
    """images: (B, 3, S, S) float32 in [0, 1] -> one augmented view of each, same shape and range.

    strength scales the geometric and colour edits (1.0: crops down to 75 % of the area, shifts up
    to 8 % of the side, brightness/contrast/saturation/per-channel gain factors in [0.8, 1.2], down-up
    resize to 40 % of the side); JPEG quality is 25-95 on 70 % of views. flip_p: horizontal flips
    (SSCD uses them; off by default because a mirrored image is a different training sample for a
    diffusion model and the small embedder has capacity to spare for nothing). max_rotate_deg: small rotations;
    overlay_p: a 'text' overlay in a corner (`_overlay`). At their defaults (0) no extra random numbers are drawn,
    so the default views are unchanged. border_p: a solid frame (`_border`); grayscale_p: luminance only;
    min_area: the smallest crop (None: 1 - 0.25 strength); jpeg_quality: the re-encode's range (COPY_VIEWS: all).
    """
    x = _affine_crop(images, g, min_scale=1 - 0.25 * strength if min_area is None else min_area,
                     max_shift=0.08 * strength, flip_p=flip_p, max_rotate_deg=max_rotate_deg)
    if overlay_p > 0:
        x = _overlay(x, g, overlay_p)
    x = _colour(x, g, strength=0.2 * strength)
    if border_p > 0:
        x = _border(x, g, border_p)
    if grayscale_p > 0:
        x = _grayscale(x, g, grayscale_p)
    x = _down_up(x, g, p=0.5, min_factor=1 - 0.6 * strength)
    x = _blur_noise(x, g, p=0.2)
    return _jpeg(x, g, p=0.7, quality=tuple(jpeg_quality))
