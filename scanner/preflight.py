"""Checks a job makes on the driver before Ray starts, so a user's mistake costs seconds, not a cluster start.

    cfg = check_scan(cfg)            # memscan scan / demo / jobs/scan.py
    n = check_neighbours(cfg.neighbours)   # memscan dedup / train-embedder
    olds = open_against(["/scans/week1"], manifest)                      # --against: finished scans
    ref = open_scan("/eval/out", "reference", manifest, "--reference")  # a finished scan as a reference set
    order = shard_order(olds, new_names, new_out, [ref])           # {name, out, role[, file]} of every shard

Paths come back absolute: a relative `model.path` would otherwise be resolved again inside each Ray
actor, against a working directory (a cluster job's unpacked --working-dir) where it may not exist.
Each failure is a MemscanError subclass naming the key, so the CLI exits 2 with one sentence.

Scans read together with this one, finished scans (--against OLD_OUT) and reference sets (--reference), are checked
here too. A finished scan is read only through its part files (and its arrays and recorded cut), never through its
shards. Every scan records the shards its corpus steps read, in gid order, in OUT/corpus/shards.json; a scan made
against another lists that one's shards first (role `old`), so a chain of scans (week 1, week 2 against week 1, week
3 against week 2) reads every earlier week's part files where they were written. A reference set's shards are last
(role `reference`): they are searched and grouped, never scored, never removed.

Refused at once (exit 2), naming what differs: an --against folder that is not a finished scan or whose corpus
steps did not complete, one made with another embedder, model, geometry or image size, a reference that cannot be
read or was embedded with another embedder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from scanner.config import NeighboursConfig, ScanConfig, stage_geometry
from scanner.errors import ConfigError


def check_neighbours(cfg: NeighboursConfig) -> NeighboursConfig:
    """A copy of `cfg` whose clip_checkpoint (when set) exists, is not a refused pickle, and is absolute."""
    if not cfg.enabled or not cfg.clip_checkpoint:
        return cfg
    from scanner.neighbours.checkpoint import check_checkpoint

    path = str(Path(cfg.clip_checkpoint).expanduser().resolve())
    check_checkpoint(path, allow_pickle=cfg.allow_pickle)
    return dataclasses.replace(cfg, clip_checkpoint=path)


def check_scan(cfg: ScanConfig) -> ScanConfig:
    """A copy of `cfg` with every path checked and absolute; raises before any model or Ray is loaded.

    Model: the directory exists, is of `model.kind`, holds safetensors weights (or pickles with
    allow_pickle), and takes `data.resolution`-sided images. classify.calibration_shards (when set): every entry
    matches a shard, and comes back as expand_shards' ShardList (absolute paths and URLs; expanding it again returns
    it unchanged, missing brace-range members included; data.strict_shards refuses those). Neighbours: see
    check_neighbours.
    """
    model = cfg.model
    if model.kind != "none":
        from scanner.models.loading import check_model_dir

        path, side = check_model_dir(model)
        if side != cfg.data.resolution:
            raise ConfigError(f"data.resolution is {cfg.data.resolution} but the model at {str(path)!r} takes "
                              f"{side}x{side} images: set data.resolution: {side}")
        model = dataclasses.replace(model, path=str(path))
    classify = cfg.classify
    if classify.calibration_shards:  # held-out images for the detector's cut: scored at the end, checked now
        from scanner.data.shards import expand_shards
        from scanner.errors import ShardSpecError

        try:
            held = expand_shards(classify.calibration_shards, strict=cfg.data.strict_shards)
            classify = dataclasses.replace(classify, calibration_shards=held)
        except ShardSpecError as e:
            raise ConfigError(f"classify.calibration_shards: {e}") from None
    return dataclasses.replace(cfg, model=model, classify=classify, neighbours=check_neighbours(cfg.neighbours))


# --- scans read together with this one (--against, --reference)

DONE = "corpus/outputs/_done.json"


@dataclass
class Prior:
    uri: str
    role: str  # old | reference
    shards: list[dict] = field(default_factory=list)  # {"name", "out"} in the scan's gid order
    cut: dict | None = None  # the scan's corpus/cut/thresholds.json (old scans)

    def record(self) -> dict:
        return {"out": self.uri, "role": self.role, "shards": len(self.shards),
                "cut": (self.cut or {}).get("threshold")}


def _differs(before: dict | None, now: dict | None) -> bool:
    return json.dumps(before, sort_keys=True, default=str) != json.dumps(now, sort_keys=True, default=str)


def _open(uri: str, what: str):
    from scanner.storage import Out

    try:
        out = Out(uri)
        ok = out.exists("summary.json") and out.exists("parts/_run.json")
    except Exception as e:
        raise ConfigError(f"{what} {uri}: cannot be read ({type(e).__name__}: {e})") from e
    return out, ok


def open_scan(uri: str, role: str, manifest: dict, what: str) -> Prior:
    """A finished scan's shards and cut, after checking it can be read with this run's parts."""
    from scanner.corpus.run import EDGES_JSON, SHARDS_JSON

    out, ok = _open(uri, what)
    if not ok:
        raise ConfigError(f"{what} {uri} is not a finished memscan scan (no summary.json and parts/_run.json there)")
    missing = [f for f in (DONE, SHARDS_JSON, EDGES_JSON) if not out.exists(f)]
    if missing:
        raise ConfigError(f"{what} {uri}: its corpus steps did not complete (no {', '.join(missing)}); rerun the "
                          "command that made it (it resumes where it stopped) and try again")
    before = out.read_json("parts/_run.json")
    keys = ("embedder",) if role == "reference" else ("embedder", "data", "model", "geometry")
    for k in keys:
        b, n = before.get(k), manifest.get(k)
        if k == "geometry":
            b, n = stage_geometry(b), stage_geometry(n)
        if _differs(b, n):
            if isinstance(b, dict) and isinstance(n, dict):
                detail = "; ".join(f"{kk} {b.get(kk)!r} there, {n.get(kk)!r} here" for kk in sorted(set(b) | set(n))
                                   if _differs(b.get(kk), n.get(kk)))
            else:
                detail = f"{b!r} there, {n!r} here"
            raise ConfigError(f"{what} {uri} was made with another {k} ({detail}): its part files cannot be read "
                              f"with this run's; scan with the same {k}, or without {what.split()[0]}")
    listed = out.read_json(SHARDS_JSON)
    shards = [{"name": s.get("file", s["name"]), "out": s["out"]} for s in listed
              if s.get("role") in ("new", "old")]
    cut = out.read_json("corpus/cut/thresholds.json") if out.exists("corpus/cut/thresholds.json") else None
    return Prior(uri=out.uri(), role=role, shards=shards, cut=cut)


def open_against(uris: list[str], manifest: dict) -> list[Prior]:
    return [open_scan(u, "old", manifest, "--against") for u in uris]


def is_scan(uri: str) -> bool:
    """A finished scan's --out (summary.json and parts/_run.json), as opposed to shards."""
    try:
        return _open(uri, "")[1]
    except ConfigError:  # not an --out we can read: the caller treats it as shards
        return False


