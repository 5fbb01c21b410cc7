"""Typed configuration: plain dataclasses, loaded strictly from YAML.

Every knob lives here with its default; `configs/*.yaml` documents each with a comment. Loading
is strict: an unknown key fails naming the key and the closest known ones, a wrong type or an
out-of-range value fails naming the value and what is accepted. YAML is read with `safe_load`
only, so a `!!python/object` tag is refused rather than executed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from scanner.errors import ConfigError


def _check(cond: bool, key: str, value: Any, accepted: str) -> None:
    if not cond:
        raise ConfigError(f"{key} must be {accepted}, got {value!r}")


MAX_IMAGE_PIXELS = 64_000_000  # data.max_image_pixels' default; decoders take it as theirs


@dataclass
class DataConfig:
    # dirs, globs or brace patterns: local, s3:// / gs:// / http(s):// URLs, fsspec chains (simplecache::s3://...) or
    # pipe:CMD (scanner/data/shards.py); credentials come from the storage library's environment, never from here
    shards: list[str] = field(default_factory=list)
    # a member of a brace range that does not exist: false = that shard is one error row and the rest is scanned;
    # true = the scan is refused before it starts, naming the missing shard
    strict_shards: bool = False
    resolution: int = 16  # model input side in pixels (images are resized + centre-cropped)
    channels: int = 3  # 1 (grayscale) or 3 (RGB)
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger declared sizes are refused (decompression bombs)
    batch_size: int = 64  # rows per Ray Data batch for decoding
    # side of the preview stored per image for report.html (previews/, PNG up to 32 px, JPEG above: about 1-3 KB a
    # row), taken from the scan's one decode so the report never reopens a shard; 0 = none (no thumbnails shown)
    preview_size: int = 64

    def validate(self, p: str = "data") -> None:
        _check(4 <= self.resolution <= 4096, f"{p}.resolution", self.resolution, "an int in [4, 4096]")
        _check(self.channels in (1, 3), f"{p}.channels", self.channels, "1 or 3")
        _check(self.max_image_pixels > 0, f"{p}.max_image_pixels", self.max_image_pixels, "> 0")
        _check(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, ">= 1")
        _check(0 <= self.preview_size <= 512, f"{p}.preview_size", self.preview_size, "0 (none) or an int in [1, 512]")
        _check(isinstance(self.strict_shards, bool), f"{p}.strict_shards", self.strict_shards, "true or false")


@dataclass
class ModelConfig:
    kind: Literal["pixel", "latent", "none"] = "pixel"  # none: neighbours only (memscan dedup)
    path: str | None = None  # local diffusers directory (save_pretrained layout)
    allow_pickle: bool = False  # load .bin/.ckpt pickle weights only when you trust their source
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # forward dtype on GPU; geometry stays fp32
    batch_size: int = 32  # images per scoring call

    def validate(self, p: str = "model") -> None:
        _check(self.kind == "none" or bool(self.path), f"{p}.path", self.path,
               f"a local model directory when {p}.kind is {self.kind!r}")
        _check(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, ">= 1")


CAL_MIRRORS = ("hflip", "vflip", "rot180")  # geometry.cal_refs names; their axes: scanner/geometry/mirror.py


@dataclass
class GeometryConfig:
    t0: float = 0.1  # FLIPD time (docs/method.md §2); paper a: 0.05 on toy data, 0.3 on SD latents
    # Where FLIPD's Jacobian trace is taken: "noised" (mean over flipd_noises seeded points psi x + sigma z, where
    # the network was trained: a dimension in [0, D]) or "clean" (at psi x, the paper's form: far below 0 on
    # trained UNets, docs/method.md §10)
    flipd_at: Literal["noised", "clean"] = "noised"
    # noised points averaged by lid_flipd, and Hutchinson probes at each: the noise, not the probes, sets the
    # estimator's spread (8 x 1 and 8 x 8 agree, rank correlation of two seeds 0.94; 2 x 4: 0.85;
    # benchmarks/results/lid_theta.md)
    flipd_noises: int = 8
    flipd_probes: int = 1
    t_laplace: float = 0.1  # time at which the p-Laplace and the score norm are evaluated
    t_cfg: float = 0.02  # time of the CFG-adjusted score norm (paper a fig. 3)
    p_values: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0])
    trace: Literal["exact", "hutchinson"] = "hutchinson"
    probes: int = 8  # Hutchinson probes per image
    probe_dist: Literal["rademacher", "gaussian"] = "rademacher"
    # How directional derivatives of eps are taken: "vjp" (reverse mode, exact, ~1 backward each: the
    # cheapest exact choice on CPU), "autograd" (torch.func.jvp, forward mode) or "fd" (finite difference).
    jvp: Literal["vjp", "autograd", "fd"] = "vjp"
    fd_scheme: Literal["central", "forward"] = "central"
    fd_eps: float = 1e-4  # 1e-3 is off by ~9% on the trained demo UNet, 1e-4 by 0.1% (benchmarks/results)
    cfg_noises: int = 2  # seeded noises averaged in the CFG norm
    # Mirror-calibrated score norm (score_norm_cal, scanner/geometry/mirror.py): |eps| at x over |eps| at
    # mirrored x, which cancels "simple images have a small score norm". [] turns the column off; a model
    # trained with random horizontal flips has seen hflip(x): use [vflip] or [rot180] for it.
    cal_refs: list[str] = field(default_factory=lambda: ["hflip", "vflip"])
    t_cal: float = 0.1  # time of score_norm_cal (0.06-0.15 within 0.006 AUROC on demo seed 0: results/calibration.md)
    # loss_cal (scanner/geometry/mirror.py): the denoising loss at loss_noises seeded noised points of x over the
    # same at its mirrors (cal_refs), where the network was trained: loss_noises x (1 + len(cal_refs)) forwards
    # per image; 0 (or cal_refs []) turns the column off
    t_loss: float = 0.05
    loss_noises: int = 8
    nb: bool = False  # normal-bundle LID: K score calls per image, small D only
    nb_samples: int = 0  # K; 0 = D + 16
    nb_t: float = 0.01
    # how NB reads the rank: "threshold" counts singular values above nb_rel_threshold x the largest; "gap" takes
    # the largest log-gap, exact on Gaussians but 1-2 dimensions for every image of the trained demo UNet
    # (benchmarks/results/lid_theta.md)
    nb_rank: Literal["threshold", "gap"] = "threshold"
    nb_rel_threshold: float = 0.01
    lpca_k: int = 20  # neighbours for local PCA (LID of the data manifold)
    lpca_alpha: float = 0.05  # eigenvalues above alpha * the level (lpca_scale) count
    # the level: "corpus" = the corpus median of the largest neighbourhood eigenvalue, one number for every image, so
    # a neighbourhood of near-copies counts 0 directions; "local" = the image's own largest eigenvalue (Fukunaga-Olsen,
    # scale-free: 20 near-copies count as many directions as 20 distinct images)
    lpca_scale: Literal["corpus", "local"] = "corpus"
    # where LID_*'s neighbours are searched: model space, the embedding (clip), or auto: model space up to
    # LPCA_MODEL_MAX_DIM dimensions (the demo's 768 pixels), the embedding above (SD latents: 16,384)
    lpca_space: Literal["auto", "model", "clip"] = "auto"
    seed: int = 0

    def validate(self, p: str = "geometry") -> None:
        for k in ("t0", "t_laplace", "t_cfg", "nb_t", "t_cal", "t_loss"):
            v = getattr(self, k)
            _check(0.0 < v < 1.0, f"{p}.{k}", v, "a float in (0, 1)")
        _check(len(self.p_values) > 0 and all(v > 0 for v in self.p_values), f"{p}.p_values", self.p_values,
               "a non-empty list of numbers > 0")
        _check(self.probes >= 1, f"{p}.probes", self.probes, "an int >= 1")
        _check(self.fd_eps > 0, f"{p}.fd_eps", self.fd_eps, "> 0")
        _check(self.cfg_noises >= 1, f"{p}.cfg_noises", self.cfg_noises, "an int >= 1")
        _check(self.loss_noises >= 0, f"{p}.loss_noises", self.loss_noises, "an int >= 0 (0 = no loss_cal)")
        _check(self.flipd_at in ("noised", "clean"), f"{p}.flipd_at", self.flipd_at, "noised or clean")
        _check(self.nb_rank in ("threshold", "gap"), f"{p}.nb_rank", self.nb_rank, "threshold or gap")
        _check(0.0 < self.nb_rel_threshold < 1.0, f"{p}.nb_rel_threshold", self.nb_rel_threshold, "a float in (0, 1)")
        _check(self.flipd_noises >= 1, f"{p}.flipd_noises", self.flipd_noises, "an int >= 1")
        _check(self.flipd_probes >= 1, f"{p}.flipd_probes", self.flipd_probes, "an int >= 1")
        _check(self.nb_samples >= 0, f"{p}.nb_samples", self.nb_samples, "an int >= 0 (0 = D + 16)")
        _check(isinstance(self.cal_refs, list) and all(r in CAL_MIRRORS for r in self.cal_refs), f"{p}.cal_refs",
               self.cal_refs, f"a list of {', '.join(CAL_MIRRORS)} ([] = no score_norm_cal, loss_cal)")
        _check(self.lpca_k >= 2, f"{p}.lpca_k", self.lpca_k, "an int >= 2")
        _check(0.0 < self.lpca_alpha < 1.0, f"{p}.lpca_alpha", self.lpca_alpha, "a float in (0, 1)")
        _check(self.lpca_scale in ("corpus", "local"), f"{p}.lpca_scale", self.lpca_scale, "corpus or local")


@dataclass
class NeighboursConfig:
    enabled: bool = True
    # open_clip architecture name; the default is memscan's small copy-detection tower, trained on the
    # corpus when no checkpoint is given (a real CLIP/SSCD checkpoint names its own architecture)
    clip_model: str = "memscan-copydet-rn16"
    # local checkpoint; None = the copy-detection embedder shipped with memscan (scanner/neighbours/shipped/, trained
    # by benchmarks/train_shipped_embedder.py), or one trained on the corpus with train_embedder: true
    clip_checkpoint: str | None = None
    allow_pickle: bool = False  # refuse pickle checkpoints unless explicitly trusted
    # without clip_checkpoint: train the embedder on this corpus (train_steps, cached in OUT/embedder) instead of
    # loading the shipped one; costs ~2 min on 2 cores, nearly all of a small corpus's run (issue #34)
    train_embedder: bool = False
    # embed every image and its horizontal mirror and pool them (embed.flip_pool): a flipped copy embeds exactly as
    # its original, by construction; a second forward per image
    flip_invariant: bool = True
    image_size: int = 32  # embedder input side
    batch_size: int = 64
    # cosine at or above which two images are duplicates without a check of their pixels. 0.99 with the shipped
    # embedder, verify_min_score 0.995 and verify_min_detail 0.03: the most precise settings of bench_copydet.py's
    # grid on the tuning copy corpus (seed 0); held-out figures in benchmarks/results/copydet_floor08.md)
    dup_threshold: float = 0.99
    rep_threshold: float = 0.93  # cosine at or above which a generation replicates a training image
    phash_max_dist: int = 2  # pHash Hamming radius of the near-exact pass (6 bits merges distinct images)
    # check of near-misses on thumbnails: neighbours at cosine in [align_min_cosine, dup_threshold) are checked on
    # their align_size thumbnails (stored per row: align_size^2 x channels bytes) by `verifier` (below); align_size 0
    # turns it off. align_min_cosine 0.8: 6.4x fewer pairs to verify than 0.6 (results/copydet_floor08.md).
    # The shift check's own limits (verifier: shift): RMSE <= align_max_rmse at some shift of <= align_max_shift px,
    # chosen on demo seed 0 in the middle of its gap: a shifted copy vs its original <= 0.0131, distinct pairs
    # >= 0.0327, geometric mean 0.0207 rounded down, at a floor of 0.6 then (bench_align.py, results/align.md).
    align_size: int = 32
    align_min_cosine: float = 0.8
    align_max_rmse: float = 0.02
    align_max_shift: int = 2
    # how candidates in [align_min_cosine, dup_threshold) are checked on their thumbnails: "affine" fits an affine
    # map and a gain / bias between the two (scanner/neighbours/verify.py: flips, crops, rotations, borders,
    # overlays, grayscale; link "verified") and links a pair whose fit explains >= verify_min_score of the
    # original's variance; "shift" is the pixel check before it (align_max_rmse at align_max_shift; link "aligned")
    verifier: Literal["affine", "shift"] = "affine"
    verify_min_score: float = 0.995
    # affine: both thumbnails must carry at least this fine detail (verify.detail: luminance RMSE against a 1 px blur);
    # a flat crop with one edge fits any other under some affine map, so the fit is no evidence there
    verify_min_detail: float = 0.03
    train_steps: int = 600  # copy-detection embedder steps when no checkpoint is given (~2 min on 2 cores)
    embedder_max_images: int = 50_000  # the embedder trains on at most this many distinct images
    k: int = 20  # neighbours searched per image for duplicate links
    # auto: exact (blocked, streamed) search up to flat_max vectors, an inverted file on disk above
    # (scanner/corpus/search.py); flat / ivf force one. Both keep within corpus.memory_gb.
    index: Literal["auto", "flat", "ivf"] = "auto"
    flat_max: int = 200_000  # auto: exact search up to this many vectors
    recall_sample: int = 1000  # held-out queries that measure recall@k of the inverted file
    generations: int = 64  # replication check: images generated from training captions (0 = off)
    gen_steps: int = 50  # sampler steps per generation

    def validate(self, p: str = "neighbours") -> None:
        for k in ("dup_threshold", "rep_threshold"):
            v = getattr(self, k)
            _check(-1.0 <= v <= 1.0, f"{p}.{k}", v, "a cosine in [-1, 1]")
        _check(self.k >= 2, f"{p}.k", self.k, "an int >= 2")
        _check(self.flat_max >= 1, f"{p}.flat_max", self.flat_max, ">= 1")
        _check(self.index in ("auto", "flat", "ivf"), f"{p}.index", self.index,
               "auto, flat or ivf (hnsw was removed: it holds the whole index in memory)")
        _check(self.recall_sample >= 1, f"{p}.recall_sample", self.recall_sample, ">= 1")
        _check(self.generations >= 0, f"{p}.generations", self.generations, ">= 0")
        _check(self.gen_steps >= 1, f"{p}.gen_steps", self.gen_steps, ">= 1")
        _check(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, ">= 1")
        _check(self.image_size >= 16, f"{p}.image_size", self.image_size, ">= 16")
        _check(0 <= self.phash_max_dist <= 64, f"{p}.phash_max_dist", self.phash_max_dist, "an int in [0, 64]")
        _check(self.align_size == 0 or 8 <= self.align_size <= 256, f"{p}.align_size", self.align_size,
               "0 (off) or an int in [8, 256]")
        _check(-1.0 <= self.align_min_cosine <= 1.0, f"{p}.align_min_cosine", self.align_min_cosine,
               "a cosine in [-1, 1]")
        _check(0.0 <= self.align_max_rmse <= 1.0, f"{p}.align_max_rmse", self.align_max_rmse,
               "an RMSE in [0, 1] (pixels scaled to [0, 1])")
        _check(self.align_max_shift >= 0 and (self.align_size == 0 or self.align_max_shift < self.align_size // 2),
               f"{p}.align_max_shift", self.align_max_shift, "an int >= 0 and below half of align_size")
        _check(self.train_steps >= 1, f"{p}.train_steps", self.train_steps, ">= 1")
        _check(self.verifier in ("affine", "shift"), f"{p}.verifier", self.verifier, "affine or shift")
        _check(0.0 <= self.verify_min_score <= 1.0, f"{p}.verify_min_score", self.verify_min_score,
               "a share of variance explained in [0, 1]")
        _check(0.0 <= self.verify_min_detail <= 1.0, f"{p}.verify_min_detail", self.verify_min_detail,
               "an RMSE in [0, 1] (luminance in [0, 1])")
        for k in ("train_embedder", "flip_invariant"):
            _check(isinstance(getattr(self, k), bool), f"{p}.{k}", getattr(self, k), "true or false")
        _check(self.embedder_max_images >= 2, f"{p}.embedder_max_images", self.embedder_max_images, ">= 2")


LPCA_MODEL_MAX_DIM = 4096


@dataclass
class CorpusConfig:
    """The corpus-wide steps after the stages (scanner/corpus/): duplicate groups, LID_*, the tables."""

    memory_gb: float = 4.0  # working set of the corpus steps: they stream the part files within it
    list_size: int = 2048  # inverted file: rows per list (the budget may make lists smaller)
    spill: int = 2  # inverted file: every row is stored in its `spill` nearest lists (recall vs. disk)
    detector_sample: int = 2_000_000  # detector quantile: exact up to this many rows, a seeded sample above
    # local folder for the corpus steps' work files (arrays copied from object storage);
    # None: OUT/corpus-work for a local --out, the system temp folder for an --out in object storage
    work_dir: str | None = None
    # where the corpus steps run: "local" in the driver's process, "ray" as Ray tasks on the cluster (each within
    # memory_gb), "auto" as Ray tasks from ray_min_rows rows (below, a Ray Data job's fixed cost of seconds per
    # step exceeds the work: scanner/corpus/executor.py)
    executor: Literal["auto", "local", "ray"] = "auto"
    ray_min_rows: int = 200_000
    # keep the links step's inverted lists under OUT/corpus/index (about spill x the embeddings on disk), so that a
    # later scan --against this one assigns and searches only its new images (an exact search keeps nothing)
    keep_index: bool = True

    def validate(self, p: str = "corpus") -> None:
        _check(self.memory_gb >= 0.25, f"{p}.memory_gb", self.memory_gb, "a number of GiB >= 0.25")
        _check(self.list_size >= 64, f"{p}.list_size", self.list_size, "an int >= 64")
        _check(1 <= self.spill <= 8, f"{p}.spill", self.spill, "an int in [1, 8]")
        _check(self.detector_sample >= 1000, f"{p}.detector_sample", self.detector_sample, "an int >= 1000")
        _check(self.executor in ("auto", "local", "ray"), f"{p}.executor", self.executor, "auto, local or ray")
        _check(self.ray_min_rows >= 0, f"{p}.ray_min_rows", self.ray_min_rows, "an int >= 0")
        _check(isinstance(self.keep_index, bool), f"{p}.keep_index", self.keep_index, "true or false")

    @property
    def budget_bytes(self) -> int:
        return int(self.memory_gb * (1 << 30))


@dataclass
class ClassifyConfig:
    detector: str = "loss_cal"  # score column that flags memorization (any column of scores/)
    # which tail flags it; null = the direction registered for the column (scanner/columns.py)
    detector_direction: Literal["low", "high"] | None = None
    detector_quantile: float = 0.05  # flag the most extreme fraction, unless detector_threshold is set
    detector_threshold: float | None = None
    # held-out images the model never trained on (webdataset shards: a directory, glob or list): when set, the cut
    # is the detector's calibration_fpr quantile over them (a false-positive rate on non-members, so the cut means
    # the same for every model), and detector_threshold / detector_quantile are not used
    calibration_shards: str | list[str] | None = None
    calibration_fpr: float = 0.01
    # with calibration_shards: the cut must also flag no more than calibration_fpr of the corpus's ordinary members
    # (calibrate.member_cut: median and MAD of the detector over the scanned rows); the stricter cut applies
    calibration_members: bool = True
    calibration_max_images: int = 5000  # the cut reads the first this many readable held-out images, in shard order
    lpca_low: float = 1.0  # LID_* below this (with a flag) is data-driven memorization (DD-Mem); 1: LID_* = 0
    # OD-Mem needs lid_gap_rel > gap_margin: lid_flipd below the corpus's typical lid_flipd for images of the same
    # LID_*, in units of the median lid_flipd (finalize.relative_gap)
    gap_margin: float = 0.0

    @property
    def direction(self) -> str:
        """detector_direction, or the detector column's registered direction."""
        from scanner.columns import direction

        return self.detector_direction or direction(self.detector) or "low"

    def validate(self, p: str = "classify") -> None:
        from scanner.columns import direction

        _check(self.detector_direction is not None or direction(self.detector) is not None,
               f"{p}.detector_direction", self.detector_direction,
               f"low or high: {self.detector!r} has no registered direction (scanner/columns.py)")
        _check(0.0 < self.detector_quantile < 1.0, f"{p}.detector_quantile", self.detector_quantile,
               "a float in (0, 1)")
        _check(self.lpca_low >= 0, f"{p}.lpca_low", self.lpca_low, ">= 0")
        _check(0.0 < self.calibration_fpr < 0.5, f"{p}.calibration_fpr", self.calibration_fpr,
               "a float in (0, 0.5): the share of held-out images the cut flags")
        _check(isinstance(self.calibration_members, bool), f"{p}.calibration_members", self.calibration_members,
               "true or false")
        _check(isinstance(self.calibration_max_images, int) and self.calibration_max_images >= 100,
               f"{p}.calibration_max_images", self.calibration_max_images, "an int >= 100")
        _check(self.calibration_shards is None or (isinstance(self.calibration_shards, (str, list))
                                                   and len(self.calibration_shards) > 0),
               f"{p}.calibration_shards", self.calibration_shards,
               "null, or a directory, glob or list of held-out .tar shards")


