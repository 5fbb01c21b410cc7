"""`memscan train-embedder`: a self-supervised copy-detection embedder trained on the corpus itself.

No pretrained weights can be downloaded here, and a random open_clip tower cannot tell a copy from
a different image. So we train a small open_clip vision tower SSCD / SimCLR style: two augmented
views of each image (augment.py: crop, shift, colour, down-up resize, blur/noise, JPEG) are pulled
together by InfoNCE, every other image in the batch is pushed apart, and a KoLeo entropy term
spreads the embeddings over the sphere (SSCD, Pizzi et al. 2022) so distinct images do not crowd
into a high-cosine cluster. Byte-identical copies are dropped first: two copies of one image in a
batch would be "negatives" the model cannot separate.

Two fixed input transforms do part of the work structurally, so the small network need not learn
it (embed.py applies the same ones at embedding time): each image is standardized per channel
(brightness and colour casts vanish) and low-passed by a down-up resize to half size (down-up
resized copies and JPEG block artefacts nearly vanish).

Saved as an open_clip local directory, the layout and loading path (`create_model("local-dir:DIR")`)
a downloaded checkpoint uses:

    DIR/open_clip_config.json   {"model_cfg": ..., "preprocess_cfg": ..., "memscan": {recipe, timings, calibration}}
    DIR/open_clip_model.safetensors
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from scanner.neighbours.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from scanner.neighbours.embed import (
    ARCHITECTURES,
    DEFAULT_ARCH,
    flip_pool,
    lowpass,
    register_architectures,
    standardize_per_image,
)
from scanner.storage import write_json

LOG = logging.getLogger("memscan")

INPUT_LOWPASS = 0.5


def info_nce(z1, z2, temperature: float):
    """Symmetric NT-Xent over 2B unit vectors: each view's positive is its other view. z*: (B, d)."""
    import torch
    import torch.nn.functional as F

    z = torch.cat([z1, z2])
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    b = z1.shape[0]
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    return F.cross_entropy(sim, target)


def koleo(z, eps: float = 1e-8):
    """Kozachenko-Leonenko entropy loss: -mean log distance to the nearest other vector. z: (B, d) unit rows."""
    import torch

    with torch.no_grad():
        sim = z @ z.T
        sim.fill_diagonal_(-2.0)
        nn = sim.argmax(dim=1)
    return -torch.log((z - z[nn]).norm(dim=1) + eps).mean()


def _embed(visual, x, lowpass_factor: float, flip_invariant: bool = False):
    """x: (B, 3, S, S) in [0, 1] -> (B, d) unit rows, through the same input transforms Embedder applies (and its
    flip pooling, embed.flip_pool, when flip_invariant)."""
    import torch.nn.functional as F

    x = standardize_per_image(lowpass(x, lowpass_factor))
    if flip_invariant:
        return flip_pool(visual, x)
    return F.normalize(visual(x), dim=-1)


