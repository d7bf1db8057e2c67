"""Crop geometry, P2P grids and the PASS augmentations (lussray.data.augment)."""

import dataclasses
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from lussray.data import augment as aug

# -- constants, decoding ----------------------------------------------------------------------


def test_normalisation_constants():
    assert aug.IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert aug.IMAGENET_STD == (0.229, 0.224, 0.225)
    assert aug.MULTICROP_STD == (0.228, 0.224, 0.225)  # PASS/SwAV multi-crop std[0]


def test_module_is_pure():
    code = "import sys, lussray.data.augment; assert not {'ray', 'torch'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True)


def _encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def test_decode_png_exact_and_grayscale_jpeg_to_rgb():
    rgb = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    decoded = aug.decode_image(_encode(rgb, "PNG"))
    np.testing.assert_array_equal(decoded, rgb)
    assert decoded.flags.writeable
    gray = aug.decode_image(_encode(rgb[..., 0]))
    assert gray.shape == (30, 40, 3) and gray.dtype == np.uint8
    assert (gray[..., 0] == gray[..., 2]).all()


@pytest.mark.parametrize("draft_size, scale, shape", [(None, 1.0, (200, 320)), (100, 2.0, (100, 160)), (50, 4.0, (50, 80))])
def test_decode_draft_reports_scale(draft_size, scale, shape):
    smooth = np.broadcast_to(np.linspace(0, 255, 320, dtype=np.uint8), (200, 320))
    data = _encode(np.stack([smooth] * 3, -1))
    image, got_scale = aug.decode_image_with_scale(data, draft_size=draft_size)
    assert got_scale == scale and image.shape[:2] == shape
    np.testing.assert_array_equal(aug.decode_image(data, draft_size=draft_size), image)


# -- sample_crop_box --------------------------------------------------------------------------


@pytest.mark.parametrize("height, width, scale", [(100, 150, (0.08, 1.0)), (300, 200, (0.14, 1.0)), (256, 256, (0.05, 0.14))])
def test_crop_box_statistics(height, width, scale):
    rng = np.random.default_rng(1)
    ratio = (3 / 4, 4 / 3)
    boxes = np.stack([aug.sample_crop_box(rng, height, width, scale).as_array() for _ in range(2000)])
    top, left, h, w, flipped = boxes.T
    assert (boxes[:, :4] == np.round(boxes[:, :4])).all()  # integer pixels, like torchvision
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert (h > 0).all() and (w > 0).all()
    # w, h are rounded from the continuous draw: allow half a pixel on each side
    area = h * w / (height * width)
    assert (area >= scale[0] * (1 - 1.5 / np.minimum(h, w))).all()
    assert (area <= scale[1] * (1 + 1.5 / np.minimum(h, w))).all()
    aspect = w / h
    assert (aspect >= ratio[0] * (1 - 1.0 / np.minimum(h, w))).all()
    assert (aspect <= ratio[1] * (1 + 1.0 / np.minimum(h, w))).all()
    assert 0.45 < flipped.mean() < 0.55
    assert boxes[:, 1].std() > 0 and boxes[:, 0].std() > 0


@pytest.mark.parametrize(
    "height, width, scale, ratio, expected",
    [
        (100, 100, (0.9, 1.0), (10.0, 12.0), (45, 0, 10, 100)),  # too narrow: w = W, h = W / 10
        (10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), (0, 493, 10, 13)),  # too wide: h = H, w = 4/3 H
        (100, 120, (2.0, 2.0), (3 / 4, 4 / 3), (0, 0, 100, 120)),  # image ratio in range: whole image
    ],
)
def test_crop_box_central_fallback(height, width, scale, ratio, expected):
    box = aug.sample_crop_box(np.random.default_rng(0), height, width, scale, ratio, flip_p=0.0)
    assert (box.top, box.left, box.height, box.width) == expected
    assert box.flipped is False


def test_crop_box_flip_probability_extremes_and_array_round_trip():
    rng = np.random.default_rng(0)
    assert not aug.sample_crop_box(rng, 50, 50, flip_p=0.0).flipped
    box = aug.sample_crop_box(rng, 50, 50, flip_p=1.0)
    assert box.flipped
    assert aug.CropBox.from_array(box.as_array()) == box
    assert aug.CropBox.from_array(box.as_array().astype(np.float32)) == box


