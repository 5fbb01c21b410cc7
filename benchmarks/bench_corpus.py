"""The corpus steps at 10^7 images and beyond, as Ray tasks within a per-task memory budget (issue #37).

    python benchmarks/bench_corpus.py --sizes 10000000 30000000 --memory-gb 2      # one node, 128-d
    python benchmarks/bench_corpus.py --sizes 10000000 --dim 768 --name corpus_768  # CLIP ViT-L/14's width
    python benchmarks/bench_corpus.py --sizes 10000000 --cluster --name corpus_2node # a local two-node Ray cluster
    python benchmarks/bench_corpus.py --assignment                                  # list assignment per row
    python benchmarks/bench_corpus.py --render                                      # results/corpus.md from the JSON
    python benchmarks/bench_corpus.py --sizes 1010000 --incremental 0.0099 --name corpus_incremental  # --against

For every size it writes a synthetic corpus as a scan's part files (parts/NAME.parquet with key, sha256, phash,
width, height; embeddings/NAME.npy, float16, 10,000 rows a shard), then runs the corpus steps of `memscan dedup`
(scanner.corpus.run.corpus_steps, model none, corpus.executor ray) in a fresh driver, with a local Ray of this
machine's 2 CPUs (or attached to a two-node cluster started here: each node its own raylet, object store and temp
dir) and measures:
- every process's peak memory (sampled from /proc every 0.5 s: VmRSS, and RssAnon, its private part: Ray's object
  store is shared memory every worker maps, sized by --object-store-gb, and counted once, apart);
- the wall time of every step, and (--cluster) the task seconds of every step on every node (Ray's state API);
- duplicate pair precision / recall against the planted groups, and that no group is a chain.

Planted, per shard: 2 % of the images get 1-3 byte-identical copies (same sha256, vector, pHash) or 1-3 perturbed
copies (cosine 0.975-0.995 to the original, another sha256, the pHash with 0-2 bits flipped for half of them, a
random one for the rest), placed in the next shard; one chain of 20 images at cosine 0.97 from the next. The
background is a mixture of 1,000 directions with spread (a neighbour at cosine ~0.6-0.8, far below the 0.93
threshold). Results: benchmarks/results/NAME.{md,json}; the machine's load is recorded beside each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

ROWS_PER_SHARD = 10_000
CENTRES = 1000
PLANT = 0.02
CHAIN = 20
CHAIN_COS = 0.97
THRESHOLD = 0.93


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _centres(dim):
    return _unit(np.random.default_rng(12345).standard_normal((CENTRES, dim)))


def _background(s: int, n: int, centres) -> np.ndarray:
    rng = np.random.default_rng([7, s])
    c = centres[rng.integers(0, CENTRES, n)]
    spread = 0.09 * np.sqrt(128 / c.shape[1])  # the same neighbour cosines at any width
    return _unit(c + spread * rng.standard_normal(c.shape))


def shard_rows(s: int, n_shards: int, centres) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """Shard s: its own background (of which the first PLANT share are planted originals), the copies of
    shard s-1's planted originals, and one chain. Returns (part rows, vectors, truth rows)."""
    dim = centres.shape[1]
    own = ROWS_PER_SHARD - int(ROWS_PER_SHARD * PLANT * 2) - CHAIN  # room for about 2 copies per planted
    rng = np.random.default_rng([11, s])
    v = _background(s, own, centres)
    sha = [rng.bytes(32).hex() for _ in range(own)]
    ph = rng.integers(-2**63, 2**63 - 1, own, dtype=np.int64)
    truth_group = np.full(own, -1, np.int64)
    n_plant = int(own * PLANT)
    truth_group[:n_plant] = s * ROWS_PER_SHARD + np.arange(n_plant)
    rows = [pd.DataFrame({"sha256": sha, "phash": ph, "truth_group": truth_group, "kind": "background"})]
    vecs = [v]
    rows[0].loc[:n_plant - 1, "kind"] = "original"
    # copies of the previous shard's planted originals (its rows regenerated: same seeds)
    p = (s - 1) % n_shards
    prng = np.random.default_rng([11, p])
    pv = _background(p, own, centres)[:n_plant]
    psha = [prng.bytes(32).hex() for _ in range(own)][:n_plant]
    pph = prng.integers(-2**63, 2**63 - 1, own, dtype=np.int64)[:n_plant]
    crng = np.random.default_rng([13, s])
    copies = []  # (sha256, phash, truth group, kind)
    for j in range(n_plant):
        exact = j % 2 == 0
        for _ in range(int(crng.integers(1, 4))):
            if exact:
                vecs.append(pv[j:j + 1])
                copies.append((psha[j], pph[j], p * ROWS_PER_SHARD + j, "exact"))
            else:
                target = crng.uniform(0.975, 0.995)
                noise = _unit(crng.standard_normal((1, dim)))
                noise = _unit(noise - (noise @ pv[j]) * pv[j])
                vecs.append(target * pv[j:j + 1] + np.sqrt(1 - target**2) * noise)
                bits = crng.choice(64, int(crng.integers(0, 3)), replace=False)
                flip = np.uint64(sum(1 << int(b) for b in bits))
                near_ph = (np.int64(pph[j]).view(np.uint64) ^ flip).view(np.int64) if j % 4 == 1 else \
                    crng.integers(-2**63, 2**63 - 1, dtype=np.int64)
                copies.append((crng.bytes(32).hex(), near_ph, p * ROWS_PER_SHARD + j, "perturbed"))
    rows.append(pd.DataFrame(copies, columns=["sha256", "phash", "truth_group", "kind"]))
    start = _unit(np.random.default_rng([17, s]).standard_normal((2, dim)))
    a, b = start[0], _unit((start[1] - (start[1] @ start[0]) * start[0])[None])[0]
    theta = np.arccos(CHAIN_COS) * np.arange(CHAIN)
    vecs.append(np.cos(theta)[:, None] * a + np.sin(theta)[:, None] * b)
    crng = np.random.default_rng([19, s])
    rows.append(pd.DataFrame({"sha256": [crng.bytes(32).hex() for _ in range(CHAIN)],
                              "phash": crng.integers(-2**63, 2**63 - 1, CHAIN, dtype=np.int64),
                              "truth_group": -1, "kind": "chain"}))
    df = pd.concat(rows, ignore_index=True)
    name = f"{s:06d}"
    df.insert(0, "key", [f"{name}{j:05d}" for j in range(len(df))])
    df.insert(1, "shard", name)
    df["width"], df["height"] = 256, 256
    for c in ("error", "error_stage", "embed_error", "caption", "url"):
        df[c] = pd.Series([None] * len(df), dtype="string")
    x = np.concatenate(vecs).astype(np.float16)
    truth = df[["key", "truth_group", "kind"]]
    return df.drop(columns=["truth_group", "kind"]), x, truth


