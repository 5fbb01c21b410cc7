"""The corpus steps at 10^5-10^7 images in a fixed memory budget (issue: corpus steps out of core).

    python benchmarks/bench_corpus.py --sizes 100000 1000000 10000000 --memory-gb 2 --work /tmp/bench_corpus

For every size it writes a synthetic corpus as a scan's part files (parts/NAME.parquet with key, sha256,
phash, width, height; embeddings/NAME.npy, 128-d float16, 10,000 rows a shard), then runs the corpus steps
of `memscan dedup` (scanner.finalize.finalize, no model) in a fresh process and measures:
- peak RSS of that process (its VmHWM read from /proc when it ends: the high-water mark, not a sample), wall time;
- duplicate pair precision / recall against the planted groups;
- that no group is a chain: every member linked by the embedding is within the threshold of its kept image,
  and the planted chains (20 images, each at cosine 0.97 from the next, ends far apart) are cut.

Planted, per shard: 2 % of the images get 1-3 byte-identical copies (same sha256, vector, pHash) or 1-3
perturbed copies (cosine 0.975-0.995 to the original, another sha256, the pHash with 0-2 bits flipped for
half of them, a random one for the rest), placed in the next shard; one chain of 20. The background is
a mixture of 1,000 directions with spread (typical cosine to a neighbour ~0.7, far below the 0.93
threshold). Results: benchmarks/results/corpus.{md,json}.
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
sys.path.insert(0, str(ROOT))

ROWS_PER_SHARD = 10_000
DIM = 128
CENTRES = 1000
PLANT = 0.02
CHAIN = 20
CHAIN_COS = 0.97
THRESHOLD = 0.93


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _centres():
    return _unit(np.random.default_rng(12345).standard_normal((CENTRES, DIM)))


def _background(s: int, n: int, centres) -> np.ndarray:
    rng = np.random.default_rng([7, s])
    c = centres[rng.integers(0, CENTRES, n)]
    return _unit(c + 0.09 * rng.standard_normal((n, DIM)))  # spread: neighbours at cosine ~0.6-0.8


def shard_rows(s: int, n_shards: int, centres) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """Shard s: its own background (of which the first PLANT share are planted originals), the copies of
    shard s-1's planted originals, and one chain. Returns (part rows, vectors, truth rows)."""
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
                noise = _unit(crng.standard_normal((1, DIM)))
                noise = _unit(noise - (noise @ pv[j]) * pv[j])
                vecs.append(target * pv[j:j + 1] + np.sqrt(1 - target**2) * noise)
                bits = crng.choice(64, int(crng.integers(0, 3)), replace=False)
                flip = np.uint64(sum(1 << int(b) for b in bits))
                if j % 4 == 1:
                    near_ph = (np.int64(pph[j]).view(np.uint64) ^ flip).view(np.int64)
                else:
                    near_ph = crng.integers(-2**63, 2**63 - 1, dtype=np.int64)
                copies.append((crng.bytes(32).hex(), near_ph, p * ROWS_PER_SHARD + j, "perturbed"))
    rows.append(pd.DataFrame(copies, columns=["sha256", "phash", "truth_group", "kind"]))
    # one chain: CHAIN images along an arc, CHAIN_COS between neighbours
    start = _unit(np.random.default_rng([17, s]).standard_normal((2, DIM)))
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
    for c in ("error", "error_stage", "embed_error", "caption"):
        df[c] = None
    x = np.concatenate(vecs).astype(np.float16)
    truth = df[["key", "truth_group", "kind"]]
    return df.drop(columns=["truth_group", "kind"]), x, truth


def write_corpus(out: Path, n: int) -> tuple[list[str], Path]:
    """Part files for about n images. Returns (shard paths, truth parquet)."""
    centres = _centres()
    n_shards = max(1, round(n / ROWS_PER_SHARD))
    (out / "parts").mkdir(parents=True, exist_ok=True)
    (out / "embeddings").mkdir(parents=True, exist_ok=True)
    truths, shards = [], []
    for s in range(n_shards):
        df, x, truth = shard_rows(s, n_shards, centres)
        name = f"{s:06d}"
        df.to_parquet(out / "parts" / f"{name}.parquet", index=False)
        np.save(out / "embeddings" / f"{name}.npy", x)
        truths.append(truth)
        shards.append(str(out / f"{name}.tar"))
    pd.concat(truths, ignore_index=True).to_parquet(out / "truth.parquet", index=False)
    return shards, out / "truth.parquet"


RUN = r"""
import json, sys, time
from scanner.config import load_config
from scanner.finalize import finalize
out, shards, gb = sys.argv[1], json.load(open(sys.argv[2])), float(sys.argv[3])
cfg = load_config(None, ["model.kind=none", f"corpus.memory_gb={gb}", "neighbours.generations=0",
                         "neighbours.dup_threshold=%s" % sys.argv[4]], sections=("neighbours", "corpus"))
t = time.time()
s = finalize(cfg, __import__("pathlib").Path(out), shards, embedder="synthetic")
s["wall_s"] = round(time.time() - t, 1)
s["vmhwm_mb"] = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
json.dump(s, open(sys.argv[5], "w"), default=str)
"""


