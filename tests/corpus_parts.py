"""Part files written the way the stages write them (parts/NAME.parquet + NAME.npy arrays), for corpus-step tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def write_parts(out: Path, frames: list[pd.DataFrame], arrays: dict[str, list[np.ndarray]] | None = None) -> list[str]:
    """frames[i] -> out/parts/{i:05d}.parquet, arrays[folder][i] -> out/folder/{i:05d}.npy. Returns shard paths."""
    shards = []
    for i, df in enumerate(frames):
        name = f"{i:05d}"
        (out / "parts").mkdir(parents=True, exist_ok=True)
        df.assign(shard=name).to_parquet(out / "parts" / f"{name}.parquet", index=False)
        for folder, arrs in (arrays or {}).items():
            (out / folder).mkdir(parents=True, exist_ok=True)
            np.save(out / folder / f"{name}.npy", arrs[i])
        shards.append(str(out / f"{name}.tar"))
    return shards


def split(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(x, np.cumsum(sizes)[:-1])


def context(out: Path, shards: list[str], cfg, executor: str = "local"):
    """A corpus-step Context over part files in `out` (what scanner.corpus.run.corpus_steps builds)."""
    from scanner.corpus.executor import LocalExecutor, RayExecutor
    from scanner.corpus.store import PartStore
    from scanner.corpus.workflow import Context
    from scanner.storage import Out

    o = Out(out)
    store = PartStore(o, shards, cache=Path(out) / "work" / "cache")
    ex = LocalExecutor() if executor == "local" else RayExecutor(cfg.corpus.budget_bytes)
    return Context(cfg=cfg, out=o, store=store, work=Path(out) / "work", executor=ex, embedder="test")


def run(ctx, *names: str) -> dict:
    """Run corpus steps by name on ctx, in order, recording each one's info as the workflow does."""
    from scanner.corpus import classify, copies, keys, lid, neighbours, replications, tables
    from scanner.corpus.rows import _repeated

    fns = {"keys": keys.run_keys, "copies": copies.run_copies, "units": neighbours.run_units,
           "links": neighbours.run_links, "aligned": neighbours.run_aligned, "groups": neighbours.run_groups,
           "lid": lid.run_lid, "replications": replications.run_replications, "cut": classify.run_cut,
           "tables": tables.run_tables, "outputs": tables.run_outputs}
    for n in names:
        if n == "keys":
            _repeated.cache_clear()
        ctx.info[n] = fns[n](ctx)
    return ctx.info