def write_corpus(out: Path, n: int, dim: int) -> tuple[list[str], Path]:
    """Part files for about n images (reused when already written for this n and dim). Returns (shard names,
    truth parquet)."""
    n_shards = max(1, round(n / ROWS_PER_SHARD))
    marker = out / "written.json"
    names = [f"{s:06d}" for s in range(n_shards)]
    if marker.exists() and json.loads(marker.read_text()) == {"n": n, "dim": dim}:
        return names, out / "truth.parquet"
    if out.exists():
        shutil.rmtree(out)
    centres = _centres(dim)
    (out / "parts").mkdir(parents=True)
    (out / "embeddings").mkdir(parents=True)
    truths = []
    for s in range(n_shards):
        df, x, truth = shard_rows(s, n_shards, centres)
        df.to_parquet(out / "parts" / f"{names[s]}.parquet", index=False)
        np.save(out / "embeddings" / f"{names[s]}.npy", x)
        truths.append(truth)
    pd.concat(truths, ignore_index=True).to_parquet(out / "truth.parquet", index=False)
    marker.write_text(json.dumps({"n": n, "dim": dim}))
    return names, out / "truth.parquet"


RUN = r"""
import json, logging, os, sys, time
import ray
from scanner.config import load_config
from scanner.corpus.run import corpus_steps
out, names, gb, store_gb = sys.argv[1], json.load(open(sys.argv[2])), float(sys.argv[3]), float(sys.argv[4])
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
logging.getLogger("ray").setLevel(logging.WARNING)
if os.environ.get("RAY_ADDRESS"):
    ray.init(logging_level=logging.WARNING, log_to_driver=False)
else:
    from scanner.stages.cluster import LOCAL_RAY_SYSTEM_CONFIG  # as memscan starts its local Ray
    ray.init(num_cpus=2, object_store_memory=int(store_gb * (1 << 30)), include_dashboard=True,
             dashboard_host="127.0.0.1", logging_level=logging.WARNING, log_to_driver=False,
             _system_config=LOCAL_RAY_SYSTEM_CONFIG)
ray.data.DataContext.get_current().enable_progress_bars = False
cfg = load_config(None, ["model.kind=none", f"corpus.memory_gb={gb}", "neighbours.generations=0",
                         "corpus.executor=ray", "neighbours.align_size=0",
                         "neighbours.dup_threshold=%s" % sys.argv[5]], sections=("neighbours", "corpus"))
windows, last = [], [time.time()]
def mark(step):
    windows.append((step, last[0], time.time()))
    last[0] = time.time()
prior = None
if len(sys.argv) > 7 and sys.argv[7]:  # --incremental: these shards against a finished run of the corpus steps
    from scanner.preflight import Prior, shard_order
    against = sys.argv[7]
    listed = json.load(open(os.path.join(against, "corpus", "shards.json")))
    old = Prior(uri=against, role="old", shards=[{"name": x.get("file", x["name"]), "out": x["out"]} for x in listed
                                                 if x["role"] in ("old", "new")])
    prior = {"olds": [old], "refs": [], "order": shard_order([old], names, out, [])}
t = time.time()
s = corpus_steps(cfg, out, names, embedder="synthetic", inside_step=mark, prior=prior)
s["wall_s"] = round(time.time() - t, 1)
s["windows"] = windows
tasks = []
try:
    from ray.util.state import list_tasks
    for task in list_tasks(detail=True, limit=200000, raise_on_missing_output=False):
        if task.start_time_ms and task.end_time_ms:
            tasks.append((task.node_id, task.start_time_ms / 1000, task.end_time_ms / 1000, task.name))
except Exception as e:
    s["task_error"] = repr(e)
s["tasks"] = tasks
json.dump(s, open(sys.argv[6], "w"), default=str)
"""