@dataclass
class RayConfig:
    address: str | None = None  # None: $RAY_ADDRESS if set, else a local Ray on this machine
    num_cpus: int | None = None  # local Ray only; None = all cores
    actors: int = 1  # scoring actors (each loads the model once)
    gpus_per_actor: float = 1.0  # used only when a GPU exists
    dashboard: bool = False

    def validate(self, p: str = "ray") -> None:
        _check(self.actors >= 1, f"{p}.actors", self.actors, "an int >= 1")
        _check(self.num_cpus is None or self.num_cpus >= 1, f"{p}.num_cpus", self.num_cpus, "null or >= 1")
        _check(0 < self.gpus_per_actor <= 8, f"{p}.gpus_per_actor", self.gpus_per_actor, "in (0, 8]")


@dataclass
class IncrementalConfig:
    """Scans read with this one (scanner/preflight.py): `memscan scan|dedup --against OLD_OUT` and `memscan dedup
    --reference SHARDS_OR_OUT` set the two lists."""

    # finished scans' --out: their images are searched and grouped with the new shards, never read again from
    # shards; their cut is used; the new --out lists the first one's shards first (corpus/shards.json)
    against: list[str] = field(default_factory=list)
    # reference sets (an evaluation set, an opt-out list): shards, or a finished scan's --out. A corpus image in a
    # duplicate group with a reference image is removed (reason `reference`); reference images never are
    reference: list[str] = field(default_factory=list)
    keep_old: bool = True  # in a group of old and new images, an old one is kept (false: the keep rule alone)
    remove_old: bool = False  # also list old images this scan's groups drop (only possible with keep_old false)

    def validate(self, p: str = "incremental") -> None:
        _check(isinstance(self.keep_old, bool), f"{p}.keep_old", self.keep_old, "true or false")
        _check(isinstance(self.remove_old, bool), f"{p}.remove_old", self.remove_old, "true or false")
        _check(all(isinstance(x, str) and x for x in self.against), f"{p}.against", self.against,
               "a list of finished scans' --out folders or URLs")
        _check(all(isinstance(x, str) and x for x in self.reference), f"{p}.reference", self.reference,
               "a list of shards (directory, glob, braces) or finished scans' --out")


