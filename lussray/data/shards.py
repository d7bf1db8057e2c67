"""``lussray prepare``: pack an ImageNet-S folder tree into webdataset shards.

    lussray prepare --src ImageNetS50 --out shards/ --dataset imagenet-s50
    lussray prepare --src imagenet-s --out s3://bucket/imagenet-s919 --dataset imagenet-s919 \\
        dataset.category_file=ImageNetS_categories_im919.txt

Per split, ``<out>/<split>/<split>-%06d.tar`` shards hold one sample per image with key
``<wnid>/<name>`` and members ``jpg`` (the original bytes, never re-encoded), ``json``
(wnid, class id, [H, W], split) and ``seg.png`` (the ground-truth PNG, where it exists).
``<out>/<split>/manifest.json`` lists the shards with sample counts and sha256 checksums and
the images that were skipped (corrupt, truncated, or a label of another size) with the reason;
it is written last. ``<out>/categories.txt`` holds the category list.

Samples are written in a seeded random order, not class order (:func:`mixed_order`), so that a
stream over the shards yields mixed-class batches. The plan (which sample goes to which shard)
depends only on the sorted source tree and that fixed seed, so an interrupted run resumes: shards already written (recorded by a small ``.done.json`` beside
each tar) are kept, the others are written; a complete split is skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import tarfile
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from PIL import Image
from typing_extensions import Self

from lussray import storage
from lussray.data.imagenet_s import SPLITS, Categories, Sample, list_split
from lussray.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CATEGORIES = "categories.txt"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardPlan:
    """The samples of one shard, fixed before anything is written."""

    split: str
    index: int
    samples: tuple[Sample, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the plan, so that a resumed run never keeps a shard of another plan."""
        digest = hashlib.sha256()
        for sample in self.samples:
            digest.update(f"{sample.key}|{sample.image_path.stat().st_size}\n".encode())
        return digest.hexdigest()[:16]


#: Seed of the sample order in shards (fixed, so that a resumed prepare plans the same shards).
ORDER_SEED = 0


def mixed_order(samples: list[Sample]) -> list[Sample]:
    """The samples in a seeded random order instead of class order.

    Streaming readers see a shard front to back, so class-sorted shards give single-class batches,
    and SwAV's equipartition (Sinkhorn) then has to spread one class over all prototypes: the
    swapped prediction stops carrying class information. Mixing once here keeps every stretch of
    a shard a sample of the whole split.
    """
    order = random.Random(ORDER_SEED).sample(range(len(samples)), len(samples))
    return [samples[i] for i in order]


def plan_shards(samples: list[Sample], split: str, samples_per_shard: int, max_shard_bytes: int) -> list[ShardPlan]:
    """Cut the samples, in their order, into consecutive shards bounded in count and in bytes."""
    plans: list[ShardPlan] = []
    current: list[Sample] = []
    current_bytes = 0
    for sample in samples:
        size = sample.image_path.stat().st_size
        if current and (len(current) >= samples_per_shard or current_bytes + size > max_shard_bytes):
            plans.append(ShardPlan(split, len(plans), tuple(current)))
            current, current_bytes = [], 0
        current.append(sample)
        current_bytes += size
    if current:
        plans.append(ShardPlan(split, len(plans), tuple(current)))
    return plans