def _status(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssShmem"):
                out[k] = int(v.split()[0]) / 1024
    except (OSError, ValueError):
        pass
    return out


def _role(cmd: str) -> str:
    """What a process is, from its command line (a Ray worker's names its task or actor: `ray::NAME`; its
    arguments name the raylet it belongs to, so `ray::` is tested first)."""
    if not cmd:
        return "?"
    for key, role in (("ray::", "worker"), ("default_worker", "worker"), ("gcs_server", "gcs"),
                      ("dashboard", "dashboard"), ("raylet", "raylet"), ("-c", "driver")):
        if key in cmd:
            return role
    return "other"


class Sampler(threading.Thread):
    """Every process below the given roots: its peak VmRSS and RssAnon (MB) while the run lasts; and the peak of
    their RssAnon summed over one sample (`peak_total`: idle workers Ray keeps hold their private memory too)."""

    def __init__(self, roots: list[int], every: float = 0.5):
        super().__init__(daemon=True)
        self.roots, self.every, self.stop = roots, every, threading.Event()
        self.peak: dict[int, dict] = {}
        self.peak_total = 0.0

    def run(self) -> None:
        from scanner.procfs import cmdline, descendants

        while not self.stop.is_set():
            total = 0.0
            for root in self.roots:
                for pid in [root, *descendants(root)]:
                    st = _status(pid)
                    if not st:
                        continue
                    p = self.peak.setdefault(pid, {"role": "?", "rss": 0.0, "anon": 0.0, "shmem": 0.0})
                    p["rss"] = max(p["rss"], st.get("VmRSS", 0.0))
                    if st.get("RssAnon", 0.0) > p["anon"]:  # when, and as what, this process held the most
                        cmd = cmdline(pid)
                        p.update(anon=st["RssAnon"], at=time.time(), title=cmd[:60], role=_role(cmd))
                    p["shmem"] = max(p["shmem"], st.get("RssShmem", 0.0))
                    total += st.get("RssAnon", 0.0)
            self.peak_total = max(self.peak_total, total)
            time.sleep(self.every)


def run_corpus_steps(out: Path, names: list[str], memory_gb: float, store_gb: float, env: dict,
                     roots: list[int], against: Path | None = None) -> dict:
    (out / "shards.json").write_text(json.dumps(names))
    shutil.rmtree(out / "corpus", ignore_errors=True)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(out), str(out / "shards.json"), str(memory_gb),
                             str(store_gb), str(THRESHOLD), str(out / "bench_summary.json"),
                             str(against) if against else ""], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)})
    sampler = Sampler([proc.pid, *roots])
    sampler.start()
    rc = proc.wait()
    sampler.stop.set()
    sampler.join()
    if rc != 0:
        raise SystemExit(f"the corpus steps failed (exit {rc})")
    summary = json.loads((out / "bench_summary.json").read_text())
    procs = list(sampler.peak.values())
    by_role: dict[str, dict] = {}
    for p in procs:
        r = by_role.setdefault(p["role"], {"processes": 0, "peak_rss_mb": 0.0, "peak_private_mb": 0.0})
        r["processes"] += 1
        r["peak_rss_mb"] = round(max(r["peak_rss_mb"], p["rss"]), 1)
        r["peak_private_mb"] = round(max(r["peak_private_mb"], p["anon"]), 1)
    top = sorted(procs, key=lambda p: -p["anon"])[:5]  # the largest private peaks, each with the step it fell in
    for p in top:
        p["step"] = next((w[0] for w in summary.get("windows", []) if w[1] <= p.get("at", 0) <= w[2]), None)
    return {"summary": summary, "wall_s": round(time.time() - t0, 1), "memory": by_role,
            "largest": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in p.items() if k != "at"}
                        for p in top],
            "peak_private_mb": round(max((p["anon"] for p in procs), default=0.0), 1),
            "peak_total_private_mb": round(sampler.peak_total, 1),
            "peak_rss_mb": round(max((p["rss"] for p in procs), default=0.0), 1)}


