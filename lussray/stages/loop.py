"""The Ray Train loop shared by every training stage (pretrain, attention, finetune, ...).

A stage supplies a :class:`Method` (model builder, loss hooks, extra state such as the SwAV
queue) and its data as an :class:`lussray.data.ingest.EpochStream`; this module owns everything
else: DDP through ``ray.train.torch.prepare_model``, the optimizer with a per-step schedule (LARS
with the cosine schedule for PASS; each parameter group keeps its own learning rate, scaled by the
schedule), AMP and SyncBatchNorm on CUDA (gloo and fp32 on CPU), checkpoints every N steps and at
the end (model, optimizer, scaler, method state, step, resolved config), automatic resume from the
latest checkpoint, ``FailureConfig`` retries, metrics as JSONL and readable progress lines,
``--max-steps`` smoke runs.

Seeds: every worker builds the model after ``torch.manual_seed`` of a seed derived from the run's
``seed`` and the stage (so every rank starts from the same weights), reseeds torch before every
step from (seed, stage, rank, step), and reads its slice of the seeded epoch order
(:mod:`lussray.data.epoch_plan`). A resumed run skips the batches its checkpoint's step already
consumed, so it sees exactly the batches, augmentations and random draws of an unbroken run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import resource
import tempfile
import time
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from lussray import storage
from lussray.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
#: The config keys besides a stage's own section that decide what its workers read (its fingerprint holds them).
STREAM_KEYS = ("seed", "ingest.shuffle_window_rows")
METHOD_FILE = "method_rank{rank}.pt"  # per-worker method state (the queue), beside the checkpoint
METRICS_FILE = "metrics.jsonl"


@dataclass
class StepState:
    """Counters a method's hooks may read; ``step`` counts finished optimiser steps.

    ``epoch_batches(epoch)`` iterates this worker's batches of an epoch again (the same rows, views
    and order as training sees them): for methods that pass over the data outside the training
    step, such as PiCIE's clustering at the start of every epoch.
    """

    step: int
    epoch: int
    steps_per_epoch: int
    total_steps: int
    lr: float = 0.0
    epoch_batches: Optional[Callable[[int], Iterator[dict[str, Any]]]] = None


class Method(Protocol):
    """What a training method supplies to the loop."""

    def build_model(self) -> nn.Module: ...

    def state_module(self) -> nn.Module:
        """Extra state saved in checkpoints (e.g. the feature queue); an empty module if none."""
        ...

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor], state: StepState) -> tuple[torch.Tensor, dict[str, float]]: ...

    def before_step(self, model: nn.Module, state: StepState) -> None: ...

    def after_backward(self, model: nn.Module, state: StepState) -> None: ...

    # Optional: ``before_epoch(model, state)``, called before the first step of every epoch and
    # before the first step a (resumed) worker makes, which may lie inside an epoch
    # (``state.step % state.steps_per_epoch != 0``): per-epoch state the checkpoint does not hold
    # is rebuilt there.


@dataclass(frozen=True)
class LoopSpec:
    """Everything a Train worker needs, passed as ``train_loop_config`` (plain, picklable)."""

    stage: str
    method_factory: Callable[[], Method]
    # the model's trainable parameters -> the optimizer; a method with parameter groups of their own
    # learning rates builds them from the model itself (``param_groups``) and the factory takes those
    optimizer_factory: Callable[[Any], torch.optim.Optimizer]
    lr_at: Callable[[int, int], float]  # (step, total_steps) -> lr of the optimizer's default group
    stream: Any  # lussray.data.ingest.EpochStream: what every worker reads
    seed: int  # the run's seed
    run_dir: str  # <run>/<stage>
    batch_size_per_worker: int
    steps_per_epoch: int
    epochs: int
    checkpoint_every_steps: int
    log_every_steps: int
    max_steps: Optional[int] = None
    amp: bool = True
    sync_batchnorm: bool = True
    prefetch_batches: int = 2
    torch_threads: int = 0  # 0: Ray's default (OMP_NUM_THREADS = CPUs of the worker)
    resolved_config: dict = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def last_step(self) -> int:
        return min(self.total_steps, self.max_steps) if self.max_steps else self.total_steps


def steps_per_epoch(num_samples: int, loop: Any, stage: str, where: str) -> int:
    """Full global batches in one pass over ``num_samples`` images.

    Raises:
        UserError: if there is not even one (``where`` names the data in the message).
    """
    global_batch = loop.batch_size_per_worker * loop.num_workers
    if num_samples < global_batch:
        raise UserError(f"{num_samples} images in {where} are fewer than one global batch of {global_batch}: "
                        f"lower {stage}.loop.batch_size_per_worker or num_workers")
    return num_samples // global_batch


def lars_cosine_spec(stage: str, method_factory: Callable[[], Method], loop: Any, ingest: Any, run: str, *,
                     stream: Any, num_steps_per_epoch: int, max_steps: Optional[int], resolved_config: dict) -> LoopSpec:
    """A :class:`LoopSpec` with the shared recipe of the PASS training stages.

    LARS (SGD momentum + LARC trust ratio) with a per-step cosine schedule from ``loop.base_lr`` to
    ``loop.final_lr``, and the loop and ingest settings of the stage's ``TrainLoopConfig`` and
    ``IngestConfig``; the stage supplies its method, data stream, run folder name and step count.
    """
    from lussray.optim.lars import LARS
    from lussray.optim.schedules import cosine_schedule

    optim_kwargs = {"lr": loop.base_lr, "momentum": loop.momentum, "weight_decay": loop.weight_decay,
                    "trust_coefficient": loop.lars_trust_coefficient}
    return LoopSpec(
        stage=stage,
        method_factory=method_factory,
        optimizer_factory=lambda params: LARS(params, **optim_kwargs),
        lr_at=lambda step, total: cosine_schedule(step, total_steps=total, base_value=loop.base_lr,
                                                  final_value=loop.final_lr, warmup_steps=loop.warmup_steps),
        stream=stream,
        seed=resolved_config["seed"],
        run_dir=storage.join(run, stage),
        batch_size_per_worker=loop.batch_size_per_worker,
        steps_per_epoch=num_steps_per_epoch,
        epochs=loop.epochs,
        checkpoint_every_steps=loop.checkpoint_every_steps,
        log_every_steps=loop.log_every_steps,
        max_steps=max_steps,
        amp=loop.amp,
        sync_batchnorm=loop.sync_batchnorm,
        prefetch_batches=ingest.prefetch_batches,
        torch_threads=loop.torch_threads,
        resolved_config=resolved_config,
    )


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _save_checkpoint(spec: LoopSpec, model, optimizer, scaler, method, state: StepState) -> None:
    """Report a checkpoint from every rank (``report`` is a barrier; Ray merges the folders).

    Rank 0 writes the model, optimizer, scaler, step and config; every rank writes its own method
    state (the SwAV queue differs per worker, as the reference's ``queue{rank}.pth``).
    """
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as folder:
        torch.save(method.state_module().state_dict(), os.path.join(folder, METHOD_FILE.format(rank=rank)))
        if rank == 0:
            torch.save(
                {
                    "model": _unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "method": method.state_module().state_dict(),
                    "step": state.step,
                    "config": spec.resolved_config,
                },
                os.path.join(folder, CHECKPOINT_FILE),
            )
        metrics = {"step": state.step, "epoch": state.epoch}
        if rank == 0:  # Ray Train keeps rank 0's metrics in its checkpoint record
            metrics[CHECKPOINT_BYTES] = os.path.getsize(os.path.join(folder, CHECKPOINT_FILE))
        ray.train.report(metrics,
                         checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_step={state.step:08d}")


def _restore(model, optimizer, scaler, method) -> int:
    """Load the latest reported checkpoint, if any; returns the step to continue from."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        own = os.path.join(folder, METHOD_FILE.format(rank=ray.train.get_context().get_world_rank()))
        method_state = torch.load(own, map_location="cpu", weights_only=True) if os.path.exists(own) else state["method"]
    _unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    method.state_module().load_state_dict(method_state)
    return int(state["step"])


#: Ray Train V2's record of the checkpoints a run reported, in ``<run>/<stage>``.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
CHECKPOINT_BYTES = "checkpoint_bytes"  # reported with each checkpoint: the size of rank 0's checkpoint.pt


def reported_checkpoints(stage_dir: str) -> Optional[dict[str, Optional[int]]]:
    """{folder name: recorded size of its checkpoint.pt} of the checkpoints Ray Train's snapshot lists.

    Returns:
        None when there is no snapshot (checkpoints placed by hand, or no training yet); the size
        is None for checkpoints reported before lussray recorded sizes.
    """
    path = storage.join(stage_dir, SNAPSHOT_FILE)
    if not storage.exists(path):
        return None
    try:
        snapshot = json.loads(storage.read_bytes(path))
        results = snapshot["checkpoint_results"]
        return {str(r["checkpoint_dir_name"]): (r.get("metrics") or {}).get(CHECKPOINT_BYTES) for r in results}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a readable Ray Train checkpoint record ({error}): delete {stage_dir} "
                        f"(or pass --overwrite after changing an input) to train that stage again") from None


