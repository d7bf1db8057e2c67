"""Scene-centric layouts: COCO-Stuff-27 and Cityscapes-27 read from tiny trees, the label converters,
the packaged protocol data, and `lussray prepare` on a tiny COCO-Stuff tree."""

import collections
import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lussray.config import DatasetConfig
from lussray.data import cityscapes, cocostuff, scene
from lussray.data.imagenet_s import IGNORE_ID, label_from_png_bytes
from lussray.errors import UserError

CURATED_TRAIN = ("000000000025", "000000000030", "000000000042")
CURATED_VAL = ("000000000139", "000000000724", "000000000785")
FULL_ONLY_VAL = "000000000632"  # in full_val2017 but not in curated_val2017
H, W = 20, 30


def _image(path: Path, seed: int, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def _ids_png(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint8), mode="L").save(path)


def _fine_label() -> tuple[np.ndarray, np.ndarray]:
    """(fine ids, expected coarse ids): one fine id of every coarse class, 255 and an id past the table."""
    table = cocostuff.fine_to_coarse()
    first_fine = {coarse: min(f for f, c in table.items() if c == coarse) for coarse in range(27)}
    fine = np.full((H, W), 255, dtype=np.int32)
    expected = np.full((H, W), IGNORE_ID, dtype=np.int32)
    for coarse, f in first_fine.items():
        fine.flat[coarse * 10:(coarse + 1) * 10] = f
        expected.flat[coarse * 10:(coarse + 1) * 10] = coarse
    fine.flat[-5:] = 200  # not a COCO-Stuff id: ignore
    expected.flat[-5:] = IGNORE_ID
    return fine, expected


@pytest.fixture
def coco(tmp_path) -> Path:
    """Curated train and val images (one val annotation missing), a full-only val image, a stray image."""
    root = tmp_path / "coco"
    fine, _ = _fine_label()
    for seed, (folder, stem) in enumerate([("train2017", s) for s in CURATED_TRAIN] +
                                          [("val2017", s) for s in CURATED_VAL + (FULL_ONLY_VAL, "999999999999")]):
        _image(root / "images" / folder / f"{stem}.jpg", seed)
        if stem != CURATED_VAL[2]:
            _ids_png(root / "annotations" / folder / f"{stem}.png", fine)
    return root


def test_packaged_protocol_files_hold_the_published_counts():
    counts = {(name, folder): len(cocostuff.image_ids(name, folder)) for name in cocostuff.LISTS
              for folder in cocostuff.FOLDERS}
    assert counts == {("curated", "train2017"): 49629, ("curated", "val2017"): 2175,
                      ("full", "train2017"): 97702, ("full", "val2017"): 4172}
    assert set(cocostuff.image_ids("curated", "val2017")) <= set(cocostuff.image_ids("full", "val2017"))
    table = cocostuff.fine_to_coarse()
    assert sorted(table) == list(range(cocostuff.NUM_FINE)) and set(table.values()) == set(range(27))


def test_coarse_names_follow_the_table():
    """Coarse i (things below 12) has the table's name and as many fine classes as the table gives i."""
    data = json.loads(cocostuff.protocol_file(cocostuff.TABLE_FILE).read_text())
    by_index = collections.Counter(data["fine_index_to_coarse_index"].values())
    by_name = collections.Counter(data["fine_name_to_coarse_name"].values())
    full = [name if name.endswith(("-things", "-stuff")) else name + ("-things" if i < cocostuff.NUM_THINGS else "-stuff")
            for i, name in enumerate(cocostuff.COARSE_NAMES)]
    assert set(full) == set(by_name) and len(full) == 27
    assert [by_name[name] for name in full] == [by_index[i] for i in range(27)]


