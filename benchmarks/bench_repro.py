"""Which machine settings change the demo model, bit for bit? A short seeded training of the demo model under the
settings a second machine may differ in, against the same training with this machine's own settings.

    memscan build-demo-corpus --out runs/demo/corpus          # any demo corpus
    python benchmarks/bench_repro.py runs/demo --steps 60      # writes results/repro.{md,json}

Each setting is a fresh process (`memscan train-demo --steps N`, the demo's seeded training, into a folder of its
own beside the corpus): this machine as it is, twice (same-machine determinism); one thread instead of every core
(OMP_NUM_THREADS=1: a machine with another core count splits reductions differently); and ATen's kernels without
SIMD (ATEN_CPU_CAPABILITY=default: a CPU with other vector instructions, e.g. AVX-512 against AVX2, takes other
kernels). Reported: the first and last loss, the weights' sha256 and the largest weight difference from the
first run. A difference after a few steps grows over the demo's 3,700 (training is chaotic), so the demo's
numbers are only bit-identical between machines with the same CPU capability and thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from results_file import write_results

from scanner.procfs import machine

SETTINGS = [
    ("this machine", {}),
    ("this machine, again", {}),
    ("1 thread (OMP_NUM_THREADS=1)", {"OMP_NUM_THREADS": "1"}),
    ("no SIMD kernels (ATEN_CPU_CAPABILITY=default)", {"ATEN_CPU_CAPABILITY": "default"}),
]


def weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def train(corpus: Path, work: Path, steps: int, env: dict[str, str]) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    link = work / "corpus"
    if not link.exists():
        link.symlink_to(corpus.resolve())
    shutil.rmtree(work / "model", ignore_errors=True)  # train-demo keeps a model it finds: train afresh
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "scanner", "train-demo", "--out", str(work), "--steps", str(steps), "--no-progress"],
                   check=True, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    info = json.loads((work / "model" / "train_info.json").read_text())
    blob = (work / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    return {"loss_first": info["loss_first"], "loss_last": info["loss_last"], "seconds": round(time.time() - t0, 1),
            "sha256": hashlib.sha256(blob).hexdigest()}


def render(res: dict) -> str:
    m = res["machine"]
    out = ["# Which settings change the demo model bit for bit (benchmarks/bench_repro.py)", "",
           (f"The demo model's seeded training, {res['steps']} steps, on {m['cpu']} ({m['cores']} cores, torch "
            f"{m['torch']}, ATen CPU capability {m['cpu_capability']}, {m['threads']} threads), each setting a fresh "
            f"process. Largest weight difference: against the first run."), "",
           "| setting | first loss | last loss | weights (sha256) | largest weight difference |", "|---|---|---|---|---|"]
    for r in res["runs"]:
        out.append(f"| {r['setting']} | {r['loss_first']!r} | {r['loss_last']!r} | {r['sha256'][:16]} | "
                   f"{r['max_abs_diff']:.3g} |")
    same = [r["setting"] for r in res["runs"][1:] if r["sha256"] == res["runs"][0]["sha256"]]
    differ = [r["setting"] for r in res["runs"][1:] if r["sha256"] != res["runs"][0]["sha256"]]
    out += ["", f"Identical to the first run: {', '.join(same) or 'none'}. Different: {', '.join(differ) or 'none'}."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo", type=Path, help="a folder holding a demo corpus/ (memscan build-demo-corpus)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_repro"))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    runs, first = [], None
    for i, (name, env) in enumerate(SETTINGS):
        folder = a.work / f"setting{i}"
        r = train(a.demo / "corpus", folder, a.steps, env)
        w = weights(folder / "model")
        first = first or w
        r["max_abs_diff"] = float(max(np.abs(w[k].astype(np.float64) - first[k]).max() for k in first))
        runs.append({"setting": name, "env": env, **r})
        print(f"{name}: loss {r['loss_last']!r}, sha256 {r['sha256'][:16]}, largest difference {r['max_abs_diff']:.3g}")
    res = {"steps": a.steps, "machine": machine(), "runs": runs}
    write_results(a.out, "repro", res, render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
