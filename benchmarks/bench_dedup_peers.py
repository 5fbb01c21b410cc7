"""memscan dedup against fastdup and imagededup on the project's held-out copy corpora, each tool at its defaults.

    python benchmarks/bench_dedup_peers.py --work runs/copydet --setup     # once: the peers' virtual environments
    python benchmarks/bench_dedup_peers.py --work runs/copydet             # results/dedup_peers.{md,json}

--work is bench_copydet.py's folder: its copy corpora of seeds 1-4 (built there when missing; no setting of any tool
was tuned on them). Per seed every tool reads the same images: memscan its webdataset shards (`memscan dedup`, its
defaults: the shipped embedder, the tuned neighbours settings), the peers a folder of the same JPEG files extracted
from the shards (neither reads tars).

The peers, each in its own virtual environment because their pins clash with memscan's (fastdup 2.54 pins numpy
< 2, which breaks memscan's pyarrow):
- fastdup 2.54 (`--setup` makes PEERS/fastdup-venv: `python3 -m venv PEERS/fastdup-venv &&
  PEERS/fastdup-venv/bin/pip install fastdup==2.54`): `fastdup.create(work_dir, input_dir).run()` with its bundled
  model (runs offline), then `connected_components()` at its defaults; its groups are the components of 2 or more.
- imagededup 0.3.3 (`python3 -m venv PEERS/imagededup-venv`, a .pth file adding memscan's venv's site-packages for
  torch, then `pip install --no-deps imagededup==0.3.3.post2 PyWavelets`): PHash, and DHash, WHash and AHash beside it,
  each `encode_images` + `find_duplicates` at the default max_distance_threshold (10); its CNN needs downloaded
  weights and cannot run here. Its groups are the connected components of the duplicate pairs it reports.
Every tool's groups are scored with memscan evaluate's functions: pair precision and recall against the planted
groups, and recall per planted kind and edit. Wall time is the tool's whole process (interpreter start, model load,
decoding, search), timed on the same machine in the same run; the load average beside it says how quiet it was.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench_copydet import REPORT, corpus, dedup, planted
from bench_detection import pooled_recall
from results_file import write_results

PEERS = Path(os.environ.get("MEMSCAN_PEERS", "/work/peers"))
FASTDUP = "fastdup==2.54"
IMAGEDEDUP = "imagededup==0.3.3.post2"
HASHES = ("PHash", "DHash", "WHash", "AHash")

FASTDUP_SCRIPT = """
import json, sys, time
import fastdup
images, work, out = sys.argv[1:4]
t0 = time.time()
fd = fastdup.create(work_dir=work, input_dir=images)
fd.run(overwrite=True)
cc = fd.connected_components()
df = cc[0] if isinstance(cc, tuple) else cc
df = df[df["count"] >= 2]
sim = fd.similarity()
sim = sim[sim["distance"] >= 0.96]  # the pairs its components join: connected_components' default ccthreshold
name = lambda f: f.rsplit("/", 1)[-1].rsplit(".", 1)[0]
json.dump({"groups": [[name(f), int(c)] for f, c in zip(df["filename"], df["component_id"])],
           "pairs": [[name(a), name(b)] for a, b in zip(sim["filename_from"], sim["filename_to"])],
           "seconds_in_process": time.time() - t0}, open(out, "w"))
"""

IMAGEDEDUP_SCRIPT = """
import json, sys, time
from imagededup import methods
images, method, out = sys.argv[1:4]
t0 = time.time()
h = getattr(methods, method)(verbose=False)
enc = h.encode_images(image_dir=images)
dups = h.find_duplicates(encoding_map=enc)
json.dump({"pairs": [[k, v] for k, vs in dups.items() for v in vs], "seconds_in_process": time.time() - t0},
          open(out, "w"))
"""


def setup() -> None:
    py = "python3"
    fd = PEERS / "fastdup-venv"
    if not (fd / "bin" / "python").exists():
        subprocess.run([py, "-m", "venv", str(fd)], check=True)
        subprocess.run([str(fd / "bin" / "pip"), "install", "-q", FASTDUP], check=True)
    idd = PEERS / "imagededup-venv"
    if not (idd / "bin" / "python").exists():
        subprocess.run([py, "-m", "venv", str(idd)], check=True)
        site = subprocess.run([str(idd / "bin" / "python"), "-c",
                               "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        import sysconfig

        Path(site, "memscan_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([str(idd / "bin" / "pip"), "install", "-q", "--no-deps", IMAGEDEDUP, "PyWavelets"], check=True)


def extract(c: Path) -> Path:
    """The corpus's JPEG files in one folder, named KEY.jpg (what a peer reads)."""
    out = c.parent / "images"
    if out.is_dir() and any(out.iterdir()):
        return out
    out.mkdir(parents=True, exist_ok=True)
    for t in sorted((c / "shards").glob("*.tar")):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    (out / m.name).write_bytes(tf.extractfile(m).read())
    return out


