"""The frozen featurizer a STEGO/HP stage runs: a DINO ViT from a file, or the run's PASS stage-1 ResNet.

    lussray knn --dataset cocostuff27 --data shards/ --run runs/stego --featurizer dino_vitbase8_pretrain.pth
    lussray knn --dataset synthetic-scenes --data shards/ --run runs/stego     # the run's <run>/pretrain ResNet

:func:`resolve` turns ``--featurizer FILE`` (``featurizer.file``) or, without one, the latest
``<run>/pretrain`` checkpoint into a :class:`FeaturizerSpec`: small and picklable, it travels to
the actors and Train workers, which build the module once (:meth:`FeaturizerSpec.build`).

- A DINO file (a release file, or a state dict with a ``teacher`` entry; read with
  ``torch.load(weights_only=True)``): its architecture and patch size come from its shapes
  (:func:`lussray.models.vit.infer_dino_arch`: ViT-S or ViT-B). Its load report (loaded, missing,
  unexpected, shape-mismatched keys) is printed on the driver before any work, and a file that
  leaves a ViT weight missing is refused, naming the keys.
- No file: the PASS stage-1 backbone ``pretrain.arch`` of the run (``lussray run`` trains it first on
  the same data), c4 upsampled to stride 8. A ResNet has no attention: HP's local hidden positives
  use the cosine affinity of its features divided by ``featurizer.affinity_temperature`` instead
  (:class:`lussray.models.vit.ResNetFeaturizer`).

Images reach the featurizer as the references feed DINO: ImageNet mean and std (0.229) normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lussray import storage
from lussray.completion import checkpoint_fingerprint
from lussray.errors import UserError

PRETRAIN_STAGE = "pretrain"
DINO = "dino"
RESNET = "resnet"


@dataclass(frozen=True)
class FeaturizerSpec:
    """What a process needs to build the frozen featurizer.

    Attributes:
        kind: ``dino`` or ``resnet``.
        arch: ``vit_small`` / ``vit_base`` or a ResNet name.
        checkpoint: the weights file.
        patch_size: the ViT's patch size (8 for DINO's ViT-S/8 and ViT-B/8); unused for a ResNet.
        affinity_temperature: ResNet only: divisor of the cosine affinity standing in for attention.
        upsample: ResNet only: c4 upsampling (4: stride 8).
    """

    kind: str
    arch: str
    checkpoint: str
    patch_size: int = 8
    affinity_temperature: float = 0.1
    upsample: int = 4

    @property
    def stride(self) -> int:
        """Input pixels per feature cell (8 for every featurizer of the references)."""
        return self.patch_size if self.kind == DINO else 32 // self.upsample

    def build(self, *, strict: bool = False) -> tuple[Any, Any]:
        """The frozen featurizer (eval mode) and its load report.

        Raises:
            UserError: if the file cannot be read, or with ``strict`` when a weight of the model is
                missing from it (or of another shape).
        """
        from lussray.models.vit import build_featurizer

        kwargs: dict[str, Any] = ({"patch_size": self.patch_size} if self.kind == DINO else
                                  {"affinity_temperature": self.affinity_temperature, "upsample": self.upsample})
        featurizer, report = build_featurizer(self.arch, self.checkpoint, **kwargs)
        if strict and (report.missing or report.mismatched):
            raise UserError(f"featurizer {self.checkpoint} leaves {len(report.missing)} weights of the {self.arch} "
                            f"missing and {len(report.mismatched)} of another shape (first: "
                            f"{(report.missing or report.mismatched)[:3]}): is it a {self.describe()} checkpoint?")
        return featurizer.eval(), report

    def describe(self) -> str:
        """One phrase: ``DINO vit_small/8`` or ``PASS stage-1 resnet18``."""
        return f"DINO {self.arch}/{self.patch_size}" if self.kind == DINO else f"PASS stage-1 {self.arch}"

    def fingerprint(self, run: str | None) -> dict[str, Any]:
        """What the featurizer's outputs depend on (for ``inputs.json``)."""
        out: dict[str, Any] = {"kind": self.kind, "arch": self.arch,
                               "checkpoint": checkpoint_fingerprint(self.checkpoint, run)}
        if self.kind == DINO:
            out["patch_size"] = self.patch_size
        else:
            out.update(affinity_temperature=self.affinity_temperature, upsample=self.upsample)
        return out


def resolve(config: Any, run: str | None, file: str | None = None) -> FeaturizerSpec:
    """The featurizer of a stage: ``file`` (``--featurizer``), else ``featurizer.file``, else the run's stage-1 ResNet.

    Raises:
        UserError: a missing or unreadable file, a ViT that is not DINO's ViT-S or ViT-B, or no
            stage-1 checkpoint under ``<run>/pretrain``.
    """
    from lussray.models.vit import infer_dino_arch, read_dino_state_dict
    from lussray.stages.loop import given_or_latest

    cfg = config.featurizer
    file = file or cfg.file
    if file:
        path = storage.absolute(file)
        if not storage.exists(path):
            raise UserError(f"--featurizer {file}: no such file")
        state, _ = read_dino_state_dict(path)
        arch, patch = infer_dino_arch(state, path)
        return FeaturizerSpec(DINO, arch, path, patch_size=patch)
    checkpoint = given_or_latest(None, "--featurizer", run, PRETRAIN_STAGE, "stage-1",
                                 "lussray train (or pass --featurizer FILE, a DINO checkpoint)")
    return FeaturizerSpec(RESNET, config.pretrain.arch, checkpoint, affinity_temperature=cfg.affinity_temperature,
                          upsample=cfg.resnet_upsample)


def check(spec: FeaturizerSpec, stage: str) -> int:
    """Build the featurizer once on the driver and print its load report; refuse missing weights early.

    Returns:
        The featurizer's channels C (the heads' input width).
    """
    featurizer, report = spec.build(strict=True)
    print(f"[{stage}] featurizer {spec.describe()}: {report.summary()}", flush=True)
    if report.unexpected:
        print(f"[{stage}] featurizer: {len(report.unexpected)} keys of the file are not used: "
              f"{', '.join(report.unexpected[:5])}", flush=True)
    return int(featurizer.num_features)


def to_input(images: Any, device: Any) -> Any:
    """uint8 (B, h, w, 3) numpy or tensor -> normalised float (B, 3, h, w) on ``device`` (ImageNet statistics)."""
    import numpy as np
    import torch

    from lussray.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from lussray.stages.pretrain import normalize_views

    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    return normalize_views(images.to(device), IMAGENET_MEAN, IMAGENET_STD)


__all__ = ["FeaturizerSpec", "check", "resolve", "to_input"]
