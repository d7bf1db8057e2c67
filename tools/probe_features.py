"""Probe a backbone's features on a generated dataset without Ray: what the LUSS protocols can read.

    python tools/probe_features.py --tree demo-out/imagenet-s --checkpoint random \
        demo-out/run/pretrain/checkpoint_step=00000360/checkpoint.pt
    python tools/probe_features.py --tree demo-out/imagenet-s --checkpoint random --layers c2 c3 c4 --short-side 128

A diagnostic for the protocols of ``lussray distmatch`` and ``lussray semisup`` in one process, in
seconds instead of minutes: for every backbone (a checkpoint ``lussray.models.checkpoints`` loads,
or ``random``: a seeded random initialisation) and every stage output (c1..c4), on the
``Resize(short_side)`` images of train-semi (the labelled bank) and validation (scored):

- ``knn``: the distance-matching protocol (:mod:`lussray.methods.knn`: instance embeddings of the
  train-semi labels, weighted kNN vote of every stride-8 pixel), scored by the official metrics with
  the image-level Hungarian matching (as ``lussray distmatch``);
- ``probe``: a linear 1x1 classifier trained on the frozen stride-8 pixel features of train-semi
  (ignore 1000), validation scored without matching: what ``lussray semisup`` could reach if it
  did not move the backbone;
- ``obj_1nn`` / ``obj_kmeans``: image-level accuracy of the feature mean under the ground-truth
  object mask (1-NN of validation against train-semi; k-means with Hungarian matching over both),
  i.e. whether the features group the categories, as labelgen's clustering needs.

The last line printed is the JSON of every row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from lussray.data.augment import decode_image, resize_shorter_side
from lussray.data.imagenet_s import IGNORE_ID, Categories, list_split, read_label_png
from lussray.eval.matching import cooccurrence, hungarian_mapping
from lussray.eval.metrics import compute_metrics
from lussray.eval.stats import StatsAccumulator, image_stats
from lussray.methods.knn import instance_embeddings, knn_vote
from lussray.models.checkpoints import load_pretrained
from lussray.models.segmenter import Segmenter, resize_nearest
from lussray.seeds import derived_seed
from lussray.stages.predict import to_model_input

STRIDE = 8  # the protocols' feature resolution (c4 upsampled x4)


def load_split(tree: str, split: str, short_side: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(key, resized uint8 image, int ground truth at the original size or None) of every image of ``split``."""
    categories = Categories.from_root(tree)
    out = []
    for sample in list_split(tree, split, categories.wnids):
        image = decode_image(Path(sample.image_path).read_bytes())
        label = read_label_png(sample.label_path) if sample.label_path else None
        out.append((sample.key, resize_shorter_side(image, short_side), label))
    return out


def build_backbone(checkpoint: str, arch: str, seed: int):
    """The backbone in eval mode: a checkpoint's, or ``random`` drawn as ``lussray distmatch`` draws it."""
    torch.manual_seed(derived_seed(seed, "random_backbone"))
    model = Segmenter(arch, num_outputs=2)
    if checkpoint != "random":
        load_pretrained(model, checkpoint)
    return model.backbone.eval()


def recalibrate_batchnorm(backbone, items, batch: int = 16) -> None:
    """Re-estimate every BatchNorm's running statistics on ``items`` (cumulative averages, "precise BN")."""
    from torch import nn

    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    backbone.train()
    with torch.inference_mode():
        for start in range(0, len(items), batch):
            backbone(to_model_input(np.stack([image for _, image, _ in items[start:start + batch]]),
                                    torch.device("cpu")))
    backbone.eval()


