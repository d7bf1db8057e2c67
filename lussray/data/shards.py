"""``lussray prepare``: pack an ImageNet-S folder tree into webdataset shards.

    lussray prepare --src ImageNetS50 --out shards/ --dataset imagenet-s50
    lussray prepare --src imagenet-s --out s3://bucket/imagenet-s919 --dataset imagenet-s919 \\
        dataset.category_file=ImageNetS_categories_im919.txt

Per split, ``<out>/<split>/<split>-%06d.tar`` shards hold one sample per image with key
``<wnid>/<name>`` and members ``jpg`` (the original bytes, never re-encoded), ``json``
(wnid, class id, [H, W], split) and ``seg.png`` (the ground-truth PNG, where it exists).
``<out>/<split>/manifest.json`` lists the shards with sample counts and sha256 checksums and
the images that were skipped (corrupt, truncated, a label of another size, an unsafe name, or
an aspect ratio or pixel count beyond ``dataset.max_aspect`` / ``dataset.max_pixels``) with the
reason; it is written last. ``<out>/categories.txt`` holds the category list.

Samples are written in a seeded random order, not class order (:func:`mixed_order`), so that a
stream over the shards yields mixed-class batches. The plan (which sample goes to which shard)
depends only on the sorted source tree and that fixed seed, so an interrupted run resumes: shards
already written (recorded by a small ``.done.json`` beside each tar) are kept, the others are
written; a complete split is skipped. A shard's fingerprint covers its keys, the size and mtime of
its images and ground-truth PNGs, the category list and the image limits, so a rerun after any of
them changed is refused, naming what changed; ``--overwrite`` rewrites the changed shards.

Shards are untrusted input when read (they may come from elsewhere): every sample key is checked
(:func:`lussray.data.imagenet_s.check_sample_key`) when written and when read, and a shard holding
an unsafe key is refused as a whole (:class:`UserError` naming the shard and the key) rather than
skipping the sample: such a key was not written by ``lussray prepare``, so nothing else in that
shard is trusted either. A tar that does not parse, or whose end-of-archive marker comes early
(zeroed or overwritten bytes), and a ``manifest.json`` that is not valid are refused the same way,
naming the file.
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
import re
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from PIL import Image
from typing_extensions import Self

from lussray import storage
from lussray.data.imagenet_s import SPLITS, Categories, Sample, check_sample_key, list_split
from lussray.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CATEGORIES = "categories.txt"
FORMAT_VERSION = 1

#: Samples per chunk of a shard's chunk index: a chunk is one byte-range read of the tar, the unit
#: in which training streams permute the data every epoch (lussray.data.epoch_plan).
SAMPLES_PER_CHUNK = 64

#: A manifest's shard entry: these keys, plus ``chunks`` ([offset, nbytes, rows] per chunk) when indexed.
SHARD_ENTRY_KEYS = ("name", "num_samples", "bytes", "sha256", "chunks")


@dataclass(frozen=True)
class ImageLimits:
    """Images beyond these are skipped by prepare (no later resize may blow them up)."""

    max_aspect: float
    max_pixels: int

    def check(self, height: int, width: int) -> None:
        """Raise ValueError with the reason when an (H, W) image is beyond the limits."""
        if height < 1 or width < 1:
            raise ValueError(f"image is {height}x{width} pixels")
        if height * width > self.max_pixels:
            raise ValueError(f"image is {height}x{width} = {height * width} pixels, more than "
                             f"dataset.max_pixels={self.max_pixels}")
        aspect = max(height, width) / min(height, width)
        if aspect > self.max_aspect:
            raise ValueError(f"image is {height}x{width}, aspect ratio {aspect:.1f} beyond "
                             f"dataset.max_aspect={self.max_aspect:g}")


def _file_stamp(path: Path | None) -> str:
    """Size and modification time of a source file (what the fingerprints see of its bytes)."""
    if path is None:
        return "-"
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


@dataclass(frozen=True)
class ShardPlan:
    """The samples of one shard, fixed before anything is written."""

    split: str
    index: int
    samples: tuple[Sample, ...]
    context: str = ""  # what else decides the shard's bytes: category list, image limits

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the plan and its inputs, so that a resumed run never keeps a stale shard."""
        digest = hashlib.sha256(f"{self.context}\n".encode())
        for sample in self.samples:
            digest.update(f"{sample.key}|{_file_stamp(sample.image_path)}|{_file_stamp(sample.label_path)}\n".encode())
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