@dataclass
class ScanConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    neighbours: NeighboursConfig = field(default_factory=NeighboursConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)
    out: str | None = None
    seed: int = 0

    def validate(self, sections: tuple[str, ...] | None = None) -> ScanConfig:
        """Check every section, or only `sections` (a command checks what it uses: `dedup` has no model)."""
        names = [f.name for f in dataclasses.fields(self) if dataclasses.is_dataclass(getattr(self, f.name))]
        unknown = set(sections or ()) - set(names)
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; known: {', '.join(names)}")
        for name in names if sections is None else [n for n in names if n in sections]:
            getattr(self, name).validate(name)
        if sections is not None and not {"classify", "geometry"} <= set(sections):
            return self
        if self.classify.calibration_shards and self.model.kind == "none":
            raise ConfigError("classify.calibration_shards is set but model.kind is none: there is no detector "
                              "to calibrate; set model.kind (pixel, latent) or classify.calibration_shards: null")
        if self.classify.detector in ("score_norm_cal", "loss_cal") and not self.geometry.cal_refs:
            raise ConfigError(f"classify.detector is {self.classify.detector} but geometry.cal_refs is [], so that "
                              "column is not computed: set geometry.cal_refs (e.g. [hflip, vflip]) or another "
                              "classify.detector (score_norm, p_laplace_1, lid_flipd, cfg_norm)")
        if self.classify.detector == "loss_cal" and not self.geometry.loss_noises:
            raise ConfigError("classify.detector is loss_cal but geometry.loss_noises is 0, so that column is not "
                              "computed: set geometry.loss_noises (e.g. 8) or another classify.detector "
                              "(score_norm_cal, score_norm, p_laplace_1, lid_flipd, cfg_norm)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------
# strict loading


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key} must be one of {', '.join(repr(a) for a in get_args(tp))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        (inner,) = get_args(tp)
        if isinstance(value, (str, int, float)) and inner is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} keys, got {value!r}")
        return _from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint} (known keys here: {', '.join(names)})")
        kwargs[k] = _coerce(v, hints[k], full)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML scalars/lists) to a raw config dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set takes section.key=value, got {item!r}")
        dotted, text = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set takes section.key=value, got {item!r}")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {p!r} is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return raw


