"""Dense CRF: refinement moves a coarse boundary onto the image edge; a clear error without the extra."""

import sys

import numpy as np
import pytest
import torch

from lussray.crf import CRFParams, CRFRefiner, dense_crf, require_pydensecrf
from lussray.errors import UserError

EDGE, WRONG_EDGE, SIZE = 24, 16, 48


def two_region_image() -> np.ndarray:
    """Dark left of column EDGE, bright right of it."""
    image = np.full((SIZE, SIZE, 3), 30, np.uint8)
    image[:, EDGE:] = 220
    return image


def coarse_probabilities() -> np.ndarray:
    """A blurry prediction whose class boundary sits at WRONG_EDGE, 8 pixels off the image edge."""
    columns = np.arange(SIZE, dtype=np.float32)
    p1 = 1.0 / (1.0 + np.exp(-(columns - WRONG_EDGE) / 6.0))  # soft ramp: unsure near the boundary
    p1 = np.broadcast_to(p1, (SIZE, SIZE))
    return np.stack([1.0 - p1, p1]).astype(np.float32)


def edge_agreement(labels: np.ndarray) -> float:
    truth = (np.arange(SIZE) >= EDGE)[None, :].repeat(SIZE, 0)
    return float((labels.astype(bool) == truth).mean())


def test_crf_moves_labels_toward_the_image_edge():
    pytest.importorskip("pydensecrf.densecrf")
    probabilities = coarse_probabilities()
    before = probabilities.argmax(0)
    after = dense_crf(probabilities, two_region_image(), CRFParams())
    assert after.shape == (SIZE, SIZE) and set(np.unique(after)) <= {0, 1}
    assert edge_agreement(before) < 0.9  # the ramp puts the argmax boundary 7 columns off
    assert edge_agreement(after) > 0.95  # the boundary now follows the image edge


def test_refiner_upsamples_logits_to_the_original_size():
    pytest.importorskip("pydensecrf.densecrf")
    logits = torch.zeros(3, 4, 4)
    logits[0, :, :2], logits[2, :, 2:] = 4.0, 4.0  # left half "other", right half class 2
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 16:] = 255
    refiner = CRFRefiner(CRFParams(iterations=3), timeout_s=60)
    try:
        labels = refiner(logits, image, (40, 50), max_res=1000)
    finally:
        refiner.close()
    assert labels.shape == (40, 50)
    assert (labels[:, -10:] == 2).all() and (labels[:, :10] == 0).all()


def test_missing_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # import fails as when not installed
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(UserError, match=r"\.\[crf\]"):
        require_pydensecrf()