def check_image(data: bytes) -> tuple[int, int]:
    """Decode ``data`` fully (at reduced scale for speed) and return the image's (H, W).

    Raises:
        ValueError: when the bytes are not a complete, decodable image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()  # raises on truncated or corrupt data
    except Image.UnidentifiedImageError:
        raise ValueError("not an image file (unknown format)") from None
    except Exception as error:
        raise ValueError(f"{type(error).__name__}: {error}") from None
    return height, width


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic shards
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _sample_members(sample: Sample, class_id: int, split: str) -> dict[str, bytes]:
    """The members of one sample; raises ValueError with the reason when it must be skipped."""
    image_bytes = sample.image_path.read_bytes()
    height, width = check_image(image_bytes)
    members = {"jpg": image_bytes}
    if sample.label_path is not None:
        label_bytes = sample.label_path.read_bytes()
        try:
            label_height, label_width = check_image(label_bytes)
        except ValueError as error:
            raise ValueError(f"label {sample.label_path}: {error}") from None
        if (label_height, label_width) != (height, width):
            raise ValueError(
                f"label {sample.label_path} is {label_height}x{label_width}, image is {height}x{width}"
            )
        members["seg.png"] = label_bytes
    meta = {"wnid": sample.wnid, "class_id": class_id, "size": [height, width], "split": split}
    members["json"] = json.dumps(meta).encode()
    return members


def write_tar(samples: Iterable[tuple[str, dict[str, bytes]]], path: str) -> dict[str, Any]:
    """Write ``(key, {suffix: bytes})`` samples as a webdataset tar at ``path``, atomically.

    Returns:
        ``{"num_samples", "bytes", "sha256"}`` of the written shard.
    """
    with tempfile.NamedTemporaryFile(prefix=".tmp-", suffix=".tar", delete=False) as handle:
        local_tmp = handle.name
    digest = hashlib.sha256()
    num_samples = 0
    try:
        with tarfile.open(local_tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                for suffix, data in members.items():
                    _tar_add(tar, f"{key}.{suffix}", data)
                num_samples += 1
        with open(local_tmp, "rb") as written:
            for chunk in iter(lambda: written.read(8 << 20), b""):
                digest.update(chunk)
        size = os.path.getsize(local_tmp)
        storage.put_file(local_tmp, path)
    finally:
        if os.path.exists(local_tmp):
            os.unlink(local_tmp)
    return {"num_samples": num_samples, "bytes": size, "sha256": digest.hexdigest()}


def iter_tar(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The ``(key, {suffix: bytes})`` samples of a webdataset tar, streamed in order."""
    fs, inner = storage.filesystem(path)
    key, members = None, {}
    with fs.open_input_stream(inner) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            folder, _, base = info.name.rpartition("/")
            stem, _, suffix = base.partition(".")
            member_key = f"{folder}/{stem}" if folder else stem
            if member_key != key and key is not None:
                yield key, members
                members = {}
            key = member_key
            members[suffix] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def write_shard(plan: ShardPlan, out_dir: str, class_ids: dict[str, int]) -> dict[str, Any]:
    """Write one shard (atomically) and its ``.done.json`` record; return the record."""
    skipped = []

    def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
        for sample in plan.samples:
            try:
                yield sample.key, _sample_members(sample, class_ids[sample.wnid], plan.split)
            except (OSError, ValueError) as error:
                skipped.append({"key": sample.key, "path": str(sample.image_path), "reason": str(error)})

    written = write_tar(samples(), storage.join(out_dir, plan.name))
    record = {"name": plan.name, **written, "fingerprint": plan.fingerprint, "skipped": skipped}
    storage.write_json_atomic(storage.join(out_dir, plan.name + ".done.json"), record)
    return record


def _finished_record(plan: ShardPlan, out_dir: str) -> dict[str, Any] | None:
    """The record of a shard that an earlier run completed with the same plan, else None."""
    record_path = storage.join(out_dir, plan.name + ".done.json")
    if not storage.exists(record_path):
        return None
    record = storage.read_json(record_path)
    if record.get("fingerprint") != plan.fingerprint:
        return None
    if storage.file_size(storage.join(out_dir, plan.name)) != record.get("bytes"):
        return None
    return record


def _write_shard_job(job: tuple[ShardPlan, str, dict[str, int]]) -> dict[str, Any]:
    return write_shard(*job)


def prepare_split(
    src: str, out: str, split: str, categories: Categories, *,
    samples_per_shard: int, max_shard_bytes: int, workers: int,
) -> dict[str, Any]:
    """Pack one split; returns its manifest (existing one when the split is already complete)."""
    out_dir = storage.join(out, split)
    samples = list_split(src, split, categories.wnids)
    if not samples:
        raise UserError(f"{Path(src) / split} holds no images of the {categories.num_classes} categories")
    plans = plan_shards(mixed_order(samples), split, samples_per_shard, max_shard_bytes)
    plan_fingerprint = hashlib.sha256("".join(p.fingerprint for p in plans).encode()).hexdigest()[:16]
    manifest_path = storage.join(out_dir, MANIFEST)
    if storage.exists(manifest_path):
        manifest = storage.read_json(manifest_path)
        if manifest.get("plan_fingerprint") == plan_fingerprint:
            print(f"prepare {split}: complete ({manifest['num_samples']} samples in "
                  f"{manifest['num_shards']} shards), nothing to do", flush=True)
            return manifest
        raise UserError(f"{manifest_path} describes another source tree; write to a new --out folder")
    storage.makedirs(out_dir)
    storage.remove_stale_temporaries(out_dir)  # a killed run may have left one mid-write

    records: dict[int, dict[str, Any]] = {}
    todo = []
    for plan in plans:
        record = _finished_record(plan, out_dir)
        if record is None:
            todo.append(plan)
        else:
            records[plan.index] = record
    if records:
        print(f"prepare {split}: resuming, {len(records)} of {len(plans)} shards already written", flush=True)
    started = time.perf_counter()
    class_ids = {wnid: categories.class_id(wnid) for wnid in categories.wnids}
    done_samples = 0
    jobs = [(plan, out_dir, class_ids) for plan in todo]
    context = multiprocessing.get_context("spawn")
    with context.Pool(max(1, min(workers, len(jobs)))) if len(jobs) > 1 and workers > 1 else _InlinePool() as pool:
        for plan, record in zip(todo, pool.imap(_write_shard_job, jobs)):
            records[plan.index] = record
            done_samples += len(plan.samples)
            rate = done_samples / max(time.perf_counter() - started, 1e-9)
            print(f"prepare {split}: shard {len(records)}/{len(plans)} {plan.name} "
                  f"({record['num_samples']} samples, {rate:.0f} img/s)", flush=True)

    ordered = [records[index] for index in range(len(plans))]
    skipped = [item for record in ordered for item in record["skipped"]]
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": "lussray prepare",
        "source": os.path.abspath(src),
        "split": split,
        "num_classes": categories.num_classes,
        "num_samples": sum(record["num_samples"] for record in ordered),
        "num_shards": len(ordered),
        "has_segmentation": any(sample.label_path is not None for sample in samples),
        "plan_fingerprint": plan_fingerprint,
        "shards": [{key: record[key] for key in ("name", "num_samples", "bytes", "sha256")} for record in ordered],
        "skipped": skipped,
    }
    storage.write_json_atomic(manifest_path, manifest)
    return manifest