def intact_checkpoint(path: str, recorded_bytes: Optional[int] = None) -> bool:
    """Whether ``path`` is a whole checkpoint: its recorded size, else ``torch.load`` succeeds (on this process)."""
    size = storage.file_size(path)
    if size is None:
        return False
    if recorded_bytes is not None:
        return size == int(recorded_bytes)
    try:
        torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception:
        return False
    return True


def _candidates(stage_dir: str) -> list[tuple[str, Optional[int]]]:
    """(folder, recorded size) of the checkpoints to consider, newest first: Ray Train's, else the folders."""
    import pyarrow.fs as pafs

    reported = reported_checkpoints(stage_dir)
    if reported is None:
        fs, root = storage.filesystem(stage_dir)
        selector = pafs.FileSelector(root, allow_not_found=True)
        reported = {info.base_name: None for info in fs.get_file_info(selector)
                    if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_step=")}
    return sorted(reported.items(), key=lambda item: (checkpoint_step(item[0]), item[0]), reverse=True)


def latest_checkpoint(stage_dir: str) -> Optional[str]:
    """Path of the newest intact ``checkpoint.pt`` under ``<run>/<stage>``, or None if there is none.

    Only the checkpoints Ray Train recorded as reported count (a folder it was still copying when
    the run died is not one), each checked against its recorded size; without a record (copied or
    hand-placed folders) every ``checkpoint_step=<N>`` folder counts and must load.
    """
    for folder, recorded in _candidates(stage_dir):
        path = storage.join(stage_dir, folder, CHECKPOINT_FILE)
        if intact_checkpoint(path, recorded):
            return path
    return None


def _snapshot_without(snapshot: dict[str, Any], bad: set[str]) -> dict[str, Any]:
    """Ray Train's snapshot with the checkpoints named ``bad`` taken out of every list (the format of Ray 2.60)."""
    keep = [i for i, r in enumerate(snapshot["checkpoint_results"]) if r["checkpoint_dir_name"] not in bad]
    for name in ("checkpoint_results", "checkpoint_report_indices"):  # parallel lists
        snapshot[name] = [snapshot[name][i] for i in keep]
    latest = snapshot.get("latest_checkpoint_result")
    if latest and latest["checkpoint_dir_name"] in bad:
        newest = max(range(len(keep)), key=lambda i: snapshot["checkpoint_report_indices"][i], default=None)
        snapshot["latest_checkpoint_result"] = None if newest is None else snapshot["checkpoint_results"][newest]
    pending = [i for i, r in enumerate(snapshot.get("pending_training_results", []))
               if r["checkpoint_dir_name"] not in bad]
    for name in ("pending_training_results", "pending_validation_specs"):  # parallel lists
        if name in snapshot:
            snapshot[name] = [snapshot[name][i] for i in pending]
    for name in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                 "failed_validation_checkpoint_dir_names"):
        if name in snapshot:
            snapshot[name] = [folder for folder in snapshot[name] if folder not in bad]
    return snapshot