# -- P2P grids: hand-computed geometry --------------------------------------------------------

A = aug.CropBox(top=0, left=0, height=100, width=100)
B = aug.CropBox(top=50, left=20, height=100, width=80)
# overlap: rows [50, 100), cols [20, 100); with G = 3 the lattice is cols 20, 60, 100 and rows 50, 75, 100
A_X, A_Y = [-0.6, 0.2, 1.0], [0.0, 0.5, 1.0]  # A: cols / 100, rows / 100, then 2r - 1
B_X, B_Y = [-1.0, 0.0, 1.0], [-1.0, -0.5, 0.0]  # B: (cols - 20) / 80, (rows - 50) / 100


def _expected(xs, ys):
    return np.array([[[x, y] for x in xs] for y in ys], dtype=np.float32)  # grid[j, i] = (x_i, y_j)


@pytest.mark.parametrize(
    "flip_a, flip_b, xs_a, xs_b",
    [
        (False, False, A_X, B_X),
        (False, True, A_X, [1.0, 0.0, -1.0]),  # flipped: x -> 1 - x, so 2(1 - r) - 1 = -(2r - 1)
        (True, False, [0.6, -0.2, -1.0], B_X),
        (True, True, [0.6, -0.2, -1.0], [1.0, 0.0, -1.0]),
    ],
)
def test_grids_hand_computed(flip_a, flip_b, xs_a, xs_b):
    box_a = dataclasses.replace(A, flipped=flip_a)
    box_b = dataclasses.replace(B, flipped=flip_b)
    grid_a, grid_b = aug.correspondence_grids(box_a, box_b, grid_size=3)
    assert grid_a.dtype == np.float32 and grid_a.shape == (3, 3, 2)
    np.testing.assert_allclose(grid_a, _expected(xs_a, A_Y), atol=1e-6)
    np.testing.assert_allclose(grid_b, _expected(xs_b, B_Y), atol=1e-6)


def test_grids_hand_computed_g7_nested_boxes():
    outer = aug.CropBox(top=10, left=30, height=120, width=60)
    inner = aug.CropBox(top=40, left=45, height=60, width=30, flipped=True)
    grid_outer, grid_inner = aug.correspondence_grids(outer, inner, grid_size=7)
    steps = [-1, -2 / 3, -1 / 3, 0, 1 / 3, 2 / 3, 1]
    # inner is the overlap: it spans its whole view, x reversed by the flip
    np.testing.assert_allclose(grid_inner, _expected(steps[::-1], steps), atol=1e-6)
    # in outer, cols 45..75 are rel 0.25..0.75 (x -0.5..0.5); rows 40..100 are rel 0.25..0.75
    halves = [-0.5, -1 / 3, -1 / 6, 0, 1 / 6, 1 / 3, 0.5]
    np.testing.assert_allclose(grid_outer, _expected(halves, halves), atol=1e-6)


@pytest.mark.parametrize("other", [aug.CropBox(0, 100, 50, 50), aug.CropBox(100, 0, 10, 10), aug.CropBox(200, 300, 5, 5, True)])
def test_grids_without_overlap_are_minus_two(other):
    grid_a, grid_b = aug.correspondence_grids(A, other, grid_size=7)  # touching edges do not overlap
    assert (grid_a == aug.NO_OVERLAP).all() and (grid_b == aug.NO_OVERLAP).all()


def test_grids_batch_matches_single():
    rng = np.random.default_rng(3)
    pairs = [(aug.sample_crop_box(rng, 120, 90), aug.sample_crop_box(rng, 120, 90)) for _ in range(16)]
    pairs.append((A, aug.CropBox(0, 100, 50, 50)))  # one without overlap
    boxes_a = np.stack([a.as_array() for a, _ in pairs]).astype(np.float32)
    boxes_b = np.stack([b.as_array() for _, b in pairs]).astype(np.float32)
    grids_a, grids_b = aug.correspondence_grids_batch(boxes_a, boxes_b, 5)
    assert grids_a.shape == (17, 5, 5, 2) and grids_b.dtype == np.float32
    for k, (a, b) in enumerate(pairs):
        single_a, single_b = aug.correspondence_grids(a, b, 5)
        np.testing.assert_allclose(grids_a[k], single_a, atol=1e-6)
        np.testing.assert_allclose(grids_b[k], single_b, atol=1e-6)


