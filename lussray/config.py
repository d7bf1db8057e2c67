"""Configuration: one typed schema, YAML presets, experiment files and ``key=value`` overrides.

Load order (later wins): the schema defaults, ``configs/base.yaml``,
``configs/dataset/<name>.yaml``, ``configs/method/<method>.yaml``, ``configs/method/<method>/<name>.yaml``
(where present), an experiment file (``--config``), dotlist overrides.
Every layer is validated against the schema, so an unknown key or a value of the wrong
type is a :class:`ConfigError` that names the key and the file it came from. The merged result
is then checked value by value: each numeric field is declared with :func:`ranged` (its allowed
range; a unit test refuses a numeric field without one), each string with fixed choices with
:func:`one_of`, and ``ORDERED`` / ``SAME_LENGTH`` class attributes state the cross-key rules, so a
zero batch size or a tau of 2 is refused, naming the dotted key and its range, before any Ray work.

Hyperparameters of the published runs come from PASS ``scripts/luss{50,300,919}_pass.sh``
(shared/reference/pass-imagenet-s.md, section 1). The schema is the single source of the
field documentation; ``lussray <cmd> --dry-run`` prints the resolved config.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
DATASET_DIR = CONFIG_ROOT / "dataset"
METHOD_DIR = CONFIG_ROOT / "method"
BASE_FILE = CONFIG_ROOT / "base.yaml"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass(frozen=True)
class Range:
    """The values a numeric key accepts (every element, for a list): finite, ``low <= value <= high``.

    ``None`` leaves that side open; ``strict`` excludes ``low`` itself (``value > low``).
    """

    low: float | None = None
    high: float | None = None
    strict: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.strict else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        low = "-inf" if self.low is None else _number(self.low)
        if self.high is None:
            return f"{'>' if self.strict else '>='} {low}" if self.low is not None else "finite"
        return f"in {'(' if self.strict else '['}{low}, {_number(self.high)}]"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def ranged(default: Any = MISSING, low: float | None = None, high: float | None = None, *,
           above: float | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A numeric schema field and its range: ``num_workers: int = ranged(2, 1)`` accepts 1, 2, ...

    Args:
        default: the default value (``None`` for an Optional key: None stays allowed).
        low: the smallest value allowed.
        high: the largest value allowed.
        above: instead of ``low``, a bound the value must exceed (``ranged(0.1, above=0)``: > 0).
        factory: the default of a list field, instead of ``default`` (each element is checked).
    """
    limits = Range(above, high, strict=True) if above is not None else Range(low, high)
    if factory is not None:
        return field(default_factory=factory, metadata={"range": limits})
    return field(default=default, metadata={"range": limits})


def one_of(default: str | None, choices: tuple[str, ...]) -> Any:
    """A string schema field that accepts only ``choices`` (and None, for an Optional key)."""
    return field(default=default, metadata={"choices": choices})


@dataclass(frozen=True)
class DatasetConfig:
    """Which categories the dataset has and how its shards are cut."""

    name: str = "synthetic-demo"
    num_classes: int = ranged(50, 1, 999)  # N; ids are 1..N, 0 is other, 1000 ignore
    category_file: Optional[str] = None  # one wnid per line; default: folders of validation-segmentation/
    samples_per_shard: int = ranged(10000, 1)  # ~10k samples (~1 GB of ImageNet JPEGs) per webdataset shard
    max_shard_bytes: int = ranged(1_000_000_000, 1)
    # prepare skips images beyond these limits (listed in the manifest) so no resize explodes:
    max_aspect: float = ranged(20.0, 1)  # longer / shorter side; ImageNet's widest are ~ 8
    max_pixels: int = ranged(40_000_000, 1)  # H x W; ImageNet's largest are ~ 12.6M
    # Scene-centric data (lussray.data.scene): class ids 0..C-1 (num_classes = C), 1000 ignore, no other.
    kind: str = one_of("object", ("object", "scene"))  # object-centric (ImageNet-S) or scene-centric
    protocol: str = one_of("imagenet-s", ("imagenet-s", "pixel"))  # how `lussray evaluate` scores it
    has_other: bool = True  # id 0 is "other" (ImageNet-S); scene data has none
    layout: str = one_of("imagenet-s", ("imagenet-s", "cocostuff", "cityscapes", "scenes"))  # `prepare`'s reader
    image_list: str = one_of("curated", ("curated", "full"))  # COCO-Stuff: curated 49,629/2,175, full 97,702/4,172
    # Cityscapes: picie (train = train_extra + test, validation = train + val) or stego (STEGO/HP: train, val);
    # no default, the two protocols score differently (lussray.data.cityscapes)
    cityscapes_split: Optional[str] = None
    thing_classes: int = ranged(0, 0, 999)  # scene data: ids 0..thing_classes-1 are things (COCO-Stuff-27: 12)
    eval_crop_size: Optional[int] = ranged(None, 16)  # centre crop after ingest.eval_short_side (scenes: 320)


