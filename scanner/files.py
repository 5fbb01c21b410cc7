"""Atomic writes: a temporary file beside the target, then a rename, so a killed job never leaves a
half-written file that looks complete (the scan's resume relies on it)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write_parquet(df, path: Path, schema=None) -> None:
    """pandas DataFrame -> parquet at `path` (no index), creating the parent directory.

    schema: a pyarrow schema from scanner.schema for a user-facing table: its columns, in its order and
    types (None: the types pandas infers, for internal files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if schema is None:
        df.to_parquet(tmp, index=False)
    else:
        import pyarrow.parquet as pq

        from scanner.schema import to_arrow

        pq.write_table(to_arrow(df, schema), tmp)
    os.replace(tmp, path)


def atomic_write_npy(array, path: Path) -> None:
    """numpy array -> .npy at `path` (np.save would append .npy to a temporary name, so write a handle)."""
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(obj: dict, path: Path) -> None:
    """Indented JSON with a final newline; values JSON cannot hold (paths, numpy scalars) as str."""
    atomic_write_text(json.dumps(obj, indent=2, default=str) + "\n", path)
