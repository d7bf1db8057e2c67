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


# -- untrusted input and reruns with other inputs -------------------------------------------------


def _prepare_split(src, out, split, *extra):
    return main(["prepare", "--src", str(src), "--out", str(out), "--splits", split, "--workers", "1",
                 "dataset.num_classes=2", *extra])


def _skipped(out, split):
    return {item["key"]: item["reason"] for item in read_manifest(str(out), split)["skipped"]}


def test_images_beyond_the_limits_are_skipped_with_their_reason(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from lussray.data.imagenet_s import write_label_png

    src = make_tree(tmp_path / "tree", per_class=2)
    # a 1 x 65535 PNG image with its 1 x 65535 ground truth (270 bytes each), and a 1 x 60000 JPEG
    Image.fromarray(np.zeros((1, 65535, 3), np.uint8)).save(src / "validation" / "n001" / "wide.png")
    write_label_png(src / "validation-segmentation" / "n001" / "wide.png", np.ones((1, 65535), np.int32))
    Image.fromarray(np.zeros((60000, 1, 3), np.uint8)).save(src / "train" / "n002" / "tall.JPEG")
    # a name that is not a safe sample key (prepare never writes it, the run goes on)
    (src / "train" / "n001" / "bad name.JPEG").write_bytes((src / "train" / "n001" / "n001_0.JPEG").read_bytes())
    assert _prepare(src, tmp_path / "out") == 0
    validation, train = _skipped(tmp_path / "out", "validation"), _skipped(tmp_path / "out", "train")
    assert set(validation) == {"n001/wide"} and "aspect ratio 65535.0 beyond dataset.max_aspect=20" in validation["n001/wide"]
    assert set(train) == {"n002/tall", "n001/bad name"} and "aspect ratio" in train["n002/tall"]
    assert "sample key 'n001/bad name'" in train["n001/bad name"]
    assert read_manifest(str(tmp_path / "out"), "train")["num_samples"] == 4
    # the pixel-count limit, from the config
    assert _prepare_split(src, tmp_path / "out2", "validation", "dataset.max_pixels=2000") == 0
    reasons = _skipped(tmp_path / "out2", "validation")
    assert len(reasons) == 5 and "40x52 = 2080 pixels, more than dataset.max_pixels=2000" in reasons["n001/n001_0"]
    assert "2 skipped" in capsys.readouterr().out


def test_rerun_after_a_ground_truth_png_changed_is_refused_then_rewritten(tmp_path, capsys):
    import numpy as np

    from lussray.data.imagenet_s import Categories, label_from_png_bytes, write_label_png
    from lussray.data.shards import ImageLimits, prepare_split

    src = make_tree(tmp_path / "tree", per_class=4)
    out = tmp_path / "out"
    assert _prepare(src, out, "--samples-per-shard", "2") == 0
    shards = {p.name: p.stat().st_mtime_ns for p in (out / "validation").glob("*.tar")}
    label = np.zeros((40, 52), np.int32)
    label[:10] = 2
    write_label_png(src / "validation-segmentation" / "n001" / "n001_2.png", label)
    capsys.readouterr()
    assert _prepare(src, out, "--samples-per-shard", "2") == 2
    err = capsys.readouterr().err
    assert "nothing to do" not in err and "validation/manifest.json was prepared from other inputs" in err
    assert "ground truth of 1 of 4 shards" in err and "--overwrite" in err
    # --overwrite rewrites the changed shard only
    manifest = prepare_split(str(src), str(out), "validation", Categories(("n001", "n002")), samples_per_shard=2,
                             max_shard_bytes=10**9, workers=1, limits=ImageLimits(20.0, 40_000_000), overwrite=True)
    rewritten = [name for name, mtime in shards.items() if (out / "validation" / name).stat().st_mtime_ns != mtime]
    assert len(rewritten) == 1
    members = {k: m for path in shard_paths(str(out), "validation") for k, m in iter_tar(path)}
    assert (label_from_png_bytes(members["n001/n001_2"]["seg.png"]) == label).all()
    assert manifest["num_samples"] == 8
    assert _prepare(src, out, "--samples-per-shard", "2") == 0
    assert "nothing to do" in capsys.readouterr().out


def test_rerun_with_another_category_list_is_refused(tmp_path, capsys):
    src = make_tree(tmp_path / "tree", wnids=("n001", "n002", "n003"), per_class=2)
    listing = tmp_path / "cats.txt"
    listing.write_text("n001\nn002\n")
    assert _prepare_split(src, tmp_path / "out", "train", "--categories", str(listing)) == 0
    listing.write_text("n001\nn003\n")
    capsys.readouterr()
    assert _prepare_split(src, tmp_path / "out", "train", "--categories", str(listing)) == 2
    assert "(changed: the category list)" in capsys.readouterr().err


def test_invalid_done_record_means_the_shard_is_written_again(tmp_path, capsys):
    src = make_tree(tmp_path / "tree", per_class=2)
    out = tmp_path / "out"
    assert _prepare_split(src, out, "train") == 0
    (out / "train" / "manifest.json").unlink()  # as if killed before the manifest
    record = out / "train" / "train-000000.tar.done.json"
    record.write_text('{"name": "train-000000.tar", "bytes": ')
    capsys.readouterr()
    assert _prepare_split(src, out, "train") == 0
    assert f"ignoring {record}: not valid JSON" in capsys.readouterr().out
    assert json.loads(record.read_text())["num_samples"] == 4


def test_invalid_manifest_is_named(tmp_path, capsys):
    src = make_tree(tmp_path / "tree", per_class=2)
    out = tmp_path / "out"
    assert _prepare_split(src, out, "train") == 0
    (out / "train" / "manifest.json").write_text("{")
    capsys.readouterr()
    assert _prepare_split(src, out, "train") == 2
    err = capsys.readouterr().err
    assert "train/manifest.json is not valid JSON" in err and "--overwrite" in err
    assert main(["peek", "--data", str(out), "--split", "train"]) == 2  # a reader names it too, before Ray starts
    assert "train/manifest.json is not valid JSON" in capsys.readouterr().err


def test_corrupt_shard_of_the_right_size_is_named(tmp_path):
    from lussray.errors import UserError

    src = make_tree(tmp_path / "tree", per_class=2)
    assert _prepare_split(src, tmp_path / "out", "train") == 0
    shard = tmp_path / "out" / "train" / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)
    shard.write_bytes(bytes(data))
    (path,) = shard_paths(str(tmp_path / "out"), "train")  # the size matches the manifest
    with pytest.raises(UserError, match="train-000000.tar is damaged"):
        list(iter_tar(path))


