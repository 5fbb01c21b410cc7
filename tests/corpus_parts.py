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
