"""Untrusted shards on the Ray Data read path: a shard with an unsafe key is refused, naming it."""

import io
import json
import tarfile

import pytest

from lussray.config import IngestConfig
from lussray.data import ingest
from lussray.data.shards import shard_paths
from lussray.errors import UserError

pytestmark = pytest.mark.ray

INGEST = IngestConfig(map_batch_size=4, cpus_per_map_task=0.5, eval_short_side=32)


def _shards_with_member(root, name: str) -> str:
    """A one-shard validation split whose shard holds a sample under member ``name`` (hand-written)."""

    split = root / "shards" / "validation"
    split.mkdir(parents=True)
    path = split / "validation-000000.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in ((name, _jpeg()), (name.replace(".jpg", ".json"), b"{}")):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest = {"format_version": 1, "split": "validation", "num_samples": 1, "num_shards": 1,
                "has_segmentation": False,
                "shards": [{"name": path.name, "num_samples": 1, "bytes": path.stat().st_size, "sha256": ""}]}
    (split / "manifest.json").write_text(json.dumps(manifest))
    return str(root / "shards")


def _jpeg() -> bytes:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("key", ["../../../x", "/abs/path"])
def test_read_path_refuses_an_unsafe_key_naming_the_shard(ray_cluster, tmp_path, key):
    data = _shards_with_member(tmp_path, f"{key}.jpg")
    assert len(shard_paths(data, "validation")) == 1  # the manifest and size checks pass
    with pytest.raises(Exception) as raised:
        ingest.evaluation_images(data, "validation", INGEST).take_all()
    message = str(raised.value)
    assert "validation-000000.tar" in message and repr(key) in message
    assert isinstance(raised.value, UserError)  # Ray's task error is also an instance of the cause
    assert not (tmp_path / "x").exists()


def test_read_path_passes_a_safe_key(ray_cluster, tmp_path):
    data = _shards_with_member(tmp_path, "n01/ok.jpg")
    rows = ingest.evaluation_images(data, "validation", INGEST).take_all()
    assert [row["key"] for row in rows] == ["n01/ok"]
