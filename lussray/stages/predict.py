"""Stage 5: predictions over a split with an actor pool, matching, test submissions.

    lussray predict --split validation --data demo-out/shards --run demo-out/run
    lussray predict --split test --data demo-out/shards --run demo-out/run --submission

Reads the latest ``<run>/finetune`` checkpoint (or ``--checkpoint``) and writes
``<out>/<wnid>/<name>.png`` (default ``<out>`` = ``<run>/predict/<split>``) at ground-truth
resolution in the official codec, following the reference's inference rule
(:func:`lussray.models.segmenter.infer_labels`; shared/reference/pass-imagenet-s.md, section 2.4):

- ``validation``: the image-level Hungarian matching of the evaluator
  (:mod:`lussray.eval.matching`) between the K generated categories and the N ground-truth ones,
  written to ``<out>/match.json``; ``--match FILE`` applies a given one instead, ``--match
  identity`` none (models trained on ground truth);
- ``test``: ``--match FILE`` (default: ``<run>/predict/validation/match.json`` when it exists) is
  copied next to the predictions, as the benchmark server applies it; ``--submission`` packs
  ``<out>/../<split>.zip`` with the class folders, ``match.json`` and ``method.txt``.

When the split has ground truth the actors also compute the evaluator's per-image statistics
(:func:`lussray.eval.stats.image_stats`) on the predictions they hold, so the metrics come without
reading the PNGs again; ``<out>/summary.json`` (written last) records them. ``<out>/inputs.json``
records the inputs (checkpoint, data, matching, ``predict.max_res``, ``ingest.eval_short_side``,
CRF settings): a rerun with the same inputs is skipped, one with other inputs refused
(``--overwrite`` predicts again). ``<out>/keys.txt`` lists the predictions of the pass; a
submission packs only those.

The pool is generic: :class:`PredictionWriter` (the ``map_batches`` callable class) builds any
:class:`Predictor` once per actor. :class:`SegmenterPredictor` is the fine-tuned model; the
distance-matching protocol plugs in its kNN predictor (:mod:`lussray.stages.distmatch`).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import os
import pickle
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

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
from lussray.config import LussConfig
from lussray.errors import UserError

STAGE = "predict"
SUMMARY_FILE = "summary.json"
KEYS_FILE = "keys.txt"
MATCH_FILE = "match.json"
METHOD_FILE = "method.txt"
IDENTITY = "identity"
HUNGARIAN = "hungarian"
PREDICT_METHODS = ("pass", "picie", "fs4")  # `lussray predict --method`


# -- predictors (built once per actor) ----------------------------------------------------------


class Predictor(Protocol):
    """Turns a batch of evaluation images into label maps at their original size."""

    def predict(self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]],
                labels: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        """Label maps for ``images``.

        Args:
            images: uint8 (h, w, 3) images, shorter side resized (``ingest.eval_short_side``).
            sizes: original (H, W) of each image.
            labels: ground truth (H, W) per image, or None (only oracles may look at it).

        Returns:
            one integer (H, W) map per image, 0 = other.
        """
        ...


def group_by_shape(images: Sequence[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
    """Indices of ``images`` grouped by shape (one forward pass per group)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(index)
    return groups


def torch_device(torch_threads: int = 0):
    """The actor's device (CUDA when Ray gave it a GPU) after setting the intra-op threads."""
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_model_input(images: np.ndarray, device):
    """uint8 (B, h, w, 3) -> normalised (B, 3, h, w) with the evaluation statistics (std 0.229)."""
    import torch

    from lussray.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from lussray.stages.pretrain import normalize_views

    return normalize_views(torch.from_numpy(np.ascontiguousarray(images)).to(device), IMAGENET_MEAN, IMAGENET_STD)


def refine(logits, image: np.ndarray, size: tuple[int, int], max_res: int) -> np.ndarray:
    """Logits of one image to its label map: the hook for dense-CRF refinement (``--crf``).

    This is the reference's inference rule; ``--crf`` replaces it with
    :class:`lussray.crf.CRFRefiner`, which receives the same arguments: the logits (K + 1, h', w')
    of the network, the (h, w, 3) uint8 image the network saw (the shorter side resized) and the
    original ``size``, and returns the (H, W) ids.
    """
    from lussray.models.segmenter import infer_labels

    return infer_labels(logits, size, max_res).cpu().numpy()


