"""The same scan on a local Ray and on a real two-node Ray cluster, shards and outputs in S3: identical outputs?

    python benchmarks/cluster_check.py                       # builds a corpus, trains a small demo model
    python benchmarks/cluster_check.py --model runs/demo/model --work /tmp/memscan_cluster

Everything runs on this machine: a local S3 server (local_s3.py: moto's server mode on 127.0.0.1) holding the demo
corpus's shards, and a Ray cluster of two nodes (local_cluster.py: `ray start --block` for each, own --temp-dir,
token authentication, stopped by killing their process groups, never `ray stop`): a head with 2 CPUs and no GPU,
where drivers run, and a second node with 2 CPUs that declares one GPU, so the actors that ask for a GPU are placed
there (this machine has none: they run on its CPU, and summary.json says so). The scan, configs/demo.yaml with
`--shards 's3://BUCKET/corpus/{00000..0000N}.tar'`, runs in these forms, each with its own `--out s3://BUCKET/...`:

  local   no RAY_ADDRESS: memscan starts its own local Ray          python -m scanner scan ... --out s3://B/local
  job     the README's cluster form, from the repository root:      ray job submit --address http://HEAD:8265
                                                                      --working-dir . -- python jobs/scan.py ...
  client  Ray Client, a driver off the cluster:                     RAY_ADDRESS=ray://HEAD:10001 python -m scanner ...
  attach  a driver on a cluster node (the README's RAY_ADDRESS):    RAY_ADDRESS=HEAD:6379 python -m scanner ...

Storage credentials: the cluster's nodes are started with the AWS_* environment (AWS_ENDPOINT_URL, keys, region),
as a real cluster's nodes get theirs from the machine (an instance role, the environment their `ray start` runs
in), so every task, actor and a job's driver reach the store without the job carrying secrets (a runtime_env's
env_vars would show in the dashboard). The drivers run here get the same environment.

Ray Client cannot run Ray Data pipelines in Ray 2.60 (the streaming executor needs the driver's core worker:
AttributeError: 'Worker' object has no attribute 'core_worker'); memscan refuses ray:// with that error and what
to do instead (scanner/stages/cluster.py). This script records memscan's answer and the same error from four lines
of plain Ray Data, so a Ray that lifts the limit shows up here (the client form is then compared like the others).

Each cluster form is compared with the local run: the same keys, every score column (largest relative difference),
mem_class / verdict / error, and the removal list, duplicates and errors tables, read back from S3; where the
stages' actors ran (summary.json: nodes and devices per stage). Results: results/cluster.{json,md}, with the
machine's load while it ran (other jobs may share the machine: the wall times are not benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from local_cluster import LocalCluster
from local_s3 import UNSET, LocalS3
from results_file import write_results

BUCKET = "memscan-cluster"
CORPUS = {"n_unique": 300, "n_repeated": 4, "repeat_copies": 20, "n_oversampled": 5, "samples_per_shard": 100,
          "seed": 0, "n_heldout": 0}  # 596 readable samples in 6 shards, the last one truncated
TABLES = ("removal_list.parquet", "duplicates.parquet", "errors.parquet")
# plain Ray Data under Ray Client, without memscan: is the limit Ray's?
RAY_DATA_PROBE = "import ray; ray.init(); print(ray.data.range(4).map_batches(lambda b: b).take_all())"


class LoadSampler(threading.Thread):
    """The 1-minute load average every `every` seconds while the checks run: other jobs share this machine."""

    def __init__(self, every: float = 5.0):
        super().__init__(daemon=True)
        self.every, self.samples, self._halt = every, [], threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append(os.getloadavg()[0])
            self._halt.wait(self.every)

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        s = self.samples or [os.getloadavg()[0]]
        return {"min": round(min(s), 2), "mean": round(float(np.mean(s)), 2), "max": round(max(s), 2),
                "samples": len(s)}


def run(args: list[str], env: dict, timeout: float = 900) -> dict:
    """Run a command from the repository root: exit code, wall seconds, the output's tail."""
    t0 = time.time()
    try:
        p = subprocess.run(args, cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)
        rc, text = p.returncode, p.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        rc, text = "timeout", out.decode(errors="replace") if isinstance(out, bytes) else out
    return {"rc": rc, "seconds": round(time.time() - t0, 1), "output": text}


def shown(args: list[str], env_prefix: str = "") -> str:
    """The command as a user would type it, this machine's paths shortened."""
    text = " ".join(shlex.quote(a) for a in args)
    for long, short in ((sys.executable, "python"), (str(Path(sys.executable).parent) + "/", ""), (str(ROOT) + "/", "")):
        text = text.replace(long, short)
    return f"{env_prefix}{text}"


