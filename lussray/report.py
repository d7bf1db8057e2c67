"""``<run>/report.html``: what a run learned, to look at (written by ``lussray run``).

One self-contained HTML file (images are embedded PNGs, curves inline SVG):

- the validation metrics of the pipeline and its baselines (``<run>/metrics.json``);
- the training curves of every training stage (``<run>/<stage>/metrics.jsonl``);
- validation samples side by side (also saved as ``<run>/report-samples.png``): image, ground
  truth, pixel attention (channel mean, stretched per image), pseudo label (labelgen's labeller
  applied to the image), prediction (and with CRF); every label map in ground-truth ids through
  the run's ``match.json``, in one palette;
- for every category found, the training images whose embeddings are nearest its centroid.
"""

from __future__ import annotations

import datetime
import html
import io
import json
import os
from typing import Any

import numpy as np

from lussray import storage, viz
from lussray.config import LussConfig
from lussray.data.imagenet_s import label_from_png_bytes
from lussray.data.shards import iter_tar, shard_paths

REPORT_FILE = "report.html"
SAMPLES_FILE = "report-samples.png"
TRAINING_STAGES = ("pretrain", "attention", "finetune")
PANEL_HEIGHT = 128
GALLERY_PER_CLUSTER = 6
GALLERY_MAX_EMBEDDINGS = 20_000  # rows read for the gallery; enough to find typical members

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 16px; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.row { display: flex; gap: 6px; align-items: flex-end; margin-bottom: 10px; flex-wrap: wrap; }
.cell { text-align: center; font-size: 11px; }
.swatch { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 10px; vertical-align: middle; }
"""


def read_metrics_log(path: str) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (empty when the file is missing)."""
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line.strip()]


def metrics_section(run: str) -> str:
    """The table of ``<run>/metrics.json``: pipeline rows first, then baselines."""
    path = storage.join(run, "metrics.json")
    if not storage.exists(path):
        return "<p>No metrics.json yet.</p>"
    result = storage.read_json(path)
    rows = {**result["metrics"], **{f"baseline: {k}": v for k, v in result.get("baselines", {}).items()}}
    keys = (("mIoU", "mIoU"), ("mBIoU", "boundary mIoU"), ("Acc", "Img-Acc"), ("FMeasure", "F"))
    head = "".join(f"<th>{label}</th>" for _, label in keys)
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{'-' if m.get(k) is None else f'{m[k]:.2f}'}</td>" for k, _ in keys) + "</tr>"
        for name, m in rows.items())
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in result.get("stage_seconds", {}).items())
    return (f"<h2>Validation metrics (percent)</h2><table><tr><th></th>{head}</tr>{body}</table>"
            f"<p>Stage times: {html.escape(seconds)}</p>")


def curves_section(run: str) -> str:
    """Loss against step for each training stage that logged metrics."""
    charts = []
    for stage in TRAINING_STAGES:
        rows = [r for r in read_metrics_log(storage.join(run, stage, "metrics.jsonl")) if "loss" in r]
        if not rows:
            continue
        series = {"loss": [(r["step"], r["loss"]) for r in rows]}
        if "pixel_acc" in rows[0]:
            series["pixel accuracy"] = [(r["step"], r["pixel_acc"]) for r in rows]
        charts.append(viz.svg_curves(series, title=stage))
    return "<h2>Training curves</h2><div class='row'>" + "".join(charts) + "</div>" if charts else ""


def _lookup(run: str, num_classes: int) -> np.ndarray | None:
    """Generated id -> ground-truth id from the validation ``match.json`` (None: ids are taken as they are)."""
    from lussray.eval.io import match_to_lookup

    path = storage.join(run, "predict", "validation", "match.json")
    if not storage.exists(path):
        return None
    match = {int(k): int(v) for k, v in storage.read_json(path).items()}
    lookup = match_to_lookup({0: 0, **match}, num_classes, source=path)
    return np.where(lookup < 0, 0, lookup)


def _mapped(label: np.ndarray, lookup: np.ndarray | None) -> np.ndarray:
    if lookup is None:
        return label
    return lookup[np.clip(label, 0, len(lookup) - 1)]


def _prediction(run: str, folder: str, key: str) -> np.ndarray | None:
    path = storage.join(run, "predict", folder, f"{key}.png")
    return label_from_png_bytes(storage.read_bytes(path)) if storage.exists(path) else None


def sample_panels(config: LussConfig, data: str, run: str, num_samples: int) -> list[list[tuple[str, np.ndarray]]]:
    """Per validation sample: (caption, RGB panel at PANEL_HEIGHT) for image, ground truth, attention,
    pseudo label, prediction and prediction + CRF (those that exist)."""
    from lussray.clustering.pixel_labels import apply_threshold
    from lussray.data.augment import decode_image
    from lussray.stages.labelgen import pixel_labeler

    labeler = pixel_labeler(config, run)
    lookup = _lookup(run, config.dataset.num_classes)
    rows = []
    for key, members in _first_samples(data, "validation", num_samples):
        ids, scores = labeler.pixel_maps(members["jpg"])
        panels = [(key, decode_image(members["jpg"]), False)]
        if "seg.png" in members:
            panels.append(("ground truth", viz.colorize(label_from_png_bytes(members["seg.png"])), True))
        low, high = float(scores.min()), float(scores.max())
        stretched = (scores - low) / max(high - low, 1e-6)  # per image: the contrast, not the level
        panels.append((f"attention {low:.2f}..{high:.2f}", viz.heatmap(stretched), False))
        pseudo = _mapped(apply_threshold(ids, scores, labeler.tau), lookup)
        panels.append((f"pseudo label (tau {labeler.tau:.2f})", viz.colorize(pseudo), True))
        for folder, caption in (("validation", "prediction"), ("validation-crf", "prediction + CRF")):
            predicted = _prediction(run, folder, key)
            if predicted is not None:
                panels.append((caption, viz.colorize(_mapped(predicted, lookup)), True))
        rows.append([(caption, viz.resize_to_height(image, PANEL_HEIGHT, nearest=nearest))
                     for caption, image, nearest in panels])
    return rows


