"""The PASS segmentation model (backbone + 1x1 head), its training loss and its inference rule.

Implements the fine-tuning network of [0] (section 3.4 there; shared/reference/pass-imagenet-s.md,
section 2.4, ``main_pixel_finetuning.py`` and ``inference.py``):

- :class:`Segmenter`: the stage-1 ResNet plus ``Conv2d(C, K + 1, 1)`` (with bias) on the last
  stage; no decoder, no dilation, output stride 32. Channel 0 is "other".
- :func:`segmentation_loss`: plain cross-entropy on labels nearest-downsampled by 0.5, with the
  logits bilinearly upsampled to that size (224 crops: 7x7 logits, 112x112 labels). Pseudo labels
  use no ignore index (class 0 is a trained class); ground truth ignores 1000.
- :func:`infer_labels`: the reference's inference rule. The logits of the ``Resize(256)`` image are
  bilinearly upsampled to the original H x W and the argmax taken. If H * W > max_res^2 they are
  upsampled to (max_res, int(max_res * W / H)) instead, arg-maxed, and the ids nearest-resized to
  H x W (the reference always fixes the height, even for landscape images).

Deviations from the reference code, all without effect on the result:

- The upsample-then-argmax runs over bands of output rows (:func:`upsample_argmax`), so the full
  (K + 1) x H x W float map is never held (for 919 classes and a 1000 x 3000 image that is 11 GB);
  each band is computed with the arithmetic of ``F.interpolate(mode="bilinear",
  align_corners=False)``.
- ``align_corners=False`` everywhere (PyTorch's default, which the reference relies on).

References:
    - [0]: PASS / ImageNet-S, "Large-scale Unsupervised Semantic Segmentation", TPAMI 2022,
      arXiv:2106.03149.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lussray.models.backbone import ResNetBackbone
from lussray.models.heads import SegmentationHead

#: Labels are downsampled by this factor before the loss (224 crops -> 112 x 112 targets).
LABEL_SCALE = 0.5

#: The reference's ``--max_res``: larger images are predicted at height ``max_res`` first.
MAX_RES = 1000

#: Output pixels per band of :func:`upsample_argmax` (bounds memory at ~4 bytes x C x this).
BAND_PIXELS = 1 << 18


class Segmenter(nn.Module):
    """ResNet backbone plus a 1x1 classifier on its last stage (output stride 32).

    Attribute names are those :mod:`lussray.models.checkpoints` maps (``backbone``,
    ``segmentation_head``), so a stage-1 checkpoint (lussray, torchvision, PASS or SwAV) loads
    into the backbone and a PASS fine-tuning checkpoint (``last_layer.*``) into the head.

    Attributes:
        arch: The backbone architecture.
        num_outputs: Channels of the logits: K + 1 (channel 0 is "other").
    """

    def __init__(self, arch: str = "resnet50", num_outputs: int = 51) -> None:
        """Build the model with random weights.

        Args:
            arch: A :data:`lussray.models.backbone.ARCHS` name.
            num_outputs: K + 1 for K generated (or ground-truth) categories; at least 2.

        Raises:
            ValueError: If ``num_outputs < 2`` or ``arch`` is unknown.
        """
        super().__init__()
        if num_outputs < 2:
            raise ValueError(f"num_outputs must be >= 2 (other + at least one category), got {num_outputs}")
        self.arch = arch
        self.num_outputs = num_outputs
        self.backbone = ResNetBackbone(arch)
        self.segmentation_head = SegmentationHead(self.backbone.out_channels, num_outputs - 1)

    def features(self, x: Tensor) -> Tensor:
        """The last-stage features c4, (B, C, H/32, W/32), for normalised images (B, 3, H, W)."""
        return self.backbone(x)["c4"]

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, K + 1, H/32, W/32) of normalised images (B, 3, H, W)."""
        return self.segmentation_head(self.features(x))