def drop_incomplete_checkpoints(stage_dir: str, stage: str) -> list[str]:
    """Remove reported checkpoints that are not intact from Ray Train's record and from storage.

    Ray Train resumes from the newest checkpoint of its record and refuses a record naming a
    missing folder; after this it resumes from the newest intact one (or starts afresh).

    Returns:
        The folder names removed.
    """
    from lussray.completion import remove_tree

    reported = reported_checkpoints(stage_dir)
    if not reported:
        return []
    bad = [folder for folder, recorded in reported.items()
           if not intact_checkpoint(storage.join(stage_dir, folder, CHECKPOINT_FILE), recorded)]
    if not bad:
        return []
    path = storage.join(stage_dir, SNAPSHOT_FILE)
    snapshot = _snapshot_without(json.loads(storage.read_bytes(path)), set(bad))
    storage.write_bytes_atomic(path, json.dumps(snapshot).encode())
    for folder in bad:
        remove_tree(storage.join(stage_dir, folder))
    latest = snapshot["latest_checkpoint_result"]
    print(f"[{stage}] checkpoint {', '.join(bad)} is incomplete (not its recorded size, or unreadable): removed; "
          f"training continues from {latest['checkpoint_dir_name'] if latest else 'the start'}", flush=True)
    return bad


def given_or_latest(given: Optional[str], flag: str, run: Optional[str], stage: str, what: str,
                    command: str) -> str:
    """The checkpoint a stage starts from: ``flag``'s file if given, else the latest under ``<run>/<stage>``.

    Args:
        given: the flag's value (None when absent).
        flag: the flag's name, for messages (``--init``, ``--checkpoint``).
        run: the run folder (None when the command has none).
        stage: the producing stage's folder name.
        what: the kind of checkpoint, for messages ("stage-1", "segmentation").
        command: the command that writes it, for messages.

    Raises:
        UserError: when the given file is missing, or neither exists.
    """
    if given:
        if not storage.exists(given):
            raise UserError(f"{flag} {given}: no such checkpoint")
        return given
    if not run:
        raise UserError(f"{flag} CHECKPOINT or --run DIR (with a {what} checkpoint) is required")
    found = latest_checkpoint(storage.join(run, stage))
    if found is None:
        raise UserError(f"no {what} checkpoint under {storage.join(run, stage)}: run `{command}` first or pass "
                        f"{flag} CHECKPOINT")
    return found


