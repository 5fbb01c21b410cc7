"""Second-stage verification of duplicate candidates: dense geometric alignment of two thumbnails.

The embedding finds candidates (neighbours at cosine in [neighbours.align_min_cosine, dup_threshold)); this decides
which are copies.
It replaces the pixel check's shift search (align.py) with the model copy-detection pipelines verify matches with, a
geometric transform fitted between the two images, made dense because the thumbnails are small (32 px: too few
keypoints for ORB or SIFT): for each pair it fits an affine map (rotation, scale, crop, border, shift) and a gain and
bias (colour, contrast, grayscale) that carry thumbnail b onto thumbnail a, by Gauss-Newton over every pixel at once,
coarse to fine, with robust weights so a burnt-in caption or a watermark does not pull the fit; b's mirror is tried
too (a flipped copy). The map is held to what a copy edit makes (project_to_copy: rotation <= 20 degrees, scales
0.8-1.3), and solid frames are cut off first (trim_frames). The pair's score is the share of a's variance the fitted
b explains, its worst TRIM of pixels left out (`_score`, a robust R^2): copies lose only what the edit destroyed (an
overlay, a filled corner), distinct look-alikes (two handwritten 3s, crops of one texture) keep more residual once
their best allowed transform is found. A flat crop with one edge fits any other under some such map: `detail`
measures how much a thumbnail has, and the scan verifies only pairs with enough (neighbours.verify_min_detail).

Everything is batched in torch over pairs (a GPU when one is there: `device`), bounded in memory by `block`, and
never searches: its cost is fixed per candidate pair (results/copydet.md measures it).

    score, flipped = verify_pairs(a, b, size=32)        # a, b: (P, 32*32*3) uint8 thumbnails (align.thumbnails)
    linked = (score >= cfg.verify_min_score) & (np.minimum(detail(a, 32), detail(b, 32)) >= cfg.verify_min_detail)
"""

from __future__ import annotations

import numpy as np

# Gauss-Newton schedule, coarse to fine: at half the side, blurred (COARSE_SIGMA px) then sharp, then at the full side
# blurred by FINE_SIGMA px (which also hides JPEG blocks and resampling). Blurred first, the fit converges from the
# identity for the rotations (<= 15 degrees) and crops (<= 25 %) copies carry.
COARSE_SIGMA, COARSE_ITERS = 1.0, 10
MID_ITERS = 5
FINE_SIGMA, FINE_ITERS = 0.7, 4
BORDER_MAX, BORDER_TOL = 0.2, 0.02  # solid frames up to 20 % of the side per edge are cut off first (trim_frames)
# the share of the overlap left out of the fit's score: a corner's overlay. On tuning seed 0, 15 % left whole distinct
# crops (a flat sky with a small object) explained, 5 % did not and kept overlays and rotations
TRIM = 0.05
MIN_OVERLAP = 0.5  # pairs whose fitted b covers less than this share of a are not copies (score 0)
# the transforms a copy may carry, from the edits' definitions (not fitted to data); the fit is held inside them at
# every step (project_to_copy). A crop of <= 25 % of the area zooms by <= 1.155 and moves the centre by <= 13 % of
# the side; a rotation is <= 15 degrees; a border is trimmed before the fit.
COPY_SCALE = (0.8, 1.3)
COPY_MAX_ROTATION_DEG = 20.0
COPY_MAX_SHEAR = 0.15
COPY_MAX_SHIFT = 0.35  # of the half side (normalized coordinates): 17.5 % of the side


def _gray(thumbs: np.ndarray, size: int):
    """(P, size*size*C) uint8 -> (P, 1, size, size) float32 luminance in [0, 1]."""
    import torch

    t = np.asarray(thumbs)
    if t.ndim != 2 or t.shape[1] % (size * size):
        raise ValueError(f"thumbnails must be (P, {size}*{size}*C) uint8 rows, got shape {t.shape}")
    c = t.shape[1] // (size * size)
    x = torch.from_numpy(t.reshape(len(t), size, size, c).astype(np.float32) / 255)
    if c == 3:
        x = x @ torch.tensor([0.299, 0.587, 0.114])
    else:
        x = x[..., 0]
    return x[:, None]