@dataclass(frozen=True)
class SynthConfig:
    """Defaults of ``lussray synth`` (its flags override them)."""

    ORDERED: ClassVar = (("semi_per_class", "train_per_class"),)  # train-semi images are train images

    classes: int = ranged(5, 1, 999)  # ids 1..N stay below the ignore id 1000
    train_per_class: int = ranged(60, 0)
    val_per_class: int = ranged(8, 0)
    test_per_class: int = ranged(8, 0)
    semi_per_class: int = ranged(4, 0)  # train-semi images (with ground truth) per class
    size: int = ranged(128, 16)
    seed: int = ranged(0, 0, 2**32 - 1)
    min_area: float = ranged(0.02, above=0, high=0.7)  # smallest area fraction of the main object
    background_contrast: float = ranged(1.0, 0, 1)  # 0: flat backgrounds, 1: full-contrast textures
    background_pool_size: int = ranged(32, 0)  # background styles shared by all images; 0: a new one per image
    background_saturation: float = ranged(1.0, 0, 1)  # 0: grey backgrounds (only objects carry hue), 1: as drawn
    # --kind scenes (lussray.data.synthetic_scenes): stuff regions + thing objects, class ids 0..C-1
    kind: str = one_of("objects", ("objects", "scenes"))
    thing_classes: int = ranged(6, 0, 499)  # ids 0..T-1
    stuff_classes: int = ranged(6, 1, 500)  # ids T..T+S-1
    train_images: int = ranged(240, 0)
    val_images: int = ranged(48, 0)


@dataclass(frozen=True)
class RayConfig:
    """Which Ray cluster a run uses, and how long it waits for it (lussray.stages.ray_cluster)."""

    # None: join RAY_ADDRESS if set (`ray job submit`, KubeRay), else start a private local cluster;
    # "auto" or an address: join that cluster; "local": a private local cluster even if RAY_ADDRESS is set.
    # A run never joins a cluster merely because one is running on the machine.
    address: Optional[str] = None
    # Logical CPUs of a local cluster. More than the physical cores on purpose: Ray Data needs
    # CPUs left over when Train workers or an actor pool hold theirs, or ingest hangs.
    num_cpus: Optional[int] = ranged(None, 1)
    # Whether the cluster adds nodes on demand; None: detect (a node type published to the GCS
    # that can still grow). Without one, a request the cluster cannot hold fails at once.
    autoscaler: Optional[bool] = None
    # Seconds to wait for the autoscaler to add the nodes a Train fit or an actor pool needs.
    resource_wait_s: float = ranged(900.0, 0)
    # Seconds an actor pool may take to start its minimum actors (scheduling + the model load).
    actor_start_timeout_s: int = ranged(600, 1)
    # Seconds one ray.get on the k-means actors may wait (loading a group of embedding files included).
    get_timeout_s: float = ranged(3600.0, above=0)


@dataclass(frozen=True)
class MultiCropConfig:
    """Multi-crop views of SwAV/PASS: groups of RandomResizedCrops, the first group global."""

    SAME_LENGTH: ClassVar = ("num_crops", "crop_sizes", "min_scales", "max_scales")  # one entry per group
    ORDERED: ClassVar = (("min_scales", "max_scales"),)

    num_crops: list[int] = ranged(factory=lambda: [2], low=1)
    crop_sizes: list[int] = ranged(factory=lambda: [224], low=16)
    min_scales: list[float] = ranged(factory=lambda: [0.08], above=0, high=1)
    max_scales: list[float] = ranged(factory=lambda: [1.0], above=0, high=1)
    flip_p: float = ranged(0.5, 0, 1)
    # ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p = 0.8; the hue jitter 0.2s allows at most s = 2.5
    color_jitter_strength: float = ranged(1.0, 0, 2.5)
    grayscale_p: float = ranged(0.2, 0, 1)
    blur_p: float = ranged(0.5, 0, 1)  # Gaussian blur, radius uniform in [0.1, 2.0]


@dataclass(frozen=True)
class IngestConfig:
    """Ray Data ingest: decode + augmentation tasks feeding the Train workers."""

    map_batch_size: int = ranged(32, 1)  # images per map_batches call
    cpus_per_map_task: float = ranged(1.0, above=0)
    prefetch_batches: int = ranged(2, 0)
    # Object-store memory Ray Data may fill ahead of the Train workers. Bounding it keeps decode
    # from racing ahead and taking CPU from the model when both share a node.
    max_ahead_mb: int = ranged(512, 1)
    # Pause of Ray Data's scheduling loop after each step, in the Train worker that consumes the
    # stream. Without it a backpressured pipeline (read-ahead full, no task running) polls a whole
    # core while the worker trains: 4.1-4.9 CPU-s per idle 5 s (tools/bench_stream_idle.py). 0 = off.
    scheduler_pause_ms: float = ranged(10.0, 0)
    eval_short_side: int = ranged(256, 32)  # evaluation: Resize(256) of the shorter side, aspect kept
    finetune_crop_size: int = ranged(224, 32)  # joint RandomResizedCrop for (image, label) pairs
    finetune_min_scale: float = ranged(0.08, above=0, high=1)
    # Rows whose order one read task permutes (lussray.data.epoch_plan): every epoch the chunks of 64
    # samples are permuted over the whole split and dealt to the workers, then each window of this
    # many rows is read and mixed, so a batch draws rows from window_rows / 64 places of the split.
    # Memory: the window's encoded images (~110 KB each for ImageNet: 56 MB at 512).
    shuffle_window_rows: int = ranged(512, 1)