def test_imagenet_train_folder_becomes_the_train_full_split(tmp_path, capsys):
    from lussray.config import load_config
    from lussray.errors import UserError
    from lussray.stages.pretrain import pretraining_manifest

    src = make_tree(tmp_path / "tree")  # ImageNet-S tree: 2 categories
    full = make_tree(tmp_path / "in1k", wnids=("n001", "n002", "n777"), per_class=3)  # ImageNet-1k: one more class
    config = load_config("synthetic-demo", overrides=["dataset.num_classes=2", "pretrain.split=train-full"])
    with pytest.raises(UserError, match=r"pretrain\.split=train"):  # not prepared yet: the key is named
        pretraining_manifest(config, str(tmp_path / "out"))
    assert _prepare(src, tmp_path / "out", "--imagenet-train", str(full / "train")) == 0
    manifest = pretraining_manifest(config, str(tmp_path / "out"))
    assert manifest["split"] == "train-full" and manifest["num_samples"] == 9
    keys = {key for path in shard_paths(str(tmp_path / "out"), "train-full") for key, _ in iter_tar(path)}
    assert {key.split("/")[0] for key in keys} == {"n001", "n002", "n777"}
    assert read_manifest(str(tmp_path / "out"), "train")["num_samples"] == 8  # the dataset's own train split
    assert _prepare(src, tmp_path / "out", "--imagenet-train", str(tmp_path / "nowhere")) == 2
    assert "not a folder of class folders" in capsys.readouterr().err