def trim_frames(x, max_frac: float = BORDER_MAX, tol: float = BORDER_TOL):
    """(P, 1, S, S) in [0, 1] -> the same with each image's solid frame cut off and the rest resized back to S.

    A frame is the outer rows and columns, up to max_frac of the side on each edge, that are flat (standard
    deviation <= tol) and of one colour with the outermost line (within 2 tol). Copy-detection pipelines strip
    borders the same way before matching: a 10 % frame shrinks the picture to 0.8 of the side, further than the
    alignment converges from the identity. Both images of a pair are trimmed alike, so a digit's white margin goes
    from the original and from its copy.
    """
    import torch
    import torch.nn.functional as F

    p, _, s, _ = x.shape
    m = max(0, int(s * max_frac))
    if m == 0:
        return x
    img = x[:, 0]
    out = torch.empty_like(x)

    def run(lines, ref):  # lines: (P, m, S) from the edge inwards; how many are flat and of the edge's colour
        flat = (lines.std(dim=2) <= tol) & ((lines.mean(dim=2) - ref[:, None]).abs() <= 2 * tol)
        return torch.cumprod(flat.to(torch.int64), dim=1).sum(1)

    top = run(img[:, :m, :], img[:, 0, :].mean(1))
    bottom = run(img[:, -m:, :].flip(1), img[:, -1, :].mean(1))
    left = run(img[:, :, :m].transpose(1, 2), img[:, :, 0].mean(1))
    right = run(img[:, :, -m:].flip(2).transpose(1, 2), img[:, :, -1].mean(1))
    # a frame (flat lines on all four sides): its inner edge lands mid-pixel in a thumbnail, so the line after the
    # flat ones mixes frame and picture and goes too
    frame = ((top > 0) & (bottom > 0) & (left > 0) & (right > 0)).long()
    top, bottom, left, right = ((v + frame).clamp(max=m) for v in (top, bottom, left, right))
    for i in range(p):
        t, b_, l_, r_ = int(top[i]), int(bottom[i]), int(left[i]), int(right[i])
        if t + b_ + l_ + r_ == 0:
            out[i] = x[i]
            continue
        inner = x[i:i + 1, :, t:s - b_, l_:s - r_]
        out[i] = F.interpolate(inner, size=(s, s), mode="bilinear", align_corners=False)[0]
    return out


def _blur(x, sigma: float):
    """Separable Gaussian blur of (P, C, S, S), reflect padding."""
    import torch
    import torch.nn.functional as F

    r = max(1, round(2.5 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.transpose(2, 3).expand(c, 1, -1, 1), groups=c)


def _standardize(x, eps: float = 0.02):
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True)
    return (x - mean) / (std + eps)