class SegmenterPredictor:
    """A fine-tuned :class:`~lussray.models.segmenter.Segmenter` and the reference's inference rule."""

    def __init__(self, checkpoint: str, arch: str, num_outputs: int, max_res: int = 1000,
                 torch_threads: int = 0, refine_fn: Callable[..., np.ndarray] | None = None) -> None:
        """Load the model (once per actor).

        Raises:
            UserError: if the checkpoint lacks the backbone or the segmentation head.
        """
        from lussray.models.checkpoints import load_pretrained
        from lussray.models.segmenter import Segmenter

        self.device = torch_device(torch_threads)
        model = Segmenter(arch, num_outputs)
        report = load_pretrained(model, checkpoint)
        if report.missing or report.mismatched:
            raise UserError(f"{checkpoint} does not hold a complete {arch} segmenter with {num_outputs} outputs: "
                            f"missing {report.missing[:3]}, mismatched {report.mismatched[:3]}")
        self.model = model.eval().to(self.device)
        self.max_res = max_res
        self.refine = refine_fn or refine

    def predict(self, images, sizes, labels) -> list[np.ndarray]:
        import torch

        out: list[np.ndarray] = [np.zeros(0)] * len(images)
        for indices in group_by_shape(images).values():
            batch = np.stack([images[i] for i in indices])
            with torch.inference_mode():
                logits = self.model(to_model_input(batch, self.device))
                for row, i in enumerate(indices):
                    out[i] = self.refine(logits[row], images[i], tuple(sizes[i]), self.max_res)
        return out


# -- the actor pool ------------------------------------------------------------------------------


class PredictionWriter:
    """The ``map_batches`` callable class: a predictor per actor, PNGs out, evaluator statistics back.

    ``protocol="pixel"`` (scene data) sends back each image's (C, K) pixel confusion counts
    (:func:`lussray.eval.pixel.confusion`, predictions are cluster ids 0..K-1, K = ``num_clusters``)
    instead of the ImageNet-S evaluator's per-image statistics.
    """

    def __init__(self, predictor_factory: Callable[..., Predictor], predictor_kwargs: dict[str, Any], out: str,
                 num_classes: int, evaluate: bool, protocol: str = "imagenet-s",
                 num_clusters: int | None = None) -> None:
        self.predictor = predictor_factory(**predictor_kwargs)
        self.out, self.num_classes, self.evaluate = out, num_classes, evaluate
        self.protocol, self.num_clusters = protocol, num_clusters or num_classes

    def _pixel_counts(self, key: str, prediction: np.ndarray, gt: np.ndarray) -> bytes:
        from lussray.eval.pixel import PixelLabelError, confusion

        try:
            return pickle.dumps(confusion(prediction, gt, self.num_classes, self.num_clusters))
        except PixelLabelError as error:
            raise UserError(f"cannot evaluate {key}: {error}") from error

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from lussray.data.imagenet_s import label_to_png_bytes
        from lussray.eval.stats import LabelError, image_stats

        keys = [str(key) for key in batch["key"]]
        images = [np.asarray(image) for image in batch["image"]]
        sizes = [(int(h), int(w)) for h, w in batch["original_size"]]
        gts = [np.asarray(label) for label in batch["label"]] if "label" in batch else [None] * len(keys)
        predictions = self.predictor.predict(images, sizes, gts)
        stats = []
        for key, size, gt, prediction in zip(keys, sizes, gts, predictions):
            if prediction.shape != size:
                raise RuntimeError(f"{key}: prediction is {prediction.shape}, the image {size}")
            storage.write_bytes_atomic(storage.join_under(self.out, f"{key}.png"), label_to_png_bytes(prediction))
            if self.evaluate and gt is not None and self.protocol == "pixel":
                stats.append(self._pixel_counts(key, prediction, gt))
            elif self.evaluate and gt is not None:
                try:
                    stats.append(pickle.dumps(image_stats(prediction, gt, self.num_classes, key=key)))
                except LabelError as error:
                    raise UserError(f"cannot evaluate {key}: {error}") from error
            else:
                stats.append(b"")
        return {"key": np.asarray(keys), "stats": np.asarray(stats, dtype=object)}


@dataclass
class PoolResult:
    """What one pass of the pool produced."""

    keys: list[str]
    accumulator: Any  # a StatsAccumulator, or None without ground truth
    seconds: float


