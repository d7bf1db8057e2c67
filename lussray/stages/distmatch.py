"""The distance-matching protocol: a weighted kNN of pixels against train-semi instance embeddings.

    lussray distmatch --split validation --data demo-out/shards --run demo-out/run [--checkpoint CKPT|random]
    lussray distmatch --split test --data shards/ --checkpoint pass_r50.pth --dataset imagenet-s919 --out dm/test --submission

The protocol of PASS ``distance_matching/`` (shared/reference/pass-imagenet-s.md, section 5), for
any backbone :func:`lussray.models.checkpoints.load_pretrained` can read (lussray, torchvision,
PASS, SwAV; default: the latest ``<run>/pretrain`` checkpoint; ``random``: no pretraining):

1. an actor pool over ``train-semi`` computes one instance embedding per (image, ground-truth label
   present, "other" included, ignore excluded) from the backbone's final features upsampled x4
   (:mod:`lussray.methods.knn`); the embeddings (~N x 10 x 2 rows) are gathered on the driver;
2. the prediction pool of :mod:`lussray.stages.predict` runs a :class:`KnnPredictor` over the
   split: each L2-normalised pixel feature takes the weighted vote of its k = 10 nearest instances
   (T = 0.07) over the N + 1 classes; ids are nearest-upsampled to H x W and written as
   ``<out>/<wnid>/<name>.png`` (default ``<out>`` = ``<run>/distmatch/<split>``);
3. the evaluator scores them. The reference's ``distance_matching.sh`` runs PASS ``evaluator.py``,
   which always applies the image-level Hungarian matching, so the headline numbers here do too
   (``match.json`` is written); the numbers without matching (the kNN labels are ground-truth ids
   already) are reported beside them. ``<out>/summary.json`` is written last.

``<out>/inputs.json`` records the inputs (backbone checkpoint, data, ``distmatch`` settings): a
rerun with the same ones is skipped, other ones are refused (``--overwrite`` predicts again).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from lussray import storage
from lussray.completion import (
    FORMAT_VERSION,
    NOT_OUTPUT_KEYS,
    StageRecord,
    checkpoint_fingerprint,
    config_fingerprint,
    data_fingerprint,
    has_files,
)
from lussray.config import LussConfig
from lussray.errors import UserError
from lussray.seeds import derived_seed
from lussray.stages import finetune, predict

STAGE = "distmatch"
RANDOM_BACKBONE = "random"


# -- feature sources (built once per actor) -----------------------------------------------------


class BackboneFeatures:
    """The backbone's final features upsampled x``upsample`` (stride 8 with the default 4)."""

    def __init__(self, checkpoint: str | None, arch: str, upsample: int = 4, torch_threads: int = 0,
                 seed: int = 0) -> None:
        """Load the backbone (``checkpoint`` None: random weights drawn with ``seed``).

        Raises:
            UserError: if the checkpoint lacks backbone weights of ``arch``.
        """
        import torch

        from lussray.models.segmenter import Segmenter

        self.device = predict.torch_device(torch_threads)
        torch.manual_seed(seed)
        model = Segmenter(arch, num_outputs=2)  # the head is never used
        if checkpoint:
            finetune.load_backbone(model, checkpoint)
        self.backbone = model.backbone.eval().to(self.device)
        self.upsample = upsample

    def __call__(self, images: np.ndarray, labels: list[np.ndarray | None]):
        """(B, C, h', w') features of uint8 (B, h, w, 3) images (labels are not looked at)."""
        import torch

        from lussray.methods.knn import dense_features

        with torch.inference_mode():
            c4 = self.backbone(predict.to_model_input(images, self.device))["c4"]
            return dense_features(c4, self.upsample)


