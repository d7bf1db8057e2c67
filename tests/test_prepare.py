"""`lussray prepare`: counts, skip reporting, resume, idempotence, subset selection."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest


from lussray.cli import main
from lussray.data.shards import iter_tar, read_manifest, shard_paths
from tests.helpers import corrupt, make_tree


def _prepare(src, out, *extra):
    return main(["prepare", "--src", str(src), "--out", str(out), "--workers", "1", "dataset.num_classes=2", *extra])


def test_shards_mix_classes_in_a_fixed_order(tmp_path):
    src = make_tree(tmp_path / "tree", wnids=("n001", "n002", "n003"), per_class=6)
    orders = []
    for out in ("a", "b"):
        assert main(["prepare", "--src", str(src), "--out", str(tmp_path / out), "--workers", "1",
                     "--samples-per-shard", "6", "dataset.num_classes=3"]) == 0
        orders.append([k for path in shard_paths(str(tmp_path / out), "train") for k, _ in iter_tar(path)])
    assert orders[0] == orders[1] and sorted(orders[0]) != orders[0]
    first_shard_classes = {key.split("/")[0] for key in orders[0][:6]}
    assert len(first_shard_classes) >= 2  # class-sorted shards would give single-class batches


def test_counts_members_and_skip_report(tmp_path, capsys):
    src = make_tree(tmp_path / "tree", per_class=4)
    corrupt(src / "train" / "n001" / "n001_1.JPEG", "garbage")
    corrupt(src / "train" / "n002" / "n002_3.JPEG", "truncate")
    assert _prepare(src, tmp_path / "out", "--samples-per-shard", "3") == 0
    train = read_manifest(str(tmp_path / "out"), "train")
    assert train["num_samples"] == 6 and train["num_shards"] == 3
    assert sum(s["num_samples"] for s in train["shards"]) == 6
    reasons = {item["key"]: item["reason"] for item in train["skipped"]}
    assert set(reasons) == {"n001/n001_1", "n002/n002_3"}
    assert "truncated" in reasons["n002/n002_3"]
    printed = capsys.readouterr().out
    assert "2 skipped" in printed and "n001_1.JPEG" in printed
    validation = read_manifest(str(tmp_path / "out"), "validation")
    assert validation["num_samples"] == 8 and validation["has_segmentation"]
    with tarfile.open(tmp_path / "out" / "validation" / "validation-000000.tar") as tar:
        names = tar.getnames()
    key = names[0].split(".")[0]
    assert names[:3] == [f"{key}.jpg", f"{key}.seg.png", f"{key}.json"]
    original = (src / "validation" / "n001" / "n001_0.JPEG").read_bytes()
    members = {k: m for path in shard_paths(str(tmp_path / "out"), "validation") for k, m in iter_tar(path)}
    assert members["n001/n001_0"]["jpg"] == original  # bytes kept, not re-encoded
    meta = json.loads(members["n001/n001_0"]["json"])
    assert meta == {"wnid": "n001", "class_id": 1, "size": [40, 52], "split": "validation"}


def test_rerun_of_complete_split_does_nothing(tmp_path, capsys):
    src = make_tree(tmp_path / "tree", per_class=2)
    assert _prepare(src, tmp_path / "out") == 0
    shard = tmp_path / "out" / "train" / "train-000000.tar"
    before = shard.stat().st_mtime_ns
    capsys.readouterr()
    assert _prepare(src, tmp_path / "out") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert shard.stat().st_mtime_ns == before


def test_category_subset_and_count_check(tmp_path, capsys):
    src = make_tree(tmp_path / "tree", wnids=("n001", "n002", "n003"), per_class=2)
    listing = tmp_path / "cats.txt"
    listing.write_text("n003\nn001\n")
    assert _prepare(src, tmp_path / "out", "--categories", str(listing)) == 0
    manifest = read_manifest(str(tmp_path / "out"), "validation")
    assert manifest["num_samples"] == 4 and manifest["num_classes"] == 2
    assert (tmp_path / "out" / "categories.txt").read_text() == "n001\nn003"
    # three categories in the tree but the dataset expects two: a clear error, exit 2
    assert _prepare(src, tmp_path / "out2") == 2
    assert "3 categories" in capsys.readouterr().err


def test_missing_source_is_an_error(tmp_path, capsys):
    assert _prepare(tmp_path / "nope", tmp_path / "out") == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_after_killed_prepare(tmp_path):
    src = make_tree(tmp_path / "tree", per_class=30, size=(64, 64))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lussray.cli", "prepare", "--src", str(src), "--out", str(out),
           "--workers", "1", "--splits", "train", "--samples-per-shard", "1", "dataset.num_classes=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    done_dir = out / "train"
    while time.time() < deadline and proc.poll() is None:
        if done_dir.exists() and len(list(done_dir.glob("*.done.json"))) >= 3:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # shards recorded as finished when the run died (a tar without its record gets rewritten)
    finished = {p.name: p.stat().st_mtime_ns for p in done_dir.glob("*.tar")
                if (done_dir / f"{p.name}.done.json").exists()}
    assert not (done_dir / "manifest.json").exists(), "killed too late: make the run longer"
    assert 3 <= len(finished) < 60
    # a SIGKILL mid-write may leave a temporary (never a half-written file under a final name)
    assert all(p.name.startswith(".tmp-") or p.suffix in (".tar", ".json") for p in done_dir.iterdir())
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    assert not list(done_dir.glob(".tmp-*"))  # the resumed run cleans up what the killed one left
    manifest = read_manifest(str(out), "train")
    assert manifest["num_samples"] == 60 and manifest["num_shards"] == 60
    for name, mtime in finished.items():
        assert (done_dir / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"


def test_damaged_shard_is_named_before_streaming(tmp_path):
    from lussray.data.shards import shard_paths
    from lussray.errors import UserError

    src = make_tree(tmp_path / "tree", per_class=2)
    assert _prepare(src, tmp_path / "out") == 0
    assert len(shard_paths(str(tmp_path / "out"), "train")) == 1
    shard = tmp_path / "out" / "train" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(UserError, match="train-000000.tar is damaged"):
        shard_paths(str(tmp_path / "out"), "train")