# -- P2P grids: exactness on coordinate-encoding images ---------------------------------------

H, W = 240, 320


def _coordinate_views(box: aug.CropBox, size: int) -> torch.Tensor:
    """The view of the original-coordinate maps (x = col + 0.5, y = row + 0.5), (1, 2, S, S)."""
    cols, rows = np.meshgrid(np.arange(W, dtype=np.float32) + 0.5, np.arange(H, dtype=np.float32) + 0.5)
    views = [aug.resized_crop(coordinate, box, size) for coordinate in (cols, rows)]
    return torch.from_numpy(np.stack(views))[None]


def _sample(maps: torch.Tensor, grid: np.ndarray, align_corners: bool = False) -> np.ndarray:
    sampled = F.grid_sample(maps, torch.from_numpy(grid)[None], align_corners=align_corners, padding_mode="border")
    return sampled[0].permute(1, 2, 0).numpy()  # (G, G, 2) original (x, y) at each grid point


def _overlapping_pairs(count: int, seed: int = 0):
    """Random crop pairs with a sizeable overlap, covering all four flip combinations."""
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < count:
        a = aug.sample_crop_box(rng, H, W, (0.2, 1.0))
        b = aug.sample_crop_box(rng, H, W, (0.2, 1.0))
        overlap_w = min(a.left + a.width, b.left + b.width) - max(a.left, b.left)
        overlap_h = min(a.top + a.height, b.top + b.height) - max(a.top, b.top)
        if overlap_w > 0.3 * max(a.width, b.width) and overlap_h > 0.3 * max(a.height, b.height):
            k = len(pairs)
            pairs.append((dataclasses.replace(a, flipped=bool(k & 1)), dataclasses.replace(b, flipped=bool(k & 2))))
    return pairs


@pytest.mark.parametrize("a, b", _overlapping_pairs(8))
def test_grids_sample_the_same_original_points(a, b):
    size, grid_size = 56, 7
    grid_a, grid_b = aug.correspondence_grids(a, b, grid_size)
    coords_a = _sample(_coordinate_views(a, size), grid_a)
    coords_b = _sample(_coordinate_views(b, size), grid_b)
    left, top = max(a.left, b.left), max(a.top, b.top)
    right, bottom = min(a.left + a.width, b.left + b.width), min(a.top + a.height, b.top + b.height)
    xs, ys = np.linspace(left, right, grid_size), np.linspace(top, bottom, grid_size)
    expected = np.stack(np.meshgrid(xs, ys), -1)  # (G, G, 2) original (x, y)
    interior = (slice(1, -1), slice(1, -1))
    view_pixel = max(a.width, a.height, b.width, b.height) / size  # original pixels per view pixel
    # inside the overlap, bilinear resampling of a linear map is exact up to PIL's antialiasing
    # filter, whose discrete taps are off-centre by < 1% of a view pixel
    np.testing.assert_allclose(coords_a[interior], expected[interior], atol=0.02 * view_pixel)
    np.testing.assert_allclose(coords_b[interior], expected[interior], atol=0.02 * view_pixel)
    # on the overlap's edges a view samples its own border: within one view pixel
    np.testing.assert_allclose(coords_a, expected, atol=view_pixel)
    np.testing.assert_allclose(coords_b, expected, atol=view_pixel)


