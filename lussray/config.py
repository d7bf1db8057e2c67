"""Configuration: one typed schema, YAML presets, experiment files and ``key=value`` overrides.

Load order (later wins): the schema defaults, ``configs/base.yaml``,
``configs/dataset/<name>.yaml``, an experiment file (``--config``), dotlist overrides.
Every layer is validated against the schema, so an unknown key or a value of the wrong
type is a :class:`ConfigError` that names the key and the file it came from.

Hyperparameters of the published runs come from PASS ``scripts/luss{50,300,919}_pass.sh``
(shared/reference/pass-imagenet-s.md, section 1). The schema is the single source of the
field documentation; ``lussray <cmd> --dry-run`` prints the resolved config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
DATASET_DIR = CONFIG_ROOT / "dataset"
BASE_FILE = CONFIG_ROOT / "base.yaml"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass(frozen=True)
class DatasetConfig:
    """Which categories the dataset has and how its shards are cut."""

    name: str = "synthetic-demo"
    num_classes: int = 50  # N; ids are 1..N, 0 is other, 1000 ignore
    category_file: Optional[str] = None  # one wnid per line; default: folders of validation-segmentation/
    samples_per_shard: int = 10000  # ~10k samples (~1 GB of ImageNet JPEGs) per webdataset shard
    max_shard_bytes: int = 1_000_000_000


@dataclass(frozen=True)
class SynthConfig:
    """Defaults of ``lussray synth`` (its flags override them)."""

    classes: int = 5
    train_per_class: int = 60
    val_per_class: int = 8
    test_per_class: int = 8
    semi_per_class: int = 4  # train-semi images (with ground truth) per class
    size: int = 128
    seed: int = 0
    min_area: float = 0.02  # smallest area fraction of the main object
    background_contrast: float = 1.0  # 0: flat backgrounds, 1: full-contrast textures
    background_pool_size: int = 32  # background styles shared by all images; 0: a new one per image


@dataclass(frozen=True)
class RayConfig:
    """How to reach Ray: an address to join, else a local cluster of ``num_cpus`` logical CPUs."""

    # None: RAY_ADDRESS or a running cluster, else start a local one; "local": always a new local one
    address: Optional[str] = None
    # Logical CPUs of a local cluster. More than the physical cores on purpose: Ray Data needs
    # CPUs left over when Train workers or an actor pool hold theirs, or ingest hangs.
    num_cpus: Optional[int] = None


@dataclass(frozen=True)
class MultiCropConfig:
    """Multi-crop views of SwAV/PASS: groups of RandomResizedCrops, the first group global."""

    num_crops: list[int] = field(default_factory=lambda: [2])
    crop_sizes: list[int] = field(default_factory=lambda: [224])
    min_scales: list[float] = field(default_factory=lambda: [0.08])
    max_scales: list[float] = field(default_factory=lambda: [1.0])
    flip_p: float = 0.5
    color_jitter_strength: float = 1.0  # ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5  # Gaussian blur, radius uniform in [0.1, 2.0]


@dataclass(frozen=True)
class IngestConfig:
    """Ray Data ingest: decode + augmentation tasks feeding the Train workers."""

    map_batch_size: int = 32  # images per map_batches call
    cpus_per_map_task: float = 1.0
    prefetch_batches: int = 2
    # Object-store memory Ray Data may fill ahead of the Train workers. Bounding it keeps decode
    # from racing ahead and taking CPU from the model when both share a node.
    max_ahead_mb: int = 512
    eval_short_side: int = 256  # evaluation: Resize(256) of the shorter side, aspect kept
    finetune_crop_size: int = 224  # joint RandomResizedCrop for (image, label) pairs
    finetune_min_scale: float = 0.08
    shuffle_files: bool = True
    # Rows each Train worker mixes before batching (``iter_torch_batches``' local shuffle buffer):
    # on top of the mixed order `lussray prepare` writes, so every epoch sees other batches.
    shuffle_buffer_size: int = 256


@dataclass(frozen=True)
class TrainLoopConfig:
    """The shared Ray Train loop of every training stage."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional on laptops so Ray Data keeps CPUs (see RayConfig)
    gpus_per_worker: float = 1.0
    batch_size_per_worker: int = 32
    epochs: int = 100
    base_lr: float = 0.6
    final_lr: float = 0.0006
    warmup_steps: int = 0
    weight_decay: float = 1e-6
    momentum: float = 0.9
    lars_trust_coefficient: float = 0.001
    amp: bool = True  # used on CUDA only
    sync_batchnorm: bool = True  # used on CUDA only
    checkpoint_every_steps: int = 500
    max_failures: int = 0
    log_every_steps: int = 10
    torch_threads: int = 0  # intra-op threads per worker; 0 keeps Ray's default (its CPU count)
    seed: int = 10010


@dataclass(frozen=True)
class PretrainConfig:
    """Stage 1, PASS representation learning (SwAV + P2P + D2S)."""

    arch: str = "resnet50"
    hidden_mlp: int = 2048
    feat_dim: int = 128
    num_prototypes: int = 3000
    temperature: float = 0.1
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    queue_length: int = 3840  # global; rounded down to a multiple of the global batch
    queue_start_epoch: int = 15
    freeze_prototypes_steps: int = 5005
    shallow_stages: list[int] = field(default_factory=lambda: [3])
    # weights of the image-to-image loss then one per shallow stage (paper eq. 5)
    loss_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])
    p2p_weight: float = 1.0
    p2p_grid_size: int = 7
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    loop: TrainLoopConfig = field(default_factory=TrainLoopConfig)


