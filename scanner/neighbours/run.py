"""The neighbours half of a scan: duplicate groups and replications over the embedded rows.

The embeddings come from the pipeline's embed stage (scanner/stages/embed.py), which reads each
shard once together with scoring; this module does the corpus-wide part:
1. no cfg.clip_checkpoint: ensure_embedder trains the copy-detection embedder on a bounded sample of
   the corpus, cached in out_dir/embedder (reused when its open_clip_config.json exists), and says so;
2. index the embedded rows (flat / hnsw / ivf by size), measure recall of an approximate index;
3. duplicate groups (bytes, pHash, cosine >= cfg.dup_threshold);
4. with a model: generations from training captions matched against the index (replications).
finalize writes the tables; this module writes none.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import pandas as pd

from scanner.neighbours.dedup import KEEP_RULE, find_duplicate_groups

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


def neighbours(data: dict, cfg, checkpoint: str, trained: bool, out: Path, model_dir: str | None = None,
               allow_pickle: bool = False, seed: int = 0, log=LOG.info) -> tuple[dict, pd.DataFrame, pd.DataFrame | None]:
    """Duplicate groups (and replications when `model_dir` is given and cfg.generations > 0) of `data`.

    data: keys, shards, captions, sha256, pixels, phash (N,) uint64, vectors (N, d) float32 unit rows,
    one entry per searched row (finalize.neighbour_rows). Returns (the summary's `neighbours` part,
    duplicates, replications or None).
    """
    from scanner.neighbours.index import build_index

    t0 = time.time()
    index, index_info = build_index(data["vectors"], cfg)
    dups = find_duplicate_groups(data["keys"], data["vectors"], data["sha256"], cfg.dup_threshold, k=cfg.k,
                                 index=index, phashes=data["phash"], phash_max_dist=cfg.phash_max_dist,
                                 sizes=data["pixels"])
    t_groups = time.time() - t0
    reps = None
    embedder = None
    rep_error = None
    if model_dir and cfg.generations > 0:
        from scanner.neighbours.embed import load_embedder

        embedder = load_embedder(dataclasses.replace(cfg, clip_checkpoint=checkpoint))
        try:
            reps = replications(model_dir, embedder, index, data, cfg, allow_pickle, log, out_dir=out, seed=seed)
        except Exception as e:  # noqa: BLE001 - a failed generation check must not cost the scan's other tables
            rep_error = f"{type(e).__name__}: {e}"
            LOG.error("replications: the generation check failed (%s); every other table is written, and "
                      "summary.json says so", rep_error)
    summary = {
        "counts": {"embedded": len(data["keys"]), "duplicate_groups": int(dups["group_id"].nunique()),
                   "duplicates": int((~dups["keep"]).sum())},
        "thresholds": {"dup_threshold": cfg.dup_threshold, "phash_max_dist": cfg.phash_max_dist, "keep_rule": KEEP_RULE},
        "embedder": {"checkpoint": checkpoint, "architecture": embedder.name if embedder else cfg.clip_model,
                     "dim": int(data["vectors"].shape[1]) if len(data["keys"]) else None,
                     "image_size": cfg.image_size,
                     "trained_on_this_corpus": trained or checkpoint == str(out / "embedder")},
        "index": index_info,
        "replications": {"error": rep_error} if rep_error else None if reps is None else {
            "generations": int(cfg.generations), "threshold": cfg.rep_threshold,
            "replicated": int(reps["replicated"].sum()), "rate": float(reps["replicated"].mean()) if len(reps) else 0.0,
            "distinct_training_images": int(reps.loc[reps["replicated"], "matched_key"].nunique())},
        "links": dups["link"].value_counts().to_dict(),
        "timings_s": {"index_and_groups": round(t_groups, 1), "replications": round(time.time() - t0 - t_groups, 1)},
    }
    log(f"neighbours: {summary['counts']['duplicate_groups']} duplicate groups over {len(data['keys'])} images")
    return summary, dups, reps


def replications(model_dir, embedder, index, data: dict, cfg, allow_pickle: bool = False, log=LOG.info,
                 out_dir: str | Path | None = None, seed: int = 0) -> pd.DataFrame:
    """Generate cfg.generations images with the scanned model, match each to its nearest training image.

    Captions for a text-conditional model are the training captions in key order (the i-th
    generation uses caption i mod N, seed = `seed` + i: the config's run seed), so every row can be regenerated alone.
    Returns every generation (gen_id, caption, seed, matched_key, similarity, replicated).
    """
    from scanner.neighbours.replicate import find_replications, generate_samples

    captions = [c for c in data.get("captions", []) if c] or None
    log(f"replications: generating {cfg.generations} images with {model_dir} ({cfg.gen_steps} steps each)")
    images, meta = generate_samples(model_dir, cfg.generations, seed=seed, steps=cfg.gen_steps, captions=captions,
                                    allow_pickle=allow_pickle)
    reps = find_replications(embedder.embed(images), meta, index, list(data["keys"]), cfg.rep_threshold,
                             keep_all=True)
    if out_dir is not None:  # the report shows each generation beside its match
        from PIL import Image

        gdir = Path(out_dir) / "replications"
        gdir.mkdir(parents=True, exist_ok=True)
        for img, m in zip(images, meta):
            Image.fromarray(img).save(gdir / f"gen_{m['gen_id']}.png")
    log(f"replications: {int(reps['replicated'].sum())} of {len(reps)} generations match a training image "
        f"at cosine >= {cfg.rep_threshold}")
    return reps
