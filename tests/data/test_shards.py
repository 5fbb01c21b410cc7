import io
import tarfile

import pytest

from scanner.data.shards import ShardSpecError, expand_shards, iter_tar_samples


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shard_dir(tmp_path):
    for i in range(12):
        _tar(tmp_path / f"{i:05d}.tar", [(f"{i:09d}.txt", b"x")])
    return tmp_path


def test_brace_glob_dir_and_list(shard_dir):
    assert len(expand_shards(str(shard_dir / "{00000..00009}.tar"))) == 10
    assert len(expand_shards(str(shard_dir / "{00002,00004}.tar"))) == 2
    assert len(expand_shards(str(shard_dir / "0001*.tar"))) == 2
    assert len(expand_shards(str(shard_dir))) == 12
    both = expand_shards([str(shard_dir / "00000.tar"), str(shard_dir / "{00000..00001}.tar")])
    assert [p.rsplit("/", 1)[1] for p in both] == ["00000.tar", "00001.tar"]  # de-duplicated, sorted


def test_missing_path_and_empty_spec_fail_naming_them(shard_dir):
    with pytest.raises(ShardSpecError, match="00098.tar' does not exist"):
        expand_shards(str(shard_dir / "{00098..00099}.tar"))
    with pytest.raises(ShardSpecError, match="matches no .tar shard"):
        expand_shards(str(shard_dir / "*.tgz"))
    with pytest.raises(ShardSpecError, match="no shards given"):
        expand_shards([])


def test_samples_grouped_missing_caption_and_non_image(tmp_path):
    p = _tar(tmp_path / "a.tar", [("k1.jpg", b"J1"), ("k1.txt", b"cat"), ("k1.json", b"{}"),
                                  ("k2.png", b"P2"),  # no caption: fine, caption None
                                  ("k3.txt", b"only text"), ("k3.json", b"{}")])  # no image: error row
    rows = list(iter_tar_samples(str(p)))
    assert [r["key"] for r in rows] == ["k1", "k2", "k3"]
    assert rows[0]["caption"] == "cat" and rows[0]["image"] == b"J1" and rows[0]["error"] is None
    assert rows[1]["caption"] is None and rows[1]["ext"] == "png" and rows[1]["error"] is None
    assert rows[2]["image"] is None and "no image member" in rows[2]["error"]


def test_invalid_utf8_caption_kept_with_replacement(tmp_path):
    p = _tar(tmp_path / "a.tar", [("k1.jpg", b"J"), ("k1.txt", b"caf\xe9 \xff")])
    (row,) = list(iter_tar_samples(str(p)))
    assert row["error"] is None and row["caption"].startswith("caf")


def test_truncated_tar_keeps_readable_samples_then_shard_error(tmp_path):
    members = [(f"{i:03d}.jpg", bytes([i]) * 2000) for i in range(10)]
    p = _tar(tmp_path / "t.tar", members)
    data = p.read_bytes()
    p.write_bytes(data[: (512 + 2048) * 6 + 700])  # header + padded data per member; cut inside the 7th
    rows = list(iter_tar_samples(str(p)))
    good = [r for r in rows if r["key"] is not None and r["error"] is None]
    assert [r["key"] for r in good] == [f"{i:03d}" for i in range(6)]
    assert rows[-1]["key"] is None and "truncated or corrupt shard" in rows[-1]["error"]


def test_member_names_are_never_paths(tmp_path):
    p = _tar(tmp_path / "a.tar", [("../../etc/evil.jpg", b"J"), ("/abs/x.jpg", b"K"), ("d/x.jpg", b"L")])
    rows = list(iter_tar_samples(str(p)))
    # webdataset's keys (the path up to the basename's first dot): a removal list names what its loader yields
    assert [r["key"] for r in rows] == ["../../etc/evil", "/abs/x", "d/x"]
    assert not (tmp_path.parent.parent / "etc" / "evil.jpg").exists()
