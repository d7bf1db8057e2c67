"""FS^4's training rows: view keys and records, and the batch function's views of each selected pyramid view."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from lussray.data.augment import CropBox
from lussray.data.fs4_views import ViewRecord, box_tuple, fs4_batch, view_key, view_region
from lussray.data.picie_views import base_image, make_views, sample_view_params
from lussray.methods.fs4 import pyramid_boxes
from lussray.seeds import sample_rng


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # lossless, so pixels can be compared
    return buffer.getvalue()


def _quadrants(height=40, width=60) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (200, 10, 10)
    image[: height // 2, width // 2 :] = (10, 200, 10)
    image[height // 2 :, : width // 2] = (10, 10, 200)
    image[height // 2 :, width // 2 :] = (200, 200, 10)
    return image


def _record(image_key, view, size, label=3, distance=0.125):
    return ViewRecord(image_key, view, box_tuple(pyramid_boxes(*size)[view]), label, distance, size)


def _batch(image, records):
    return {"__key__": np.array([r.key for r in records], dtype=object),
            "jpg": np.array([_png(image)] * len(records), dtype=object),
            "json": np.array([r.to_json() for r in records], dtype=object)}


def test_view_keys_are_distinct_and_checked():
    assert view_key("train/000006", 3) == "train/000006--view3"
    keys = {view_key(image, view) for image in ("a", "a--view1", "b/a", "a-") for view in range(6)}
    assert len(keys) == 24
    for bad in (-1, 6):
        with pytest.raises(ValueError):
            view_key("a", bad)


def test_record_round_trip_and_refusals():
    record = _record("n01/x", 4, (40, 60), label=7, distance=0.03125)
    assert record.box == (20.0, 30.0, 20.0, 30.0)
    assert ViewRecord.from_json(record.to_json()) == record
    assert json.loads(record.to_json())["view_name"] == "bottom_right"
    good = json.loads(record.to_json())
    for change in ({"view": 6}, {"label": -1}, {"box": [30, 30, 20, 30]}, {"size": [40]}, {"box": [0, 0, 0, 5]}):
        with pytest.raises(ValueError):
            ViewRecord.from_json(json.dumps({**good, **change}).encode())
    with pytest.raises(ValueError, match="not an FS"):
        ViewRecord.from_json(b'{"image": "x"}')


def test_view_region_is_the_exact_pixels_of_the_box():
    image = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
    np.testing.assert_array_equal(view_region(image, (20.0, 30.0, 20.0, 30.0)), image[20:40, 30:60])
    with pytest.raises(ValueError):
        box_tuple(CropBox(0.5, 0, 2, 2))


def test_batch_is_picie_views_of_the_cut_out_pyramid_view():
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    records = [_record("img", view, (40, 60), label=view + 10) for view in range(6)]
    rngs = [sample_rng(5, 9, 2, r.key) for r in records]
    out = fs4_batch(_batch(image, records), rngs=rngs, base_size=32, view_size=24, min_side=0.5)
    assert out["image1"].shape == out["image2"].shape == (6, 24, 24, 3) and out["image1"].dtype == np.uint8
    assert out["crop"].shape == (6, 5) and out["crop"].dtype == np.float32
    assert out["global_label"].tolist() == [10, 11, 12, 13, 14, 15] and out["pyramid_view"].tolist() == list(range(6))
    for row, record in enumerate(records):  # the same draws from the sample's own generator, step by step
        base = base_image(view_region(image, record.box), 32)
        params = sample_view_params(sample_rng(5, 9, 2, record.key), 32, 32, min_side=0.5)
        image1, image2 = make_views(base, params, 24)
        np.testing.assert_array_equal(out["image1"][row], image1)
        np.testing.assert_array_equal(out["image2"][row], image2)
        np.testing.assert_array_equal(out["crop"][row], params.crop.as_array().astype(np.float32))
        assert params.crop.height >= 16 and params.crop.top + params.crop.height <= 32


def test_photometric_keys_reach_both_views():
    image = _quadrants()
    records = [_record("img", view, image.shape[:2]) for view in range(6)]
    rngs = lambda: [sample_rng(1, 2, 3, r.key) for r in records]  # noqa: E731
    grey = fs4_batch(_batch(image, records), rngs=rngs(), base_size=20, view_size=16, jitter_p=0.0,
                     grayscale_p=1.0, blur_p=0.0)
    plain = fs4_batch(_batch(image, records), rngs=rngs(), base_size=20, view_size=16, jitter_p=0.0,
                      grayscale_p=0.0, blur_p=0.0)
    for name in ("image1", "image2"):
        assert (grey[name][..., 0] == grey[name][..., 2]).all()  # three equal channels
        assert not (plain[name][..., 0] == plain[name][..., 2]).all()
    np.testing.assert_array_equal(grey["crop"], plain["crop"])  # the same draws of G


def test_same_generators_same_batch_and_key_mismatch_refused():
    image = _quadrants()
    records = [_record("img", view, image.shape[:2]) for view in (0, 5)]
    runs = [fs4_batch(_batch(image, records), rngs=[sample_rng(1, 2, 3, r.key) for r in records], base_size=20,
                      view_size=16) for _ in range(2)]
    for name in runs[0]:
        np.testing.assert_array_equal(runs[0][name], runs[1][name])
    other = fs4_batch(_batch(image, records), rngs=[sample_rng(1, 2, 4, r.key) for r in records], base_size=20,
                      view_size=16)
    assert not np.array_equal(other["crop"], runs[0]["crop"])  # another epoch, other views
    batch = _batch(image, records)
    batch["__key__"] = batch["__key__"][::-1]
    with pytest.raises(ValueError, match="holds the record of"):
        fs4_batch(batch, rngs=[np.random.default_rng(0)] * 2, base_size=20, view_size=16)
    wrong_size = _record("img", 0, (41, 60))
    with pytest.raises(ValueError, match="its record says"):
        fs4_batch(_batch(image, [wrong_size]), rngs=[np.random.default_rng(0)], base_size=20, view_size=16)