@pytest.mark.parametrize("a, b", _overlapping_pairs(8, seed=1))
def test_grids_exact_on_stride_8_feature_maps_with_align_corners_false(a, b):
    # A stride-8 "feature map" whose cell k stands for view pixels [8k, 8k + 8): the average.
    size, stride, grid_size = 56, 8, 7
    grid_a, grid_b = aug.correspondence_grids(a, b, grid_size)
    feats_a = F.avg_pool2d(_coordinate_views(a, size), stride)
    feats_b = F.avg_pool2d(_coordinate_views(b, size), stride)
    cells = size // stride
    # points between the outermost cell centres (no border clamping in either view)
    inside = np.ones(grid_a.shape[:2], dtype=bool)
    for grid in (grid_a, grid_b):
        rel = (grid + 1) / 2 * cells
        inside &= ((rel >= 0.5) & (rel <= cells - 0.5)).all(-1)
    assert inside.sum() >= 4
    coords_a, coords_b = _sample(feats_a, grid_a), _sample(feats_b, grid_b)
    view_pixel = max(a.width, a.height, b.width, b.height) / size
    np.testing.assert_allclose(coords_a[inside], coords_b[inside], atol=0.02 * view_pixel)
    # align_corners=True puts the same grid off by up to half a cell, differently per view
    skewed_a, skewed_b = _sample(feats_a, grid_a, True), _sample(feats_b, grid_b, True)
    assert np.abs(skewed_a - coords_a)[inside].max() > 1.0 or np.abs(skewed_b - coords_b)[inside].max() > 1.0


# -- PairTransform ----------------------------------------------------------------------------


def _block_pair(label_scale: int):
    """An image whose colour names its 20 px block, and the label of those blocks at 1/label_scale."""
    rows, cols = np.mgrid[0:120, 0:160]
    block_row, block_col = rows // 20, cols // 20
    image = np.stack([block_row * 40 + 10, block_col * 30 + 10, np.full_like(rows, 128)], -1).astype(np.uint8)
    label = (block_row * 100 + block_col + 1)[::label_scale, ::label_scale].astype(np.int32)
    return image, label


@pytest.mark.parametrize("label_scale", [1, 2, 4])
@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_pair_transform_keeps_image_and_label_aligned(label_scale, flip_p):
    image, label = _block_pair(label_scale)
    transform = aug.PairTransform(crop_size=64, scale=(0.2, 1.0), flip_p=flip_p)
    rng = np.random.default_rng(label_scale)
    for _ in range(5):
        view, view_label = transform(image, label, rng)
        assert view.shape == (64, 64, 3) and view.dtype == np.uint8
        assert view_label.shape == (64, 64) and view_label.dtype == np.int32
        assert set(np.unique(view_label)) <= set(np.unique(label))  # nearest: no new ids
        # the label implied by the image colours, where the colour is a pure block colour
        block_row, rem_r = np.divmod(view[..., 0].astype(int) - 10, 40)
        block_col, rem_c = np.divmod(view[..., 1].astype(int) - 10, 30)
        pure = (rem_r == 0) & (rem_c == 0)
        # away from block boundaries, nearest and bilinear must agree
        pad = np.pad(view_label, 1, mode="edge")
        flat = np.ones_like(pure)
        for dr in (0, 1, 2):
            for dc in (0, 1, 2):
                flat &= pad[dr : dr + 64, dc : dc + 64] == view_label
        check = pure & flat
        assert check.mean() > 0.3
        np.testing.assert_array_equal((block_row * 100 + block_col + 1)[check], view_label[check])


def test_pair_transform_matches_resize_label_first():
    image, label = _block_pair(4)
    noise = np.random.default_rng(0).integers(0, 1000, label.shape).astype(np.int32)  # every pixel differs
    transform = aug.PairTransform(crop_size=48)
    rng_ours, rng_box = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(5):
        _, ours = transform(image, noise, rng_ours)
        box = aug.sample_crop_box(rng_box, *image.shape[:2])
        # PASS: nearest-resize the label to the image size, then crop with NEAREST
        full = np.asarray(Image.fromarray(noise).resize((image.shape[1], image.shape[0]), Image.Resampling.NEAREST))
        reference = aug._nearest_crop(full, box, 48)
        assert (ours == reference).mean() > 0.95


# -- MultiCropTransform -----------------------------------------------------------------------

S50 = dict(num_crops=[2, 6], crop_sizes=[224, 96], min_scales=[0.14, 0.05], max_scales=[1.0, 0.14])
SMALL = dict(num_crops=[2, 2], crop_sizes=[96, 48], min_scales=[0.14, 0.05], max_scales=[1.0, 0.14])