@dataclass(frozen=True)
class TrainLoopConfig:
    """The shared Ray Train loop of every training stage."""

    num_workers: int = ranged(2, 1)
    use_gpu: bool = False
    cpus_per_worker: float = ranged(0.5, 0)  # fractional on laptops so Ray Data keeps CPUs (see RayConfig)
    gpus_per_worker: float = ranged(1.0, above=0)  # used with use_gpu only
    batch_size_per_worker: int = ranged(32, 1)
    epochs: int = ranged(100, 1)
    base_lr: float = ranged(0.6, 0)
    final_lr: float = ranged(0.0006, 0)
    warmup_steps: int = ranged(0, 0)
    weight_decay: float = ranged(1e-6, 0)
    momentum: float = ranged(0.9, 0, 1)
    lars_trust_coefficient: float = ranged(0.001, above=0)
    amp: bool = True  # used on CUDA only
    sync_batchnorm: bool = True  # used on CUDA only
    checkpoint_every_steps: int = ranged(500, 1)
    max_failures: int = ranged(0, 0)  # Ray Train restarts after a worker failure (Ray's -1, forever, is refused)
    log_every_steps: int = ranged(10, 1)
    torch_threads: int = ranged(0, 0)  # intra-op threads per worker; 0 keeps Ray's default (its CPU count)


@dataclass(frozen=True)
class PretrainConfig:
    """Stage 1, PASS representation learning (SwAV + P2P + D2S)."""

    arch: str = "resnet50"
    hidden_mlp: int = ranged(2048, 1)
    feat_dim: int = ranged(128, 1)
    num_prototypes: int = ranged(3000, 1)
    temperature: float = ranged(0.1, above=0)
    sinkhorn_epsilon: float = ranged(0.05, above=0)
    sinkhorn_iterations: int = ranged(3, 1)
    queue_length: int = ranged(3840, 0)  # global; rounded down to a multiple of the global batch
    queue_start_epoch: int = ranged(15, 0)
    freeze_prototypes_steps: int = ranged(5005, 0)
    shallow_stages: list[int] = ranged(factory=lambda: [3], low=1, high=3)  # ResNet stages 1..3 (D2S)
    # weights of the image-to-image loss then one per shallow stage (paper eq. 5)
    loss_weights: list[float] = ranged(factory=lambda: [1.0, 1.0], low=0)
    p2p_weight: float = ranged(1.0, 0)
    p2p_grid_size: int = ranged(7, 1)
    # The split pretraining reads: "train" (the dataset's own), or "train-full", the ImageNet-1k train
    # set that the reference pretrains ImageNet-S919 on (`lussray prepare --imagenet-train DIR`).
    split: str = one_of("train", ("train", "train-full"))
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    loop: TrainLoopConfig = field(default_factory=TrainLoopConfig)


@dataclass(frozen=True)
class AttentionConfig:
    """Stage 2.1, pixel attention trained on the frozen backbone."""

    queue_length: int = ranged(3840, 0)
    queue_start_epoch: int = ranged(0, 0)
    freeze_prototypes_steps: int = ranged(0, 0)
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    loop: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(epochs=20))


@dataclass(frozen=True)
class LabelgenConfig:
    """Stage 2.2-2.4: embeddings, sharded k-means, the "other" threshold, pseudo labels."""

    ORDERED: ClassVar = (("tau_min", "tau_max"), ("actor_pool_min", "actor_pool_max"))

    num_clusters: Optional[int] = ranged(None, 1)  # None: the dataset's num_classes
    crop_size: int = ranged(224, 32)  # clustering embeds Resize(ingest.eval_short_side) + CenterCrop(crop_size)
    # Fixed "other" threshold (the attention scores and their per-image rescaling lie in [0, 1]);
    # None: sweep on tau_split
    tau: Optional[float] = ranged(None, 0, 1)
    # The split whose ground truth the sweep fits tau to. The reference uses validation, which then
    # scores pseudo labels with a threshold fitted to the very images they are scored on;
    # train-semi (labelled training images) keeps validation untouched by every stage.
    tau_split: str = one_of("validation", ("validation", "train-semi"))
    # What tau thresholds: "absolute" scores (the reference) or "image", each image's scores min-max
    # rescaled to [0, 1] (lussray.clustering.pixel_labels.SCORE_SCALES).
    score_scale: str = one_of("absolute", ("absolute", "image"))
    tau_min: float = ranged(0.0, 0, 1)
    tau_max: float = ranged(0.8, 0, 1)
    tau_step: float = ranged(0.01, above=0, high=1)
    kmeans_iterations: int = ranged(20, 1)
    kmeans_redo: int = ranged(30, 1)
    kmeans_actors: int = ranged(2, 1)
    # CPUs per k-means actor (also its search threads, at least 1); fractions pack many actors on a node
    kmeans_cpus_per_actor: float = ranged(1.0, above=0)
    spherical: bool = False
    actor_pool_min: int = ranged(1, 1)
    actor_pool_max: int = ranged(1, 1)
    gpus_per_actor: float = ranged(0.0, 0)
    cpus_per_actor: float = ranged(1.0, 0)
    torch_threads: int = ranged(0, 0)  # intra-op threads per actor; 0 keeps torch's default
    batch_size: int = ranged(64, 1)
    write_png_tree: bool = False  # also write the official <wnid>/<name>.png tree of the pseudo labels


