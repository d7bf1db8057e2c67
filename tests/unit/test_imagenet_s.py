import numpy as np
import pytest

from lussray.data import imagenet_s as ims
from tests.helpers import make_tree


@pytest.mark.parametrize("ids", [[0, 1, 255], [256, 257, 919], [1000, 0, 65535]])
def test_label_codec_round_trip(ids):
    label = np.array([ids, ids[::-1]], dtype=np.int64)
    decoded = ims.label_from_png_bytes(ims.label_to_png_bytes(label))
    assert decoded.dtype == np.int32
    np.testing.assert_array_equal(decoded, label)


def test_encoding_is_r_plus_256_g():
    rgb = ims.encode_label(np.array([[1000, 300]]))
    assert rgb[0, 0].tolist() == [232, 3, 0]  # 1000 = 232 + 256 * 3
    assert rgb[0, 1].tolist() == [44, 1, 0]


def test_decode_does_not_overflow_uint8():
    rgb = np.zeros((1, 1, 3), np.uint8)
    rgb[0, 0] = [255, 255, 0]
    assert ims.decode_label(rgb)[0, 0] == 255 + 256 * 255


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 2)), np.array([[-1]]), np.array([[70000]])])
def test_encode_rejects_bad_maps(bad):
    with pytest.raises(ValueError):
        ims.encode_label(bad)


def test_categories_from_tree_and_file(tmp_path):
    make_tree(tmp_path, wnids=("n002", "n001", "n003"), per_class=1)
    categories = ims.Categories.from_root(tmp_path)
    assert categories.wnids == ("n001", "n002", "n003")
    assert [categories.class_id(w) for w in ("n001", "n003")] == [1, 3]
    listing = tmp_path / "cats.txt"
    listing.write_text("n003\nn001")  # unsorted, no trailing newline
    subset = ims.Categories.from_root(tmp_path, str(listing))
    assert subset.wnids == ("n001", "n003") and subset.class_id("n003") == 2


def test_missing_segmentation_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="validation-segmentation"):
        ims.discover_categories(tmp_path)


def test_list_split_pairs_ground_truth(tmp_path):
    make_tree(tmp_path, per_class=2)
    samples = ims.list_split(tmp_path, "validation", ("n001", "n002"))
    assert [s.key for s in samples] == ["n001/n001_0", "n001/n001_1", "n002/n002_0", "n002/n002_1"]
    assert all(s.label_path is not None and s.label_path.is_file() for s in samples)
    train = ims.list_split(tmp_path, "train", ("n002",))
    assert len(train) == 2 and all(s.label_path is None for s in train)
