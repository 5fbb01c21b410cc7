"""The demo corpus: img2dataset-style webdataset shards built offline, with planted ground truth.

Images come from data shipped inside scikit-learn / scikit-image (environment.md): handwritten
digits, LFW faces and random crops of ~20 photos, resized to `size`. On top of the unique images
the builder plants what memscan must find (docs/outputs.md, docs/method.md §8):

- exact_dup: groups of 2-3 byte-identical JPEGs under different keys,
- near_dup: an original plus 1-3 variants (low-quality re-encode, 1-2 px shift, colour change,
  down-up resize),
- repeated: images with >= 20 copies each (exact and light variants): data-driven memorization,
- oversampled: images present once that the demo trainer draws far more often: overfitting-driven,
- corrupt: undecodable image bytes (garbage, truncated JPEG, empty member),
- no_caption: a good image without a .txt member,

and truncates the last shard mid-member. `truth.parquet` has one row per written sample:
key, group_id (nullable), planted, copies, readable (False when the truncation cut it off), shard, edit (group
members: "copy" for the base image's own bytes, else the near-duplicate edit: jpeg, shift, color, resize),
caption_kind (repeated groups of a captions="unique" corpus: "verbatim" = one caption for every copy, "varied";
else null).
The same seed gives byte-identical shards.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from scanner.storage import atomic_write_parquet, write_json

# held-out images (non-members) for the detector's cut: the 1 % quantile of 500 applies a false-positive rate anywhere
# in 0.33-2.32 % (95 %), of 2,000 in 0.61-1.54 % (scanner.corpus.calibrate.cut_fpr_interval, benchmarks/results/cut.md)
HELDOUT_IMAGES = 2000
PLANTED = ("unique", "exact_dup", "near_dup", "repeated", "oversampled", "corrupt", "no_caption", "dose")

# Photos shipped with scikit-image / scikit-learn that load offline, and what they show (for captions).
_PHOTOS = {
    "astronaut": "an astronaut", "chelsea": "a cat", "coffee": "a cup of coffee", "rocket": "a rocket",
    "hubble_deep_field": "galaxies in deep space", "retina": "a retina scan",
    "immunohistochemistry": "a stained tissue sample", "colorwheel": "a colour wheel",
    "camera": "a man with a camera", "coins": "old coins", "moon": "the surface of the moon",
    "page": "a page of text", "text": "printed text", "clock": "a clock", "cell": "a cell under a microscope",
    "grass": "grass", "gravel": "gravel", "brick": "a brick wall",
    "china": "a temple in China", "flower": "a flower",
}
_CAPTIONS = {
    "digit": ["a handwritten digit {}", "the number {}, handwritten", "a scanned handwritten {}",
              "handwritten digit {} in black and white"],
    "face": ["a face photo", "a portrait of a person", "a grayscale photo of a face", "a close-up of a face"],
    "photo": ["a photo crop of {}", "close-up of {}", "detail of {}", "{}, cropped"],
}
_JPEG_QUALITY = 95
_MIN_CROP_STD = 12.0  # flat crops (sky, black retina border) would look alike: unplanted duplicates
_MAX_CROP_IOU = 0.3  # crops of one photo overlapping more than this would be unplanted near-duplicates
# Featureless crops (the colour wheel's smooth gradients, clear sky) pass the std screen but look alike at any
# position and scale: in the seed-0 demo before this screen 25 of the 36 crops in wrongly grouped duplicate pairs had
# less detail than this, against 7.9 % of all crops (benchmarks/results/crops.md). Detail: RMSE in [0, 1] of the
# size x size crop minus its Gaussian blur (1 px).
_MIN_CROP_DETAIL = 0.005


@dataclass
class DemoCorpus:
    """What `build_demo_corpus` wrote."""

    out_dir: Path
    shards: list[Path]
    truth: Path  # truth.parquet
    manifest: Path  # demo_corpus.json
    counts: dict[str, int]  # samples per planted class (all written samples)
    n_samples: int
    n_readable: int
    truncated_shard: str | None = None  # shard name ("00005") or None
    params: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# image sources


@dataclass
class _Base:
    image: np.ndarray  # (size, size, 3) uint8
    kind: str  # digit | face | photo
    label: str  # digit value, or what the photo shows
    source: str  # where it came from, like img2dataset's url


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 -> (size, size, 3) uint8."""
    pil = Image.fromarray(img).convert("RGB")
    return np.asarray(pil.resize((size, size), Image.Resampling.LANCZOS))