@dataclass(frozen=True)
class FS4LabelsConfig:
    """FS^4's pyramid global guidance pseudo labels (``lussray fs4 labels``, Sec. 4.2.1 of the paper).

    Every training image gives six views (the whole image, four corner crops and the centre crop);
    each view's global feature from the initial model is clustered into ``num_clusters`` global
    clusters, and active selection keeps the ``keep_fraction`` of all views closest to their centre.
    """

    ORDERED: ClassVar = (("crop_size", "resize"),)

    num_clusters: int = ranged(50, 1)  # global clusters (the paper's default; Table 5: stable up to ~100)
    # Fraction of all views kept, ranked together by cosine distance to their own centre (the paper's 40 %)
    keep_fraction: float = ranged(0.4, above=0, high=1)
    # The six pyramid views (PGG); false: the whole image only, one label per image (Table 4's "GG"
    # row, with keep_fraction 1)
    pyramid: bool = True
    # Side of the five crops as a fraction of the image side (not in the paper; 0.5 tiles the image)
    crop_fraction: float = ranged(0.5, above=0, high=1)
    crop_view_size: int = ranged(640, 16)  # supplement A.1: the five crops are first resized to 640 x 640
    resize: int = ranged(256, 16)  # then every view: Resize(256 x 256) ...
    crop_size: int = ranged(224, 16)  # ... and CenterCrop(224), as the ISS models' inference
    # The global feature: "projector", the L2-normalised output of the projection head on pooled c4
    # (supplement A.1; PASS and SwAV files carry it), or "backbone", pooled c4 itself (Sec. 4.2.1;
    # MoCo-v2 files, whose MLP projector lussray does not load)
    feature: str = one_of("projector", ("projector", "backbone"))
    kmeans_iterations: int = ranged(20, 1)
    kmeans_redo: int = ranged(3, 1)
    batch_size: int = ranged(16, 1)  # images per forward pass of an embedding actor (x 6 views)