def _photo(height=180, width=240, seed=0):
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([128 + 100 * np.sin(cols / 13 + c) * np.cos(rows / 17 - c) for c in range(3)], -1)
    return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("config, sizes", [(S50, [224] * 2 + [96] * 6), (SMALL, [96, 96, 48, 48])])
def test_multicrop_shapes_and_dtypes(config, sizes):
    transform = aug.MultiCropTransform(**config)
    views, boxes = transform(_photo(), np.random.default_rng(0))
    assert transform.num_views == len(sizes) == len(views) == len(boxes)
    for view, size, box in zip(views, sizes, boxes):
        assert view.shape == (size, size, 3) and view.dtype == np.uint8
        assert view.flags.c_contiguous and view.flags.writeable
        assert 0 <= box.top and box.top + box.height <= 180 and 0 <= box.left and box.left + box.width <= 240
    local_areas = [b.height * b.width / (180 * 240) for b in boxes[2:]]
    assert max(local_areas) < 0.16  # local crops respect max_scale 0.14 (up to rounding)


def test_multicrop_is_deterministic_given_the_seed():
    transform = aug.MultiCropTransform(**SMALL)
    image = _photo()
    first = transform(image, np.random.default_rng(42))
    second = transform(image, np.random.default_rng(42))
    other = transform(image, np.random.default_rng(43))
    assert first[1] == second[1]
    for x, y in zip(first[0], second[0]):
        np.testing.assert_array_equal(x, y)
    assert first[1] != other[1]


def test_multicrop_without_colour_is_pure_geometry():
    transform = aug.MultiCropTransform(**SMALL, color_jitter_strength=0.0, grayscale_p=0.0, blur_p=0.0)
    image = _photo()
    views, boxes = transform(image, np.random.default_rng(7))
    for view, box, size in zip(views, boxes, [96, 96, 48, 48]):
        np.testing.assert_array_equal(view, aug.resized_crop(image, box, size))


def test_multicrop_colour_distortion_changes_views_and_grayscale_is_gray():
    image = _photo()
    plain = aug.MultiCropTransform(**SMALL, color_jitter_strength=0.0, grayscale_p=0.0, blur_p=0.0)
    jitter = aug.MultiCropTransform(**SMALL, color_jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)
    gray = aug.MultiCropTransform(**SMALL, grayscale_p=1.0)
    reference, _ = plain(image, np.random.default_rng(1))
    jittered, _ = jitter(image, np.random.default_rng(1))
    assert all(np.abs(a.astype(int) - b).mean() > 1 for a, b in zip(reference, jittered))
    for view in gray(image, np.random.default_rng(1))[0]:
        assert (view[..., 0] == view[..., 1]).all() and (view[..., 1] == view[..., 2]).all()


@pytest.mark.parametrize("bad", [dict(num_crops=[2], crop_sizes=[224, 96], min_scales=[0.1], max_scales=[1.0]),
                                 dict(num_crops=[2], crop_sizes=[224], min_scales=[0.5], max_scales=[0.2])])
def test_multicrop_rejects_bad_groups(bad):
    with pytest.raises(ValueError):
        aug.MultiCropTransform(**bad)


# -- colour ops against torchvision's PIL path ------------------------------------------------

PHOTO = _photo(48, 64, seed=3)


def _planar(image):
    return image.reshape(-1, 3).T.astype(np.float32)


def _hwc(planar, shape):
    return planar.T.reshape(shape).astype(np.uint8)


@pytest.mark.parametrize("factor", [0.2, 0.65, 1.0, 1.4, 1.8])
@pytest.mark.parametrize(
    "ours, theirs",
    [(aug.adjust_brightness, TF.adjust_brightness), (aug.adjust_contrast, TF.adjust_contrast),
     (aug.adjust_saturation, TF.adjust_saturation)],
)
def test_blend_ops_bit_exact_with_torchvision(ours, theirs, factor):
    expected = np.asarray(theirs(Image.fromarray(PHOTO), factor))
    np.testing.assert_array_equal(_hwc(ours(_planar(PHOTO), factor), PHOTO.shape), expected)