class _InlinePool:
    """A stand-in for a process pool that runs jobs in this process (one worker or one job)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def imap(self, fn: Any, jobs: list) -> Any:
        return map(fn, jobs)


def _present_splits(src: str) -> list[str]:
    return [split for split in SPLITS if (Path(src) / split).is_dir()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lussray prepare``."""
    parser.add_argument("--src", required=True, help="ImageNet-S folder tree (real or from `lussray synth`)")
    parser.add_argument("--out", required=True, help="shards folder: local path, s3:// or gs:// URI")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, help="splits to pack (default: every split present)")
    parser.add_argument("--samples-per-shard", type=int, help="samples per shard (default: dataset.samples_per_shard)")
    parser.add_argument("--categories", metavar="FILE",
                        help="category list (one wnid per line); default: dataset.category_file, "
                             "else the folders of <src>/validation-segmentation")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="parallel shard writers")


def run(args: argparse.Namespace, config: Any) -> int:
    """Pack every requested split and report what was skipped."""
    if not Path(args.src).is_dir():
        raise UserError(f"--src {args.src} is not a folder")
    category_file = args.categories or config.dataset.category_file
    try:
        categories = Categories.from_root(args.src, category_file)
    except (OSError, ValueError) as error:
        raise UserError(str(error)) from None
    if categories.num_classes != config.dataset.num_classes:
        raise UserError(
            f"{args.src} has {categories.num_classes} categories but dataset {config.dataset.name!r} "
            f"expects {config.dataset.num_classes}; pass a category list or dataset.num_classes="
            f"{categories.num_classes}"
        )
    splits = args.splits or _present_splits(args.src)
    if not splits:
        raise UserError(f"{args.src} has none of the split folders {', '.join(SPLITS)}")
    samples_per_shard = args.samples_per_shard or config.dataset.samples_per_shard
    if samples_per_shard < 1:
        raise UserError("--samples-per-shard must be at least 1")
    storage.makedirs(args.out)
    storage.write_bytes_atomic(storage.join(args.out, CATEGORIES), "\n".join(categories.wnids).encode())
    total_skipped = 0
    for split in splits:
        manifest = prepare_split(
            args.src, args.out, split, categories, samples_per_shard=samples_per_shard,
            max_shard_bytes=config.dataset.max_shard_bytes, workers=args.workers,
        )
        skipped = manifest["skipped"]
        total_skipped += len(skipped)
        print(f"prepare {split}: {manifest['num_samples']} samples in {manifest['num_shards']} shards, "
              f"{len(skipped)} skipped", flush=True)
        for item in skipped[:5]:
            print(f"  skipped {item['path']}: {item['reason']}", flush=True)
        if len(skipped) > 5:
            print(f"  ... and {len(skipped) - 5} more, listed in {storage.join(args.out, split, MANIFEST)}")
    print(f"prepare: done -> {args.out} ({total_skipped} images skipped)", flush=True)
    return 0


def read_manifest(data: str, split: str) -> dict[str, Any]:
    """The manifest of ``split`` under the shards folder ``data``.

    Raises:
        UserError: when the split was never prepared (or its preparation did not finish).
    """
    path = storage.join(data, split, MANIFEST)
    if not storage.exists(path):
        raise UserError(f"no {MANIFEST} for split {split!r} under {data}: run `lussray prepare` (to completion) first")
    manifest = storage.read_json(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    return manifest


def shard_paths(data: str, split: str) -> list[str]:
    """Paths (or URIs) of the shards of ``split``, in order, after checking them against the manifest.

    Raises:
        UserError: naming the first shard that is missing or whose size differs from the manifest
            (a truncated copy); run ``lussray prepare`` again or restore it.
    """
    manifest = read_manifest(data, split)
    paths = []
    for shard in manifest["shards"]:
        path = storage.join(data, split, shard["name"])
        size = storage.file_size(path)
        if size != shard["bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            raise UserError(f"shard {path} is damaged: manifest says {shard['bytes']} bytes, found {found}")
        paths.append(path)
    return paths
