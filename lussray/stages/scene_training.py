"""What the STEGO and HP training stages share: the frozen featurizer on the worker, seeded draws, the optimiser.

- :class:`WorkerFeaturizer`: the frozen featurizer inside a Train worker. It is not part of the
  trained model (DDP never sees it, checkpoints never carry its weights: 344 MB for ViT-B/8);
  the adapter builds it once per worker and moves it to the batch's device.
- :func:`step_generator`: the ``torch.Generator`` of one step's random choices (STEGO's sample
  points and random partners, HP's kept negatives and pool patches), seeded from (run seed,
  worker rank, step). A resumed run therefore draws what an uninterrupted run would have drawn.
- :class:`GroupedAdamW`: one AdamW with a parameter group per module and its own learning rate and
  weight decay (:func:`lussray.methods.stego.param_groups`: AdamW with weight decay 0 is Adam, so
  this is the references' separate Adam optimisers of the head and the two probes). The loop hands
  the optimiser factory a flat parameter list, so the adapter tags each parameter with its group
  name when it builds the model (:func:`tag_param_groups`) and the factory groups by the tag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lussray import storage
from lussray.stages.featurizer import FeaturizerSpec

#: The attribute :func:`tag_param_groups` sets on each trained parameter: the name of its optimiser group.
GROUP_ATTRIBUTE = "lussray_param_group"


def world_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed of (run seed, worker rank, step), well mixed (numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) & (2**63 - 1)


def step_generator(seed: int, rank: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one step's random choices on ``device``, seeded by :func:`step_seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(step_seed(seed, rank, step))
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


def tag_param_groups(groups: list[dict[str, Any]]) -> None:
    """Mark every parameter of ``groups`` (:func:`lussray.methods.stego.param_groups`) with its group's name."""
    for group in groups:
        for parameter in group["params"]:
            setattr(parameter, GROUP_ATTRIBUTE, group["name"])


class FactorAdamW(torch.optim.AdamW):
    """AdamW that reads each group's ``lr`` as a factor of the group's own ``initial_lr``.

    TODO(loop lr): the shared loop still writes one schedule value into every group's ``lr``
    (erasing the per-group rates); until its fix lands (the schedule as a factor of each group's
    ``initial_lr``), the STEGO/HP schedule is the constant factor 1.0 and this optimiser applies it.
    Remove it, and use ``torch.optim.AdamW``, when the loop applies the factor itself.
    """

    def step(self, closure=None):  # noqa: D102 - torch's
        factors = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * group["lr"]
        try:
            return super().step(closure)
        finally:
            for group, factor in zip(self.param_groups, factors):
                group["lr"] = factor