class OracleFeatures:
    """One-hot ground truth at the resized image's resolution: the protocol's upper bound.

    An oracle, for tests and sanity checks: the kNN then recovers every label exactly, so the
    predictions score 100 mIoU when every class occurs. Ignore pixels get a zero vector.
    """

    def __init__(self, num_classes: int) -> None:
        import torch

        self.num_labels = num_classes + 1
        self.device = torch.device("cpu")

    def __call__(self, images: np.ndarray, labels: list[np.ndarray | None]):
        import torch

        from lussray.models.segmenter import resize_nearest

        if any(label is None for label in labels):
            raise UserError("the oracle features need ground truth on every split they see")
        size = images.shape[1:3]
        small = torch.stack([resize_nearest(torch.from_numpy(np.asarray(label, np.int64)), size) for label in labels])
        onehot = torch.zeros(len(labels), self.num_labels + 1, *size)
        onehot.scatter_(1, small.clamp(max=self.num_labels)[:, None], 1.0)  # ignore -> the extra channel
        return onehot[:, : self.num_labels]


# -- actors --------------------------------------------------------------------------------------


class InstanceEmbedder:
    """``map_batches`` callable class: one row per (train-semi image, label present)."""

    def __init__(self, feature_factory: Any, feature_kwargs: dict[str, Any]) -> None:
        self.features = feature_factory(**feature_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from lussray.methods.knn import instance_embeddings

        images = [np.asarray(image) for image in batch["image"]]
        labels = [np.asarray(label) for label in batch["label"]]
        keys, ids, embeddings = [], [], []
        for indices in predict.group_by_shape(images).values():
            features = self.features(np.stack([images[i] for i in indices]), [labels[i] for i in indices])
            for row, i in enumerate(indices):
                emb, present = instance_embeddings(features[row], torch.from_numpy(labels[i].astype(np.int64)))
                embeddings.append(emb.cpu().numpy())
                ids.extend(present.tolist())
                keys.extend([str(batch["key"][i])] * len(present))
        return {"key": np.asarray(keys), "label": np.asarray(ids, np.int64),
                "embedding": np.concatenate(embeddings).astype(np.float32)}


class KnnPredictor:
    """Labels every pixel by the weighted vote of its nearest instance embeddings (a :class:`predict.Predictor`)."""

    def __init__(self, feature_factory: Any, feature_kwargs: dict[str, Any], bank: Any, num_labels: int,
                 k: int = 10, temperature: float = 0.07) -> None:
        """Build the feature source once; ``bank`` is ``(embeddings, labels)`` or a Ray reference to it."""
        import ray
        import torch

        if isinstance(bank, ray.ObjectRef):
            bank = ray.get(bank)
        self.features = feature_factory(**feature_kwargs)
        device = getattr(self.features, "device", torch.device("cpu"))
        self.bank = torch.from_numpy(np.array(bank[0], np.float32)).to(device)  # copies: Ray's arrays are read-only
        self.bank_labels = torch.from_numpy(np.array(bank[1], np.int64)).to(device)
        self.num_labels, self.k, self.temperature = num_labels, k, temperature

    def predict(self, images, sizes, labels) -> list[np.ndarray]:
        from lussray.methods.knn import knn_vote
        from lussray.models.segmenter import resize_nearest

        out: list[np.ndarray] = [np.zeros(0)] * len(images)
        for indices in predict.group_by_shape(images).values():
            features = self.features(np.stack([images[i] for i in indices]), [labels[i] for i in indices])
            _, channels, h, w = features.shape
            for row, i in enumerate(indices):
                pixels = features[row].reshape(channels, h * w).T
                ids = knn_vote(pixels, self.bank, self.bank_labels, self.num_labels, k=self.k,
                               temperature=self.temperature).view(h, w)
                out[i] = resize_nearest(ids, tuple(sizes[i])).cpu().numpy()
        return out


# -- driver --------------------------------------------------------------------------------------


def instance_bank(config: LussConfig, data: str, feature_factory: Any, feature_kwargs: dict[str, Any]
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """Instance embeddings of ``train-semi`` gathered on the driver: (M, C) float32, (M,) ids, images.

    Raises:
        UserError: if train-semi has no ground truth.
    """
    from lussray.data.ingest import evaluation_images
    from lussray.data.shards import read_manifest

    manifest = read_manifest(data, "train-semi")
    if not manifest.get("has_segmentation"):
        raise UserError(f"{storage.join(data, 'train-semi')} has no ground truth (seg.png): distance matching needs it")
    parts: list[dict[str, np.ndarray]] = []
    predict.run_pool(evaluation_images(data, "train-semi", config.ingest), InstanceEmbedder,
                     {"feature_factory": feature_factory, "feature_kwargs": feature_kwargs}, config.distmatch,
                     total=int(manifest["num_samples"]), what="train-semi instances", stage=STAGE,
                     output_rows=parts.append)
    embeddings = np.concatenate([p["embedding"] for p in parts]).astype(np.float32)
    labels = np.concatenate([p["label"] for p in parts]).astype(np.int64)
    images = len({str(k) for p in parts for k in p["key"]})
    return embeddings, labels, images


def fingerprint(config: LussConfig, data: str, split: str, feature_factory: Any, feature_kwargs: dict[str, Any],
                inputs: dict[str, Any] | None) -> dict[str, Any]:
    """What determines a distance-matching folder (:mod:`lussray.completion`).

    The ``distmatch`` settings, ``ingest.eval_short_side``, N, the manifests of train-semi and
    ``split``, the feature source and its arguments (a checkpoint goes in ``inputs``, by
    :func:`~lussray.completion.checkpoint_fingerprint`).
    """
    features = {key: value for key, value in feature_kwargs.items() if key not in NOT_OUTPUT_KEYS | {"checkpoint"}}
    return {"format": FORMAT_VERSION,
            **config_fingerprint(config, "distmatch", "ingest.eval_short_side", "dataset.num_classes"),
            "split": split, "data": data_fingerprint(data, ["train-semi", split]),
            "features": {"source": feature_factory.__name__, **features}, **(inputs or {})}


def distance_matching(config: LussConfig, data: str, split: str, out: str, feature_factory: Any,
                      feature_kwargs: dict[str, Any], *, inputs: dict[str, Any] | None = None,
                      overwrite: bool = False) -> dict[str, Any]:
    """The whole protocol for one split; returns the summary (also ``<out>/summary.json``).

    ``<out>/inputs.json`` records the inputs (:func:`fingerprint`): a rerun with the same ones
    returns the summary at once, other ones are refused unless ``overwrite``.

    Args:
        config: the resolved config (``distmatch`` section, ingest, ``dataset.num_classes``).
        data: shards folder with ``train-semi`` (with ground truth) and ``split``.
        split: ``validation`` or ``test``.
        out: prediction folder.
        feature_factory: a feature source class (:class:`BackboneFeatures`, :class:`OracleFeatures`).
        feature_kwargs: its constructor arguments.
        inputs: extra entries of the inputs record (the backbone checkpoint).
        overwrite: remove outputs of other inputs and predict again instead of refusing.

    Raises:
        UserError: if ``out`` holds predictions of other inputs (and not ``overwrite``).
    """
    record = StageRecord(out, fingerprint(config, data, split, feature_factory, feature_kwargs, inputs), STAGE,
                         extra_outputs=[predict.submission_path(out)])
    record.check(overwrite)
    summary_path = storage.join(out, predict.SUMMARY_FILE)
    if storage.exists(summary_path) and record.recorded() is not None:
        print(f"[{STAGE}] {split}: complete, {summary_path}", flush=True)
        return storage.read_json(summary_path)
    storage.makedirs(out)
    with record.recording(produced=lambda: has_files(out, ".png") or storage.exists(summary_path)):
        return _distance_matching(config, data, split, out, feature_factory, feature_kwargs, record.fingerprint)


def _distance_matching(config: LussConfig, data: str, split: str, out: str, feature_factory: Any,
                       feature_kwargs: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    import ray

    from lussray.eval.io import write_match

    cfg, num_classes = config.distmatch, config.dataset.num_classes
    started = time.perf_counter()
    embeddings, labels, images = instance_bank(config, data, feature_factory, feature_kwargs)
    print(f"[{STAGE}] {len(labels)} instance embeddings (C = {embeddings.shape[1]}) from {images} train-semi "
          f"images; per label: {np.bincount(labels, minlength=num_classes + 1).tolist()}", flush=True)
    bank_ref = ray.put((embeddings, labels))
    predictor_kwargs = {"feature_factory": feature_factory, "feature_kwargs": feature_kwargs, "bank": bank_ref,
                        "num_labels": num_classes + 1, "k": cfg.k, "temperature": cfg.temperature}
    result = predict.predict_split(config, data, split, out, KnnPredictor, predictor_kwargs, pool=cfg,
                                   evaluate=True, stage=STAGE)
    predict.write_keys(out, result.keys)
    summary: dict[str, Any] = {
        "inputs": inputs, "num_instances": len(labels), "num_images": len(result.keys),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if result.accumulator is not None and result.accumulator.num_images:
        matched, mapping = predict.score(result.accumulator, predict.HUNGARIAN)
        identity, _ = predict.score(result.accumulator, predict.IDENTITY)
        if split == "validation":  # on test the labels are submitted as they are (ground-truth ids)
            write_match(storage.join(out, predict.MATCH_FILE), mapping)
            summary["match_file"] = storage.join(out, predict.MATCH_FILE)
        summary.update(matching="hungarian (as the reference's evaluator.py)",
                       metrics=predict.json_safe(matched.to_dict()),
                       metrics_without_matching=predict.json_safe(identity.to_dict()))
        print(f"[{STAGE}] {split}, Hungarian matching (as the reference):", flush=True)
        print(predict.format_metrics(matched), flush=True)
        print(f"[{STAGE}] {split}, without matching: mIoU {identity.miou:.2f}", flush=True)
    storage.write_json_atomic(storage.join(out, predict.SUMMARY_FILE), summary)
    print(f"[{STAGE}] {split}: done, {len(result.keys)} images in {summary['seconds']:.1f} s -> {out}", flush=True)
    return summary


def backbone_checkpoint(run: str | None, given: str | None) -> str | None:
    """``--checkpoint`` (``random``: None), else the latest ``<run>/pretrain`` checkpoint."""
    from lussray.stages.attention import stage1_checkpoint

    if given == RANDOM_BACKBONE:
        return None
    if given:
        given = storage.absolute(given)
        if not storage.exists(given):
            raise UserError(f"--checkpoint {given}: no such file")
        return given
    if not run:
        raise UserError("--checkpoint CKPT (or 'random') or --run DIR (with a pretrain checkpoint) is required")
    return stage1_checkpoint(run, None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lussray distmatch``."""
    parser.add_argument("--split", required=True, choices=("validation", "test"), help="split to predict")
    parser.add_argument("--checkpoint", help="backbone: a lussray, torchvision or PASS/SwAV checkpoint, or 'random' "
                        "(default: the latest under <run>/pretrain)")
    parser.add_argument("--out", metavar="DIR", help="prediction folder (default: <run>/distmatch/<split>)")
    parser.add_argument("--submission", action="store_true", help="also pack <out>.zip with method.txt")


def run(args: argparse.Namespace, config: LussConfig) -> int:
    """Run the protocol on ``--split`` of ``--data``."""
    from lussray.data.ingest import init_ray

    if not args.data:
        raise UserError("--data DIR (shards of `lussray prepare`, with train-semi) is required")
    data = storage.absolute(args.data)
    run_root = storage.absolute(args.run) if args.run else None
    if not args.out and not run_root:
        raise UserError("--out DIR or --run DIR is required")
    out = storage.absolute(args.out) if args.out else storage.join(run_root, STAGE, args.split)
    checkpoint = backbone_checkpoint(run_root, args.checkpoint)
    finetune.check_backbone(checkpoint, config.pretrain.arch)
    init_ray(config.ray)
    feature_kwargs = {"checkpoint": checkpoint, "arch": config.pretrain.arch,
                      "upsample": config.distmatch.feature_upsample, "torch_threads": config.distmatch.torch_threads,
                      "seed": derived_seed(config.seed, "random_backbone")}
    print(f"[{STAGE}] backbone: {checkpoint or 'random initialisation'} ({config.pretrain.arch})", flush=True)
    distance_matching(config, data, args.split, out, BackboneFeatures, feature_kwargs,
                      inputs={"checkpoint": checkpoint_fingerprint(checkpoint, run_root) or RANDOM_BACKBONE},
                      overwrite=args.overwrite)
    if args.submission:
        method = f"lussray distance matching (k={config.distmatch.k}, T={config.distmatch.temperature}), " \
                 f"backbone {checkpoint or 'random'} ({config.pretrain.arch})"
        keys = predict.written_keys(out)
        print(f"[{STAGE}] submission: {predict.package_submission(out, keys, method)}", flush=True)
    return 0
