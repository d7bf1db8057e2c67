import numpy as np
import pytest

from lussray.eval.boundary import boundary_label_map, boundary_mask, boundary_width, frame_mask
from tests.unit.test_eval_reference import official_boundary_map, random_map


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((4, 6), 1),  # 0.03 * 7.2 rounds to 0: at least 1
        ((120, 90), 4),  # 0.03 * 150 = 4.5 rounds half to even
        ((375, 500), 19),  # 18.75
        ((500, 333), 18),  # 18.02
    ],
)
def test_boundary_width(shape, expected):
    assert boundary_width(*shape) == expected


def test_uniform_map_is_boundary_only_within_d_of_the_border():
    label = np.full((9, 11), 300)
    d = 2
    expected = np.ones((9, 11), bool)
    expected[2:7, 2:9] = False
    np.testing.assert_array_equal(boundary_mask(label, d), expected)
    np.testing.assert_array_equal(frame_mask((9, 11), d), expected)


def test_hole_makes_its_window_boundary():
    label = np.full((5, 5), 300)
    label[2, 2] = 0
    # d = 1: the frame, plus every pixel whose 3x3 window holds the hole (all 9 inner pixels).
    assert boundary_mask(label).all()
    expected = np.full((5, 5), 301)
    expected[2, 2] = 1
    np.testing.assert_array_equal(boundary_label_map(label), expected)


def test_image_smaller_than_the_window_is_all_boundary():
    assert boundary_mask(np.zeros((3, 40), np.uint16), d=2).all()


@pytest.mark.parametrize("seed", range(6))
def test_equals_per_label_erosion(seed):
    rng = np.random.default_rng(seed)
    for _ in range(10):
        shape = tuple(int(x) for x in rng.integers(1, 90, 2))
        label = random_map(rng, shape, [0, 1, 7, 256, 1000, 65535], int(rng.integers(1, 10)))
        np.testing.assert_array_equal(boundary_label_map(label.astype(np.uint16)), official_boundary_map(label))


@pytest.mark.parametrize("d", [1, 2, 3, 7, 19])
def test_boundary_is_frame_or_max_differs_from_min(d):
    from scipy import ndimage

    rng = np.random.default_rng(d)
    for _ in range(40):
        shape = tuple(int(x) for x in rng.integers(1, 3 * d + 40, 2))
        label = random_map(rng, shape, [0, 1, 2], int(rng.integers(1, 12)))
        if rng.random() < 0.5:  # a lone pixel, possibly in a window's corner
            label[rng.integers(0, shape[0]), rng.integers(0, shape[1])] = 9
        size = 2 * d + 1
        expected = ndimage.maximum_filter(label, size) != ndimage.minimum_filter(label, size)
        frame = frame_mask(shape, d)
        np.testing.assert_array_equal(boundary_mask(label, d), expected | frame)
