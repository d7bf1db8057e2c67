import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from lussray.cli import main
from lussray.data import imagenet_s as ims
from lussray.data import synthetic as syn
from lussray.errors import UserError

TINY = dict(classes=3, train_per_class=5, val_per_class=3, test_per_class=2, semi_per_class=2, size=32, seed=0)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    syn.generate_dataset(root, **TINY, workers=1)
    return root


@pytest.fixture(scope="module")
def renders():
    """(class, raw label, label) of 3 classes x 60 images at 64 px."""
    out = []
    for class_index in range(3):
        for index in range(60):
            _, raw = syn.render_sample(5, "train", class_index, index, classes=3, size=64, ignore=False)
            _, label = syn.render_sample(5, "train", class_index, index, classes=3, size=64)
            out.append((class_index, raw, label))
    return out


def test_output_is_byte_identical_for_a_seed_whatever_the_workers(tree, tmp_path):
    syn.generate_dataset(tmp_path / "two", **TINY, workers=2)
    reference = _tree_bytes(tree)
    assert _tree_bytes(tmp_path / "two") == reference
    syn.generate_dataset(tmp_path / "seed1", **{**TINY, "seed": 1})
    other = _tree_bytes(tmp_path / "seed1")
    assert other.keys() == reference.keys()
    images = [key for key in reference if key.endswith(".JPEG")]
    assert sum(other[key] != reference[key] for key in images) == len(images)


def test_tree_layout_counts_and_names(tree):
    wnids = [syn.wnid(c) for c in range(3)]
    assert wnids == sorted(wnids)
    assert (tree / "categories.txt").read_text() == "\n".join(wnids)
    manifest = json.loads((tree / "synth.json").read_text())
    assert manifest["complete"] and manifest["arguments"] == {**TINY, "min_area": 0.02, "background_contrast": 1.0,
                                                                   "background_pool_size": 32,
                                                                   "background_saturation": 1.0}
    assert manifest["counts"] == {"train": 15, "train-semi": 6, "validation": 9, "test": 6}
    assert not [p for p in tree.rglob(".*")], "temporary files left behind"
    categories = ims.Categories.from_root(tree)
    assert list(categories.wnids) == wnids
    for split, count in manifest["counts"].items():
        samples = ims.list_split(tree, split, categories.wnids)
        assert len(samples) == count
        assert all((s.label_path is None) == (split == "train") for s in samples)
    train = ims.list_split(tree, "train", categories.wnids)
    assert train[0].key == f"{wnids[0]}/{wnids[0]}_0"
    numbers = [int(s.key.rsplit("_", 1)[1]) for split in ("validation", "test")
               for s in ims.list_split(tree, split, categories.wnids)]
    assert sorted(numbers) == list(range(1, 16))
    with Image.open(train[0].image_path) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)


def test_ground_truth_ids_and_main_class(tree):
    categories = ims.Categories.from_root(tree)
    for split in ("train-semi", "validation", "test"):
        for sample in ims.list_split(tree, split, categories.wnids):
            label = ims.read_label_png(sample.label_path)
            ids = set(np.unique(label).tolist())
            assert ids <= {0, 1000} | set(range(1, 4)), (sample.key, ids)
            assert categories.class_id(sample.wnid) in ids, sample.key
            with Image.open(sample.image_path) as image:
                assert image.size[::-1] == label.shape


def test_train_semi_files_are_copies_of_train(tree):
    for class_index in range(3):
        wnid = syn.wnid(class_index)
        semi = sorted((tree / "train-semi" / wnid).iterdir())
        assert [p.name for p in semi] == [f"{wnid}_{i}.JPEG" for i in range(2)]
        for path in semi:
            assert path.read_bytes() == (tree / "train" / wnid / path.name).read_bytes()
        image, label = syn.render_sample(0, "train", class_index, 1, classes=3, size=32)
        np.testing.assert_array_equal(ims.read_label_png(tree / "train-semi-segmentation" / wnid / f"{wnid}_1.png"), label)


def test_ignore_band_lies_exactly_on_object_boundaries(renders):
    for _, raw, label in renders:
        padded = np.pad(raw, 1, mode="edge")
        neighbours = [padded[1:-1, :-2], padded[1:-1, 2:], padded[:-2, 1:-1], padded[2:, 1:-1]]
        on_boundary = np.any([n != raw for n in neighbours], axis=0)
        ignored = label == ims.IGNORE_ID
        assert on_boundary.any() and (ignored == on_boundary).all()
        np.testing.assert_array_equal(label[~ignored], raw[~ignored])
        # a 2-px band: 1 px on each side, so every ignored pixel touches the other region
        assert ignored.mean() < 0.25