@dataclass(frozen=True)
class FS4Config:
    """FS^4 training on PiCIE's pixel clustering (the paper's supplement A.2 as defaults).

    ``labels`` is the pseudo-label stage; the other keys are read by the training stage: the CAM
    head and the CAE module (Secs. 4.2.2, 4.3), the loss weights of L = L_w + L_p (Eq. 5), the
    views of every selected pyramid view and the Adam loop (lr 1e-3, no weight decay, global batch
    128 = num_workers x batch_size_per_worker, 10 epochs).
    """

    labels: FS4LabelsConfig = field(default_factory=FS4LabelsConfig)
    cam_head: str = one_of("modified", ("modified", "classical"))  # q = g1(ReLU(GAP(g2(F)))) or GAP(g(F))
    cam_hidden_channels: Optional[int] = ranged(None, 1)  # width of g2's output (not in the paper); None: C
    cae: bool = True  # the context-aware embedding module (Sec. 4.3); false for the ablation's rows without it
    cae_chunk_mb: int = ranged(64, 1)  # memory budget of one chunk of the CAE relation map (lussray.models.cae)
    # Weight of L_w (Eq. 6)
    global_weight: float = ranged(1.0, 0)
    # Weight of lussray's picie_loss, which is the PiCIE reference's (L_within + L_cross) / 4: 4.0 gives
    # the paper's L = L_w + L_p (Eq. 5 with Eq. 1); 1.0 the PiCIE reference's pixel-loss scale
    pixel_weight: float = ranged(4.0, 0)
    # The training views of a selected pyramid view (supplement A.1): resized and centre-cropped to
    # base_size, random square crops of min_side..1 of its side resized to view_size, flips
    base_size: int = ranged(320, 16)
    view_size: int = ranged(320, 16)
    min_side: float = ranged(0.5, above=0, high=1)
    flip_p: float = ranged(0.5, 0, 1)
    loop: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(
        epochs=10, base_lr=1e-3, final_lr=1e-3, weight_decay=0.0, batch_size_per_worker=64))


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage 3, segmentation fine-tuning on pseudo labels."""

    loop: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(epochs=20))


@dataclass(frozen=True)
class PredictConfig:
    """Inference of a segmentation model over a split (actor pool), optional dense CRF."""

    ORDERED: ClassVar = (("actor_pool_min", "actor_pool_max"),)

    max_res: int = ranged(1000, 32)  # images with H*W > max_res^2 are predicted at height max_res, then resized
    actor_pool_min: int = ranged(1, 1)
    actor_pool_max: int = ranged(1, 1)
    gpus_per_actor: float = ranged(0.0, 0)
    cpus_per_actor: float = ranged(1.0, 0)
    torch_threads: int = ranged(0, 0)  # intra-op threads per actor; 0 keeps torch's default
    batch_size: int = ranged(16, 1)  # images per actor call; same-sized images share one forward pass
    crf: bool = False
    crf_iterations: int = ranged(10, 1)
    crf_pos_xy_std: float = ranged(1.0, above=0)
    crf_pos_w: float = ranged(3.0, 0)
    crf_bi_xy_std: float = ranged(67.0, above=0)
    crf_bi_rgb_std: float = ranged(3.0, above=0)
    crf_bi_w: float = ranged(4.0, 0)
    crf_timeout_s: float = ranged(60.0, above=0)


@dataclass(frozen=True)
class DistmatchConfig:
    """Distance-matching protocol: weighted kNN of pixels against train-semi instance embeddings."""

    ORDERED: ClassVar = (("actor_pool_min", "actor_pool_max"),)

    k: int = ranged(10, 1)
    temperature: float = ranged(0.07, above=0)
    feature_upsample: int = ranged(4, 1)  # c4 (stride 32) bilinearly upsampled x4: stride 8, as the reference
    actor_pool_min: int = ranged(1, 1)
    actor_pool_max: int = ranged(1, 1)
    gpus_per_actor: float = ranged(0.0, 0)
    cpus_per_actor: float = ranged(1.0, 0)
    torch_threads: int = ranged(0, 0)  # intra-op threads per actor; 0 keeps torch's default
    batch_size: int = ranged(16, 1)


@dataclass(frozen=True)
class PiCIEClusterConfig:
    """PiCIE's k-means after training (``lussray picie cluster``): the centroids predictions use.

    As the reference's final evaluation, a fresh k-means of the trained network's pixel features
    of the training images, seen as validation is (``ingest.eval_short_side`` + ``dataset.eval_crop_size``,
    no augmentation); the embedding pass uses the ``predict`` actor-pool settings.
    """

    pixels_per_image: int = ranged(100, 1)  # random pixels of every training image's feature map
    iterations: int = ranged(30, 1)  # Lloyd iterations per redo
    redo: int = ranged(1, 1)  # restarts; the lowest objective wins
    kmeans_actors: int = ranged(2, 1)  # actors holding the pixel embeddings (lussray.clustering.kmeans)
    cpus_per_actor: float = ranged(1.0, above=0)  # of each k-means actor (also its faiss threads)
    gpus_per_actor: float = ranged(0.0, 0)  # > 0: faiss GPU search in each k-means actor


@dataclass(frozen=True)
class PiCIEConfig:
    """PiCIE (``lussray picie train|cluster``, ``lussray run --method picie``); configs/method/picie.yaml.

    The backbone is ``pretrain.arch`` (its PASS stage-1 checkpoint initialises it in ``lussray run``).
    Views (lussray.data.picie_views): the base image is the shorter side resized to ``base_size``
    and centre-cropped (the reference's res2, 640), both network inputs are ``crop_size`` (res1, 320).
    """

    num_clusters: Optional[int] = ranged(None, 1)  # K; None: dataset.num_classes (27 on COCO-Stuff-27)
    overcluster_k: int = ranged(0, 0)  # "PiCIE + H": K of a second, over-clustering head (0: none)
    fpn_width: Optional[int] = ranged(None, 1)  # None: the reference's (128 for R18/34, 256 for R50)
    base_size: int = ranged(640, 16)  # res2: side of the base image the crop box lives in
    crop_size: int = ranged(320, 16)  # res1: side of both network inputs; features are crop_size / 4
    min_scale: float = ranged(0.5, above=0, high=1)  # smallest crop side as a fraction of the base side
    flip_p: float = ranged(0.5, 0, 1)
    jitter: list[float] = ranged(factory=lambda: [0.3, 0.3, 0.3, 0.1], low=0, high=1)  # brightness..hue
    jitter_p: float = ranged(0.8, 0, 1)  # probability of each jitter operation
    grayscale_p: float = ranged(0.2, 0, 1)
    blur_p: float = ranged(0.5, 0, 1)  # sigma uniform in [0.1, 2.0]
    spherical: bool = True  # cosine centroids; false: the reference's raw means and squared-L2 labels
    balance: str = one_of("frequency", ("frequency", "none"))  # CE class weights (the reference: frequencies)
    mse: bool = False  # the reference's --mse term between the two views' features
    kmeans_iterations: int = ranged(20, 1)  # Lloyd iterations of every epoch's k-means (reference KM_ITER)
    # seeding of every epoch's k-means: k-means++ (lussray), or random rows as the reference's faiss
    kmeans_init: str = one_of("kmeans++", ("kmeans++", "random"))
    # images of each epoch whose pixels enter its k-means (0: all); the reference's 20 init batches x 256
    kmeans_images: int = ranged(5120, 0)
    kmeans_pixels_per_image: int = ranged(640, 1)  # pixels of each such image and view (of 80 x 80 at res1 320)
    schedule: str = one_of("constant", ("constant", "cosine"))  # Adam's lr: loop.base_lr, or cosine to final_lr
    crf_alpha: float = ranged(10.0, above=0)  # --crf: probabilities softmax(alpha * cosine to the centroids)
    # initial_kmeans baseline: training images whose evaluation views re-estimate the untrained
    # network's BN statistics (0: keep the checkpoint's, e.g. a random network's mean 0 / variance 1)
    initial_bn_images: int = ranged(256, 0)
    cluster: PiCIEClusterConfig = field(default_factory=PiCIEClusterConfig)
    # The reference: Adam lr 1e-4, no weight decay, batch 128 (64 per worker on 2), 10 epochs.
    loop: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(
        batch_size_per_worker=64, epochs=10, base_lr=1e-4, final_lr=1e-4, weight_decay=0.0))


@dataclass(frozen=True)
class SemisupConfig:
    """Semi-supervised protocol: fine-tuning on train-semi ground truth (ignore 1000)."""

    min_scale: float = ranged(0.14, above=0, high=1)
    loop: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(epochs=100))


@dataclass(frozen=True)
class FeaturizerConfig:
    """The frozen featurizer of STEGO, HP and the KNN stage (lussray.models.vit, lussray.stages.featurizer)."""

    # A DINO ViT-S/8 or ViT-B/8 checkpoint file (a release file such as dino_deitsmall8_300ep_pretrain.pth,
    # or a state dict with a 'teacher' entry); `--featurizer FILE` sets it. None: the run's own PASS
    # stage-1 ResNet (pretrain.arch, the latest <run>/pretrain checkpoint, trained first by `lussray run`).
    file: Optional[str] = None
    # ResNet only (it has no attention): HP's local hidden positives use the cosine affinity of its
    # features divided by this, in place of the ViT's attention scores (lussray's choice, no reference value).
    affinity_temperature: float = ranged(0.1, above=0)
    resnet_upsample: int = ranged(4, 1, 32)  # c4 (stride 32) upsampled bilinearly: stride 8, as the ViT/8s


@dataclass(frozen=True)
class KnnConfig:
    """``lussray knn``: image-level features of the frozen featurizer and their top-k neighbours (STEGO's KNN pairs)."""

    ORDERED: ClassVar = (("actor_pool_min", "actor_pool_max"),)

    k: int = ranged(30, 1)  # neighbours kept per item, the item itself included (the reference's top-30)
    res: int = ranged(224, 16)  # Resize(res) + CenterCrop(res) before the featurizer (the reference's 224)
    # The items: each of the five crops of an image (STEGO's five-crop training data) or whole images.
    # Must equal stego.crop_type / stego.crop_ratio: the training pairs are items of the same kind.
    crop_type: str = one_of("five", ("five", "none"))
    crop_ratio: float = ranged(0.5, above=0, high=1)  # side of a five-crop over the image side
    search_actors: int = ranged(2, 1)  # actors holding the features (each searches its own rows)
    query_block_size: int = ranged(4096, 1)  # queries sent to every search actor at once
    blocks_in_flight: int = ranged(2, 1)  # query blocks searched while the driver merges earlier ones
    search_gpus_per_actor: float = ranged(0.0, 0)  # > 0: a search actor's rows on its GPU (needs faiss-gpu)
    actor_pool_min: int = ranged(1, 1)
    actor_pool_max: int = ranged(1, 1)
    gpus_per_actor: float = ranged(0.0, 0)
    cpus_per_actor: float = ranged(1.0, 0)
    torch_threads: int = ranged(0, 0)  # intra-op threads per actor; 0 keeps torch's default
    batch_size: int = ranged(64, 1)  # images per featurizer forward


@dataclass(frozen=True)
class SceneHeadConfig:
    """What STEGO and HP share: the segmentation head, the probes, the training crops, the optimiser groups.

    The optimiser is one AdamW with a parameter group per module and its own learning rate (AdamW
    with weight decay 0 is Adam: the references' separate Adam optimisers); the learning rates are
    constant, as the references'. ``loop.base_lr``, ``final_lr``, ``momentum`` and
    ``lars_trust_coefficient`` are not read.
    """

    dim: int = ranged(70, 1)  # code dimension of the head (STEGO 70, 100 in its Cityscapes checkpoint; HP 512)
    extra_clusters: int = ranged(0, 0)  # cluster-probe centroids beyond dataset.num_classes
    nonlinear: bool = True  # the head's nonlinear branch (projection_type: nonlinear)
    dropout: float = ranged(0.1, 0, 1)  # Dropout2d before each head branch and on the frozen features
    res: int = ranged(224, 16)  # each training crop: Resize(res) + CenterCrop(res)
    # five crops per image (the references' cropped datasets): an epoch trains on one crop of every
    # image, the five in turn, so five epochs are one epoch of the references' five-crop data
    crop_type: str = one_of("five", ("five", "none"))
    crop_ratio: float = ranged(0.5, above=0, high=1)
    head_lr: float = ranged(5e-4, 0)
    head_weight_decay: float = ranged(0.0, 0)
    linear_lr: float = ranged(5e-3, 0)  # the linear probe (it trains on ground truth: evaluation only)
    cluster_lr: float = ranged(5e-3, 0)
    cluster_alpha: float = ranged(2.0, above=0)  # prediction scores softmax(alpha * cos), the reference's 2
    flip_tta: bool = False  # predict with the mean code of the image and its mirror image
    max_steps: Optional[int] = ranged(None, 1)  # stop after this many steps (STEGO: 5000); None: loop.epochs
    loop: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(batch_size_per_worker=16, epochs=5))


@dataclass(frozen=True)
class StegoConfig(SceneHeadConfig):
    """STEGO: correspondence distillation with self, KNN and random-image pairs (seed-methods.md 2.3)."""

    num_neighbors: int = ranged(7, 1)  # the KNN partner is drawn among the first this many neighbours (self excluded)
    correspondence_weight: float = ranged(1.0, 0)
    # shifts b and weights per pair type; defaults: the block active in STEGO's train_config.yml
    pos_intra_shift: float = ranged(0.18, -1, 1)
    pos_inter_shift: float = ranged(0.12, -1, 1)
    neg_inter_shift: float = ranged(0.46, -1, 1)
    pos_intra_weight: float = ranged(0.67, 0)
    pos_inter_weight: float = ranged(0.25, 0)
    neg_inter_weight: float = ranged(0.63, 0)
    feature_samples: int = ranged(11, 1)  # S x S random points per image
    neg_samples: int = ranged(5, 1)  # random partners per image
    pointwise: bool = True
    zero_clamp: bool = True
    stabilize: bool = False
    # subtract the batch's mean feature before the feature correlation (not in the reference; for
    # ReLU featurizers such as the PASS ResNet, whose cosines are all positive: methods/stego.py)
    center_features: bool = False
    flip_tta: bool = True  # STEGO's evaluation averages the codes of the image and its mirror image


@dataclass(frozen=True)
class HPConfig(SceneHeadConfig):
    """HP: hidden positives (seed-methods.md 3.2; defaults: COCO-Stuff-27's JSON)."""

    dim: int = ranged(512, 1)
    head_weight_decay: float = ranged(0.1, 0)  # AdamW on the head; the projector's group has none
    linear_lr: float = ranged(1e-3, 0)
    tau: float = ranged(0.8, above=0)  # contrastive temperature
    alpha: float = ranged(0.05, 0)  # weight of the consistency term
    rho: float = ranged(0.02, 0, 1)  # kept fraction of the non-positives in the denominator
    pool_size: int = ranged(2048, 1)  # M, entries of each reference pool
    renew_interval: int = ranged(100, 0)  # steps between renewals of the task-specific pool (0: never)
    ema_m: float = ranged(0.99, 0, 1)  # momentum of the EMA head
    warmup: int = ranged(1000, 0)  # steps before task-specific positives count (lambda ramps up after)
    reweighting: bool = True
    sigma: float = ranged(28.0, above=0)  # attention scale of the local hidden positives
    grad_norm: float = ranged(10.0, 0)  # clip the head's gradient norm (0: off)
    # recompute each image's loss terms in the backward pass: a GPU memory saving (B = 64: 2.5 GB
    # instead of ~40 GB) that costs a third of a CPU step; off in the CPU-sized scenes config
    checkpoint_loss: bool = True
    # photometric view of the consistency term (the reference's img_aug): ColorJitter, grayscale, blur
    jitter: list[float] = ranged(factory=lambda: [0.3, 0.3, 0.3, 0.1], low=0, high=1)
    jitter_p: float = ranged(0.8, 0, 1)
    grayscale_p: float = ranged(0.2, 0, 1)
    blur_p: float = ranged(0.5, 0, 1)
    # An epoch trains on one of the five crops of every image: HP's 3 epochs of its five-crop dataset are 15.
    loop: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(batch_size_per_worker=64, epochs=15))