@dataclass(frozen=True)
class AttentionConfig:
    """Stage 2.1, pixel attention trained on the frozen backbone."""

    queue_length: int = 3840
    queue_start_epoch: int = 0
    freeze_prototypes_steps: int = 0
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    loop: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(epochs=20))


@dataclass(frozen=True)
class LabelgenConfig:
    """Stage 2.2-2.4: embeddings, sharded k-means, the "other" threshold, pseudo labels."""

    num_clusters: Optional[int] = None  # None: the dataset's num_classes
    crop_size: int = 224  # clustering embeds Resize(ingest.eval_short_side) + CenterCrop(crop_size)
    tau: Optional[float] = None  # fixed "other" threshold; None: sweep on tau_split
    # The split whose ground truth the sweep fits tau to. The reference uses validation, which then
    # scores pseudo labels with a threshold fitted to the very images they are scored on;
    # train-semi (labelled training images) keeps validation untouched by every stage.
    tau_split: str = "validation"
    # What tau thresholds: "absolute" scores (the reference) or "image", each image's scores min-max
    # rescaled to [0, 1] (lussray.cluster.pixel_labels).
    score_scale: str = "absolute"
    tau_min: float = 0.0
    tau_max: float = 0.8
    tau_step: float = 0.01
    kmeans_iterations: int = 20
    kmeans_redo: int = 30
    kmeans_seed: int = 10010
    kmeans_actors: int = 2
    spherical: bool = False
    actor_pool_min: int = 1
    actor_pool_max: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    torch_threads: int = 0  # intra-op threads per actor; 0 keeps torch's default
    batch_size: int = 64
    write_png_tree: bool = False  # also write the official <wnid>/<name>.png tree of the pseudo labels


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage 3, segmentation fine-tuning on pseudo labels."""

    loop: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(epochs=20))


@dataclass(frozen=True)
class PredictConfig:
    """Inference of a segmentation model over a split (actor pool), optional dense CRF."""

    max_res: int = 1000  # images with H*W > max_res^2 are predicted at height max_res, then resized
    actor_pool_min: int = 1
    actor_pool_max: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    torch_threads: int = 0  # intra-op threads per actor; 0 keeps torch's default
    batch_size: int = 16  # images per actor call; same-sized images share one forward pass
    crf: bool = False
    crf_iterations: int = 10
    crf_pos_xy_std: float = 1.0
    crf_pos_w: float = 3.0
    crf_bi_xy_std: float = 67.0
    crf_bi_rgb_std: float = 3.0
    crf_bi_w: float = 4.0
    crf_timeout_s: float = 60.0


@dataclass(frozen=True)
class DistmatchConfig:
    """Distance-matching protocol: weighted kNN of pixels against train-semi instance embeddings."""

    k: int = 10
    temperature: float = 0.07
    feature_upsample: int = 4  # c4 (stride 32) bilinearly upsampled x4: stride 8, as the reference
    actor_pool_min: int = 1
    actor_pool_max: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    torch_threads: int = 0  # intra-op threads per actor; 0 keeps torch's default
    batch_size: int = 16


@dataclass(frozen=True)
class SemisupConfig:
    """Semi-supervised protocol: fine-tuning on train-semi ground truth (ignore 1000)."""

    min_scale: float = 0.14
    loop: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(epochs=100))


@dataclass(frozen=True)
class LussConfig:
    """The whole resolved configuration of a lussray run."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    labelgen: LabelgenConfig = field(default_factory=LabelgenConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    distmatch: DistmatchConfig = field(default_factory=DistmatchConfig)
    semisup: SemisupConfig = field(default_factory=SemisupConfig)


def available_datasets() -> list[str]:
    """Names accepted by ``--dataset`` (the files in configs/dataset/)."""
    return sorted(path.stem for path in DATASET_DIR.glob("*.yaml"))


def dataset_file(name: str) -> Path:
    """Path of the preset of dataset ``name``.

    Raises:
        ConfigError: if there is no such preset.
    """
    path = DATASET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(available_datasets())}")
    return path


def _merge_layer(merged: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(merged, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        reason = str(error).splitlines()[0]
        raise ConfigError(f"{source}: bad key {key!r}: {reason}") from None


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        layer = OmegaConf.load(path)
    except Exception as error:  # yaml errors carry no common base class here
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    return layer


def load_config(
    dataset: str = "synthetic-demo",
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> LussConfig:
    """Resolve the configuration of a run.

    Args:
        dataset: a preset name from configs/dataset/.
        config_file: an experiment YAML overriding the preset.
        overrides: ``key=value`` strings (omegaconf dotlist), e.g. ``pretrain.loop.base_lr=0.3``.

    Raises:
        ConfigError: naming the file and key of the first value that does not fit the schema.
    """
    merged = OmegaConf.structured(LussConfig)
    merged = _merge_layer(merged, _load_yaml(BASE_FILE), str(BASE_FILE))
    dataset_path = dataset_file(dataset)
    merged = _merge_layer(merged, _load_yaml(dataset_path), str(dataset_path))
    if config_file is not None:
        merged = _merge_layer(merged, _load_yaml(Path(config_file)), str(config_file))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        merged = _merge_layer(merged, OmegaConf.from_dotlist([item]), f"override {item!r}")
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        raise ConfigError(f"bad key {key!r}: {str(error).splitlines()[0]}") from None
    assert isinstance(config, LussConfig)
    return config


def to_yaml(config: LussConfig) -> str:
    """The resolved config as YAML (for ``--dry-run`` and manifests)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Any) -> dict:
    """A config (or sub-config) as plain containers (for JSON manifests and checkpoints)."""
    container = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    assert isinstance(container, dict)
    return container