def run_pool(dataset: Any, factory: Callable[..., Any], factory_kwargs: dict[str, Any], pool: Any, *,
             total: int, what: str, stage: str, output_rows: Callable[[dict[str, np.ndarray]], None]) -> float:
    """Map ``dataset`` through the callable class ``factory`` on an actor pool; feed every batch out.

    Args:
        dataset: a Ray Dataset (e.g. :func:`lussray.data.ingest.evaluation_images`).
        factory: the callable class (its constructor loads the model once per actor).
        factory_kwargs: its constructor arguments.
        pool: a config section with ``actor_pool_min``, ``actor_pool_max``, ``gpus_per_actor``,
            ``cpus_per_actor`` and ``batch_size``.
        total: input rows, for the progress lines.
        what: the progress label.
        stage: the log prefix.
        output_rows: receives every output batch (numpy columns) on the driver.

    Returns:
        Seconds the pass took.

    Raises:
        UserError: the cluster cannot hold the pool (``<section>.actor_pool_min``, ``cpus_per_actor``,
            ``gpus_per_actor``), or an actor failed: one line naming its samples or checkpoint.
    """
    import ray.data

    from lussray.stages import ray_cluster

    ray_cluster.require(ray_cluster.pool_demand(ray_cluster.section_key(pool), pool, f"{stage} {what} actors"),
                        ray_cluster.current_config())
    mapped = dataset.map_batches(
        ray_cluster.Guarded,
        fn_constructor_kwargs={"factory": factory, "factory_kwargs": factory_kwargs, "unit_column": "key",
                               "label": f"{stage} {what}: {factory.__name__}"},
        batch_size=int(pool.batch_size),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=pool.actor_pool_min, max_size=pool.actor_pool_max),
        num_cpus=pool.cpus_per_actor,
        num_gpus=pool.gpus_per_actor,
    )
    started, done, next_report = time.perf_counter(), 0, 1
    for batch in ray_cluster.checked(mapped.iter_batches(batch_size=None, batch_format="numpy"), f"[{stage}] {what}"):
        output_rows(batch)
        done += len(set(batch["key"].tolist()))  # images (an image may give several rows)
        if done * 10 >= next_report * max(total, 1) or done >= total:
            elapsed = time.perf_counter() - started
            rate = done / max(elapsed, 1e-9)
            print(f"[{stage}] {what}: {done}/{total} images, {rate:.1f} img/s, "
                  f"ETA {max(total - done, 0) / max(rate, 1e-9):.0f} s", flush=True)
            next_report = done * 10 // max(total, 1) + 1
    return time.perf_counter() - started


def predict_split(config: LussConfig, data: str, split: str, out: str, predictor_factory: Callable[..., Predictor],
                  predictor_kwargs: dict[str, Any], *, pool: Any, evaluate: bool, stage: str = STAGE,
                  protocol: str = "imagenet-s", num_clusters: int | None = None) -> PoolResult:
    """Write the predictions of ``split`` to ``out`` with an actor pool; collect evaluator statistics.

    Args:
        config: the resolved config (ingest settings, ``dataset.num_classes``).
        data: shards folder of ``lussray prepare``.
        split: the split to predict.
        out: prediction folder (``<out>/<wnid>/<name>.png``; local or object store).
        predictor_factory: a :class:`Predictor` class (importable by the Ray workers).
        predictor_kwargs: its constructor arguments.
        pool: the actor-pool config section (``predict`` or ``distmatch``).
        evaluate: compute statistics where the split has ground truth (ids must lie in 0..N).
        stage: the log prefix.
        protocol: ``imagenet-s`` (the evaluator's per-image statistics) or ``pixel`` (a (C, K)
            confusion matrix over the split, :class:`~lussray.eval.pixel.ConfusionAccumulator`).
        num_clusters: K of the pixel protocol (default: ``dataset.num_classes``).

    Returns:
        The keys written and a :class:`~lussray.eval.stats.StatsAccumulator` (or, for the pixel
        protocol, a ``ConfusionAccumulator``; None without ground truth or without ``evaluate``).
    """
    from lussray.data.ingest import evaluation_images
    from lussray.data.shards import read_manifest
    from lussray.eval.stats import StatsAccumulator

    manifest = read_manifest(data, split)
    evaluate = evaluate and bool(manifest.get("has_segmentation"))
    num_classes = config.dataset.num_classes
    if protocol == "pixel":
        from lussray.eval.pixel import ConfusionAccumulator

        accumulator: Any = ConfusionAccumulator(num_classes, num_clusters or num_classes) if evaluate else None
    else:
        accumulator = StatsAccumulator(num_classes) if evaluate else None
    keys: list[str] = []

    def collect(batch: dict[str, np.ndarray]) -> None:
        keys.extend(str(key) for key in batch["key"])
        if accumulator is not None:
            for blob in batch["stats"]:
                accumulator.add(pickle.loads(blob))

    storage.makedirs(out)
    seconds = run_pool(
        evaluation_images(data, split, config.ingest, config.dataset.eval_crop_size), PredictionWriter,
        {"predictor_factory": predictor_factory, "predictor_kwargs": predictor_kwargs, "out": out,
         "num_classes": num_classes, "evaluate": evaluate, "protocol": protocol, "num_clusters": num_clusters},
        pool, total=int(manifest["num_samples"]), what=split, stage=stage, output_rows=collect)
    return PoolResult(sorted(keys), accumulator, seconds)