@dataclass(frozen=True)
class GroupedAdamW:
    """Optimiser factory of the loop: one AdamW whose groups are the tagged parameters' groups.

    Attributes:
        lrs: learning rate per group name.
        weight_decays: weight decay per group name (0 when absent).
    """

    lrs: dict[str, float]
    weight_decays: dict[str, float] = field(default_factory=dict)

    def __call__(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        by_name: dict[str, list[nn.Parameter]] = {name: [] for name in self.lrs}
        for parameter in params:
            name = getattr(parameter, GROUP_ATTRIBUTE, None)
            if name not in by_name:
                raise ValueError(f"a trained parameter of shape {tuple(parameter.shape)} has no optimiser group "
                                 f"(tag {name!r}; groups {sorted(by_name)})")
            by_name[name].append(parameter)
        groups = [{"params": by_name[name], "lr": 1.0, "initial_lr": lr, "name": name,
                   "weight_decay": self.weight_decays.get(name, 0.0)} for name, lr in self.lrs.items() if by_name[name]]
        return FactorAdamW(groups)


def optimizer_factory(section: Any, *, train_head: bool = True) -> GroupedAdamW:
    """The :class:`GroupedAdamW` of a ``stego``/``hp`` section (the projector, HP only, learns at the head's rate)."""
    head_lr = section.head_lr if train_head else 0.0
    return GroupedAdamW(lrs={"head": head_lr, "linear_probe": section.linear_lr, "cluster_probe": section.cluster_lr,
                             "projector": head_lr},
                        weight_decays={"head": section.head_weight_decay})


def heads_shape(section: Any, num_classes: int, in_dim: int) -> dict[str, Any]:
    """The constructor arguments of ``STEGOHeads``/``HPHeads`` (recorded in checkpoints for prediction)."""
    return {"in_dim": int(in_dim), "dim": int(section.dim), "num_classes": int(num_classes),
            "extra_clusters": int(section.extra_clusters), "nonlinear": bool(section.nonlinear),
            "dropout": float(section.dropout)}


__all__ = ["GROUP_ATTRIBUTE", "GroupedAdamW", "WorkerFeaturizer", "heads_shape", "optimizer_factory",
           "step_generator", "step_seed", "tag_param_groups", "world_rank"]


# -- the Ray Train wiring -------------------------------------------------------------------------

KINDS = ("stego", "hp", "random_head")


def item_count(data: str, section: Any) -> int:
    """Training items of ``data``'s train split: images x crops per image."""
    from lussray.data.scene_views import num_crops
    from lussray.data.shards import read_manifest

    return int(read_manifest(data, "train")["num_samples"]) * num_crops(section.crop_type)


def run_seed(config: Any, section: Any) -> int:
    """The seed of a STEGO/HP run's random choices.

    TODO(seed): the run-wide top-level ``seed`` key is coming (the lead's loop change); until it
    lands the stage's ``loop.seed`` is the run's seed.
    """
    return int(getattr(config, "seed", section.loop.seed))


def adapter_factory(kind: str, spec: FeaturizerSpec, heads: dict[str, Any], section: Any, *, seed: int,
                    total_steps: int) -> Any:
    """A picklable zero-argument factory of the ``Method`` adapter of ``kind`` (built on each worker)."""
    from functools import partial

    if kind == "random_head":
        from lussray.stages.stego import ProbeOnlyAdapter

        return partial(ProbeOnlyAdapter, spec, heads, seed=seed)
    if kind == "stego":
        from lussray.stages.stego import StegoAdapter

        names = ("pos_intra_shift", "pos_inter_shift", "neg_inter_shift", "pos_intra_weight", "pos_inter_weight",
                 "neg_inter_weight", "feature_samples", "neg_samples", "pointwise", "zero_clamp", "stabilize")
        return partial(StegoAdapter, spec, heads, correspondence={n: getattr(section, n) for n in names},
                       correspondence_weight=section.correspondence_weight, seed=seed)
    from lussray.stages.hp import HPAdapter

    names = ("pool_size", "tau", "alpha", "rho", "ema_m", "warmup", "renew_interval", "reweighting", "sigma",
             "grad_norm")
    return partial(HPAdapter, spec, heads, method={n: getattr(section, n) for n in names}, total_steps=total_steps,
                   seed=seed)


def batch_function(kind: str, section: Any, data: str, knn: str | None) -> tuple[Any, dict[str, Any]]:
    """The ingest batch function of ``kind`` and its keyword arguments (besides ``seed`` and ``epoch``)."""
    from lussray.data import scene_views

    common = {"res": section.res, "crop_type": section.crop_type, "crop_ratio": section.crop_ratio}
    if kind == "stego":
        return scene_views.stego_batch, {**common, "num_neighbors": section.num_neighbors,
                                         "partners": {"knn": knn, "data": data, "split": "train"}}
    if kind == "hp":
        return scene_views.hp_batch, {**common, "jitter": list(section.jitter), "jitter_p": section.jitter_p,
                                      "grayscale_p": section.grayscale_p, "blur_p": section.blur_p}
    return scene_views.hp_batch, {**common, "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}


def build_spec(config: Any, data: str, run: str, *, kind: str, stage: str, section: Any, spec: FeaturizerSpec,
               in_dim: int, max_steps: int | None = None) -> Any:
    """The loop's :class:`~lussray.stages.loop.LoopSpec` of a STEGO, HP or random-head run."""
    from lussray.config import to_dict
    from lussray.stages.loop import LoopSpec, steps_per_epoch

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    loop = section.loop
    steps = steps_per_epoch(item_count(data, section), loop, stage, storage.join(data, "train"))
    caps = [value for value in (max_steps, section.max_steps) if value]
    last = min([loop.epochs * steps, *caps])
    heads = heads_shape(section, config.dataset.num_classes, in_dim)
    seed = run_seed(config, section)
    record = {"kind": kind, "shape": heads, "featurizer": dataclasses.asdict(spec)}
    return LoopSpec(
        stage=stage,
        method_factory=adapter_factory(kind, spec, heads, section, seed=seed, total_steps=last),
        optimizer_factory=optimizer_factory(section, train_head=kind != "random_head"),
        lr_at=constant_factor,
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
        shuffle_buffer_size=config.ingest.shuffle_buffer_size,
        torch_threads=loop.torch_threads,
        resolved_config={**to_dict(config), "seed": seed, "heads": record},
    )


def constant_factor(step: int, total_steps: int) -> float:
    """The learning-rate schedule of STEGO and HP: constant (each group keeps its own rate)."""
    return 1.0


def fingerprint(config: Any, data: str, run: str, *, kind: str, section_key: str, spec: FeaturizerSpec,
                knn: str | None) -> dict[str, Any]:
    """What determines a STEGO/HP/random-head training folder (:mod:`lussray.completion`)."""
    from lussray.completion import FORMAT_VERSION, config_fingerprint, data_fingerprint, sha256_bytes

    knn_record = None
    if knn is not None:
        inputs = storage.join(knn, "inputs.json")
        knn_record = sha256_bytes(storage.read_bytes(inputs)) if storage.exists(inputs) else None
    return {"format": FORMAT_VERSION, "kind": kind,
            **config_fingerprint(config, section_key, "dataset.num_classes"),
            "featurizer": spec.fingerprint(run), "data": data_fingerprint(data, ["train"]), "knn": knn_record}


def train(config: Any, data: str, run: str, *, kind: str, stage: str, section_key: str, spec: FeaturizerSpec,
          in_dim: int, knn: str | None = None, max_steps: int | None = None, overwrite: bool = False) -> str:
    """Train (resume, or skip when complete) a STEGO, HP or random-head run into ``<run>/<stage>``.

    Returns:
        The latest intact checkpoint.
    """
    from lussray.data.ingest import init_ray, read_split
    from lussray.data.shards import read_manifest
    from lussray.stages.loop import fit, run_training

    section = getattr(config, section_key)
    loop_spec = build_spec(config, data, run, kind=kind, stage=stage, section=section, spec=spec, in_dim=in_dim,
                           max_steps=max_steps)
    batch_fn, fn_kwargs = batch_function(kind, section, data, knn)
    members = ("jpg", "seg.png") if read_manifest(data, "train").get("has_segmentation") else ("jpg",)
    seed = loop_spec.resolved_config["seed"]

    def start() -> None:
        init_ray(config.ray)
        # TODO(epoch stream): one seeded stream per epoch once the loop takes an EpochStream; with a
        # single dataset every epoch repeats epoch 0's draws (photometric views, KNN partners).
        dataset = read_split(data, "train", shuffle_files=config.ingest.shuffle_files, members=members).map_batches(
            batch_fn, fn_kwargs={**fn_kwargs, "seed": seed, "epoch": 0}, batch_size=config.ingest.map_batch_size,
            batch_format="numpy", num_cpus=config.ingest.cpus_per_map_task)
        fit(loop_spec, dataset, section.loop, config.ingest, run)

    record = fingerprint(config, data, run, kind=kind, section_key=section_key, spec=spec, knn=knn)
    return run_training(loop_spec, record, overwrite=overwrite, start=start)
