"""open_clip image embeddings: load a model by name + local checkpoint, embed uint8 image batches.

    emb = load_embedder(cfg.neighbours)          # safe checkpoint checks first (checkpoint.py)
    vecs = emb.embed(images)                     # (B, S, S, 3) uint8 -> (B, d) float32, unit norm

Images are resized (bilinear, antialiased) to the model's own input size and normalized with the
mean/std the checkpoint's preprocess config names, so any open_clip vision tower works unchanged;
memscan's own embedder (train_embedder.py) records in its config that it wants a low-pass and a
per-image standardization instead. A GPU is used when torch sees one.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from scanner.neighbours.checkpoint import check_checkpoint, checkpoint_digest

# Small vision towers that train on a 2-core CPU in minutes (train_embedder.py). Full open_clip model
# configs, so create_model builds them like any built-in; the text tower is a 1-layer stub that is
# never used but keeps the checkpoint a standard open_clip CLIP state dict.
_TEXT_STUB = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
ARCHITECTURES = {
    # open_clip's ModifiedResNet, one bottleneck per stage, base width 16 (1.4 M vision parameters):
    # the default. On the demo corpus it beats the ViT below at equal time (a CNN's locality suits
    # 32-64 px copies): pair precision 0.998 / recall 0.996 vs 0.82 / 0.996 at cosine 0.95 (demo corpus,
    # 32 px, ~2 min of training each: 600 steps here, 300 for the slower ViT).
    "memscan-copydet-rn16": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
        "text_cfg": _TEXT_STUB,
    },
    # A small ViT (8x8 patches, 4 blocks of width 128, 0.6 M vision parameters), kept for comparison.
    "memscan-copydet-vit-t8": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "mlp_ratio": 2.0,
                       "patch_size": 8},
        "text_cfg": _TEXT_STUB,
    },
}
DEFAULT_ARCH = "memscan-copydet-rn16"
_registered: set[str] = set()


def register_architectures() -> None:
    """Make ARCHITECTURES known to open_clip by name (open_clip reads model configs from json files)."""
    import open_clip

    todo = {k: v for k, v in ARCHITECTURES.items() if k not in _registered}
    if not todo:
        return
    # open_clip reads the files into its registry at once, so the folder goes away after (one was left in
    # /tmp by every process before)
    with tempfile.TemporaryDirectory(prefix="memscan_open_clip_cfg_") as d:
        for name, cfg in todo.items():
            (Path(d) / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(d)
    _registered.update(todo)


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def standardize_per_image(x, eps: float = 0.02):
    """x: (B, 3, S, S) in [0, 1] -> each image and channel shifted to mean 0 and scaled to std 1.

    A brightness change or a colour cast (a per-channel gain) then leaves the input unchanged
    exactly, so the embedder spends no capacity learning that invariance. eps (~5/255) keeps flat
    images from amplifying JPEG noise.
    """
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True)
    return (x - mean) / (std + eps)


def lowpass(x, factor: float):
    """x: (B, C, S, S) -> the same size after an antialiased resize to factor * S and back.

    With factor 0.5 a down-up resized copy (a common edit) and JPEG's 8x8 block artefacts leave
    the input almost unchanged, so the embedder sees past them structurally.
    """
    import torch.nn.functional as F

    if factor >= 1.0:
        return x
    s = x.shape[-1]
    small = F.interpolate(x, size=max(4, round(s * factor)), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=s, mode="bilinear", align_corners=False)


def flip_pool(encode, x):
    """encode: (B, 3, S, S) -> (B, d); x: (B, 3, S, S) -> (B, d) unit rows of encode(x) + encode(mirror of x).

    Both views go through one batch; float addition commutes exactly, so an image and its mirror get the same
    floats up to the encoder's own batch-position noise (about 1e-7).
    """
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    z = encode(torch.cat([x, x.flip(-1)]))
    return F.normalize(z[:b] + z[b:], dim=-1)


class Embedder:
    """Wraps an open_clip model's image tower. `dim` is the embedding size; `image_size` its input side.

    input_norm: 'dataset' (the checkpoint's mean/std, as for any CLIP) or 'per_image'
    (standardize_per_image; memscan's own embedder, recorded in its open_clip_config.json).
    input_lowpass: < 1 applies lowpass(x, input_lowpass) first (memscan's embedder records it too).
    flip_invariant: embed each image and its horizontal mirror and pool them (`flip_pool`): an image and its mirror
    get the same vector by construction, whatever the weights (issue #34: no trained embedder found flips at pair
    precision >= 0.99). Costs a second forward per image.
    """

    def __init__(self, model, name: str, source: str, device: str = "cpu", batch_size: int = 64,
                 input_norm: str = "dataset", input_lowpass: float = 1.0, flip_invariant: bool = False):
        import torch

        self.model = model.eval().to(device)
        self.name, self.source, self.device, self.batch_size = name, source, device, batch_size
        if input_norm not in ("dataset", "per_image"):
            raise ValueError(f"input_norm must be 'dataset' or 'per_image', got {input_norm!r}")
        self.input_norm, self.input_lowpass = input_norm, float(input_lowpass)
        self.flip_invariant = bool(flip_invariant)
        self.fingerprint = "unknown"  # load_embedder sets a hash of the weights and input transforms
        visual = model.visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        pp = getattr(visual, "preprocess_cfg", {}) or {}
        mean = pp.get("mean", getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
        std = pp.get("std", getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.image_size, self.image_size, device=device)
            self.dim = int(self.model.encode_image(probe).shape[-1])

    def preprocess(self, images: np.ndarray):
        """(B, H, W, 3) uint8 -> (B, 3, S, S) float32 normalized tensor on the model's device."""
        import torch
        import torch.nn.functional as F

        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
            raise ValueError(f"images must be (B, H, W, 3) uint8, got shape {images.shape} dtype {images.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale corpora: the tower expects RGB
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        x = lowpass(x, self.input_lowpass)
        if self.input_norm == "per_image":
            return standardize_per_image(x)
        return (x - self._mean) / self._std

    def embed(self, images: np.ndarray) -> np.ndarray:
        """images: (B, H, W, 3) uint8 -> (B, dim) float32, L2-normalized rows (cosine = inner product)."""
        import torch

        out = np.empty((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                x = self.preprocess(images[i:i + self.batch_size])
                if self.flip_invariant:
                    z = flip_pool(lambda v: self.model.encode_image(v), x)
                else:
                    z = self.model.encode_image(x, normalize=True)
                out[i:i + len(x)] = z.float().cpu().numpy()
        return out


def load_embedder(cfg, device: str = "auto") -> Embedder:
    """Build the embedder a NeighboursConfig names.

    cfg.clip_checkpoint is required: either a weights file (safetensors; a pickle only with
    cfg.allow_pickle) loaded into the architecture cfg.clip_model, or an open_clip local directory
    (what `memscan train-embedder` writes; its own config names the architecture, cfg.clip_model is
    then ignored). Random weights are refused: they do not separate copies from distinct images.
    """
    import open_clip

    if not cfg.clip_checkpoint:
        raise ValueError("neighbours.clip_checkpoint is not set; a randomly initialised open_clip model cannot tell "
                         "copies from distinct images. Train one with `memscan train-embedder --shards ... --out DIR` "
                         "and set neighbours.clip_checkpoint: DIR, or pass a local CLIP/SSCD safetensors file")
    info = check_checkpoint(cfg.clip_checkpoint, allow_pickle=cfg.allow_pickle)
    register_architectures()
    # weights_only=False only when the user said the pickle is trusted: OpenAI-style archives need it.
    weights_only = not (info["format"] == "pickle" and cfg.allow_pickle)
    record = info["config"].get("memscan", {}) if info["kind"] == "dir" else {}
    input_norm, input_lowpass = record.get("input_norm", "dataset"), record.get("input_lowpass", 1.0)
    if info["kind"] == "dir":
        name = record.get("architecture", "local-dir")
        model = open_clip.create_model("local-dir:" + info["path"], weights_only=weights_only)
    else:
        name = cfg.clip_model
        if name not in open_clip.list_models():
            raise ValueError(f"neighbours.clip_model {name!r} is not an open_clip architecture; known: "
                             f"{', '.join(open_clip.list_models()[:12])}, ... (open_clip.list_models())")
        model = open_clip.create_model(name, pretrained=info["path"], weights_only=weights_only)
    flip = bool(getattr(cfg, "flip_invariant", False))
    emb = Embedder(model, name=name, source=info["path"], device=pick_device(device), batch_size=cfg.batch_size,
                   input_norm=input_norm, input_lowpass=input_lowpass, flip_invariant=flip)
    emb.fingerprint = _fingerprint(info, name, input_norm, input_lowpass, flip)
    return emb


def _fingerprint(info: dict, name: str, input_norm: str, input_lowpass: float, flip: bool = False) -> str:
    """16 hex digits identifying the weights and the input transforms: stored embeddings are keyed by it,
    so a different checkpoint never reuses another one's vectors."""
    import hashlib

    tail = "|flip" if flip else ""  # without flip pooling: the digest of every checkpoint before it, unchanged
    return hashlib.sha256(f"{name}|{input_norm}|{input_lowpass}|{checkpoint_digest(info['path'])}{tail}".encode()
                          ).hexdigest()[:16]