def segmentation_loss(
    logits: Tensor, labels: Tensor, *, ignore_index: int | None = None, label_scale: float = LABEL_SCALE
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the fine-tuning stage (section 2.4 of the reference notes).

    Args:
        logits: (B, K + 1, h, w) raw scores.
        labels: (B, S, S) integer ids 0..K (and ``ignore_index``).
        ignore_index: A label id that contributes nothing (1000 for ground truth); None for pseudo
            labels, where every pixel counts (the reference's plain ``nn.CrossEntropyLoss()``).
        label_scale: Labels are nearest-resized by this factor and the logits bilinearly
            upsampled to the same size.

    Returns:
        ``(loss, accuracy)``: the mean cross-entropy over the counted pixels and the fraction of
        counted pixels whose argmax is right (a detached scalar, for the metrics log).

    Raises:
        ValueError: If the shapes do not fit.
    """
    if logits.ndim != 4 or labels.ndim != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (B, C, h, w) and labels (B, S, S), got {tuple(logits.shape)}, "
                         f"{tuple(labels.shape)}")
    # Nearest resize of integer ids through float is exact for every id below 2^24.
    target = F.interpolate(labels[:, None].float(), scale_factor=label_scale, mode="nearest")[:, 0].long()
    upsampled = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    ignore = -100 if ignore_index is None else ignore_index
    loss = F.cross_entropy(upsampled, target, ignore_index=ignore)
    with torch.no_grad():
        counted = target != ignore
        hits = (upsampled.argmax(1) == target) & counted
        accuracy = hits.sum().float() / counted.sum().clamp(min=1).float()
    return loss, accuracy


def _source_index(out_size: int, in_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear taps of ``F.interpolate(align_corners=False)`` along one axis.

    Returns:
        ``(i0, i1, lam)``: for every output position the two input indices and the weight of i1.
    """
    scale = in_size / out_size
    src = ((torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0, i1, src - i0.float()


def upsample_argmax(logits: Tensor, size: tuple[int, int], *, band_pixels: int = BAND_PIXELS) -> Tensor:
    """``F.interpolate(logits, size, mode="bilinear").argmax(0)`` without the full upsampled map.

    Args:
        logits: (C, h, w) scores.
        size: Output (H, W).
        band_pixels: Output pixels computed at once (memory ~ 4 x C x band_pixels bytes).

    Returns:
        (H, W) int64 ids.
    """
    _, h, w = logits.shape
    height, width = int(size[0]), int(size[1])
    logits = logits.float()
    y0, y1, ly = _source_index(height, h, logits.device)
    x0, x1, lx = _source_index(width, w, logits.device)
    # Horizontal pass on the h input rows once: (C, h, W), small (h is H/32 of the network input).
    rows = logits[:, :, x0] * (1 - lx) + logits[:, :, x1] * lx
    band = max(1, band_pixels // max(width, 1))
    out = torch.empty((height, width), dtype=torch.long, device=logits.device)
    for start in range(0, height, band):
        stop = min(start + band, height)
        wy = ly[start:stop, None]
        values = rows[:, y0[start:stop]] * (1 - wy) + rows[:, y1[start:stop]] * wy  # (C, band, W)
        out[start:stop] = values.argmax(0)
    return out


def resize_nearest(label: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resize of an (h, w) id map, as ``F.interpolate(mode="nearest")`` (index floor(i * in/out))."""
    h, w = label.shape
    rows = (torch.arange(int(size[0]), device=label.device) * (h / int(size[0]))).long().clamp(max=h - 1)
    cols = (torch.arange(int(size[1]), device=label.device) * (w / int(size[1]))).long().clamp(max=w - 1)
    return label[rows[:, None], cols[None, :]]


def infer_labels(logits: Tensor, size: tuple[int, int], max_res: int = MAX_RES, *,
                 band_pixels: int = BAND_PIXELS) -> Tensor:
    """The reference's inference rule (``inference.py``): logits to ids at the original size.

    Args:
        logits: (K + 1, h, w) scores of one image (any resolution).
        size: The original (H, W).
        max_res: Images with H * W > max_res^2 are arg-maxed at (max_res, int(max_res * W / H))
            and then nearest-resized to (H, W).
        band_pixels: See :func:`upsample_argmax`.

    Returns:
        (H, W) int64 ids, 0 = other.
    """
    height, width = int(size[0]), int(size[1])
    if height * width > max_res * max_res:
        low = upsample_argmax(logits, (max_res, int(max_res * width / height)), band_pixels=band_pixels)
        return resize_nearest(low, (height, width))
    return upsample_argmax(logits, (height, width), band_pixels=band_pixels)


__all__ = ["LABEL_SCALE", "MAX_RES", "Segmenter", "infer_labels", "resize_nearest", "segmentation_loss",
           "upsample_argmax"]
