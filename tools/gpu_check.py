"""GPU check: every CUDA path of lussray's pure blocks once, timed, as one JSON report.

    python3 tools/gpu_check.py [--out gpu_check.json]    # one GPU, under 8 minutes by design
    python3 tools/gpu_check.py --only kmeans,pass_s919   # rerun some sections (name prefixes)
    python tools/gpu_check.py --cpu --out tmp.json       # every path on the CPU at toy size (the suite)

Sections (each timed with ``torch.cuda.synchronize`` on CUDA; a failing section records its error
and the rest still run):

- ``pass_<preset>_<dtype>``: PASS training steps (SwAV with a full queue + P2P + D2S) with AMP and
  LARS, the step of ``lussray.stages.loop`` (autocast, GradScaler for fp16, the method's hooks);
- ``attention_<preset>_<dtype>``: the pixel-attention step (stage 2.1);
- ``finetune_<preset>_<dtype>``: the segmenter's cross-entropy step (stage 4);
- ``distributed``: Sinkhorn under a world-size-1 process group (nccl on CUDA, gloo on the CPU)
  next to the single-process codes, and the S50 PASS step wrapped in DDP with distributed Sinkhorn;
- ``kmeans``: one k-means actor's iteration where its rows live
  (:func:`lussray.clustering.lloyd.device_block_stats`: search, float64 per-cluster sums and counts
  in torch on the device; 1M x 128, K=1000, and one S919 actor's 150,000 x 2048, K=919), next to
  the CPU paths (the same on the CPU, and :func:`lussray.clustering.lloyd.block_stats`) and the
  host-to-device copy of the points;
- ``jpeg_decode``: ``torchvision.io.decode_jpeg`` on the device (batched) next to the CPU
  decoders (:func:`lussray.data.augment.decode_image`, torchvision's CPU decode);
- ``inference_<preset>``: the label-generation embedding (``cluster_embedding``), the segmenter's
  inference rule (``infer_labels``) and the distance-matching vote (``knn_vote``);
- ``imports``: that none of Ray, faiss or omegaconf was imported.

Presets are the published S50 (R18, 2x224 + 6x96 crops, K=500) and S919 (R50, 2x224, K=3000)
configurations at one worker's batch of 32 (``configs/dataset/imagenet-s50.yaml``, ``-s919.yaml``;
a unit test checks that the figures below match them); dtypes are bf16 and fp16 autocast. The
script imports lussray from this source tree and needs torch, torchvision, numpy, scipy and
pillow only (no Ray, faiss or omegaconf), so it runs on a bare GPU machine. It writes the JSON to
``--out``, prints a table, and prints the JSON as its last line; the exit code is 1 when a section
failed. The file is rewritten after every section, so a crash of the process keeps what ran.

Step counts are fixed (3 warm-up and 20 timed steps per training section); sections that would
start after ``--budget-s`` (450 s) are recorded as skipped. At toy size (``--cpu``) the models are
ResNet-18 at 32/16 px, batch 2, and training runs without autocast, as lussray's loop does on the
CPU (CPU autocast backpropagates convolutions with slow reference kernels); the fp16 sections still
run the GradScaler. Not exercised: SyncBatchNorm (a world size of 1 falls back to BatchNorm) and
faiss-gpu (not installed on the GPU machine).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from lussray.clustering.lloyd import block_stats, device_assign, device_block_stats  # noqa: E402
from lussray.data import augment  # noqa: E402
from lussray.methods.knn import dense_features, knn_vote  # noqa: E402
from lussray.methods.pass_ import PASSMethod  # noqa: E402
from lussray.methods.sinkhorn import sinkhorn  # noqa: E402
from lussray.models.pass_model import PASSModel, PixelAttentionModel  # noqa: E402
from lussray.models.segmenter import Segmenter, infer_labels, segmentation_loss  # noqa: E402
from lussray.optim.lars import LARS  # noqa: E402

FORBIDDEN_MODULES = ("ray", "omegaconf", "faiss")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FEAT_DIM = 128
P2P_GRID_SIZE = 7
WEIGHT_DECAY = 1e-6
NUM_WORKERS = 8  # the published runs' workers: the per-worker queue is the global queue / 8


@dataclass(frozen=True)
class Preset:
    """One published configuration, as one Train worker of it sees it."""

    name: str
    arch: str
    hidden_mlp: int
    num_prototypes: int
    num_crops: tuple[int, ...]
    crop_sizes: tuple[int, ...]
    global_scale: tuple[float, float]
    queue_length: int  # pretrain, global
    attention_queue_length: int  # global
    num_classes: int
    pretrain_lr: float
    attention_lr: float
    finetune_lr: float
    batch_size: int = 32  # per worker
    labelgen_batch_size: int = 256
    eval_short_side: int = 256
    image_size: tuple[int, int] = (375, 500)  # a typical ImageNet image (H, W)
    knn_bank_size: int = 4096

    def queue_per_worker(self, queue_length: int) -> int:
        """The per-worker queue of ``lussray.stages.pretrain.queue_length_per_worker``."""
        global_batch = self.batch_size * NUM_WORKERS
        return (queue_length // global_batch) * global_batch // NUM_WORKERS


PRESETS = (
    Preset("s50", "resnet18", 512, 500, (2, 6), (224, 96), (0.14, 1.0), 2048, 3840, 50, 0.6, 6.0, 0.6),
    Preset("s919", "resnet50", 2048, 3000, (2,), (224,), (0.08, 1.0), 3840, 3840, 919, 0.6, 0.6, 0.6),
)


@dataclass(frozen=True)
class Sizes:
    """Step counts and problem sizes of one run (GPU: full size; --cpu: toy)."""

    warmup_steps: int
    timed_steps: int
    kmeans_points: int
    kmeans_dim: int
    kmeans_k: int
    kmeans_chunk: int
    kmeans_timed: int
    kmeans_cpu_timed: int
    kmeans_actor_shape: tuple[int, int, int]  # (rows, D, K) of one S919 actor on 8 GPUs
    jpeg_images: int
    jpeg_size: tuple[int, int]
    jpeg_timed: int
    sinkhorn_rows: int  # the large Sinkhorn problem (rows x K of S919)
    # Training under autocast. Off at toy size, as lussray's loop trains on the CPU (fp32): CPU
    # autocast backpropagates bf16/fp16 convolutions with slow reference kernels (20x fp32 here).
    train_autocast: bool = True


GPU_SIZES = Sizes(3, 20, 1_000_000, 128, 1000, 16384, 10, 3, (150_000, 2048, 919), 256, (375, 500), 20, 8192)
CPU_SIZES = Sizes(0, 1, 10_000, 16, 50, 4096, 1, 1, (2000, 32, 20), 8, (96, 128), 1, 256, train_autocast=False)


def toy(preset: Preset) -> Preset:
    """The preset at CPU toy size: ResNet-18, small heads, 32 and 16 px crops, batch 2, 8-row queue."""
    return replace(preset, arch="resnet18", hidden_mlp=64, num_prototypes=min(preset.num_prototypes, 32),
                   crop_sizes=tuple(32 if s > 100 else 16 for s in preset.crop_sizes),
                   queue_length=4 * 2 * NUM_WORKERS, attention_queue_length=4 * 2 * NUM_WORKERS,
                   num_classes=min(preset.num_classes, 9), batch_size=2, labelgen_batch_size=2, eval_short_side=32,
                   image_size=(40, 52), knn_bank_size=64)


# -- timing ------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def reset_peak(device: torch.device) -> None:
    """Free cached blocks and restart the peak-memory counter (CUDA only)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory since :func:`reset_peak`; on the CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def step_figures(seconds: list[float], images_per_step: int, device: torch.device) -> dict[str, float]:
    """Mean and median step time, images/s from the mean, peak memory."""
    mean = statistics.fmean(seconds)
    return {"step_ms": 1000 * mean, "step_ms_median": 1000 * statistics.median(seconds),
            "images_per_s": images_per_step / mean, "peak_memory_mb": peak_memory_mb(device)}


