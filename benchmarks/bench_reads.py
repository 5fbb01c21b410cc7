"""How often a scan opens each shard tar: `memscan scan` under `strace -f -e trace=open,openat`.

    python benchmarks/bench_reads.py --demo runs/demo        # a finished `memscan demo` (its corpus, model)

Runs one full scan (scoring, embedding with the demo's trained embedder, neighbours, report) of the demo
corpus into a fresh directory, traces every process the driver starts (Ray's workers included), and
counts the successful opens of each shard path. A second run trains the embedder too (no checkpoint),
which reads a bounded sample of shards once more. Writes benchmarks/results/reads.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def traced_scan(demo: Path, out: Path, sets: list[str]) -> tuple[Counter, float, int]:
    """(opens per shard name, wall seconds, exit code) of one traced `memscan scan`."""
    log = out.parent / f"{out.name}.strace"
    shards = demo / "corpus" / "shards"
    cmd = ["strace", "-f", "-qq", "-e", "trace=open,openat", "-e", "signal=none", "-o", str(log),
           sys.executable, "-m", "scanner", "scan", "--config", str(ROOT / "configs" / "demo.yaml"),
           "--shards", str(shards), "--set", f"model.path={demo / 'model'}", "--no-progress", "--out", str(out),
           *[a for s in sets for a in ("--set", s)]]
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode
    wall = time.time() - t0
    pattern = re.compile(r'open(?:at)?\(.*?"(' + re.escape(str(shards.resolve())) + r'/[^"]+\.tar)".*\)\s+=\s+\d+')
    opens = Counter(Path(m.group(1)).stem for line in log.read_text().splitlines() if (m := pattern.search(line)))
    log.unlink()
    return opens, wall, rc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True, help="a finished `memscan demo --out DIR` directory")
    a = ap.parse_args()
    demo = Path(a.demo).resolve()
    n_shards = len(list((demo / "corpus" / "shards").glob("*.tar")))
    embedder = demo / "scan" / "embedder"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, sets in [("embedder given", [f"neighbours.clip_checkpoint={embedder}"]),
                           ("embedder trained on the corpus", ["neighbours.train_steps=20"])]:
            opens, wall, rc = traced_scan(demo, Path(tmp) / name.replace(" ", "_"), sets)
            rows.append({"run": name, "exit_code": rc, "wall_s": round(wall, 1), "shards": n_shards,
                         "max_opens_per_shard": max(opens.values(), default=0),
                         "min_opens_per_shard": min(opens.values(), default=0), "opens": dict(sorted(opens.items()))})
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "reads.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Shard opens per scan (`benchmarks/bench_reads.py`)", "",
             (f"`memscan scan` of the demo corpus ({n_shards} shards) under `strace -f -e trace=open,openat`, every "
             "process the driver starts traced; successful opens of each shard tar counted. The report reopens only "
             "the shards holding the thumbnails it shows."), "",
             "| run | exit | opens per shard (min - max) | per shard |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['exit_code']} | {r['min_opens_per_shard']} - {r['max_opens_per_shard']} | "
                     + ", ".join(f"{k}: {v}" for k, v in r["opens"].items()) + " |")
    (HERE / "results" / "reads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
