import json

import numpy as np
import pytest

from lussray.data.imagenet_s import read_label_png, write_label_png
from lussray.errors import UserError
from lussray.eval import io as eio


def test_read_label_equals_codec(tmp_path):
    label = np.array([[0, 1, 255, 256], [919, 1000, 4660, 65535]])
    write_label_png(tmp_path / "a.png", label)
    got = eio.read_label(tmp_path / "a.png")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, read_label_png(tmp_path / "a.png"))
    assert eio.read_size(tmp_path / "a.png") == (2, 4)


def test_read_label_refuses_garbage(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="bad.png"):
        eio.read_label(tmp_path / "bad.png")


def test_writer_uses_the_official_layout(tmp_path):
    label = np.array([[3, 300], [0, 919]])
    path = eio.write_prediction(tmp_path / "pred", "n01443537/ILSVRC2012_val_00000236", label)
    assert path == tmp_path / "pred" / "n01443537" / "ILSVRC2012_val_00000236.png"
    np.testing.assert_array_equal(read_label_png(path), label)
    assert not list(path.parent.glob(".*"))  # no temporary file left behind
    scores = eio.write_foreground(tmp_path / "pred", "n01443537/ILSVRC2012_val_00000236", np.full((2, 2), 0.5))
    assert scores.suffix == ".npy" and eio.read_foreground(scores).dtype == np.float32
    with pytest.raises(ValueError):
        eio.prediction_path(tmp_path, "no-slash")


def test_name_list_formats(tmp_path):
    listing = tmp_path / "names.txt"
    listing.write_text("n1/a.JPEG n1/a.png\n\nn2/b.png\nn3/c\n")
    assert eio.read_name_list(listing) == ["n1/a", "n2/b", "n3/c"]
    listing.write_text("just-a-name\n")
    with pytest.raises(UserError, match="line 1"):
        eio.read_name_list(listing)


def test_list_items_pairs_and_reports_missing(tmp_path):
    for key in ("n2/b", "n1/a", "n1/c"):
        write_label_png(eio.prediction_path(tmp_path / "gt", key), np.zeros((2, 2)))
    for key in ("n1/a", "n2/b"):
        write_label_png(eio.prediction_path(tmp_path / "pred", key), np.zeros((2, 2)))
    with pytest.raises(UserError, match=r"1 of 3 prediction files are missing: .*n1/c.png"):
        eio.list_items(tmp_path / "gt", tmp_path / "pred")
    items = eio.list_items(tmp_path / "gt", tmp_path / "pred", ["n2/b", "n1/a"])
    assert [i.key for i in items] == ["n2/b", "n1/a"]
    assert items[0].foreground_path == tmp_path / "pred" / "n2" / "b.npy"
    assert eio.discover_keys(tmp_path / "gt") == ["n1/a", "n1/c", "n2/b"]
    with pytest.raises(UserError, match="no ground-truth PNGs"):
        eio.discover_keys(tmp_path / "pred" / "n1")


def test_match_round_trip(tmp_path):
    mapping = np.array([0, 3, 1, 2])
    path = eio.write_match(tmp_path / "match.json", mapping)
    assert json.loads(path.read_text()) == {"0": 0, "1": 3, "2": 1, "3": 2}
    match = eio.read_match(path)
    assert match == {0: 0, 1: 3, 2: 1, 3: 2}
    np.testing.assert_array_equal(eio.match_to_lookup(match, 3), mapping)


def test_match_lookup_marks_missing_ids():
    lut = eio.match_to_lookup({0: 0, 5: 1}, 2)
    assert lut.tolist() == [0, -1, -1, -1, -1, 1]
    with pytest.raises(UserError, match="outside the ground-truth ids"):
        eio.match_to_lookup({0: 0, 1: 9}, 2)


def test_match_without_other_maps_other_to_other(tmp_path):
    (tmp_path / "m.json").write_text('{"1": 2, "2": 1}')
    assert eio.read_match(tmp_path / "m.json") == {0: 0, 1: 2, 2: 1}


@pytest.mark.parametrize("content", ["[1, 2]", '{"0": 0, "a": 1}', '{"-1": 0}', "{"])
def test_bad_match_files(tmp_path, content):
    (tmp_path / "m.json").write_text(content)
    with pytest.raises(UserError, match="m.json"):
        eio.read_match(tmp_path / "m.json")