# -- matching, metrics, submission ---------------------------------------------------------------


def score(accumulator: Any, match: Any) -> tuple[Any, np.ndarray | None]:
    """Metrics of the collected statistics under ``match``.

    Args:
        accumulator: a :class:`~lussray.eval.stats.StatsAccumulator`.
        match: ``"hungarian"`` (the evaluator's image-level matching), ``"identity"``, or a
            {generated id: ground-truth id} dict.

    Returns:
        ``(metrics, mapping)``; the mapping is None for the identity.
    """
    from lussray.eval.io import match_to_lookup
    from lussray.eval.matching import cooccurrence, hungarian_mapping
    from lussray.eval.metrics import compute_metrics

    n = accumulator.num_classes
    if match == HUNGARIAN:
        pred_images, pred_labels, gt_images, gt_labels = accumulator.presence()
        mapping = hungarian_mapping(cooccurrence(pred_images, pred_labels, gt_images, gt_labels,
                                                 accumulator.num_images, n))
    elif match == IDENTITY:
        mapping = None
    else:
        mapping = match_to_lookup(match, n)
        if len(mapping) < n + 1 or (mapping[: n + 1] < 0).any():
            raise UserError(f"the match does not map every generated id 0..{n}")
    return compute_metrics(accumulator, mapping), mapping


def score_pixels(config: LussConfig, accumulator: Any, match: str) -> dict[str, Any]:
    """The pixel protocol's metrics of a split's confusion matrix (``hungarian`` or ``identity`` matching).

    Args:
        config: the resolved config (``dataset.thing_classes`` gives the things/stuff means).
        accumulator: a :class:`~lussray.eval.pixel.ConfusionAccumulator` (:func:`predict_split` with
            ``protocol="pixel"``).
        match: ``"hungarian"`` (one matching over the split) or ``"identity"`` (predictions in class ids).

    Returns:
        JSON-ready metrics: ``mIoU``, ``Acc``, per-class IoU, the matching, the confusion matrix.
    """
    from lussray.eval.pixel import hungarian_match, identity_match, pixel_metrics, things_stuff

    hist = accumulator.hist
    mapping = hungarian_match(hist) if match == HUNGARIAN else identity_match(*hist.shape)
    things = config.dataset.thing_classes
    groups = things_stuff(range(things), hist.shape[0]) if 0 < things < hist.shape[0] else None
    metrics = pixel_metrics(hist, mapping, groups, accumulator.num_images)
    return {**json_safe(metrics.to_dict()), "matching": match}


def predict_scene(config: LussConfig, data: str, run: str | None, out: str, predictor: Callable[..., Predictor],
                  predictor_kwargs: dict[str, Any], *, checkpoint: str, num_clusters: int, match: str,
                  inputs: dict[str, Any], split: str = "validation", overwrite: bool = False,
                  stage: str = STAGE) -> dict[str, Any]:
    """Predict ``split`` of scene data through the pool, score it with the pixel protocol, ``summary.json`` last.

    ``<out>/inputs.json`` records the split's manifest, the checkpoint, the evaluation view and
    ``inputs`` (the predictor's own settings): a rerun with the same inputs returns the summary at
    once, other inputs are refused (``overwrite``: predicted again).

    Args:
        config: the resolved config (pool, ingest, ``dataset``).
        data: shards folder.
        run: the run folder (paths under it are recorded relative to it).
        out: the prediction folder.
        predictor: a :class:`Predictor` class whose maps hold cluster ids 0..K-1.
        predictor_kwargs: its constructor arguments.
        checkpoint: the model file (recorded).
        num_clusters: K.
        match: ``"hungarian"`` or ``"identity"``.
        inputs: further entries of the inputs record.
        split: the split.
        overwrite: replace outputs of other inputs instead of refusing.
        stage: the log prefix.

    Returns:
        The summary (``metrics`` when the split has ground truth).
    """
    record = StageRecord(out, {"format": FORMAT_VERSION,
                               **config_fingerprint(config, "ingest.eval_short_side", "dataset.eval_crop_size",
                                                    "dataset.num_classes", "dataset.thing_classes"),
                               "split": split, "data": data_fingerprint(data, [split]),
                               "checkpoint": checkpoint_fingerprint(checkpoint, run), **inputs}, stage)
    record.check(overwrite)
    summary_path = storage.join(out, SUMMARY_FILE)
    if storage.exists(summary_path) and record.recorded() is not None:
        print(f"[{stage}] {split}: complete, {summary_path}", flush=True)
        return storage.read_json(summary_path)
    storage.makedirs(out)
    with record.recording(produced=lambda: has_files(out, ".png") or storage.exists(summary_path)):
        result = predict_split(config, data, split, out, predictor, predictor_kwargs, pool=config.predict,
                               evaluate=True, stage=stage, protocol="pixel", num_clusters=num_clusters)
        write_keys(out, result.keys)
        summary: dict[str, Any] = {"inputs": record.fingerprint, "num_images": len(result.keys),
                                   "seconds": round(result.seconds, 1)}
        if result.accumulator is not None and result.accumulator.num_images:
            summary["metrics"] = score_pixels(config, result.accumulator, match)
        storage.write_json_atomic(summary_path, summary)
    line = f"{len(result.keys)} images in {result.seconds:.1f} s -> {out}"
    if "metrics" in summary:
        line += f"; mIoU {summary['metrics']['mIoU']:.2f}, Acc {summary['metrics']['Acc']:.2f} ({match} matching)"
    print(f"[{stage}] {split}: done, {line}", flush=True)
    return summary