def shipped_config(name: str):
    """scanner/configs/NAME.yaml as installed with memscan (configs/ in a checkout links there): an
    importlib.resources Traversable (is_file, read_text), a Path for any installed or checked-out package."""
    from importlib.resources import files

    return files("scanner") / "configs" / f"{name.removesuffix('.yaml')}.yaml"


def shipped_configs() -> list[str]:
    """Names of the configs shipped with memscan: demo, laion-sd15, ..."""
    from importlib.resources import files

    return sorted(f.name.removesuffix(".yaml") for f in (files("scanner") / "configs").iterdir()
                  if f.name.endswith(".yaml"))


def resolve_config(path: str | Path):
    """The config file `path` names: an existing file wins, else a bare name (`demo`, `demo.yaml`) is a config
    shipped with memscan, found in the installed package (so it works from a wheel, not only a checkout)."""
    p = Path(path)
    if p.is_file():
        return p
    if str(path) == p.name and p.name:  # no directory part: a name, not a path
        shipped = shipped_config(p.name)
        if shipped.is_file():
            return shipped
    raise ConfigError(f"config file {str(p)!r} does not exist; a bare name picks a config shipped with memscan: "
                      f"{', '.join(shipped_configs())}")


def load_yaml(path: str | Path) -> dict:
    import yaml

    p = resolve_config(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(f"{p}: unsafe or unknown YAML tag refused ({e.problem}); memscan configs are plain "
                          "YAML (mappings, lists, numbers, strings)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a config must be a mapping of sections, got {type(raw).__name__}")
    return raw


# geometry keys only the corpus steps read (LID_* by local PCA): the part files do not depend on them, so a rerun
# with other values redoes the corpus steps on the same parts
CORPUS_STEP_GEOMETRY = ("lpca_k", "lpca_alpha", "lpca_space", "lpca_scale")


def stage_geometry(geometry: dict | None) -> dict | None:
    """The geometry keys the part files depend on (parts/_run.json compares these)."""
    return None if geometry is None else {k: v for k, v in geometry.items() if k not in CORPUS_STEP_GEOMETRY}


NEIGHBOUR_SECTIONS = ("data", "neighbours", "corpus", "ray", "incremental")  # memscan dedup / train-embedder: no diffusion model


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None, sections: tuple[str, ...] | None = None) -> ScanConfig:
    """Load a ScanConfig from a YAML file (optional) plus `--set` overrides; validate `sections` (None: all).

    Every key is still parsed strictly (an unknown key in any section fails); only the value checks are
    limited to the sections the command uses, so `dedup` does not ask for a model path.
    """
    raw = dict(base or {})
    if path is not None:
        raw.update(load_yaml(path))
    raw = apply_overrides(raw, overrides or [])
    return _from_dict(ScanConfig, raw).validate(sections)


def config_from_dict(raw: dict) -> ScanConfig:
    return _from_dict(ScanConfig, raw).validate()