def plan_shards(samples: list[Sample], split: str, samples_per_shard: int, max_shard_bytes: int,
                context: str = "") -> list[ShardPlan]:
    """Cut the samples, in their order, into consecutive shards bounded in count and in bytes."""
    plans: list[ShardPlan] = []
    current: list[Sample] = []
    current_bytes = 0
    for sample in samples:
        size = sample.image_path.stat().st_size
        if current and (len(current) >= samples_per_shard or current_bytes + size > max_shard_bytes):
            plans.append(ShardPlan(split, len(plans), tuple(current), context))
            current, current_bytes = [], 0
        current.append(sample)
        current_bytes += size
    if current:
        plans.append(ShardPlan(split, len(plans), tuple(current), context))
    return plans


def check_image(data: bytes, limits: ImageLimits | None = None) -> tuple[int, int]:
    """Decode ``data`` fully (at reduced scale for speed) and return the image's (H, W).

    ``limits`` are checked on the header's size, before anything is decoded.

    Raises:
        ValueError: when the bytes are not a complete, decodable image, or the image is beyond
            ``limits``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if limits is not None:
                    limits.check(height, width)
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()  # raises on truncated or corrupt data
    except Image.UnidentifiedImageError:
        raise ValueError("not an image file (unknown format)") from None
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(f"{type(error).__name__}: {error}") from None
    return height, width


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic shards
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _sample_members(sample: Sample, class_id: int | None, split: str, limits: ImageLimits,
                    convert_label: Callable[[bytes], bytes] | None = None) -> dict[str, bytes]:
    """The members of one sample; raises ValueError with the reason when it must be skipped.

    ``convert_label`` (scene layouts, ``lussray.data.scene``) re-encodes the checked label bytes.
    """
    check_sample_key(sample.key)
    image_bytes = sample.image_path.read_bytes()
    height, width = check_image(image_bytes, limits)
    members = {"jpg": image_bytes}
    if sample.label_path is not None:
        label_bytes = sample.label_path.read_bytes()
        try:
            label_height, label_width = check_image(label_bytes, limits)
            if convert_label is not None:
                label_bytes = convert_label(label_bytes)
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
        ``{"num_samples", "bytes", "sha256", "chunks"}`` of the written shard; ``chunks`` lists
        ``[offset, nbytes, rows]`` of every run of :data:`SAMPLES_PER_CHUNK` samples (the last may
        be shorter): the byte range from the first member header of its first sample to the end of
        its last member, so that :func:`read_chunk` reads it alone.

    Raises:
        UserError: naming ``path`` and the key when a sample key is unsafe (nothing is written).
    """
    with tempfile.NamedTemporaryFile(prefix=".tmp-", suffix=".tar", delete=False) as handle:
        local_tmp = handle.name
    digest = hashlib.sha256()
    num_samples = 0
    starts = []  # byte offset of every chunk's first member header
    try:
        with tarfile.open(local_tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                try:
                    check_sample_key(key)
                except ValueError as error:
                    raise UserError(f"cannot write shard {path}: {error}") from None
                if num_samples % SAMPLES_PER_CHUNK == 0:
                    starts.append(tar.offset)
                for suffix, data in members.items():
                    _tar_add(tar, f"{key}.{suffix}", data)
                num_samples += 1
            end = tar.offset  # before the end-of-archive blocks
        with open(local_tmp, "rb") as written:
            for chunk in iter(lambda: written.read(8 << 20), b""):
                digest.update(chunk)
        size = os.path.getsize(local_tmp)
        storage.put_file(local_tmp, path)
    finally:
        if os.path.exists(local_tmp):
            os.unlink(local_tmp)
    bounds = [*starts, end]
    chunks = [[bounds[i], bounds[i + 1] - bounds[i], min(SAMPLES_PER_CHUNK, num_samples - i * SAMPLES_PER_CHUNK)]
              for i in range(len(starts))]
    return {"num_samples": num_samples, "bytes": size, "sha256": digest.hexdigest(), "chunks": chunks}


#: Zero bytes a well-formed tar may hold after its end-of-archive marker (padding of its last records).
MAX_TAR_PADDING = 2 * tarfile.RECORDSIZE


def iter_tar(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The ``(key, {suffix: bytes})`` samples of a webdataset tar, streamed in order.

    Raises:
        UserError: naming ``path`` when the tar does not parse, ends early, or holds an unsafe or
            non-contiguous sample key (see the module docstring).
    """
    fs, inner = storage.filesystem(path)
    try:
        with fs.open_input_stream(inner) as stream:
            yield from _iter_tar_stream(stream, path)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise UserError(f"shard {path} is not a readable tar ({type(error).__name__}: {error}): "
                        f"restore it or run `lussray prepare` again") from None


def member_key(path: str, name: str) -> tuple[str, str]:
    """The checked ``(sample key, member suffix)`` of the tar member ``name`` of shard ``path``.

    As webdataset: the key is the name up to the first '.' of its last component.

    Raises:
        UserError: naming the shard and the key when the key is unsafe or there is no suffix.
    """
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    try:
        check_sample_key(key)
    except ValueError as error:
        raise UserError(f"shard {path}: {error}; refusing the shard (not written by lussray)") from None
    if not dot or not suffix:
        raise UserError(f"shard {path}: member {name!r} has no suffix (expected '<key>.<suffix>')")
    return key, suffix


def read_chunk(path: str, offset: int, nbytes: int) -> list[tuple[str, dict[str, bytes]]]:
    """The samples of the byte range ``[offset, offset + nbytes)`` of shard ``path`` (a chunk of its index).

    Raises:
        UserError: naming ``path`` when the range does not parse as whole tar members (a shard
            changed since its manifest was written) or holds an unsafe key.
    """
    fs, inner = storage.filesystem(path)
    try:
        with fs.open_input_file(inner) as handle:
            data = handle.read_at(nbytes, offset)
        if len(data) != nbytes:
            raise EOFError(f"{len(data)} of {nbytes} bytes at offset {offset}")
        return list(_iter_tar_stream(io.BytesIO(data), path, whole_archive=False))
    except (tarfile.TarError, EOFError, OSError) as error:
        raise UserError(f"shard {path}: bytes {offset}..{offset + nbytes} of its chunk index are not whole "
                        f"samples ({type(error).__name__}: {error}): restore it or run `lussray prepare` again") from None


def _iter_tar_stream(stream: Any, path: str, whole_archive: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a tar stream; ``whole_archive`` also checks that nothing follows its end marker."""
    key, members, seen = None, {}, set()
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            sample_key, suffix = member_key(path, info.name)
            if sample_key != key:
                if key is not None:
                    yield key, members
                    members = {}
                    seen.add(key)
                if sample_key in seen:
                    raise UserError(f"shard {path}: the members of sample {sample_key!r} are not contiguous")
                key = sample_key
            if suffix in members:
                raise UserError(f"shard {path}: sample {key!r} has two {suffix!r} members")
            members[suffix] = tar.extractfile(info).read()
        trailer = stream.read(MAX_TAR_PADDING + 1) if whole_archive else b""
        if len(trailer) > MAX_TAR_PADDING or trailer.strip(b"\0"):
            raise UserError(f"shard {path} is damaged: its end-of-archive marker comes before the end "
                            f"of the file (zeroed or overwritten bytes): restore it or run `lussray prepare` again")
    if key is not None:
        yield key, members


def write_shard(plan: ShardPlan, out_dir: str, class_ids: dict[str, int], limits: ImageLimits,
                convert_label: Callable[[bytes], bytes] | None = None) -> dict[str, Any]:
    """Write one shard (atomically) and its ``.done.json`` record; return the record."""
    skipped = []

    def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
        for sample in plan.samples:
            try:
                yield sample.key, _sample_members(sample, class_ids.get(sample.wnid), plan.split, limits, convert_label)
            except (OSError, ValueError) as error:
                skipped.append({"key": sample.key, "path": str(sample.image_path), "reason": str(error)})

    written = write_tar(samples(), storage.join(out_dir, plan.name))
    record = {"name": plan.name, **written, "fingerprint": plan.fingerprint, "skipped": skipped}
    storage.write_json_atomic(storage.join(out_dir, plan.name + ".done.json"), record)
    return record


#: The keys of a shard's ``.done.json`` record (and of a manifest's shard entries, but "fingerprint").
RECORD_KEYS = {"name": str, "num_samples": int, "bytes": int, "sha256": str}


def read_done_record(path: str) -> dict[str, Any] | None:
    """The ``.done.json`` record at ``path``, or None (with a printed note) when it is not valid.

    An invalid record (not JSON, missing or mistyped keys) only means that its shard is written
    again, so it is reported and ignored rather than raised.
    """
    try:
        record = storage.read_json(path)
        problem = None if isinstance(record, dict) else "not a JSON object"
        problem = problem or _missing_keys(record, RECORD_KEYS)
        if problem is None and not isinstance(record.get("skipped", []), list):
            problem = "'skipped' is not a list"
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError
        problem = f"not valid JSON ({error})"
    if problem:
        print(f"ignoring {path}: {problem}; its shard is written again", flush=True)
        return None
    return record


def _missing_keys(obj: dict[str, Any], keys: dict[str, type]) -> str | None:
    """A description of the first key of ``keys`` missing from ``obj`` or of another type, else None."""
    for key, kind in keys.items():
        if key not in obj:
            return f"key {key!r} is missing"
        if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
            return f"key {key!r} is {type(obj[key]).__name__}, expected {kind.__name__}"
    return None


def _finished_record(plan: ShardPlan, out_dir: str) -> dict[str, Any] | None:
    """The record of a shard that an earlier run completed with the same plan, else None."""
    record_path = storage.join(out_dir, plan.name + ".done.json")
    if not storage.exists(record_path):
        return None
    record = read_done_record(record_path)
    if record is None or record.get("fingerprint") != plan.fingerprint:
        return None
    if storage.file_size(storage.join(out_dir, plan.name)) != record.get("bytes"):
        return None
    return record


def _write_shard_job(job: tuple[ShardPlan, str, dict[str, int], ImageLimits, Any]) -> dict[str, Any]:
    return write_shard(*job)


def _category_digest(categories: Categories) -> str:
    return hashlib.sha256("\n".join(categories.wnids).encode()).hexdigest()[:16]


#: How the refusal names each recorded input of a split.
_INPUT_NAMES = {"categories": "the category list", "num_categories": "the category list",
                "max_aspect": "dataset.max_aspect", "max_pixels": "dataset.max_pixels",
                "samples_per_shard": "--samples-per-shard", "max_shard_bytes": "dataset.max_shard_bytes",
                "labels": "the label conversion"}


def _changes(manifest: dict[str, Any], inputs: dict[str, Any], plans: list[ShardPlan]) -> list[str]:
    """What differs between an existing manifest's inputs and this run's (for the refusal message)."""
    previous = manifest.get("inputs")
    if not isinstance(previous, dict):
        return ["the source tree or the lussray version (that manifest records no inputs)"]
    changed = [_INPUT_NAMES.get(key, key) for key in inputs if previous.get(key) != inputs[key]]
    if changed:  # they are part of every shard's fingerprint: all shards differ
        return list(dict.fromkeys(changed))
    old_shards = previous.get("shard_fingerprints") or []
    differing = [plan.name for i, plan in enumerate(plans)
                 if i >= len(old_shards) or old_shards[i] != plan.fingerprint]
    if differing:
        changed.append(f"the images or ground truth of {len(differing)} of {len(plans)} shards "
                       f"(first {differing[0]})")
    elif len(old_shards) != len(plans):
        changed.append(f"the number of shards ({len(old_shards)} -> {len(plans)})")
    return changed or ["the source tree (recorded by an older lussray)"]


def prepare_split(
    src: str, out: str, split: str, categories: Categories, *,
    samples_per_shard: int, max_shard_bytes: int, workers: int, limits: ImageLimits,
    overwrite: bool = False, samples: list[Sample] | None = None,
    convert_label: Callable[[bytes], bytes] | None = None,
) -> dict[str, Any]:
    """Pack one split; returns its manifest (existing one when the split is already complete).

    A scene layout (``lussray.data.scene``) passes its ``samples`` (no image-level class: the json
    member's ``class_id`` is null), ``categories`` built from its class names and the
    ``convert_label`` of its ``seg.png`` bytes (with a ``name``, part of the fingerprint).

    Raises:
        UserError: when ``<out>/<split>`` holds a manifest made from other inputs (naming what
            changed), unless ``overwrite``: then the changed shards are written again.
    """
    out_dir = storage.join(out, split)
    scene = samples is not None
    samples = samples if scene else list_split(src, split, categories.wnids)
    if not samples:
        raise UserError(f"{Path(src) / split} holds no images of the {categories.num_classes} categories")
    inputs = {"categories": _category_digest(categories), "num_categories": categories.num_classes,
              "max_aspect": limits.max_aspect, "max_pixels": limits.max_pixels,
              "samples_per_shard": samples_per_shard, "max_shard_bytes": max_shard_bytes}
    if convert_label is not None:
        inputs["labels"] = getattr(convert_label, "name", repr(convert_label))
    context = "|".join(f"{key}={value}" for key, value in inputs.items())
    plans = plan_shards(mixed_order(samples), split, samples_per_shard, max_shard_bytes, context)
    plan_fingerprint = hashlib.sha256("".join(p.fingerprint for p in plans).encode()).hexdigest()[:16]
    manifest_path = storage.join(out_dir, MANIFEST)
    if storage.exists(manifest_path):
        try:
            manifest = None if overwrite else load_manifest(manifest_path)
        except UserError as error:
            raise UserError(f"{error} (or pass --overwrite to prepare the split again)") from None
        if manifest is not None and manifest.get("plan_fingerprint") == plan_fingerprint:
            print(f"prepare {split}: complete ({manifest['num_samples']} samples in "
                  f"{manifest['num_shards']} shards), nothing to do", flush=True)
            return manifest
        if manifest is not None:
            raise UserError(f"{manifest_path} was prepared from other inputs (changed: {'; '.join(_changes(manifest, inputs, plans))}"
                            f"): write to a new --out folder, or pass --overwrite to rewrite the changed shards")
        storage.remove(manifest_path)  # --overwrite: the split is incomplete until the new one is written
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
    class_ids = {} if scene else {wnid: categories.class_id(wnid) for wnid in categories.wnids}
    done_samples = 0
    jobs = [(plan, out_dir, class_ids, limits, convert_label) for plan in todo]
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
        "inputs": {**inputs, "shard_fingerprints": [plan.fingerprint for plan in plans]},
        "shards": [{key: record[key] for key in SHARD_ENTRY_KEYS if key in record} for record in ordered],
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
    parser.add_argument("--src", required=True, help="dataset tree of dataset.layout: ImageNet-S (real or from "
                        "`lussray synth`), COCO-Stuff, Cityscapes or generated scenes")
    parser.add_argument("--out", required=True, help="shards folder: local path, s3:// or gs:// URI")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, help="splits to pack (default: every split present)")
    parser.add_argument("--samples-per-shard", type=int, help="samples per shard (default: dataset.samples_per_shard)")
    parser.add_argument("--categories", metavar="FILE",
                        help="category list (one wnid per line); default: dataset.category_file, "
                             "else the folders of <src>/validation-segmentation")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="parallel shard writers")
    parser.add_argument("--imagenet-train", metavar="DIR",
                        help="also pack this ImageNet-1k train folder (<wnid>/*.JPEG, every class) as the "
                             "train-full split, which the S919 preset pretrains on (pretrain.split)")
    # scene-centric layouts (dataset.layout; lussray.data.scene)
    parser.add_argument("--list", dest="image_list", choices=("curated", "full"),
                        help="COCO-Stuff image list: curated (49,629/2,175) or full (97,702/4,172); "
                             "default: dataset.image_list")
    parser.add_argument("--cityscapes-split", choices=("picie", "stego"),
                        help="Cityscapes split: picie (train = train_extra + test, validation = train + val) or "
                             "stego (STEGO/HP: train, val); default: dataset.cityscapes_split (required)")


