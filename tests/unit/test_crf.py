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


def test_pixel_protocol_parameter_set_has_the_stego_hp_values():
    from lussray.crf import PARAMETER_SETS, STEGO_HP_CRF

    # STEGO src/crf.py = HP utils/seg_utils.py: MAX_ITER, POS_XY_STD, POS_W, Bi_XY_STD, Bi_RGB_STD, Bi_W.
    assert (STEGO_HP_CRF.iterations, STEGO_HP_CRF.pos_xy_std, STEGO_HP_CRF.pos_w) == (10, 1, 3)
    assert (STEGO_HP_CRF.bi_xy_std, STEGO_HP_CRF.bi_rgb_std, STEGO_HP_CRF.bi_w) == (67, 3, 4)
    assert PARAMETER_SETS["stego-hp"] is STEGO_HP_CRF


def k_class_scene(num_classes: int = 5, size: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertical bands of K colours, and noisy probabilities that favour the right band's class."""
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(size) * num_classes // size, size).reshape(size, size).T  # band per column
    colours = rng.integers(0, 256, (num_classes, 3)).astype(np.uint8)
    logits = rng.normal(0.0, 1.0, (num_classes, size, size)).astype(np.float32)
    logits[truth, np.arange(size)[:, None], np.arange(size)[None, :]] += 1.0
    probabilities = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    return probabilities, colours[truth], truth


def test_refiner_runs_on_k_class_probabilities():
    pytest.importorskip("pydensecrf.densecrf")
    from lussray.crf import STEGO_HP_CRF

    probabilities, image, truth = k_class_scene()
    refiner = CRFRefiner(STEGO_HP_CRF, timeout_s=60)
    try:
        labels = refiner.refine_probabilities(probabilities, image)
    finally:
        refiner.close()
    assert labels.shape == truth.shape and labels.dtype == np.int64
    assert set(np.unique(labels)) <= set(range(5)) and refiner.timeouts == 0
    # The noisy argmax is often wrong; the CRF follows the colour bands.
    assert (probabilities.argmax(0) == truth).mean() < 0.8
    assert (labels == truth).mean() > 0.95


def test_refiner_keeps_the_argmax_after_a_timeout():
    pytest.importorskip("pydensecrf.densecrf")
    probabilities, image, _ = k_class_scene()
    # A 1 ms budget cannot cover spawning the child and importing pydensecrf, so the CRF times out.
    refiner = CRFRefiner(CRFParams(), timeout_s=0.001)
    try:
        labels = refiner.refine_probabilities(probabilities, image)
    finally:
        refiner.close()
    assert refiner.timeouts == 1
    assert (labels == probabilities.argmax(0)).all()