def checkpoint_step(path: Optional[str]) -> int:
    """The step in a ``.../checkpoint_step=<N>/checkpoint.pt`` path (0 for None)."""
    if not path:
        return 0
    found = re.search(r"checkpoint_step=(\d+)", path)
    return int(found.group(1)) if found else 0


def completed_checkpoint(spec: LoopSpec) -> Optional[str]:
    """The latest intact checkpoint of ``spec``'s stage if training reached ``spec.last_step``, else None.

    A stage calls this before starting Ray Train, so that a rerun of a finished stage (or
    ``lussray run`` passing over it) costs no cluster start-up. When training is not complete it
    first drops incomplete checkpoints (:func:`drop_incomplete_checkpoints`: a truncated final
    one, say), so that the coming ``fit`` resumes from the last intact one and repairs the stage.
    """
    latest = latest_checkpoint(spec.run_dir)
    if latest and checkpoint_step(latest) >= spec.last_step:
        print(f"[{spec.stage}] complete at step {checkpoint_step(latest)}: {latest}", flush=True)
        return latest
    drop_incomplete_checkpoints(spec.run_dir, spec.stage)
    return None


def run_training(spec: LoopSpec, fingerprint: dict[str, Any], *, overwrite: bool,
                 start: Callable[[], Any]) -> str:
    """A training stage's skip-resume-or-train around ``start`` (which starts Ray and calls :func:`fit`).

    Checks the stage folder's inputs record first (:class:`lussray.completion.StageRecord`: refused,
    or removed with ``overwrite``, when it differs from ``fingerprint``), then returns the final
    checkpoint when training is complete, else trains under the record (removed again when the
    training fails before it reported a checkpoint).

    Returns:
        The latest intact checkpoint.
    """
    from lussray.completion import StageRecord

    record = StageRecord(spec.run_dir, fingerprint, spec.stage)
    record.check(overwrite)
    done = completed_checkpoint(spec)
    if done:
        return done
    with record.recording(produced=lambda: latest_checkpoint(spec.run_dir) is not None):
        start()
    latest = latest_checkpoint(spec.run_dir)
    if latest is None:
        raise RuntimeError(f"[{spec.stage}] training ended without an intact checkpoint in {spec.run_dir}")
    return latest


