"""Dense-CRF refinement of segmentation predictions (``lussray predict --crf``).

A fully connected CRF with Gaussian edge potentials [0] sharpens the coarse (stride-32) predictions
of the segmentation model toward image edges. The unaries are the softmax of the logits bilinearly
upsampled to the image; the pairwise terms and their defaults are those of STEGO's and HP's
``crf.py`` (shared/reference/seed-methods.md, section 2.5): ``MAX_ITER = 10``, an appearance-free
Gaussian kernel (``sxy = 1``, ``compat = 3``) and a bilateral kernel (``sxy = 67``, ``srgb = 3``,
``compat = 4``) on the image in BGR channel order.

The CRF runs on the CPU through ``pydensecrf`` (the ``crf`` extra installs ``pydensecrf2``, which
imports under that name) in a child process, so that one image that hangs (STEGO issue #16) costs at
most ``timeout_s``: it then keeps the plain argmax and is counted. Deviation from the reference
code: images larger than ``max_res^2`` pixels are refined at the size the evaluation rule arg-maxes
them at (height ``max_res``, :func:`lussray.models.segmenter.infer_labels`) and then nearest-resized.

The pixel protocol (``lussray evaluate --protocol pixel``, scene-centric methods) refines K-class
probabilities at the evaluation crop (320 x 320) with the named set :data:`STEGO_HP_CRF` through
:meth:`CRFRefiner.refine_probabilities`, the same child process and timeout. Its values are
STEGO's ``src/crf.py`` constants, which HP's ``utils/seg_utils.py`` repeats unchanged
(seed-methods.md, sections 2.5 and 3.5): ``MAX_ITER = 10``, ``POS_XY_STD = 1``, ``POS_W = 3``,
``Bi_XY_STD = 67``, ``Bi_RGB_STD = 3``, ``Bi_W = 4``, the image fed as uint8 BGR and the unary
``unary_from_softmax`` of the probabilities (STEGO's cluster probe: ``softmax(2 * cos)``, its linear
probe: the softmax of its logits, both bilinearly upsampled to the crop first). They are written
out on their own so that the PASS demo's settings (``predict.crf_*``, :class:`CRFParams`'s
defaults, today the same numbers) can change without moving the reference.

References:
    - [0]: Kraehenbuehl and Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian
      Edge Potentials", NeurIPS 2011.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

import numpy as np

from lussray.errors import UserError

INSTALL_HINT = 'pip install -e ".[crf]" (pydensecrf2; builds from source with g++)'


@dataclass(frozen=True)
class CRFParams:
    """Mean-field iterations and the two kernels' widths and weights (STEGO's defaults)."""

    iterations: int = 10
    pos_xy_std: float = 1.0
    pos_w: float = 3.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0
    bi_w: float = 4.0


# STEGO ``src/crf.py`` = HP ``utils/seg_utils.py`` (seed-methods.md, section 2.5).
STEGO_HP_CRF = CRFParams(iterations=10, pos_xy_std=1.0, pos_w=3.0, bi_xy_std=67.0, bi_rgb_std=3.0, bi_w=4.0)
PARAMETER_SETS: dict[str, CRFParams] = {"stego-hp": STEGO_HP_CRF}


def require_pydensecrf() -> None:
    """Fail early, with the install command, when the ``crf`` extra is missing.

    Raises:
        UserError: if ``pydensecrf`` cannot be imported.
    """
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError as error:
        raise UserError(f"--crf needs the pydensecrf package: {INSTALL_HINT} ({error})") from error


def dense_crf(probabilities: np.ndarray, image: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Mean-field inference of the dense CRF; returns the refined label map.

    Args:
        probabilities: (C, H, W) class probabilities (each pixel sums to 1).
        image: (H, W, 3) uint8 RGB image.
        params: kernel settings.

    Returns:
        (H, W) int64 ids, the argmax of the CRF's marginals.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    num_classes, height, width = probabilities.shape
    if image.shape != (height, width, 3):
        raise ValueError(f"image {image.shape} does not match probabilities {probabilities.shape}")
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probabilities.astype(np.float32))))
    crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w)
    bgr = np.ascontiguousarray(image[:, :, ::-1], dtype=np.uint8)  # the reference feeds BGR
    crf.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std, rgbim=bgr, compat=params.bi_w)
    marginals = np.asarray(crf.inference(params.iterations)).reshape(num_classes, height, width)
    return marginals.argmax(0).astype(np.int64)


class CRFRefiner:
    """The ``refine`` hook of :mod:`lussray.stages.predict` with a dense CRF and a per-image timeout.

    One child process (spawned, so it shares no torch or Ray state) runs the CRFs of this actor; a
    CRF that passes ``timeout_s`` is abandoned with its process, and the image keeps the argmax.

    Attributes:
        timeouts: images whose CRF timed out so far.
    """

    def __init__(self, params: CRFParams, timeout_s: float) -> None:
        """Check that ``pydensecrf`` is there (raises :class:`UserError` otherwise)."""
        require_pydensecrf()
        self.params, self.timeout_s = params, timeout_s
        self.timeouts = 0
        self._pool = None

    def __call__(self, logits, image: np.ndarray, size: tuple[int, int], max_res: int) -> np.ndarray:
        """(K + 1, h, w) logits of one image -> (H, W) ids refined on the image resized to ``size``."""
        import torch
        import torch.nn.functional as F
        from PIL import Image

        from lussray.models.segmenter import infer_labels, resize_nearest

        height, width = int(size[0]), int(size[1])
        target = (max_res, int(max_res * width / height)) if height * width > max_res * max_res else (height, width)
        upsampled = F.interpolate(logits[None].float(), size=target, mode="bilinear", align_corners=False)[0]
        probabilities = torch.softmax(upsampled, 0).cpu().numpy()
        resized = np.asarray(Image.fromarray(image).resize((target[1], target[0]), Image.BILINEAR))
        labels = self._run(probabilities, resized)
        if labels is None:
            return infer_labels(logits, size, max_res).cpu().numpy()
        if target != (height, width):
            labels = resize_nearest(torch.from_numpy(labels), (height, width)).numpy()
        return labels

    def refine_probabilities(self, probabilities: np.ndarray, image: np.ndarray) -> np.ndarray:
        """K-class probabilities of one image at its size -> (H, W) int64 ids (the pixel protocol).

        Args:
            probabilities: (K, H, W) float, each pixel summing to 1 (e.g. a cluster probe's
                ``softmax(2 * cos)`` upsampled to the evaluation crop).
            image: (H, W, 3) uint8 RGB image of the same size.

        Returns:
            The CRF's argmax, or the plain argmax when the CRF passes ``timeout_s`` (counted in
            :attr:`timeouts`).
        """
        probabilities = np.ascontiguousarray(probabilities, dtype=np.float32)
        if probabilities.ndim != 3 or image.shape != probabilities.shape[1:] + (3,):
            shapes = f"probabilities {probabilities.shape}, image {image.shape}"
            raise ValueError(f"{shapes}: expected (K, H, W) and (H, W, 3)")
        labels = self._run(probabilities, np.ascontiguousarray(image, dtype=np.uint8))
        return probabilities.argmax(0).astype(np.int64) if labels is None else labels

    def _run(self, probabilities: np.ndarray, image: np.ndarray) -> np.ndarray | None:
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(1)
        pending = self._pool.apply_async(dense_crf, (probabilities, image, self.params))
        try:
            return pending.get(timeout=self.timeout_s)
        except multiprocessing.TimeoutError:
            self._pool.terminate()
            self._pool = None
            self.timeouts += 1
            print(f"[crf] an image passed the {self.timeout_s:.0f} s timeout: kept without CRF "
                  f"({self.timeouts} so far)", flush=True)
            return None

    def close(self) -> None:
        """Stop the child process."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None
