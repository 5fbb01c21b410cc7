"""The copy-detection embedder a scan uses: the given checkpoint, or one trained on the corpus.

The embeddings come from the pipeline's embed stage (scanner/stages/embed.py); duplicate groups and
replications are corpus steps (scanner/corpus/neighbours.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

LOG = logging.getLogger("memscan")


SHIPPED = Path(__file__).resolve().parent / "shipped"  # benchmarks/train_shipped_embedder.py writes it


def shipped_embedder() -> str | None:
    """The copy-detection embedder shipped inside the package (an open_clip local directory, safetensors), or None
    when this install has none."""
    from scanner.neighbours.checkpoint import CONFIG_NAME, WEIGHTS_NAME

    return str(SHIPPED) if (SHIPPED / CONFIG_NAME).is_file() and (SHIPPED / WEIGHTS_NAME).is_file() else None


def ensure_embedder(shards, out, cfg, log=LOG.info) -> tuple[str, bool]:
    """cfg.clip_checkpoint; else the shipped embedder (unless cfg.train_embedder); else the embedder trained on
    `shards` under OUT/embedder. Returns (path or URL, trained_now). out: the scan's --out (a path, URL or
    scanner.storage.Out).

    Training reads a bounded, seeded sample (cfg.embedder_max_images; train_embedder.training_sample) and
    runs cfg.train_steps steps; call it before Ray starts, so training has the CPUs to itself. With an --out in
    object storage the embedder is trained in a local folder, then uploaded whole to OUT/embedder/ (the actors
    copy it from there once each).
    """
    import tempfile

    from scanner.neighbours.checkpoint import CONFIG_NAME
    from scanner.neighbours.train_embedder import train_embedder
    from scanner.storage import Out

    if cfg.clip_checkpoint:
        return cfg.clip_checkpoint, False
    shipped = None if getattr(cfg, "train_embedder", False) else shipped_embedder()
    if shipped:
        log(f"neighbours: no neighbours.clip_checkpoint given; using the copy-detection embedder shipped with memscan "
            f"({shipped})")
        return shipped, False
    out = out if isinstance(out, Out) else Out(out)
    cached = out.uri("embedder")
    if out.exists(f"embedder/{CONFIG_NAME}"):
        log(f"neighbours: no neighbours.clip_checkpoint given; using the copy-detection embedder trained earlier "
            f"at {cached}")
        return cached, False
    log(f"neighbours: no neighbours.clip_checkpoint given; training the copy-detection embedder on this corpus "
        f"(cached at {cached})")
    if out.local:
        train_embedder(shards, out.local_path("embedder"), cfg, steps=cfg.train_steps,
                       max_images=cfg.embedder_max_images, log=log)
        return cached, True
    with tempfile.TemporaryDirectory(prefix="memscan-embedder-") as tmp:
        local = Path(tmp) / "embedder"
        train_embedder(shards, local, cfg, steps=cfg.train_steps, max_images=cfg.embedder_max_images, log=log)
        # the config last: its presence is what marks the uploaded embedder whole
        for f in sorted(local.iterdir(), key=lambda f: f.name == CONFIG_NAME):
            out.write_bytes(f"embedder/{f.name}", f.read_bytes())
    return cached, True