def state_fingerprint(checkpoint_state: dict[str, Any]) -> float:
    """A scalar summary of the optimizer and method state (to check that a resume restored them)."""
    total = 0.0
    for tensor in _tensors(checkpoint_state["optimizer"]["state"]) + _tensors(checkpoint_state["method"]):
        total += float(tensor.double().abs().sum())
    return total


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree] if tree.is_floating_point() else []
    if isinstance(tree, dict):
        return [t for key in sorted(tree, key=str) for t in _tensors(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    return []


class _MetricsLog:
    """Rank 0's metrics: JSONL rows, TensorBoard scalars and progress lines.

    A local run folder gets one line appended per row. Object stores have no append, so there the
    object's existing rows (a resumed run continues the same file) and the new ones are kept in
    memory and the whole object is rewritten with one atomic PUT: for every event row, at the last
    step, and otherwise at most every ``FLUSH_EVERY_S`` seconds (longer for a big file, so that
    uploads stay a small share of training time: S919 pretraining logs about 20 MB). A killed
    run loses at most that window of rows; checkpoints are not affected.

    The numbers of each row also go to a TensorBoard event file beside metrics.jsonl, so that
    ``tensorboard --logdir <run>`` shows one run per stage: ``loss/total``, one ``loss/<term>``
    per loss term, ``train/lr``, ``train/images_per_s`` and the other per-step numbers. The
    writer opens with the first row and purges what earlier attempts logged after the resumed
    checkpoint's step (everything when the stage starts over), so a resumed curve has no doubled
    segment; metrics.jsonl drops the same rows. On object stores the event file is written to a
    local temporary folder and uploaded whole each time metrics.jsonl is (a resumed run adds a
    file; TensorBoard merges them).
    """

    FLUSH_EVERY_S = 30.0
    FLUSH_SECONDS_PER_MB = 5.0
    NOT_SCALARS = ("step", "total_steps", "time")

    def __init__(self, run_dir: str, enabled: bool) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.path = storage.join(run_dir, METRICS_FILE)
        self.local = not storage.is_uri(run_dir)
        self._rows = bytearray()  # object stores only: the whole file as it should be
        self._flushed_at = -math.inf
        self._events: Any = None  # the SummaryWriter, opened by the first row
        self._events_dir: Optional[tempfile.TemporaryDirectory] = None  # object stores: its local folder
        if enabled and self.local:
            storage.makedirs(run_dir)
        elif enabled and storage.exists(self.path):
            self._rows += storage.read_bytes(self.path)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(row) + "\n"
        if self._events is None:
            self._drop_stale_rows(self._first_stale_step(row))
        self._add_scalars(row)
        if self.local:
            with open(self.path, "a") as handle:
                handle.write(line)
            self._events.flush()
        else:
            self._rows += line.encode()
            now = time.monotonic()
            interval = max(self.FLUSH_EVERY_S, self.FLUSH_SECONDS_PER_MB * len(self._rows) / 2**20)
            if "event" in row or row.get("step") == row.get("total_steps") or now - self._flushed_at >= interval:
                storage.write_bytes_atomic(self.path, bytes(self._rows))
                self._upload_events()
                self._flushed_at = now
        terms = " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "time")
        print(f"[{row['stage']}] step {row['step']}/{row['total_steps']} epoch {row['epoch']} {terms}", flush=True)

    @staticmethod
    def tag(key: str) -> str:
        """The TensorBoard tag of a row's key: ``loss/total``, ``loss/p2p`` (``loss_p2p``), ``train/lr``."""
        if key == "loss":
            return "loss/total"
        return f"loss/{key[len('loss_'):]}" if key.startswith("loss_") else f"train/{key}"

    @staticmethod
    def _first_stale_step(first_row: dict[str, Any]) -> int:
        """A resume continues after the checkpoint's step: what was logged beyond it is stale
        (everything when the stage starts over, e.g. Ray Train restarting a group with no checkpoint yet)."""
        return first_row["step"] + 1 if first_row.get("event") == "resume" else 0

    def _drop_stale_rows(self, first_stale_step: int) -> None:
        """Rows of earlier attempts at or after ``first_stale_step`` (and a line a kill cut short) go."""
        old = (storage.read_bytes(self.path) if storage.exists(self.path) else b"") if self.local else bytes(self._rows)
        kept = bytearray()
        for line in old.splitlines(keepends=True):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("step", 0) < first_stale_step:
                kept += line if line.endswith(b"\n") else line + b"\n"
        if self.local:
            if kept != old:
                storage.write_bytes_atomic(self.path, bytes(kept))
        else:
            self._rows = kept

    def _add_scalars(self, row: dict[str, Any]) -> None:
        if self._events is None:
            self._events = self._open_events(purge_step=self._first_stale_step(row))
        if "event" in row:
            return
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in self.NOT_SCALARS:
                self._events.add_scalar(self.tag(key), value, row["step"], walltime=row.get("time"))

    def _open_events(self, purge_step: int) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        folder = self.run_dir
        if not self.local:
            self._events_dir = tempfile.TemporaryDirectory(prefix="lussray-events-")
            folder = self._events_dir.name
        return SummaryWriter(folder, purge_step=purge_step)

    def _upload_events(self) -> None:
        self._events.flush()
        assert self._events_dir is not None
        for name in os.listdir(self._events_dir.name):
            with open(os.path.join(self._events_dir.name, name), "rb") as handle:
                storage.write_bytes_atomic(storage.join(self.run_dir, name), handle.read())


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: GPU memory on CUDA, else the resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def scheduled_optimizer(spec: LoopSpec, model: nn.Module, method: Method) -> torch.optim.Optimizer:
    """The stage's optimizer; each parameter group's ``lr_scale`` is its own lr over the default lr.

    A method may group its parameters (``param_groups(model)``: a list of dicts with their own
    ``lr``, as torch optimizers take them); otherwise all trainable parameters form one group. The
    schedule then sets every group's lr to ``lr_at(step) * lr_scale`` (PASS: one group, scale 1).
    """
    groups = getattr(method, "param_groups", None)
    params = groups(_unwrap(model)) if groups else [p for p in model.parameters() if p.requires_grad]
    optimizer = spec.optimizer_factory(params)
    default = optimizer.defaults["lr"]
    for group in optimizer.param_groups:
        group["lr_scale"] = group["lr"] / default if default else 1.0
    return optimizer


def step_seed(spec: LoopSpec, rank: int, step: int) -> int:
    """The torch seed of a step's random draws (dropout, sampled negatives) on one rank."""
    from lussray.seeds import derived_seed

    return derived_seed(spec.seed, spec.stage, "step", str(rank), str(step))


def _epoch_batches(spec: LoopSpec, plan: Any, rank: int, device: torch.device) -> Callable[[int], Iterator]:
    def batches(epoch: int) -> Iterator[dict[str, Any]]:
        return spec.stream.batches(plan.windows(epoch, rank), spec.batch_size_per_worker, device,
                                   spec.prefetch_batches)
    return batches


def train_loop_per_worker(spec: LoopSpec) -> None:
    """The body every Ray Train worker runs."""
    import ray.train
    import ray.train.torch

    from lussray.seeds import derived_seed

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    on_cuda = device.type == "cuda"
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)

    torch.manual_seed(derived_seed(spec.seed, spec.stage, "model"))  # the same weights on every rank
    method = spec.method_factory()
    model = method.build_model()
    if on_cuda and spec.sync_batchnorm and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model)
    method.state_module().to(device)
    optimizer = scheduled_optimizer(spec, model, method)
    scaler = torch.amp.GradScaler("cuda", enabled=on_cuda and spec.amp)
    step = _restore(model, optimizer, scaler, method)
    metrics = _MetricsLog(spec.run_dir, rank == 0)
    if rank == 0 and step:
        print(f"[{spec.stage}] resumed from the checkpoint at step {step}", flush=True)
        restored = {"optimizer": optimizer.state_dict(), "method": method.state_module().state_dict()}
        metrics.write({"stage": spec.stage, "event": "resume", "step": step, "total_steps": spec.last_step,
                       "epoch": step // spec.steps_per_epoch, "state_fingerprint": state_fingerprint(restored)})

    plan = spec.stream.plan(world, spec.steps_per_epoch * spec.batch_size_per_worker)
    first_epoch, done_in_epoch = divmod(step, spec.steps_per_epoch)
    windows = plan.stream(rank, first_epoch, math.ceil(spec.last_step / spec.steps_per_epoch),
                          skip=done_in_epoch * spec.batch_size_per_worker)
    state = StepState(step, first_epoch, spec.steps_per_epoch, spec.total_steps,
                      epoch_batches=_epoch_batches(spec, plan, rank, device))
    before_epoch = getattr(method, "before_epoch", None)
    window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
    fetch_start = time.perf_counter()
    for batch in spec.stream.batches(windows, spec.batch_size_per_worker, device, spec.prefetch_batches):
        window_wait += time.perf_counter() - fetch_start
        state.epoch = state.step // spec.steps_per_epoch
        if before_epoch and (state.step % spec.steps_per_epoch == 0 or state.step == step):
            before_epoch(model, state)
        state.lr = spec.lr_at(state.step, spec.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = state.lr * group["lr_scale"]
        torch.manual_seed(step_seed(spec, rank, state.step))
        method.before_step(model, state)
        with torch.autocast(device.type, enabled=on_cuda and spec.amp):
            loss, terms = method.training_step(model, batch, state)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{spec.stage}: loss is {loss.item()} at step {state.step}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        method.after_backward(model, state)
        scaler.step(optimizer)
        scaler.update()
        state.step += 1
        window_images += spec.batch_size_per_worker * world
        if state.step % spec.log_every_steps == 0 or state.step == spec.last_step:
            elapsed = time.perf_counter() - window_start
            window_steps = max(window_images / (spec.batch_size_per_worker * world), 1)
            metrics.write({"stage": spec.stage, "step": state.step, "total_steps": spec.last_step,
                           "epoch": state.epoch, "loss": loss.item(), **terms, "lr": state.lr,
                           "images_per_s": window_images / max(elapsed, 1e-9),
                           "step_seconds": elapsed / window_steps,
                           "data_wait_s": _slowest_rank(window_wait, world, device) / window_steps,
                           "peak_rss_mb": peak_memory_mb(device), "time": time.time()})
            window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
        if state.step % spec.checkpoint_every_steps == 0 or state.step == spec.last_step:
            _save_checkpoint(spec, model, optimizer, scaler, method, state)
        if state.step >= spec.last_step:
            break
        fetch_start = time.perf_counter()
    if state.step < spec.last_step:
        raise RuntimeError(f"{spec.stage}: the training stream ended at step {state.step} of {spec.last_step}")


def _slowest_rank(seconds: float, world: int, device: torch.device) -> float:
    """The largest of every rank's ``seconds`` (a worker starved of data holds the others up in all-reduce)."""
    if world == 1 or not torch.distributed.is_initialized():
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64, device=device)  # on the process group's device
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return float(value.item())


def fit(spec: LoopSpec, loop_config: Any, run_root: str) -> dict[str, Any]:
    """Run ``spec`` on a ``TorchTrainer``; resumes automatically from ``<run_root>/<stage>``.

    Every worker reads its own slice of ``spec.stream`` (no dataset is handed to Ray Train).

    Args:
        spec: the worker-side description of the stage.
        loop_config: the stage's ``TrainLoopConfig`` (workers, resources, retries).
        run_root: the run folder; Ray Train keeps its checkpoints in ``<run_root>/<stage>``.

    Returns:
        A summary: steps, seconds, the last metrics and the checkpoint path.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from lussray.stages import ray_cluster

    resources = {"CPU": loop_config.cpus_per_worker}
    if loop_config.use_gpu:
        resources["GPU"] = loop_config.gpus_per_worker
    key = f"{spec.stage}.loop"
    ray_cluster.require(ray_cluster.Demand(
        f"{spec.stage} training workers", loop_config.num_workers, loop_config.cpus_per_worker,
        loop_config.gpus_per_worker if loop_config.use_gpu else 0.0, f"{key}.num_workers",
        f"{key}.cpus_per_worker", f"{key}.use_gpu / {key}.gpus_per_worker"), ray_cluster.current_config())
    storage_filesystem = None
    storage_path = os.path.abspath(run_root)
    if storage.is_uri(run_root):
        # Ray Train would resolve the URI with its own pyarrow call; give it lussray's filesystem
        # (same endpoint as shards and metrics, see lussray.storage) and the prefix-less path.
        storage_filesystem, storage_path = storage.filesystem(run_root)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec,
        scaling_config=ray.train.ScalingConfig(
            num_workers=loop_config.num_workers, use_gpu=loop_config.use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=spec.stage,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=loop_config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Ray Train's INFO lines (worker group start, every checkpoint) stay in its log files
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if checkpoint and storage.is_uri(run_root):  # Ray reports it relative to storage_filesystem
        checkpoint = storage.join(run_root, spec.stage, os.path.basename(checkpoint))
    summary = {
        "stage": spec.stage,
        "steps": result.metrics.get("step") if result.metrics else None,
        "seconds": round(time.perf_counter() - started, 1),
        "checkpoint": checkpoint,
    }
    print(f"[{spec.stage}] done: {json.dumps(summary)}", flush=True)
    return summary
