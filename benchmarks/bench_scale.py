"""Streaming at scale: peak memory of the driver and the Ray workers at 1x, 4x and 16x corpus size, and
whole-pipeline throughput against the slowest stage measured alone, in one run.

    python benchmarks/bench_scale.py --model /work/demo/model            # writes results/scale.{md,json}
    python benchmarks/bench_scale.py --model M --factors 1 4 --out /tmp/s

Corpus: the demo builder's shards (1x = `--base-shards` shards of 250 samples), copied 4x and 16x with
every key renamed (a 2-digit copy prefix), so a bigger corpus has the same images and no repeated key.
Each scan is a real `memscan scan` subprocess (Ray Data, local Ray, demo config, neighbours on with a
fixed embedder checkpoint, no generations). A sampler thread reads /proc every 0.2 s for the driver and
every process below it (raylet, GCS, Ray workers) and keeps: the driver's peak RSS, the largest single
worker's peak RSS, and the peak of the sum over all processes.

Stages alone, on the 1x corpus, in this process: read + decode (scanner.pipeline.read_decode_shard, no
Ray), scoring (ScoreStage.__call__ on decoded batches, no Ray), embedding (the embedder on decoded
images). The pipeline ratio is the scan's scoring-phase images/s (read + decode + score through Ray
Data, summary.json timings) over the slowest of read+decode and scoring alone.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from scanner.procfs import descendants

PAGE = os.sysconf("SC_PAGE_SIZE")


def replicate(base_shards: list[Path], factor: int, dst: Path) -> list[Path]:
    """factor copies of base_shards under dst, keys prefixed with the copy number (tar members streamed)."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for c in range(factor):
        for src in base_shards:
            path = dst / f"{c:02d}{src.stem}.tar"
            out.append(path)
            if path.exists():
                continue
            tmp = path.with_suffix(".tmp")
            with tarfile.open(src, "r") as tin, tarfile.open(tmp, "w") as tout:
                for m in tin:
                    data = tin.extractfile(m).read()
                    m.name = f"{c:02d}{m.name}"
                    tout.addfile(m, io.BytesIO(data))
            os.replace(tmp, path)
    return out


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


class MemorySampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.stop = pid, every, threading.Event()
        self.driver = self.worker = self.total = 0

    def run(self) -> None:
        while not self.stop.is_set():
            pids = descendants(self.pid)
            rss = {p: _rss(p) for p in pids}
            d = _rss(self.pid)
            self.driver = max(self.driver, d)
            self.worker = max([self.worker, *rss.values()])
            self.total = max(self.total, d + sum(rss.values()))
            time.sleep(self.every)


def run_scan(shards_dir: Path, model: Path, embedder: str, out: Path, extra: list[str]) -> dict:
    args = [sys.executable, "-m", "scanner", "scan", "--config", str(ROOT / "configs" / "demo.yaml"),
            "--shards", str(shards_dir), "--set", f"model.path={model}", "--set", "neighbours.generations=0",
            "--set", f"neighbours.clip_checkpoint={embedder}", "--out", str(out), "--no-progress", *extra]
    t0 = time.time()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    log = proc.communicate()[0]
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"scan failed ({proc.returncode}):\n{log[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": round(time.time() - t0, 1), "driver_peak_mb": round(sampler.driver / 2**20),
            "largest_worker_peak_mb": round(sampler.worker / 2**20), "all_processes_peak_mb": round(sampler.total / 2**20),
            "images": summary["counts"]["seen"],
            "scored": summary["counts"]["scored"], "timings_s": summary["timings_s"]}