def tables(url: str) -> dict:
    from scanner.storage import Out

    o = Out(url)
    t = {name: o.read_parquet(name) for name in TABLES if o.exists(name)}
    t["scores"] = pd.concat([o.read_parquet(f"scores/{f}") for f in o.names("scores", ".parquet")],
                            ignore_index=True).set_index("key").sort_index()
    t["removal_list.txt"] = sorted(o.read_text("removal_list.txt").split())
    t["summary"] = o.read_json("summary.json")
    return t


def same_table(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    key = [c for c in ("key", "group_id", "shard", "member") if c in a.columns]
    a = a.sort_values(key).reset_index(drop=True) if key else a
    b = b.sort_values(key).reset_index(drop=True) if key else b
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return {"same": False, "rows": [len(a), len(b)], "columns_only_in_one": sorted(set(a.columns) ^ set(b.columns))}
    differ = [c for c in a.columns if not a[c].astype(str).equals(b[c].astype(str))]
    return {"same": not differ, "rows": len(a), **({"columns_differ": differ} if differ else {})}


def compare(run: dict, ref: dict) -> dict:
    """run against ref (the local run)."""
    sa, sb = run["scores"], ref["scores"]
    out = {"rows": [len(sa), len(sb)], "same_keys": bool(sa.index.equals(sb.index))}
    if not out["same_keys"]:
        return out
    sb = sb.loc[sa.index]
    num = [c for c in sa.columns if pd.api.types.is_float_dtype(sa[c])]
    out["max_rel_diff"] = {c: float(np.nanmax(np.abs(sa[c] - sb[c]) / np.maximum(np.abs(sb[c]), 1e-6)))
                           if sa[c].notna().any() else 0.0 for c in num}
    out["same_nan_pattern"] = bool(all((sa[c].isna() == sb[c].isna()).all() for c in num))
    for c in ("mem_class", "verdict", "error"):
        out[f"same_{c}"] = bool((sa[c].fillna("").astype(str) == sb[c].fillna("").astype(str)).all())
    for name in TABLES:
        out[name] = same_table(run[name], ref[name]) if name in run and name in ref else {
            "same": name not in run and name not in ref}
    out["same_removal_list_txt"] = run["removal_list.txt"] == ref["removal_list.txt"]
    return out


def placement(summary: dict, names: dict) -> dict:
    """Per stage: the nodes (head / second) and devices its actors or tasks ran on, and their warnings."""
    st = {}
    for stage, rec in summary.get("stages", {}).items():
        if not isinstance(rec, dict) or "nodes" not in rec:
            continue
        st[stage] = {"nodes": sorted(names.get(n, n[:8]) for n in rec.get("nodes", [])),
                     "devices": sorted(rec.get("devices", [])),
                     "warnings": sorted({w.split(";")[0] for w in rec.get("warnings", [])})}
    return {"stages": st, "placements": summary.get("placements", {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a trained demo model dir (model/ of `memscan demo` or `memscan train-demo`); "
                                    "default: train one with `memscan train-demo --steps STEPS` under --work")
    ap.add_argument("--steps", type=int, default=200, help="training steps of that model (default 200: ~1 minute)")
    ap.add_argument("--work", default="/tmp/memscan_cluster", help="corpus, model and cluster logs (reused)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--no-attach", action="store_true", help="skip the RAY_ADDRESS=HEAD:PORT form")
    a = ap.parse_args()
    from scanner.demo.corpus import build_demo_corpus

    t_start = time.time()
    load = LoadSampler()
    load.start()
    load_before = os.getloadavg()
    work = Path(a.work).resolve()
    corpus = work / "corpus"
    if not (corpus / "truth.parquet").exists():
        build_demo_corpus(corpus, **CORPUS)
    shards = sorted((corpus / "shards").glob("*.tar"))
    base_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in UNSET}
    base_env["PATH"] = f"{Path(sys.executable).parent}:{base_env.get('PATH', '')}"
    train = None
    if a.model:
        model = Path(a.model).resolve()
    else:
        model = work / "model"
        train = run([sys.executable, "-m", "scanner", "train-demo", "--out", str(work), "--steps", str(a.steps),
                     "--no-progress"], base_env)
        if train["rc"] != 0:
            sys.exit(f"train-demo failed:\n{train['output'][-3000:]}")
    info = json.loads((model / "train_info.json").read_text()) if (model / "train_info.json").exists() else {}

    s3 = LocalS3(log=work / "moto.log").start()
    try:
        env = {**base_env, **s3.env}
        prefix = s3.upload(corpus / "shards", BUCKET, "corpus")
        spec = f"{prefix}/{{00000..{len(shards) - 1:05d}}}.tar"
        common = ["--shards", spec, "--set", f"model.path={model}", "--set", "neighbours.generations=16",
                  "--set", "ray.actors=2", *(["--set", f"data.resolution={info['resolution']}"]
                                              if "resolution" in info else []), "--no-progress"]
        scan = [sys.executable, "-m", "scanner", "scan", "--config", "demo", *common]
        forms: dict[str, dict] = {}
        forms["local"] = {"command": shown(scan + ["--out", f"s3://{BUCKET}/local"]),
                          **run(scan + ["--out", f"s3://{BUCKET}/local"], env)}

        cluster = LocalCluster(work / "ray", [{"num_cpus": 2, "num_gpus": 0}, {"num_cpus": 2, "num_gpus": 1}],
                               dashboard=True)
        cluster.env.update(s3.env)  # the nodes' own storage access (see the docstring)
        for k in UNSET:
            cluster.env.pop(k, None)
        with cluster:
            nodes = cluster.nodes()
            names = {n["NodeID"]: ("head" if "node:__internal_head__" in n["Resources"] else "second")
                     for n in nodes if n.get("Alive")}
            cenv = {**cluster.env}  # RAY_ADDRESS = the head's GCS, the token, the AWS_* environment
            job = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.job_address,
                   "--working-dir", ".", "--runtime-env-json",
                   json.dumps({"excludes": [".git", "docs", "benchmarks/results", "runs"]}),
                   "--", "python", "jobs/scan.py", "--config", "configs/demo.yaml", *common,
                   "--out", f"s3://{BUCKET}/job"]
            forms["job"] = {"command": shown(job).replace(cluster.job_address, "http://HEAD:8265"),
                            **run(job, {k: v for k, v in cenv.items() if k != "RAY_ADDRESS"})}
            client_env = {**cenv, "RAY_ADDRESS": cluster.client_address}
            forms["client"] = {"command": shown(scan + ["--out", f"s3://{BUCKET}/client"],
                                                "RAY_ADDRESS=ray://HEAD:10001 "),
                               **run(scan + ["--out", f"s3://{BUCKET}/client"], client_env)}
            probe = run([sys.executable, "-c", RAY_DATA_PROBE], client_env, timeout=300)
            forms["client"]["plain_ray_data"] = {"code": RAY_DATA_PROBE, "rc": probe["rc"],
                                                 "error": [ln for ln in probe["output"].splitlines()
                                                           if ln.startswith(("AttributeError", "RuntimeError"))][-1:]
                                                 or probe["output"].strip().splitlines()[-1:]}
            if not a.no_attach:
                forms["attach"] = {"command": shown(scan + ["--out", f"s3://{BUCKET}/attach"],
                                                    "RAY_ADDRESS=HEAD:6379 "),
                                   **run(scan + ["--out", f"s3://{BUCKET}/attach"], cenv)}
        os.environ.update(s3.env)  # s3fs reads the outputs back
        for k in UNSET:
            os.environ.pop(k, None)
        ref = tables(f"s3://{BUCKET}/local") if forms["local"]["rc"] == 0 else None
        for name, f in forms.items():
            f["log_tail"] = [ln for ln in f.pop("output").strip().splitlines() if ln.strip()][-8:]
            if f["rc"] != 0 or ref is None:
                continue
            t = tables(f"s3://{BUCKET}/{name}")
            f["where"] = placement(t["summary"], names)
            f["rows"] = len(t["scores"])
            if name != "local":
                f["comparison"] = compare(t, ref)
    finally:
        s3.stop()
    load_after = os.getloadavg()
    loads = load.stop()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_1min_before": round(load_before[0], 2), "load_1min_after": round(load_after[0], 2),
                    "load_1min_during": loads,
                    "note": ("nothing else ran on this machine (the load is the check's own)" if load_before[0] < 1
                             else "other jobs (tests, other scans) ran on this machine beside the check")},
        "versions": {"ray": __import__("ray").__version__, "moto": __import__("moto").__version__,
                     "s3fs": __import__("s3fs").__version__},
        "corpus": {**CORPUS, "shards": len(shards), "url": spec},
        "model": {"path": str(model), "trained_here": train is not None, "steps": info.get("steps", a.steps),
                  **({"train_seconds": train["seconds"]} if train else {})},
        "cluster": {"nodes": [{"name": names.get(n["NodeID"]), "CPU": n["Resources"].get("CPU"),
                               "GPU": n["Resources"].get("GPU", 0)} for n in nodes if n.get("Alive")],
                    "storage_env": "AWS_* on every node (ray start's environment) and on the drivers run here"},
        "forms": forms,
        "total_seconds": round(time.time() - t_start, 1),
    }
    write_results(Path(a.out), "cluster", result, markdown(result))


