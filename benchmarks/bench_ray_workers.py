"""What a corpus-step shuffle costs on a local Ray with idle workers killed after 1 s (Ray's default) or kept for
a minute (scanner.stages.cluster.LOCAL_RAY_SYSTEM_CONFIG, what memscan starts its local Ray with).

    python benchmarks/bench_ray_workers.py            # 20,000 rows (bench_corpus's synthetic corpus), 2 CPUs

Ray Data runs a hash shuffle's map tasks in a worker pool of their own (a runtime env of their own). With Ray's
default, a worker idle for 1 s beyond the soft limit (one per CPU) is killed, so each step's shuffle started that
pool again from cold. Each setting runs the corpus steps of `memscan dedup` (corpus.executor ray) in a fresh
driver and a fresh local Ray, the settings alternating, `--repeats` times; the wall time of every step is kept.
Results: benchmarks/results/ray_workers.{md,json}, with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

RUN = r"""
import json, logging, sys, time
import ray
from scanner.config import load_config
from scanner.corpus.run import corpus_steps
out, names, ms, dest = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
         _system_config={"idle_worker_killing_time_threshold_ms": ms})
ray.data.DataContext.get_current().enable_progress_bars = False
cfg = load_config(None, ["model.kind=none", "neighbours.generations=0", "corpus.executor=ray",
                         "neighbours.align_size=0"], sections=("neighbours", "corpus"))
steps, last = {}, [time.time()]
def mark(step):
    steps[step] = round(time.time() - last[0], 2)
    last[0] = time.time()
t = time.time()
corpus_steps(cfg, out, names, embedder="synthetic", inside_step=mark)
json.dump({"wall_s": round(time.time() - t, 2), "steps": steps}, open(dest, "w"))
"""


def main(argv=None) -> int:
    from bench_corpus import load_average, write_corpus

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default="/tmp/bench_ray_workers")
    args = ap.parse_args(argv)
    work = Path(args.work)
    names, _ = write_corpus(work / "corpus", args.rows, 128)
    load_before = load_average()
    settings = ["1000", "60000"]
    runs: dict[str, list] = {ms: [] for ms in settings}
    for _ in range(args.repeats):
        for ms in settings:
            shutil.rmtree(work / "corpus" / "corpus", ignore_errors=True)
            dest = work / f"run-{ms}.json"
            subprocess.run([sys.executable, "-c", RUN, str(work / "corpus"), json.dumps(names), ms, str(dest)],
                           cwd=ROOT, check=True)
            runs[ms].append(json.loads(dest.read_text()))
    results = {"rows": args.rows, "shards": len(names), "runs": runs, "load_before": load_before,
               "load_after": load_average(), "date": time.strftime("%Y-%m-%d"), "cpus": 2}
    out = HERE / "results"
    (out / "ray_workers.json").write_text(json.dumps(results, indent=1))
    steps = list(runs["1000"][0]["steps"])
    lines = ["# Idle Ray workers kept for a minute (`benchmarks/bench_ray_workers.py`)", "",
             (f"The corpus steps of `memscan dedup` (corpus.executor ray) over bench_corpus's synthetic corpus, "
              f"{args.rows:,} rows in {len(names)} shards, each run in a fresh driver and a fresh local Ray of 2 "
              "CPUs, the two settings alternating. Seconds; the median of the runs."), "",
             "| idle_worker_killing_time_threshold_ms | runs | wall (s) | " + " | ".join(steps) + " |",
             "|---|---|---|" + "---|" * len(steps)]

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    for ms, rs in runs.items():
        lines.append(f"| {int(ms):,} | {len(rs)} | {med([r['wall_s'] for r in rs]):.1f} | " + " | ".join(
            f"{med([r['steps'].get(s, 0.0) for r in rs]):.1f}" for s in steps) + " |")
    a, b = med([r["wall_s"] for r in runs["60000"]]), med([r["wall_s"] for r in runs["1000"]])
    lines += ["", (f"- kept a minute / killed after 1 s, wall time of the corpus steps: **{a / b:.2f}** "
                   f"({a:.1f} s / {b:.1f} s)."),
              (f"- load average before / after: {load_before} / {results['load_after']}; {results['date']}, 2 "
               "CPUs, nothing else running.")]
    (out / "ray_workers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