def format_metrics(metrics: Any) -> str:
    """The evaluator's table (mIoU, b-mIoU, Img-Acc, F, per size)."""
    from lussray.eval.evaluate import format_table

    return format_table(metrics)


def method_text(description: str) -> str:
    """Content of ``method.txt`` (the benchmark server shows it with the submission)."""
    return description.strip() + "\n"


def submission_path(out: str) -> str:
    """``<out>/../<name of out>.zip``, where :func:`package_submission` writes."""
    parent, name = _split_path(out)
    return storage.join(parent, f"{name}.zip")


def package_submission(out: str, keys: Sequence[str], method: str) -> str:
    """``<out>/../<name of out>.zip``: the ``<wnid>/<name>.png`` folders, ``match.json`` if any, ``method.txt``.

    Args:
        out: the prediction folder.
        keys: the predictions to pack (:func:`written_keys`: those of the pass that made the
            folder's summary, never other files lying there).
        method: the text of ``method.txt``.

    Returns:
        The path of the zip (local or object store).
    """
    target = submission_path(out)
    storage.write_bytes_atomic(storage.join(out, METHOD_FILE), method_text(method).encode())
    with tempfile.NamedTemporaryFile(prefix=".tmp-", suffix=".zip", delete=False) as handle:
        local = handle.name
    try:
        with zipfile.ZipFile(local, "w", compression=zipfile.ZIP_STORED) as archive:  # PNGs are compressed
            for key in keys:
                archive.writestr(f"{key}.png", storage.read_bytes(storage.join(out, f"{key}.png")))
            match = storage.join(out, MATCH_FILE)
            if storage.exists(match):
                archive.writestr(MATCH_FILE, storage.read_bytes(match))
            archive.writestr(METHOD_FILE, method_text(method))
        storage.put_file(local, target)
    finally:
        if os.path.exists(local):
            os.unlink(local)
    return target


def _split_path(path: str) -> tuple[str, str]:
    path = str(path).rstrip("/")
    if storage.is_uri(path):
        parent, _, name = path.rpartition("/")
        return parent, name
    return os.path.dirname(os.path.abspath(path)), os.path.basename(path)


# -- the segmenter's checkpoint ------------------------------------------------------------------


def segmenter_shape(checkpoint: str, default_arch: str) -> tuple[str, int]:
    """(arch, num_outputs) of a segmentation checkpoint.

    lussray checkpoints record both (``config["segmenter"]``); for others (PASS ``last_layer``)
    the head's shape gives K + 1 and the architecture is ``default_arch``.

    Raises:
        UserError: if the file is missing, unreadable or holds no segmentation head.
    """
    import torch

    from lussray.models.checkpoints import read_state_dict, translate_key

    if not storage.exists(checkpoint):
        raise UserError(f"checkpoint {checkpoint} not found")
    data = storage.read_bytes(checkpoint)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"cannot read checkpoint {checkpoint}: {error}") from error
    recorded = obj.get("config", {}).get("segmenter") if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None
    state, _ = read_state_dict(io.BytesIO(data))
    heads = [value for key, value in state.items() if translate_key(key) == "segmentation_head.weight"]
    if not heads:
        raise UserError(f"{checkpoint} holds no segmentation head (segmentation_head.* or last_layer.*): "
                        f"pass a `lussray finetune` or `lussray semisup` checkpoint")
    arch = recorded.get("arch", default_arch) if isinstance(recorded, dict) else default_arch
    return str(arch), int(heads[0].shape[0])


def finetune_checkpoint(run: str | None, given: str | None, stage: str = "finetune") -> str:
    """``--checkpoint`` if given, else the latest ``<run>/<stage>`` checkpoint (UserError when neither exists)."""
    from lussray.stages.loop import given_or_latest

    return given_or_latest(given, "--checkpoint", run, stage, "segmentation", f"lussray {stage}")


