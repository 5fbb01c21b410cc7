"""The copy-detection embedder a scan uses: the given checkpoint, or one trained on the corpus.

The embeddings come from the pipeline's embed stage (scanner/stages/embed.py); duplicate groups and
replications are corpus steps (scanner/corpus/neighbours.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

LOG = logging.getLogger("memscan")


def ensure_embedder(shards, out_dir: Path, cfg, log=LOG.info) -> tuple[str, bool]:
    """cfg.clip_checkpoint, or the embedder trained on `shards` under out_dir/embedder. Returns (path, trained_now).

    Training reads a bounded, seeded sample (cfg.embedder_max_images; train_embedder.training_sample) and
    runs cfg.train_steps steps; call it before Ray starts, so training has the CPUs to itself.
    """
    from scanner.neighbours.checkpoint import CONFIG_NAME
    from scanner.neighbours.train_embedder import train_embedder

    if cfg.clip_checkpoint:
        return cfg.clip_checkpoint, False
    cached = Path(out_dir) / "embedder"
    if (cached / CONFIG_NAME).is_file():
        log(f"neighbours: no neighbours.clip_checkpoint given; using the copy-detection embedder trained earlier "
            f"at {cached}")
        return str(cached), False
    log(f"neighbours: no neighbours.clip_checkpoint given; training the copy-detection embedder on this corpus "
        f"(cached at {cached})")
    train_embedder(shards, cached, cfg, steps=cfg.train_steps, max_images=cfg.embedder_max_images, log=log)
    return str(cached), True
