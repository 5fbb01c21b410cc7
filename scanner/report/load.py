"""The report's inputs: what a scan left in its --out, read leniently (a missing or damaged file is named in the
report, never an error), and the previews of the images it shows (previews/, written by the scan's sink from its one
decode: the report opens no shard)."""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

log = logging.getLogger("memscan")


TOP_K = 24  # at-risk samples shown


TOP_GROUPS = 12  # duplicate groups shown (largest first)


GROUP_MEMBERS = 8  # members shown per duplicate group


MATES = 3  # duplicate-group mates shown under an at-risk sample


TOP_REPS = 24  # replications shown


MAX_THUMBS = 200  # images read back from the shards, all sections together


@dataclass
class Run:
    """What a scan left in out_dir; None where the input is absent (`missing` says why)."""

    out: object  # a scanner.storage.Out
    scores: pd.DataFrame | None = None
    dups: pd.DataFrame | None = None
    reps: pd.DataFrame | None = None
    removal: pd.DataFrame | None = None
    errors: pd.DataFrame | None = None
    summary: dict = field(default_factory=dict)
    metrics: dict | None = None
    truth: pd.DataFrame | None = None
    missing: dict[str, str] = field(default_factory=dict)  # input -> why it is not shown
    thumbs: dict[str, str] = field(default_factory=dict)  # key -> data URI
    thumb_note: str | None = None

    @property
    def thresholds(self) -> dict:
        return self.summary.get("thresholds") or {}

    @property
    def detector(self) -> tuple[str | None, str]:
        t = self.thresholds
        cls = (self.summary.get("config") or {}).get("classify") or {}
        from scanner.columns import direction

        det = t.get("detector") or cls.get("detector")
        return det, t.get("direction") or cls.get("detector_direction") or (direction(det) if det else None) or "low"

    @property
    def ok(self) -> pd.DataFrame:
        """Scored rows (no error)."""
        if self.scores is None:
            return pd.DataFrame()
        return self.scores[self.scores["error"].isna()] if "error" in self.scores else self.scores


def _read_parquet(run: Run, name: str) -> pd.DataFrame | None:
    if not run.out.exists(name):
        run.missing[name] = "not found"
        return None
    try:
        return run.out.read_parquet(name)
    except Exception as e:  # noqa: BLE001 - a damaged file is reported, the rest of the report still renders
        run.missing[name] = f"unreadable: {type(e).__name__}: {e}"
        return None


def _read_json(run: Run, name: str) -> dict | None:
    if not run.out.exists(name):
        run.missing[name] = "not found"
        return None
    try:
        return json.loads(run.out.read_text(name))
    except (OSError, ValueError) as e:
        run.missing[name] = f"unreadable: {type(e).__name__}: {e}"
        return None


def load_run(out, truth_path: Path | None = None) -> Run:
    """out: a scan's --out (a scanner.storage.Out, a path or a URL)."""
    from scanner.storage import Out

    out = out if isinstance(out, Out) else Out(out)
    run = Run(out=out)
    files = out.names("scores", ".parquet")
    if files:
        try:
            run.scores = pd.concat([out.read_parquet(f"scores/{f}") for f in files], ignore_index=True)
        except Exception as e:  # noqa: BLE001
            run.missing["scores/*.parquet"] = f"unreadable: {type(e).__name__}: {e}"
    else:
        run.missing["scores/*.parquet"] = "not found"
    if run.scores is not None and "error" not in run.scores:
        run.scores["error"] = None
    run.dups = _read_parquet(run, "duplicates.parquet")
    run.reps = _read_parquet(run, "replications.parquet")
    run.removal = _read_parquet(run, "removal_list.parquet")
    run.errors = _read_parquet(run, "errors.parquet")
    run.summary = _read_json(run, "summary.json") or {}
    run.metrics = _read_json(run, "metrics.json")
    if truth_path is not None:
        truth_path = Path(truth_path)
        if truth_path.exists():
            try:
                run.truth = pd.read_parquet(truth_path)
            except Exception as e:  # noqa: BLE001
                run.missing[str(truth_path)] = f"unreadable: {type(e).__name__}: {e}"
        else:
            run.missing[str(truth_path)] = "truth file not found"
    return run


def load_previews(run: Run, keys: list[str]) -> None:
    """Fill run.thumbs (key -> data URI) for the first MAX_THUMBS of `keys` (priority order) from previews/, the
    small images the scan's sink stored; one file read per shard that holds a wanted key."""
    import pyarrow.parquet as pq

    keys = list(dict.fromkeys(k for k in keys if isinstance(k, str)))[:MAX_THUMBS]
    if not keys:
        return
    have = set(run.out.names("previews", ".parquet"))
    if not have:
        run.thumb_note = ("this scan stored no previews (data.preview_size: 0, or a scan made before memscan kept "
                          "them)")
        return
    shard_of = dict(zip(run.scores["key"], run.scores["shard"])) if run.scores is not None else {}
    wanted: dict[str, set[str]] = {}
    for k in keys:
        if k in shard_of:
            wanted.setdefault(str(shard_of[k]), set()).add(k)
    for shard, want in sorted(wanted.items()):
        if f"{shard}.parquet" not in have:
            continue
        t = pq.read_table(run.out.path(f"previews/{shard}.parquet"), filesystem=run.out.fs,
                          filters=[("key", "in", sorted(want))])
        for k, data in zip(t.column("key").to_pylist(), t.column("preview").to_pylist()):
            if data:
                mime = "image/png" if data[:4] == b"\x89PNG" else "image/jpeg"
                run.thumbs[k] = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
