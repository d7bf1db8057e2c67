"""Pixel pseudo labels: cosine assignment, foreground upsampling, threshold, histogram."""

import numpy as np
import pytest
import torch

from lussray.clustering.pixel_labels import (
    apply_threshold,
    assign_pixels,
    foreground_scores,
    label_histogram,
)


def test_assign_pixels_is_cosine_argmax_plus_one_upsampled_nearest():
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    features = torch.tensor([[[5.0, 0.0], [-3.0, 0.1]], [[0.1, 2.0], [0.0, -0.1]]]).unsqueeze(0)  # (1, 2, 2, 2)
    # pixel (0,0) = (5, .1) -> 1; (0,1) = (0, 2) -> 2; (1,0) = (-3, 0) -> 3; (1,1) = (.1, -.1) -> 1
    ids = assign_pixels(features, centroids * 7.0, (4, 4))
    assert ids.shape == (1, 4, 4)
    expected = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 1, 1], [3, 3, 1, 1]])
    assert np.array_equal(ids[0].numpy(), expected)


def test_foreground_scores_are_channel_means_bilinear():
    attention = torch.stack([torch.full((2, 2), 0.2), torch.full((2, 2), 0.6)]).unsqueeze(0)
    scores = foreground_scores(attention, (5, 3))
    assert scores.shape == (1, 5, 3) and torch.allclose(scores, torch.full((1, 5, 3), 0.4))


def test_image_scale_rescales_each_image_to_zero_one():
    low = torch.tensor([[0.40, 0.42], [0.44, 0.46]])  # an image whose attention sits low everywhere
    attention = torch.stack([low, low + 0.3]).unsqueeze(1).expand(2, 3, 2, 2)  # (B=2, C=3, 2, 2)
    scores = foreground_scores(attention, (2, 2), scale="image")
    expected = torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]])
    assert torch.allclose(scores[0], expected, atol=1e-5) and torch.allclose(scores[1], expected, atol=1e-5)
    assert torch.allclose(foreground_scores(attention, (2, 2))[0], low)  # "absolute" leaves them alone
    flat = foreground_scores(torch.full((1, 2, 2, 2), 0.5), (3, 3), scale="image")
    assert torch.equal(flat, torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="score scale"):
        foreground_scores(attention, (2, 2), scale="relative")


def test_threshold_sets_low_scores_to_other():
    ids = np.array([[1, 2], [3, 4]])
    scores = np.array([[0.1, 0.5], [0.39, 0.4]])
    assert np.array_equal(apply_threshold(ids, scores, 0.4), [[0, 2], [0, 4]])
    assert apply_threshold(ids, scores, 0.4).dtype == np.int32


def test_histogram_counts_zero_to_k():
    assert label_histogram(np.array([[0, 2], [2, 2]]), 3).tolist() == [1, 0, 3, 0]