def stages_alone(shards: list[Path], model: Path, embedder: str, threads: int) -> dict:
    import torch

    from scanner.config import load_config
    from scanner.neighbours.embed import load_embedder
    from scanner.pipeline import ScoreStage, read_decode_shard

    torch.set_num_threads(threads)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"model.path={model}", f"neighbours.clip_checkpoint={embedder}"])
    t0 = time.time()
    batches = [b for p in shards for b in read_decode_shard(str(p), cfg.data.resolution, cfg.data.channels,
                                                               cfg.data.max_image_pixels)]
    read_s = time.time() - t0
    n = sum(int((~b["marker"]).sum()) for b in batches)
    stage = ScoreStage(cfg, threads=threads)
    t0 = time.time()
    for b in batches:
        for i in range(0, len(b["key"]), cfg.data.batch_size):
            stage({k: v[i:i + cfg.data.batch_size] for k, v in b.items()})
    score_s = time.time() - t0
    from scanner.data.load import load_images

    _, images, _, _ = load_images([str(p) for p in shards], cfg.neighbours.image_size)
    emb = load_embedder(cfg.neighbours)
    t0 = time.time()
    emb.embed(images)
    embed_s = time.time() - t0
    return {"images": n, "read_decode_img_s": round(n / read_s, 1), "score_img_s": round(n / score_s, 1),
            "embed_img_s": round(len(images) / embed_s, 1), "torch_threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a trained demo model directory (memscan demo's out/model)")
    ap.add_argument("--embedder", default=None, help="embedder checkpoint dir (default: trained once, 200 steps)")
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--base-shards", type=int, default=4)
    ap.add_argument("--work", default="/tmp/memscan_scale")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    from scanner.data.demo import build_demo_corpus

    work = Path(a.work)
    base = build_demo_corpus(work / "base", samples_per_shard=250, seed=0) if not (work / "base" / "truth.parquet").exists() \
        else None
    base_shards = sorted((work / "base" / "shards").glob("*.tar"))[:a.base_shards]
    embedder = a.embedder
    if embedder is None:
        embedder = str(work / "embedder")
        if not (work / "embedder" / "open_clip_config.json").exists():
            from scanner.config import load_config
            from scanner.neighbours.train_embedder import train_embedder

            cfg = load_config(ROOT / "configs" / "demo.yaml", ["model.kind=none"])
            train_embedder([str(p) for p in base_shards], work / "embedder", cfg.neighbours, steps=200)
    rows = []
    for f in a.factors:
        shards = replicate(base_shards, f, work / f"x{f}")
        out = work / f"scan_x{f}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        r = {"factor": f, "shards": len(shards), **run_scan(work / f"x{f}", Path(a.model), embedder, out, [])}
        rows.append(r)
        print(json.dumps(r), flush=True)
    alone = stages_alone(base_shards, Path(a.model), embedder, threads=os.cpu_count() or 1)
    print(json.dumps(alone), flush=True)
    for r in rows:
        r["pipeline_img_s"] = round(r["scored"] / max(r["timings_s"]["scoring"], 1e-9), 1)
        r["pipeline_over_slowest_stage"] = round(r["pipeline_img_s"] / min(alone["read_decode_img_s"],
                                                                            alone["score_img_s"]), 3)
    first = rows[0]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "rows": rows, "stages_alone": alone,
              "driver_peak_ratio_last_over_first": round(rows[-1]["driver_peak_mb"] / first["driver_peak_mb"], 3),
              "largest_worker_peak_ratio_last_over_first":
                  round(rows[-1]["largest_worker_peak_mb"] / first["largest_worker_peak_mb"], 3),
              "all_processes_peak_ratio_last_over_first":
                  round(rows[-1]["all_processes_peak_mb"] / first["all_processes_peak_mb"], 3)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Streaming at scale ({result['machine']}, {result['date']})", "",
             ("`python benchmarks/bench_scale.py --model DEMO_MODEL`: real `memscan scan` subprocesses on the demo "
             "config (neighbours on, fixed embedder, no generations); peak RSS sampled from /proc every 0.2 s."), "",
             ("| corpus | shards | images scored | wall s | scoring s | finalize s | pipeline img/s | "
             "÷ slowest stage | driver peak MB | largest worker MB | all processes MB |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["timings_s"]
        lines.append(f"| {r['factor']}× | {r['shards']} | {r['scored']} | {r['wall_s']} | {t['scoring']} | "
                     f"{t.get('finalize', '')} | {r['pipeline_img_s']} | {r['pipeline_over_slowest_stage']} | "
                     f"{r['driver_peak_mb']} | {r['largest_worker_peak_mb']} | {r['all_processes_peak_mb']} |")
    lines += ["", (f"Stages alone on the 1× corpus ({alone['images']} images, {alone['torch_threads']} torch threads, "
                  f"no Ray): read + decode {alone['read_decode_img_s']} img/s, scoring {alone['score_img_s']} img/s, "
                  f"embedding {alone['embed_img_s']} img/s."), "",
              (f"Peak ratios {rows[-1]['factor']}× ÷ {first['factor']}×: driver "
              f"{result['driver_peak_ratio_last_over_first']}, largest worker "
              f"{result['largest_worker_peak_ratio_last_over_first']}, all processes "
              f"{result['all_processes_peak_ratio_last_over_first']}.")]
    (out / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    del base


if __name__ == "__main__":
    main()
