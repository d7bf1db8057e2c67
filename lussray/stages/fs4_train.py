"""FS^4 training on Ray: PiCIE's pixel clustering on the selected pyramid views, plus the global guidance loss.

    lussray fs4 train --dataset synthetic-scenes --data DATA --run RUN [--init FILE|random] [--max-steps N]
    lussray predict --method fs4 --dataset synthetic-scenes --data DATA --run RUN --split validation [--crf]

Sec. 4 of FS^4 [0] on the shared Ray Train loop (:mod:`lussray.stages.loop`), into ``<run>/fs4``:

- data: the views that ``lussray fs4 labels`` kept (``<run>/fs4-labels``, split ``train``), each
  "treated as an independent image" (Sec. 4.2.1), streamed with
  :func:`lussray.data.fs4_views.fs4_batch`: PiCIE's two views of every selected view and its
  global pseudo label;
- network: :class:`~lussray.models.fs4_network.FS4Network`, PiCIE's PanopticFPN (backbone from the
  same self-supervised start as the labels, ``--init``) refined by the CAE module (``fs4.cae``,
  Sec. 4.3) and the CAM head (``fs4.cam_head``: modified, the default, or classical; Sec. 4.2.2);
- loss: L = L_w + L_p (Eq. 5). L_p is PiCIE's within- and cross-view loss (Eqs. 1-4,
  :func:`lussray.methods.picie.picie_multihead_loss`, which is the reference's ``L_p / 4``;
  ``fs4.pixel_weight`` = 4 restores the paper's scale); L_w is the cross-entropy of the CAM
  scores of both views to the view's global label (Eq. 6, :func:`lussray.methods.fs4.fs4_loss`),
  weighted by ``fs4.global_weight`` (1 in the paper; 0 trains PiCIE + CAE on the views);
- two separate cluster pools: the M global clusters of the pseudo labels (``fs4.labels.num_clusters``,
  the CAM head's outputs) and PiCIE's K pixel clusters (``picie.num_clusters``), re-clustered every
  epoch over the Train workers exactly as PiCIE (:meth:`PiCIEMethod.before_epoch`);
- Adam at ``fs4.loop`` (the supplement: lr 1e-3, no weight decay, batch 128, 10 epochs); checkpoints
  and resume as PiCIE's (model, Adam, step, the epoch's centroids and every worker's labels).

The network of a checkpoint is recorded in ``config["picie_model"]`` with an ``fs4`` entry, so
``lussray picie cluster``'s final k-means and PiCIE's prediction (nearest centroid per pixel, ``--crf``
with the dense CRF on ``softmax(picie.crf_alpha * cosine)``) work on it unchanged
(``stage="fs4"``: ``<run>/fs4-clusters``, ``<run>/predict``).

References:
    - [0]: FS^4, "Fully Self-Supervised Learning for Semantic Segmentation", 2022, arXiv:2202.11981.
    - [1]: PiCIE, CVPR 2021, arXiv:2103.17070.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lussray import storage
from lussray.completion import FORMAT_VERSION, checkpoint_fingerprint, config_fingerprint, data_fingerprint
from lussray.config import FS4Config, LussConfig, PiCIEConfig
from lussray.data.augment import IMAGENET_MEAN, IMAGENET_STD
from lussray.data.shards import read_manifest
from lussray.errors import UserError
from lussray.methods import picie as picie_blocks
from lussray.methods.fs4 import fs4_loss
from lussray.seeds import derived_seed
from lussray.stages import picie
from lussray.stages.loop import STREAM_KEYS, LoopSpec, StepState, steps_per_epoch

STAGE = "fs4"
LABELS_STAGE = "fs4-labels"
LABELS_SPLIT = "train"
#: The ``picie`` keys FS^4 training reads (its pixel clustering); the rest of ``picie`` is PiCIE's own stage.
PICIE_KEYS = ("num_clusters", "overcluster_k", "fpn_width", "spherical", "balance", "mse", "kmeans_iterations",
              "kmeans_init", "kmeans_images", "kmeans_pixels_per_image", "schedule",
              "jitter", "jitter_p", "grayscale_p", "blur_p")


@dataclass
class FS4Method(picie.PiCIEMethod):
    """FS^4's hooks: PiCIE's network, clustering and checkpointed state, plus the CAE, the CAM head and L_w.

    Attributes (besides :class:`~lussray.stages.picie.PiCIEMethod`'s):
        num_global_clusters: M, the global clusters of the pseudo labels (the CAM head's outputs).
        cam_head: ``modified`` or ``classical``.
        cam_hidden_channels: Width of the modified head's g2 (None: the FPN width).
        cae: Refine the features with the CAE module.
        cae_chunk_bytes: Memory budget of one chunk of the CAE relation map.
        global_weight: Weight of L_w.
        pixel_weight: Weight of PiCIE's loss (4: the paper's L_p).
    """

    num_global_clusters: int = 50
    cam_head: str = "modified"
    cam_hidden_channels: int | None = None
    cae: bool = True
    cae_chunk_bytes: int = 64 * 2**20
    global_weight: float = 1.0
    pixel_weight: float = picie_blocks.PAPER_LOSS_FACTOR

    def network_kwargs(self) -> dict[str, Any]:
        """The :func:`~lussray.models.fs4_network.build_fs4_network` arguments (the checkpoint's ``fs4`` record)."""
        return {"num_global_clusters": self.num_global_clusters, "cam_head": self.cam_head,
                "cam_hidden_channels": self.cam_hidden_channels, "cae": self.cae,
                "cae_chunk_bytes": self.cae_chunk_bytes}

    def build_network(self) -> nn.Module:
        """PiCIE's seeded PanopticFPN wrapped with the CAE module and the CAM head (seeded too)."""
        from lussray.models.fs4_network import build_fs4_network

        fpn = super().build_network()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, self.stage, "fs4-heads"))
            return build_fs4_network(fpn, **self.network_kwargs())

    def embed(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """z1 = F(G(P1 x)) and z2 = G(F(P2 x)) of every selected view (PiCIE's clustering passes use these)."""
        first, second = model(self._inputs(batch)).chunk(2)
        return first, self._crop(second, batch, first.shape[-1])

    def training_step(self, model, batch, state: StepState):
        # One forward of both views: the features for L_p and the CAM scores for L_w.
        features, scores = model(self._inputs(batch), with_scores=True)
        first, second = features.chunk(2)
        z2 = self._crop(second, batch, first.shape[-1])
        clusters = self._state.clusters
        labels = clusters.lookup(batch["__key__"]).to(first.device)
        pixel, parts = picie_blocks.picie_multihead_loss(first, z2, clusters.targets(labels),
                                                         spherical=self.spherical, mse=self.mse)
        # Both views carry the selected view's global label (Eq. 6 on each).
        losses = fs4_loss(scores, batch["global_label"].to(scores.device).long().repeat(2), self.pixel_weight * pixel)
        total = self.global_weight * losses.global_ + losses.pixel  # Eq. (5) at the default weights (1, 4)
        terms = {f"loss_{name}": float(value) for name, value in parts.items()}
        terms.update(loss_global=losses.global_.item(), loss_pixel=losses.pixel.item(),
                     kmeans_objective=float(clusters.objectives[0][0]))
        return total, terms

    def _inputs(self, batch: dict[str, Any]) -> torch.Tensor:
        from lussray.stages.pretrain import normalize_views

        return normalize_views(torch.cat([batch["image1"], batch["image2"]]), IMAGENET_MEAN, IMAGENET_STD)

    def _crop(self, maps: torch.Tensor, batch: dict[str, Any], size: int) -> torch.Tensor:
        from lussray.data.picie_views import apply_crop

        return apply_crop(maps, batch["crop"], (self.base_size, self.base_size), size)

    @staticmethod
    def stream_kwargs(cfg: FS4Config, photometric: PiCIEConfig) -> dict[str, Any]:
        """The batch function's keyword arguments (:func:`lussray.data.fs4_views.fs4_batch`).

        The geometry of the views is FS^4's (``fs4.*``); P1 and P2 are PiCIE's (``picie.jitter`` ...).
        """
        return {"base_size": cfg.base_size, "view_size": cfg.view_size, "min_side": cfg.min_side,
                "flip_p": cfg.flip_p, **picie.photometric_kwargs(photometric)}


# -- the training stage --------------------------------------------------------------------------


def labels_root(run: str) -> str:
    """``<run>/fs4-labels``, the pseudo-label stage's folder (its ``train`` split is the training stream)."""
    return storage.join(run, LABELS_STAGE)


def method_kwargs(config: LussConfig, init: str | None, *, kmeans_batches: int | None) -> dict[str, Any]:
    """The :class:`FS4Method` arguments of a config."""
    cfg = config.fs4
    base = picie.method_kwargs(config, init, stage=STAGE, kmeans_batches=kmeans_batches)
    return {**base, "base_size": cfg.base_size, "num_global_clusters": cfg.labels.num_clusters,
            "cam_head": cfg.cam_head, "cam_hidden_channels": cfg.cam_hidden_channels, "cae": cfg.cae,
            "cae_chunk_bytes": cfg.cae_chunk_mb * 2**20, "global_weight": cfg.global_weight,
            "pixel_weight": cfg.pixel_weight}


def model_record(config: LussConfig, init: str | None) -> dict[str, Any]:
    """PiCIE's model record with the ``fs4`` entry that builds the CAE and the CAM head."""
    kwargs = method_kwargs(config, init, kmeans_batches=None)
    network = FS4Method(**kwargs).network_kwargs()
    return {**picie.model_record(config, init, STAGE), "fs4": network}


def build_spec(config: LussConfig, run: str, init: str | None, *, max_steps: int | None = None) -> LoopSpec:
    """The worker-side description of an FS^4 training run on ``<run>/fs4-labels``.

    Raises:
        UserError: without the pseudo labels, or with fewer selected views than one global batch.
    """
    from lussray.data.fs4_views import MEMBERS, fs4_batch
    from lussray.data.ingest import EpochStream, stream_settings

    picie.check_photometric(config)
    labels = labels_root(run)
    if not storage.exists(storage.join(labels, LABELS_SPLIT, "manifest.json")):
        raise UserError(f"no FS^4 pseudo labels under {labels}: run `lussray fs4 labels` first")
    loop = config.fs4.loop
    steps = steps_per_epoch(read_manifest(labels, LABELS_SPLIT)["num_samples"], loop, STAGE,
                            storage.join(labels, LABELS_SPLIT))
    kwargs = method_kwargs(config, init, kmeans_batches=picie.kmeans_batches(config, steps, loop))
    stream = EpochStream(labels, LABELS_SPLIT, STAGE, MEMBERS, fs4_batch,
                         FS4Method.stream_kwargs(config.fs4, config.picie), config.seed, **stream_settings(config.ingest))
    return picie.assemble_spec(config, run, stage=STAGE, loop=loop, stream=stream, steps=steps,
                               method_factory=lambda: FS4Method(**kwargs), max_steps=max_steps,
                               record=model_record(config, init))


def training_keys(config: LussConfig) -> tuple[str, ...]:
    """The config keys training reads: ``fs4`` less the labels (their shards are fingerprinted), PiCIE's clustering."""
    own = tuple(f"fs4.{f.name}" for f in dataclasses.fields(config.fs4) if f.name != "labels")
    clustering = tuple(f"picie.{name}" for name in PICIE_KEYS)
    needs_classes = ("dataset.num_classes",) if config.picie.num_clusters is None else ()
    return (*own, "fs4.labels.num_clusters", *clustering, "pretrain.arch", *needs_classes)


def fingerprint(config: LussConfig, run: str, init: str | None) -> dict[str, Any]:
    """What determines the stage's checkpoints: config, the selected views' manifest, the initialisation."""
    return {"format": FORMAT_VERSION, **config_fingerprint(config, *training_keys(config), *STREAM_KEYS),
            "data": data_fingerprint(labels_root(run), [LABELS_SPLIT]), "init": checkpoint_fingerprint(init, run)}


def train(config: LussConfig, run: str, *, init: str | None = None, max_steps: int | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Train FS^4 on the selected views of ``<run>/fs4-labels`` into ``<run>/fs4`` (resuming a run of the same inputs).

    Args:
        config: the resolved config (``fs4``, PiCIE's clustering keys, ``pretrain.arch``, ``ingest``, ``ray``).
        run: run folder (absolute path or URI) holding ``fs4-labels``.
        init: the backbone: a lussray or torchvision checkpoint, ``random``, or by default the latest
            PASS stage-1 checkpoint under ``<run>/pretrain`` (the labels' initial model).
        max_steps: stop after this many steps (checkpointing first).
        overwrite: redo the stage when its folder holds outputs of other inputs.

    Returns:
        ``{"stage", "checkpoint", "init"}``.
    """
    from lussray.data.ingest import init_ray
    from lussray.stages.loop import fit, run_training

    init = picie.resolve_init(run, init)
    picie.check_init(config, init)
    spec = build_spec(config, run, init, max_steps=max_steps)

    def start() -> None:
        init_ray(config.ray)
        fit(spec, config.fs4.loop, run)

    checkpoint = run_training(spec, fingerprint(config, run, init), overwrite=overwrite, start=start)
    return {"stage": STAGE, "checkpoint": checkpoint, "init": init}
