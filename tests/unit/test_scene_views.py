"""STEGO/HP training items: five-crop geometry, item views, seeded batch functions, KNN partners by offset."""

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from lussray.data.imagenet_s import label_to_png_bytes
from lussray.data.partners import KnnFiles, jpg_member_offsets, partner_reader, read_range, write_parquet
from lussray.data.scene_views import crop_boxes, epoch_crop, five_crop_boxes, hp_batch, item_view, stego_batch
from lussray.seeds import sample_rng
from lussray.data.shards import write_tar


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _image(seed: int, size=(40, 56)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)


@pytest.mark.parametrize("size,ratio", [((40, 56), 0.5), ((33, 21), 0.5), ((64, 64), 0.3)])
def test_five_crop_boxes_are_torchvisions(size, ratio):
    image = torch.arange(size[0] * size[1]).reshape(1, *size)
    crop = (int(size[0] * ratio), int(size[1] * ratio))
    want = TF.five_crop(image, list(crop))
    for (top, left, h, w), expected in zip(five_crop_boxes(*size, ratio), want):
        assert torch.equal(image[:, top : top + h, left : left + w], expected)


def test_item_view_keeps_image_and_label_aligned():
    label = np.repeat(np.arange(56)[None], 40, axis=0).astype(np.int32)  # label = column index
    image = np.repeat(label[..., None], 3, axis=2).astype(np.uint8) * 4
    view, label_view = item_view(image, label, (0, 28, 20, 28), 10)
    assert view.shape == (10, 10, 3) and label_view.shape == (10, 10)
    assert label_view.min() >= 28 and label_view.max() < 56  # only the box's columns
    np.testing.assert_allclose(view[..., 0] / 4.0, label_view, atol=2)


def _raw_batch(count: int, with_labels: bool = True, epoch: int = 0) -> dict[str, np.ndarray]:
    rows = {"__key__": np.array([f"train/{i:04d}" for i in range(count)], dtype=object),
            "__epoch__": np.full(count, epoch, np.int64),
            "jpg": np.array([_jpeg(_image(i)) for i in range(count)], dtype=object)}
    if with_labels:
        rows["seg.png"] = np.array([label_to_png_bytes(np.full((40, 56), i, np.int32)) for i in range(count)],
                                   dtype=object)
    return rows


def _rngs(batch, seed: int = 1) -> list[np.random.Generator]:
    """The stream's generators: one per row from (seed, stage salt, epoch, key)."""
    return [sample_rng(seed, 7, int(epoch), str(key)) for key, epoch in zip(batch["__key__"], batch["__epoch__"])]


def test_epochs_cycle_through_the_five_crops_of_every_image():
    for key in ("train/0000", "train/0001", "a/b"):
        assert sorted(epoch_crop(key, epoch, "five") for epoch in range(3, 8)) == [0, 1, 2, 3, 4]
    assert {epoch_crop(f"train/{i:04d}", 0, "five") for i in range(40)} == {0, 1, 2, 3, 4}  # starts differ
    assert epoch_crop("train/0000", 3, "none") == 0


def test_hp_batch_is_seeded_by_the_rows_generators_and_shows_the_epochs_crop():
    batch = _raw_batch(3)
    first = hp_batch(batch, rngs=_rngs(batch), res=16)
    assert first["image"].shape == first["image_aug"].shape == (3, 16, 16, 3)
    assert first["label"].shape == (3, 16, 16) and first["label"].dtype == np.int32
    assert (first["label"][1] == 1).all()
    crop = epoch_crop("train/0001", 0, "five")
    np.testing.assert_array_equal(first["image"][1], item_view(_decoded(1), None, crop_boxes(40, 56, "five", 0.5)[crop],
                                                               16)[0])
    again = hp_batch(batch, rngs=_rngs(batch), res=16)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    other = hp_batch(batch, rngs=_rngs(batch, seed=2), res=16)
    np.testing.assert_array_equal(other["image"], first["image"])  # no geometric augmentation
    assert not np.array_equal(other["image_aug"], first["image_aug"])
    later = _raw_batch(3, epoch=1)
    assert not np.array_equal(hp_batch(later, rngs=_rngs(later), res=16)["image"], first["image"])  # next crop
    alone = {name: column[1:2] for name, column in batch.items()}
    np.testing.assert_array_equal(hp_batch(alone, rngs=_rngs(alone), res=16)["image_aug"][0], first["image_aug"][1])
    unlabelled = _raw_batch(1, with_labels=False)
    out = hp_batch(unlabelled, rngs=_rngs(unlabelled), res=16, crop_type="none")
    assert out["image"].shape == (1, 16, 16, 3) and (out["label"] == 1000).all()


