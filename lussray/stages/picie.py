"""PiCIE on Ray: pixel clustering with invariance and equivariance, its k-means every epoch over the workers.

    lussray picie train --dataset synthetic-scenes --data DATA --run RUN [--init FILE|random] [--max-steps N]
    lussray picie cluster --dataset synthetic-scenes --data DATA --run RUN [--checkpoint FILE]
    lussray predict --method picie --dataset synthetic-scenes --data DATA --run RUN --split validation [--crf]
    lussray run --method picie --dataset synthetic-scenes --data DATA --run RUN [--init FILE] [--baselines] [--crf]

``picie train`` trains PiCIE's network (:class:`~lussray.models.fpn.PanopticFPN` on ``pretrain.arch``)
on the shared Ray Train loop (:mod:`lussray.stages.loop`) into ``<run>/picie``:

- data: the ``train`` split as an :class:`~lussray.data.ingest.EpochStream` whose batch function
  (:func:`lussray.data.picie_views.views_batch`) makes both views of every image and its crop box
  with exact geometry, every draw from the sample's own generator (seed, stage, epoch, key);
- every epoch, before its first step (and before the first step of a resumed worker),
  :meth:`PiCIEMethod.before_epoch` passes over the worker's batches of the epoch twice with the
  network's BN layers on batch statistics, as in training (running statistics restored after): :func:`lussray.methods.picie.cluster_epoch` runs the k-means of both views
  (and of the "+H" head) over a pixel sample with its statistics all-reduced over the Train
  workers, then labels every pixel of every image of the epoch; the labels stay in the worker's
  memory keyed by sample key, and the training step looks them up by the batch's ``__key__``;
- the loss: :func:`lussray.methods.picie.picie_multihead_loss` (within- and cross-view
  cross-entropies to the fixed centroids), Adam with a constant (or cosine) learning rate;
- checkpoints hold the model, Adam, the step and the epoch's clustering (centroids, class
  weights, and, per worker, the labels of its images: ``method_rank<r>.pt``), so a worker resumed
  inside an epoch trains on exactly the labels of the unbroken run and a worker resumed at an epoch
  boundary clusters again from the same weights, with the same batches and seeds.

``picie cluster`` is the reference's final evaluation k-means: a fresh k-means (K = the main head's)
of the trained network's pixel features of the training images seen as validation is, in
``<run>/picie-clusters`` (``pixels/`` parquet parts written by the driver from an actor pool's
rows, the sharded faiss k-means of :mod:`lussray.clustering.kmeans`, ``centroids.npy``,
``summary.json`` last). ``lussray predict --method picie`` labels every pixel with its nearest
centroid (cosine logits upsampled bilinearly to the label resolution, argmax; ``--crf``: dense CRF
on ``softmax(picie.crf_alpha * cosine)``), through the predict pool, scored with the pixel
protocol.

Extending the method (FS^4): :class:`PiCIEMethod` keeps the pieces a derived method replaces apart:
:meth:`~PiCIEMethod.build_network` (the feature model; a CAE module wraps it),
:meth:`~PiCIEMethod.embed` (the two views' feature maps, used by training and by both clustering
passes), :meth:`~PiCIEMethod.loss` (PiCIE's loss from the features and the epoch's targets)
and :meth:`~PiCIEMethod.stream_kwargs` (the batch function's arguments); the epoch hook, the
checkpointed state and :func:`assemble_spec` are shared. :class:`lussray.stages.fs4_train.FS4Method`
replaces ``build_network``, ``embed``, ``stream_kwargs`` and ``training_step`` (one forward pass gives
the features and the CAM scores; L_p at :data:`lussray.methods.picie.PAPER_LOSS_FACTOR` times PiCIE's
scale plus L_w, the paper's Eq. 5). :func:`cluster` and :func:`predict` take the training stage
(``stage="fs4"``): a checkpoint's ``picie_model`` record says how to build its network
(:func:`network_from_record`).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from lussray import storage
from lussray.completion import (
    FORMAT_VERSION,
    StageRecord,
    checkpoint_fingerprint,
    config_fingerprint,
    data_fingerprint,
    file_fingerprint,
    has_files,
)
from lussray.config import ConfigError, LussConfig, PiCIEConfig, to_dict
from lussray.data.augment import IMAGENET_MEAN, IMAGENET_STD
from lussray.data.shards import read_manifest
from lussray.errors import UserError
from lussray.methods import picie as blocks
from lussray.seeds import derived_seed, sample_rng, stage_salt
from lussray.stages.loop import STREAM_KEYS, LoopSpec, StepState, steps_per_epoch

#: ``lussray picie ...`` resolves its config with the ``picie`` method layers (lussray.cli.config_method).
CONFIG_METHOD = "picie"
STAGE = "picie"
CLUSTER_STAGE = "picie-clusters"
PREDICT_STAGE = "predict"
MODEL_RECORD = "picie_model"  # the checkpoint's config entry that says how to build the network
CENTROIDS_FILE = "centroids.npy"
SUMMARY_FILE = "summary.json"
PIXELS_FOLDER = "pixels"
PART_ROWS = 262_144  # pixel rows per parquet part of `picie cluster` (128 MB at D = 128)
CLUSTER_SALT = stage_salt(CLUSTER_STAGE)
#: The keys of the ``picie`` section that do not change training (the final k-means, prediction).
NOT_TRAINING_KEYS = ("cluster", "crf_alpha", "initial_bn_images")


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


class ClusterState(nn.Module):
    """The epoch's clustering as checkpointed state (``_extra_state``: centroids, weights, labels by key)."""

    def __init__(self) -> None:
        super().__init__()
        self.clusters: blocks.EpochClusters | None = None

    def get_extra_state(self) -> dict[str, Any]:
        return self.clusters.state() if self.clusters is not None else {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.clusters = blocks.EpochClusters.from_state(state) if state else None


@dataclass
class PiCIEMethod:
    """PiCIE's hooks of the shared loop: the network, the epoch's clustering, the loss.

    Attributes:
        arch: Backbone architecture.
        width: FPN width (None: the reference's).
        num_clusters: K of every head (main first, then the "+H" over-clustering head).
        init_checkpoint: A lussray or torchvision checkpoint for the backbone, or None (random).
        seed: The run's seed (network initialisation, pixel samples, initial centroids).
        base_size: Side of the base image the crop boxes refer to.
        spherical: Cosine centroids (see :mod:`lussray.methods.picie`).
        balance: Cross-entropy class weights.
        mse: The reference's ``--mse`` term.
        kmeans_iterations: Lloyd iterations per epoch and view.
        kmeans_init: Seeding of every k-means (``kmeans++`` or ``random``).
        kmeans_pixels_per_image: Pixels per sampled image and view.
        kmeans_batches: Batches per worker whose pixels are sampled (None: all of the epoch).
        stage: The stage's name (log prefix, network seed).
    """

    arch: str
    width: int | None
    num_clusters: tuple[int, ...]
    init_checkpoint: str | None
    seed: int
    base_size: int
    spherical: bool = True
    balance: str = "frequency"
    mse: bool = False
    kmeans_iterations: int = 20
    kmeans_init: str = "kmeans++"
    kmeans_pixels_per_image: int = 640
    kmeans_batches: int | None = None
    stage: str = STAGE

    def __post_init__(self) -> None:
        self._state = ClusterState()

    # -- the pieces a derived method replaces ------------------------------------------------------

    def build_network(self) -> nn.Module:
        """The feature model, from its own seed: the same weights wherever it is built (driver or worker)."""
        from lussray.models.fpn import build_panoptic_fpn

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, self.stage, "model"))
            model, report = build_panoptic_fpn(self.arch, self.width, self.init_checkpoint)
        if _rank() == 0:
            where = report.summary() if report is not None else f"randomly initialised {self.arch} (no pretraining)"
            print(f"[{self.stage}] network: {where}", flush=True)
        return model

    def embed(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """z1 = f(G(P1 x)) and z2 = G(f(P2 x)): (B, D, h, w) each, the same pixels, not normalised.

        Both views go through one forward pass (one DDP call per step; BN statistics over both).
        """
        from lussray.data.picie_views import apply_crop
        from lussray.stages.pretrain import normalize_views

        views = normalize_views(torch.cat([batch["view1"], batch["view2"]]), IMAGENET_MEAN, IMAGENET_STD)
        first, second = model(views).chunk(2)
        return first, apply_crop(second, batch["boxes"], (self.base_size, self.base_size), first.shape[-1])

    def loss(self, z1: torch.Tensor, z2: torch.Tensor, heads: list, batch: dict[str, Any],
             state: StepState) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """PiCIE's loss at the reference's scale (``L_p / 4``), every head averaged."""
        return blocks.picie_multihead_loss(z1, z2, heads, spherical=self.spherical, mse=self.mse)

    # -- the loop's hooks ----------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        return self.build_network()

    def state_module(self) -> nn.Module:
        return self._state

    def before_epoch(self, model: nn.Module, state: StepState) -> None:
        """Cluster the epoch and label its pixels, unless the checkpoint restored this epoch's labels."""
        current = self._state.clusters
        if current is not None and current.epoch == state.epoch:
            if _rank() == 0:
                print(f"[{self.stage}] epoch {state.epoch}: clustering restored from the checkpoint", flush=True)
            return
        network = _unwrap(model)  # no DDP hooks or buffer broadcasts outside the training step
        # As the reference, the clustering sees the features of training: batch statistics in the BN
        # layers (with the running statistics of an untrained network, eval mode gives features that
        # cluster far worse: 8.5 against 27.4 validation mIoU for a random ResNet-18 on the scenes),
        # and the running statistics are put back, so the passes leave the model as they found it.
        saved = [buffer.clone() for buffer in network.buffers()]
        training = network.training
        network.train()
        try:
            clusters = blocks.cluster_epoch(
                lambda: self._embedded(network, state.epoch_batches(state.epoch)), self.num_clusters,
                epoch=state.epoch, seed=self.seed, iterations=self.kmeans_iterations,
                pixels_per_image=self.kmeans_pixels_per_image, sample_batches=self.kmeans_batches,
                spherical=self.spherical, balance=self.balance, init=self.kmeans_init)
        finally:
            for buffer, value in zip(network.buffers(), saved):
                buffer.copy_(value)
            network.train(training)
        self._state.clusters = clusters
        if _rank() == 0:
            used = [int((w > 0).sum()) if w is not None else -1 for w in clusters.weights[0]]
            print(f"[{self.stage}] epoch {state.epoch}: k-means over {int(clusters.seconds['sampled_pixels'])} "
                  f"pixels per worker in {clusters.seconds['kmeans']:.1f} s (objective view 1 "
                  f"{clusters.objectives[0][0]:.4f}, view 2 {clusters.objectives[0][1]:.4f}), "
                  f"{len(clusters.keys)} images labelled in {clusters.seconds['labels']:.1f} s"
                  + (f", clusters used {used}" if self.balance != "none" else ""), flush=True)

    def _embedded(self, network: nn.Module, batches: Iterator[dict[str, Any]]):
        for batch in batches:
            with torch.no_grad():
                z1, z2 = self.embed(network, batch)
            yield batch["__key__"], [blocks.normalize(z1.float(), dim=1), blocks.normalize(z2.float(), dim=1)]

    def training_step(self, model, batch, state: StepState):
        # One forward of both views; the labels of the epoch, looked up by sample key.
        z1, z2 = self.embed(model, batch)
        clusters = self._state.clusters
        labels = clusters.lookup(batch["__key__"]).to(z1.device)
        loss, parts = self.loss(z1, z2, clusters.targets(labels), batch, state)
        terms = {f"loss_{name}": float(value) for name, value in parts.items()}
        terms["kmeans_objective"] = float(clusters.objectives[0][0])
        return loss, terms

    def before_step(self, model, state: StepState) -> None:
        pass

    def after_backward(self, model, state: StepState) -> None:
        pass

    @staticmethod
    def stream_kwargs(cfg: PiCIEConfig) -> dict[str, Any]:
        """The batch function's keyword arguments (:func:`lussray.data.picie_views.views_batch`)."""
        return {"base_size": cfg.base_size, "crop_size": cfg.crop_size, "min_side": cfg.min_scale,
                "flip_p": cfg.flip_p, **photometric_kwargs(cfg)}


def photometric_kwargs(cfg: PiCIEConfig) -> dict[str, Any]:
    """P1 and P2's keyword arguments (:func:`lussray.data.picie_views.sample_view_params`); FS^4 reads them too."""
    return {"jitter": list(cfg.jitter), "jitter_p": cfg.jitter_p, "grayscale_p": cfg.grayscale_p, "blur_p": cfg.blur_p}


# -- the training stage --------------------------------------------------------------------------


def num_clusters(config: LussConfig) -> tuple[int, ...]:
    """K of every head: ``picie.num_clusters`` (else ``dataset.num_classes``), then ``picie.overcluster_k``."""
    cfg = config.picie
    main = cfg.num_clusters or config.dataset.num_classes
    return (main, cfg.overcluster_k) if cfg.overcluster_k else (main,)


def check_config(config: LussConfig) -> None:
    """The cross-key rules of the ``picie`` section.

    Raises:
        ConfigError: naming the key.
    """
    check_photometric(config)
    cfg = config.picie
    if cfg.crop_size > cfg.base_size:
        raise ConfigError(f"picie.crop_size={cfg.crop_size} exceeds picie.base_size={cfg.base_size}")
    if cfg.crop_size % 4:
        raise ConfigError(f"picie.crop_size={cfg.crop_size}: must be a multiple of 4 (the FPN's stride)")


def check_photometric(config: LussConfig) -> None:
    """The rules of ``picie.jitter`` (PiCIE's and FS^4's photometric views).

    Raises:
        ConfigError: naming the key.
    """
    jitter = config.picie.jitter
    if len(jitter) != 4:
        raise ConfigError(f"picie.jitter={list(jitter)}: need 4 strengths (brightness, contrast, saturation, hue)")
    if jitter[3] > 0.5:
        raise ConfigError(f"picie.jitter[3]={jitter[3]} (hue) is out of range: must be <= 0.5")


def model_record(config: LussConfig, init: str | None, stage: str = STAGE) -> dict[str, Any]:
    """What builds the network of a PiCIE checkpoint (recorded as ``config["picie_model"]``)."""
    return {"arch": config.pretrain.arch, "width": config.picie.fpn_width, "num_clusters": list(num_clusters(config)),
            "spherical": config.picie.spherical, "seed": config.seed, "stage": stage, "init": init}


def method_kwargs(config: LussConfig, init: str | None, *, stage: str, kmeans_batches: int | None) -> dict[str, Any]:
    """The :class:`PiCIEMethod` arguments of a config."""
    cfg = config.picie
    return {"arch": config.pretrain.arch, "width": cfg.fpn_width, "num_clusters": num_clusters(config),
            "init_checkpoint": init, "seed": config.seed, "base_size": cfg.base_size, "spherical": cfg.spherical,
            "balance": cfg.balance, "mse": cfg.mse, "kmeans_iterations": cfg.kmeans_iterations,
            "kmeans_init": cfg.kmeans_init,
            "kmeans_pixels_per_image": cfg.kmeans_pixels_per_image, "kmeans_batches": kmeans_batches, "stage": stage}


def lr_schedule(schedule: str, loop: Any):
    """``lr_at(step, total)``: the constant ``loop.base_lr`` (the reference), or a cosine to ``loop.final_lr``.

    Args:
        schedule: ``picie.schedule`` (``constant`` or ``cosine``).
        loop: the stage's ``TrainLoopConfig``.
    """
    from lussray.optim.schedules import cosine_schedule

    if schedule == "constant":
        return lambda step, total: loop.base_lr
    return lambda step, total: cosine_schedule(step, total_steps=total, base_value=loop.base_lr,
                                               final_value=loop.final_lr, warmup_steps=loop.warmup_steps)


def kmeans_batches(config: LussConfig, steps: int, loop: Any) -> int | None:
    """Batches per worker of an epoch whose pixels enter its k-means (``picie.kmeans_images``; None: all)."""
    images = config.picie.kmeans_images
    return None if not images else min(steps, math.ceil(images / (loop.batch_size_per_worker * loop.num_workers)))


def assemble_spec(config: LussConfig, run: str, *, stage: str, loop: Any, stream: Any, steps: int,
                  method_factory: Any, max_steps: int | None, record: dict[str, Any]) -> LoopSpec:
    """The :class:`LoopSpec` of a PiCIE-style stage: Adam on ``loop``, ``picie.schedule``, ``record`` in the checkpoints.

    Args:
        config: the resolved config.
        run: run folder.
        stage: the stage's name (``<run>/<stage>``).
        loop: the stage's ``TrainLoopConfig`` (``picie.loop``, ``fs4.loop``).
        stream: the workers' :class:`~lussray.data.ingest.EpochStream`.
        steps: steps per epoch.
        method_factory: builds the :class:`PiCIEMethod` (or subclass) on each worker.
        max_steps: stop after this many steps.
        record: what builds the network (``config["picie_model"]`` of every checkpoint).
    """
    optim_kwargs = {"lr": loop.base_lr, "weight_decay": loop.weight_decay}
    return LoopSpec(
        stage=stage,
        method_factory=method_factory,
        optimizer_factory=lambda params: torch.optim.Adam(params, **optim_kwargs),
        lr_at=lr_schedule(config.picie.schedule, loop),
        stream=stream,
        seed=config.seed,
        run_dir=storage.join(run, stage),
        batch_size_per_worker=loop.batch_size_per_worker,
        steps_per_epoch=steps,
        epochs=loop.epochs,
        checkpoint_every_steps=loop.checkpoint_every_steps,
        log_every_steps=loop.log_every_steps,
        max_steps=max_steps,
        amp=loop.amp,
        sync_batchnorm=loop.sync_batchnorm,
        prefetch_batches=config.ingest.prefetch_batches,
        torch_threads=loop.torch_threads,
        resolved_config={**to_dict(config), MODEL_RECORD: record},
    )


def build_spec(config: LussConfig, data: str, run: str, init: str | None, *, stage: str = STAGE,
               max_steps: int | None = None, method: type = PiCIEMethod) -> LoopSpec:
    """The worker-side description of a PiCIE training run (``method``: :class:`PiCIEMethod` or a subclass).

    Raises:
        UserError: if the training split holds fewer images than one global batch.
        ConfigError: on inconsistent ``picie`` keys.
    """
    from lussray.data.ingest import IMAGE_MEMBER, EpochStream, stream_settings
    from lussray.data.picie_views import views_batch

    check_config(config)
    cfg, loop = config.picie, config.picie.loop
    steps = steps_per_epoch(read_manifest(data, "train")["num_samples"], loop, stage, storage.join(data, "train"))
    kwargs = method_kwargs(config, init, stage=stage, kmeans_batches=kmeans_batches(config, steps, loop))
    stream = EpochStream(data, "train", stage, (IMAGE_MEMBER,), views_batch, method.stream_kwargs(cfg), config.seed,
                         **stream_settings(config.ingest))
    return assemble_spec(config, run, stage=stage, loop=loop, stream=stream, steps=steps,
                         method_factory=lambda: method(**kwargs), max_steps=max_steps,
                         record=model_record(config, init, stage))


def training_keys(config: LussConfig) -> tuple[str, ...]:
    """The config keys training reads (the ``picie`` section less the final k-means and prediction)."""
    keys = tuple(f"picie.{f.name}" for f in dataclasses.fields(config.picie) if f.name not in NOT_TRAINING_KEYS)
    return (*keys, "pretrain.arch", *(("dataset.num_classes",) if config.picie.num_clusters is None else ()))


def fingerprint(config: LussConfig, data: str, run: str, init: str | None) -> dict[str, Any]:
    """What determines the stage's checkpoints (:mod:`lussray.completion`): config, data, initialisation."""
    return {"format": FORMAT_VERSION, **config_fingerprint(config, *training_keys(config), *STREAM_KEYS),
            "data": data_fingerprint(data, ["train"]), "init": checkpoint_fingerprint(init, run)}


def resolve_init(run: str, given: str | None) -> str | None:
    """``--init``: ``random`` (None), a file, or by default the latest PASS stage-1 checkpoint of the run."""
    from lussray.stages.finetune import init_checkpoint

    return init_checkpoint(run, given)


def check_init(config: LussConfig, init: str | None) -> None:
    """Fail on the driver, before any cluster work, when ``init`` cannot initialise the backbone."""
    if init:
        from lussray.models.fpn import build_panoptic_fpn

        build_panoptic_fpn(config.pretrain.arch, config.picie.fpn_width, init)


def train(config: LussConfig, data: str, run: str, *, init: str | None = None, max_steps: int | None = None,
          overwrite: bool = False, stage: str = STAGE) -> dict[str, Any]:
    """Train PiCIE on ``data``'s train split into ``<run>/<stage>`` (resuming a run of the same inputs).

    Args:
        config: the resolved config (``picie``, ``pretrain.arch``, ``ingest``, ``ray``, ``seed``).
        data: shards folder (absolute path or URI).
        run: run folder (absolute path or URI).
        init: the backbone: a lussray or torchvision checkpoint, ``random``, or by default the latest
            PASS stage-1 checkpoint under ``<run>/pretrain``.
        max_steps: stop after this many steps (checkpointing first).
        overwrite: redo the stage when its folder holds outputs of other inputs.
        stage: the stage's folder and log name.

    Returns:
        ``{"stage", "checkpoint", "init"}``.
    """
    from lussray.data.ingest import init_ray
    from lussray.stages.loop import fit, run_training

    init = resolve_init(run, init)
    check_init(config, init)
    spec = build_spec(config, data, run, init, stage=stage, max_steps=max_steps)

    def start() -> None:
        init_ray(config.ray)
        fit(spec, config.picie.loop, run)

    checkpoint = run_training(spec, fingerprint(config, data, run, init), overwrite=overwrite, start=start)
    return {"stage": stage, "checkpoint": checkpoint, "init": init}


def evaluation_view_batches(config: LussConfig, data: str, split: str, num_images: int,
                            batch_size: int = 32) -> Iterator[torch.Tensor]:
    """The first ``num_images`` images of ``split`` (shard order) as model inputs, seen as validation is."""
    from lussray.data.augment import decode_image, evaluation_view
    from lussray.data.shards import iter_tar, shard_paths
    from lussray.stages.predict import to_model_input

    crop = config.dataset.eval_crop_size or config.ingest.eval_short_side
    pending: list[np.ndarray] = []
    seen = 0
    for path in shard_paths(data, split):
        for _, members in iter_tar(path):
            if seen == num_images:
                break
            pending.append(evaluation_view(decode_image(members["jpg"]), None, config.ingest.eval_short_side, crop)[0])
            seen += 1
            if len(pending) == batch_size:
                yield to_model_input(np.stack(pending), torch.device("cpu"))
                pending = []
    if pending:
        yield to_model_input(np.stack(pending), torch.device("cpu"))


def initial_checkpoint(config: LussConfig, data: str, run: str, init: str | None, folder: str, *,
                       overwrite: bool = False) -> str:
    """The untrained PiCIE network (``init``'s backbone, the seeded decoder) as ``<folder>/init.pt``.

    The same weights the training stage starts from (:meth:`PiCIEMethod.build_network` seeds
    itself); the ``initial_kmeans`` baseline clusters its features. Its BN running statistics are
    re-estimated on the first ``picie.initial_bn_images`` training images seen as validation is
    (:func:`lussray.models.batchnorm.recalibrate_batchnorm`, on this process): the statistics of a
    random network (or of PASS's 64 px crops) would handicap the baseline's eval-mode features
    (8.5 against 27.4 validation mIoU for a random ResNet-18 on the generated scenes).
    ``<folder>/inputs.json`` records what it was built from.
    """
    from lussray.models.batchnorm import recalibrate_batchnorm

    out = storage.join(folder, "init.pt")
    record = StageRecord(folder, {"format": FORMAT_VERSION,
                                  **config_fingerprint(config, "pretrain.arch", "picie.fpn_width",
                                                       "picie.initial_bn_images", "ingest.eval_short_side",
                                                       "dataset.eval_crop_size", "seed"),
                                  "data": data_fingerprint(data, ["train"]),
                                  "init": checkpoint_fingerprint(init, run)}, STAGE)
    record.check(overwrite)
    if storage.exists(out) and record.recorded() is not None:
        return out
    storage.makedirs(folder)
    with record.recording(produced=lambda: storage.exists(out)):
        method = PiCIEMethod(**method_kwargs(config, init, stage=STAGE, kmeans_batches=None))
        network = method.build_network()
        count = recalibrate_batchnorm(network, evaluation_view_batches(config, data, "train",
                                                                       config.picie.initial_bn_images))
        print(f"[{STAGE}] initial network: BN statistics re-estimated on {count} batches of training images",
              flush=True)
        buffer = io.BytesIO()
        torch.save({"model": network.state_dict(), "step": 0,
                    "config": {MODEL_RECORD: model_record(config, init)}}, buffer)
        storage.write_bytes_atomic(out, buffer.getvalue())
    return out


# -- the trained network, its final k-means and its predictions ----------------------------------


def load_network(checkpoint: str) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a PiCIE checkpoint (``config["picie_model"]`` says how to build it), eval mode.

    Raises:
        UserError: if the file is unreadable, is not a PiCIE checkpoint, or lacks weights.
    """
    from lussray.models.checkpoints import load_pretrained

    try:
        state = torch.load(io.BytesIO(storage.read_bytes(checkpoint)), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several kinds
        raise UserError(f"cannot read checkpoint {checkpoint}: {error}") from None
    record = state.get("config", {}).get(MODEL_RECORD) if isinstance(state, dict) else None
    if not isinstance(record, dict):
        raise UserError(f"{checkpoint} is not a PiCIE checkpoint (no config['{MODEL_RECORD}']): pass one of "
                        f"`lussray picie train`")
    model = network_from_record(record)
    report = load_pretrained(model, checkpoint)
    if report.missing or report.mismatched:
        raise UserError(f"{checkpoint} does not hold the whole PiCIE network: missing {report.missing[:3]}, "
                        f"mismatched {report.mismatched[:3]}")
    return model.eval(), record


def network_from_record(record: dict[str, Any]) -> nn.Module:
    """The (random) network a checkpoint's ``picie_model`` record describes: PiCIE's, or FS^4's with its ``fs4`` entry."""
    from lussray.models.fpn import PanopticFPN

    fpn = PanopticFPN(record["arch"], record["width"])
    if not record.get("fs4"):
        return fpn
    from lussray.models.fs4_network import build_fs4_network, record_kwargs

    return build_fs4_network(fpn, **record_kwargs(record["fs4"]))


def _features(model: nn.Module, images: np.ndarray, device) -> torch.Tensor:
    """L2-normalised (B, D, h, w) features of uint8 (B, H, W, 3) images."""
    from lussray.stages.predict import to_model_input

    return blocks.normalize(model(to_model_input(images, device)).float(), dim=1)


class PixelSampler:
    """``picie cluster``'s actor: random pixels of every image's feature map (callable class of the pool)."""

    def __init__(self, checkpoint: str, pixels_per_image: int, seed: int, torch_threads: int = 0) -> None:
        from lussray.stages.predict import torch_device

        self.device = torch_device(torch_threads)
        model, _ = load_network(checkpoint)
        self.model = model.to(self.device)
        self.pixels_per_image, self.seed = pixels_per_image, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from lussray.stages.predict import group_by_shape

        keys = [str(key) for key in batch["key"]]
        images = [np.asarray(image) for image in batch["image"]]
        rows, row_keys = [], []
        for indices in group_by_shape(images).values():
            with torch.inference_mode():
                features = _features(self.model, np.stack([images[i] for i in indices]), self.device)
                rngs = [sample_rng(self.seed, CLUSTER_SALT, 0, keys[i]) for i in indices]
                sample = blocks.sample_pixels(features, rngs, self.pixels_per_image).cpu().numpy()
            per_image = len(sample) // len(indices)
            rows.append(sample)
            row_keys += [keys[i] for i in indices for _ in range(per_image)]
        return {"key": np.asarray(row_keys), "embedding": np.concatenate(rows).astype(np.float32)}


class _PartWriter:
    """The driver's parquet parts of pixel rows (at most ``PART_ROWS`` rows held at a time)."""

    def __init__(self, folder: str) -> None:
        self.folder, self.paths, self.rows = folder, [], 0
        self._keys: list[np.ndarray] = []
        self._embeddings: list[np.ndarray] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        self._keys.append(np.asarray(batch["key"]))
        self._embeddings.append(np.asarray(batch["embedding"], dtype=np.float32))
        self.rows += len(batch["key"])
        if sum(len(part) for part in self._keys) >= PART_ROWS:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._keys:
            return
        embeddings = np.concatenate(self._embeddings)
        table = pa.table({"key": pa.array(np.concatenate(self._keys).tolist(), pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()),
                                                                         embeddings.shape[1])})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        path = storage.join(self.folder, f"part-{len(self.paths):05d}.parquet")
        storage.write_bytes_atomic(path, buffer.getvalue())
        self.paths.append(path)
        self._keys, self._embeddings = [], []


