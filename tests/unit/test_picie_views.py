"""PiCIE's views: exact geometry of the image-branch vs feature-branch transform, photometric fixes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lussray.data import picie_views as pv
from lussray.data.augment import CropBox, decode_image, resized_crop

BASE = 64  # base image side
STRIDE = 4  # the "network": average pooling with the FPN's stride


def _coordinate_maps(size):
    """(2, size, size) float32: channel 0 = column centre x + 0.5, channel 1 = row centre y + 0.5."""
    centres = np.arange(size, dtype=np.float32) + 0.5
    return np.stack([np.broadcast_to(centres[None, :], (size, size)), np.broadcast_to(centres[:, None], (size, size))])


def _network(x):
    """A stride-4 network that is linear and local: f(x) = avg_pool(x, 4)."""
    return F.avg_pool2d(x, STRIDE)


def _inner_boxes(seed, count, margin=10):
    """Boxes from sample_crop, drawn on the inner region so bilinear samples never clamp."""
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(count):
        box = pv.sample_crop(rng, BASE - 2 * margin, BASE - 2 * margin, min_side=0.5)
        boxes.append(CropBox(box.top + margin, box.left + margin, box.height, box.width, box.flipped))
    return boxes


BOXES = [
    CropBox(10.0, 12.0, 40.0, 40.0, False),
    CropBox(10.0, 12.0, 40.0, 40.0, True),
    CropBox(9.5, 11.25, 33.5, 37.0, True),  # non-integer, non-square
    *_inner_boxes(0, 5),
]


@pytest.mark.parametrize("box", BOXES, ids=lambda b: f"{b.top:g},{b.left:g},{b.height:g},{b.width:g},{int(b.flipped)}")
@pytest.mark.parametrize("out_size", [16, 32])
def test_image_branch_equals_feature_branch_pil(box, out_size):
    """f(G(x)) == G(f(x)) on coordinate-encoded images: same geometry with the PIL image branch.

    PIL's antialiased bilinear filter reproduces a linear ramp exactly only at integer scale
    factors; at others (33.5 -> 16 px) its sampled weights have a small first moment, measured
    here below 0.05 base pixels (1/80 of a feature cell). The sample centres are the same: the
    torch branch below is exact.
    """
    image = _coordinate_maps(BASE)
    # Image branch: the data-side crop (PIL resize with box, per channel), then the network.
    crops = np.stack([resized_crop(np.ascontiguousarray(channel), box, out_size) for channel in image])
    z1 = _network(torch.from_numpy(crops)[None].double())
    # Feature branch: the network on the whole image, then G on its feature map.
    fmap = _network(torch.from_numpy(image)[None].double())
    z2 = pv.apply_crop(fmap, box.as_array()[None], (BASE, BASE), out_size // STRIDE)
    torch.testing.assert_close(z1, z2, rtol=0, atol=0.05)
    # And the values name the intended base-image points.
    cells = out_size // STRIDE
    xs = box.left + (np.arange(cells) + 0.5) * box.width / cells
    ys = box.top + (np.arange(cells) + 0.5) * box.height / cells
    np.testing.assert_allclose(z2[0, 0, 0].numpy(), xs[::-1] if box.flipped else xs, atol=2e-4)
    np.testing.assert_allclose(z2[0, 1, :, 0].numpy(), ys, atol=2e-4)


@pytest.mark.parametrize("box", BOXES[:3] + _inner_boxes(1, 3), ids=str)
def test_image_branch_equals_feature_branch_torch(box):
    """The same identity with the reference's GPU variant (apply_crop on the image as well)."""
    image = torch.from_numpy(_coordinate_maps(BASE))[None].double()
    boxes = box.as_array()[None]
    z1 = _network(pv.apply_crop(image, boxes, (BASE, BASE), 32))
    z2 = pv.apply_crop(_network(image), boxes, (BASE, BASE), 32 // STRIDE)
    torch.testing.assert_close(z1, z2, rtol=0, atol=1e-9)
    xs = box.left + (np.arange(8) + 0.5) * box.width / 8
    np.testing.assert_allclose(z2[0, 0, 3].numpy(), xs[::-1] if box.flipped else xs, atol=1e-9)


@pytest.mark.parametrize("flipped", [False, True])
def test_full_box_is_identity_or_exact_flip(flipped):
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    boxes = np.array([[0.0, 0.0, BASE, BASE, float(flipped)]] * 2)
    out = pv.apply_crop(maps, boxes, (BASE, BASE), 8)
    torch.testing.assert_close(out, maps.flip(-1) if flipped else maps, rtol=0, atol=1e-12)
    image = np.random.default_rng(0).integers(0, 256, (BASE, BASE, 3), dtype=np.uint8)
    crop = resized_crop(image, CropBox(0.0, 0.0, BASE, BASE, flipped), BASE)
    np.testing.assert_array_equal(crop, image[:, ::-1] if flipped else image)


def test_batch_boxes_are_per_sample_and_gradients_flow():
    maps = torch.arange(2 * 16.0).view(2, 1, 4, 4).requires_grad_(True)
    boxes = np.array([[0.0, 0.0, 16.0, 16.0, 0.0], [0.0, 0.0, 16.0, 16.0, 1.0]])
    out = pv.apply_crop(maps, boxes, (16, 16), 4)
    torch.testing.assert_close(out[0], maps[0].detach())
    torch.testing.assert_close(out[1], maps[1].detach().flip(-1))
    out.sum().backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0


def test_sample_crop_follows_the_reference_distribution():
    rng = np.random.default_rng(7)
    boxes = [pv.sample_crop(rng, 640, 480, min_side=0.5) for _ in range(2000)]
    sides = np.array([b.height for b in boxes])
    assert all(b.height == b.width and b.top >= 0 and b.left >= 0 for b in boxes)
    assert all(b.top + b.height <= 640 and b.left + b.width <= 480 for b in boxes)
    assert sides.min() >= 240 and sides.max() <= 480
    assert abs(np.mean(sides) / 480 - 0.75) < 0.01  # side fraction ~ U(0.5, 1)
    assert abs(np.mean([b.flipped for b in boxes]) - 0.5) < 0.04


def _jpeg(seed, height=80, width=96):
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_views_batch_draws_every_sample_from_its_own_generator():
    from lussray.seeds import sample_rng

    batch = {"jpg": np.array([_jpeg(0), _jpeg(1), _jpeg(2)], dtype=object)}
    keys = ["a", "b", "c"]
    kwargs = {"base_size": 64, "crop_size": 32}
    out = pv.views_batch(batch, rngs=[sample_rng(1, 7, 0, k) for k in keys], **kwargs)
    assert out["view1"].shape == out["view2"].shape == (3, 32, 32, 3) and out["view1"].dtype == np.uint8
    assert out["boxes"].shape == (3, 5) and out["boxes"].dtype == np.float32
    # the same (seed, stage, epoch, key) gives the same views whatever the batch around the sample
    alone = pv.views_batch({"jpg": batch["jpg"][1:2]}, rngs=[sample_rng(1, 7, 0, "b")], **kwargs)
    for name in ("view1", "view2", "boxes"):
        np.testing.assert_array_equal(alone[name][0], out[name][1])
    # another epoch draws new views; the boxes lie inside the base image and are square
    other = pv.views_batch(batch, rngs=[sample_rng(1, 7, 1, k) for k in keys], **kwargs)
    assert not np.array_equal(other["boxes"], out["boxes"])
    top, left, height, width, _ = out["boxes"].T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 64).all() and (left + width <= 64).all()
    assert np.array_equal(height, width) and (height >= 32).all()
    # view 2 is the whole base image resized (photometric changes aside): P2(x) at res1
    params = pv.sample_view_params(sample_rng(1, 7, 0, "a"), 64, 64)
    base = pv.base_image(decode_image(batch["jpg"][0], draft_size=64), 64)
    np.testing.assert_array_equal(out["view2"][0], pv.make_views(base, params, 32)[1])
    assert params.photometric[0] != params.photometric[1]  # one draw per view


