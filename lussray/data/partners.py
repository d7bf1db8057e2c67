"""The files of ``lussray knn`` and STEGO's KNN partners read from them by key.

Layout of ``<run>/knn`` (written by :mod:`lussray.stages.knn`; :class:`KnnFiles`):

- ``features/<shard>.parquet``: one row per item (an image, or one of its five crops) in shard
  order: ``key``, ``crop``, ``embedding`` (the L2-normalised image-level feature,
  ``fixed_size_list<float32>[C]``), and where the image's ``jpg`` member lies in its tar
  (``offset``, ``size``).
- ``items.parquet``: every item in the global order (the shards' order, then shard order):
  ``key``, ``crop``, ``shard`` (index into ``summary.json``'s ``shards``), ``offset``, ``size``.
- ``neighbours/<shard>.parquet``: one row per item of the shard, beside the images' order:
  ``key``, ``crop``, ``item`` (its global index), ``neighbours`` (global item indices of its top-k,
  best first, itself included), ``neighbour_keys``, ``neighbour_crops``, ``scores`` (cosines).
- ``summary.json`` (written last): k, the shard names, items per shard, the crop settings.

A STEGO batch function (:func:`lussray.data.scene_views.stego_batch`) turns an item into its
partner with :class:`PartnerReader`: the item's row of its shard's neighbours file gives the
candidates, ``items.parquet`` their shard, byte offset and size, and one range read of that many
bytes from the partner's tar gives its JPEG. No global join of the dataset happens; each process
holds the item table (keys and four integers per item) and, per shard it touched, the first
neighbours of its items.

This module is Ray-free.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from lussray import storage
from lussray.errors import UserError

FEATURES = "features"
NEIGHBOURS = "neighbours"
ITEMS_FILE = "items.parquet"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class KnnFiles:
    """The paths of a ``<run>/knn`` folder."""

    root: str

    @property
    def features(self) -> str:
        return storage.join(self.root, FEATURES)

    def feature_file(self, shard_name: str) -> str:
        return storage.join(self.features, shard_name.replace(".tar", ".parquet"))

    @property
    def neighbours(self) -> str:
        return storage.join(self.root, NEIGHBOURS)

    def neighbour_file(self, shard_name: str) -> str:
        return storage.join(self.neighbours, shard_name.replace(".tar", ".parquet"))

    @property
    def items(self) -> str:
        return storage.join(self.root, ITEMS_FILE)

    @property
    def summary(self) -> str:
        return storage.join(self.root, SUMMARY_FILE)


def jpg_member_offsets(path: str) -> dict[str, tuple[int, int]]:
    """``{sample key: (byte offset, size)}`` of every ``jpg`` member of a webdataset tar (headers only).

    Raises:
        UserError: naming ``path`` when the tar cannot be read.
    """
    from lussray.data.shards import member_key

    fs, inner = storage.filesystem(path)
    offsets: dict[str, tuple[int, int]] = {}
    try:
        with fs.open_input_file(inner) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for info in tar:
                if info.isfile():
                    key, suffix = member_key(path, info.name)
                    if suffix == "jpg":
                        offsets[key] = (int(info.offset_data), int(info.size))
    except (tarfile.TarError, EOFError, OSError) as error:
        raise UserError(f"shard {path} is not a readable tar ({type(error).__name__}: {error})") from None
    return offsets


def read_range(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes of the file at ``path`` from ``offset`` (one ranged read on object stores)."""
    fs, inner = storage.filesystem(path)
    with fs.open_input_file(inner) as handle:
        data = handle.read_at(size, offset)
    if len(data) != size:
        raise UserError(f"{path}: {size} bytes at offset {offset} expected, {len(data)} read (shard changed?)")
    return data


def read_parquet(path: str, columns: list[str]) -> Any:
    import pyarrow.parquet as pq

    fs, inner = storage.filesystem(path)
    try:
        return pq.read_table(inner, filesystem=fs, columns=columns)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several kinds
        raise UserError(f"cannot read {path}: {error}") from None


def list_matrix(column: Any) -> np.ndarray:
    """An (n, k) array from a fixed-size (or equal-length) list column."""
    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(array), -1) if len(array) else values.reshape(0, 0)