def test_labelled_pixels_carry_their_class_appearance():
    """Mean colour of the pixels labelled c identifies c; the background's does not look like c."""
    object_means, background_means, classes = [], [], []
    for class_index in range(3):
        for index in range(12):
            image, label = syn.render_sample(3, "validation", class_index, index, classes=3, size=64)
            pixels = image.reshape(-1, 3).astype(float)
            object_means.append(pixels[label.ravel() == class_index + 1].mean(0))
            background_means.append(pixels[label.ravel() == 0].mean(0))
            classes.append(class_index)
    object_means, background_means, classes = map(np.asarray, (object_means, background_means, classes))
    centroids = np.stack([object_means[classes == c].mean(0) for c in range(3)])
    nearest = np.linalg.norm(object_means[:, None] - centroids[None], axis=2).argmin(1)
    assert (nearest == classes).mean() >= 0.85
    own = np.linalg.norm(object_means - centroids[classes], axis=1)
    background = np.linalg.norm(background_means - centroids[classes], axis=1)
    assert background.mean() > 2 * own.mean()


def test_appearance_changes_across_the_mask_boundary_not_beside_it():
    """A 3-px ring inside the mask differs in colour from the ring just outside it, far more
    than that ring differs from the next one out: the mask sits on the drawn outline."""
    across, beside = [], []
    for index in range(12):
        image, raw = syn.render_sample(7, "test", index % 3, index, classes=3, size=64, ignore=False)
        mask = raw == index % 3 + 1
        grown3 = ndimage.binary_dilation(mask, iterations=3)
        grown6 = ndimage.binary_dilation(mask, iterations=6)
        rings = [mask & ~ndimage.binary_erosion(mask, iterations=3), grown3 & ~mask, grown6 & ~grown3]
        if (raw[grown6] > 0).sum() > mask.sum() or min(r.sum() for r in rings) < 20:
            continue  # another object nearby, or too small to have rings
        inner, outer, further = (image[r].astype(float).mean(0) for r in rings)
        across.append(np.linalg.norm(inner - outer))
        beside.append(np.linalg.norm(outer - further))
    assert len(across) >= 6
    assert np.median(across) > 3 * np.median(beside)


def test_the_ignore_flag_changes_only_the_label():
    for index in range(5):
        image, label = syn.render_sample(7, "test", 1, index, classes=2, size=48)
        same, raw = syn.render_sample(7, "test", 1, index, classes=2, size=48, ignore=False)
        np.testing.assert_array_equal(image, same)
        assert image.dtype == np.uint8 and image.shape == (48, 48, 3) and label.dtype == raw.dtype == np.int32


def test_about_one_image_in_ten_has_a_second_object(renders):
    second = 0
    for class_index, raw, label in renders:
        ids = set(np.unique(raw).tolist()) - {0}
        assert class_index + 1 in ids and len(ids) <= 2
        second += len(ids) == 2
    assert 0.04 <= second / len(renders) <= 0.2


def test_object_sizes_span_small_to_large(renders):
    fractions = np.array([(raw == c + 1).mean() for c, raw, _ in renders])
    assert fractions.min() < 0.04 and fractions.max() > 0.45
    assert 0.05 < np.median(fractions) < 0.35


def test_main_class_survives_the_ignore_band_on_tiny_images():
    for index in range(40):
        for class_index in range(5):
            _, label = syn.render_sample(11, "train", class_index, index, classes=5, size=24)
            assert (label == class_index + 1).any()


def test_render_sample_takes_height_and_width():
    image, label = syn.render_sample(0, "validation", 0, 0, classes=2, size=(30, 50))
    assert image.shape == (30, 50, 3) and label.shape == (30, 50)


@pytest.mark.parametrize("change", [dict(classes=0), dict(classes=1000), dict(semi_per_class=6),
                                    dict(size=8), dict(val_per_class=-1), dict(min_area=0.0), dict(min_area=0.9),
                                    dict(background_contrast=1.5), dict(background_pool_size=-1),
                                    dict(background_saturation=-0.1), dict(background_saturation=1.5)])