def markdown(r: dict) -> str:
    f = r["forms"]
    lines = [f"# memscan on a two-node Ray cluster, shards and outputs in S3 ({r['date']})", "",
             ("`python benchmarks/cluster_check.py`: a local S3 server (moto, 127.0.0.1) holds "
             f"{r['corpus']['shards']} demo shards (`{r['corpus']['url']}`); a Ray cluster of two nodes on this "
             "machine (`ray start`: a head with 2 CPUs and no GPU, a second node with 2 CPUs declaring 1 GPU, "
             "token auth); the AWS_* environment on every node. The scan (configs/demo.yaml, `ray.actors=2`, "
             "`neighbours.generations=16`, a demo model trained "
             f"{r['model']['steps']} steps) in each form, each to its own `--out s3://...`, compared with the "
             "local run."), "",
             (f"Machine: {r['machine']['cpus']} CPUs, {r['machine']['platform']}, Ray {r['versions']['ray']}. "
             f"{r['machine']['note']}: 1-minute load average {r['machine']['load_1min_before']} before, "
             f"{r['machine']['load_1min_during']['mean']} on average during (max "
             f"{r['machine']['load_1min_during']['max']}), {r['machine']['load_1min_after']} after; the wall "
             "times below are not benchmarks."), "",
             ("| form | command | exit | wall s | rows | same keys | largest rel. diff (score columns) | same mem_class / "
             "verdict / error | same removal list / duplicates / errors |"), "|---|---|---|---|---|---|---|---|---|"]
    for name, x in f.items():
        c = x.get("comparison", {})
        worst = f"{max(c['max_rel_diff'].values()):.2e}" if c.get("max_rel_diff") else ("reference" if name == "local"
                                                                                       else "-")
        same = (" / ".join(str(c.get(f"same_{k}")) for k in ("mem_class", "verdict", "error")) if c
                else ("reference" if name == "local" else "-"))
        tabs = (" / ".join(str(c[t]["same"]) for t in TABLES) if c else ("reference" if name == "local" else "-"))
        lines.append(f"| {name} | `{x['command']}` | {x['rc']} | {x['seconds']} | {x.get('rows', '-')} | "
                     f"{c.get('same_keys', 'reference' if name == 'local' else '-')} | {worst} | {same} | {tabs} |")
    lines += ["", ("Where the stages ran (summary.json `stages`: nodes and devices; head = the GPU-less head, second = "
              "the node declaring a GPU):"), ""]
    for name, x in f.items():
        if "where" in x:
            st = "; ".join(f"{s}: {', '.join(v['nodes']) or '-'} on {', '.join(v['devices']) or '-'}"
                           + (f" ({'; '.join(v['warnings'])})" if v["warnings"] else "")
                           for s, v in x["where"]["stages"].items())
            lines.append(f"- {name}: {st}")
    cl = f.get("client")
    if cl and cl["rc"] != 0:
        err = cl["plain_ray_data"]["error"]
        lines += ["", ("Ray Client (`RAY_ADDRESS=ray://...`) cannot run Ray Data pipelines with this Ray: memscan "
                  f"exits {cl['rc']} before any work, saying:"), "", "```", *cl["log_tail"][-2:], "```", "",
                  (f"Without memscan, `{cl['plain_ray_data']['code']}` under the same RAY_ADDRESS exits "
                  f"{cl['plain_ray_data']['rc']}: `{err[0] if err else '?'}` (Ray Data's streaming executor needs "
                  "the driver's core worker, which a Ray Client driver lacks; Ray's maintainers: use job submission "
                  "or run the driver on the head node, ray-project/ray#48682). Use the `job` or `attach` form.")]
    lines += ["", f"Total {r['total_seconds']} s (corpus, model, upload, every form)."]
    return "\n".join(lines) + "\n"


def render(out: Path) -> None:
    """results/cluster.md again from results/cluster.json (the markdown changed, not the measurement)."""
    result = json.loads((out / "cluster.json").read_text())
    write_results(out, "cluster", result, markdown(result))


if __name__ == "__main__":
    main()