def stride8_features(backbone, items, layers: list[str], batch: int = 16) -> dict[str, list[torch.Tensor]]:
    """Per layer, one (C, H/8, W/8) feature map per image (bilinear from the layer's own stride)."""
    out: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    with torch.inference_mode():
        for start in range(0, len(items), batch):
            images = np.stack([image for _, image, _ in items[start:start + batch]])
            size = (images.shape[1] // STRIDE, images.shape[2] // STRIDE)
            stages = backbone(to_model_input(images, torch.device("cpu")))
            for layer in layers:
                maps = F.interpolate(stages[layer], size=size, mode="bilinear", align_corners=False)
                out[layer].extend(maps.unbind(0))
    return out


def score(predictions: list[np.ndarray], items, num_classes: int, match: bool) -> dict[str, float]:
    """mIoU / Img-Acc / F of predictions at ground-truth size (Hungarian matching or none)."""
    accumulator = StatsAccumulator(num_classes)
    for pred, (_, _, gt) in zip(predictions, items):
        accumulator.add(image_stats(pred, gt, num_classes))
    mapping = None
    if match:
        pred_images, pred_labels, gt_images, gt_labels = accumulator.presence()
        mapping = hungarian_mapping(cooccurrence(pred_images, pred_labels, gt_images, gt_labels,
                                                 accumulator.num_images, num_classes))
    metrics = compute_metrics(accumulator, mapping)
    return {"mIoU": round(metrics.miou, 2), "Acc": round(metrics.img_acc, 2), "F": round(metrics.fmeasure, 2)}


def knn_protocol(bank_feats, bank_items, val_feats, val_items, num_classes: int) -> dict[str, float]:
    """Distance matching (k = 10, T = 0.07) with the Hungarian matching."""
    embeddings, labels = [], []
    for feats, (_, _, gt) in zip(bank_feats, bank_items):
        emb, ids = instance_embeddings(feats, torch.from_numpy(gt.astype(np.int64)))
        embeddings.append(emb)
        labels.append(ids)
    bank, bank_labels = torch.cat(embeddings), torch.cat(labels)
    predictions = []
    for feats, (_, _, gt) in zip(val_feats, val_items):
        c, h, w = feats.shape
        ids = knn_vote(feats.reshape(c, h * w).T, bank, bank_labels, num_classes + 1).view(h, w)
        predictions.append(resize_nearest(ids, gt.shape).numpy())
    return score(predictions, val_items, num_classes, match=True)


def pixel_table(feats, items) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, C) L2-normalised pixel features and (P,) labels at stride 8 (ignore dropped)."""
    rows, labels = [], []
    for f, (_, _, gt) in zip(feats, items):
        c, h, w = f.shape
        small = resize_nearest(torch.from_numpy(gt.astype(np.int64)), (h, w)).reshape(-1)
        keep = small != IGNORE_ID
        rows.append(F.normalize(f.reshape(c, -1).T, dim=1)[keep])
        labels.append(small[keep])
    return torch.cat(rows), torch.cat(labels)


def linear_probe(bank_feats, bank_items, val_feats, val_items, num_classes: int, steps: int = 300
                 ) -> dict[str, float]:
    """A 1x1 softmax classifier on frozen, L2-normalised stride-8 pixel features; no matching."""
    x, y = pixel_table(bank_feats, bank_items)
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], num_classes + 1)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(head(x * 10), y).backward()
        optimizer.step()
    predictions = []
    with torch.no_grad():
        for feats, (_, _, gt) in zip(val_feats, val_items):
            c, h, w = feats.shape
            ids = head(F.normalize(feats.reshape(c, -1).T, dim=1) * 10).argmax(1).view(h, w)
            predictions.append(resize_nearest(ids, gt.shape).numpy())
    return score(predictions, val_items, num_classes, match=False)


def object_vectors(feats, items) -> tuple[np.ndarray, np.ndarray]:
    """Mean feature under each image's main-object mask (the most frequent category) and its class."""
    vectors, classes = [], []
    for f, (_, _, gt) in zip(feats, items):
        small = resize_nearest(torch.from_numpy(gt.astype(np.int64)), f.shape[1:])
        counts = np.bincount(small[(small > 0) & (small != IGNORE_ID)].numpy(), minlength=2)
        cls = int(counts.argmax()) if counts.sum() else 0
        mask = (small == cls).float() if cls else torch.ones(f.shape[1:])
        vectors.append(F.normalize((f * mask).sum((1, 2)) / mask.sum().clamp(min=1), dim=0).numpy())
        classes.append(cls)
    return np.stack(vectors), np.asarray(classes)


def object_accuracy(bank_feats, bank_items, val_feats, val_items, num_classes: int, seed: int) -> dict[str, float]:
    """1-NN (validation vs train-semi) and k-means (both, Hungarian) accuracy of object vectors."""
    import faiss

    xb, yb = object_vectors(bank_feats, bank_items)
    xv, yv = object_vectors(val_feats, val_items)
    nn_acc = float((yb[(xv @ xb.T).argmax(1)] == yv).mean())
    x, y = np.concatenate([xb, xv]).astype(np.float32), np.concatenate([yb, yv])
    kmeans = faiss.Kmeans(x.shape[1], num_classes, niter=50, nredo=5, seed=seed, spherical=True)
    kmeans.train(x)
    assigned = kmeans.index.search(x, 1)[1][:, 0]
    confusion = np.zeros((num_classes, num_classes + 1))
    np.add.at(confusion, (assigned, y), 1)
    rows, cols = linear_sum_assignment(-confusion)
    return {"obj_1nn": round(100 * nn_acc, 1), "obj_kmeans": round(100 * confusion[rows, cols].sum() / len(y), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", required=True, help="generated ImageNet-S folder tree (lussray synth --out)")
    parser.add_argument("--checkpoint", nargs="+", required=True, help="checkpoints, or 'random'")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--layers", nargs="+", default=["c4"])
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="the run seed of the random backbone")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recalibrate-bn", action="store_true",
                        help="first re-estimate BatchNorm statistics on the train split at --short-side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    num_classes = Categories.from_root(args.tree).num_classes
    bank_items = load_split(args.tree, "train-semi", args.short_side)
    val_items = load_split(args.tree, "validation", args.short_side)
    train_items = load_split(args.tree, "train", args.short_side) if args.recalibrate_bn else []
    rows = []
    print(f"{'backbone':<40}{'layer':>6}{'knn mIoU':>10}{'probe mIoU':>12}{'obj 1nn':>9}{'obj km':>8}{'s':>6}")
    for checkpoint in args.checkpoint:
        backbone = build_backbone(checkpoint, args.arch, args.seed)
        if args.recalibrate_bn:
            recalibrate_batchnorm(backbone, train_items)
        started = time.perf_counter()
        bank = stride8_features(backbone, bank_items, args.layers)
        val = stride8_features(backbone, val_items, args.layers)
        for layer in args.layers:
            row = {"backbone": checkpoint, "layer": layer, "short_side": args.short_side,
                   "recalibrated_bn": args.recalibrate_bn,
                   "knn": knn_protocol(bank[layer], bank_items, val[layer], val_items, num_classes),
                   "probe": linear_probe(bank[layer], bank_items, val[layer], val_items, num_classes),
                   **object_accuracy(bank[layer], bank_items, val[layer], val_items, num_classes, args.seed)}
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            name = checkpoint if len(checkpoint) <= 38 else "..." + checkpoint[-35:]
            print(f"{name:<40}{layer:>6}{row['knn']['mIoU']:>10.2f}{row['probe']['mIoU']:>12.2f}"
                  f"{row['obj_1nn']:>9.1f}{row['obj_kmeans']:>8.1f}{row['seconds']:>6.0f}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