def cluster_fingerprint(config: LussConfig, data: str, run: str, checkpoint: str) -> dict[str, Any]:
    """What determines ``picie cluster``'s centroids: the checkpoint, the train manifest, the view, the k-means."""
    return {"format": FORMAT_VERSION,
            **config_fingerprint(config, "picie.cluster", "ingest.eval_short_side", "dataset.eval_crop_size", "seed"),
            "data": data_fingerprint(data, ["train"]), "checkpoint": checkpoint_fingerprint(checkpoint, run)}


def trained_checkpoint(run: str | None, given: str | None, stage: str = STAGE) -> str:
    """``--checkpoint`` if given, else the latest ``<run>/<stage>`` checkpoint."""
    from lussray.stages.loop import given_or_latest

    what = "PiCIE" if stage == STAGE else stage
    return given_or_latest(given, "--checkpoint", run, stage, what, f"lussray {stage} train")


def cluster_stage(stage: str = STAGE) -> str:
    """The final k-means' folder of a training stage: ``picie-clusters`` (``fs4-clusters`` for FS^4)."""
    return f"{stage}-clusters"


def cluster(config: LussConfig, data: str, run: str, *, checkpoint: str | None = None, out: str | None = None,
            overwrite: bool = False, stage: str = STAGE) -> dict[str, Any]:
    """The final k-means of a PiCIE network's pixel features of the training images into ``out``.

    Args:
        config: the resolved config (``picie.cluster``, ``predict`` pool, ``ingest``, ``dataset``, ``ray``).
        data: shards folder.
        run: run folder.
        checkpoint: the network (default: the latest ``<run>/<stage>`` checkpoint).
        out: the folder (default ``<run>/<stage>-clusters``).
        overwrite: redo it when the folder holds centroids of other inputs.
        stage: the training stage (``picie``, or ``fs4``: an FS^4 network clusters the same way).

    Returns:
        The summary (also ``<out>/summary.json``): ``centroids`` (path), ``num_clusters``,
        ``num_points``, ``objective``, ``seconds``.
    """
    from lussray.clustering.kmeans import sharded_kmeans
    from lussray.completion import remove_tree
    from lussray.data.ingest import IMAGE_MEMBER, evaluation_batch, init_ray, read_split
    from lussray.stages.predict import run_pool

    checkpoint = trained_checkpoint(run, checkpoint, stage)
    _, record = load_network(checkpoint)
    k = int(record["num_clusters"][0])
    name = cluster_stage(stage)
    out = out or storage.join(run, name)
    stage_record = StageRecord(out, cluster_fingerprint(config, data, run, checkpoint), name)
    stage_record.check(overwrite)
    summary_path = storage.join(out, SUMMARY_FILE)
    if storage.exists(summary_path) and stage_record.recorded() is not None:
        print(f"[{name}] complete: {summary_path}", flush=True)
        return storage.read_json(summary_path)
    cfg = config.picie.cluster
    pixels = storage.join(out, PIXELS_FOLDER)
    if storage.exists(pixels):
        remove_tree(pixels)  # parts of an interrupted pass: the pass is redone whole
    storage.makedirs(pixels)
    started = time.perf_counter()
    with stage_record.recording(produced=lambda: has_files(out, ".parquet") or storage.exists(summary_path)):
        init_ray(config.ray)
        dataset = read_split(data, "train", members=(IMAGE_MEMBER,)).map_batches(
            evaluation_batch, fn_kwargs={"short_side": config.ingest.eval_short_side,
                                         "crop_size": config.dataset.eval_crop_size},
            batch_size=config.ingest.map_batch_size, batch_format="numpy", num_cpus=config.ingest.cpus_per_map_task)
        writer = _PartWriter(pixels)
        total = int(read_manifest(data, "train")["num_samples"])
        run_pool(dataset, PixelSampler, {"checkpoint": checkpoint, "pixels_per_image": cfg.pixels_per_image,
                                         "seed": config.seed, "torch_threads": config.predict.torch_threads},
                 config.predict, total=total, what="train pixels", stage=name, output_rows=writer.add)
        writer.flush()
        embedded = time.perf_counter()
        result = sharded_kmeans(writer.paths, k, num_actors=cfg.kmeans_actors, niter=cfg.iterations, nredo=cfg.redo,
                                seed=derived_seed(config.seed, CLUSTER_STAGE, "kmeans"), spherical=True,
                                normalize_rows=True, gpus_per_actor=cfg.gpus_per_actor,
                                cpus_per_actor=cfg.cpus_per_actor, log_every=0)
        buffer = io.BytesIO()
        np.save(buffer, result.centroids.astype(np.float32))
        centroids = storage.join(out, CENTROIDS_FILE)
        storage.write_bytes_atomic(centroids, buffer.getvalue())
        summary = {"inputs": stage_record.fingerprint, "checkpoint": checkpoint, "centroids": centroids,
                   "num_clusters": k, "num_points": result.num_points, "objective": result.objective,
                   "embed_seconds": round(embedded - started, 1), "kmeans_seconds": round(result.seconds, 1),
                   "peak_rss_mb_per_actor": result.peak_rss_mb_per_actor}
        storage.write_json_atomic(summary_path, summary)
    print(f"[{name}] K={k} over {result.num_points} pixels of {writer.rows // max(cfg.pixels_per_image, 1)} "
          f"images: objective {result.objective:.4g}, {time.perf_counter() - started:.1f} s -> {centroids}", flush=True)
    return summary