def train_on_images(images: np.ndarray, steps: int, arch: str = DEFAULT_ARCH, batch_size: int = 128,
                    lr: float = 2e-3, temperature: float = 0.05, koleo_weight: float = 0.1, aug_strength: float = 1.0,
                    input_lowpass: float = INPUT_LOWPASS, seed: int = 0, time_budget_s: float | None = None,
                    log=LOG.info, edits: dict | None = None, flip_invariant: bool = False, threads: int | None = None):
    """Train a fresh `arch` CLIP's vision tower on images: (N, S, S, 3) uint8, S = the tower's input side.

    Returns (model, record): record holds the recipe, steps done, seconds, the last losses and a
    calibration of cosine similarities on held-in images (see calibrate()). edits: extra augment() keywords
    (flip_p, max_rotate_deg, overlay_p, border_p, ...; augment.COPY_VIEWS) for the training views; None: the views
    of the per-corpus embedder. flip_invariant: the loss sees flip-pooled embeddings (embed.flip_pool), as the scan
    will embed with neighbours.flip_invariant. threads: torch threads (None: torch's default).
    """
    import open_clip
    import torch

    from scanner.neighbours.augment import augment

    register_architectures()
    if threads:
        torch.set_num_threads(threads)
    n, s = images.shape[0], images.shape[1]
    if n < 2:
        raise ValueError(f"train-embedder needs at least 2 distinct images, got {n}")
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, force_image_size=s)
    visual = model.visual.train()
    opt = torch.optim.AdamW(visual.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 10)

    def lr_at(step):  # linear warmup, cosine decay
        return lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

    g = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(images).permute(0, 3, 1, 2)
    bs = min(batch_size, n)
    t0, step, order, pos = time.time(), 0, torch.randperm(n, generator=g), 0
    loss_nce = loss_ko = float("nan")
    while step < steps:
        if time_budget_s is not None and time.time() - t0 > time_budget_s:
            log(f"train-embedder: time budget {time_budget_s:.0f}s reached after {step} steps")
            break
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=g), 0
        x = data[order[pos:pos + bs]].float() / 255.0
        pos += bs
        views = [augment(x, g, aug_strength, **(edits or {})) for _ in range(2)]
        z = _embed(visual, torch.cat(views), input_lowpass, flip_invariant)
        l_nce = info_nce(z[:bs], z[bs:], temperature)
        l_ko = koleo(z[:bs]) if koleo_weight > 0 else torch.zeros(())
        loss = l_nce + koleo_weight * l_ko
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_nce, loss_ko = l_nce.item(), l_ko.item()
        step += 1
        if step % 100 == 0 or step == steps:
            log(f"train-embedder: step {step}/{steps} infonce {loss_nce:.3f} koleo {loss_ko:.3f} "
                f"({time.time() - t0:.0f}s)")
    model.eval()
    record = {"steps": step, "seconds": round(time.time() - t0, 1), "batch_size": bs, "lr": lr,
              "temperature": temperature, "koleo_weight": koleo_weight, "aug_strength": aug_strength,
              "input_lowpass": input_lowpass, "seed": seed, "images": n, "final_infonce": round(loss_nce, 4),
              **({"edits": {k: list(v) if isinstance(v, tuple) else v for k, v in edits.items()}} if edits else {}),
              **({"flip_invariant": True} if flip_invariant else {}),
              "final_koleo": round(loss_ko, 4)}
    record["calibration"] = calibrate(visual, data, input_lowpass, aug_strength, seed, flip_invariant=flip_invariant)
    return model, record


def calibrate(visual, data, input_lowpass: float, aug_strength: float, seed: int, n: int = 512,
              flip_invariant: bool = False) -> dict:
    """Cosine of held-in images to a fresh augmented copy (copies) and to their most similar other
    image (distinct, an upper bound: the corpus itself may hold unplanted copies); percentiles.

    A threshold between copies' low percentiles and distinct images' high ones separates them; the
    record is informational (neighbours.dup_threshold decides).
    """
    import torch

    from scanner.neighbours.augment import augment

    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randperm(len(data), generator=g)[:n]
    with torch.no_grad():
        x = data[idx].float() / 255.0
        a = _embed(visual, x, input_lowpass, flip_invariant)
        b = _embed(visual, augment(x, g, aug_strength), input_lowpass, flip_invariant)
        copies = (a * b).sum(1).numpy()
        sim = (a @ a.T).fill_diagonal_(-1.0)
        distinct = sim.max(1).values.numpy()
    pct = (1, 5, 50, 95, 99)
    return {"copies_cos_pct": dict(zip(map(str, pct), np.percentile(copies, pct).round(4).tolist())),
            "distinct_max_cos_pct": dict(zip(map(str, pct), np.percentile(distinct, pct).round(4).tolist())),
            "images": len(idx)}


