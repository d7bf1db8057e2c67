"""What the STEGO and HP training stages share: the frozen featurizer on the worker, seeded draws, the optimiser.

- :class:`WorkerFeaturizer`: the frozen featurizer inside a Train worker. It is not part of the
  trained model (DDP never sees it, checkpoints never carry its weights: 344 MB for ViT-B/8);
  the adapter builds it once per worker and moves it to the batch's device.
- :func:`step_generator`: the ``torch.Generator`` of one step's random choices (STEGO's sample
  points and random partners, HP's kept negatives and pool patches), seeded from the run's
  ``seed``, the stage, the worker's rank and the step (:func:`lussray.seeds.derived_seed`). A
  resumed run therefore draws what an uninterrupted run would have drawn.
- The optimiser: one AdamW whose parameter groups are the modules with their own learning rates
  and weight decays (:func:`lussray.methods.stego.param_groups`; the adapters' ``param_groups``
  hook of the loop). AdamW with weight decay 0 is Adam, so this is the references' separate Adam
  optimisers of the head and the two probes (and HP's AdamW head). The default rate is 1 and the
  schedule the constant 1, so every group keeps its own rate (the loop's ``lr_scale``).
- :func:`train`: the LoopSpec (the training stream of :mod:`lussray.data.scene_views`), fit, resume.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lussray import storage
from lussray.stages.featurizer import FeaturizerSpec

def world_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def step_generator(seed: int, stage: str, rank: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one step's random choices on ``device``, from (seed, stage, rank, step)."""
    from lussray.seeds import derived_seed

    generator = torch.Generator(device=device)
    generator.manual_seed(derived_seed(seed, stage, "draws", str(rank), str(step)))
    return generator


class WorkerFeaturizer:
    """The frozen featurizer of a Train worker: built on first use, on the device of the images it gets."""

    def __init__(self, spec: FeaturizerSpec) -> None:
        self.spec = spec
        self.module: nn.Module | None = None
        self._device: torch.device | None = None

    def __call__(self, images: torch.Tensor, attention: bool = False) -> Any:
        """``FeaturizerOutput`` of uint8 (B, h, w, 3) images (normalised here), without gradient."""
        from lussray.stages.featurizer import to_input

        if self.module is None:
            self.module = self.spec.build()[0]
        if self._device != images.device:
            self.module.to(images.device)
            self._device = images.device
        with torch.no_grad():
            return self.module(to_input(images, images.device), attention=attention)


def adam_groups(params: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The loop's optimizer factory: one AdamW over the method's groups (default rate 1: ``lr_scale`` = own rate)."""
    return torch.optim.AdamW([group for group in params if group["params"]], lr=1.0)


def group_rates(section: Any, *, train_head: bool = True) -> dict[str, float]:
    """The keyword arguments of :func:`lussray.methods.stego.param_groups` of a ``stego``/``hp`` section.

    The projector (HP only) learns at the head's rate; ``train_head=False`` (the random-head
    baseline) leaves the head out.
    """
    return {"head_lr": section.head_lr if train_head else 0.0, "head_weight_decay": section.head_weight_decay,
            "linear_lr": section.linear_lr, "cluster_lr": section.cluster_lr}


def heads_shape(section: Any, num_classes: int, in_dim: int) -> dict[str, Any]:
    """The constructor arguments of ``STEGOHeads``/``HPHeads`` (recorded in checkpoints for prediction)."""
    return {"in_dim": int(in_dim), "dim": int(section.dim), "num_classes": int(num_classes),
            "extra_clusters": int(section.extra_clusters), "nonlinear": bool(section.nonlinear),
            "dropout": float(section.dropout)}




# -- the Ray Train wiring -------------------------------------------------------------------------

KINDS = ("stego", "hp", "random_head")


def image_count(data: str) -> int:
    """Images of ``data``'s train split (one training row each per epoch)."""
    from lussray.data.shards import read_manifest

    return int(read_manifest(data, "train")["num_samples"])


def adapter_factory(kind: str, spec: FeaturizerSpec, heads: dict[str, Any], section: Any, *, seed: int,
                    stage: str, total_steps: int) -> Any:
    """A picklable zero-argument factory of the ``Method`` adapter of ``kind`` (built on each worker)."""
    from functools import partial

    if kind == "random_head":
        from lussray.stages.stego import ProbeOnlyAdapter

        return partial(ProbeOnlyAdapter, spec, heads, rates=group_rates(section, train_head=False))
    if kind == "stego":
        from lussray.stages.stego import StegoAdapter

        names = ("pos_intra_shift", "pos_inter_shift", "neg_inter_shift", "pos_intra_weight", "pos_inter_weight",
                 "neg_inter_weight", "feature_samples", "neg_samples", "pointwise", "zero_clamp", "stabilize", "center_features")
        return partial(StegoAdapter, spec, heads, rates=group_rates(section),
                       correspondence={n: getattr(section, n) for n in names},
                       correspondence_weight=section.correspondence_weight, seed=seed, stage=stage)
    from lussray.stages.hp import HPAdapter

    names = ("pool_size", "tau", "alpha", "rho", "ema_m", "warmup", "renew_interval", "reweighting", "sigma",
             "grad_norm", "checkpoint_loss")
    return partial(HPAdapter, spec, heads, rates=group_rates(section), method={n: getattr(section, n) for n in names},
                   total_steps=total_steps, seed=seed, stage=stage)