# -- the command -----------------------------------------------------------------------------


def fingerprint(config: LussConfig, data: str, split: str, checkpoint: str, match: Any, *, root: str | None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What determines a prediction folder (:mod:`lussray.completion`).

    The split's manifest, the checkpoint (path relative to ``root`` and size), the matching (a
    given match.json by content), the inference settings (``predict.max_res``,
    ``ingest.eval_short_side``), N, and ``extra`` (the CRF parameters).
    """
    matching = match if match in (HUNGARIAN, IDENTITY) else file_fingerprint(match, root)
    return {"format": FORMAT_VERSION,
            **config_fingerprint(config, "predict.max_res", "ingest.eval_short_side", "dataset.eval_crop_size",
                                "dataset.num_classes"),
            "split": split, "data": data_fingerprint(data, [split]),
            "checkpoint": checkpoint_fingerprint(checkpoint, root), "match": matching, **(extra or {})}


def predict_segmenter(config: LussConfig, data: str, split: str, out: str, checkpoint: str, *,
                      match: Any, stage: str = STAGE, inputs: dict[str, Any] | None = None,
                      refine_fn: Callable[..., np.ndarray] | None = None, run: str | None = None,
                      overwrite: bool = False) -> dict[str, Any]:
    """Predict ``split`` with a segmenter checkpoint, match, evaluate, write ``summary.json`` last.

    ``<out>/inputs.json`` records the inputs (:func:`fingerprint`): a rerun with the same ones
    returns the summary at once, other ones are refused (``overwrite``: ``out`` and its submission
    zip are removed and the split predicted again).

    Args:
        config: the resolved config.
        data: shards folder.
        split: the split.
        out: the prediction folder.
        checkpoint: a segmentation checkpoint.
        match: ``"hungarian"``, ``"identity"`` or a match.json path (copied into ``out``).
        stage: log prefix.
        inputs: extra entries of the inputs record (the CRF parameters).
        refine_fn: replaces :func:`refine` (the CRF hook).
        run: the run folder (paths under it are recorded relative to it).
        overwrite: replace outputs of other inputs instead of refusing.

    Returns:
        The summary (also in ``<out>/summary.json``).

    Raises:
        UserError: if ``out`` holds predictions of other inputs (and not ``overwrite``), or the
            matching cannot apply.
    """
    from lussray.eval.io import read_match, write_match

    arch, num_outputs = segmenter_shape(checkpoint, config.pretrain.arch)
    num_classes = config.dataset.num_classes
    record = StageRecord(out, fingerprint(config, data, split, checkpoint, match, root=run, extra=inputs), stage,
                         extra_outputs=[submission_path(out)])
    record.check(overwrite)
    summary_path = storage.join(out, SUMMARY_FILE)
    if storage.exists(summary_path) and record.recorded() is not None:
        print(f"[{stage}] {split}: complete, {summary_path}", flush=True)
        return storage.read_json(summary_path)
    match_dict = None
    if match not in (HUNGARIAN, IDENTITY):
        match_dict = read_match(match)
    elif match == HUNGARIAN and num_outputs - 1 != num_classes:
        raise UserError(f"{checkpoint} predicts K = {num_outputs - 1} categories, the dataset has N = {num_classes}: "
                        f"the Hungarian matching needs K = N (pass --match FILE or --match identity)")
    print(f"[{stage}] {split}: {checkpoint} ({arch}, K = {num_outputs - 1}) -> {out}", flush=True)
    kwargs = {"checkpoint": checkpoint, "arch": arch, "num_outputs": num_outputs,
              "max_res": config.predict.max_res, "torch_threads": config.predict.torch_threads}
    if refine_fn is not None:
        kwargs["refine_fn"] = refine_fn
    storage.makedirs(out)
    with record.recording(produced=lambda: has_files(out, ".png") or storage.exists(summary_path)):
        # The statistics need ids in 0..N, so K > N (with a many-to-one match) is written but not scored.
        result = predict_split(config, data, split, out, SegmenterPredictor, kwargs, pool=config.predict,
                               evaluate=num_outputs - 1 <= num_classes, stage=stage)
        write_keys(out, result.keys)
        summary: dict[str, Any] = {"inputs": record.fingerprint, "num_images": len(result.keys),
                                   "seconds": round(result.seconds, 1),
                                   "images_per_s": round(len(result.keys) / max(result.seconds, 1e-9), 2)}
        if match == IDENTITY:
            _remove(storage.join(out, MATCH_FILE))  # a stale one would be shipped with a submission
        if match_dict is not None:
            copy = storage.join(out, MATCH_FILE)
            if os.path.abspath(str(match)) != os.path.abspath(copy):  # the server applies it: ship it as given
                storage.write_bytes_atomic(copy, storage.read_bytes(match))
            summary["match_file"] = copy
        if result.accumulator is not None and result.accumulator.num_images:
            metrics, mapping = score(result.accumulator, match_dict if match_dict is not None else match)
            if match == HUNGARIAN and mapping is not None:
                write_match(storage.join(out, MATCH_FILE), mapping)
                summary["match_file"] = storage.join(out, MATCH_FILE)
            summary["matching"] = "given" if match_dict is not None else match
            summary["metrics"] = json_safe(metrics.to_dict())
            print(f"[{stage}] {split}: matching {summary['matching']}", flush=True)
            print(format_metrics(metrics), flush=True)
        storage.write_json_atomic(summary_path, summary)
    line = f"{len(result.keys)} images in {result.seconds:.1f} s -> {out}"
    if "metrics" in summary:
        line += f"; mIoU {summary['metrics']['mIoU']:.2f}"
    print(f"[{stage}] {split}: done, {line}", flush=True)
    return summary


def write_keys(out: str, keys: Sequence[str]) -> None:
    """``<out>/keys.txt``: the keys this prediction pass wrote, one per line (what a submission packs)."""
    storage.write_bytes_atomic(storage.join(out, KEYS_FILE), "".join(f"{key}\n" for key in keys).encode())


def written_keys(out: str) -> list[str]:
    """The keys of ``<out>/keys.txt``; for folders written before it existed, every ``<wnid>/<name>.png``."""
    path = storage.join(out, KEYS_FILE)
    if storage.exists(path):
        return storage.read_bytes(path).decode().split()
    return prediction_keys(out)


def _remove(path: str) -> None:
    """Delete the file at ``path`` if there is one (local or object store)."""
    if storage.exists(path):
        fs, inner = storage.filesystem(path)
        fs.delete_file(inner)


def json_safe(value: Any) -> Any:
    """NaN (an empty size bucket) -> None, recursively, so the JSON stays standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lussray predict``."""
    parser.add_argument("--split", required=True, choices=("validation", "test", "train-semi"),
                        help="split to predict")
    parser.add_argument("--checkpoint", help="segmentation checkpoint (default: the latest under <run>/finetune; "
                        "--method picie|fs4: under <run>/picie or <run>/fs4)")
    parser.add_argument("--out", metavar="DIR", help="prediction folder (default: <run>/predict/<split>)")
    parser.add_argument("--match", metavar="FILE",
                        help="match.json to apply ('identity': predictions already use ground-truth ids). "
                        "Default: validation computes the Hungarian matching; test uses "
                        "<run>/predict/validation/match.json when it exists")
    parser.add_argument("--submission", action="store_true",
                        help="also pack <out>.zip (class folders, match.json, method.txt) for the benchmark server")
    parser.add_argument("--method", default="pass", choices=PREDICT_METHODS,
                        help="whose model predicts: pass (a fine-tuned segmenter, the default), picie or fs4 (nearest "
                        "centroid per pixel of a `lussray picie train` / `lussray fs4 train` network, scored with "
                        "the pixel protocol)")
    parser.add_argument("--centroids", metavar="FILE",
                        help="picie, fs4: the centroids (default: <run>/<method>-clusters/centroids.npy)")
    parser.add_argument("--method-text", default=None,
                        help="text of the submission's method.txt (default: a description of the run)")
    parser.add_argument("--crf", action="store_true",
                        help="refine with a dense CRF (the `crf` extra; settings predict.crf_*); "
                        "default folder <run>/predict/<split>-crf")


def split_folder(split: str, crf: bool) -> str:
    """Name of a split's prediction folder under ``<run>/predict``: CRF results live beside the plain ones."""
    return f"{split}-crf" if crf else split