class PartnerReader:
    """KNN partners of items, their JPEG bytes read from the shards by offset.

    Args:
        knn: the ``<run>/knn`` folder.
        data: the shards root of the training data.
        split: the split the KNN stage ran on.
        candidates: neighbours kept per item in memory (the first ones; at least ``num_neighbors`` + 1).
    """

    def __init__(self, knn: str, data: str, split: str = "train", candidates: int = 16) -> None:
        files = KnnFiles(knn)
        if not storage.exists(files.summary):
            raise UserError(f"no KNN neighbours in {knn} (no {SUMMARY_FILE}): run `lussray knn` first")
        summary = storage.read_json(files.summary)
        self.files, self.data, self.split = files, data, split
        self.shards: list[str] = list(summary["shards"])
        self.starts = np.concatenate([[0], np.cumsum(summary["items_per_shard"])]).astype(np.int64)
        items = read_parquet(files.items, ["key", "crop", "shard", "offset", "size"])
        self.keys = items.column("key").to_pylist()
        self.crop = items.column("crop").to_numpy()
        self.shard = items.column("shard").to_numpy()
        self.offset = items.column("offset").to_numpy()
        self.size = items.column("size").to_numpy()
        self.first_item: dict[str, int] = {}
        for index, (key, crop) in enumerate(zip(self.keys, self.crop.tolist())):
            if crop == 0:
                self.first_item[key] = index
        self.candidates = candidates
        self._neighbours: dict[int, np.ndarray] = {}

    def item(self, key: str, crop: int) -> int:
        """The global index of item (``key``, ``crop``).

        Raises:
            UserError: if the KNN stage did not see it (another dataset or crop setting).
        """
        first = self.first_item.get(key)
        index = None if first is None else first + crop
        if index is None or index >= len(self.crop) or self.keys[index] != key or int(self.crop[index]) != crop:
            raise UserError(f"item {key}#{crop} is not in the KNN items of {self.files.root}: run `lussray knn` "
                            f"on the same data and crop settings (knn.crop_type, knn.crop_ratio)")
        return index

    def neighbours(self, index: int) -> np.ndarray:
        """The first ``candidates`` neighbours (global item indices) of item ``index``, itself included."""
        shard = int(self.shard[index])
        if shard not in self._neighbours:
            table = read_parquet(self.files.neighbour_file(self.shards[shard]), ["neighbours"])
            first = list_matrix(table.column("neighbours"))[:, : self.candidates]
            self._neighbours[shard] = np.ascontiguousarray(first, dtype=np.int64 if len(self.crop) >= 2**31 else np.int32)
        return self._neighbours[shard][index - self.starts[shard]]

    def draw(self, key: str, crop: int, num_neighbors: int, rng: np.random.Generator) -> tuple[str, int, bytes]:
        """A partner drawn uniformly among the first ``num_neighbors`` neighbours other than the item itself.

        Returns:
            ``(key, crop, jpeg bytes)`` of the partner (the item itself when it has no other neighbour).
        """
        index = self.item(key, crop)
        candidates = [int(j) for j in self.neighbours(index) if int(j) != index][:num_neighbors]
        partner = candidates[int(rng.integers(len(candidates)))] if candidates else index
        path = storage.join(self.data, self.split, self.shards[int(self.shard[partner])])
        jpeg = read_range(path, int(self.offset[partner]), int(self.size[partner]))
        return self.keys[partner], int(self.crop[partner]), jpeg


_READERS: dict[tuple[str, str, str, int], PartnerReader] = {}


def partner_reader(knn: str, data: str, split: str = "train", candidates: int = 16) -> PartnerReader:
    """The process's :class:`PartnerReader` of a KNN folder (built once per process)."""
    cache_key = (knn, data, split, candidates)
    if cache_key not in _READERS:
        _READERS[cache_key] = PartnerReader(knn, data, split, candidates)
    return _READERS[cache_key]


def write_parquet(path: str, table: Any) -> None:
    """``table`` as one parquet file, written atomically (local or object store)."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes_atomic(path, buffer.getvalue())


__all__ = ["KnnFiles", "PartnerReader", "jpg_member_offsets", "list_matrix", "partner_reader", "read_parquet", "read_range",
           "write_parquet"]