def test_bad_arguments_are_user_errors(tmp_path, change):
    with pytest.raises(UserError):
        syn.generate_dataset(tmp_path / "d", **{**TINY, **change})


def test_module_stays_pure():
    code = "import sys, lussray.data.synthetic; assert not {'ray', 'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_generates_then_reports_complete_and_refuses_foreign_folders(tmp_path, capsys):
    out = tmp_path / "synth"
    argv = ["synth", "--out", str(out), "--classes", "2", "--train-per-class", "3", "--val-per-class", "2",
            "--size", "32", "--workers", "1", "synth.test_per_class=1", "synth.semi_per_class=1"]
    assert main(argv) == 0
    manifest = json.loads((out / "synth.json").read_text())
    assert manifest["arguments"]["test_per_class"] == 1 and manifest["arguments"]["seed"] == 0
    assert manifest["counts"] == {"train": 6, "train-semi": 2, "validation": 4, "test": 2}
    assert "synth: 12/12 images" in capsys.readouterr().err
    before = _tree_bytes(out)
    assert main(argv) == 0
    assert "already complete" in capsys.readouterr().out
    assert _tree_bytes(out) == before

    assert main(argv[:4] + ["3"] + argv[5:]) == 2  # same folder, other arguments
    assert str(out) in capsys.readouterr().err
    assert main(argv + ["--min-area", "0.3"]) == 2
    assert "min_area" in capsys.readouterr().err
    assert main(argv + ["--background-contrast", "2"]) == 2
    assert "background_contrast must lie in [0, 1]" in capsys.readouterr().err
    assert main(argv + ["--background-saturation", "2"]) == 2
    assert "background_saturation must lie in [0, 1]" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["synth", "--out", str(foreign), "--size", "32"]) == 2
    error = capsys.readouterr().err
    assert str(foreign) in error and "new folder" in error


def test_min_area_bounds_the_main_object_and_contrast_flattens_backgrounds():
    areas, spreads = {}, {}
    for min_area, contrast in ((0.02, 1.0), (0.2, 0.0)):
        fractions, stds = [], []
        for index in range(30):
            image, raw = syn.render_sample(2, "train", 0, index, classes=1, size=64, ignore=False,
                                           min_area=min_area, background_contrast=contrast)
            fractions.append((raw == 1).mean())
            ring = ndimage.binary_dilation(raw > 0, iterations=2)
            stds.append(image[~ring].astype(np.float32).std(axis=0).mean())
        areas[contrast], spreads[contrast] = np.array(fractions), np.array(stds)
    assert areas[0.0].min() > 0.1 > areas[1.0].min()  # 0.2 of the area, less the outline's wobble
    assert spreads[0.0].max() < 12 < np.median(spreads[1.0])  # noise (and gradients) only vs textures


def test_a_shared_background_pool_repeats_styles_and_size_zero_does_not(monkeypatch):
    palettes = []
    jittered = syn._jittered

    def record(colors, rng, brightness, offset):
        if brightness == (0.8, 1.2):  # the background's call (objects jitter less)
            palettes.append(colors)
        return jittered(colors, rng, brightness, offset)

    monkeypatch.setattr(syn, "_jittered", record)
    used = {}
    for pool_size in (3, 0):
        palettes.clear()
        for index in range(30):
            syn.render_sample(4, "train", 0, index, classes=1, size=24, background_pool_size=pool_size)
        used[pool_size] = len(set(palettes))
    assert used[3] <= 3 and used[0] == 30


def test_background_saturation_greys_the_background_and_keeps_the_objects():
    for index in range(10):
        drawn, raw = syn.render_sample(3, "train", 1, index, classes=2, size=48, ignore=False)
        same, _ = syn.render_sample(3, "train", 1, index, classes=2, size=48, ignore=False, background_saturation=1.0)
        grey, _ = syn.render_sample(3, "train", 1, index, classes=2, size=48, ignore=False, background_saturation=0.0)
        assert np.array_equal(same, drawn)  # 1 keeps every pixel of the generator
        background = ~ndimage.binary_dilation(raw > 0, iterations=2)
        channels = grey[background].astype(np.int16)
        assert np.abs(channels - channels[:, :1]).max() <= 1  # R = G = B, up to rounding
        inside = ndimage.binary_erosion(raw > 0, iterations=2)
        assert np.array_equal(grey[inside], drawn[inside])  # the objects are untouched
        assert np.abs(drawn[background].astype(np.int16) - drawn[background][:, :1]).max() > 1