def shard_order(olds: list[Prior], new: list[str], new_out: str, refs: list[Prior]) -> list[dict]:
    """{name, out, role[, file]} of every shard in gid order: the old scans' (each in its own order, a chain's shards
    once), this run's, the reference sets'. `name` is the shard's name in this run's corpus steps, `file` its part
    file's name in `out` where they differ: this run's shards keep theirs; an old shard named as a new one (another
    folder's 00000.tar) becomes oldJ-NAME, a reference set's refJ-NAME. A key both hold is an error row for the new
    copy (step `keys`), not a refusal."""
    order, seen, taken = [], set(), set(new)

    def label(prefix: str, name: str) -> str:
        if name not in taken:
            return name
        k = 0
        while f"{prefix}{k}-{name}" in taken:
            k += 1
        return f"{prefix}{k}-{name}"

    for p in olds:
        for s in p.shards:
            if (s["out"], s["name"]) in seen:
                continue
            seen.add((s["out"], s["name"]))
            n = label("old", s["name"])
            taken.add(n)
            order.append({"name": n, "file": s["name"], "out": s["out"], "role": "old"})
    if len(set(new)) != len(new):
        raise ConfigError(f"--shards lists a shard name twice: {sorted({n for n in new if new.count(n) > 1})[:5]}")
    order += [{"name": n, "file": n, "out": new_out, "role": "new"} for n in new]
    for p in refs:  # a reference set's shards are often named 00000.tar too
        for s in p.shards:
            n = label("ref", s["name"])
            taken.add(n)
            order.append({"name": n, "file": s["name"], "out": s["out"], "role": "reference"})
    return order


def peek_embedder(uri: str) -> str | None:
    """The embedder checkpoint a finished scan recorded (None: none, or not readable: open_scan will say why)."""
    from scanner.storage import Out

    try:
        out = Out(uri)
        if not out.exists("summary.json"):
            return None
        emb = ((out.read_json("summary.json").get("neighbours") or {}).get("embedder") or {}).get("checkpoint")
        if emb is None:
            return None
        from scanner.storage import is_url

        return emb if is_url(emb) or Path(emb).exists() else None
    except Exception:  # noqa: BLE001 - open_scan reports an unreadable scan with its reason
        return None