@dataclass(frozen=True)
class FrozenKmeansConfig:
    """The ``frozen_kmeans`` baseline of STEGO/HP: k-means of the frozen features' pixels, no training.

    Its random choices (pixels, initial centroids) derive from the run's ``seed``.
    """

    pixels_per_image: int = ranged(64, 1)  # random stride-8 feature vectors per training item clustered
    iterations: int = ranged(20, 1)
    redo: int = ranged(3, 1)
    kmeans_actors: int = ranged(2, 1)


@dataclass(frozen=True)
class LussConfig:
    """The whole resolved configuration of a lussray run."""

    # The run's seed: every random choice of every stage derives from it (the epoch order and the
    # augmentation of every sample, model initialisation, k-means initialisation, baselines), so the
    # same seed, data and worker count give the same checkpoints and metrics (README, "Seeds").
    seed: int = ranged(0, 0, 2**32 - 1)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    labelgen: LabelgenConfig = field(default_factory=LabelgenConfig)
    fs4: FS4Config = field(default_factory=FS4Config)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    picie: PiCIEConfig = field(default_factory=PiCIEConfig)
    distmatch: DistmatchConfig = field(default_factory=DistmatchConfig)
    semisup: SemisupConfig = field(default_factory=SemisupConfig)
    featurizer: FeaturizerConfig = field(default_factory=FeaturizerConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    stego: StegoConfig = field(default_factory=StegoConfig)
    hp: HPConfig = field(default_factory=HPConfig)
    frozen_kmeans: FrozenKmeansConfig = field(default_factory=FrozenKmeansConfig)


def _is_numeric(hint: Any) -> bool:
    """Whether a field typed ``hint`` holds numbers: int, float, an Optional or a list of them (bool is not)."""
    return hint in (int, float) or (get_origin(hint) in (Union, list) and any(map(_is_numeric, get_args(hint))))


def unranged_keys(schema: type = LussConfig, prefix: str = "") -> list[str]:
    """Dotted keys of numeric fields declared without :func:`ranged` (the schema's own test keeps it empty)."""
    missing = []
    for spec in fields(schema):
        hint = get_type_hints(schema)[spec.name]
        if is_dataclass(hint):
            missing += unranged_keys(hint, f"{prefix}{spec.name}.")
        elif _is_numeric(hint) and "range" not in spec.metadata:
            missing.append(f"{prefix}{spec.name}")
    return missing


def _check_values(node: Any, prefix: str) -> None:
    for spec in fields(node):
        key, value = f"{prefix}{spec.name}", getattr(node, spec.name)
        if is_dataclass(value):
            _check_values(value, f"{key}.")
        elif value is None:  # omegaconf allows None for Optional keys only
            continue
        elif "range" in spec.metadata:
            limits = spec.metadata["range"]
            for index, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
                if item not in limits:
                    where = key if index is None else f"{key}[{index}]"
                    raise ConfigError(f"{where}={item} is out of range: must be {limits}")
        elif "choices" in spec.metadata and value not in spec.metadata["choices"]:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(spec.metadata['choices'])}")