def crf_refiner(config: LussConfig):
    """The dense-CRF ``refine`` hook with the ``predict.crf_*`` settings (raises UserError without the extra)."""
    from lussray.crf import CRFParams, CRFRefiner

    cfg = config.predict
    params = CRFParams(iterations=cfg.crf_iterations, pos_xy_std=cfg.crf_pos_xy_std, pos_w=cfg.crf_pos_w,
                       bi_xy_std=cfg.crf_bi_xy_std, bi_rgb_std=cfg.crf_bi_rgb_std, bi_w=cfg.crf_bi_w)
    return CRFRefiner(params, cfg.crf_timeout_s)


def resolve_match(given: str | None, split: str, run: str | None, crf: bool = False) -> Any:
    """The matching to use: ``given`` (``--match``), else Hungarian on validation, else the validation match.json."""
    if given == IDENTITY:
        return IDENTITY
    if given:
        if not storage.exists(given):
            raise UserError(f"--match {given}: no such file")
        return storage.absolute(given)
    if split == "validation":
        return HUNGARIAN
    if run:
        found = storage.join(run, STAGE, split_folder("validation", crf), MATCH_FILE)
        if storage.exists(found):
            print(f"[{STAGE}] {split}: using the validation matching {found}", flush=True)
            return found
    print(f"[{STAGE}] {split}: no match.json given or found: predictions are taken as ground-truth ids",
          flush=True)
    return IDENTITY


