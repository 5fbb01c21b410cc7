"""A real two-node Ray cluster on this machine: `ray start` a head and a second node, submit jobs/scan.py with
`ray job submit --working-dir`, and check that its outputs equal a local run's.

    python benchmarks/cluster_check.py --model DEMO_MODEL --embedder DEMO_EMBEDDER   # results/cluster.{md,json}

Both runs use configs/demo.yaml with ray.actors=2 on the same small demo corpus (built here). The cluster is
started with `ray start` (head: GCS + dashboard/job server on loopback; second node: its own raylet,
object store and --temp-dir, as on a second machine; token authentication on, RAY_AUTH_MODE=token, the token in ~/.ray/auth_token) and stopped with `ray stop` at the end, which stops every Ray on this machine: do not run it
beside another Ray. Which nodes the scoring and embedding actors ran on is read back from the state API.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent


def sh(*args: str, env: dict | None = None, check: bool = True) -> str:
    p = subprocess.run(args, check=False, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout[-4000:]}")
    return p.stdout


def scores(out: Path) -> pd.DataFrame:
    df = pd.concat([pd.read_parquet(f) for f in sorted((out / "scores").glob("*.parquet"))], ignore_index=True)
    return df.set_index("key").sort_index()


def compare(a: Path, b: Path) -> dict:
    sa, sb = scores(a), scores(b)
    out = {"rows": [len(sa), len(sb)], "same_keys": bool(sa.index.equals(sb.index))}
    num = [c for c in sa.columns if pd.api.types.is_float_dtype(sa[c])]
    out["max_rel_diff"] = {c: float(np.nanmax(np.abs(sa[c] - sb[c]) / np.maximum(np.abs(sb[c]), 1e-6)))
                           if sa[c].notna().any() else 0.0 for c in num}
    out["same_nan_pattern"] = bool(all((sa[c].isna() == sb[c].isna()).all() for c in num))
    for c in ("mem_class", "verdict", "error"):
        out[f"same_{c}"] = bool((sa[c].fillna("") == sb[c].fillna("")).all())
    for name in ("removal_list.parquet", "duplicates.parquet", "errors.parquet"):
        da, db = pd.read_parquet(a / name), pd.read_parquet(b / name)
        key = [c for c in ("key", "shard", "group_id") if c in da.columns]
        out[f"same_{name}"] = bool(da.sort_values(key).reset_index(drop=True).equals(
            db.sort_values(key).reset_index(drop=True)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--embedder", required=True, help="open_clip checkpoint dir (e.g. DEMO/scan/embedder)")
    ap.add_argument("--work", default="/tmp/memscan_cluster")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from scanner.demo.corpus import build_demo_corpus

    work = Path(a.work)
    subprocess.run(["rm", "-rf", str(work / "local"), str(work / "cluster")], check=True)
    corpus = work / "corpus"
    if not (corpus / "truth.parquet").exists():
        build_demo_corpus(corpus, n_unique=300, n_repeated=4, repeat_copies=20, n_oversampled=5, samples_per_shard=100,
                          seed=0)
    args = ["--config", "configs/demo.yaml", "--shards", str(corpus / "shards"), "--set", f"model.path={a.model}",
            "--set", f"neighbours.clip_checkpoint={a.embedder}", "--set", "neighbours.generations=16",
            "--set", "ray.actors=2", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    t0 = time.time()
    sh(str(BIN / "memscan"), "scan", *args, "--out", str(work / "local"), env=env)
    local_s = time.time() - t0

    ray = str(BIN / "ray")
    sh(ray, "stop", "--force", env=env, check=False)
    # Ray >= 2.5x authenticates every RPC with a token: every node and the job client must present it.
    env["RAY_AUTH_MODE"] = "token"
    sh(ray, "get-auth-token", "--generate", env=env)
    head = sh(ray, "start", "--head", "--node-ip-address=127.0.0.1", "--port=6390", "--num-cpus=2",
              "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--dashboard-port=8265",
              "--disable-usage-stats", env=env)
    # A real second machine has its own /tmp/ray. Sharing the head's, the second node's runtime-env agent
    # unpacks and garbage-collects the job's working_dir in the very directory the driver runs in, and the
    # driver died ("oneMKL FATAL ERROR: Cannot load libtorch_cpu.so": its cwd was gone).
    second = sh(ray, "start", "--address=127.0.0.1:6390", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                f"--temp-dir={work / 'ray_node2'}", "--resources={\"second_node\": 1}", "--disable-usage-stats",
                env=env)
    try:
        nodes = json.loads(sh(ray, "list", "nodes", "--format", "json", "--address", "127.0.0.1:6390", env=env))
        t0 = time.time()
        job = sh(ray, "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".",
                 "--runtime-env-json", json.dumps({"excludes": [".git", "docs", "benchmarks/results"]}),
                 "--", sys.executable, "jobs/scan.py", *args, "--out", str(work / "cluster"), env=env)
        cluster_s = time.time() - t0
        actors = json.loads(sh(ray, "list", "actors", "--detail", "--format", "json", "--limit", "1000",
                               "--address", "127.0.0.1:6390", env=env))
    finally:
        sh(ray, "stop", "--force", env=env, check=False)
    placement: dict[str, set] = {}
    for act in actors:
        cls = act.get("class_name", "")
        placement.setdefault(cls, set()).add(act.get("node_id"))
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "nodes_alive": sum(1 for n in nodes if n.get("state") == "ALIVE"),
        "actor_nodes": {k: len(v) for k, v in placement.items()},
        "local_s": round(local_s, 1), "cluster_s": round(cluster_s, 1),
        "job_log_tail": job.strip().splitlines()[-6:],
        "comparison": compare(work / "cluster", work / "local"),
        "ray_start": [head.strip().splitlines()[-1:], second.strip().splitlines()[-1:]],
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.json").write_text(json.dumps(result, indent=1))
    c = result["comparison"]
    worst = max(c["max_rel_diff"].values()) if c["max_rel_diff"] else 0.0
    lines = [f"# Two-node Ray cluster vs local ({result['date']})", "",
             ("`python benchmarks/cluster_check.py --model DEMO/model --embedder DEMO/scan/embedder`: `ray start` "
             "(head + second node on this machine), `ray job submit --working-dir . -- python jobs/scan.py ...`, "
             "then the same scan with a local Ray."), "",
             f"- nodes alive: {result['nodes_alive']}; actors per class over distinct nodes: {result['actor_nodes']}",
             f"- rows: cluster {c['rows'][0]}, local {c['rows'][1]}; same keys: {c['same_keys']}",
             (f"- largest relative difference over every score column: {worst:.2e} "
             f"(per column: {', '.join(f'{k} {v:.1e}' for k, v in c['max_rel_diff'].items())})"),
             f"- same mem_class / verdict / error: {c['same_mem_class']} / {c['same_verdict']} / {c['same_error']}",
             (f"- same removal list / duplicates / errors tables: {c['same_removal_list.parquet']} / "
             f"{c['same_duplicates.parquet']} / {c['same_errors.parquet']}"),
             f"- wall time: local {result['local_s']} s, cluster job {result['cluster_s']} s (upload included)"]
    (out / "cluster.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
