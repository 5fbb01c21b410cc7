"""Train the copy-detection embedder memscan ships (scanner/neighbours/shipped/), reproducibly, on one core.

    taskset -c 1 python benchmarks/train_shipped_embedder.py      # writes scanner/neighbours/shipped/ and
                                                                   # results/shipped_embedder.{md,json}

Why ship one: `memscan dedup` trained its embedder on every corpus for 600 fixed steps, 97 % of a 98 s run on 2,617
images (issue #34), where peers answer in seconds. This embedder is trained once, here, from images shipped inside
scikit-learn / scikit-image (nothing downloaded), and `memscan dedup` loads it from the package by its digest
(safetensors only; neighbours.train_embedder: true still trains one on the corpus).

Recipe (SSCD at this scale, issue #34 item 2): the memscan-copydet-rn16 tower, flip-pooled embeddings (embed.flip_pool:
an image and its mirror embed alike by construction), two views per image with augment.COPY_VIEWS (crops down to 60 %,
rotations up to 18 degrees, overlays, borders, grayscale, colour, down-up resize, blur/noise, JPEG q20-95), InfoNCE
plus KoLeo; TRAIN_IMAGES base images drawn by the demo corpus builder's pool (digits, LFW faces, photo crops) with the
seed TRAIN_SEED, a seed no benchmark builds a corpus from. The evaluation corpora draw from the same three datasets
(other crops, other digits and faces, and all of the 200 LFW faces): the embedder has seen some of their base images,
never their copies; a per-corpus embedder saw every one of them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from results_file import write_results

TRAIN_SEED = 9001
TRAIN_IMAGES = 4000
STEPS = 1200
BATCH = 256
SHIPPED = HERE.parent / "scanner" / "neighbours" / "shipped"


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from scanner.demo.corpus import _image_pool
    from scanner.neighbours.augment import COPY_VIEWS
    from scanner.neighbours.checkpoint import checkpoint_digest
    from scanner.neighbours.train_embedder import DEFAULT_ARCH, save_embedder, train_on_images
    from scanner.procfs import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--images", type=int, default=TRAIN_IMAGES)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=SHIPPED)
    ap.add_argument("--results", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    t0 = time.time()
    pool = _image_pool(a.images, 32, np.random.default_rng([TRAIN_SEED, 0xC0DE]))
    images = np.stack([b.image for b in pool])
    t_pool = time.time() - t0
    model, record = train_on_images(images, steps=a.steps, batch_size=a.batch, seed=TRAIN_SEED, edits=COPY_VIEWS,
                                    flip_invariant=True, threads=a.threads, log=print)
    record["train_images"] = {"seed": TRAIN_SEED, "images": len(images),
                              "kinds": {k: sum(b.kind == k for b in pool) for k in ("digit", "face", "photo")},
                              "digest": hashlib.sha256(images.tobytes()).hexdigest()[:16]}
    save_embedder(model, DEFAULT_ARCH, 32, a.out, record, text_vocab=16)
    files = {f.name: os.path.getsize(f) for f in sorted(a.out.iterdir())}
    data = {"record": record, "pool_seconds": round(t_pool, 1), "digest": checkpoint_digest(a.out), "files": files,
            "threads": a.threads, "machine": machine(), "load_1min": os.getloadavg()[0]}
    md = ["# The shipped copy-detection embedder (benchmarks/train_shipped_embedder.py)", "",
          (f"{record['steps']} steps of batch {record['batch_size']} on {len(images)} base images (seed {TRAIN_SEED}: "
          f"{record['train_images']['kinds']}), flip-pooled, views augment.COPY_VIEWS {COPY_VIEWS}; "
          f"{record['seconds']} s on {a.threads} thread(s) (1-min load average at the end "
          f"{data['load_1min']:.2f}), final InfoNCE {record['final_infonce']}, KoLeo {record['final_koleo']}."), "",
          f"Checkpoint digest {data['digest']}; files: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in files.items())
          + ".", "", f"Held-in calibration (cosine percentiles): {record['calibration']}."]
    write_results(a.results, "shipped_embedder", data, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
