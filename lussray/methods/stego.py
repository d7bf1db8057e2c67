"""STEGO [0]: correspondence distillation from frozen features, and the probes STEGO and HP share.

The loss of section 3 of [0] (``modules.ContrastiveCorrelationLoss`` in the reference): for a pair
of images (x, y), ``F_{hwij} = cos(f_x[h, w], f_y[i, j])`` is the correlation of the frozen
features and ``S_{hwij} = cos(s_x[h, w], s_y[i, j])`` that of the codes (eq. (1)), and

    L_corr(x, y, b) = - sum_{hwij} (F_{hwij} - b) max(S_{hwij}, 0)          (eq. (3))

averaged over the entries. It is evaluated on ``feature_samples`` x ``feature_samples`` random
points per image (bilinear ``grid_sample``, border padding, ``align_corners=True``) for three pair
types with their own shift b and weight (eq. (4)):

- ``pos_intra``: the image with itself, at the same points;
- ``pos_inter``: the image and one of its KNN images (the ``lussray knn`` stage picks them);
- ``neg_inter``: the image and a random other image of the batch, ``neg_samples`` times.

Options as the reference: ``pointwise`` centres F over the second image's points (dims i, j) and
adds the global mean back ("0-clamp"/"pointwise" of seed-methods.md 2.3); ``zero_clamp`` clamps S
at 0 (else at -9999, i.e. not at all); ``stabilize`` also clamps S at 0.8. F is computed without
gradient (the featurizer is frozen).

``center_features`` (not in the reference; off by default) subtracts the batch's mean feature
vector from every feature before F. The shifts b were tuned on DINO ViT features, whose cosines
spread around 0; a ResNet's c4 features come after a ReLU, so every cosine is positive. On the
generated scenes, PASS stage 1's ResNet-18 gives random-image pairs a mean F of 0.48, above the
0.46 meant to push them apart, so every term attracts and the codes collapse (the cluster probe
scored 3.2 mIoU); centred, the mean of random pairs is 0.04 and that of self pairs 0.48.

The probes (section 4 of [0]) see detached codes, so they never train the head:

- cluster probe: ``-mean_pixels max_k cos(s, c_k)``, an online spherical k-means by gradient
  (``ClusterLookup`` with ``alpha=None``);
- linear probe: cross-entropy of the bilinearly upsampled logits on the labelled pixels (it uses
  ground truth; report it as such).

Deviations from the reference code:

- Negative partners come from :func:`derangement`, a permutation without fixed points. The
  reference's ``super_perm`` adds 1 to fixed points modulo B, which can send two images to the
  same partner; with B = 1 both return the image itself.
- The reference transposes the random coordinates for ``grid_sample`` (``permute(0, 2, 1, 3)``);
  the points are uniform, so lussray samples at them untransposed (same distribution).
- A batch without a labelled pixel gives a linear loss of 0 (the reference's mean over an empty
  set is NaN).

References:
    - [0]: STEGO, "Unsupervised Semantic Segmentation by Distilling Feature Correspondences",
      ICLR 2022.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lussray.models.stego_head import STEGOHeads


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def tensor_correlation(a: Tensor, b: Tensor) -> Tensor:
    """``out[n, h, w, i, j] = sum_c a[n, c, h, w] b[n, c, i, j]`` (eq. (1) of [0] for unit vectors).

    Args:
        a: (B, C, H1, W1).
        b: (B, C, H2, W2).

    Returns:
        (B, H1, W1, H2, W2).
    """
    return torch.einsum("nchw,ncij->nhwij", a, b)


def sample_coordinates(batch: int, samples: int, *, device: torch.device | str = "cpu",
                       generator: torch.Generator | None = None) -> Tensor:
    """Uniform random ``grid_sample`` coordinates in [-1, 1], (B, S, S, 2)."""
    return torch.rand(batch, samples, samples, 2, device=device, generator=generator) * 2 - 1


def sample_at(maps: Tensor, coords: Tensor) -> Tensor:
    """Bilinear samples of ``maps`` (B, C, H, W) at ``coords`` (B, S, S, 2): (B, C, S, S).

    Border padding and ``align_corners=True``, as the reference.
    """
    return F.grid_sample(maps, coords.to(maps.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def derangement(size: int, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
    """A random permutation of ``range(size)`` without fixed points (identity when ``size == 1``).

    A uniform permutation is drawn; its fixed points are then rotated among themselves, and a
    single fixed point is swapped with a random other position.

    Args:
        size: Batch size B >= 1.
        device: Device of the result.
        generator: Random source.

    Returns:
        (B,) int64.
    """
    perm = torch.randperm(size, generator=generator)
    if size > 1:
        fixed = torch.nonzero(perm == torch.arange(size)).flatten()
        if len(fixed) > 1:
            perm[fixed] = perm[fixed.roll(1)]
        elif len(fixed) == 1:
            i = int(fixed[0])
            j = int(torch.randint(size - 1, (1,), generator=generator))
            j += int(j >= i)
            perm[i], perm[j] = perm[j].clone(), perm[i].clone()
    return perm.to(device)


def correlation_loss(
    feats1: Tensor,
    feats2: Tensor,
    code1: Tensor,
    code2: Tensor,
    shift: float,
    *,
    pointwise: bool = True,
    zero_clamp: bool = True,
    stabilize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Eq. (3) of [0] per entry, for sampled features and codes of two images.

    Args:
        feats1: Frozen features of the first images at their points, (B, C, S, S).
        feats2: Frozen features of the partner images at theirs, (B, C, S, S).
        code1: Codes at the same points as ``feats1``, (B, D, S, S).
        code2: Codes at the same points as ``feats2``, (B, D, S, S).
        shift: b.
        pointwise: Centre F over the partner's points and add the global mean back.
        zero_clamp: Clamp S at 0 from below (else -9999).
        stabilize: Also clamp S at 0.8 from above.

    Returns:
        ``(loss, S)``: the per-entry loss ``-clamp(S) (F - b)`` and S, both (B, S, S, S, S).
    """
    with torch.no_grad():
        fd = tensor_correlation(F.normalize(feats1, dim=1, eps=1e-10), F.normalize(feats2, dim=1, eps=1e-10))
        if pointwise:
            old_mean = fd.mean()
            fd = fd - fd.mean(dim=(3, 4), keepdim=True)
            fd = fd - fd.mean() + old_mean
    cd = tensor_correlation(F.normalize(code1, dim=1, eps=1e-10), F.normalize(code2, dim=1, eps=1e-10))
    low = 0.0 if zero_clamp else -9999.0
    clamped = cd.clamp(low, 0.8) if stabilize else cd.clamp(min=low)
    return -clamped * (fd - shift), cd