def test_photometric_probabilities_and_ranges():
    rng = np.random.default_rng(3)
    draws = [pv.sample_photometric(rng) for _ in range(3000)]
    gray = np.mean([d.grayscale for d in draws])
    blurred = [d.blur_sigma for d in draws if d.blur_sigma is not None]
    assert abs(gray - 0.2) < 0.03
    assert abs(len(blurred) / 3000 - 0.5) < 0.03 and 0.1 <= min(blurred) and max(blurred) <= 2.0
    brightness = [d.brightness for d in draws if d.brightness is not None]
    assert abs(len(brightness) / 3000 - 0.8) < 0.03 and 0.7 <= min(brightness) and max(brightness) <= 1.3
    hues = [d.hue for d in draws if d.hue is not None]
    assert -0.1 <= min(hues) and max(hues) <= 0.1


def test_grayscale_and_blur_are_applied():
    image = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    gray = pv.apply_photometric(image, pv.PhotometricParams(grayscale=True))
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    blurred = pv.apply_photometric(image, pv.PhotometricParams(blur_sigma=1.5))
    assert blurred.std() < 0.8 * image.std()  # a real blur, unlike the reference's negative radius
    assert np.array_equal(pv.apply_photometric(image, pv.PhotometricParams()), image)
    bright = pv.apply_photometric(image, pv.PhotometricParams(brightness=0.5))
    np.testing.assert_array_equal(bright, np.floor(image * np.float32(0.5)).astype(np.uint8))


def test_make_views_shapes_and_geometry():
    image = np.random.default_rng(1).integers(0, 256, (BASE, BASE, 3), dtype=np.uint8)
    params = pv.ViewParams((pv.PhotometricParams(), pv.PhotometricParams()), CropBox(8.0, 4.0, 32.0, 32.0, True),
                           (BASE, BASE))
    view1, view2 = pv.make_views(image, params, 32)
    assert view1.shape == view2.shape == (32, 32, 3) and view1.dtype == np.uint8
    np.testing.assert_array_equal(view1, image[8:40, 4:36][:, ::-1])  # 1:1 crop, flipped
    with pytest.raises(ValueError, match="drawn for"):
        pv.make_views(image[:32], params, 32)
