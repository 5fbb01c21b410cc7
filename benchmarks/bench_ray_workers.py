"""What a corpus-step shuffle costs on a local Ray with idle workers killed after 1 s (Ray's default) or kept longer
(scanner.stages.cluster.LOCAL_RAY_SYSTEM_CONFIG, what memscan starts its local Ray with).

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


def med(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def render(results: dict) -> str:
    from scanner.stages.cluster import LOCAL_RAY_SYSTEM_CONFIG

    runs = results["runs"]
    settings = list(runs)
    steps = list(runs[settings[0]][0]["steps"])
    lines = ["# Idle Ray workers kept longer (`benchmarks/bench_ray_workers.py`)", "",
             (f"The corpus steps of `memscan dedup` (corpus.executor ray) over bench_corpus's synthetic corpus, "
              f"{results['rows']:,} rows in {results['shards']} shards, each run in a fresh driver and a fresh local "
              "Ray of 2 CPUs, the settings alternating. Seconds; the median of the runs."), "",
             "| idle_worker_killing_time_threshold_ms | runs | wall (s) | all processes' private MB (peak) | "
             + " | ".join(steps) + " |", "|---|---|---|---|" + "---|" * len(steps)]
    for ms, rs in runs.items():
        lines.append(f"| {int(ms):,} | {len(rs)} | {med([r['wall_s'] for r in rs]):.1f} | "
                     f"{med([r['peak_total_private_mb'] for r in rs]):.0f} | " + " | ".join(
                         f"{med([r['steps'].get(s, 0.0) for r in rs]):.1f}" for s in steps) + " |")
    used = str(LOCAL_RAY_SYSTEM_CONFIG["idle_worker_killing_time_threshold_ms"])
    a, b = med([r["wall_s"] for r in runs.get(used, runs[settings[-1]])]), med([r["wall_s"] for r in runs[settings[0]]])
    lines += ["", (f"- memscan's setting ({int(used):,} ms) / Ray's default ({int(settings[0]):,} ms), wall time of "
                   f"the corpus steps: **{a / b:.2f}** ({a:.1f} s / {b:.1f} s)."),
              (f"- load average before / after: {results['load_before']} / {results['load_after']}; "
               f"{results['date']}, 2 CPUs, nothing else running.")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from bench_corpus import Sampler, load_average, write_corpus

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--settings", nargs="+", default=["1000", "10000", "60000"],
                    help="idle_worker_killing_time_threshold_ms values (the first is Ray's default)")
    ap.add_argument("--work", default="/tmp/bench_ray_workers")
    ap.add_argument("--render", action="store_true", help="only rewrite results/ray_workers.md from the JSON")
    args = ap.parse_args(argv)
    out = HERE / "results"
    if args.render:
        (out / "ray_workers.md").write_text(render(json.loads((out / "ray_workers.json").read_text())))
        return 0
    work = Path(args.work)
    names, _ = write_corpus(work / "corpus", args.rows, 128)
    load_before = load_average()
    settings = args.settings
    runs: dict[str, list] = {ms: [] for ms in settings}
    for _ in range(args.repeats):
        for ms in settings:
            shutil.rmtree(work / "corpus" / "corpus", ignore_errors=True)
            dest = work / f"run-{ms}.json"
            proc = subprocess.Popen([sys.executable, "-c", RUN, str(work / "corpus"), json.dumps(names), ms,
                                     str(dest)], cwd=ROOT)
            sampler = Sampler([proc.pid])
            sampler.start()
            if proc.wait() != 0:
                raise SystemExit(f"the corpus steps failed (exit {proc.returncode})")
            sampler.stop.set()
            sampler.join()
            runs[ms].append({**json.loads(dest.read_text()), "peak_total_private_mb": round(sampler.peak_total, 1)})
    results = {"rows": args.rows, "shards": len(names), "runs": runs, "load_before": load_before,
               "load_after": load_average(), "date": time.strftime("%Y-%m-%d"), "cpus": 2}
    (out / "ray_workers.json").write_text(json.dumps(results, indent=1))
    text = render(results)
    (out / "ray_workers.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
