"""The corpus steps as a workflow of named steps, each resumable on its own.

    steps = [Step("keys", ("parts:key",), run_keys, config=()), ...]
    summary = run_workflow(ctx, steps)

A step declares its inputs (columns of the part files, or earlier steps by name) and the config keys it reads,
writes its one output under OUT/corpus/NAME/, and records its completion in OUT/corpus/NAME/_done.json with a
digest of what it was computed from: the shards, the part files' manifest (parts/_run.json), its config keys
and the digests of its input steps. A rerun skips every step whose record matches and starts at the first one
that did not finish (or whose inputs changed: a new dup_threshold redoes the neighbour steps and everything
after them, not the repeated keys). Nothing here holds the corpus: the steps stream part files through the
executor (scanner.corpus.executor).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("memscan")


@dataclass(frozen=True)
class Step:
    name: str
    inputs: tuple[str, ...]  # "parts:col,col" or the names of earlier steps
    run: Callable  # run(ctx) -> info dict (JSON), after writing the step's output under ctx.step_dir(name)
    config: tuple[str, ...] = ()  # dotted config keys the step reads ("neighbours.dup_threshold")


@dataclass
class Context:
    """What every step gets: the scan's config and --out, the part files, a local work folder, the executor."""

    cfg: object  # ScanConfig
    out: object  # scanner.storage.Out
    store: object  # scanner.corpus.store.PartStore
    work: Path
    executor: object
    embedder: str | None = None
    embedder_trained: bool = False
    # scans read together with this one (scanner.preflight): "edges" (an --against scan's links, reused), "cut" (its
    # thresholds), "against" / "reference" (their records for summary.json)
    prior: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # step name -> its info (this run's, or the recorded one)

    def step_dir(self, name: str) -> str:
        """The folder (relative to --out) of a step's output."""
        return f"corpus/{name}"

    def has(self, name: str) -> bool:
        return name in self.info


def _config_value(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def digest(ctx: Context, step: Step, shards_digest: str) -> str:
    """What a step's output depends on: the shards and their parts, its config keys, its input steps' digests."""
    deps = {"shards": shards_digest, "config": {k: _config_value(ctx.cfg, k) for k in step.config},
            "inputs": {i: ctx.info.get(i, {}).get("_digest") for i in step.inputs if not i.startswith("parts:")},
            "embedder": ctx.embedder if any(i.startswith("parts:") and "embedding" in i for i in step.inputs) else None}
    return hashlib.sha256(json.dumps(deps, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shards_digest(ctx: Context) -> str:
    """The shard list and the part files' manifest (model, geometry, embedder the parts were made with)."""
    manifest = ctx.out.read_text("parts/_run.json") if ctx.out.exists("parts/_run.json") else ""
    return hashlib.sha256(json.dumps([ctx.store.names, [int(s) for s in ctx.store.sizes], manifest]).encode()
                          ).hexdigest()[:16]


def run_workflow(ctx: Context, steps: list[Step], inside_step: Callable | None = None) -> dict:
    """Run the steps in order, skipping each one already done with the same digest. Returns {name: info}.
    inside_step(name): called when a step's work is done but not yet recorded as done (the kill tests stop a run
    there: the worst moment, its output written and its completion not)."""
    names = [s.name for s in steps]
    for s in steps:
        for i in s.inputs:
            if not i.startswith("parts:") and i not in names[:names.index(s.name)]:
                raise ValueError(f"corpus step {s.name!r} reads {i!r}, which no step before it writes")
    sd = shards_digest(ctx)
    redo = False
    for s in steps:
        d = digest(ctx, s, sd)
        marker = f"{ctx.step_dir(s.name)}/_done.json"
        if not redo and ctx.out.exists(marker):
            rec = ctx.out.read_json(marker)
            if rec.get("digest") == d:
                ctx.info[s.name] = {**rec["info"], "_digest": d, "resumed": True}
                log.info("corpus steps: %s already done (resume)", s.name)
                continue
        redo = True  # every step after one that runs again runs again (its inputs may have changed)
        ctx.out.remove(ctx.step_dir(s.name), recursive=True)
        t0 = time.time()
        info = s.run(ctx) or {}
        if inside_step is not None:
            inside_step(s.name)
        info["seconds"] = round(time.time() - t0, 2)
        info["executor"] = ctx.executor.kind
        ctx.out.write_json(marker, {"step": s.name, "digest": d, "inputs": list(s.inputs), "info": info})
        ctx.info[s.name] = {**info, "_digest": d}
        log.info("corpus steps: %s done in %.1f s", s.name, info["seconds"])
    return {k: {kk: vv for kk, vv in v.items() if kk != "_digest"} for k, v in ctx.info.items()}
