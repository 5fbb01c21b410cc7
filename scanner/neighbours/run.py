"""The neighbours half end to end, in one process: what `memscan dedup` runs (the Ray job reuses the parts).

    summary = run_dedup(shards, out_dir, cfg)     # cfg: NeighboursConfig

1. no cfg.clip_checkpoint: train the copy-detection embedder on the corpus, cached in
   out_dir/embedder (reused when its open_clip_config.json exists), and say so;
2. embed each shard into out_dir/embeddings/<shard>.parquet (skipped when present);
3. index the good rows (flat / hnsw / ivf by size), measure recall of an approximate index;
4. duplicate groups (bytes, pHash, cosine >= cfg.dup_threshold) -> out_dir/duplicates.parquet;
   removal rows (reason 'duplicate') -> out_dir/removal_list.parquet + .txt;
   embedding failures -> out_dir/errors.parquet (stage 'embed').
Returns the summary dict (counts, thresholds, embedder, index info, timings) for summary.json.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd

from scanner.files import atomic_write_parquet, atomic_write_text
from scanner.neighbours.dedup import KEEP_RULE, duplicate_removals, find_duplicate_groups
from scanner.neighbours.store import shard_images
from scanner.progress import ShardProgress
from scanner.schema import DUPLICATES, ERRORS, REMOVAL, REPLICATIONS

# pHash Hamming radius of the near-exact pass: measured on the demo corpus, 2 bits links re-encodes
# and light colour changes at pair precision 0.9998; 6 bits already merges distinct images.
PHASH_MAX_DIST = 2


def ensure_embedder(shards, out_dir: Path, cfg, log=print, steps: int | None = None) -> tuple[str, bool]:
    """cfg.clip_checkpoint, or the embedder trained on `shards` under out_dir/embedder. Returns (path, trained_now)."""
    from scanner.neighbours.checkpoint import CONFIG_NAME
    from scanner.neighbours.train_embedder import DEFAULT_STEPS, train_embedder

    if cfg.clip_checkpoint:
        return cfg.clip_checkpoint, False
    cached = out_dir / "embedder"
    if (cached / CONFIG_NAME).is_file():
        log(f"dedup: no neighbours.clip_checkpoint given; using the copy-detection embedder trained earlier at {cached}")
        return str(cached), False
    log(f"dedup: no neighbours.clip_checkpoint given; training the copy-detection embedder on this corpus "
        f"(cached at {cached})")
    train_embedder(shards, cached, cfg, steps=steps or getattr(cfg, "train_steps", DEFAULT_STEPS),
                   max_images=getattr(cfg, "embedder_max_images", 50_000), log=log)
    return str(cached), True


def run_dedup(shards, out_dir, cfg, log=print, train_steps: int | None = None, model_dir: str | None = None,
              allow_pickle: bool = False, use_ray: bool = False, progress: bool = False) -> dict:
    """Embed, index and group `shards` (a spec expand_shards accepts); write the outputs listed above.

    Returns the summary; dedup_corpus (same arguments) also returns the loaded embeddings.
    """
    return dedup_corpus(shards, out_dir, cfg, log, train_steps, model_dir, allow_pickle, use_ray, progress)[0]


def dedup_corpus(shards, out_dir, cfg, log=print, train_steps: int | None = None, model_dir: str | None = None,
                 allow_pickle: bool = False, use_ray: bool = False, progress: bool = False) -> tuple[dict, dict]:
    """run_dedup's work; returns (summary, embeddings as store.load_embeddings gives them).

    With `model_dir` (a diffusers model directory) and cfg.generations > 0 it also generates
    cfg.generations images from training captions, matches them against the training index and
    writes out_dir/replications.parquet (reason 'replicated' in the removal list).
    With `use_ray` the shards are embedded by a pool of Ray actors (GPU each where one exists), in
    whatever Ray is initialised (the scan's, or the cluster's); otherwise in this process. `progress`
    shows shards and images embedded, rate and ETA on stderr.
    """
    from scanner.data.shards import expand_shards
    from scanner.neighbours.embed import load_embedder
    from scanner.neighbours.index import build_index
    from scanner.neighbours.store import embed_shard, embedding_path, load_embeddings

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = expand_shards(shards)
    ckpt, trained = ensure_embedder(paths, out, cfg, log, train_steps)
    t_train = time.time() - t0
    embedder = load_embedder(dataclasses.replace(cfg, clip_checkpoint=ckpt))
    todo = [p for p in paths if not embedding_path(out, p, embedder.fingerprint).exists()]
    if use_ray and todo:
        embed_with_ray(todo, dataclasses.replace(cfg, clip_checkpoint=ckpt), out, log, progress=progress)
    elif todo:
        with ShardProgress(len(todo), "embed", progress) as bar:
            for p in todo:
                bar.update(1, shard_images(embed_shard(p, embedder, out)))
    files = [embed_shard(p, embedder, out) for p in paths]  # every one cached by now
    data = load_embeddings(files)
    t_embed = time.time() - t0 - t_train
    index, index_info = build_index(data["vectors"], cfg)
    dups = find_duplicate_groups(data["keys"], data["vectors"], data["sha256"], cfg.dup_threshold, k=cfg.k,
                                 index=index, phashes=data["phash"], phash_max_dist=cfg.phash_max_dist,
                                 sizes=data["pixels"])
    shard_of = dict(zip(data["keys"], data["shards"]))
    removal = duplicate_removals(dups, shard_of)
    t_rep = time.time()
    reps = None
    if model_dir and cfg.generations > 0:
        reps = replications(model_dir, embedder, index, data, cfg, allow_pickle, log, out_dir=out)
        atomic_write_parquet(reps, out / "replications.parquet", REPLICATIONS)
        extra = pd.DataFrame({"key": sorted(set(reps.loc[reps["replicated"], "matched_key"]))})
        extra = extra[~extra["key"].isin(set(removal["key"]))]
        extra = extra.assign(shard=extra["key"].map(shard_of), reason="replicated")
        removal = pd.concat([removal, extra[list(removal.columns)]], ignore_index=True)
    t_rep = time.time() - t_rep
    atomic_write_parquet(dups, out / "duplicates.parquet", DUPLICATES)
    atomic_write_parquet(removal, out / "removal_list.parquet", REMOVAL)
    atomic_write_text("".join(f"{k}\n" for k in removal["key"]), out / "removal_list.txt")
    errors = data["errors"]
    atomic_write_parquet(errors, out / "errors.parquet", ERRORS)
    summary = {
        "counts": {"seen": len(data["keys"]) + len(errors), "embedded": len(data["keys"]), "errors": len(errors),
                   "duplicate_groups": int(dups["group_id"].nunique()), "duplicates": int((~dups["keep"]).sum()),
                   "removed": len(removal)},
        "thresholds": {"dup_threshold": cfg.dup_threshold, "phash_max_dist": cfg.phash_max_dist, "keep_rule": KEEP_RULE},
        "embedder": {"checkpoint": ckpt, "architecture": embedder.name, "dim": embedder.dim,
                     "image_size": embedder.image_size, "trained_on_this_corpus": trained or ckpt == str(out / "embedder")},
        "index": index_info,
        "embedding_files": [str(f) for f in files],
        "replications": None if reps is None else {
            "generations": int(cfg.generations), "threshold": cfg.rep_threshold,
            "replicated": int(reps["replicated"].sum()), "rate": float(reps["replicated"].mean()) if len(reps) else 0.0,
            "distinct_training_images": int(reps.loc[reps["replicated"], "matched_key"].nunique())},
        "links": dups["link"].value_counts().to_dict(),
        "timings_s": {"train_embedder": round(t_train, 1), "embed": round(t_embed, 1),
                      "replications": round(t_rep, 1),
                      "index_and_groups": round(time.time() - t0 - t_train - t_embed - t_rep, 1)},
    }
    log(f"dedup: {summary['counts']['duplicate_groups']} groups, {summary['counts']['removed']} to remove, "
        f"{summary['counts']['errors']} errors; outputs in {out}")
    return summary, data


def replications(model_dir, embedder, index, data: dict, cfg, allow_pickle: bool = False, log=print,
                 out_dir: str | Path | None = None) -> pd.DataFrame:
    """Generate cfg.generations images with the scanned model, match each to its nearest training image.

    Captions for a text-conditional model are the training captions in key order (the i-th
    generation uses caption i mod N, seed = cfg seed + i), so every row can be regenerated alone.
    Returns every generation (gen_id, caption, seed, matched_key, similarity, replicated).
    """
    from scanner.neighbours.replicate import find_replications, generate_samples

    captions = [c for c in data.get("captions", []) if c] or None
    log(f"replications: generating {cfg.generations} images with {model_dir} ({cfg.gen_steps} steps each)")
    images, meta = generate_samples(model_dir, cfg.generations, seed=0, steps=cfg.gen_steps, captions=captions,
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


class EmbedShards:
    """Ray Data actor: loads the embedder once, embeds whole shards (one parquet file per shard)."""

    def __init__(self, cfg: dict, out_dir: str):
        """cfg: a NeighboursConfig as a plain dict (no object-store reference to lose on an actor restart)."""
        from scanner.config import NeighboursConfig
        from scanner.neighbours.embed import load_embedder

        self.embedder = load_embedder(NeighboursConfig(**cfg))
        self.out = out_dir

    def __call__(self, batch: dict) -> dict:
        from scanner.neighbours.store import embed_shard

        files = [embed_shard(p, self.embedder, self.out) for p in batch["path"]]
        return {"file": [str(f) for f in files], "images": [shard_images(f) for f in files]}


def embed_with_ray(paths: list[str], cfg, out: Path, log=print, actors: int | None = None,
                   progress: bool = False) -> list[str]:
    """Embed `paths` with a Ray Data actor pool; returns the embedding files (the same as embed_shard's)."""
    import ray

    from scanner.raystart import start_ray

    start_ray()  # the scan's Ray when it runs, else $RAY_ADDRESS or a local one on loopback
    gpus = ray.cluster_resources().get("GPU", 0)
    gpu = gpus > 0
    n = actors or max(1, int(gpus))
    log(f"embedding {len(paths)} shards with {n} Ray actor(s) on {'GPU' if gpu else 'CPU'}")
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    ds = ds.map_batches(EmbedShards, fn_constructor_kwargs={"cfg": dataclasses.asdict(cfg), "out_dir": str(out)},
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=n), num_gpus=1 if gpu else 0,
                        num_cpus=0 if gpu else 1)
    files = []
    with ShardProgress(len(paths), "embed", progress) as bar:
        for r in ds.iter_rows():
            files.append(r["file"])
            bar.update(1, int(r["images"]))
    return files