def run(args: argparse.Namespace, config: Any) -> int:
    """Pack every requested split and report what was skipped."""
    if not Path(args.src).is_dir():
        raise UserError(f"--src {args.src} is not a folder")
    if config.dataset.layout != "imagenet-s":  # COCO-Stuff, Cityscapes, generated scenes
        from lussray.data import scene

        return scene.prepare(args, config)
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
    limits = ImageLimits(config.dataset.max_aspect, config.dataset.max_pixels)
    storage.makedirs(args.out)
    storage.write_bytes_atomic(storage.join(args.out, CATEGORIES), "\n".join(categories.wnids).encode())
    total_skipped = 0
    for split in splits:
        manifest = prepare_split(
            args.src, args.out, split, categories, samples_per_shard=samples_per_shard,
            max_shard_bytes=config.dataset.max_shard_bytes, workers=args.workers, limits=limits,
            overwrite=getattr(args, "overwrite", False),
        )
        total_skipped += report_split(manifest, args.out, split)
    if getattr(args, "imagenet_train", None):
        manifest = prepare_full_train(args.imagenet_train, args.out, categories, samples_per_shard=samples_per_shard,
                                      max_shard_bytes=config.dataset.max_shard_bytes, workers=args.workers,
                                      limits=limits, overwrite=getattr(args, "overwrite", False))
        total_skipped += report_split(manifest, args.out, FULL_TRAIN_SPLIT)
    print(f"prepare: done -> {args.out} ({total_skipped} images skipped)", flush=True)
    return 0