def components(keys: list[str], pairs: list[list[str]]) -> pd.DataFrame:
    """key, group_id of the connected components (>= 2 keys) of the pairs."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    idx = {k: i for i, k in enumerate(keys)}
    e = np.array([[idx[a], idx[b]] for a, b in pairs if a in idx and b in idx], np.int64).reshape(-1, 2)
    g = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(len(keys), len(keys)))
    _, lab = connected_components(g, directed=False)
    size = np.bincount(lab)
    m = size[lab] >= 2
    return pd.DataFrame({"key": np.asarray(keys)[m], "group_id": lab[m]})


def run_peer(cmd: list[str], log: Path) -> tuple[float, float]:
    load0 = os.getloadavg()[0]
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False, env={**os.environ,
                                                                                         "PYTHONPATH": ""})
    if proc.returncode:
        raise SystemExit(f"{cmd[:3]} failed; see {log}")
    return time.time() - t0, load0


def score(dups: pd.DataFrame, truth: pd.DataFrame, keys, pairs: list[list[str]] | None = None) -> dict:
    """Pair precision / recall and recall per edit of a tool's groups (pairs inside its groups, as memscan evaluate
    scores memscan); with `pairs`, also of the pairs the tool itself reports (pairs_mode: what a peer whose groups
    chain is fairly judged by)."""
    from scanner.demo.evaluate import duplicates_by_edit
    from scanner.neighbours.dedup import pair_precision_recall

    p = planted(truth, keys)
    pr = pair_precision_recall(dict(zip(dups["key"], dups["group_id"])), dict(zip(p["key"], p["group_id"])))
    out = {**pr, "recall_by_edit": duplicates_by_edit(dups, p), "largest_group": int(
        dups.groupby("group_id").size().max()) if len(dups) else 0}
    if pairs is not None:
        out["pairs_mode"] = pair_scores(pairs, p)
    return out


def pair_scores(pairs: list[list[str]], p: pd.DataFrame) -> dict:
    """Precision and recall of reported pairs (unordered, once each) against the planted groups' pairs, and recall
    per edit: a member is found when a reported pair joins it to a member of its planted group."""
    g = dict(zip(p["key"], p["group_id"]))
    uniq = {tuple(sorted(x)) for x in pairs if x[0] != x[1]}
    right = {x for x in uniq if g.get(x[0]) is not None and g.get(x[0]) == g.get(x[1])}
    sizes = p.groupby("group_id").size()
    true_pairs = int((sizes * (sizes - 1) // 2).sum())
    found = {k for x in right for k in x}
    df = p.assign(found=p["key"].isin(found))
    per_edit = [{"planted": k, "edit": e, "members": len(d), "groups": int(d["group_id"].nunique()),
                 "groups_found": int(d.groupby("group_id")["found"].all().sum()), "recall": float(d["found"].mean())}
                for (k, e), d in df.groupby(["planted", "edit"])]
    return {"pair_precision": len(right) / len(uniq) if uniq else 1.0, "pair_recall": len(right) / true_pairs,
            "reported_pairs": len(uniq), "correct_pairs": len(right), "true_pairs": true_pairs,
            "recall_by_edit": per_edit}


def one(work: Path, seed: int) -> list[dict]:
    c = corpus(work, seed)
    images = extract(c)
    keys = sorted(p.stem for p in images.glob("*.jpg"))
    truth = pd.read_parquet(c / "truth.parquet")
    rows = []
    out = work / f"seed{seed}" / "peers"
    out.mkdir(parents=True, exist_ok=True)
    # memscan
    md = work / f"seed{seed}" / "dedup-peers"
    if md.exists():
        import shutil

        shutil.rmtree(md)
    t = dedup(c, md)
    d = pd.read_parquet(md / "duplicates.parquet")
    # memscan's answer is its groups, which do not chain: every member with its kept image is a reported pair
    kept = d[d["keep"]].set_index("group_id")["key"]
    mine = [[k, kept[g]] for k, g, keep in zip(d["key"], d["group_id"], d["keep"]) if not keep]
    rows.append({"tool": "memscan dedup", "seed": seed, "wall_s": t["wall_s"], "load_1min": t["load_1min_before"],
                 **score(d, truth, keys, mine)})
    # fastdup
    res = out / "fastdup.json"
    wall, load0 = run_peer([str(PEERS / "fastdup-venv" / "bin" / "python"), "-c", FASTDUP_SCRIPT, str(images),
                            str(out / "fastdup-work"), str(res)], out / "fastdup.log")
    got = json.loads(res.read_text())
    rows.append({"tool": "fastdup 2.54", "seed": seed, "wall_s": round(wall, 1), "load_1min": load0,
                 **score(pd.DataFrame(got["groups"], columns=["key", "group_id"]), truth, keys, got["pairs"])})
    for method in HASHES:
        res = out / f"imagededup-{method}.json"
        wall, load0 = run_peer([str(PEERS / "imagededup-venv" / "bin" / "python"), "-c", IMAGEDEDUP_SCRIPT,
                                str(images), method, str(res)], out / f"imagededup-{method}.log")
        pairs = [[a.rsplit(".", 1)[0], b.rsplit(".", 1)[0]] for a, b in json.loads(res.read_text())["pairs"]]
        rows.append({"tool": f"imagededup {method}", "seed": seed, "wall_s": round(wall, 1), "load_1min": load0,
                     **score(components(keys, pairs), truth, keys, pairs)})
    for r in rows:
        print(f"seed {seed} {r['tool']}: P {r['pair_precision']:.4f} R {r['pair_recall']:.4f} {r['wall_s']} s",
              flush=True)
    return rows


def render(rows: list[dict]) -> str:
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    out = ["# memscan dedup against fastdup and imagededup (benchmarks/bench_dedup_peers.py)", "",
           (f"Held-out copy corpora of bench_copydet.py, seeds {', '.join(map(str, seeds))} (96 px, about 2,570 "
            "images each, 300 near-duplicate groups over every edit and 30 byte-copy groups); every tool at its "
            "defaults; groups scored with memscan evaluate's functions. Pair P / R pooled over the seeds (correct "
            "pairs / predicted pairs, / true pairs); wall time: the median over seeds of the tool's whole process, "
            "with the largest 1-min load average seen before a run. Every tool ran on the same CPUs: "
            f"{len(os.sched_getaffinity(0))} of {os.cpu_count()} cores (taskset), so wall times compare."), "",
           ("Two readings: **groups** (every pair inside a tool's groups, as `memscan evaluate` scores memscan; a peer's "
            "groups are the connected components of what it reports, and chain) and **reported pairs** (the pairs "
            "the tool itself reports: fastdup's similarity pairs at its components' 0.96, imagededup's duplicate "
            "lists at distance 10; memscan's members with their kept image)."), "",
           ("| tool | groups: pair P | groups: pair R | largest group | reported pairs: P | reported pairs: R | "
            "wall s (median) | load |"), "|---|---|---|---|---|---|---|---|"]
    for t in tools:
        rs = [r for r in rows if r["tool"] == t]
        c, p, n = (sum(r[k] for r in rs) for k in ("correct_pairs", "predicted_pairs", "true_pairs"))
        pc, pp, pn = (sum(r["pairs_mode"][k] for r in rs) for k in ("correct_pairs", "reported_pairs", "true_pairs"))
        out.append(f"| {t} | {c / p if p else 1.0:.4f} | {c / n:.4f} | {max(r['largest_group'] for r in rs)} | "
                   f"{pc / pp if pp else 1.0:.4f} | {pc / pn:.4f} | "
                   f"{np.median([r['wall_s'] for r in rs]):.1f} | {max(r['load_1min'] for r in rs):.2f} |")
    edits = sorted({(e["planted"], e["edit"]) for r in rows for e in r["recall_by_edit"]})
    out += ["", ("Recall per planted kind and edit by reported pairs (a member is found when a reported pair joins it "
                 "to a member of its planted group), pooled over the seeds (members found / members; groups fully "
                 "found / groups, one-sided 95 % lower bound):"), "",
            "| kind / edit | " + " | ".join(tools) + " |", "|---|" + "---|" * len(tools)]
    for kind, edit in edits:
        cells = []
        for t in tools:
            es = [e for r in rows if r["tool"] == t for e in r["pairs_mode"]["recall_by_edit"]
                  if (e["planted"], e["edit"]) == (kind, edit)]
            cells.append(pooled_recall(es))
        out.append(f"| {kind} / {edit} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(REPORT))
    ap.add_argument("--setup", action="store_true", help="create the peers' virtual environments under PEERS")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--render", action="store_true", help="rewrite results/dedup_peers.md from its json")
    a = ap.parse_args(argv)
    if a.render:
        data = json.loads((a.out / "dedup_peers.json").read_text())
        write_results(a.out, "dedup_peers", data, render(data["rows"]))
        return 0
    if a.setup:
        setup()
        return 0
    from scanner.procfs import machine

    rows = [r for s in a.seeds for r in one(a.work, s)]
    write_results(a.out, "dedup_peers", {"rows": rows, "machine": machine(), "peers": str(PEERS)}, render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