def test_cocostuff_keeps_listed_images_maps_fine_to_coarse_and_reports_gaps(coco):
    dataset = cocostuff.read_layout(coco)
    assert dataset.num_classes == 27 and set(dataset.splits) == {"train", "validation"}
    assert [s.key for s in dataset.splits["validation"]] == [f"val2017/{s}" for s in CURATED_VAL]
    assert [s.key for s in dataset.splits["train"]] == [f"train2017/{s}" for s in CURATED_TRAIN]
    missing = {s.key for s in dataset.splits["validation"] if s.label_path is None}
    assert missing == {f"val2017/{CURATED_VAL[2]}"}
    notes = "\n".join(dataset.notes)
    assert f"{49629 - 3} of the 49629 curated train2017 ids have no image" in notes
    assert f"{2175 - 3} of the 2175 curated val2017 ids" in notes
    assert f"1 of 3 images have no annotation" in notes and CURATED_VAL[2] in notes
    assert dataset.record["counts"]["validation"] == {"listed": 2175, "missing_images": 2172, "images": 3,
                                                      "without_annotation": 1}
    _, expected = _fine_label()
    converted = dataset.convert_label(dataset.splits["validation"][0].label_path.read_bytes())
    np.testing.assert_array_equal(label_from_png_bytes(converted), expected)


def test_cocostuff_full_list_adds_its_images(coco):
    keys = [s.key for s in cocostuff.read_layout(coco, "full").splits["validation"]]
    assert f"val2017/{FULL_ONLY_VAL}" in keys and "val2017/999999999999" not in keys
    with pytest.raises(UserError, match="curated, full"):
        cocostuff.read_layout(coco, "most")


def test_cocostuff_tree_without_listed_images_is_an_error(tmp_path):
    _image(tmp_path / "images" / "val2017" / "123.jpg", 0)
    with pytest.raises(UserError, match="none of the curated"):
        cocostuff.read_layout(tmp_path)


def test_converters_refuse_rgb_labels_and_out_of_range_codec_ids(tmp_path):
    rgb = tmp_path / "rgb.png"
    _image(rgb, 0, "PNG")
    with pytest.raises(ValueError, match="single-channel"):
        cocostuff.label_converter()(rgb.read_bytes())
    with pytest.raises(ValueError, match="not an image"):
        cocostuff.label_converter()(b"garbage")
    from lussray.data.imagenet_s import label_to_png_bytes

    codec = scene.CodecLabels("test", 3)
    good = label_to_png_bytes(np.array([[0, 2, IGNORE_ID]]))
    assert codec(good) == good
    with pytest.raises(ValueError, match="id 3"):
        codec(label_to_png_bytes(np.array([[0, 3]])))


def _city(root: Path, folder: str, city: str, frame: int, labels: bool, seed: int) -> str:
    stem = f"{city}_000000_{frame:06d}"
    _image(root / "leftImg8bit" / folder / city / f"{stem}{cityscapes.IMAGE_SUFFIX}", seed, "PNG")
    if labels:
        ids = np.arange(H * W).reshape(H, W) % 36
        ids[0, :3] = 255
        _ids_png(root / "gtFine" / folder / city / f"{stem}{cityscapes.LABEL_SUFFIX}", ids)
    return f"{city}/{stem}"


@pytest.fixture
def city(tmp_path) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path / "cityscapes"
    keys = collections.defaultdict(list)
    keys["train"] = [_city(root, "train", "aachen", i, labels=i != 1, seed=i) for i in range(3)]
    keys["val"] = [_city(root, "val", "lindau", i, labels=True, seed=10 + i) for i in range(2)]
    keys["test"] = [_city(root, "test", "berlin", i, labels=True, seed=20 + i) for i in range(2)]
    keys["train_extra"] = [_city(root, "train_extra", "bad-honnef", i, labels=False, seed=30 + i) for i in range(2)]
    return root, keys