#: The split holding the whole ImageNet-1k train set (S919 pretraining reads it, as the reference).
FULL_TRAIN_SPLIT = "train-full"


def prepare_full_train(folder: str, out: str, categories: Categories, **kwargs: Any) -> dict[str, Any]:
    """Pack an ImageNet-1k train folder (every ``<wnid>/`` subfolder) as ``<out>/train-full``.

    Its samples carry no class id (pretraining reads images only; ImageNet-1k has classes that are
    not ImageNet-S categories).

    Raises:
        UserError: when ``folder`` is not a folder or holds no class folders.
    """
    root = Path(folder)
    wnids = sorted(entry.name for entry in os.scandir(root) if entry.is_dir()) if root.is_dir() else []
    if not wnids:
        raise UserError(f"--imagenet-train {folder}: not a folder of class folders (<wnid>/*.JPEG)")
    samples = list_split(root.parent, root.name, wnids)
    return prepare_split(str(root.parent), out, FULL_TRAIN_SPLIT, categories, samples=samples, **kwargs)


def report_split(manifest: dict[str, Any], out: str, split: str) -> int:
    """Print what ``prepare`` wrote for ``split`` and the first skipped images; returns the skipped count."""
    skipped = manifest["skipped"]
    print(f"prepare {split}: {manifest['num_samples']} samples in {manifest['num_shards']} shards, "
          f"{len(skipped)} skipped", flush=True)
    for item in skipped[:5]:
        print(f"  skipped {item['path']}: {item['reason']}", flush=True)
    if len(skipped) > 5:
        print(f"  ... and {len(skipped) - 5} more, listed in {storage.join(out, split, MANIFEST)}", flush=True)
    return len(skipped)