def _warp(img, th, s: int):
    import torch.nn.functional as F

    grid = F.affine_grid(th, [img.shape[0], img.shape[1], s, s], align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gauss_newton(a, b, theta, gain, bias, iters: int):
    """Refine (theta (P, 2, 3), gain (P,), bias (P,)) so that gain * b(theta x) + bias fits a, both (P, 1, s, s):
    Gauss-Newton over the 6 affine and 2 photometric parameters, with Cauchy weights (a region the copy does not
    share, an overlay or a filled corner, stops pulling), the map clamped to a copy's transforms."""
    import torch

    p, _, s, _ = a.shape
    dev, dt = a.device, a.dtype
    coords = (2 * torch.arange(s, device=dev, dtype=dt) + 1) / s - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    base = torch.stack([xx.reshape(-1), yy.reshape(-1), torch.ones(s * s, device=dev, dtype=dt)], 1)  # (N, 3)
    eye8 = torch.eye(8, device=dev, dtype=dt)
    # gradients of b per normalized coordinate (a pixel is 2 / s of them): central differences
    gx, gy = torch.zeros_like(b), torch.zeros_like(b)
    gx[..., 1:-1] = (b[..., 2:] - b[..., :-2]) * (s / 4)
    gy[..., 1:-1, :] = (b[..., 2:, :] - b[..., :-2, :]) * (s / 4)
    stack = torch.cat([b, gx, gy, torch.ones_like(b)], 1)
    ar = a.reshape(p, -1)
    for _ in range(iters):
        w = _warp(stack, theta, s).reshape(p, 4, -1)
        bw, wx, wy, valid = w[:, 0], w[:, 1], w[:, 2], (w[:, 3] > 0.999).to(dt)
        r = ar - (gain[:, None] * bw + bias[:, None])
        scale = (r.abs() * valid).sum(1) / valid.sum(1).clamp(min=1) + 0.05
        wt = valid / (1 + (r / (2 * scale[:, None])) ** 2)
        jac = torch.cat([(gain[:, None] * wx)[..., None] * base, (gain[:, None] * wy)[..., None] * base,
                         bw[..., None], torch.ones_like(bw)[..., None]], 2)  # (P, N, 8)
        jw = jac * wt[..., None]
        step = torch.linalg.solve(jw.transpose(1, 2) @ jac + 1e-3 * eye8, (jw * r[..., None]).sum(1))
        theta = theta + step[:, :6].reshape(p, 2, 3)
        gain = (gain + step[:, 6]).clamp(0.2, 5.0)
        bias = bias + step[:, 7]
        theta = project_to_copy(theta)
    return theta, gain, bias


def _rot(phi):
    import torch

    c, s_ = torch.cos(phi), torch.sin(phi)
    return torch.stack([torch.stack([c, -s_], -1), torch.stack([s_, c], -1)], -2)


def project_to_copy(theta):
    """The affine maps (P, 2, 3) held to those a copy edit can make: the rotation angle to +-COPY_MAX_ROTATION_DEG,
    the rest (scales on the diagonal, shear off it) to COPY_SCALE and +-COPY_MAX_SHEAR, the shift to +-COPY_MAX_SHIFT.
    The fit then never explains b by a turn or a zoom no edit makes (two arcs of the retina's rim match each other
    under a 40 degree turn)."""
    import torch

    lin = theta[:, :, :2]
    phi = torch.atan2(lin[:, 1, 0] - lin[:, 0, 1], lin[:, 0, 0] + lin[:, 1, 1])
    m = _rot(-phi) @ lin  # rotation removed: scales on the diagonal, shear off it
    lim = torch.deg2rad(torch.tensor(COPY_MAX_ROTATION_DEG, dtype=theta.dtype, device=theta.device))
    diag = torch.diagonal(m, dim1=1, dim2=2).clamp(*COPY_SCALE)
    off = m.clamp(-COPY_MAX_SHEAR, COPY_MAX_SHEAR)
    m = torch.diag_embed(diag) + off * (1 - torch.eye(2, dtype=theta.dtype, device=theta.device))
    lin = _rot(phi.clamp(-lim, lim)) @ m
    return torch.cat([lin, theta[:, :, 2:].clamp(-COPY_MAX_SHIFT, COPY_MAX_SHIFT)], 2)


def _score(a, b, theta):
    """(P,) share of a's variance over the overlap that b, mapped by theta with its best gain and bias, explains,
    the worst TRIM of the pixels left out (0 where the overlap is below MIN_OVERLAP); a, b: (P, 1, s, s)."""
    import torch

    p, _, s, _ = a.shape
    w = _warp(torch.cat([b, torch.ones_like(b)], 1), theta, s).reshape(p, 2, -1)
    bw, valid = w[:, 0], w[:, 1] > 0.999
    ar = a.reshape(p, -1)
    vf = valid.to(a.dtype)
    n = vf.sum(1).clamp(min=1)
    ma, mb = (ar * vf).sum(1) / n, (bw * vf).sum(1) / n
    da, db = (ar - ma[:, None]) * vf, (bw - mb[:, None]) * vf
    g = (da * db).sum(1) / db.pow(2).sum(1).clamp(min=1e-6)
    res = (da - g[:, None] * db).pow(2).masked_fill(~valid, float("inf"))
    keep = (n * (1 - TRIM)).long().clamp(min=1)
    srt = torch.nan_to_num(torch.sort(res, dim=1).values, posinf=0.0)
    sse = torch.cumsum(srt, 1).gather(1, (keep - 1)[:, None])[:, 0]
    sst = da.pow(2).sum(1) / n * keep
    explained = (1 - sse / sst.clamp(min=1e-6)).clamp(min=0)
    overlap = vf.mean(1)
    return torch.where(overlap >= MIN_OVERLAP, explained, torch.zeros_like(explained))


def _fit(a, b, mirror: bool):
    """a, b: (P, 1, S, S) standardized. Coarse fits at S/2 (b and, with mirror, its mirror), the better one refined
    at S, scored on the lightly blurred images. Returns (score (P,), mirrored (P,) bool)."""
    import torch
    import torch.nn.functional as F

    p = a.shape[0]
    dev, dt = a.device, a.dtype
    half = lambda x: F.avg_pool2d(x, 2)
    a2 = _blur(half(a), COARSE_SIGMA)
    cands = [b, b.flip(-1)] if mirror else [b]
    fits = []
    for bb in cands:
        theta = torch.eye(2, 3, device=dev, dtype=dt).repeat(p, 1, 1)
        gain, bias = torch.ones(p, device=dev, dtype=dt), torch.zeros(p, device=dev, dtype=dt)
        theta, gain, bias = _gauss_newton(a2, _blur(half(bb), COARSE_SIGMA), theta, gain, bias, COARSE_ITERS)
        theta, gain, bias = _gauss_newton(half(a), half(bb), theta, gain, bias, MID_ITERS)
        fits.append((theta, gain, bias, _score(half(a), half(bb), theta)))
    mirrored = fits[1][3] > fits[0][3] if mirror else torch.zeros(p, dtype=torch.bool, device=dev)
    theta, gain, bias = (torch.where(mirrored[:, None, None], fits[1][0], fits[0][0]) if mirror else fits[0][0],
                         torch.where(mirrored, fits[1][1], fits[0][1]) if mirror else fits[0][1],
                         torch.where(mirrored, fits[1][2], fits[0][2]) if mirror else fits[0][2])
    bb = torch.where(mirrored[:, None, None, None], b.flip(-1), b) if mirror else b
    af, bf = _blur(a, FINE_SIGMA), _blur(bb, FINE_SIGMA)
    theta, gain, bias = _gauss_newton(af, bf, theta, gain, bias, FINE_ITERS)
    return _score(af, bf, theta), mirrored


def detail(thumbs: np.ndarray, size: int) -> np.ndarray:
    """(P,) float32: each thumbnail's fine detail, the RMSE (luminance in [0, 1]) between it and its Gaussian blur of
    1 px. A flat crop with one edge or blob (sky with a branch, the retina's rim) has little, and under some affine map
    it fits any other such crop as well as its copy would: the verifier's score is no evidence there
    (neighbours.verify_min_detail)."""
    import torch

    g = _gray(np.asarray(thumbs), size)
    with torch.inference_mode():
        return (g - _blur(g, 1.0)).reshape(len(g), -1).std(1).numpy().astype(np.float32)


def verify_pairs(a: np.ndarray, b: np.ndarray, size: int, block: int = 1024, device: str = "cpu",
                 mirror: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Score thumbnail pairs: (P,) float32 share of a's variance that b explains after the best affine + gain/bias
    fit, its worst TRIM of pixels left out (in [0, 1]; 0 where b covers less than MIN_OVERLAP of a), and (P,) bool:
    the mirror of b fitted better.

    a, b: (P, size*size*C) uint8 rows (align.thumbnails), C 1 or 3. block: pairs fitted at once (memory: about
    250 MB per 1,024 pairs of 32 px, measured; it grows with block x size^2). mirror: also fit b's horizontal mirror
    (a flipped copy), at most twice the cost. device: a torch device, or "auto" (CUDA where there is one).
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    score = np.zeros(len(a), np.float32)
    flipped = np.zeros(len(a), bool)
    with torch.inference_mode():
        for s0 in range(0, len(a), block):
            ta = _standardize(trim_frames(_gray(a[s0:s0 + block], size))).to(device)
            tb = _standardize(trim_frames(_gray(b[s0:s0 + block], size))).to(device)
            best, flip = _fit(ta, tb, mirror)
            score[s0:s0 + block] = best.cpu().numpy()
            flipped[s0:s0 + block] = flip.cpu().numpy()
    return score, flipped