def run_corpus_steps(out: Path, shards: list[str], memory_gb: float) -> dict:
    (out / "shards.json").write_text(json.dumps(shards))
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(out), str(out / "shards.json"), str(memory_gb),
                             str(THRESHOLD), str(out / "bench_summary.json")], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.wait() != 0:
        raise SystemExit(f"the corpus steps failed (exit {proc.returncode})")
    wall = time.time() - t0
    summary = json.loads((out / "bench_summary.json").read_text())
    # the child's own high-water mark (VmHWM of its address space after exec; getrusage's ru_maxrss would carry
    # this parent's peak over through fork and exec)
    return {"summary": summary, "wall_s": round(wall, 1), "peak_rss_mb": round(summary["vmhwm_mb"], 1)}


def evaluate(out: Path, truth_path: Path) -> dict:
    from scanner.neighbours.dedup import pair_precision_recall

    truth = pd.read_parquet(truth_path)
    dups = pd.read_parquet(out / "duplicates.parquet")
    t = truth[truth.truth_group >= 0]
    kind = dict(zip(truth.key, truth.kind))
    d = dups.assign(kind=dups.key.map(kind))
    # pair precision / recall over the planted copies; chain images are judged apart (below): their
    # neighbours are near-duplicates too, but which balls a chain is cut into has no single truth
    nc = d[d.kind != "chain"]
    m = pair_precision_recall(dict(zip(nc.key, nc.group_id)), dict(zip(t.key, t.truth_group)))
    chain_groups = d[d.kind == "chain"].group_id.unique()
    emb = d[~d.keep & (d.link == "embedding")]
    return {**m, "groups": int(dups.group_id.nunique()), "largest_group": int(dups.groupby("group_id").size().max()),
            "chain_groups": len(chain_groups), "chains": int((truth.kind == "chain").sum() // CHAIN),
            "largest_chain_group": int(d[d.group_id.isin(chain_groups)].groupby("group_id").size().max())
            if len(chain_groups) else 0,
            "min_similarity_embedding_member": float(emb.similarity.min()) if len(emb) else None,
            "groups_below_threshold": int((emb.similarity < THRESHOLD - 1e-3).groupby(emb.group_id).any().sum())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--memory-gb", type=float, default=2.0)
    ap.add_argument("--work", default="/tmp/bench_corpus")
    ap.add_argument("--name", default="corpus")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic corpora")
    args = ap.parse_args(argv)
    results_path = HERE / "results" / f"{args.name}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for n in args.sizes:
        out = Path(args.work) / str(n)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        t0 = time.time()
        shards, truth = write_corpus(out, n)
        t_write = time.time() - t0
        r = run_corpus_steps(out, shards, args.memory_gb)
        ev = evaluate(out, truth)
        s = r["summary"]
        row = {"n": s["corpus"]["rows"], "shards": len(shards), "memory_gb": args.memory_gb,
               "peak_rss_mb": r["peak_rss_mb"], "wall_s": r["wall_s"],
               "s_per_million": round(r["wall_s"] / (s["corpus"]["rows"] / 1e6), 1),
               "write_corpus_s": round(t_write, 1), "index": s["neighbours"]["index"],
               "timings_s": {**s["timings_s"], **s["neighbours"]["timings_s"]},
               "memory_mb": {**s["corpus"].get("memory_mb", {}), **s["neighbours"].get("memory_mb", {}),
                             **{f"search_{k}": v for k, v in s["neighbours"]["index"].get("memory_mb", {}).items()}},
               **ev,
               "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
        results[str(n)] = row
        print(json.dumps(row), flush=True)
        results_path.parent.mkdir(exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        if not args.keep:
            import shutil

            shutil.rmtree(out)
    render(results, HERE / "results" / f"{args.name}.md", args.memory_gb)
    return 0


def render(results: dict, path: Path, memory_gb: float) -> None:
    rows = [results[k] for k in sorted(results, key=int)]
    lines = [f"# Corpus steps out of core (`benchmarks/bench_corpus.py`, corpus.memory_gb = {memory_gb})", "",
             ("Synthetic 128-d float16 embeddings written as a scan's part files (10,000 rows a shard) with planted "
              "byte copies, perturbed copies and chains; the corpus steps of `memscan dedup` run in a fresh process. "
              "Peak RSS is that process's high-water mark (VmHWM)."), "",
             ("| images | peak RSS (MB) | wall (s) | s / 10^6 images | index | recall@k (held out) | pair P | pair R "
              "| groups | chains cut into | min sim. to kept (embedding links) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ix = r["index"]
        kind = ix["kind"] + (f" ({ix['nlist']} lists, spill {ix['spill']})" if ix["kind"] == "ivf" else "")
        lines.append(f"| {r['n']:,} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.0f} | {r['s_per_million']:.0f} | {kind} "
                     f"| {ix['recall_at_k']:.4f} | {r['pair_precision']:.4f} | {r['pair_recall']:.4f} | {r['groups']:,} "
                     f"| {r['chain_groups']} groups for {r['chains']} chains (largest {r['largest_chain_group']}) "
                     f"| {r['min_similarity_embedding_member']:.4f} |")
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        lines += ["", f"Peak RSS {b['n']:,} / {a['n']:,}: {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x."]
    lines += ["", "Timings of the largest run (s): " + json.dumps(rows[-1]["timings_s"]), "",
              f"Measured {rows[-1]['date']} on {rows[-1]['cpus']} CPUs."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