def read_manifest(data: str, split: str) -> dict[str, Any]:
    """The manifest of ``split`` under the shards folder ``data``.

    Raises:
        UserError: when the split was never prepared (or its preparation did not finish).
    """
    path = storage.join(data, split, MANIFEST)
    if not storage.exists(path):
        raise UserError(f"no {MANIFEST} for split {split!r} under {data}: run `lussray prepare` (to completion) first")
    return load_manifest(path)


#: Keys every manifest has, with their types (a manifest lacking one is refused, naming it).
MANIFEST_KEYS = {"format_version": int, "split": str, "num_samples": int, "num_shards": int, "shards": list}

#: A shard's file name as prepare and labelgen write it (a manifest naming anything else is refused).
_SHARD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,200}\.tar")


def load_manifest(path: str) -> dict[str, Any]:
    """The manifest at ``path``, checked: valid JSON, this format version, the keys readers use.

    Raises:
        UserError: naming ``path`` and what is wrong (bad JSON, a missing key, an unsafe shard name).
    """
    try:
        manifest = storage.read_json(path)
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError
        raise UserError(f"{path} is not valid JSON ({error}): run `lussray prepare` again or restore it") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} is not a JSON object: run `lussray prepare` again or restore it")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    problem = _missing_keys(manifest, MANIFEST_KEYS)
    for index, shard in enumerate(manifest["shards"] if problem is None else []):
        entry_problem = _missing_keys(shard, RECORD_KEYS) if isinstance(shard, dict) else "not an object"
        if entry_problem is None and not _SHARD_NAME.fullmatch(shard["name"]):
            entry_problem = f"name {shard['name']!r} is not a shard file name"
        if entry_problem:
            problem = f"shards[{index}]: {entry_problem}"
            break
    if problem is None and len(manifest["shards"]) != manifest["num_shards"]:
        problem = f"num_shards is {manifest['num_shards']} but {len(manifest['shards'])} shards are listed"
    if problem:
        raise UserError(f"{path} is not a valid manifest ({problem}): run `lussray prepare` again or restore it")
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
