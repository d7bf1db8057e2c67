import math

import numpy as np
import pytest
import torch

from lussray.methods.fs4 import (
    NUM_VIEWS,
    SelectionCutoff,
    active_selection,
    apply_cutoff,
    fs4_loss,
    global_guidance_loss,
    nearest_centres,
    num_selected,
    pyramid_boxes,
    pyramid_view_images,
    selection_cutoff,
)
from lussray.models.fs4_heads import ClassicalCAMHead, ModifiedCAMHead, build_cam_head


def _tuples(boxes):
    return [(b.top, b.left, b.height, b.width) for b in boxes]


@pytest.mark.parametrize(
    "height,width,expected",
    [
        (320, 320, [(0, 0, 320, 320), (0, 0, 160, 160), (0, 160, 160, 160), (160, 0, 160, 160), (160, 160, 160, 160),
                    (80, 80, 160, 160)]),
        (5, 7, [(0, 0, 5, 7), (0, 0, 2, 3), (0, 4, 2, 3), (3, 0, 2, 3), (3, 4, 2, 3), (1, 2, 2, 3)]),
        (1, 1, [(0, 0, 1, 1)] * 6),
        (375, 500, [(0, 0, 375, 500), (0, 0, 187, 250), (0, 250, 187, 250), (188, 0, 187, 250), (188, 250, 187, 250),
                    (94, 125, 187, 250)]),
    ],
)
def test_pyramid_boxes(height, width, expected):
    boxes = pyramid_boxes(height, width)
    assert len(boxes) == NUM_VIEWS and _tuples(boxes) == expected
    assert not any(b.flipped for b in boxes)


def test_pyramid_boxes_other_fraction_and_errors():
    expected = [(0, 0, 6, 6), (0, 4, 6, 6), (4, 0, 6, 6), (4, 4, 6, 6), (2, 2, 6, 6)]
    assert _tuples(pyramid_boxes(10, 10, 0.6))[1:] == expected
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            pyramid_boxes(10, 10, bad)
    with pytest.raises(ValueError):
        pyramid_boxes(0, 10)


def test_pyramid_view_images_show_their_quadrant():
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    quadrants = {1: (0, 0), 2: (0, 40), 3: (30, 0), 4: (30, 40)}
    colours = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 4: (255, 255, 0)}
    for view, (top, left) in quadrants.items():
        image[top : top + 30, left : left + 40] = colours[view]
    views = pyramid_view_images(image)
    assert len(views) == 6 and all(v.shape == (224, 224, 3) and v.dtype == np.uint8 for v in views)
    for view, colour in colours.items():
        assert tuple(views[view][112, 112]) == colour
        assert tuple(views[0][56 if view < 3 else 168, 56 if view % 2 else 168]) == colour  # whole image, same quadrant
    assert tuple(views[5][96, 96]) == colours[1] and tuple(views[5][128, 128]) == colours[4]  # centre crop
    whole = pyramid_view_images(image, num_views=1)
    assert len(whole) == 1 and np.array_equal(whole[0], views[0])


@pytest.mark.parametrize(
    "num_views,fraction,expected",
    [(0, 0.4, 0), (1, 0.4, 1), (2, 0.4, 1), (3, 0.4, 1), (4, 0.4, 1), (5, 0.4, 2), (6, 0.4, 2), (10, 0.4, 4),
     (100, 0.29, 29), (7, 1.0, 7), (600, 0.4, 240)],
)
def test_num_selected(num_views, fraction, expected):
    assert num_selected(num_views, fraction) == expected


def test_num_selected_rejects_bad_input():
    for fraction in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError):
            num_selected(10, fraction)
    with pytest.raises(ValueError):
        num_selected(-1, 0.4)


def test_active_selection_keeps_exactly_the_closest_40_percent():
    distances = np.random.default_rng(0).random(600).astype(np.float32)
    mask = active_selection(distances)
    assert mask.sum() == 240
    assert distances[mask].max() < distances[~mask].min()
    np.testing.assert_array_equal(np.sort(np.flatnonzero(mask)), np.sort(np.argsort(distances)[:240]))


