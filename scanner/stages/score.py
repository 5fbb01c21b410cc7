"""The score stage: every geometry column of every readable image, under the diffusion model.

Reads `image_model` (and `caption` for a text-conditional model); writes the columns of
scanner.geometry.scores.score_columns and `vector`, the image in model space (float16, for LID_*
by local PCA). A batch that fails, or a row whose score is not finite, becomes error rows.
"""

from __future__ import annotations

import numpy as np

from scanner.stages.base import Stage


class ScoreStage(Stage):
    name = "score"
    reads = ("image_model", "caption", "key")

    def setup(self) -> None:
        from scanner.config import config_from_dict
        from scanner.geometry.scores import score_columns
        from scanner.models.loading import load_score_model, model_resolution

        cfg = config_from_dict(self.cfg)
        self.config = cfg
        self.model = load_score_model(cfg.model)
        res = model_resolution(self.model)
        if res != cfg.data.resolution:  # preflight.check_scan already said so on the driver
            raise ValueError(f"data.resolution={cfg.data.resolution} but the model at {cfg.model.path} expects "
                             f"{res}x{res} images: set data.resolution: {res}")
        self.use_cond = bool(self.model.conditional)
        self.writes = (*score_columns(cfg.geometry, self.use_cond), "vector")
        self.only: str | None = None  # one column alone (the held-out images of calibrate.py need the detector only)

    def process(self, batch: dict) -> dict:
        import torch

        from scanner.geometry.mirror import pixel_mirrors
        from scanner.geometry.scores import compute_scores
        from scanner.geometry.trace import row_seeds

        cfg = self.config
        columns = (self.only,) if self.only else self.writes[:-1]
        n = len(batch["key"])
        ok = np.array([(not m) and (e is None) for m, e in zip(batch["marker"], batch["error"])], dtype=bool)
        out = {c: np.full(n, np.nan, np.float32) for c in columns}
        vec = np.zeros((n, self.model.dim), np.float16)
        error = batch["error"].copy()
        stage = batch["error_stage"].copy()
        idx = np.flatnonzero(ok)
        for start in range(0, len(idx), cfg.model.batch_size):
            sel = idx[start:start + cfg.model.batch_size]
            try:
                images = torch.from_numpy(batch["image_model"][sel])
                x = self.model.encode_images(images)
                cond = self.model.encode_text(list(batch["caption"][sel])) if self.use_cond else None
                seeds = row_seeds(batch["key"][sel], cfg.geometry.seed)
                # a latent model's mirror images (one VAE encode each), unless the one column asked for has no use
                x_refs = (pixel_mirrors(self.model, images, cfg.geometry.cal_refs)
                          if cfg.geometry.cal_refs and getattr(self.model, "mirrors_in_pixels", False)
                          and self.only not in ("score_norm", "cfg_norm") else None)
                scores = compute_scores(self.model, x, cfg.geometry, cond, seeds=seeds, x_refs=x_refs, only=self.only)
                for c in columns:
                    out[c][sel] = scores[c].numpy()
                vec[sel] = x.detach().reshape(len(sel), -1).cpu().numpy().astype(np.float16)
            except Exception as e:  # noqa: BLE001 - one bad batch must not kill the job: its rows become error rows
                for i in sel:
                    error[i], stage[i] = f"scoring failed: {type(e).__name__}: {e}", "score"
        for i in idx:
            if error[i] is None:
                bad = [c for c in columns if not np.isfinite(out[c][i])]
                if bad:
                    error[i], stage[i] = f"non-finite score in {', '.join(bad)}", "score"
        result = {k: v for k, v in batch.items() if k != "image_model"}
        result.update(out)
        result["vector"] = vec
        result["error"], result["error_stage"] = error, stage
        return result
