"""What a finished --out holds, read the way a user reads it (pandas over a path or a URL): for tests that compare
an --out in object storage with a local one."""

from __future__ import annotations

import pandas as pd


def tables(out: str) -> dict[str, pd.DataFrame]:
    """Every user-facing table of a finished scan or dedup: duplicates, removal list (parquet and txt), errors, and
    scores/ (every shard's file, sorted by key)."""
    from scanner.storage import Out

    o = Out(str(out))
    t = {name: o.read_parquet(name) for name in ("duplicates.parquet", "removal_list.parquet", "errors.parquet")
         if o.exists(name)}
    t["scores"] = pd.concat([o.read_parquet(f"scores/{f}") for f in o.names("scores", ".parquet")],
                            ignore_index=True).sort_values("key", ignore_index=True)
    t["removal_list.txt"] = pd.DataFrame({"key": o.read_text("removal_list.txt").split()})
    return t


def files(out: str) -> set[str]:
    """Every file under --out, as paths relative to it (a local folder or a bucket prefix alike)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(out))
    root = root.rstrip("/")
    return {p.removeprefix(root + "/") for p in fs.find(root)}


def assert_same_out(a: str, b: str) -> None:
    """Two --outs hold the same files and the same tables (summary.json and report.html may differ in content: they
    name where the shards were read from)."""
    ta, tb = tables(a), tables(b)
    assert set(ta) == set(tb) and len(ta["scores"]) > 0
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name], obj=name)
    fa, fb = files(a), files(b)
    assert fa == fb, fa ^ fb
    for f in ("summary.json", "report.html", "parts/_run.json", "removal_list.txt"):
        assert f in fa, f
