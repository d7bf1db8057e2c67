"""Predictions of STEGO/HP heads (and their baselines) over a split, scored with the pixel protocol.

    (called by ``lussray run --method stego|hp``; writes <run>/predict/<method>/<split>-<probe>[-crf]/)

Through the predict pool (:func:`lussray.stages.predict.predict_split`, one predictor per actor):
each evaluation image (shorter side ``ingest.eval_short_side``, central ``dataset.eval_crop_size``
crop, as the references' 320 / 320) goes through the frozen featurizer and the trained head; then

- ``cluster``: the cluster probe's ``log_softmax(alpha * cos)`` (alpha = ``<method>.cluster_alpha``, 2),
  upsampled bilinearly to the label resolution, argmax: cluster ids 0..K-1, matched to the classes
  by one Hungarian matching over the split (the fully unsupervised row);
- ``linear``: the linear probe's logits, same path, scored with the identity matching. The linear
  probe is trained on ground truth: its row is marked "uses labels" and is never a baseline.

Options: flip TTA (``<method>.flip_tta``: the code is the mean of the image's and its mirror
image's, as STEGO's evaluation) and the dense CRF (``--crf``: the probabilities refined by
:meth:`lussray.crf.CRFRefiner.refine_probabilities` with the ``predict.crf_*`` settings, in its
child process with a timeout) before the argmax.

The checkpoint records what to build (``config["heads"]``: the heads' kind and shape and the
featurizer), so a prediction needs nothing but the checkpoint. ``<out>/inputs.json`` records the
inputs; ``<out>/summary.json`` (written last) the metrics: ``mIoU``, ``Acc``, per-class IoU, the
matching, the confusion matrix.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable

import numpy as np

from lussray import storage
from lussray.config import LussConfig
from lussray.errors import UserError
from lussray.stages.predict import predict_scene, score_pixels  # the pixel protocol's shared prediction stage

STAGE = "predict"
PROBES = ("cluster", "linear")
HEADS_KEY = "heads"  # the checkpoint's config entry describing the model


def read_heads_record(checkpoint: str) -> dict[str, Any]:
    """The ``config["heads"]`` record of a STEGO/HP checkpoint (kind, shape, featurizer).

    Raises:
        UserError: if the file is unreadable or holds no such record.
    """
    import torch

    try:
        state = torch.load(io.BytesIO(storage.read_bytes(checkpoint)), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several kinds
        raise UserError(f"cannot read checkpoint {checkpoint}: {error}") from None
    record = state.get("config", {}).get(HEADS_KEY) if isinstance(state, dict) else None
    if not isinstance(record, dict):
        raise UserError(f"{checkpoint} is not a STEGO/HP checkpoint (no config['{HEADS_KEY}'] record)")
    return {**record, "state": state["model"]}


def build_heads(record: dict[str, Any]):
    """The trained heads of a :func:`read_heads_record`, in eval mode (HP's EMA head and projector are dropped)."""
    from lussray.models.stego_head import STEGOHeads

    model = STEGOHeads(**record["shape"])
    own = model.state_dict()
    missing = [key for key in own if key not in record["state"]]
    if missing:
        raise UserError(f"the checkpoint lacks {len(missing)} weights of the heads (first: {missing[:3]})")
    model.load_state_dict({key: record["state"][key] for key in own})
    return model.eval()


class ScenePredictor:
    """A :class:`lussray.stages.predict.Predictor` of scene data: class scores per pixel, then (CRF and) argmax.

    Subclasses give :meth:`scores` from the featurizer's features; this class does the featurizer,
    the flip TTA, the upsampling to the label size and the refinement.
    """

    def __init__(self, featurizer: dict[str, Any], *, flip: bool = False, torch_threads: int = 0,
                 refine_fn: Callable[..., np.ndarray] | None = None) -> None:
        from lussray.stages.featurizer import FeaturizerSpec
        from lussray.stages.predict import torch_device

        self.device = torch_device(torch_threads)
        self.featurizer = FeaturizerSpec(**featurizer).build()[0].to(self.device)
        self.flip, self.refine = flip, refine_fn

    def codes(self, features):
        """What :meth:`scores` is computed from and the flip TTA averages (the features themselves here)."""
        return features

    def scores(self, codes):
        """(B, K, h, w) log-probabilities of the clusters (or classes)."""
        raise NotImplementedError

    def _codes(self, images: np.ndarray):
        import torch

        from lussray.stages.featurizer import to_input

        x = to_input(images, self.device)
        codes = self.codes(self.featurizer(x, attention=False).features.float())
        if self.flip:  # STEGO's TTA: the mean of the codes of the image and of its mirror image
            mirrored = self.codes(self.featurizer(torch.flip(x, dims=[3]), attention=False).features.float())
            codes = (codes + torch.flip(mirrored, dims=[3])) / 2
        return codes

    def predict(self, images, sizes, labels) -> list[np.ndarray]:
        import torch
        import torch.nn.functional as F

        from lussray.stages.predict import group_by_shape

        out: list[np.ndarray] = [np.zeros(0)] * len(images)
        for indices in group_by_shape(images).values():
            batch = np.stack([images[i] for i in indices])
            with torch.inference_mode():
                scores = self.scores(self._codes(batch))
                for row, i in enumerate(indices):
                    size = tuple(int(v) for v in sizes[i])
                    log_probs = F.interpolate(scores[row : row + 1].float(), size=size, mode="bilinear",
                                              align_corners=False)[0]
                    out[i] = self._labels(log_probs, images[i], size)
        return out

    def _labels(self, log_probs, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if self.refine is None:
            return log_probs.argmax(0).cpu().numpy().astype(np.int64)
        if image.shape[:2] != size:
            from PIL import Image

            image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
        return self.refine(log_probs.softmax(0).cpu().numpy(), image)


class ProbePredictor(ScenePredictor):
    """A STEGO/HP checkpoint's cluster probe (``log_softmax(alpha cos)``) or linear probe per pixel."""

    def __init__(self, checkpoint: str, probe: str = "cluster", alpha: float = 2.0, **kwargs: Any) -> None:
        record = read_heads_record(checkpoint)
        super().__init__(record["featurizer"], **kwargs)
        self.heads = build_heads(record).to(self.device)
        self.probe, self.alpha = probe, alpha

    def codes(self, features):
        return self.heads.head(features)

    def scores(self, codes):
        import torch.nn.functional as F

        if self.probe == "linear":
            return F.log_softmax(self.heads.linear_probe(codes), dim=1)
        return self.heads.cluster_probe.log_probs(self.heads.cluster_probe(codes), self.alpha)


def crf_refine(config: LussConfig) -> Callable[..., np.ndarray]:
    """The dense-CRF refinement of K-class probabilities with the ``predict.crf_*`` settings (UserError without it)."""
    from lussray.stages.predict import crf_refiner

    return crf_refiner(config).refine_probabilities


def predict_probe(config: LussConfig, data: str, run: str, checkpoint: str, *, section: Any, probe: str = "cluster",
                  crf: bool = False, out: str | None = None, split: str = "validation",
                  overwrite: bool = False) -> dict[str, Any]:
    """A STEGO/HP checkpoint's ``cluster`` or ``linear`` probe over ``split``, scored with the pixel protocol.

    Args:
        section: the method's config section (``flip_tta``, ``cluster_alpha``).
        out: the folder (default ``<run>/predict/<kind>/<split>-<probe>[-crf]``, kind ``stego``, ``hp``, ...).

    Returns:
        The summary; its metrics say ``"uses_labels": true`` for the linear probe.
    """
    from lussray.data.ingest import init_ray

    if probe not in PROBES:
        raise UserError(f"probe {probe!r} is not one of {', '.join(PROBES)}")
    record = read_heads_record(checkpoint)
    shape = record["shape"]
    num_clusters = shape["num_classes"] + (shape["extra_clusters"] if probe == "cluster" else 0)
    refine_fn = crf_refine(config) if crf else None
    out = out or storage.join(run, STAGE, record["kind"], f"{split}-{probe}{'-crf' if crf else ''}")
    kwargs = {"checkpoint": checkpoint, "probe": probe, "alpha": section.cluster_alpha, "flip": section.flip_tta,
              "torch_threads": config.predict.torch_threads, "refine_fn": refine_fn}
    inputs = {"probe": probe, "flip_tta": section.flip_tta, "alpha": section.cluster_alpha,
              "crf": dataclasses.asdict(refine_fn.__self__.params) if refine_fn is not None else None}
    init_ray(config.ray)
    summary = predict_scene(config, data, run, out, ProbePredictor, kwargs, checkpoint=checkpoint,
                            num_clusters=num_clusters, match="hungarian" if probe == "cluster" else "identity",
                            inputs=inputs, split=split, overwrite=overwrite)
    if probe == "linear" and "metrics" in summary:
        summary["metrics"]["uses_labels"] = True
    return summary


__all__ = ["PROBES", "ProbePredictor", "ScenePredictor", "build_heads", "predict_probe", "predict_scene",
           "read_heads_record", "score_pixels"]
