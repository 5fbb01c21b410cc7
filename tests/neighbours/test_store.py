"""Per-shard embedding files: embedding failures are error rows, and a finished shard is never re-embedded."""

from __future__ import annotations

import io
import tarfile

import numpy as np
from PIL import Image

from scanner.config import NeighboursConfig
from scanner.neighbours.embed import load_embedder
from scanner.neighbours.store import embed_shard, load_embeddings


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _shard(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def test_failures_are_error_rows_and_shards_are_not_reembedded(tiny_checkpoint, tmp_path):
    good = _png(0)
    shard = _shard(tmp_path / "00000.tar", {
        "a.png": good, "a.txt": b"a caption",
        "b.png": good,  # byte copy of a
        "c.jpg": b"this is not a jpeg",
        "d.txt": b"caption without image",
        "e.png": _png(1),
    })
    emb = load_embedder(NeighboursConfig(clip_checkpoint=str(tiny_checkpoint)))
    path = embed_shard(shard, emb, tmp_path / "out")
    loaded = load_embeddings([path])
    assert loaded["keys"] == ["a", "b", "e"] and loaded["vectors"].shape == (3, emb.dim)
    assert loaded["sha256"][0] == loaded["sha256"][1] and loaded["captions"][0] == "a caption"
    errs = loaded["errors"].set_index("key")
    assert sorted(errs.index) == ["c", "d"]
    assert "decode" in errs.loc["c", "error"] and "no image" in errs.loc["d", "error"]
    mtime = path.stat().st_mtime_ns
    assert embed_shard(shard, emb, tmp_path / "out") == path and path.stat().st_mtime_ns == mtime
