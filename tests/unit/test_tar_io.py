"""Webdataset tar writing and streaming (lussray.data.shards.write_tar / iter_tar)."""

import hashlib
import tarfile

import pytest

from lussray.data.shards import iter_tar, write_tar
from lussray.errors import UserError


def test_write_then_iterate_round_trip(tmp_path):
    samples = [("n01/a", {"jpg": b"A" * 10, "seg.png": b"PNG", "json": b"{}"}),
               ("n02/b", {"c.jpg": b"B"}), ("n01/d", {"jpg": b"D", "seg.png": b"L"})]
    path = tmp_path / "out" / "train-000000.tar"
    record = write_tar(iter(samples), str(path))
    assert record["num_samples"] == 3 and record["bytes"] == path.stat().st_size
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with tarfile.open(path) as tar:
        assert tar.getnames()[:3] == ["n01/a.jpg", "n01/a.seg.png", "n01/a.json"]
    # a dot is a suffix separator for webdataset too: "n02/b.c.jpg" is key n02/b, member c.jpg
    assert list(iter_tar(str(path))) == samples


def test_a_dot_in_a_key_is_refused_on_write(tmp_path):
    with pytest.raises(UserError, match=r"x\.tar: sample key 'n02/b\.c'"):
        write_tar(iter([("n02/b.c", {"jpg": b"B"})]), str(tmp_path / "x.tar"))
    assert not (tmp_path / "x.tar").exists()


def test_nothing_is_left_behind_when_the_samples_fail(tmp_path):
    def broken():
        yield "n01/a", {"jpg": b"x"}
        raise OSError("disk gone")

    path = tmp_path / "x.tar"
    try:
        write_tar(broken(), str(path))
    except OSError:
        pass
    assert not path.exists()


def test_chunk_index_reads_each_chunk_alone(tmp_path):
    from lussray.data.shards import SAMPLES_PER_CHUNK, read_chunk

    samples = [(f"n01/img_{i:03d}", {"jpg": bytes([i % 256]) * (100 + 37 * i), "json": b"{}"})
               for i in range(2 * SAMPLES_PER_CHUNK + 5)]
    path = str(tmp_path / "s.tar")
    record = write_tar(samples, path)
    assert [rows for _, _, rows in record["chunks"]] == [SAMPLES_PER_CHUNK, SAMPLES_PER_CHUNK, 5]
    read = [sample for offset, nbytes, _ in record["chunks"] for sample in read_chunk(path, offset, nbytes)]
    assert read == samples == list(iter_tar(path))


def test_a_chunk_range_off_the_member_boundaries_is_refused(tmp_path):
    from lussray.data.shards import read_chunk

    path = str(tmp_path / "s.tar")
    record = write_tar([("a/b", {"jpg": b"x" * 2000})], path)
    offset, nbytes, _ = record["chunks"][0]
    with pytest.raises(UserError, match="not whole samples"):
        read_chunk(path, offset + 512, nbytes)