def _check_relations(node: Any, prefix: str) -> None:
    """The class-level constraints: ``SAME_LENGTH`` lists, ``ORDERED`` (low, high) pairs (per element for lists)."""
    same = getattr(node, "SAME_LENGTH", ())
    if same and (len({len(getattr(node, name)) for name in same}) > 1 or not getattr(node, same[0])):
        lengths = ", ".join(f"{prefix}{name}={getattr(node, name)}" for name in same)
        raise ConfigError(f"{lengths}: need one entry each per crop group, at least one group")
    for low, high in getattr(node, "ORDERED", ()):
        lows, highs = getattr(node, low), getattr(node, high)
        pairs = zip(lows, highs) if isinstance(lows, list) else [(lows, highs)]
        for index, (small, large) in enumerate(pairs):
            if small is not None and large is not None and small > large:
                at = f"[{index}]" if isinstance(lows, list) else ""
                raise ConfigError(f"{prefix}{low}{at}={small} exceeds {prefix}{high}{at}={large}")
    for spec in fields(node):
        if is_dataclass(getattr(node, spec.name)):
            _check_relations(getattr(node, spec.name), f"{prefix}{spec.name}.")


def check_values(config: LussConfig) -> None:
    """Check every key against its range or choices, then the cross-key constraints.

    Raises:
        ConfigError: naming the first key (dotted path) out of range and its allowed range.
    """
    _check_values(config, "")
    _check_relations(config, "")