def _decoded(i: int) -> np.ndarray:
    from lussray.data.augment import decode_image

    return decode_image(_jpeg(_image(i)))


def test_member_offsets_read_back_the_jpeg_bytes(tmp_path):
    samples = [(f"train/{i:04d}", {"jpg": _jpeg(_image(i)), "json": b"{}"}) for i in range(4)]
    path = str(tmp_path / "train-000000.tar")
    write_tar(samples, path)
    offsets = jpg_member_offsets(path)
    assert sorted(offsets) == [key for key, _ in samples]
    for key, members in samples:
        assert read_range(path, *offsets[key]) == members["jpg"]


def _knn_folder(tmp_path, num_images: int, neighbours: np.ndarray):
    """A data root with one shard and a KNN folder whose items are whole images (crop_type none)."""
    data, knn = tmp_path / "data", tmp_path / "run" / "knn"
    images = [_image(100 + i) for i in range(num_images)]
    samples = [(f"train/{i:04d}", {"jpg": _jpeg(images[i])}) for i in range(num_images)]
    write_tar(samples, str(data / "train" / "train-000000.tar"))
    offsets = jpg_member_offsets(str(data / "train" / "train-000000.tar"))
    files = KnnFiles(str(knn))
    keys = [key for key, _ in samples]
    write_parquet(files.items, pa.table({
        "key": keys, "crop": pa.array([0] * num_images, pa.int32()), "shard": pa.array([0] * num_images, pa.int32()),
        "offset": [offsets[k][0] for k in keys], "size": [offsets[k][1] for k in keys]}))
    k = neighbours.shape[1]
    write_parquet(files.neighbour_file("train-000000.tar"), pa.table({
        "key": keys, "neighbours": pa.FixedSizeListArray.from_arrays(pa.array(neighbours.ravel(), pa.int64()), k)}))
    (knn / "summary.json").write_text(json.dumps({"shards": ["train-000000.tar"], "items_per_shard": [num_images]}))
    return str(data), str(knn), samples


def test_stego_partner_is_a_listed_neighbour_other_than_itself_and_seeded(tmp_path):
    neighbours = np.array([[0, 3, 2, 1], [1, 0, 2, 3], [3, 2, 1, 0], [3, 0, 1, 2]])  # item 3 lists itself first
    data, knn, samples = _knn_folder(tmp_path, 4, neighbours)
    reader = partner_reader(knn, data)
    jpegs = {members["jpg"]: key for key, members in samples}
    for item in range(4):
        allowed = [f"train/{j:04d}" for j in neighbours[item] if j != item][:2]
        seen = {reader.draw(f"train/{item:04d}", 0, 2, np.random.default_rng(seed))[0] for seed in range(30)}
        assert seen == set(allowed)
        key, crop, jpeg = reader.draw(f"train/{item:04d}", 0, 2, np.random.default_rng(0))
        assert jpegs[jpeg] == key and crop == 0
    batch = {"__key__": np.array([key for key, _ in samples], dtype=object), "__epoch__": np.zeros(4, np.int64),
             "jpg": np.array([members["jpg"] for _, members in samples], dtype=object)}
    kwargs = {"res": 16, "partners": {"knn": knn, "data": data}, "crop_type": "none", "num_neighbors": 1}
    out = stego_batch(batch, rngs=_rngs(batch), **kwargs)
    assert out["image"].shape == out["image_pos"].shape == (4, 16, 16, 3)
    # num_neighbors=1: the partner is the first neighbour other than the item
    for item, partner in enumerate([3, 0, 3, 0]):
        np.testing.assert_array_equal(out["image_pos"][item], out["image"][partner])
    np.testing.assert_array_equal(stego_batch(batch, rngs=_rngs(batch), **kwargs)["image_pos"], out["image_pos"])
    with pytest.raises(Exception, match="not in the KNN items"):
        reader.draw("train/9999", 0, 2, np.random.default_rng(0))