def samples_section(rows: list[list[tuple[str, np.ndarray]]]) -> str:
    """The sample panels as rows of captioned images."""
    html_rows = ["<div class='row'>" + "".join(
        f"<div class='cell'>{viz.img_tag(image, caption)}<br>{html.escape(caption)}</div>"
        for caption, image in row) + "</div>" for row in rows]
    return ("<h2>Validation samples</h2><p>Label maps in ground-truth ids (generated ids through the run's "
            "match.json); black = other, white = ignore.</p>" + "".join(html_rows))


def samples_sheet(rows: list[list[tuple[str, np.ndarray]]], gap: int = 4) -> np.ndarray:
    """The sample panels as one RGB image (rows of panels on white), e.g. for a README."""
    lines = [np.concatenate([np.pad(image, ((0, gap), (0, gap), (0, 0)), constant_values=255)
                             for _, image in row], axis=1) for row in rows]
    width = max(line.shape[1] for line in lines)
    return np.concatenate([np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0)), constant_values=255)
                           for line in lines])


def _first_samples(data: str, split: str, count: int):
    for path in shard_paths(data, split):
        for key, members in iter_tar(path):
            if count <= 0:
                return
            count -= 1
            yield key, members


def gallery_section(config: LussConfig, data: str, run: str) -> str:
    """For every centroid, the training images nearest to it (cosine, among the first embeddings)."""
    import pyarrow.parquet as pq

    from lussray.data.augment import center_crop, decode_image, resize_shorter_side
    from lussray.stages.labelgen import Outputs

    outputs = Outputs(storage.join(run, "labelgen"))
    centroids = np.load(io.BytesIO(storage.read_bytes(outputs.centroids)))
    keys, vectors, sources = [], [], []
    for path in shard_paths(data, "train"):
        parquet = outputs.embedding_file(os.path.basename(path))
        if not storage.exists(parquet) or len(keys) >= GALLERY_MAX_EMBEDDINGS:
            break
        table = pq.read_table(io.BytesIO(storage.read_bytes(parquet)))
        keys += table.column("key").to_pylist()
        vectors.append(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)))
        sources += [path] * table.num_rows
    if not keys:
        return ""
    embeddings = np.concatenate(vectors).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True) + 1e-8
    unit = centroids / (np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-8)
    nearest = np.argsort(-(unit @ embeddings.T), axis=1)[:, :GALLERY_PER_CLUSTER]
    wanted = {keys[i]: sources[i] for i in np.unique(nearest)}
    jpegs = {}
    for path in sorted(set(wanted.values())):
        jpegs.update({key: m["jpg"] for key, m in iter_tar(path) if key in wanted})
    lookup = _lookup(run, config.dataset.num_classes)
    names = _category_names(data)
    rows = []
    for cluster, members in enumerate(nearest):
        label = cluster + 1
        class_id = int(lookup[label]) if lookup is not None and label < len(lookup) else label
        name = names[class_id - 1] if 0 < class_id <= len(names) else "other"
        colour = "#%02x%02x%02x" % tuple(int(c) for c in viz.colorize(np.array([class_id]))[0])
        thumbs = "".join(viz.img_tag(center_crop(resize_shorter_side(decode_image(jpegs[keys[i]]), 96), 96), keys[i])
                         for i in members)
        rows.append(f"<div><span class='swatch' style='background:{colour}'></span>category {label} "
                    f"(matched to {html.escape(name)})<div class='row'>{thumbs}</div></div>")
    return "<h2>Nearest training images per category</h2>" + "".join(rows)


def _category_names(data: str) -> list[str]:
    path = storage.join(data, "categories.txt")
    if not storage.exists(path):
        return []
    return [line.strip() for line in storage.read_bytes(path).decode().splitlines() if line.strip()]


def write_report(config: LussConfig, data: str, run: str, num_samples: int = 8) -> str:
    """Write ``<run>/report.html`` and ``<run>/report-samples.png`` (atomically); return the report's path."""
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    rows = sample_panels(config, data, run, num_samples)
    if rows:
        storage.write_bytes_atomic(storage.join(run, SAMPLES_FILE), viz.png_bytes(samples_sheet(rows)))
    body = "".join([
        f"<h1>lussray run report</h1><p>run <code>{html.escape(run)}</code>, data <code>{html.escape(data)}</code>, "
        f"dataset {html.escape(config.dataset.name)}, {when}</p>",
        metrics_section(run), curves_section(run), samples_section(rows), gallery_section(config, data, run)])
    page = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lussray report</title><style>{STYLE}</style>" \
           f"</head><body>{body}</body></html>"
    path = storage.join(run, REPORT_FILE)
    storage.write_bytes_atomic(path, page.encode())
    return path