@pytest.mark.parametrize("hue", [-0.5, -0.2, -0.07, 0.0, 0.05, 0.2, 0.45])
def test_hue_close_to_torchvision(hue):
    expected = np.asarray(TF.adjust_hue(Image.fromarray(PHOTO), hue)).astype(int)
    ours = _hwc(aug.adjust_hue(_planar(PHOTO), hue), PHOTO.shape).astype(int)
    difference = np.abs(ours - expected)
    assert difference.mean() < 1.0 and difference.max() <= 16  # PIL's 8-bit HSV round trip


def test_hue_shift_rotates_primaries():
    primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 90, 90]]], dtype=np.uint8)
    third = _hwc(aug.adjust_hue(_planar(primaries), 1 / 3), primaries.shape)  # int(85) / 256 of a turn
    assert third[0, 0].argmax() == 1 and third[0, 1].argmax() == 2 and third[0, 2].argmax() == 0
    np.testing.assert_array_equal(third[0, 3], [90, 90, 90])  # gray has no hue


def test_colour_distortion_grayscale_matches_pil_luma():
    distort = aug.ColorDistortion(strength=1.0, grayscale_p=1.0, blur_p=0.0, jitter_p=1.0)
    rng = np.random.default_rng(0)
    view = distort(Image.fromarray(PHOTO), rng)
    # replay the same jitter, then PIL's own grayscale
    replay = np.random.default_rng(0)
    replay.random()
    jittered = _hwc(distort._jitter(_planar(PHOTO), replay), PHOTO.shape)
    expected = np.asarray(Image.fromarray(jittered).convert("L").convert("RGB"))
    np.testing.assert_array_equal(view, expected)


# -- resize / centre crop ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(180, 240), (240, 180), (256, 300), (97, 97)])
def test_resize_shorter_side_matches_torchvision(shape):
    image = _photo(*shape)
    ours = aug.resize_shorter_side(image, 128)
    expected = np.asarray(T.Resize(128)(Image.fromarray(image)))
    assert ours.shape == expected.shape and min(ours.shape[:2]) == 128
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("shape, size", [((180, 240), 128), ((101, 150), 100), ((60, 41), 64), ((3, 5), 4)])
def test_center_crop_matches_torchvision(shape, size):
    image = _photo(*shape)
    ours = aug.center_crop(image, size)
    expected = np.asarray(T.CenterCrop(size)(Image.fromarray(image)))
    np.testing.assert_array_equal(ours, expected)


def test_shorter_side_resize_has_a_bounded_output():
    # a 1 x 65535 image at shorter side 256 would be 256 x 16.7M pixels (12 GiB): refused before allocating
    with pytest.raises(ValueError, match=r"1x65535 image .* 256x16776960 .* more than 67108864"):
        aug.resize_shorter_side(np.zeros((1, 65535, 3), np.uint8), 256)
    with pytest.raises(ValueError, match="more than 1000"):
        aug.resize_shorter_side(np.zeros((10, 20), np.uint8), 30, max_pixels=1000)
    assert aug.resize_shorter_side(np.zeros((10, 20), np.uint8), 20, max_pixels=800).shape == (20, 40)


@pytest.mark.parametrize("shape", [(40, 60), (75, 50), (64, 64)])
def test_evaluation_view_keeps_image_and_label_aligned(shape):
    """Resize(32) + CenterCrop(32): the label, cut through the same rectangle, matches the image."""
    from lussray.data.augment import evaluation_view

    height, width = shape
    # columns coloured by their left/right half, labelled alike: the crop must agree on the boundary
    image = np.zeros((height, width, 3), np.uint8)
    image[:, width // 2:] = 255
    label = np.zeros((height, width), np.int32)
    label[:, width // 2:] = 1
    label[0, 0] = 1000
    view, cropped = evaluation_view(image, label, 32, 32)
    assert view.shape == (32, 32, 3) and cropped.shape == (32, 32)
    bright = view[..., 0] > 127
    assert np.mean(bright == (cropped == 1)) > 0.95
    assert set(np.unique(cropped)) <= {0, 1, 1000}
    image_only, none = evaluation_view(image, None, 40, 32)
    assert image_only.shape == (32, 32, 3) and none is None
    with pytest.raises(ValueError, match="larger than"):
        evaluation_view(image, label, 16, 32)