@functools.lru_cache(maxsize=1)
def _load_photos() -> dict[str, np.ndarray]:
    """name -> (H, W[, 3]) uint8; cached because decoding them is most of a small build's time."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {}
    for name in _PHOTOS:
        if name in ("china", "flower"):
            continue
        photos[name] = np.asarray(getattr(skimage.data, name)())
    for fname, img in zip(load_sample_images().filenames, load_sample_images().images):
        photos[Path(fname).stem] = img
    return photos


class _Distinct:
    """Greedy filter keeping base images pairwise distinct at low resolution.

    Sky, blurred backgrounds, the retina's flat fundus and a few repeated LFW faces give pairs that
    look identical once small: unplanted near-duplicates that would blur the planted truth. A
    candidate is refused when its 8x8 RMSE (in [0, 1]) to an accepted image is below `min_rmse`.
    """

    def __init__(self, capacity: int, min_rmse: float = 0.05):
        self.feats = np.zeros((capacity, 8 * 8 * 3), dtype=np.float32)
        self.n, self.min_rmse = 0, min_rmse
        self.boxes: dict[str, list[tuple[int, int, int]]] = {}  # photo crops taken so far (_photo_crops)

    def accept(self, img: np.ndarray) -> bool:
        f = np.asarray(Image.fromarray(img).resize((8, 8), Image.Resampling.BOX), dtype=np.float32).ravel() / 255
        if self.n and np.sqrt(((self.feats[:self.n] - f) ** 2).mean(1).min()) < self.min_rmse:
            return False
        self.feats[self.n] = f
        self.n += 1
        return True


def _photo_crops(n: int, size: int, rng: np.random.Generator, distinct: _Distinct) -> list[_Base]:
    """n random square crops, spread over the photos in proportion to their area, mostly non-overlapping, none
    flat (_MIN_CROP_STD) or featureless (_MIN_CROP_DETAIL)."""
    photos = _load_photos()
    names = sorted(photos)
    areas = np.array([photos[k].shape[0] * photos[k].shape[1] for k in names], dtype=float)
    boxes = distinct.boxes
    for k in names:
        boxes.setdefault(k, [])
    out: list[_Base] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"could not find {n} distinct photo crops (found {len(out)}); lower n_unique")
        name = names[rng.choice(len(names), p=areas / areas.sum())]
        img = photos[name]
        h, w = img.shape[:2]
        # crops of at least `size` px up to 64 px; larger images (the 96 px copy corpus) may upscale a 64 px crop,
        # or the ~20 photos hold too few crops that overlap little (identical draws at size <= 64)
        lo = min(size, 64)
        side = int(rng.integers(max(lo, min(h, w) // 16), max(lo + 1, size + 1, min(h, w) // 4)))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = img[y:y + side, x:x + side]
        if crop.std() < _MIN_CROP_STD or any(_iou((y, x, side), b) > _MAX_CROP_IOU for b in boxes[name]):
            continue
        small = _resize(crop, size)
        if _detail(small) < _MIN_CROP_DETAIL or not distinct.accept(small):
            continue
        boxes[name].append((y, x, side))
        out.append(_Base(small, "photo", _PHOTOS[name], f"skimage:{name}[{y}:{y + side},{x}:{x + side}]"))
    return out


def _detail(img: np.ndarray) -> float:
    """Fine detail of an (H, W, 3) uint8 image: RMSE in [0, 1] between it and its Gaussian blur (sigma 1 px)."""
    from scipy.ndimage import gaussian_filter

    x = img.astype(np.float32) / 255
    return float(np.sqrt(((x - gaussian_filter(x, (1, 1, 0))) ** 2).mean()))


def _iou(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    (ya, xa, sa), (yb, xb, sb) = a, b
    ih = max(0, min(ya + sa, yb + sb) - max(ya, yb))
    iw = max(0, min(xa + sa, xb + sb) - max(xa, xb))
    inter = ih * iw
    return inter / (sa * sa + sb * sb - inter)


def _image_pool(n: int, size: int, rng: np.random.Generator, distinct: _Distinct | None = None) -> list[_Base]:
    """n distinct base images, shuffled: ~30 % digits, up to 10 % faces, the rest photo crops. distinct: a filter
    that already holds other images (and photo boxes) the new ones must differ from (None: a fresh one)."""
    from skimage.data import lfw_subset
    from sklearn.datasets import load_digits

    distinct = distinct or _Distinct(n)
    digits, faces = load_digits(), lfw_subset()
    pool: list[_Base] = []
    n_digit = min(len(digits.images), round(0.3 * n))
    for i in rng.permutation(len(digits.images)):
        if len(pool) == n_digit:
            break
        ink = 255 - digits.images[i] * (255 / 16)  # dark ink on white paper
        img = _resize(ink.astype(np.uint8), size)
        if distinct.accept(img):
            pool.append(_Base(img, "digit", str(digits.target[i]), f"sklearn:digits#{i}"))
    n_face = len(pool) + min(len(faces), round(0.1 * n))
    for i in rng.permutation(len(faces)):
        if len(pool) == n_face:
            break
        img = _resize((faces[i] * 255).round().astype(np.uint8), size)
        if distinct.accept(img):
            pool.append(_Base(img, "face", "", f"skimage:lfw#{i}"))
    pool += _photo_crops(n - len(pool), size, rng, distinct)
    return [pool[i] for i in rng.permutation(len(pool))]


def _caption(base: _Base, rng: np.random.Generator) -> str:
    return str(rng.choice(_CAPTIONS[base.kind])).format(base.label)


# captions="unique": each caption gets a seeded tag (two words and a 3-digit number), so that captions identify
# images as LAION's mostly do; only a verbatim group's copies share one. 32 x 32 x 1000 tags.
_TAG_ADJ = ("red", "blue", "green", "golden", "silver", "dark", "bright", "old", "new", "small", "large", "quiet",
            "wild", "soft", "sharp", "warm", "cold", "misty", "sunny", "rainy", "vintage", "modern", "rustic",
            "faded", "vivid", "pale", "deep", "calm", "bold", "gentle", "rough", "smooth")
_TAG_NOUN = ("river", "garden", "city", "forest", "harbor", "valley", "window", "street", "market", "island",
             "mountain", "desert", "meadow", "bridge", "tower", "castle", "village", "beach", "canyon", "lake",
             "station", "library", "studio", "museum", "temple", "palace", "orchard", "field", "cliff", "park",
             "road", "shore")


def _tag(rng: np.random.Generator) -> str:
    return f"{rng.choice(_TAG_ADJ)} {rng.choice(_TAG_NOUN)} {int(rng.integers(0, 1000)):03d}"


CAPTION_MODES = ("template", "unique")


# ------------------------------------------------------------------------------------------------
# variants and corruption


def _jpeg(img: np.ndarray, quality: int = _JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


# The near-duplicate edits: the four the embedder always found, and the copies people make of web images (DISC 2021,
# SSCD; issue #34): a 5-25 % crop resized back, a horizontal flip, a 3-15 degree rotation, a text overlay in a corner,
# a 5-10 % solid border, grayscale. Every one is planted by default (ALL_EDITS).
COPY_EDITS = ("jpeg", "shift", "color", "resize")
MORE_EDITS = ("crop", "hflip", "rotate", "overlay", "border", "grayscale")
ALL_EDITS = COPY_EDITS + MORE_EDITS


def _variant(img: np.ndarray, rng: np.random.Generator, light: bool = False,
             kinds: tuple[str, ...] = COPY_EDITS) -> tuple[bytes, str]:
    """A near-duplicate of img as JPEG bytes, and the edit that made it (truth's `edit`). light: only a faint
    (1-2 %) colour change or a q85-92 re-encode."""
    gray = img.ndim == 2 or bool((img == img[..., :1]).all())
    # a digit or a face is gray already: its grayscale "edit" would be the same bytes, an exact copy by another name
    choices = ["jpeg", "color"] if light else [k for k in kinds if not (gray and k == "grayscale")] or ["jpeg"]
    kind = str(rng.choice(choices))
    return _edit(img, rng, kind, light), kind


def _edit(img: np.ndarray, rng: np.random.Generator, kind: str, light: bool) -> bytes:
    if kind == "jpeg":
        return _jpeg(img, int(rng.integers(85, 93)) if light else int(rng.integers(20, 41)))
    if kind == "shift":  # 1-2 px at 32 px, 2-4 px at 96 px: the same share of the side
        m = max(2, round(img.shape[0] / 24))
        dy, dx = (int(v) * int(rng.choice([-1, 1])) for v in rng.integers(0, m + 1, size=2))
        dy = dy or max(1, m // 2)  # at least a 1 px move (2 px at 96)
        pad = np.pad(img, ((m, m), (m, m), (0, 0)), mode="edge")
        h, w = img.shape[:2]
        return _jpeg(pad[m + dy:m + dy + h, m + dx:m + dx + w])
    if kind == "color":
        lo, hi = (0.01, 0.02) if light else (0.05, 0.20)
        gain = 1 + rng.uniform(lo, hi, size=3) * rng.choice([-1, 1], size=3)
        return _jpeg(np.clip(img * gain, 0, 255).round().astype(np.uint8))
    h, w = img.shape[:2]
    if kind == "crop":  # 5-25 % of the area cut away, the rest resized back to the full side
        side = math.sqrt(1 - rng.uniform(0.05, 0.25))
        ch, cw = max(1, round(h * side)), max(1, round(w * side))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = Image.fromarray(img[y:y + ch, x:x + cw])
        return _jpeg(np.asarray(crop.resize((w, h), Image.Resampling.LANCZOS)))
    if kind == "hflip":
        return _jpeg(np.ascontiguousarray(img[:, ::-1]))
    if kind == "rotate":
        angle = float(rng.uniform(3, 15) * rng.choice([-1, 1]))
        fill = tuple(int(v) for v in img.reshape(-1, img.shape[-1]).mean(0))
        return _jpeg(np.asarray(Image.fromarray(img).rotate(angle, Image.Resampling.BICUBIC, fillcolor=fill)))
    if kind == "overlay":  # three characters of text in a corner, as a watermark or a caption burnt in
        from PIL import ImageDraw

        text = "".join(str(c) for c in rng.choice(list("ABCDEFGHJKLMNPRSTUVWXYZ0123456789"), size=3))
        pil = Image.fromarray(img)
        draw = ImageDraw.Draw(pil)
        box = draw.textbbox((0, 0), text)
        tw, th = box[2] - box[0], box[3] - box[1]
        x = 1 if rng.random() < 0.5 else max(1, w - tw - 2)
        y = 1 if rng.random() < 0.5 else max(1, h - th - 3)
        ink = (255, 255, 255) if img.mean() < 128 else (0, 0, 0)
        draw.text((x - box[0], y - box[1]), text, fill=ink)
        return _jpeg(np.asarray(pil))
    if kind == "border":  # a solid frame of 5-10 % of the side on every edge, the picture shrunk inside it
        b = max(1, round(h * rng.uniform(0.05, 0.10)))
        inner = np.asarray(Image.fromarray(img).resize((w - 2 * b, h - 2 * b), Image.Resampling.LANCZOS))
        frame = np.full_like(img, 255 if rng.random() < 0.5 else 0)
        frame[b:h - b, b:w - b] = inner
        return _jpeg(frame)
    if kind == "grayscale":
        return _jpeg(np.asarray(Image.fromarray(img).convert("L").convert("RGB")))
    if kind != "resize":
        raise ValueError(f"unknown edit {kind!r}; accepted: {list(ALL_EDITS)}")
    small = Image.fromarray(img).resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BILINEAR)
    return _jpeg(np.asarray(small.resize((w, h), Image.Resampling.BILINEAR)))


def _corrupt(img: np.ndarray, i: int, rng: np.random.Generator) -> bytes:
    """Undecodable image bytes, cycling through garbage, a truncated JPEG and an empty member."""
    kind = i % 3
    if kind == 0:
        return rng.integers(0, 256, size=int(rng.integers(200, 2000)), dtype=np.uint8).tobytes()
    if kind == 1:
        good = _jpeg(img)
        return good[: len(good) // 2]  # header intact, scan data cut: PIL opens it but fails to load
    return b""


# ------------------------------------------------------------------------------------------------
# the builder


def _check_args(**kw: int) -> None:
    for name, v in kw.items():
        lo = {"size": 8, "samples_per_shard": 1, "n_unique": 1, "repeat_copies": 2}.get(name, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def build_demo_corpus(out_dir: str | Path, n_unique: int = 2000, n_repeated: int = 20, repeat_copies: int = 24,
                      n_oversampled: int = 20, n_exact_dup_groups: int = 30, n_near_dup_groups: int = 30,
                      n_corrupt: int = 8, n_no_caption: int = 40, size: int = 32, samples_per_shard: int = 500,
                      truncate_last_shard: bool = True, seed: int = 0, dose_copies: tuple[int, ...] = (),
                      dose_groups: int = 4, captions: str = "template",
                      near_dup_edits: tuple[str, ...] = ALL_EDITS, n_heldout: int = HELDOUT_IMAGES) -> DemoCorpus:
    """Write `out_dir/shards/*.tar`, `out_dir/truth.parquet` and `out_dir/demo_corpus.json`.

    Images are RGB `size` x `size` JPEGs (quality 95). Keys are 9 digits as img2dataset writes them
    (5-digit shard index + 4-digit index in the shard). Samples are shuffled across shards so the
    members of a group land in different shards. With `truncate_last_shard` the last shard is cut in
    the middle of an image member near its end; only `unique` samples are placed where the cut falls,
    so every planted group stays whole, and their truth rows get readable=False.

    dose_copies (dose-response): for each k, `dose_groups` more groups of k copies each, planted "dose" (made like
    the repeated groups), so detection can be read against the number of copies. Empty: none, and the corpus is
    byte-identical to one built without the option.

    captions (text-conditional memorization): "template" (a few captions per kind of image, shared by many
    images) or "unique": every caption gets a seeded tag that makes it unique, except that the even-numbered
    repeated groups share one caption over all their copies (truth `caption_kind` "verbatim", as Wen et al.'s
    memorized prompts) while the odd ones keep one caption per copy ("varied"). The images are the same as with
    "template" for the same seed (the tags draw from their own generator).

    near_dup_edits: the edits near-duplicate variants draw from (default ALL_EDITS: jpeg, shift, color, resize and
    the copies people make, MORE_EDITS: crop, hflip, rotate, overlay, border, grayscale).

    n_heldout: images of the same kinds, distinct from every corpus image (and no photo crop overlapping a corpus
    crop by more than _MAX_CROP_IOU), written to `out_dir/heldout/00000.tar`, outside the corpus: non-members for
    classify.calibration_shards. They draw from their own generator, so the corpus is the same for any n_heldout.
    """
    if captions not in CAPTION_MODES:
        raise ValueError(f"captions must be one of {list(CAPTION_MODES)}, got {captions!r}")
    near_dup_edits = tuple(near_dup_edits)
    if not near_dup_edits or any(e not in ALL_EDITS for e in near_dup_edits):
        raise ValueError(f"near_dup_edits must be a non-empty list of {list(ALL_EDITS)}, "
                         f"got {list(near_dup_edits)!r}")
    _check_args(n_unique=n_unique, n_repeated=n_repeated, repeat_copies=repeat_copies, n_oversampled=n_oversampled,
                n_exact_dup_groups=n_exact_dup_groups, n_near_dup_groups=n_near_dup_groups, n_corrupt=n_corrupt,
                n_no_caption=n_no_caption, size=size, samples_per_shard=samples_per_shard, seed=seed,
                dose_groups=dose_groups, n_heldout=n_heldout)
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 2 for k in dose_copies):
        raise ValueError(f"dose_copies must be ints >= 2 (copies per group), got {list(dose_copies)!r}")
    if samples_per_shard > 9999:
        raise ValueError(f"samples_per_shard must be <= 9999 (9-digit img2dataset keys), got {samples_per_shard}")
    params = {"n_unique": n_unique, "n_repeated": n_repeated, "repeat_copies": repeat_copies,
              "n_oversampled": n_oversampled, "n_exact_dup_groups": n_exact_dup_groups,
              "n_near_dup_groups": n_near_dup_groups, "n_corrupt": n_corrupt, "n_no_caption": n_no_caption,
              "size": size, "samples_per_shard": samples_per_shard, "truncate_last_shard": truncate_last_shard,
              "seed": seed, **({"dose_copies": list(dose_copies), "dose_groups": dose_groups} if dose_copies else {}),
              **({"captions": captions} if captions != "template" else {}),
              **({"near_dup_edits": list(near_dup_edits)} if near_dup_edits != ALL_EDITS else {}),
              "n_heldout": n_heldout}
    rng = np.random.default_rng(seed)
    tag_rng = np.random.default_rng([seed, 0xCA97])

    def caption(b: _Base) -> str:
        text = _caption(b, rng)  # drawn in both modes, so the images stay those of "template"
        return f"{text}, {_tag(tag_rng)}" if captions == "unique" else text

    n_base = (n_unique + n_repeated + n_oversampled + n_exact_dup_groups + n_near_dup_groups + n_corrupt
              + n_no_caption + len(dose_copies) * dose_groups)
    distinct = _Distinct(n_base + n_heldout)  # kept for the held-out images, which must differ from these
    pool = iter(_image_pool(n_base, size, rng, distinct))

    # One record per sample: planted, group_id, copies, image bytes, caption (None = no .txt), base.
    recs: list[dict] = []
    group = 0

    def add(planted: str, gid: int | None, copies: int, data: bytes, base: _Base, text: str | None,
            edit: str | None = None, caption_kind: str | None = None) -> None:
        recs.append({"planted": planted, "group_id": gid, "copies": copies, "jpg": data, "base": base,
                     "caption": text, "edit": edit, "caption_kind": caption_kind})

    for _ in range(n_unique):
        b = next(pool)
        add("unique", None, 1, _jpeg(b.image), b, caption(b))
    for _ in range(n_exact_dup_groups):
        b, k = next(pool), int(rng.integers(2, 4))
        data = _jpeg(b.image)
        for _ in range(k):
            add("exact_dup", group, k, data, b, caption(b), "copy")
        group += 1
    for _ in range(n_near_dup_groups):
        b, k = next(pool), int(rng.integers(2, 5))
        add("near_dup", group, k, _jpeg(b.image), b, caption(b), "copy")
        for _ in range(k - 1):
            data, edit = _variant(b.image, rng, kinds=near_dup_edits)
            add("near_dup", group, k, data, b, caption(b), edit)
        group += 1
    def copies(planted: str, k: int, kind: str | None = None) -> None:
        nonlocal group
        b = next(pool)
        data = _jpeg(b.image)
        shared = None
        for c in range(k):
            # Two thirds exact copies, one third light variants: how LAION's repeated images look. Heavier
            # variants spread the copies into a cluster the small demo model memorizes far more slowly.
            member, edit = (data, "copy") if c % 3 else _variant(b.image, rng, light=True)
            text = caption(b)
            shared = shared or text
            add(planted, group, k, member, b, shared if kind == "verbatim" else text, edit, kind)
        group += 1

    for i in range(n_repeated):
        copies("repeated", repeat_copies, ("verbatim" if i % 2 == 0 else "varied") if captions == "unique" else None)
    for _ in range(n_oversampled):
        b = next(pool)
        add("oversampled", None, 1, _jpeg(b.image), b, caption(b))
    for k in dose_copies:
        for _ in range(dose_groups):
            copies("dose", k)
    for i in range(n_corrupt):
        b = next(pool)
        add("corrupt", None, 1, _corrupt(b.image, i, rng), b, caption(b))
    for _ in range(n_no_caption):
        b = next(pool)
        add("no_caption", None, 1, _jpeg(b.image), b, None)

    order = [int(i) for i in rng.permutation(len(recs))]
    n = len(order)
    n_shards = math.ceil(n / samples_per_shard)
    n_last = n - (n_shards - 1) * samples_per_shard
    cut_at = n  # position of the first sample the truncation destroys
    if truncate_last_shard:
        cut_at = n - max(1, n_last // 20)
        uniques = [p for p in range(cut_at) if recs[order[p]]["planted"] == "unique"]
        for p in range(cut_at, n):
            if recs[order[p]]["planted"] != "unique" and uniques:
                q = uniques.pop(int(rng.integers(len(uniques))))
                order[p], order[q] = order[q], order[p]

    out_dir = Path(out_dir)
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for old in shard_dir.glob("*.tar"):
        old.unlink()  # a rebuild with fewer shards must not leave stale ones behind
    rows, shards = [], []
    for s in range(n_shards):
        name = f"{s:05d}"
        path = shard_dir / f"{name}.tar"
        tmp = path.with_suffix(".tar.tmp")
        positions = range(s * samples_per_shard, min(n, (s + 1) * samples_per_shard))
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for j, p in enumerate(positions):
                r = recs[order[p]]
                key = f"{s:05d}{j:04d}"
                _add_sample(tf, key, r["jpg"], r["caption"], size, r["base"].source)
                rows.append({"key": key, "group_id": r["group_id"], "planted": r["planted"], "copies": r["copies"],
                             "readable": p < cut_at, "shard": name, "edit": r["edit"],
                             "caption_kind": r["caption_kind"]})
        if truncate_last_shard and s == n_shards - 1:
            _truncate_in_member(tmp, f"{s:05d}{cut_at - s * samples_per_shard:04d}.jpg")
        os.replace(tmp, path)
        shards.append(path)

    heldout = _write_heldout(out_dir / "heldout", n_heldout, size, seed, distinct, captions)
    truth = _write_truth(rows, out_dir / "truth.parquet")
    counts = {c: sum(r["planted"] == c for r in rows) for c in PLANTED}
    truncated = f"{n_shards - 1:05d}" if truncate_last_shard else None
    manifest = out_dir / "demo_corpus.json"
    info = {"n_samples": n, "n_readable": cut_at, "n_shards": n_shards, "counts": counts,
            "truncated_shard": truncated, "n_groups": group, "params": params,
            "heldout": {"shards": [str(heldout.relative_to(out_dir))] if heldout else [], "n_images": n_heldout}}
    write_json(info, manifest)
    return DemoCorpus(out_dir=out_dir, shards=shards, truth=truth, manifest=manifest, counts=counts, n_samples=n,
                      n_readable=cut_at, truncated_shard=truncated, params=params)


def build_demo_corpus_again(corpus: str | Path, out_dir: str | Path, **override) -> DemoCorpus:
    """The demo corpus in `corpus` built again into out_dir from its demo_corpus.json params (with `override`, e.g.
    another n_heldout: the shards do not depend on it). Raises ValueError naming the first shard that differs
    byte for byte from corpus/shards: not a corpus this memscan builds."""
    import filecmp

    corpus = Path(corpus)
    params = json.loads((corpus / "demo_corpus.json").read_text())["params"]
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    again = build_demo_corpus(out_dir, **{**kw, **override})
    for f in sorted((corpus / "shards").glob("*.tar")):
        if not filecmp.cmp(f, Path(out_dir) / "shards" / f.name, shallow=False):
            raise ValueError(f"{corpus}: {f.name} is not the shard this memscan builds for {params}")
    return again


def _write_heldout(out: Path, n: int, size: int, seed: int, distinct: _Distinct, captions: str) -> Path | None:
    """n held-out images (see build_demo_corpus) in out/00000.tar, with a caption and a .json each."""
    for old in out.glob("*.tar"):
        old.unlink()
    if n == 0:
        return None
    rng = np.random.default_rng([seed, 0x4E1D])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "00000.tar"
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i, b in enumerate(_image_pool(n, size, rng, distinct)):
            key = f"{i:09d}"
            text = _caption(b, rng) + (f", {_tag(rng)}" if captions == "unique" else "")
            _add_sample(tf, key, _jpeg(b.image), text, size, b.source)
    os.replace(tmp, path)
    return path


def _add_sample(tf: tarfile.TarFile, key: str, jpg: bytes, caption: str | None, size: int, source: str) -> None:
    """One img2dataset sample: KEY.jpg, KEY.txt (only with a caption) and KEY.json."""
    meta = {"key": key, "caption": caption, "width": size, "height": size, "source": source, "status": "success"}
    _add_member(tf, f"{key}.jpg", jpg)
    if caption is not None:
        _add_member(tf, f"{key}.txt", caption.encode())
    _add_member(tf, f"{key}.json", json.dumps(meta, sort_keys=True).encode())


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (mtime, owner, mode) so the same seed gives byte-identical tars.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def _truncate_in_member(path: Path, member: str) -> None:
    """Cut the tar in the middle of `member`'s data (like a download that died), or at its header if empty."""
    with tarfile.open(path) as tf:
        info = tf.getmember(member)
    with open(path, "r+b") as f:
        f.truncate(info.offset_data + info.size // 2 if info.size > 1 else info.offset + 100)


def _write_truth(rows: list[dict], path: Path) -> Path:
    import pandas as pd

    df = pd.DataFrame(rows, columns=["key", "group_id", "planted", "copies", "readable", "shard", "edit",
                                     "caption_kind"])
    df["group_id"] = df["group_id"].astype("Int64")
    df["copies"] = df["copies"].astype("int64")
    atomic_write_parquet(df, path)
    return path