def evaluate(out: Path, truth_path: Path) -> dict:
    from scanner.neighbours.dedup import pair_precision_recall

    truth = pd.read_parquet(truth_path)
    dups = pd.read_parquet(out / "duplicates.parquet")
    t = truth[truth.truth_group >= 0]
    kind = dict(zip(truth.key, truth.kind))
    d = dups.assign(kind=dups.key.map(kind))
    # pair precision / recall over the planted copies; chain images are judged apart: their neighbours are
    # near-duplicates too, but which balls a chain is cut into has no single truth
    nc = d[d.kind != "chain"]
    m = pair_precision_recall(dict(zip(nc.key, nc.group_id)), dict(zip(t.key, t.truth_group)))
    chain_groups = d[d.kind == "chain"].group_id.unique()
    emb = d[~d.keep & (d.link == "embedding")]
    groups = {k: sorted(v) for k, v in d.groupby("group_id")["key"]}
    return {**m, "groups": int(dups.group_id.nunique()), "largest_group": int(dups.groupby("group_id").size().max()),
            "chain_groups": len(chain_groups), "chains": int((truth.kind == "chain").sum() // CHAIN),
            "largest_chain_group": int(d[d.group_id.isin(chain_groups)].groupby("group_id").size().max())
            if len(chain_groups) else 0,
            "min_similarity_embedding_member": float(emb.similarity.min()) if len(emb) else None,
            "groups_below_threshold": int((emb.similarity < THRESHOLD - 1e-3).groupby(emb.group_id).any().sum()),
            "groups_digest": __import__("hashlib").sha256(json.dumps(sorted(groups.values())).encode()).hexdigest()[:16]}


def per_node(summary: dict) -> dict:
    """Task seconds of each step on each node, from the tasks' times and the steps' windows."""
    out: dict = {}
    for node, start, end, _name in summary.get("tasks", []):
        for step, a, b in summary.get("windows", []):
            if a <= start <= b:
                d = out.setdefault(step, {})
                d[str(node)[:8]] = round(d.get(str(node)[:8], 0.0) + (end - start), 1)
                break
    return out


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def assignment(lists: list[int], n: int = 100_000, dim: int = 128, spill: int = 2, brute_sample: int = 10_000
               ) -> list[dict]:
    """Seconds per row to put rows in their `spill` nearest lists, on one core, at each number of lists: the coarse
    quantizer memscan builds (scanner.corpus.search.coarse_quantizer: exact up to EXACT_MAX_LISTS, HNSW above),
    which is one of its two kinds, and the other kind forced beside it: exact (a flat index: one BLAS product per
    batch) and HNSW. Rows are this
    benchmark's background (1,000 directions with spread); the centroids are rows drawn from the same distribution
    with another seed (k-means centroids lie where the data is; a k-means of 10^5 lists is not run here). Quality:
    the share of rows whose exact nearest centroid is among the HNSW's `spill` lists, and is its first."""
    import faiss

    from scanner.corpus import search

    faiss.omp_set_num_threads(1)  # per-core cost
    centres = _centres(dim)
    x = np.concatenate([_background(1000 + s, 10_000, centres) for s in range(n // 10_000)]).astype(np.float32)
    sample = x[:brute_sample]
    rows = []
    for nlist in lists:
        pool = [_background(5000 + s, 10_000, centres) for s in range(-(-nlist // 10_000))]
        centroids = np.ascontiguousarray(np.concatenate(pool)[:nlist], dtype=np.float32)
        row = {"lists": nlist, "rows": n, "dim": dim, "spill": spill, "faiss": faiss.__version__}
        # what memscan builds at nlist lists is one of the two kinds: built once, the other forced beside it
        t0 = time.time()
        shipped = search.coarse_quantizer(centroids, "ip", spill)
        built = time.time() - t0
        graph = hasattr(shipped, "hnsw")
        row["shipped"] = search.quantizer_name(shipped)
        if graph:
            hnsw = shipped
        else:
            t0 = time.time()
            hnsw = search.coarse_quantizer(centroids, "ip", spill, exact_max=0)
            built = time.time() - t0
        row["hnsw_build_s"] = round(built, 2)
        flat = search.coarse_quantizer(centroids, "ip", spill, exact_max=nlist) if graph else shipped
        t0 = time.time()
        _, got = hnsw.search(x, spill)
        row["hnsw_us_per_row"] = round((time.time() - t0) / n * 1e6, 2)
        t0 = time.time()
        _, exact = flat.search(sample, spill)
        row["exact_us_per_row"] = round((time.time() - t0) / len(sample) * 1e6, 2)
        row["shipped_us_per_row"] = row["hnsw_us_per_row" if graph else "exact_us_per_row"]
        g = got[:len(sample)]
        row["hnsw_nearest_first"] = round(float((g[:, 0] == exact[:, 0]).mean()), 4)
        row["hnsw_nearest_in_spill"] = round(float((g == exact[:, :1]).any(axis=1).mean()), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del hnsw, flat, shipped
    return rows


def _linked(src: Path, dst: Path, names: list[str]) -> None:
    """dst as a scan's --out holding `names`' part files and embeddings of src (symbolic links: no copy)."""
    shutil.rmtree(dst, ignore_errors=True)
    for folder, ext in (("parts", "parquet"), ("embeddings", "npy")):
        (dst / folder).mkdir(parents=True)
        for n in names:
            (dst / folder / f"{n}.{ext}").symlink_to(src / folder / f"{n}.{ext}")


def incremental(n: int, dim: int, new_share: float, work: Path, memory_gb: float, store_gb: float) -> dict:
    """The corpus steps of new shards (new_share of n, the last shards: they hold copies of the old shards'
    planted images) --against a finished run over the rest, and a full rerun over all of them: wall time, peak
    memory, each step's seconds, and whether the two give the same duplicate groups (issue #36)."""
    out = work / f"{n}-{dim}"
    names, truth = write_corpus(out, n, dim)
    k = max(1, round(len(names) * new_share))
    old_names, new_names = names[:-k], names[-k:]
    env = {k_: v for k_, v in os.environ.items() if k_ != "RAY_ADDRESS"}
    old_out, new_out = work / f"inc-old-{n}", work / f"inc-new-{n}"
    _linked(out, old_out, old_names)
    _linked(out, new_out, new_names)
    from scanner.stages.cluster import LOCAL_RAY_SYSTEM_CONFIG

    row = {"n": n, "dim": dim, "old_shards": len(old_names), "new_shards": k, "memory_gb": memory_gb,
           "ray_system_config": LOCAL_RAY_SYSTEM_CONFIG, "load_before": load_average()}
    runs = {}
    for name, target, shard_names, against in (("old", old_out, old_names, None),
                                               ("incremental", new_out, new_names, old_out),
                                               ("full", out, names, None)):
        r = run_corpus_steps(target, shard_names, memory_gb, store_gb, env, [], against)
        s = r["summary"]
        runs[name] = {"rows": s["corpus"]["rows"], "asking_rows": s["corpus"].get("asking_rows", s["corpus"]["rows"]),
                      "wall_s": r["wall_s"], "peak_private_mb": r["peak_private_mb"], "peak_rss_mb": r["peak_rss_mb"],
                      "peak_total_private_mb": r["peak_total_private_mb"],
                      "steps_s": {k_: v for k_, v in s["timings_s"].items()}, "index": (s.get("neighbours") or {}).get("index"),
                      "largest": r["largest"][:3]}
        print(json.dumps({name: runs[name]}), flush=True)
    from scanner.corpus.store import PartStore  # noqa: F401 - the package is importable here (sys.path)

    def groups(d: Path) -> set:
        g = pd.concat([pd.read_parquet(f, columns=["gid", "group_id"]) for f in (d / "corpus" / "groups").glob("*.parquet")])
        return {frozenset(x["gid"]) for _, x in g.groupby("group_id")}

    full_g, inc_g = groups(out), groups(new_out)
    row.update(runs=runs, wall_ratio=round(runs["incremental"]["wall_s"] / runs["full"]["wall_s"], 4),
               new_share=round(runs["incremental"]["asking_rows"] / runs["full"]["rows"], 4),
               groups_full=len(full_g), groups_incremental=len(inc_g), groups_same=len(full_g & inc_g),
               groups_identical=full_g == inc_g, **{f"full_{k_}": v for k_, v in evaluate(out, truth).items()},
               load_after=load_average(), date=time.strftime("%Y-%m-%d"), cpus=os.cpu_count())
    return row


def partition_quality(d: Path, truth_path: Path) -> dict:
    """Pair precision / recall of every group a run's corpus steps formed (corpus/groups/: old rows too) against the
    planted copies, chain images apart (as evaluate)."""
    from scanner.neighbours.dedup import pair_precision_recall

    truth = pd.read_parquet(truth_path)
    g = pd.concat([pd.read_parquet(f, columns=["key", "group_id"]) for f in (d / "corpus" / "groups").glob("*.parquet")])
    kind = dict(zip(truth.key, truth.kind))
    g = g[g.key.map(kind) != "chain"]
    t = truth[truth.truth_group >= 0]
    return pair_precision_recall(dict(zip(g.key, g.group_id)), dict(zip(t.key, t.truth_group)))


def incremental_eval(results: dict, work: Path, dim: int) -> None:
    """Both partitions of every incremental row (the runs' folders under --work) against the planted truth."""
    for key, row in results.items():
        if not key.startswith("incremental-"):
            continue
        n = row["n"]
        truth = work / f"{n}-{dim}" / "truth.parquet"
        if not any((work / f"inc-new-{n}" / "corpus" / "groups").glob("*.parquet")):
            continue  # its runs' folders are gone: the quality recorded with it stays
        row["quality"] = {"full": partition_quality(work / f"{n}-{dim}", truth),
                          "incremental": partition_quality(work / f"inc-new-{n}", truth)}


def render_incremental(results: dict, path: Path) -> None:
    lines = ["# New shards against a finished scan (`benchmarks/bench_corpus.py --incremental`)", "",
             ("bench_corpus's synthetic corpus (float16 128-d embeddings as a scan's part files, 10,000 rows a shard, "
              "planted copies of each shard's images in the next one): the corpus steps of `memscan dedup` "
              "(corpus.executor ray, corpus.memory_gb 2, 2 CPUs) over all shards but the last ones (`old`), then "
              "the last shards `--against` that run (`incremental`), then all shards at once (`full`, a rescan), "
              "one after another on an otherwise idle machine. Peak memory: the largest private (RssAnon) peak of "
              "any process; all processes: the peak of their private memory summed (n/a: not measured then). "
              "`groups identical`: the incremental run's groups over every row (old ones too) against the full "
              "run's."), ""]
    for key, r in sorted(results.items()):
        if not key.startswith("incremental-"):
            continue
        runs = r["runs"]
        lines += [f"## {r['n']:,} images, {r['new_shards']} new shard(s) of {r['old_shards'] + r['new_shards']}", "",
                  "| run | rows | rows asking | wall (s) | peak private MB | all processes MB | " + " | ".join(
                      runs["full"]["steps_s"]) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(runs["full"]["steps_s"])]
        for name in ("old", "incremental", "full"):
            x = runs[name]
            total = x.get("peak_total_private_mb")
            lines.append(f"| {name} | {x['rows']:,} | {x['asking_rows']:,} | {x['wall_s']:.0f} | "
                         f"{x['peak_private_mb']:.0f} | {f'{total:.0f}' if total else 'n/a'} | " + " | ".join(
                             f"{x['steps_s'].get(k, 0) or 0:.1f}" for k in runs["full"]["steps_s"]) + " |")
        inc, full = runs["incremental"], runs["full"]
        q = r.get("quality") or {}
        ix_i, ix_f = inc.get("index") or {}, full.get("index") or {}
        lines += ["", (f"- new rows: {r['new_share']:.2%} of the corpus; incremental / full wall time: "
                       f"**{r['wall_ratio']:.2f}**; corpus-step seconds: {inc['steps_s'].get('corpus_steps')} / "
                       f"{full['steps_s'].get('corpus_steps')}; peak private memory: {inc['peak_private_mb']:.0f} / "
                       f"{full['peak_private_mb']:.0f} MB."),
                  (f"- links: the incremental run assigned and searched "
                   f"{(ix_i.get('reused_index') or {}).get('new_rows')} rows against the kept lists (list search "
                   f"{(ix_i.get('seconds') or {}).get('lists')} s, recall@{ix_i.get('recall_k')} "
                   f"{ix_i.get('recall_at_k')} on {ix_i.get('recall_sample')} new queries) against the full run's "
                   f"{ix_f.get('n')} (list search {(ix_f.get('seconds') or {}).get('lists')} s, recall "
                   f"{ix_f.get('recall_at_k')})."),
                  (f"- groups: {r['groups_same']:,} of {r['groups_full']:,} identical "
                   f"({'all' if r['groups_identical'] else 'not all'}); incremental {r['groups_incremental']:,}.")]
        if q:
            lines.append("- pair precision / recall against the planted copies (chains apart), every row: full "
                         f"{q['full']['pair_precision']:.4f} / {q['full']['pair_recall']:.4f}, incremental "
                         f"{q['incremental']['pair_precision']:.4f} / {q['incremental']['pair_recall']:.4f}.")
        ms = (r.get("ray_system_config") or {}).get("idle_worker_killing_time_threshold_ms")
        lines.append(f"- local Ray: idle workers kept {ms:,} ms (memscan's LOCAL_RAY_SYSTEM_CONFIG)" if ms else
                     "- local Ray: Ray's default, idle workers killed after 1 s (measured before memscan kept them "
                     "longer: benchmarks/results/ray_workers.md)")
        lines.append(f"- load average before / after: {r['load_before']} / {r['load_after']}; {r['date']}, "
                     f"{r['cpus']} CPUs.")
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000_000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--memory-gb", type=float, default=2.0)
    ap.add_argument("--object-store-gb", type=float, default=2.0)
    ap.add_argument("--work", default="/tmp/bench_corpus")
    ap.add_argument("--name", default="corpus")
    ap.add_argument("--cluster", action="store_true", help="a local two-node Ray cluster (one CPU each)")
    ap.add_argument("--assignment", action="store_true", help="list assignment cost per row at --lists lists")
    ap.add_argument("--lists", type=int, nargs="+", default=[500, 5_000, 50_000, 200_000])
    ap.add_argument("--keep", action="store_true", help="keep the synthetic corpora")
    ap.add_argument("--render", action="store_true", help="only rewrite results/corpus.md from the JSON files")
    ap.add_argument("--incremental", type=float, metavar="SHARE",
                    help="the last SHARE of the shards --against a run over the rest, and a full rerun (issue #36)")
    ap.add_argument("--incremental-eval", action="store_true",
                    help="add both partitions' pair precision / recall to the incremental rows (the runs' folders)")
    args = ap.parse_args(argv)
    results_path = HERE / "results" / f"{args.name}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.incremental or args.incremental_eval or (args.render and any(k.startswith("incremental-")
                                                                          for k in results)):
        for n in (args.sizes if args.incremental else []):
            row = incremental(n, args.dim, args.incremental, Path(args.work), args.memory_gb, args.object_store_gb)
            results[f"incremental-{n}-{args.dim}"] = row
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
        if args.incremental or args.incremental_eval:
            incremental_eval(results, Path(args.work), args.dim)
            results_path.write_text(json.dumps(results, indent=1) + "\n")
        render_incremental(results, HERE / "results" / f"{args.name}.md")
        return 0
    if args.assignment:
        before = load_average()
        results["assignment"] = {"rows": assignment(args.lists), "load_before": before, "load": load_average(),
                                 "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    elif not args.render:
        for n in args.sizes:
            out = Path(args.work) / f"{n}-{args.dim}"
            t0 = time.time()
            names, truth = write_corpus(out, n, args.dim)
            t_write = time.time() - t0
            load_before = load_average()
            env, roots, cluster = dict(os.environ), [], None
            env.pop("RAY_ADDRESS", None)
            if args.cluster:
                from local_cluster import LocalCluster

                cluster = LocalCluster(Path(args.work) / "ray2", [
                    {"num_cpus": 1, "resources": {"node_a": 1}}, {"num_cpus": 1, "resources": {"node_b": 1}}],
                    dashboard=True).start()
                env, roots = dict(cluster.env), [p.pid for p in cluster.procs]
            try:
                r = run_corpus_steps(out, names, args.memory_gb, args.object_store_gb, env, roots)
            finally:
                if cluster is not None:
                    cluster.stop()
            ev = evaluate(out, truth)
            s = r["summary"]
            row = {"n": s["corpus"]["rows"], "dim": args.dim, "shards": len(names), "memory_gb": args.memory_gb,
                   "object_store_gb": args.object_store_gb, "nodes": 2 if args.cluster else 1,
                   "peak_private_mb": r["peak_private_mb"], "peak_rss_mb": r["peak_rss_mb"], "memory": r["memory"],
                   "largest": r["largest"],
                   "wall_s": r["wall_s"], "s_per_million": round(r["wall_s"] / (s["corpus"]["rows"] / 1e6), 1),
                   "write_corpus_s": round(t_write, 1), "steps_s": s["timings_s"],
                   "steps_per_node_s": per_node(s), "index": (s.get("neighbours") or {}).get("index"),
                   "links": (s.get("neighbours") or {}).get("links"), **ev,
                   "load_before": load_before, "load_after": load_average(), "date": time.strftime("%Y-%m-%d"),
                   "cpus": os.cpu_count()}
            results[f"{n}-{args.dim}-{row['nodes']}"] = row
            print(json.dumps({k: v for k, v in row.items() if k not in ("memory",)}), flush=True)
            results_path.parent.mkdir(exist_ok=True)
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            if not args.keep:
                shutil.rmtree(out)
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    render(results, HERE / "results" / f"{args.name}.md")
    return 0


def render(results: dict, path: Path) -> None:
    runs = [v for k, v in results.items() if k != "assignment"]
    runs.sort(key=lambda r: (r["nodes"], r["dim"], r["n"]))
    lines = ["# Corpus steps as Ray tasks (`benchmarks/bench_corpus.py`)", "",
             ("Synthetic float16 embeddings written as a scan's part files (10,000 rows a shard) with planted byte "
              "copies, perturbed copies and chains; the corpus steps of `memscan dedup` (corpus.executor ray) in a "
              "fresh driver. Peak memory per process sampled from /proc every 0.5 s: private (RssAnon) and resident "
              "(VmRSS, which also counts the pages of Ray's shared object store a worker touched)."), "",
             ("| images | dim | nodes | budget (GB) | peak private MB, any process | peak RSS MB | wall (s) | "
              "s / 10^6 | index | recall@k | pair P | pair R | chains cut into | load before/after |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        ix = r.get("index") or {}
        kind = ix.get("kind", "?") + (f" ({ix.get('nlist')} lists)" if ix.get("kind") == "ivf" else "")
        lines.append(f"| {r['n']:,} | {r['dim']} | {r['nodes']} | {r['memory_gb']:g} | {r['peak_private_mb']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['wall_s']:.0f} | {r['s_per_million']:.0f} | {kind} | "
                     f"{ix.get('recall_at_k')} | {r['pair_precision']:.4f} | {r['pair_recall']:.4f} | "
                     f"{r['chain_groups']} groups for {r['chains']} chains | "
                     f"{r['load_before'][0]} / {r['load_after'][0]} |")
    for r in runs:
        lines += ["", f"Steps of {r['n']:,} x {r['dim']} on {r['nodes']} node(s), wall seconds: "
                  + ", ".join(f"{k} {v}" for k, v in r["steps_s"].items() if v is not None)]
        if r["nodes"] > 1:
            lines.append("Task seconds per step per node: " + json.dumps(r["steps_per_node_s"]))
        lines.append("Peak memory by process role (MB): " + json.dumps(r["memory"]))
        if r.get("largest"):
            lines.append("Largest private peaks (MB), with the process's title and the step running then: " + "; ".join(
                f"{p['anon']:.0f} in `{p.get('title', '?')}` during {p.get('step')}" for p in r["largest"]))
    one = [r for r in runs if r["nodes"] == 1 and r["dim"] == 128]
    if len(one) >= 2:
        a, b = one[0], one[-1]
        lines += ["", f"Peak private memory {b['n']:,} / {a['n']:,}: {b['peak_private_mb'] / a['peak_private_mb']:.2f}x."]
    two = {r["n"]: r for r in runs if r["nodes"] == 2}
    for n, r in two.items():
        base = next((x for x in one if x["n"] == n), None)
        if base:
            lines.append(f"Two nodes vs one at {n:,}: the same groups: {r['groups_digest'] == base['groups_digest']} "
                         f"(digest {r['groups_digest']}); pair P/R {r['pair_precision']:.4f}/{r['pair_recall']:.4f} vs "
                         f"{base['pair_precision']:.4f}/{base['pair_recall']:.4f}.")
    if "assignment" in results:
        a = results["assignment"]
        lines += ["", "## List assignment per row (one core)", "",
                  (f"{a['rows'][0]['rows']:,} rows of this benchmark's background ({a['rows'][0]['dim']}-d), each put "
                   f"in its {a['rows'][0]['spill']} nearest lists; centroids drawn from the same distribution. "
                   "Exact: a flat index (one BLAS product per batch of rows); HNSW: M = 32, efSearch = 64. "
                   "Shipped: what `coarse_quantizer` builds at that many lists. HNSW quality against exact: "
                   f"the exact nearest list is HNSW's first / among its {a['rows'][0]['spill']}. faiss "
                   f"{a['rows'][0].get('faiss', '?')}, 1-min load {a.get('load_before', ['?'])[0]} before, "
                   f"{a['load'][0]} after; {a['date']}."), "",
                  ("| lists | exact (µs/row) | HNSW (µs/row) | shipped | shipped (µs/row) | HNSW first / in spill | "
                   "HNSW build (s) |"), "|---|---|---|---|---|---|---|"]
        for x in a["rows"]:
            lines.append(f"| {x['lists']:,} | {x['exact_us_per_row']} | {x['hnsw_us_per_row']} | {x['shipped']} | "
                         f"{x['shipped_us_per_row']} | {x['hnsw_nearest_first']} / {x['hnsw_nearest_in_spill']} | "
                         f"{x['hnsw_build_s']} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