def save_embedder(model, arch: str, image_size: int, out_dir: str | Path, record: dict | None = None,
                  text_vocab: int | None = None) -> Path:
    """Write an open_clip local directory for `model` (a CLIP of architecture `arch`); each file atomically.

    text_vocab: save the never-used text stub with this vocabulary instead (its token table is 49,408 x 64
    floats, 12.6 MB, of a 19 MB checkpoint: the shipped embedder keeps 16 rows, and its file stays a few MB)."""
    import open_clip
    from safetensors.torch import save_file

    record = dict(record or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = json.loads(json.dumps(ARCHITECTURES[arch]))
    model_cfg["vision_cfg"]["image_size"] = image_size
    if text_vocab:
        model_cfg["text_cfg"]["vocab_size"] = int(text_vocab)
        small = open_clip.CLIP(**model_cfg)
        small.visual.load_state_dict(model.visual.state_dict())
        model = small
    config = {
        "model_cfg": model_cfg,
        # open_clip's own transforms would use these; memscan's Embedder reads input_norm below instead
        "preprocess_cfg": {"size": image_size, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                           "interpolation": "bilinear", "resize_mode": "squash"},
        "memscan": {"architecture": arch, "image_size": image_size, "input_norm": "per_image",
                    "input_lowpass": record.pop("input_lowpass", 1.0), **record},
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, out / WEIGHTS_NAME)
    write_json(config, out / CONFIG_NAME)  # last: its presence marks a complete checkpoint
    return out


def unique_by_bytes(images: np.ndarray, raw_hashes: list[str]) -> np.ndarray:
    """Keep the first image of each raw-byte hash."""
    seen, keep = set(), []
    for i, h in enumerate(raw_hashes):
        if h not in seen:
            seen.add(h)
            keep.append(i)
    return images[keep]


def training_sample(shards, size: int, max_images: int, seed: int = 0) -> tuple[np.ndarray, list[str], int, int]:
    """At most `max_images` distinct images (by raw bytes) at `size` px, from as few shards as hold them.

    Shards are read in a seeded random order until max_images distinct images are in hand, so memory is
    bounded by max_images, not by the corpus, and the same seed gives the same sample. The images come back
    in corpus order (shard, then position), and when they are more than max_images a seeded subset is kept:
    a corpus that fits whole gives exactly the images (and order) of decoding every shard.
    Returns (images (N, size, size, 3) uint8, the sha1 of every readable sample's bytes in the shards read,
    shards read, shards in all).
    """
    from scanner.data.load import load_shard_images
    from scanner.data.shards import expand_shards

    paths = expand_shards(shards)  # the driver's ShardList comes back as it is: no second listing of the store
    order = np.random.default_rng(seed).permutation(len(paths))
    picked: dict[int, tuple[np.ndarray, list[str]]] = {}
    distinct: set[str] = set()
    for i in order:
        _, images, _, hashes = load_shard_images([paths[i]], size, channels=3)
        picked[int(i)] = (images, hashes)
        distinct.update(hashes)
        if len(distinct) >= max_images:
            break
    parts = [picked[i] for i in sorted(picked)]  # corpus order
    hashes = [h for _, hs in parts for h in hs]
    images = unique_by_bytes(np.concatenate([im for im, _ in parts]) if parts else np.zeros((0, size, size, 3),
                                                                                             np.uint8), hashes)
    if len(images) > max_images:
        idx = np.sort(np.random.default_rng(seed).choice(len(images), max_images, replace=False))
        images = images[idx]
    return images, hashes, len(picked), len(paths)


def train_embedder(shards, out_dir, cfg, steps: int | None = None, seed: int = 0, time_budget_s: float | None = None,
                   max_images: int | None = None, arch: str | None = None, log=LOG.info, edits: dict | None = None,
                   flip_invariant: bool | None = None) -> Path:
    """Train the copy-detection embedder on the images in `shards` and save it to out_dir.

    cfg: a NeighboursConfig; cfg.image_size is the training and embedding side; cfg.clip_model is
    used when it names one of ARCHITECTURES (else the default). steps / max_images: None takes
    cfg.train_steps / cfg.embedder_max_images. At most max_images distinct images (a seeded sample,
    training_sample) are used: a copy detector needs variety, not the whole corpus.
    flip_invariant: train on flip-pooled embeddings (None: cfg.flip_invariant, as the scan will embed).
    Returns out_dir, loadable by load_embedder with neighbours.clip_checkpoint = out_dir.
    """
    if flip_invariant is None:
        flip_invariant = bool(getattr(cfg, "flip_invariant", False))
    arch = arch or (cfg.clip_model if cfg.clip_model in ARCHITECTURES else DEFAULT_ARCH)
    steps = cfg.train_steps if steps is None else steps
    max_images = cfg.embedder_max_images if max_images is None else max_images
    images, raw_hashes, read, total = training_sample(shards, cfg.image_size, max_images, seed)
    log(f"train-embedder: {len(images)} distinct images at {cfg.image_size}px from {read} of {total} shards, "
        f"arch {arch}, {steps} steps")
    model, record = train_on_images(images, arch=arch, steps=steps, seed=seed, time_budget_s=time_budget_s, log=log,
                                    edits=edits, flip_invariant=flip_invariant)
    record["corpus_digest"] = hashlib.sha256("".join(sorted(raw_hashes)).encode()).hexdigest()[:16]
    return save_embedder(model, arch, cfg.image_size, out_dir, record)
