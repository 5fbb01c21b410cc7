"""Checks a job makes on the driver before Ray starts, so a user's mistake costs seconds, not a cluster start.

    cfg = check_scan(cfg)            # memscan scan / demo / jobs/scan.py
    n = check_neighbours(cfg.neighbours)   # memscan dedup / train-embedder

Paths come back absolute: a relative `model.path` would otherwise be resolved again inside each Ray
actor, against a working directory (a cluster job's unpacked --working-dir) where it may not exist.
Each failure is a MemscanError subclass naming the key, so the CLI exits 2 with one sentence.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from scanner.config import NeighboursConfig, ScanConfig
from scanner.errors import ConfigError


def check_neighbours(cfg: NeighboursConfig) -> NeighboursConfig:
    """A copy of `cfg` whose clip_checkpoint (when set) exists, is not a refused pickle, and is absolute."""
    if not cfg.enabled or not cfg.clip_checkpoint:
        return cfg
    from scanner.neighbours.checkpoint import check_checkpoint

    path = str(Path(cfg.clip_checkpoint).expanduser().resolve())
    check_checkpoint(path, allow_pickle=cfg.allow_pickle)
    return dataclasses.replace(cfg, clip_checkpoint=path)


def check_scan(cfg: ScanConfig) -> ScanConfig:
    """A copy of `cfg` with every path checked and absolute; raises before any model or Ray is loaded.

    Model: the directory exists, is of `model.kind`, holds safetensors weights (or pickles with
    allow_pickle), and takes `data.resolution`-sided images. classify.calibration_shards (when set): every entry
    matches a shard, and comes back as expand_shards' ShardList (absolute paths and URLs; expanding it again returns
    it unchanged, missing brace-range members included; data.strict_shards refuses those). Neighbours: see
    check_neighbours.
    """
    model = cfg.model
    if model.kind != "none":
        from scanner.models.loading import check_model_dir

        path, side = check_model_dir(model)
        if side != cfg.data.resolution:
            raise ConfigError(f"data.resolution is {cfg.data.resolution} but the model at {str(path)!r} takes "
                              f"{side}x{side} images: set data.resolution: {side}")
        model = dataclasses.replace(model, path=str(path))
    classify = cfg.classify
    if classify.calibration_shards:  # held-out images for the detector's cut: scored at the end, checked now
        from scanner.data.shards import expand_shards
        from scanner.errors import ShardSpecError

        try:
            held = expand_shards(classify.calibration_shards, strict=cfg.data.strict_shards)
            classify = dataclasses.replace(classify, calibration_shards=held)
        except ShardSpecError as e:
            raise ConfigError(f"classify.calibration_shards: {e}") from None
    return dataclasses.replace(cfg, model=model, classify=classify, neighbours=check_neighbours(cfg.neighbours))