@dataclass(frozen=True)
class CorrespondenceConfig:
    """Shifts b and weights of the three pair types, and the sampling options (seed-methods.md 2.3).

    The defaults are the block active in STEGO's ``train_config.yml`` ("IAROA vit small 1/31/22");
    the ``cocostuff27`` and ``cityscapes27`` method configs pin their own blocks.
    """

    pos_intra_shift: float = 0.18
    pos_inter_shift: float = 0.12
    neg_inter_shift: float = 0.46
    pos_intra_weight: float = 0.67
    pos_inter_weight: float = 0.25
    neg_inter_weight: float = 0.63
    feature_samples: int = 11
    neg_samples: int = 5
    pointwise: bool = True
    zero_clamp: bool = True
    stabilize: bool = False
    center_features: bool = False


def correspondence_loss(
    feats: Tensor,
    feats_pos: Tensor,
    code: Tensor,
    code_pos: Tensor,
    coords1: Tensor,
    coords2: Tensor,
    neg_perms: Sequence[Tensor],
    config: CorrespondenceConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. (4) of [0]: the weighted sum of the self, KNN and random-image terms (deterministic part).

    Args:
        feats: Frozen features of the images, (B, C, h, w).
        feats_pos: Frozen features of their KNN images, (B, C, h, w).
        code: Codes of the images, (B, D, h, w).
        code_pos: Codes of the KNN images, (B, D, h, w).
        coords1: Points on the images, (B, S, S, 2) in [-1, 1].
        coords2: Points on the partner images (KNN and random), (B, S, S, 2).
        neg_perms: One partner permutation of the batch per negative sample, each (B,).
        config: Shifts, weights and options.

    Returns:
        ``(loss, terms)``: the weighted sum and the unweighted means ``loss_self``, ``loss_knn``,
        ``loss_random``.
    """
    options = {"pointwise": config.pointwise, "zero_clamp": config.zero_clamp, "stabilize": config.stabilize}
    if config.center_features:
        mean = feats.detach().mean(dim=(0, 2, 3), keepdim=True)
        feats, feats_pos = feats - mean, feats_pos - mean
    f1, c1 = sample_at(feats, coords1), sample_at(code, coords1)
    intra, _ = correlation_loss(f1, f1, c1, c1, config.pos_intra_shift, **options)
    inter, _ = correlation_loss(f1, sample_at(feats_pos, coords2), c1, sample_at(code_pos, coords2),
                                config.pos_inter_shift, **options)
    negatives = [
        correlation_loss(f1, sample_at(feats[perm], coords2), c1, sample_at(code[perm], coords2),
                         config.neg_inter_shift, **options)[0]
        for perm in neg_perms
    ]
    terms = {"loss_self": intra.mean(), "loss_knn": inter.mean(), "loss_random": torch.cat(negatives).mean()}
    loss = (config.pos_intra_weight * terms["loss_self"] + config.pos_inter_weight * terms["loss_knn"]
            + config.neg_inter_weight * terms["loss_random"])
    return loss, terms


def cluster_probe_loss(cosines: Tensor) -> Tensor:
    """``-mean over pixels of max_k cos(s, c_k)`` (``ClusterLookup`` with one-hot argmax assignments).

    Args:
        cosines: (B, K, h, w) from :class:`~lussray.models.stego_head.ClusterProbe`.

    Returns:
        Scalar.
    """
    return -cosines.max(dim=1).values.mean()


def linear_probe_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the linear probe on the labelled pixels (uses ground truth).

    Args:
        logits: (B, num_classes, h, w); upsampled bilinearly (``align_corners=False``) to the labels.
        labels: (B, H, W) int; pixels outside ``[0, num_classes)`` (ignore, -1, 255) are skipped.

    Returns:
        Scalar; 0 (connected to ``logits``) when no pixel is labelled.
    """
    num_classes = logits.shape[1]
    logits = F.interpolate(logits, labels.shape[-2:], mode="bilinear", align_corners=False)
    flat_logits = logits.permute(0, 2, 3, 1).reshape(-1, num_classes)
    flat_labels = labels.reshape(-1).long()
    valid = (flat_labels >= 0) & (flat_labels < num_classes)
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(flat_logits[valid], flat_labels[valid])


def probe_losses(linear_logits: Tensor, cluster_cosines: Tensor, labels: Tensor | None) -> dict[str, Tensor]:
    """Both probe losses; without labels the linear term is 0 but keeps its parameters in the graph (DDP).

    Args:
        linear_logits: (B, num_classes, h, w) on detached codes.
        cluster_cosines: (B, K, h, w) on detached codes.
        labels: (B, H, W) or None.

    Returns:
        ``{"loss_linear": ..., "loss_cluster": ...}``.
    """
    linear = linear_probe_loss(linear_logits, labels) if labels is not None else linear_logits.sum() * 0.0
    return {"loss_linear": linear, "loss_cluster": cluster_probe_loss(cluster_cosines)}


def param_groups(model: nn.Module, *, head_lr: float = 5e-4, head_weight_decay: float = 0.0,
                 linear_lr: float = 5e-3, cluster_lr: float = 5e-3) -> list[dict]:
    """Parameter groups for one AdamW reproducing the reference's optimisers.

    AdamW with ``weight_decay=0`` is Adam, so one AdamW over these groups equals STEGO's Adam on
    the head (lr 5e-4) and Adam on each probe (5e-3), and HP's AdamW head (5e-4, wd 0.1), Adam
    linear probe (1e-3), cluster probe (5e-3) and projector (5e-4). A loop that overwrites every
    group's ``lr`` with one schedule must scale these instead (``group["initial_lr"]`` holds them).

    Args:
        model: :class:`~lussray.models.stego_head.STEGOHeads` or ``HPHeads``, possibly DDP-wrapped.
        head_lr: Learning rate of the segmentation head (and of HP's projector).
        head_weight_decay: Its weight decay (0 STEGO, 0.1 HP; the projector always 0).
        linear_lr: Learning rate of the linear probe.
        cluster_lr: Learning rate of the cluster probe.

    Returns:
        Groups with ``params``, ``lr``, ``initial_lr``, ``weight_decay`` and ``name``.
    """
    heads = unwrap(model)
    specs = [("head", heads.head, head_lr, head_weight_decay),
             ("linear_probe", heads.linear_probe, linear_lr, 0.0),
             ("cluster_probe", heads.cluster_probe, cluster_lr, 0.0)]
    projector = getattr(heads, "projector", None)
    if projector is not None:
        specs.append(("projector", projector, head_lr, 0.0))
    return [{"params": [p for p in module.parameters() if p.requires_grad], "lr": lr, "initial_lr": lr,
             "weight_decay": wd, "name": name} for name, module, lr, wd in specs]


class STEGOMethod(nn.Module):
    """The STEGO training step on featurizer outputs: correspondence loss plus the probe losses.

    Stateless across steps (nothing to resume beyond the model and optimiser).
    """

    def __init__(self, *, correspondence: CorrespondenceConfig | None = None, correspondence_weight: float = 1.0,
                 feature_dropout: float = 0.1) -> None:
        """Configure the method.

        Args:
            correspondence: Shifts, weights and options (:class:`CorrespondenceConfig`).
            correspondence_weight: Weight of eq. (4) in the total (1.0).
            feature_dropout: Dropout2d on the frozen features the correlation F is computed from
                (the reference's featurizer returns ``dropout(feat)``; 0 disables it).
        """
        super().__init__()
        self.correspondence = correspondence or CorrespondenceConfig()
        self.correspondence_weight = correspondence_weight
        self.feature_dropout = nn.Dropout2d(feature_dropout)

    def before_step(self, model: nn.Module, step: int) -> None:
        """Nothing to do before a STEGO step (hook signature of the shared loop)."""

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Nothing to do after the backward pass (STEGO clips no gradient)."""

    def training_step(
        self,
        model: nn.Module,
        features: Tensor,
        features_pos: Tensor,
        labels: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """One STEGO step.

        Args:
            model: :class:`~lussray.models.stego_head.STEGOHeads`, possibly DDP-wrapped.
            features: Frozen features of the images, (B, C, h, w) (``FeaturizerOutput.features``).
            features_pos: Frozen features of one KNN neighbour of each image, (B, C, h, w).
            labels: (B, H, W) ground truth for the linear probe, or None (linear loss 0).
            generator: Random source of the points and partners (None: the global one).

        Returns:
            ``(loss, logs)``: the total ``correspondence_weight * L_corr + L_linear + L_cluster``
            and float ``loss``, ``loss_corr``, ``loss_self``, ``loss_knn``, ``loss_random``,
            ``loss_linear``, ``loss_cluster``.
        """
        out = model(features, features_pos)
        cfg = self.correspondence
        batch, device = features.shape[0], features.device
        coords1 = sample_coordinates(batch, cfg.feature_samples, generator=generator).to(device)
        coords2 = sample_coordinates(batch, cfg.feature_samples, generator=generator).to(device)
        perms = [derangement(batch, device=device, generator=generator) for _ in range(cfg.neg_samples)]
        corr, terms = correspondence_loss(self.feature_dropout(features), self.feature_dropout(features_pos),
                                          out.code, out.code_pos, coords1, coords2, perms, cfg)
        probes = probe_losses(out.linear_logits, out.cluster_cosines, labels)
        loss = self.correspondence_weight * corr + probes["loss_linear"] + probes["loss_cluster"]
        logged = {"loss": loss, "loss_corr": corr, **terms, **probes}
        values = torch.stack([v.detach().float() for v in logged.values()]).tolist()
        return loss, dict(zip(logged, values))


__all__ = [
    "CorrespondenceConfig",
    "STEGOHeads",
    "STEGOMethod",
    "cluster_probe_loss",
    "correlation_loss",
    "correspondence_loss",
    "derangement",
    "linear_probe_loss",
    "param_groups",
    "probe_losses",
    "sample_at",
    "sample_coordinates",
    "tensor_correlation",
    "unwrap",
]