def batch_function(kind: str, section: Any, data: str, knn: str | None) -> tuple[Any, dict[str, Any]]:
    """The stream's batch function of ``kind`` and its keyword arguments (besides the per-row ``rngs``)."""
    from lussray.data import scene_views

    common = {"res": section.res, "crop_type": section.crop_type, "crop_ratio": section.crop_ratio}
    if kind == "stego":
        return scene_views.stego_batch, {**common, "num_neighbors": section.num_neighbors,
                                         "partners": {"knn": knn, "data": data, "split": "train"}}
    if kind == "hp":
        return scene_views.hp_batch, {**common, "jitter": list(section.jitter), "jitter_p": section.jitter_p,
                                      "grayscale_p": section.grayscale_p, "blur_p": section.blur_p}
    return scene_views.hp_batch, {**common, "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}


def stream(config: Any, data: str, *, kind: str, stage: str, section: Any, knn: str | None) -> Any:
    """The training :class:`~lussray.data.ingest.EpochStream` of a STEGO, HP or random-head run."""
    from lussray.data.ingest import EpochStream, stream_settings
    from lussray.data.shards import read_manifest

    batch_fn, fn_kwargs = batch_function(kind, section, data, knn)
    members = ("jpg", "seg.png") if read_manifest(data, "train").get("has_segmentation") else ("jpg",)
    return EpochStream(data, "train", stage, members, batch_fn, fn_kwargs, config.seed, **stream_settings(config.ingest))


def build_spec(config: Any, data: str, run: str, *, kind: str, stage: str, section: Any, spec: FeaturizerSpec,
               in_dim: int, knn: str | None = None, max_steps: int | None = None) -> Any:
    """The loop's :class:`~lussray.stages.loop.LoopSpec` of a STEGO, HP or random-head run."""
    from lussray.config import to_dict
    from lussray.stages.loop import LoopSpec, steps_per_epoch

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    loop = section.loop
    steps = steps_per_epoch(image_count(data), loop, stage, storage.join(data, "train"))
    caps = [value for value in (max_steps, section.max_steps) if value]
    last = min([loop.epochs * steps, *caps])
    heads = heads_shape(section, config.dataset.num_classes, in_dim)
    record = {"kind": kind, "shape": heads, "featurizer": dataclasses.asdict(spec)}
    return LoopSpec(
        stage=stage,
        method_factory=adapter_factory(kind, spec, heads, section, seed=config.seed, stage=stage, total_steps=last),
        optimizer_factory=adam_groups,
        lr_at=constant_factor,
        stream=stream(config, data, kind=kind, stage=stage, section=section, knn=knn),
        seed=config.seed,
        run_dir=storage.join(run, stage),
        batch_size_per_worker=loop.batch_size_per_worker,
        steps_per_epoch=steps,
        epochs=loop.epochs,
        checkpoint_every_steps=loop.checkpoint_every_steps,
        log_every_steps=loop.log_every_steps,
        max_steps=min(caps) if caps else None,
        amp=loop.amp,
        sync_batchnorm=loop.sync_batchnorm,
        prefetch_batches=config.ingest.prefetch_batches,
        torch_threads=loop.torch_threads,
        resolved_config={**to_dict(config), "heads": record},
    )


def constant_factor(step: int, total_steps: int) -> float:
    """The learning-rate schedule of STEGO and HP: the constant factor 1 of every group's own rate."""
    return 1.0


def fingerprint(config: Any, data: str, run: str, *, kind: str, section_key: str, spec: FeaturizerSpec,
                knn: str | None) -> dict[str, Any]:
    """What determines a STEGO/HP/random-head training folder (:mod:`lussray.completion`)."""
    from lussray.completion import FORMAT_VERSION, config_fingerprint, data_fingerprint, sha256_bytes

    knn_record = None
    if knn is not None:
        inputs = storage.join(knn, "inputs.json")
        knn_record = sha256_bytes(storage.read_bytes(inputs)) if storage.exists(inputs) else None
    from lussray.stages.loop import STREAM_KEYS

    return {"format": FORMAT_VERSION, "kind": kind,
            **config_fingerprint(config, section_key, "dataset.num_classes", *STREAM_KEYS),
            "featurizer": spec.fingerprint(run), "data": data_fingerprint(data, ["train"]), "knn": knn_record}


def check_knn_items(config: Any, section: Any, knn: str) -> None:
    """STEGO's items must be the KNN stage's: the same crop settings (a UserError names the keys otherwise)."""
    from lussray.data.partners import KnnFiles
    from lussray.errors import UserError

    summary = storage.read_json(KnnFiles(knn).summary)
    for key in ("crop_type", "crop_ratio"):
        if summary[key] != getattr(section, key):
            raise UserError(f"stego.{key}={getattr(section, key)!r} but the KNN neighbours in {knn} were computed "
                            f"with knn.{key}={summary[key]!r}: set both alike")


def train(config: Any, data: str, run: str, *, kind: str, stage: str, section_key: str, spec: FeaturizerSpec,
          in_dim: int, knn: str | None = None, max_steps: int | None = None, overwrite: bool = False) -> str:
    """Train (resume, or skip when complete) a STEGO, HP or random-head run into ``<run>/<stage>``.

    Returns:
        The latest intact checkpoint.
    """
    from lussray.data.ingest import init_ray
    from lussray.stages.loop import fit, run_training

    section = getattr(config, section_key)
    if knn is not None:
        check_knn_items(config, section, knn)
    loop_spec = build_spec(config, data, run, kind=kind, stage=stage, section=section, spec=spec, in_dim=in_dim,
                           knn=knn, max_steps=max_steps)

    def start() -> None:
        init_ray(config.ray)
        fit(loop_spec, section.loop, run)

    record = fingerprint(config, data, run, kind=kind, section_key=section_key, spec=spec, knn=knn)
    return run_training(loop_spec, record, overwrite=overwrite, start=start)
