"""The read stage from a local S3 server against local disk, on the demo corpus (issue #33: within 1.3x).

    python benchmarks/bench_storage.py                       # builds the demo corpus in a temporary folder
    python benchmarks/bench_storage.py --corpus runs/demo/corpus --rounds 7

Starts moto's S3 server (local_s3.py: `python -m moto.server`, its own process on 127.0.0.1, so serving does not
share this process's interpreter lock), uploads corpus/shards/ to it, and reads every shard with the read stage
(scanner.stages.read.read_shard: tar streaming, sha256, one decode to the demo config's model, embedder and preview
sides) from local disk and from s3:// through s3fs, alternating local and S3 round by round, best of N each. The
same for the tar stream alone (iter_tar_samples: bytes, no decode), where any storage overhead shows undiluted.
One process, one shard at a time: the Ray task's work, without Ray's scheduling noise. Both reads must give the same
rows. Records the machine's load (1-minute load average before and after, CPU count) with the times.
Results: benchmarks/results/storage.{md,json}. About a minute on 2 cores (most of it building the corpus).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
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

BUCKET = "memscan-bench"


def read_stage(paths: list[str], spec) -> tuple[float, list]:
    """(wall seconds, every row's (key, sha256, error)) of the read stage over `paths`, one after another."""
    from scanner.stages.read import read_shard

    t0 = time.perf_counter()
    rows = []
    for p in paths:
        for batch in read_shard(p, spec):
            rows += zip(batch["key"], batch["sha256"], batch["error"])
    return time.perf_counter() - t0, rows


def tar_stream(paths: list[str]) -> tuple[float, list]:
    from scanner.data.shards import iter_tar_samples

    t0 = time.perf_counter()
    rows = [(r["key"], len(r["image"] or b""), r["error"]) for p in paths for r in iter_tar_samples(p)]
    return time.perf_counter() - t0, rows


def count_requests(paths: list[str]) -> dict:
    """S3 API calls per shard read (botocore's before-call event on s3fs's client)."""
    from local_s3 import counted_s3_calls

    from scanner.data.shards import iter_tar_samples

    with counted_s3_calls() as calls:
        for p in paths:
            for _ in iter_tar_samples(p):
                pass
    return {k: round(v / len(paths), 2) for k, v in sorted(calls.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", help="a demo corpus folder (corpus/ of `memscan demo`); default: build one")
    ap.add_argument("--rounds", type=int, default=5, help="alternating local/S3 rounds; best of them is reported")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()

    from scanner.config import load_config
    from scanner.stages.read import ReadSpec

    cfg = load_config(ROOT / "configs" / "demo.yaml", ["model.path=unused"])  # no model is loaded here
    # the demo scan's read stage: the model's side, the embedder's, the preview (scanner.pipeline.build_steps)
    spec = ReadSpec(model_side=cfg.data.resolution, model_channels=cfg.data.channels,
                    embed_side=cfg.neighbours.image_size, max_pixels=cfg.data.max_image_pixels,
                    preview_size=cfg.data.preview_size)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        if a.corpus:
            corpus = Path(a.corpus)
        else:
            from scanner.demo.corpus import build_demo_corpus

            corpus = Path(tmp) / "corpus"
            build_demo_corpus(corpus, seed=0, n_heldout=0)  # the demo's corpus (held-out images are not in shards/)
        built = time.time() - t0
        local_paths = sorted((corpus / "shards").glob("*.tar"))
        local = [str(p.resolve()) for p in local_paths]
        nbytes = sum(p.stat().st_size for p in local_paths)
        server = LocalS3().start()
        os.environ.update(server.env)  # s3fs (count_requests, the read stage) finds it as a user's store
        for k in UNSET:
            os.environ.pop(k, None)
        try:
            url = server.upload(corpus / "shards", BUCKET, "shards")
            s3 = [f"{url}/{p.name}" for p in local_paths]
            requests = count_requests(s3)
            times: dict[str, dict[str, list[float]]] = {"read_stage": {"local": [], "s3": []},
                                                        "tar_stream": {"local": [], "s3": []}}
            for r in range(a.rounds):
                # alternate which store goes first, so a warming cache or a load spike does not favour one
                order = [("local", local), ("s3", s3)] if r % 2 == 0 else [("s3", s3), ("local", local)]
                for store, paths in order:
                    seconds, rows = read_stage(paths, spec)
                    times["read_stage"][store].append(seconds)
                    if store == "local":
                        local_rows = rows
                    else:
                        s3_rows = rows
                    seconds, _ = tar_stream(paths)
                    times["tar_stream"][store].append(seconds)
            assert s3_rows == local_rows, "S3 and local disk gave different rows"
        finally:
            server.stop()
    load_after = os.getloadavg()
    import fsspec
    import s3fs

    result = {
        "corpus": {"shards": len(local), "images": sum(1 for k, _, e in local_rows if k is not None and e is None),
                   "rows": len(local_rows), "built_s": round(built, 1), "bytes": nbytes},
        "spec": {"model_side": spec.model_side, "embed_side": spec.embed_side, "preview_size": spec.preview_size},
        "rounds": a.rounds,
        "seconds": {k: {s: [round(x, 4) for x in v] for s, v in d.items()} for k, d in times.items()},
        "best_s": {k: {s: round(min(v), 4) for s, v in d.items()} for k, d in times.items()},
        "median_s": {k: {s: round(statistics.median(v), 4) for s, v in d.items()} for k, d in times.items()},
        "ratio_best": {k: round(min(d["s3"]) / min(d["local"]), 3) for k, d in times.items()},
        "s3_requests_per_shard": requests,
        "machine": {"cpus": os.cpu_count(), "load_1min_before": round(load_before[0], 2),
                    "load_1min_after": round(load_after[0], 2), "platform": platform.platform(),
                    "python": platform.python_version(), "fsspec": fsspec.__version__, "s3fs": s3fs.__version__},
        "s3_server": "moto server mode (python -m moto.server) on 127.0.0.1, its own process",
        "command": "python benchmarks/bench_storage.py" + (f" --corpus {a.corpus}" if a.corpus else "")
                   + (f" --rounds {a.rounds}" if a.rounds != 5 else ""),
    }
    m = result["machine"]
    c, med, ratio = result["corpus"], result["median_s"], result["ratio_best"]
    intro = (f"The demo corpus ({c['shards']} shards, {c['images']} images, {c['bytes'] / 1e6:.1f} MB) read shard "
             f"after shard in one process, from local disk and from a local S3 server ({result['s3_server']}) "
             f"through s3fs; {a.rounds} rounds alternating the two, best of {a.rounds}. Read stage: "
             f"scanner.stages.read.read_shard with the demo config's sides (model {spec.model_side} px, embedder "
             f"{spec.embed_side} px, preview {spec.preview_size} px). Tar stream: iter_tar_samples alone (bytes, no "
             "decode). Both stores gave the same rows.")
    table = [f"| {label} | {result['best_s'][k]['local']:.3f} | {result['best_s'][k]['s3']:.3f} | {ratio[k]:.2f}x | "
             f"{med[k]['local']:.3f} / {med[k]['s3']:.3f} |"
             for label, k in (("read stage", "read_stage"), ("tar stream only", "tar_stream"))]
    calls = ", ".join(f"{k} {v:g}" for k, v in requests.items())
    machine = (f"{m['cpus']} CPUs, 1-minute load {m['load_1min_before']} before and {m['load_1min_after']} after; "
               f"{m['platform']}, Python {m['python']}, fsspec {m['fsspec']}, s3fs {m['s3fs']}")
    md = "\n".join(["# The read stage from S3 against local disk (`benchmarks/bench_storage.py`)", "", intro, "",
                    "| what | local disk (s) | S3 (s) | S3 / local (best) | median local / S3 (s) |",
                    "|---|---|---|---|---|", *table, "",
                    (f"S3 requests per shard: {calls} (one HEAD for the size, one ranged GET per 16 MiB). "
                    f"Machine: {machine}."), "", f"Rerun: `{result['command']}`.", ""])
    write_results(Path(a.out), "storage", result, md)


if __name__ == "__main__":
    main()
