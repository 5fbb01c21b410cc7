"""The score stage: every geometry column of every readable image, under the diffusion model.

Reads `image_model` (and `caption` for a text-conditional model); writes the columns of
scanner.geometry.scores.score_columns and `vector`, the image in model space (float16, for LID_* by local
PCA). A held-out row (split `heldout`: classify.calibration_shards) gets the detector column alone, the value
a full scan gives it, for the cut. A batch that fails, or a row whose score is not finite, becomes error rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from scanner.config import GeometryConfig, ModelConfig
from scanner.stages.base import Stage


@dataclass(frozen=True)
class ScoreSpec:
    """The score stage's config: the model, the geometry, the input side, and the detector held-out rows get."""

    model: ModelConfig
    geometry: GeometryConfig
    resolution: int
    detector: str | None = None  # the one column of held-out rows (None: no held-out rows in this scan)

    @classmethod
    def of(cls, cfg) -> ScoreSpec:
        """The score stage's section of a ScanConfig."""
        return cls(cfg.model, cfg.geometry, cfg.data.resolution,
                   cfg.classify.detector if cfg.classify.calibration_shards else None)


class ScoreStage(Stage):
    name, runs = "score", "actor"
    reads = ("image_model", "caption", "key", "marker", "error", "error_stage", "split")
    writes = ("vector", "error", "error_stage")
    drops = ("image_model",)

    @classmethod
    def declared_writes(cls, cfg: ScoreSpec) -> tuple[str, ...]:
        from scanner.geometry.scores import score_columns

        # the conditional columns only appear with a text-conditional model: declared both ways, so a stage
        # after this one may read them whatever the model turns out to be
        return cls.writes + tuple(dict.fromkeys(score_columns(cfg.geometry, False) + score_columns(cfg.geometry,
                                                                                                    True)))

    def setup(self) -> None:
        from scanner.geometry.scores import score_columns
        from scanner.models.loading import load_score_model, model_resolution
        from scanner.stages.cluster import actor_device

        cfg = self.cfg
        self.device, self.warning = actor_device(cfg.model.device)
        self.model = load_score_model(dataclasses.replace(cfg.model, device=self.device))
        res = model_resolution(self.model)
        if res != cfg.resolution:  # preflight.check_scan already said so on the driver
            raise ValueError(f"data.resolution={cfg.resolution} but the model at {cfg.model.path} expects "
                             f"{res}x{res} images: set data.resolution: {res}")
        self.use_cond = bool(self.model.conditional)
        self.columns = score_columns(cfg.geometry, self.use_cond)
        if cfg.detector is not None and cfg.detector not in self.columns:
            raise ValueError(f"classify.detector {cfg.detector!r} is not a score column of this model "
                             f"({', '.join(self.columns)}): it cannot be calibrated")

    def process(self, batch: dict) -> dict:
        n = len(batch["key"])
        ok = np.array([(not m) and (e is None) for m, e in zip(batch["marker"], batch["error"])], dtype=bool)
        held = np.asarray(batch["split"] == "heldout", dtype=bool)
        out = {c: np.full(n, np.nan, np.float32) for c in self.columns}
        vec = np.zeros((n, self.model.dim), np.float16)
        error = batch["error"].copy()
        stage = batch["error_stage"].copy()
        for rows, only in ((np.flatnonzero(ok & ~held), None), (np.flatnonzero(ok & held), self.cfg.detector)):
            self._score(batch, rows, only, out, vec, error, stage)
        for i in np.flatnonzero(ok):
            if error[i] is None:
                bad = [c for c in ((self.cfg.detector,) if held[i] else self.columns) if not np.isfinite(out[c][i])]
                if bad:
                    error[i], stage[i] = f"non-finite score in {', '.join(bad)}", "score"
        result = {k: v for k, v in batch.items() if k != "image_model"}
        result.update(out)
        result["vector"] = vec
        result["error"], result["error_stage"] = error, stage
        return result

    def _score(self, batch: dict, idx: np.ndarray, only: str | None, out: dict, vec: np.ndarray, error: np.ndarray,
               stage: np.ndarray) -> None:
        """Scores rows `idx` into `out` / `vec` in model batches (only: that one column); a failed batch's rows
        become error rows."""
        import torch

        from scanner.geometry.mirror import pixel_mirrors
        from scanner.geometry.scores import compute_scores
        from scanner.geometry.trace import row_seeds

        g = self.cfg.geometry
        columns = (only,) if only else self.columns
        for start in range(0, len(idx), self.cfg.model.batch_size):
            sel = idx[start:start + self.cfg.model.batch_size]
            try:
                images = torch.from_numpy(batch["image_model"][sel])
                x = self.model.encode_images(images)
                cond = self.model.encode_text(list(batch["caption"][sel])) if self.use_cond else None
                seeds = row_seeds(batch["key"][sel], g.seed)
                # a latent model's mirror images (one VAE encode each), unless the one column asked for has no use
                x_refs = (pixel_mirrors(self.model, images, g.cal_refs)
                          if g.cal_refs and getattr(self.model, "mirrors_in_pixels", False)
                          and only not in ("score_norm", "cfg_norm") else None)
                scores = compute_scores(self.model, x, g, cond, seeds=seeds, x_refs=x_refs, only=only)
                for c in columns:
                    out[c][sel] = scores[c].numpy()
                vec[sel] = x.detach().reshape(len(sel), -1).cpu().numpy().astype(np.float16)
            except Exception as e:  # noqa: BLE001 - one bad batch must not kill the job: its rows become error rows
                for i in sel:
                    error[i], stage[i] = f"scoring failed: {type(e).__name__}: {e}", "score"