# -- inputs ------------------------------------------------------------------------------------


def normalize(views: Tensor, std: tuple[float, float, float]) -> Tensor:
    """uint8 (B, S, S, 3) to normalised float (B, 3, S, S), as ``lussray.stages.pretrain.normalize_views``.

    Copied (four lines) because that module imports the omegaconf schema.
    """
    x = views.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(augment.IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def random_views(preset: Preset, num_crops: tuple[int, ...], crop_sizes: tuple[int, ...], device: torch.device,
                 generator: torch.Generator) -> list[Tensor]:
    """uint8 (B, S, S, 3) views on the device, global views first (the decoded batch of Ray Data)."""
    return [torch.randint(0, 256, (preset.batch_size, size, size, 3), dtype=torch.uint8, device=device,
                          generator=generator)
            for count, size in zip(num_crops, crop_sizes) for _ in range(count)]


def p2p_grids(preset: Preset, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    """P2P grids of two global RandomResizedCrops per image (``augment.correspondence_grids_batch``)."""
    rng = np.random.default_rng(seed)
    height, width = preset.image_size
    boxes = [[augment.sample_crop_box(rng, height, width, preset.global_scale).as_array() for _ in range(2)]
             for _ in range(preset.batch_size)]
    boxes_array = np.asarray(boxes, np.float32)
    grid_a, grid_b = augment.correspondence_grids_batch(boxes_array[:, 0], boxes_array[:, 1], P2P_GRID_SIZE)
    return torch.from_numpy(grid_a).to(device), torch.from_numpy(grid_b).to(device)


def fill_queue(losses: PASSMethod, generator: torch.Generator) -> None:
    """Fill the SwAV queue with unit rows, so every timed step scores and uses it (steady state)."""
    queue = losses.queue
    if queue.length:
        rows = torch.randn(queue.embeddings.shape, generator=generator, device=queue.embeddings.device)
        queue.push(nn.functional.normalize(rows, dim=2))


def device_generator(device: torch.device, seed: int = 0) -> torch.Generator:
    """A seeded generator on ``device``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# -- training steps ----------------------------------------------------------------------------


class TrainStep:
    """One step of ``lussray.stages.loop.train_loop_per_worker``: hooks, autocast, scaler, LARS.

    The GradScaler runs for fp16 (also without autocast, at toy size); bf16 has fp32's range and
    needs no loss scaling.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[int], Tensor], lr: float, device: torch.device,
                 dtype: torch.dtype, before: Callable[[int], None] | None = None,
                 after: Callable[[int], None] | None = None) -> None:
        self.model, self.loss_fn, self.device, self.dtype = model, loss_fn, device, dtype
        self.autocast = True
        self.before, self.after = before, after
        self.optimizer = LARS([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=WEIGHT_DECAY)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.step = 0
        self.losses: list[float] = []

    def __call__(self) -> None:
        if self.before:
            self.before(self.step)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            loss = self.loss_fn(self.step)
        value = loss.item()  # the loop checks every loss on the host
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.after:
            self.after(self.step)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.losses.append(value)
        self.step += 1


def run_steps(step: TrainStep, images_per_step: int, sizes: Sizes) -> dict[str, float]:
    """Time ``step`` and report its figures, the first and last loss and the final grad scale."""
    step.autocast = sizes.train_autocast
    seconds = timed(step, step.device, sizes.warmup_steps, sizes.timed_steps)
    figures = step_figures(seconds, images_per_step, step.device)
    figures.update(autocast=step.autocast, loss_first=step.losses[0], loss_last=step.losses[-1],
                   parameters_m=sum(p.numel() for p in step.model.parameters()) / 1e6)
    if step.scaler.is_enabled():
        figures["grad_scale"] = float(step.scaler.get_scale())
    return figures


def pass_step(preset: Preset, device: torch.device, dtype: torch.dtype, distributed: bool = False) -> TrainStep:
    """The stage-1 PASS step of ``PretrainMethod`` (SwAV + P2P + D2S, queue full, prototypes learning)."""
    generator = device_generator(device)
    model = PASSModel(arch=preset.arch, hidden_dim=preset.hidden_mlp, feat_dim=FEAT_DIM,
                      num_prototypes=preset.num_prototypes, shallow_stages=(3,)).to(device)
    if distributed:
        device_ids = [device.index or 0] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    losses = PASSMethod(feat_dim=FEAT_DIM, queue_length_per_worker=preset.queue_per_worker(preset.queue_length),
                        queue_start_epoch=0, freeze_prototypes_steps=0, loss_weights=(1.0, 1.0),
                        distributed=distributed).to(device)
    fill_queue(losses, generator)
    views_u8 = random_views(preset, preset.num_crops, preset.crop_sizes, device, generator)
    grids = p2p_grids(preset, device)

    def loss_fn(step: int) -> Tensor:
        views = [normalize(v, augment.MULTICROP_STD) for v in views_u8]
        return losses.training_step(model, views, grids, step, 0)[0]

    return TrainStep(model, loss_fn, preset.pretrain_lr, device, dtype,
                     before=lambda s: losses.before_step(model, s), after=lambda s: losses.after_backward(model, s))


def attention_step(preset: Preset, device: torch.device, dtype: torch.dtype) -> TrainStep:
    """The stage-2.1 step of ``AttentionMethod``: 2 global views, SwAV on attention-pooled embeddings."""
    generator = device_generator(device)
    model = PixelAttentionModel(arch=preset.arch, hidden_dim=preset.hidden_mlp, feat_dim=FEAT_DIM,
                                num_prototypes=preset.num_prototypes, shallow_stages=()).to(device)
    queue = preset.queue_per_worker(preset.attention_queue_length)
    losses = PASSMethod(feat_dim=FEAT_DIM, queue_length_per_worker=queue, queue_start_epoch=0,
                        freeze_prototypes_steps=0, loss_weights=(1.0,)).to(device)
    fill_queue(losses, generator)
    views_u8 = random_views(preset, (2,), preset.crop_sizes[:1], device, generator)

    def loss_fn(step: int) -> Tensor:
        views = [normalize(v, augment.MULTICROP_STD) for v in views_u8]
        return losses.training_step(model, views, None, step, 0)[0]

    return TrainStep(model, loss_fn, preset.attention_lr, device, dtype,
                     before=lambda s: losses.before_step(model, s), after=lambda s: losses.after_backward(model, s))


def finetune_step(preset: Preset, device: torch.device, dtype: torch.dtype) -> TrainStep:
    """The stage-4 step of ``SegmentationMethod``: segmenter + cross-entropy on pseudo labels."""
    generator = device_generator(device)
    model = Segmenter(preset.arch, preset.num_classes + 1).to(device)
    size = preset.crop_sizes[0]
    images_u8 = torch.randint(0, 256, (preset.batch_size, size, size, 3), dtype=torch.uint8, device=device,
                              generator=generator)
    labels = torch.randint(0, preset.num_classes + 1, (preset.batch_size, size, size), device=device,
                           generator=generator)

    def loss_fn(step: int) -> Tensor:
        loss, accuracy = segmentation_loss(model(normalize(images_u8, augment.IMAGENET_STD)), labels)
        float(accuracy)  # the method logs it every step (one more host sync)
        return loss

    return TrainStep(model, loss_fn, preset.finetune_lr, device, dtype)


# -- distributed -------------------------------------------------------------------------------


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[str]:
    """A world-size-1 process group (nccl on CUDA, gloo on the CPU) over a file store."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as folder:
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, init_method=f"file://{folder}/store", rank=0, world_size=1, **kwargs)
        try:
            yield backend
        finally:
            dist.destroy_process_group()


def distributed_section(presets: tuple[Preset, ...], device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Sinkhorn with and without all-reduces under a world-size-1 group, and a DDP PASS step."""
    s50, s919 = presets
    generator = device_generator(device)
    figures: dict[str, Any] = {}
    with process_group(device) as backend:
        figures["backend"] = backend
        # Per assignment crop of an S919 worker: its queue rows, then its batch; and a large problem.
        problems = {"step": (s919.queue_per_worker(s919.queue_length) + s919.batch_size, s919.num_prototypes),
                    "large": (sizes.sinkhorn_rows, s919.num_prototypes)}
        worst = 0.0
        for name, shape in problems.items():
            scores = nn.functional.normalize(torch.randn(shape, device=device, generator=generator), dim=1)
            codes = {}
            for distributed, label in ((False, "local"), (True, "allreduce")):
                seconds = timed(lambda: codes.__setitem__(distributed, sinkhorn(scores, distributed=distributed)),
                                device, sizes.warmup_steps, sizes.timed_steps)
                figures[f"sinkhorn_{name}_{label}_ms"] = 1000 * statistics.fmean(seconds)
            worst = max(worst, float((codes[True] - codes[False]).abs().max()))
            figures[f"sinkhorn_{name}_rows"], figures["sinkhorn_prototypes"] = shape
        figures["sinkhorn_max_abs_diff"] = worst
        if worst > 1e-6:
            raise AssertionError(f"distributed Sinkhorn differs from the local codes: {json.dumps(figures)}")
        reset_peak(device)
        ddp = run_steps(pass_step(s50, device, torch.float16, distributed=True), s50.batch_size, sizes)
        figures.update({f"ddp_{s50.name}_fp16_{key}": value for key, value in ddp.items()})
    return figures


# -- k-means -----------------------------------------------------------------------------------


def clustered_points(sizes: Sizes, generator: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    """Points around K random centres and K initial centroids (rows of the points), float32."""
    centres = torch.randn(sizes.kmeans_k, sizes.kmeans_dim, device=device, generator=generator)
    labels = torch.randint(0, sizes.kmeans_k, (sizes.kmeans_points,), device=device, generator=generator)
    points = centres[labels] + 0.5 * torch.randn(sizes.kmeans_points, sizes.kmeans_dim, device=device,
                                                 generator=generator)
    rows = torch.randperm(sizes.kmeans_points, device=device, generator=generator)[:sizes.kmeans_k]
    return points, points[rows].clone()


def kmeans_section(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """A k-means actor's iteration on the device (lloyd.device_block_stats) next to the CPU paths.

    The device figures are those of :class:`lussray.clustering.kmeans.EmbeddingShard` with the
    torch engine, whose rows stay on its GPU: one E-step per iteration, only the (K, D) sums and
    K counts copied back. ``s919_actor_*`` times the same step at the shape of one actor of
    ImageNet-S919 on 8 GPUs (150,000 x 2048, K=919), the shape of bench_kmeans's projection.
    """
    cpu = torch.device("cpu")
    points_cpu, centroids_cpu = clustered_points(sizes, device_generator(cpu), cpu)
    started = time.perf_counter()
    points = points_cpu.to(device)
    synchronize(device)
    h2d_s = time.perf_counter() - started
    centroids = centroids_cpu.to(device)
    out: dict[str, Any] = {}
    device_s = timed(lambda: out.__setitem__("device", device_block_stats(points, centroids, False,
                                                                          sizes.kmeans_chunk)),
                     device, sizes.warmup_steps, sizes.kmeans_timed)
    cpu_s = timed(lambda: out.__setitem__("cpu", device_block_stats(points_cpu, centroids_cpu, False)),
                  cpu, 1, sizes.kmeans_cpu_timed)
    distances_cpu, ids_cpu = device_assign(points_cpu, centroids_cpu, False)
    started = time.perf_counter()
    stats = block_stats(points_cpu.numpy(), ids_cpu.numpy(), distances_cpu.numpy(), sizes.kmeans_k)
    block_stats_s = time.perf_counter() - started
    ids = device_assign(points, centroids, False, sizes.kmeans_chunk)[1].cpu()
    same = ids == ids_cpu
    scale = float(np.abs(stats.sums).max())
    figures = {
        "points": sizes.kmeans_points, "dim": sizes.kmeans_dim, "k": sizes.kmeans_k,
        "device_iteration_s": statistics.fmean(device_s),
        "cpu_torch_iteration_s": statistics.fmean(cpu_s),
        "cpu_block_stats_s": block_stats_s,  # lloyd's scipy sums after a search (faiss in production)
        "h2d_copy_s": h2d_s,
        "h2d_gb_per_s": points_cpu.numel() * 4 / max(h2d_s, 1e-9) / 1e9,
        "speedup_vs_cpu": statistics.fmean(cpu_s) / statistics.fmean(device_s),
        "ids_agreement": float(same.double().mean()),
        # sums over the points both paths assigned alike
        "sums_max_rel_diff_cpu_torch": (float(np.abs(out["device"].sums - out["cpu"].sums).max()) / scale
                                        if bool(same.all()) else None),
        "sums_max_rel_diff_block_stats": float(np.abs(out["cpu"].sums - stats.sums).max()) / scale,
        "counts_equal_block_stats": bool(np.array_equal(out["cpu"].counts, stats.counts)),
        **s919_actor_figures(device, sizes),
        "peak_memory_mb": peak_memory_mb(device),
    }
    if not figures["counts_equal_block_stats"] or figures["sums_max_rel_diff_block_stats"] > 1e-5:
        raise AssertionError(f"torch sums/counts disagree with lloyd.block_stats: {json.dumps(figures)}")
    if figures["ids_agreement"] < 0.999:
        raise AssertionError(f"device and CPU assignments agree on too few points: {json.dumps(figures)}")
    if figures["sums_max_rel_diff_cpu_torch"] is None:
        del figures["sums_max_rel_diff_cpu_torch"]  # a few ties went the other way: sums differ by design
    return figures


def s919_actor_figures(device: torch.device, sizes: Sizes) -> dict[str, float]:
    """Seconds of one device iteration, and of the copy of its results, at one S919 actor's shape."""
    generator = device_generator(device, seed=1)
    rows, dim, k = sizes.kmeans_actor_shape
    points = lloyd_normalize(torch.randn(rows, dim, device=device, generator=generator))
    centroids = points[torch.randperm(rows, device=device, generator=generator)[:k]].clone()
    seconds = timed(lambda: device_block_stats(points, centroids, False, sizes.kmeans_chunk), device,
                    sizes.warmup_steps, sizes.kmeans_timed)
    sums = torch.zeros(k, dim, dtype=torch.float64, device=device)
    copy_s = timed(lambda: sums.cpu(), device, 1, sizes.kmeans_timed)
    return {"s919_actor_rows": rows, "s919_actor_dim": dim, "s919_actor_k": k,
            "s919_actor_iteration_s": statistics.fmean(seconds), "s919_actor_sums_copy_s": statistics.fmean(copy_s)}


def lloyd_normalize(x: Tensor) -> Tensor:
    """Rows divided by their L2 norm (+1e-8), as label generation normalises embeddings."""
    return x / (x.norm(dim=1, keepdim=True) + 1e-8)


# -- JPEG decode -------------------------------------------------------------------------------


def synthetic_jpegs(count: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """JPEGs (quality 90) of smooth random scenes with grain: ImageNet-like sizes and bit rates."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = size
    out = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def jpeg_section(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Batched decode on the device next to PIL (what ingest uses) and torchvision on the CPU."""
    from torchvision.io import decode_jpeg

    jpegs = synthetic_jpegs(sizes.jpeg_images, sizes.jpeg_size)
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    decoded: dict[str, Any] = {}
    device_s = timed(lambda: decoded.__setitem__("device", decode_jpeg(encoded, device=device)), device,
                     sizes.warmup_steps, sizes.jpeg_timed)
    pil_s = timed(lambda: decoded.__setitem__("pil", [augment.decode_image(data) for data in jpegs]),
                  torch.device("cpu"), 1, 1)
    torchvision_cpu_s = timed(lambda: [decode_jpeg(data) for data in encoded], torch.device("cpu"), 1, 1)
    first = decoded["device"][0].permute(1, 2, 0).cpu().numpy().astype(np.int16)
    diff = float(np.abs(first - decoded["pil"][0].astype(np.int16)).mean())
    figures = {
        "images": len(jpegs), "height": sizes.jpeg_size[0], "width": sizes.jpeg_size[1],
        "mean_jpeg_kb": sum(map(len, jpegs)) / len(jpegs) / 1024,
        "device_images_per_s": len(jpegs) / statistics.fmean(device_s),
        "pil_images_per_s": len(jpegs) / pil_s[0],  # one core: PIL decodes on the calling thread
        "torchvision_cpu_images_per_s": len(jpegs) / torchvision_cpu_s[0],
        "mean_abs_diff_vs_pil": diff,
        "peak_memory_mb": peak_memory_mb(device),
    }
    if diff > 3.0:
        raise AssertionError(f"device decode differs from PIL by {diff:.2f} grey levels: {json.dumps(figures)}")
    return figures


# -- inference ---------------------------------------------------------------------------------


def inference_section(preset: Preset, device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Label generation's embedding, prediction's inference rule and the distance-matching vote."""
    generator = device_generator(device)
    figures: dict[str, Any] = {}
    model = PASSModel(arch=preset.arch, hidden_dim=preset.hidden_mlp, feat_dim=FEAT_DIM,
                      num_prototypes=preset.num_prototypes, pixel_attention=True).to(device).eval()
    crops = torch.randint(0, 256, (preset.labelgen_batch_size, preset.crop_sizes[0], preset.crop_sizes[0], 3),
                          dtype=torch.uint8, device=device, generator=generator)
    for name, dtype in (("fp32", None), *DTYPES.items()):  # labelgen runs fp32 today
        def embed() -> Tensor:
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.bfloat16,
                                                        enabled=dtype is not None):
                return model.cluster_embedding(normalize(crops, augment.IMAGENET_STD)).float().cpu()
        seconds = timed(embed, device, sizes.warmup_steps, sizes.timed_steps)
        figures[f"embed_{name}_images_per_s"] = preset.labelgen_batch_size / statistics.fmean(seconds)
    del model
    height, width = preset.image_size
    short = preset.eval_short_side
    resized = (short, round(width * short / height))  # Resize(256) of the shorter side
    segmenter = Segmenter(preset.arch, preset.num_classes + 1).to(device).eval()
    image = torch.randint(0, 256, (1, *resized, 3), dtype=torch.uint8, device=device, generator=generator)

    def predict() -> Tensor:
        with torch.inference_mode():
            return infer_labels(segmenter(normalize(image, augment.IMAGENET_STD))[0], (height, width)).cpu()
    figures["predict_ms_per_image"] = 1000 * statistics.fmean(timed(predict, device, sizes.warmup_steps,
                                                                    sizes.timed_steps))
    with torch.inference_mode():
        pixels = dense_features(segmenter.features(normalize(image, augment.IMAGENET_STD)))[0]
    pixels = pixels.flatten(1).t().contiguous()  # (P, C)
    bank = torch.randn(preset.knn_bank_size, pixels.shape[1], device=device, generator=generator)
    bank_labels = torch.randint(0, preset.num_classes + 1, (preset.knn_bank_size,), device=device,
                                generator=generator)

    def vote() -> Tensor:
        return knn_vote(pixels, bank, bank_labels, preset.num_classes + 1).cpu()
    figures["knn_vote_ms_per_image"] = 1000 * statistics.fmean(timed(vote, device, sizes.warmup_steps,
                                                                     sizes.timed_steps))
    figures["knn_pixels"], figures["knn_bank"] = pixels.shape[0], preset.knn_bank_size
    figures["peak_memory_mb"] = peak_memory_mb(device)
    return figures


# -- driver ------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and the device, for the report."""
    import PIL
    import scipy
    import torchvision

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torchvision": torchvision.__version__, "numpy": np.__version__,
                           "scipy": scipy.__version__, "pillow": PIL.__version__, "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}",
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def sections(device: torch.device, sizes: Sizes, presets: tuple[Preset, ...]) -> list[tuple[str, Callable[[], dict]]]:
    """Every section, in run order, as (name, thunk)."""
    out: list[tuple[str, Callable[[], dict]]] = []
    for preset in presets:
        for kind, build, images in (("pass", pass_step, preset.batch_size),
                                    ("attention", attention_step, preset.batch_size),
                                    ("finetune", finetune_step, preset.batch_size)):
            for dtype_name, dtype in DTYPES.items():
                out.append((f"{kind}_{preset.name}_{dtype_name}",
                            lambda b=build, p=preset, d=dtype, n=images: run_steps(b(p, device, d), n, sizes)))
    out.append(("distributed", lambda: distributed_section(presets, device, sizes)))
    out.append(("kmeans", lambda: kmeans_section(device, sizes)))
    out.append(("jpeg_decode", lambda: jpeg_section(device, sizes)))
    for preset in presets:
        out.append((f"inference_{preset.name}", lambda p=preset: inference_section(p, device, sizes)))
    return out


def run_section(name: str, thunk: Callable[[], dict], device: torch.device) -> dict[str, Any]:
    """Run one section; its figures plus ``ok`` and ``seconds``, or the error string."""
    reset_peak(device)
    started = time.perf_counter()
    try:
        result: dict[str, Any] = {"ok": True, **thunk()}
    except Exception as error:  # noqa: BLE001 - every failure is reported, the next section still runs
        traceback.print_exc(file=sys.stderr)
        result = {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000]}
    result["seconds"] = time.perf_counter() - started
    return result


def imports_section() -> dict[str, Any]:
    """Fails when Ray, faiss or omegaconf was imported (the GPU machine has none of them)."""
    loaded = sorted(name for name in FORBIDDEN_MODULES if name in sys.modules)
    if loaded:
        raise ImportError(f"imported {loaded}: the GPU machine has no such package")
    return {"forbidden_modules_loaded": 0}


KEY_FIGURES = ("images_per_s", "step_ms", "peak_memory_mb", "sinkhorn_step_allreduce_ms", "ddp_s50_fp16_images_per_s",
               "device_iteration_s", "cpu_torch_iteration_s", "speedup_vs_cpu", "device_images_per_s",
               "pil_images_per_s", "embed_fp32_images_per_s", "embed_bf16_images_per_s", "predict_ms_per_image")


def table(report: dict[str, Any]) -> str:
    """One line per section: status, seconds and its key figures."""
    lines = [f"{'section':<22} {'ok':<4} {'s':>6}  figures"]
    for name, result in report["sections"].items():
        if result["ok"]:
            shown = "  ".join(f"{key}={result[key]:.4g}" for key in KEY_FIGURES if key in result)
        else:
            shown = result["error"][:100]
        lines.append(f"{name:<22} {'yes' if result['ok'] else 'NO':<4} {result['seconds']:>6.1f}  {shown}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: str, started: float) -> None:
    """Update the failed list and the total time, and write the report to ``out``."""
    report["failed"] = [name for name, result in report["sections"].items() if not result["ok"]]
    report["total_seconds"] = time.perf_counter() - started
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the sections, write and print the report; 1 when a section failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="every path on the CPU at toy size (seconds)")
    parser.add_argument("--out", default="gpu_check.json", help="where to write the JSON report")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="sections not started within this many seconds are recorded as skipped (failed)")
    parser.add_argument("--only", default="", metavar="PREFIX[,PREFIX]",
                        help="run only the sections whose names start with one of these (e.g. kmeans,pass_s919)")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu for the toy-size CPU check")
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    if args.cpu:
        torch.set_num_threads(1)  # toy sizes: one thread is fastest, and the test suite shares its cores
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sizes = CPU_SIZES if args.cpu else GPU_SIZES
    presets = tuple(toy(p) for p in PRESETS) if args.cpu else PRESETS
    torch.manual_seed(0)
    gc.freeze()  # the imported modules' objects: keeps the collection before each section short
    started = time.perf_counter()
    report: dict[str, Any] = {"mode": "cpu-toy" if args.cpu else "cuda", "environment": environment(device),
                              "sizes": asdict(sizes), "sections": {}}
    prefixes = tuple(p for p in args.only.split(",") if p)
    chosen = [(name, thunk) for name, thunk in sections(device, sizes, presets) if name.startswith(prefixes or "")]
    for name, thunk in [*chosen, ("imports", imports_section)]:
        if time.perf_counter() - started > args.budget_s:
            report["sections"][name] = {"ok": False, "error": f"skipped: past the {args.budget_s:.0f} s budget",
                                        "seconds": 0.0}
            continue
        report["sections"][name] = result = run_section(name, thunk, device)
        print(f"[gpu_check] {name}: {'ok' if result['ok'] else result['error']} ({result['seconds']:.1f} s)",
              file=sys.stderr, flush=True)
        write_report(report, args.out, started)  # after every section: a crash of the process keeps the rest
    write_report(report, args.out, started)
    print(table(report))
    print(json.dumps(report), flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