def test_cityscapes_split_schemes(city):
    root, keys = city
    stego = cityscapes.read_layout(root, "stego")
    assert [s.key for s in stego.splits["train"]] == keys["train"]
    assert [s.key for s in stego.splits["validation"]] == keys["val"]
    assert [s.key for s in stego.splits["train"] if s.label_path is None] == [keys["train"][1]]
    assert any("1 of 3 images have no annotation" in note for note in stego.notes)
    picie = cityscapes.read_layout(root, "picie")
    assert {s.key for s in picie.splits["train"]} == set(keys["train_extra"] + keys["test"])
    assert all(s.label_path is None for s in picie.splits["train"])  # test's gtFine are placeholders
    assert [s.key for s in picie.splits["validation"]] == sorted(keys["train"] + keys["val"])
    for scheme in (None, "official"):
        with pytest.raises(UserError, match="picie.*stego"):
            cityscapes.read_layout(root, scheme)


def test_cityscapes_labelids_minus_seven_below_zero_ignored(city):
    root, _ = city
    sample = cityscapes.read_layout(root, "stego").splits["validation"][0]
    ids = np.asarray(Image.open(sample.label_path)).astype(np.int32)
    converted = label_from_png_bytes(cityscapes.label_converter()(sample.label_path.read_bytes()))
    expected = np.where((ids >= 7) & (ids <= 33), ids - 7, IGNORE_ID)
    np.testing.assert_array_equal(converted, expected)
    assert set(np.unique(converted).tolist()) == set(range(27)) | {IGNORE_ID}


def test_config_layout_choices_match_the_dispatch():
    spec = next(f for f in fields(DatasetConfig) if f.name == "layout")
    assert tuple(spec.metadata["choices"]) == scene.LAYOUTS
    with pytest.raises(UserError, match="not a scene layout"):
        scene.open_scene_dataset("imagenet-s", ".")


def test_prepare_cocostuff27_writes_coarse_seg_png(coco, tmp_path, capsys):
    from lussray.cli import main
    from lussray.data.shards import iter_tar, read_manifest, shard_paths

    out = tmp_path / "shards"
    assert main(["prepare", "--dataset", "cocostuff27", "--src", str(coco), "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "2172 of the 2175 curated val2017 ids have no image" in printed
    _, expected = _fine_label()
    for split, count in (("train", 3), ("validation", 3)):
        assert read_manifest(str(out), split)["num_samples"] == count
        members = {key: m for path in shard_paths(str(out), split) for key, m in iter_tar(path)}
        assert len(members) == count
        for key, sample in members.items():
            if key == f"val2017/{CURATED_VAL[2]}":
                assert "seg.png" not in sample
                continue
            np.testing.assert_array_equal(label_from_png_bytes(sample["seg.png"]), expected)
            assert json.loads(sample["json"])["class_id"] is None
    assert (out / scene.CLASSES_FILE).read_text().splitlines() == list(cocostuff.COARSE_NAMES)
    record = json.loads((out / scene.SCENE_MANIFEST).read_text())
    assert record["layout"] == "cocostuff" and record["image_list"] == "curated"


def test_prepare_cityscapes27_needs_an_explicit_split(city, tmp_path, capsys):
    from lussray.cli import main
    from lussray.data.shards import iter_tar, read_manifest, shard_paths

    root, keys = city
    argv = ["prepare", "--dataset", "cityscapes27", "--src", str(root), "--workers", "1"]
    assert main(argv + ["--out", str(tmp_path / "none")]) == 2
    assert "--cityscapes-split picie" in capsys.readouterr().err
    out = tmp_path / "stego"
    assert main(argv + ["--out", str(out), "--cityscapes-split", "stego", "--splits", "validation"]) == 0
    assert read_manifest(str(out), "validation")["num_samples"] == 2 and not (out / "train").exists()
    members = {key: m for path in shard_paths(str(out), "validation") for key, m in iter_tar(path)}
    assert sorted(members) == keys["val"] and all("seg.png" in m for m in members.values())
    assert json.loads((out / scene.SCENE_MANIFEST).read_text())["cityscapes_split"] == "stego"
