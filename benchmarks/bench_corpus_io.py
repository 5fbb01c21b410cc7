"""The corpus steps of a small scan whose --out is in object storage: part files read one by one, or IO_THREADS at a
time (scanner.corpus.executor.LocalExecutor), on a local S3 server, with a local --out as the floor.

    python benchmarks/bench_corpus_io.py               # about 2 minutes on 2 cores
    python benchmarks/bench_corpus_io.py --rounds 3

A corpus built like the kill tests' (tests/test_scan.py: 16 shards of 8 images, corrupt and caption-less members)
and a random tiny pixel UNet; one local Ray for every run. Each round scans the corpus into a local folder, into
the bucket with one reading thread and into the bucket with IO_THREADS (a fresh --out each), in that order; the
corpus steps' seconds come from each summary.json (corpus.steps), best of the rounds. The three runs must give the
same scores. Records the machine's load with the times.
Results: benchmarks/results/corpus_io.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from local_s3 import UNSET, LocalS3
from results_file import write_results

BUCKET = "memscan-bench-io"


def tiny_model(root: Path) -> Path:
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                layers_per_block=1, norm_num_groups=8).save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    return root


def scan(shards: Path, model: Path, out: str, threads: int) -> dict:
    """run_scan into `out` with the corpus steps reading `threads` part files at a time (the module constant the
    corpus run passes to its local executor). Returns summary.json."""
    import scanner.corpus.run as corpus_run
    from scanner.config import load_config
    from scanner.pipeline import run_scan
    from scanner.storage import Out

    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"data.shards={shards}", f"model.path={model}", "data.resolution=8", "neighbours.enabled=false",
        "geometry.probes=2", "geometry.lpca_k=5", "data.batch_size=8"])
    saved = corpus_run.IO_THREADS
    corpus_run.IO_THREADS = threads
    try:
        run_scan(cfg, out, progress=False)
    finally:
        corpus_run.IO_THREADS = saved
    return Out(out).read_json("summary.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import logging

    import pandas as pd
    import ray

    from scanner.corpus.store import IO_THREADS
    from scanner.demo.corpus import build_demo_corpus
    from scanner.stages.cluster import LOCAL_RAY_SYSTEM_CONFIG
    from scanner.storage import Out

    tmp = Path(tempfile.mkdtemp(prefix="bench-corpus-io-"))
    corpus = build_demo_corpus(tmp / "corpus", n_unique=60, n_repeated=2, repeat_copies=20, n_oversampled=3,
                               n_exact_dup_groups=3, n_near_dup_groups=3, n_corrupt=3, n_no_caption=4, size=16,
                               samples_per_shard=8, seed=0)
    model = tiny_model(tmp / "model")
    server = LocalS3(log=tmp / "moto.log")
    server.start()
    for k in UNSET:
        os.environ.pop(k, None)
    os.environ.update(server.env)  # before ray.init: the workers inherit it
    server.client().create_bucket(Bucket=BUCKET)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    load = [os.getloadavg()[0]]
    runs: dict[str, list[dict]] = {"local": [], "s3, 1 thread": [], f"s3, {IO_THREADS} threads": []}
    scores = {}
    try:
        for r in range(args.rounds):
            for name, out, threads in (("local", str(tmp / f"out-{r}"), IO_THREADS),
                                       ("s3, 1 thread", f"s3://{BUCKET}/one-{r}", 1),
                                       (f"s3, {IO_THREADS} threads", f"s3://{BUCKET}/many-{r}", IO_THREADS)):
                t0 = time.perf_counter()
                s = scan(corpus.shards[0].parent, model, out, threads)
                steps = {k: v["seconds"] for k, v in s["corpus"]["steps"].items()}
                runs[name].append({"scan_s": round(time.perf_counter() - t0, 2), "corpus_s": round(sum(steps.values()), 2),
                                   "steps": steps, "io_threads": s["corpus"].get("io_threads")})
                df = pd.concat([Out(out).read_parquet(f"scores/{f}") for f in Out(out).names("scores", ".parquet")])
                scores[name] = df.sort_values("key").reset_index(drop=True)[["key", "score_norm", "mem_class"]]
                print(name, runs[name][-1]["corpus_s"], "s corpus steps", flush=True)
    finally:
        ray.shutdown()
        server.stop()
    load.append(os.getloadavg()[0])
    names = list(runs)
    for n in names[1:]:
        pd.testing.assert_frame_equal(scores[n], scores["local"])
    best = {n: min(runs[n], key=lambda x: x["corpus_s"]) for n in names}
    lines = ["# Corpus steps of a scan into object storage: part files read one by one or at once", "",
             (f"{len(corpus.shards)} shards, best of {args.rounds} rounds; local S3 server (moto, 127.0.0.1); "
              f"1-min load {load[0]:.2f} before, {load[1]:.2f} after, {os.cpu_count()} CPUs; the three give the "
              "same scores."), "",
             "| --out | corpus steps (s) | " + " | ".join(best["local"]["steps"]) + " |",
             "|---|---|" + "---|" * len(best["local"]["steps"])]
    for n in names:
        lines.append(f"| {n} | {best[n]['corpus_s']:.2f} | " + " | ".join(f"{v:.2f}" for v in best[n]["steps"].values())
                     + " |")
    one, many = best["s3, 1 thread"]["corpus_s"], best[f"s3, {IO_THREADS} threads"]["corpus_s"]
    lines += ["", (f"{IO_THREADS} threads: {one / max(many, 1e-9):.1f}x faster than one on the bucket; "
                   f"{many / max(best['local']['corpus_s'], 1e-9):.1f}x the local --out."), ""]
    write_results(HERE / "results", "corpus_io", {"rounds": runs, "best": best, "load_1min": load,
                                                   "shards": len(corpus.shards), "io_threads": IO_THREADS},
                  "\n".join(lines))


if __name__ == "__main__":
    main()
