"""The generated scene-centric dataset (`lussray synth --kind scenes`)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from lussray.cli import main
from lussray.data import scene
from lussray.data import synthetic_scenes as ss
from lussray.data.imagenet_s import IGNORE_ID, read_label_png
from lussray.errors import UserError

TINY = dict(thing_classes=3, stuff_classes=4, train_images=5, val_images=3, size=32, seed=0)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes") / "data"
    ss.generate_scenes(root, **TINY, workers=1)
    return root


@pytest.fixture(scope="module")
def renders():
    """(image, raw label, label) of 40 scenes of 6 thing + 6 stuff classes at 64 px."""
    out = []
    for index in range(40):
        image, raw = ss.render_scene(3, "train", index, size=64, ignore=False)
        _, label = ss.render_scene(3, "train", index, size=64)
        out.append((image, raw, label))
    return out


def test_output_is_byte_identical_for_a_seed_whatever_the_workers(tree, tmp_path):
    ss.generate_scenes(tmp_path / "two", **TINY, workers=2)
    reference = _tree_bytes(tree)
    assert _tree_bytes(tmp_path / "two") == reference
    ss.generate_scenes(tmp_path / "seed1", **{**TINY, "seed": 1})
    other = _tree_bytes(tmp_path / "seed1")
    images = [key for key in reference if key.endswith(".jpg")]
    assert len(images) == 8 and all(other[key] != reference[key] for key in images)


def test_layout_reads_as_a_scene_dataset(tree):
    manifest = json.loads((tree / "synth.json").read_text())
    assert manifest["complete"] and manifest["counts"] == {"train": 5, "validation": 3}
    dataset = scene.read_scene_tree(tree)
    assert dataset.num_classes == 7 and dataset.class_names[0].startswith("thing0")
    assert dataset.class_names[3].startswith("stuff0-sky")
    assert {split: len(samples) for split, samples in dataset.splits.items()} == {"train": 5, "validation": 3}
    assert dataset.splits["validation"][0].key == "validation/000000"
    for samples in dataset.splits.values():
        for sample in samples:
            assert sample.label_path is not None  # train is labelled too
            data = sample.label_path.read_bytes()
            assert dataset.convert_label(data) == data
            ids = set(np.unique(read_label_png(sample.label_path)).tolist())
            assert ids <= set(range(7)) | {IGNORE_ID}
    assert not dataset.notes and not [p for p in tree.rglob(".*")]


def test_images_hold_several_classes_stuff_and_things(renders):
    counts, thing_images = [], 0
    for _, raw, _ in renders:
        ids = np.unique(raw)
        assert ids.min() >= 0 and ids.max() < 12
        stuff = ids[ids >= 6]
        assert len(stuff) >= 2  # at least two bands of different stuff classes
        thing_images += bool((ids < 6).any())
        counts.append(len(ids))
    assert thing_images == len(renders) and np.mean(counts) >= 4
    top = [raw[0] for _, raw, _ in renders]  # the first row: mostly the sky-like stuff class 6 (role sky)
    assert np.mean([(row == 6).mean() for row in top]) > 0.5


def test_ignore_band_lies_exactly_on_region_boundaries(renders):
    for _, raw, label in renders:
        padded = np.pad(raw, 1, mode="edge")
        neighbours = [padded[1:-1, :-2], padded[1:-1, 2:], padded[:-2, 1:-1], padded[2:, 1:-1]]
        on_boundary = np.any([n != raw for n in neighbours], axis=0)
        ignored = label == IGNORE_ID
        assert on_boundary.any() and (ignored == on_boundary).all()
        np.testing.assert_array_equal(label[~ignored], raw[~ignored])
        assert ignored.mean() < 0.3


def test_labelled_pixels_carry_their_class_appearance(renders):
    """The mean colour of the pixels labelled c (one sample per image and class) identifies c."""
    means, classes = [], []
    for image, _, label in renders:
        pixels = image.reshape(-1, 3).astype(float)
        for c in np.unique(label[label != IGNORE_ID]).tolist():
            where = label.ravel() == c
            if where.sum() >= 30:
                means.append(pixels[where].mean(0))
                classes.append(c)
    means, classes = np.asarray(means), np.asarray(classes)
    present = np.unique(classes)
    assert len(present) == 12
    centroids = np.stack([means[classes == c].mean(0) for c in present])
    nearest = present[np.linalg.norm(means[:, None] - centroids[None], axis=2).argmin(1)]
    assert (nearest == classes).mean() >= 0.75


def test_masks_sit_on_the_drawn_outlines(renders):
    """A ring just inside a thing's mask differs in colour from the ring just outside it far more
    than that outer ring differs from the next one out (masks match what was drawn)."""
    across, beside = [], []
    for image, raw, _ in renders:
        for c in range(6):
            mask = raw == c
            grown3 = ndimage.binary_dilation(mask, iterations=3)
            grown6 = ndimage.binary_dilation(mask, iterations=6)
            rings = [mask & ~ndimage.binary_erosion(mask, iterations=3), grown3 & ~mask, grown6 & ~grown3]
            if min(r.sum() for r in rings) < 20 or len(np.unique(raw[grown6 & ~mask])) > 1:
                continue  # too small, or the surroundings are not one stuff region
            inner, outer, further = (image[r].astype(float).mean(0) for r in rings)
            across.append(np.linalg.norm(inner - outer))
            beside.append(np.linalg.norm(outer - further))
    assert len(across) >= 5
    assert np.median(across) > 2 * np.median(beside)


def test_stuff_only_scenes_and_other_sizes():
    image, label = ss.render_scene(1, "validation", 0, thing_classes=0, stuff_classes=3, size=(30, 50))
    assert image.shape == (30, 50, 3) and image.dtype == np.uint8 and label.dtype == np.int32
    assert set(np.unique(label).tolist()) <= {0, 1, 2, IGNORE_ID}


@pytest.mark.parametrize("change", [dict(stuff_classes=0), dict(thing_classes=-1), dict(thing_classes=997),
                                    dict(size=8), dict(val_images=-1), dict(seed=-1)])
def test_bad_arguments_are_user_errors(tmp_path, change):
    with pytest.raises(UserError):
        ss.generate_scenes(tmp_path / "d", **{**TINY, **change})


def test_module_stays_pure():
    code = "import sys, lussray.data.synthetic_scenes, lussray.data.scene; assert not {'ray', 'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_preset_generates_scenes_and_refuses_object_flags(tmp_path, capsys):
    out = tmp_path / "scenes"
    argv = ["synth", "--dataset", "synthetic-scenes", "--out", str(out), "--size", "32", "--workers", "1",
            "synth.train_images=2", "synth.val_images=1"]
    assert main(argv) == 0
    manifest = json.loads((out / "synth.json").read_text())
    assert manifest["arguments"]["kind"] == "scenes" and manifest["num_classes"] == 12
    assert (out / "images" / "validation" / "000000.jpg").is_file()
    assert main(argv) == 0 and "already complete" in capsys.readouterr().out
    assert main(argv + ["--classes", "3"]) == 2
    assert "--classes does not apply to --kind scenes" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "objects"), "--stuff-classes", "3"]) == 2


def test_prepare_synthetic_scenes_keeps_labels_in_every_split(tree, tmp_path):
    from lussray.data.imagenet_s import label_from_png_bytes
    from lussray.data.shards import iter_tar, shard_paths

    out = tmp_path / "shards"
    assert main(["prepare", "--dataset", "synthetic-scenes", "--src", str(tree), "--out", str(out), "--workers", "1",
                 "dataset.num_classes=7"]) == 0
    for split, count in (("train", 5), ("validation", 3)):
        members = {key: m for path in shard_paths(str(out), split) for key, m in iter_tar(path)}
        assert len(members) == count
        for key, sample in members.items():
            stem = key.split("/")[1]
            expected = read_label_png(tree / "labels" / split / f"{stem}.png")
            np.testing.assert_array_equal(label_from_png_bytes(sample["seg.png"]), expected)