def test_active_selection_breaks_ties_by_index():
    distances = np.array([0.5, 0.1, 0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert np.flatnonzero(active_selection(distances)).tolist() == [0, 1, 2, 3]
    assert np.flatnonzero(active_selection(np.zeros(5))).tolist() == [0, 1]


def test_cutoff_per_shard_equals_the_global_selection():
    rng = np.random.default_rng(1)
    distances = rng.integers(0, 20, size=97).astype(np.float64) / 20  # many ties
    indices = rng.permutation(1000)[:97]
    cutoff = selection_cutoff(distances, 0.4, indices)
    assert isinstance(cutoff, SelectionCutoff) and cutoff.num_kept == 38 and cutoff.num_views == 97
    shards = np.array_split(np.arange(97), 4)
    kept = np.concatenate([apply_cutoff(distances[s], indices[s], cutoff) for s in shards])
    order = np.lexsort((indices, distances))
    expected = np.zeros(97, dtype=bool)
    expected[order[:38]] = True
    np.testing.assert_array_equal(kept, expected)
    with pytest.raises(ValueError):
        selection_cutoff(distances, 0.4, np.zeros(97, dtype=np.int64))  # repeated indices
    with pytest.raises(ValueError):
        selection_cutoff(np.array([0.1, np.nan]))


def test_nearest_centres_uses_cosine_distance():
    centres = np.array([[1.0, 0.0], [0.0, 2.0]])
    features = np.array([[3.0, 1.0], [0.5, 4.0], [-1.0, 0.0]])
    labels, distances = nearest_centres(features, centres)
    assert labels.tolist() == [0, 1, 1]
    np.testing.assert_allclose(distances, [1 - 3 / math.sqrt(10), 1 - 4 / math.sqrt(16.25), 1.0])


@pytest.mark.parametrize("kind", ["modified", "classical"])
def test_cam_heads_shapes_and_gradients(kind):
    torch.manual_seed(0)
    head = build_cam_head(kind, in_channels=8, num_classes=5)
    features = torch.randn(3, 8, 6, 7, requires_grad=True)
    scores = head(features)
    assert scores.shape == (3, 5)
    global_guidance_loss(scores, torch.tensor([0, 4, 2])).backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert features.grad.abs().sum() > 0


def test_cam_heads_compute_their_formulas():
    torch.manual_seed(0)
    features = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    classical = ClassicalCAMHead(4, 3).double()
    weight, bias = classical.g.weight[:, :, 0, 0], classical.g.bias
    expected = torch.stack([(weight @ f.reshape(4, -1) + bias[:, None]).mean(dim=1) for f in features])  # GAP(g(F))
    torch.testing.assert_close(classical(features), expected)
    assert classical.activation_maps(features).shape == (2, 3, 3, 5)

    modified = ModifiedCAMHead(4, 3, hidden_channels=6).double()
    w2, b2 = modified.g2.weight[:, :, 0, 0], modified.g2.bias
    pooled = torch.stack([(w2 @ f.reshape(4, -1) + b2[:, None]).mean(dim=1) for f in features])  # GAP(g2(F))
    torch.testing.assert_close(modified(features), torch.relu(pooled) @ modified.g1.weight.T + modified.g1.bias)
    assert modified.g2.out_channels == 6


def test_build_cam_head_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown CAM head"):
        build_cam_head("gap", 4, 3)
    with pytest.raises(ValueError):
        build_cam_head("classical", 4, 3, hidden_channels=8)
    assert build_cam_head("modified", 4, 3).g2.out_channels == 4


def test_global_guidance_loss_against_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, -1.0, 0.5]])
    first = -math.log(math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3)))
    second = math.log(3)
    third = -math.log(math.exp(-1) / (math.exp(2) + math.exp(-1) + math.exp(0.5)))
    loss = global_guidance_loss(logits, torch.tensor([2, 0, 1]))
    assert loss.item() == pytest.approx((first + second + third) / 3, rel=1e-6)
    assert global_guidance_loss(logits, torch.tensor([2, -1, -1])).item() == pytest.approx(first, rel=1e-6)
    none = global_guidance_loss(logits.requires_grad_(), torch.tensor([-1, -1, -1]))
    assert none.item() == 0.0 and none.requires_grad


def test_fs4_loss_is_the_sum_of_both_parts():
    logits = torch.tensor([[0.2, -0.3], [1.0, 0.0]], requires_grad=True)
    pixel = torch.tensor(1.75, requires_grad=True)
    losses = fs4_loss(logits, torch.tensor([1, 0]), pixel)
    first = -math.log(math.exp(-0.3) / (math.exp(0.2) + math.exp(-0.3)))
    expected_w = (first - math.log(math.exp(1) / (math.exp(1) + 1))) / 2
    assert losses.global_.item() == pytest.approx(expected_w, rel=1e-6)
    assert losses.total.item() == pytest.approx(expected_w + 1.75, rel=1e-6)
    losses.total.backward()
    assert pixel.grad.item() == 1.0 and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        fs4_loss(logits, torch.tensor([1, 0]), torch.ones(2))


def test_one_fs4_step_through_cae_cam_head_and_picie_loss():
    from lussray.methods.picie import ClusterTargets, picie_loss
    from lussray.models.cae import ContextAwareEmbedding

    torch.manual_seed(0)
    cae, head = ContextAwareEmbedding(8), build_cam_head("modified", 8, num_classes=4)
    image = torch.rand(2, 3, 32, 32)
    fpn = torch.randn(2, 8, 8, 8, requires_grad=True)  # 1/4 of the image
    z1, z2 = cae(fpn, image), cae(fpn.flip(-1), image.flip(-1)).flip(-1)  # 1/8: (2, 8, 4, 4)
    centroids = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    labels = torch.randint(0, 3, (2, 4, 4))
    pixel, _ = picie_loss(z1, z2, ClusterTargets(centroids, labels), ClusterTargets(centroids, labels))
    losses = fs4_loss(head(z1), torch.tensor([1, 3]), pixel)
    losses.total.backward()
    assert torch.isfinite(losses.total) and losses.total.item() == pytest.approx(losses.global_.item() + pixel.item())
    params = dict(cae.named_parameters()) | {f"head.{k}": v for k, v in head.named_parameters()}
    for name, param in params.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