class PiCIEPredictor:
    """Nearest centroid per pixel (a :class:`lussray.stages.predict.Predictor`): cosine logits at label resolution.

    The cosine similarities to the centroids are upsampled bilinearly to the label size (as the
    reference upsamples its classifier's logits) and the argmax is the cluster; with ``refine_fn``
    (the dense CRF) the probabilities ``softmax(alpha * cosine)`` are refined instead.
    """

    def __init__(self, checkpoint: str, centroids: str, torch_threads: int = 0, alpha: float = 10.0,
                 refine_fn: Any = None) -> None:
        from lussray.stages.predict import torch_device

        self.device = torch_device(torch_threads)
        model, _ = load_network(checkpoint)
        self.model = model.to(self.device)
        self.centroids = torch.from_numpy(np.load(io.BytesIO(storage.read_bytes(centroids)))).to(self.device)
        self.alpha, self.refine = alpha, refine_fn

    def logits(self, images: np.ndarray) -> torch.Tensor:
        """(B, K, h, w) cosine similarities of every pixel to every centroid."""
        return blocks.cluster_logits(_features(self.model, images, self.device), self.centroids)

    def predict(self, images, sizes, labels) -> list[np.ndarray]:
        import torch.nn.functional as F

        from lussray.stages.predict import group_by_shape

        out: list[np.ndarray] = [np.zeros(0)] * len(images)
        for indices in group_by_shape(images).values():
            with torch.inference_mode():
                logits = self.logits(np.stack([images[i] for i in indices]))
                for row, i in enumerate(indices):
                    size = tuple(int(v) for v in sizes[i])
                    scores = F.interpolate(logits[row : row + 1], size=size, mode="bilinear", align_corners=False)[0]
                    out[i] = self._labels(scores, images[i], size)
        return out

    def _labels(self, scores: torch.Tensor, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if self.refine is None:
            return scores.argmax(0).cpu().numpy().astype(np.int64)
        if image.shape[:2] != size:
            from PIL import Image

            image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
        return self.refine((self.alpha * scores).softmax(0).cpu().numpy(), image)


def predict(config: LussConfig, data: str, run: str | None, *, split: str = "validation",
            checkpoint: str | None = None, centroids: str | None = None, out: str | None = None, crf: bool = False,
            overwrite: bool = False, stage: str = STAGE) -> dict[str, Any]:
    """PiCIE's predictions of ``split`` (nearest centroid per pixel), scored with the pixel protocol.

    Args:
        config: the resolved config (``predict`` pool and CRF, ``picie.crf_alpha``, ``ingest``, ``dataset``).
        data: shards folder.
        run: run folder (default checkpoint, centroids and output folder).
        split: the split to predict.
        checkpoint: the network (default: the latest ``<run>/<stage>`` checkpoint).
        centroids: a ``centroids.npy`` (default ``<run>/<stage>-clusters/centroids.npy``).
        out: the prediction folder (default ``<run>/predict/<split>[-crf]``).
        crf: refine with the dense CRF (also when ``predict.crf`` is set).
        overwrite: redo the predictions when the folder holds outputs of other inputs.
        stage: the training stage (``picie``, or ``fs4``).

    Returns:
        The summary (``<out>/summary.json``; ``metrics`` where the split has ground truth).

    Raises:
        UserError: without centroids, for a dataset not scored with the pixel protocol, or for
            centroids that do not fit the network.
    """
    from lussray.data.ingest import init_ray
    from lussray.models.fpn import default_width
    from lussray.stages.predict import crf_refiner, predict_scene, split_folder

    if config.dataset.protocol != "pixel":
        raise UserError(f"PiCIE's predictions are scored with the pixel protocol; dataset {config.dataset.name} "
                        f"uses dataset.protocol={config.dataset.protocol}")
    if not out and not run:
        raise UserError("--out DIR or --run DIR is required")
    checkpoint = trained_checkpoint(run, checkpoint, stage)
    centroids = centroids or (storage.join(run, cluster_stage(stage), CENTROIDS_FILE) if run else None)
    if not centroids or not storage.exists(centroids):
        raise UserError(f"no centroids at {centroids}: run `lussray {stage} cluster` first or pass --centroids FILE")
    matrix = np.load(io.BytesIO(storage.read_bytes(centroids)))
    _, record = load_network(checkpoint)
    width = record["width"] or default_width(record["arch"])
    if matrix.ndim != 2 or matrix.shape[1] != width:
        raise UserError(f"{centroids}: centroids of shape {matrix.shape} do not fit the {width}-d features of "
                        f"{checkpoint}")
    crf = bool(crf or config.predict.crf)
    refiner = crf_refiner(config) if crf else None
    out = out or storage.join(run, PREDICT_STAGE, split_folder(split, crf))
    kwargs = {"checkpoint": checkpoint, "centroids": centroids, "torch_threads": config.predict.torch_threads,
              "alpha": config.picie.crf_alpha,
              "refine_fn": refiner.refine_probabilities if refiner is not None else None}
    inputs = {"method": stage, "centroids": file_fingerprint(centroids, run),
              "crf": dataclasses.asdict(refiner.params) if refiner is not None else None,
              "crf_alpha": config.picie.crf_alpha if refiner is not None else None}
    init_ray(config.ray)
    return predict_scene(config, data, run, out, PiCIEPredictor, kwargs, checkpoint=checkpoint,
                         num_clusters=int(matrix.shape[0]), match="hungarian", inputs=inputs, split=split,
                         overwrite=overwrite)


# -- the command ---------------------------------------------------------------------------------

ACTIONS = {"train": "PiCIE training on Ray Train, its k-means every epoch over the workers",
           "cluster": "the final k-means of a trained network's pixel features"}


def add_arguments(parser: argparse.ArgumentParser, action: str) -> None:
    """Flags of ``lussray picie train`` and ``lussray picie cluster``."""
    if action == "train":
        parser.add_argument("--init", metavar="CHECKPOINT",
                            help="the backbone, a lussray or torchvision checkpoint or 'random' (default: the "
                            "latest PASS stage-1 checkpoint under <run>/pretrain)")
        parser.add_argument("--max-steps", type=int, help="stop after this many steps (checkpointing first)")
    else:
        parser.add_argument("--checkpoint", help="the PiCIE checkpoint (default: the latest under <run>/picie)")
        parser.add_argument("--out", metavar="DIR", help="the output folder (default <run>/picie-clusters)")


def run(args: argparse.Namespace, config: LussConfig) -> int:
    """``lussray picie train|cluster``."""
    if not args.data or not args.run:
        raise UserError("--data DIR (shards of `lussray prepare`) and --run DIR are required")
    data, run_root = storage.absolute(args.data), storage.absolute(args.run)
    if args.action == "train":
        init = args.init if args.init in (None, "random") else storage.absolute(args.init)
        train(config, data, run_root, init=init, max_steps=args.max_steps, overwrite=args.overwrite)
    else:
        cluster(config, data, run_root, checkpoint=storage.absolute(args.checkpoint) if args.checkpoint else None,
                out=storage.absolute(args.out) if args.out else None, overwrite=args.overwrite)
    return 0