def flag_type(schema: type, name: str) -> Callable[[str], Any]:
    """An argparse ``type=`` for a flag that sets ``schema.name``: parses a number, applies that key's range."""
    limits = next(spec for spec in fields(schema) if spec.name == name).metadata["range"]
    hint = get_type_hints(schema)[name]
    parse_number = float if float in (hint, *get_args(hint)) else int

    def parse(text: str) -> Any:
        try:
            value = parse_number(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'' if parse_number is int else ' real'} number") \
                from None
        if value not in limits:
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {limits}")
        return value

    return parse


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


#: A method that extends another sits on its layers: FS^4 trains PiCIE's network with PiCIE's
#: clustering keys (``picie.*``), and its ``picie`` baseline must see PiCIE's own config.
METHOD_BASES: dict[str, str] = {"fs4": "picie"}


def method_files(method: str, dataset: str) -> list[Path]:
    """The config layers of ``method``: ``configs/method/<method>.yaml``, then its ``<method>/<dataset>.yaml`` if any.

    A method of :data:`METHOD_BASES` has its base method's layers first (``fs4``: ``picie.yaml``,
    ``picie/<dataset>.yaml``, ``fs4.yaml``, ``fs4/<dataset>.yaml``).

    Raises:
        ConfigError: if the method has no config file.
    """
    base = method_files(METHOD_BASES[method], dataset) if method in METHOD_BASES else []
    return base + _own_method_files(method, dataset)


def _own_method_files(method: str, dataset: str) -> list[Path]:
    path = METHOD_DIR / f"{method}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in METHOD_DIR.glob("*.yaml"))
        raise ConfigError(f"no config for method {method!r} ({path}); methods with a config: {', '.join(known)}")
    per_dataset = METHOD_DIR / method / f"{dataset}.yaml"
    return [path, per_dataset] if per_dataset.is_file() else [path]


def load_config(
    dataset: str = "synthetic-demo",
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    method: str = "pass",
) -> LussConfig:
    """Resolve the configuration of a run.

    Layers, later wins: the schema defaults, ``configs/base.yaml``, the dataset preset, the method's
    ``configs/method/<method>.yaml``, its ``configs/method/<method>/<dataset>.yaml`` (if present), the
    experiment file, the overrides.

    Args:
        dataset: a preset name from configs/dataset/.
        config_file: an experiment YAML overriding the preset.
        overrides: ``key=value`` strings (omegaconf dotlist), e.g. ``pretrain.loop.base_lr=0.3``.
        method: the method whose layers are merged after the dataset preset (``lussray run --method``).

    Raises:
        ConfigError: naming the file and key of the first value that does not fit the schema.
    """
    merged = OmegaConf.structured(LussConfig)
    merged = _merge_layer(merged, _load_yaml(BASE_FILE), str(BASE_FILE))
    dataset_path = dataset_file(dataset)
    merged = _merge_layer(merged, _load_yaml(dataset_path), str(dataset_path))
    for path in method_files(method, dataset):
        merged = _merge_layer(merged, _load_yaml(path), str(path))
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
    check_values(config)
    return config


def to_yaml(config: LussConfig) -> str:
    """The resolved config as YAML (for ``--dry-run`` and manifests)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Any) -> dict:
    """A config (or sub-config) as plain containers (for JSON manifests and checkpoints)."""
    container = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    assert isinstance(container, dict)
    return container
