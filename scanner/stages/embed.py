"""The embed stage: the copy-detection embedding and the perceptual hash of every readable image.

Reads `image_embed` (decoded once by the read stage at the embedder's side); writes `embedding`
(B, d) float32 unit rows, `phash` (int64 bits of the 64-bit pHash), `thumb` (B, S*S*3) uint8 when
neighbours.align_size S > 0 (the pixels duplicate candidates are checked on, scanner/neighbours/align.py) and
`embed_error` (None, or why this row has no embedding: a row that failed reading or decoding has neither, and says so in
`error`). Embedding runs before scoring and its failure leaves `error` alone, so a row that scores
badly is still grouped and a row that embeds badly is still scored. The embedder loads once per actor.
"""

from __future__ import annotations

import numpy as np

from scanner.stages.base import Stage


class EmbedStage(Stage):
    """cfg: the scan's NeighboursConfig (validated on the driver, clip_checkpoint set)."""

    name, runs = "embed", "actor"
    reads = ("image_embed", "marker", "error", "split")
    writes = ("embedding", "phash", "embed_error")
    drops = ("image_embed",)

    @classmethod
    def declared_writes(cls, cfg) -> tuple[str, ...]:
        return cls.writes + (("thumb",) if cfg.align_size else ())

    def setup(self) -> None:
        from scanner.neighbours.embed import load_embedder
        from scanner.stages.cluster import actor_device

        self.device, self.warning = actor_device("auto")
        self.embedder = load_embedder(self.cfg, device=self.device)
        self.align_size = self.cfg.align_size

    def process(self, batch: dict) -> dict:
        from scanner.neighbours.phash import phash64

        n = len(batch["key"])
        ok = np.flatnonzero([(not m) and (e is None) and s == "corpus"
                             for m, e, s in zip(batch["marker"], batch["error"], batch["split"])])
        emb = np.zeros((n, self.embedder.dim), np.float32)
        ph = np.zeros(n, np.int64)
        failed = np.full(n, None, dtype=object)
        thumb = np.zeros((n, self.align_size ** 2 * 3), np.uint8) if self.align_size else None
        if len(ok):
            try:
                images = batch["image_embed"][ok]
                emb[ok] = self.embedder.embed(images)
                ph[ok] = phash64(images).astype(np.int64)
                if thumb is not None:
                    from scanner.neighbours.align import thumbnails

                    thumb[ok] = thumbnails(images, self.align_size)
            except Exception as e:  # noqa: BLE001 - a failed batch becomes error rows, never a dead job
                failed[ok] = f"embedding failed: {type(e).__name__}: {e}"
        result = {k: v for k, v in batch.items() if k != "image_embed"}
        result["embedding"], result["phash"], result["embed_error"] = emb, ph, failed
        if thumb is not None:
            result["thumb"] = thumb
        return result
