"""Paths that may be local folders or object-store URIs (s3://, gs://), through pyarrow filesystems.

Everything that a stage writes for another stage (shards, manifests, run folders) goes through
here, so nothing assumes a shared local disk. Writes are atomic: a file appears under its final
name only when complete (local: write to a temporary name, then rename; object stores: a PUT
becomes visible only when the upload completes).

S3-compatible stores other than AWS (MinIO, Ceph, a local test server) are reached by setting
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (e.g. ``http://minio:9000``) on the driver and, for
a cluster, in the job's runtime environment; credentials come from the usual AWS variables or
files. Ray Train gets the same filesystem object (``stages/loop.fit``), so checkpoints, shards and
metrics all go to one endpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from lussray.errors import UserError


def is_uri(path: str) -> bool:
    """Whether ``path`` names an object-store location (``scheme://...``)."""
    return "://" in str(path)


def absolute(path: str) -> str:
    """``path`` made absolute when local (Ray workers run in their own directories); URIs as they are."""
    return path if is_uri(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    """Join path components for a local path or a URI."""
    base = str(base)
    if is_uri(base):
        return "/".join([base.rstrip("/"), *[part.strip("/") for part in parts]])
    return str(Path(base).joinpath(*parts))


def join_under(root: str, relative: str) -> str:
    """``root`` joined with ``relative``, refusing any result that is not inside ``root``.

    For output paths built from untrusted names (sample keys of a shard): ``relative`` must be
    a relative path whose normalised form stays under ``root`` (no leading ``/``, no ``..``
    climbing out, no backslash, NUL or scheme). Works for local paths and URIs alike; symbolic
    links are not followed (the names are checked, not the file system).

    Raises:
        UserError: naming ``relative`` and ``root`` when the result would escape ``root``.
    """
    relative = str(relative)
    parts = relative.split("/")
    bad = (not relative or relative.startswith("/") or "\\" in relative or "\0" in relative
           or "://" in relative or any(part in ("", ".", "..") for part in parts))
    if bad:
        raise UserError(f"refusing to write {relative!r} under {root}: it is not a plain relative path "
                        f"inside that folder (from an untrusted sample key?)")
    return join(root, *parts)


#: Environment variables naming an S3-compatible endpoint, most specific first (the AWS SDK names).
S3_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint URL set in the environment, or None for AWS itself."""
    for name in S3_ENDPOINT_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the filesystem-relative path of ``path``.

    An ``s3://`` path goes to :func:`s3_endpoint` when one is set: the endpoint is passed
    explicitly because pyarrow releases differ in whether they read those variables themselves
    (apache/arrow#49643), and the object pickles with it to Ray workers.
    """
    path = str(path)
    if is_uri(path):
        endpoint = s3_endpoint()
        if endpoint and path.startswith("s3://"):
            return pafs.S3FileSystem(endpoint_override=endpoint), path[len("s3://"):].rstrip("/")
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def exists(path: str) -> bool:
    """Whether a file or folder exists at ``path``."""
    if not is_uri(path):
        return os.path.exists(path)
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def file_size(path: str) -> int | None:
    """Size in bytes of the file at ``path``, or None when there is none."""
    fs, inner = filesystem(path)
    info = fs.get_file_info(inner)
    return info.size if info.type == pafs.FileType.File else None


def makedirs(path: str) -> None:
    """Create a folder and its parents (a no-op on object stores)."""
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    """Delete the file at ``path`` if there is one."""
    if not is_uri(path):
        if os.path.exists(path):
            os.unlink(path)
        return
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type == pafs.FileType.File:
        fs.delete_file(inner)


def read_bytes(path: str) -> bytes:
    """The whole content of the file at ``path``."""
    if not is_uri(path):
        return Path(path).read_bytes()
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def read_json(path: str) -> Any:
    """Parse the JSON file at ``path``."""
    return json.loads(read_bytes(path))


#: Prefix of the temporary files of :func:`write_bytes_atomic` (a killed writer may leave one).
TMP_PREFIX = ".tmp-"


def remove_stale_temporaries(folder: str) -> int:
    """Delete the temporary files a killed :func:`write_bytes_atomic` left in a local ``folder``.

    Returns:
        How many were removed (object stores get no temporaries: always 0 there).
    """
    if is_uri(folder) or not os.path.isdir(folder):
        return 0
    stale = [name for name in os.listdir(folder) if name.startswith(TMP_PREFIX)]
    for name in stale:
        os.unlink(os.path.join(folder, name))
    return len(stale)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` so that ``path`` never holds a partial file."""
    if is_uri(path):
        fs, inner = filesystem(path)
        with fs.open_output_stream(inner) as stream:
            stream.write(data)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def put_file(local_file: str, path: str) -> None:
    """Move a finished local file to ``path`` (rename locally, upload to object stores)."""
    if not is_uri(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        shutil.move(local_file, path)
        return
    fs, inner = filesystem(path)
    with open(local_file, "rb") as source, fs.open_output_stream(inner) as sink:
        shutil.copyfileobj(source, sink, length=8 << 20)
    os.unlink(local_file)