def predict(config: LussConfig, data: str, *, run: str | None = None, split: str = "validation",
            out: str | None = None, checkpoint: str | None = None, match: str | None = None, crf: bool = False,
            submission: bool = False, method: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Predict ``split`` of ``data`` with a segmentation checkpoint, match and score it.

    Args:
        config: the resolved config (``predict``, ``ingest``, ``dataset``, ``ray``).
        data: shards folder (absolute path or URI).
        run: run folder (the default checkpoint, output folder and validation matching come from it).
        split: the split to predict.
        out: the prediction folder (default ``<run>/predict/<split>[-crf]``).
        checkpoint: a segmentation checkpoint (default: the latest under ``<run>/finetune``).
        match: ``identity`` or a match.json (default: Hungarian on validation, else validation's match.json).
        crf: refine with the dense CRF (also when ``predict.crf`` is set).
        submission: also pack the predictions into ``<out>.zip``.
        method: the method description of the submission.
        overwrite: redo the predictions when the folder holds outputs of other inputs.

    Returns:
        The summary (also in ``<out>/summary.json``).
    """
    from lussray.data.ingest import init_ray

    if not out and not run:
        raise UserError("--out DIR or --run DIR is required")
    crf = bool(crf or config.predict.crf)
    out = out or storage.join(run, STAGE, split_folder(split, crf))
    checkpoint = finetune_checkpoint(run, checkpoint)
    resolved_match = resolve_match(match, split, run, crf)
    refine_fn = crf_refiner(config) if crf else None
    init_ray(config.ray)
    inputs = {"crf": dataclasses.asdict(refine_fn.params)} if refine_fn is not None else None
    summary = predict_segmenter(config, data, split, out, checkpoint, match=resolved_match, inputs=inputs,
                                refine_fn=refine_fn, run=run, overwrite=overwrite)
    if submission:
        method = method or f"lussray: PASS-style fine-tuned segmenter ({config.pretrain.arch}), checkpoint {checkpoint}"
        keys = written_keys(out)
        print(f"[{STAGE}] submission: {package_submission(out, keys, method)} ({len(keys)} predictions, "
              f"{summary['num_images']} images)", flush=True)
    return summary


def run(args: argparse.Namespace, config: LussConfig) -> int:
    """``lussray predict``: :func:`predict` of ``--split`` of ``--data`` (``--method picie``: PiCIE's)."""
    if not args.data:
        raise UserError("--data DIR (shards of `lussray prepare`) is required")
    absolute = {name: storage.absolute(getattr(args, name)) if getattr(args, name) else None
                for name in ("run", "out", "checkpoint", "centroids")}
    if args.method in ("picie", "fs4"):  # FS^4's network predicts as PiCIE's: nearest centroid per pixel
        from lussray.stages import picie

        if args.match or args.submission:
            raise UserError(f"--match and --submission apply to --method pass only ({args.method}'s predictions are "
                            "scored with the pixel protocol's Hungarian matching)")
        picie.predict(config, storage.absolute(args.data), absolute["run"], split=args.split, out=absolute["out"],
                      checkpoint=absolute["checkpoint"], centroids=absolute["centroids"], crf=args.crf,
                      overwrite=args.overwrite, stage=args.method)
        return 0
    if args.centroids:
        raise UserError("--centroids applies to --method picie and fs4 only")
    predict(config, storage.absolute(args.data), run=absolute["run"], split=args.split, out=absolute["out"],
            checkpoint=absolute["checkpoint"], match=args.match, crf=args.crf, submission=args.submission,
            method=args.method_text, overwrite=args.overwrite)
    return 0


def prediction_keys(out: str) -> list[str]:
    """Every ``<wnid>/<name>`` with a ``<out>/<wnid>/<name>.png``, sorted (local or object store)."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(out)
    keys = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        relative = info.path[len(root):].strip("/")
        if info.type == pafs.FileType.File and relative.endswith(".png") and relative.count("/") == 1:
            keys.append(relative[: -len(".png")])
    return sorted(keys)
