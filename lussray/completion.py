"""Completion keyed by inputs: a finished stage is finished only for the inputs that made it.

Every stage that writes into a run folder records, in ``<stage folder>/inputs.json``, a
*fingerprint* of what determines its output: the resolved config values it reads (minus the keys
that only choose resources or logging, :data:`NOT_OUTPUT_KEYS`), the upstream checkpoint it
starts from (path relative to the run folder, plus its size; the step is in the path), the
SHA-256 of the data manifests it reads and :data:`FORMAT_VERSION`. A rerun compares the
fingerprint it would record with the recorded one, before it looks at any completion marker:

- the same: the stage skips what is complete and resumes the rest;
- a different one: :class:`~lussray.errors.UserError` naming the differing keys as dotted paths
  (``pretrain.arch``, ``data.train``, ``init.path``) and the two ways out: a new ``--run`` folder,
  or ``--overwrite``, which removes the stage folder's old outputs and redoes the stage (only
  when they were made with other inputs; outputs of the same inputs are kept and resumed);
- no record (a new folder, or one written before lussray kept records): the stage runs and
  records its inputs.

The record is written as the stage starts its work and removed again when the stage fails
before producing any output (:meth:`StageRecord.recording`), so an error (in an actor, say)
followed by a corrected rerun is not refused as "made with other inputs".

:func:`run_lock` keeps two commands from writing into one run folder at once.

This module is pure: no Ray (a unit test checks it).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, is_dataclass
from typing import Any

from lussray import storage
from lussray.errors import UserError

#: The lussray output format recorded in every fingerprint; bump it when a stage's outputs change meaning.
FORMAT_VERSION = 1
INPUTS_FILE = "inputs.json"
LOCK_FILE = ".lock"
MANIFEST_FILE = "manifest.json"  # lussray.data.shards.MANIFEST (not imported: shards pulls in image codecs)

#: Config keys (the last component of a dotted path) that choose resources, logging or the
#: checkpoint cadence, never what a stage computes: changing them never refuses a rerun.
NOT_OUTPUT_KEYS = frozenset({
    "cpus_per_worker", "gpus_per_worker", "use_gpu", "max_failures", "log_every_steps", "checkpoint_every_steps",
    "torch_threads", "actor_pool_min", "actor_pool_max", "cpus_per_actor", "gpus_per_actor", "batch_size",
    "kmeans_actors", "kmeans_cpus_per_actor", "crf_timeout_s",
})

_SHOWN_KEYS = 6  # differing keys named in a refusal; the rest are counted


# -- fingerprints ----------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def relative_path(path: str, root: str | None) -> str:
    """``path`` relative to ``root`` when it lies under it (so a moved run folder keeps its records)."""
    path = str(path)
    if root:
        prefix = str(root).rstrip("/") + "/"
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def _parent(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[0] if storage.is_uri(path) else os.path.dirname(str(path))


def checkpoint_fingerprint(path: str | None, root: str | None = None) -> dict[str, Any] | None:
    """Path (relative to ``root``), size and lineage of a checkpoint file; None for none (random init).

    The path of a lussray checkpoint names its step (``checkpoint_step=<N>/checkpoint.pt``). A
    retrained stage writes a checkpoint of the same path and size, so the SHA-256 of the inputs
    record of the stage that wrote it (``<stage>/inputs.json``, beside or above the file) is part
    of it too: when that stage is redone with other inputs, its consumers see the change.
    """
    if not path:
        return None
    record = None
    for folder in (_parent(path), _parent(_parent(path))):
        candidate = storage.join(folder, INPUTS_FILE)
        if storage.exists(candidate):
            record = sha256_bytes(storage.read_bytes(candidate))
            break
    return {"path": relative_path(path, root), "bytes": storage.file_size(path), "record_sha256": record}


def file_fingerprint(path: str, root: str | None = None) -> dict[str, Any]:
    """Path (relative to ``root``) and SHA-256 of a small file (a match.json)."""
    return {"path": relative_path(path, root), "sha256": sha256_bytes(storage.read_bytes(path))}


def manifest_fingerprint(data: str, split: str) -> str | None:
    """SHA-256 of ``<data>/<split>/manifest.json`` (it lists every shard's checksum); None without one."""
    path = storage.join(data, split, MANIFEST_FILE)
    return sha256_bytes(storage.read_bytes(path)) if storage.exists(path) else None


def data_fingerprint(data: str, splits: list[str] | tuple[str, ...]) -> dict[str, str | None]:
    """{split: manifest SHA-256} of the splits a stage reads (splits without a manifest map to None)."""
    return {split: manifest_fingerprint(data, split) for split in dict.fromkeys(splits)}


def _plain(value: Any) -> Any:
    """A config object (dataclass) or value as plain JSON-able containers."""
    if is_dataclass(value) and not isinstance(value, type):
        from lussray.config import to_dict

        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _without_resource_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _without_resource_keys(value) for key, value in tree.items() if key not in NOT_OUTPUT_KEYS}
    return tree


def config_fingerprint(config: Any, *paths: str) -> dict[str, Any]:
    """The config values at dotted ``paths`` (whole sections or single keys), nested by path.

    ``config_fingerprint(c, "pretrain", "ingest.eval_short_side")`` gives
    ``{"pretrain": {...}, "ingest": {"eval_short_side": 256}}``; keys in :data:`NOT_OUTPUT_KEYS`
    are left out.
    """
    out: dict[str, Any] = {}
    for path in paths:
        value: Any = config
        for part in path.split("."):
            value = getattr(value, part)
        *parents, last = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = _without_resource_keys(_plain(value))
    return out


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{dotted.path: leaf}`` (lists and scalars are leaves; an empty dict is one too)."""
    if isinstance(tree, dict) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: tree}


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted paths whose values differ between two fingerprints (missing on one side counts), sorted."""
    old, new = flatten(_json_round_trip(recorded)), flatten(_json_round_trip(current))
    missing = object()
    return sorted(key for key in old.keys() | new.keys() if old.get(key, missing) != new.get(key, missing))


def _json_round_trip(tree: Any) -> Any:
    """What ``tree`` reads back as from JSON (tuples become lists), so both sides compare alike."""
    return json.loads(json.dumps(tree))


def _describe(key: str, recorded: dict[str, Any], current: dict[str, Any]) -> str:
    def shown(flat: dict[str, Any]) -> str:
        if key not in flat:
            return "absent"
        text = json.dumps(flat[key])
        return text if len(text) <= 100 else text[:97] + "..."

    return f"{key}: {shown(recorded)} -> {shown(current)}"


# -- the record of a stage folder ---------------------------------------------------------------


@dataclass
class StageRecord:
    """The inputs record of one stage folder.

    Attributes:
        folder: the stage folder (``<run>/<stage>``, or a prediction folder).
        fingerprint: what determines the folder's outputs (JSON-able; compared as dotted paths).
        stage: the log prefix (``pretrain``, ``predict``).
        extra_outputs: outputs outside ``folder`` that belong to it (a submission zip), removed with it.
    """

    folder: str
    fingerprint: dict[str, Any]
    stage: str
    extra_outputs: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return storage.join(self.folder, INPUTS_FILE)

    def recorded(self) -> dict[str, Any] | None:
        """The recorded fingerprint (None when there is none; ``{}`` when it cannot be read)."""
        if not storage.exists(self.path):
            return None
        try:
            recorded = json.loads(storage.read_bytes(self.path))
        except (OSError, ValueError):
            return {}
        return recorded if isinstance(recorded, dict) else {}

    def check(self, overwrite: bool = False) -> None:
        """Compare with the recorded fingerprint; on a difference remove the outputs (``overwrite``) or refuse.

        Call it before looking at any completion marker of the folder.

        Raises:
            UserError: if the folder holds outputs of other inputs and ``overwrite`` is false.
        """
        recorded = self.recorded()
        if recorded is None:
            return
        changed = differences(recorded, self.fingerprint)
        if not changed:
            return
        described = "; ".join(_describe(key, flatten(recorded), flatten(_json_round_trip(self.fingerprint)))
                              for key in changed[:_SHOWN_KEYS])
        if len(changed) > _SHOWN_KEYS:
            described += f"; and {len(changed) - _SHOWN_KEYS} more"
        if overwrite:
            print(f"[{self.stage}] --overwrite: removing {self.folder}, made with other inputs ({described})",
                  flush=True)
            for path in [self.folder, *self.extra_outputs]:
                remove_tree(path)
            return
        raise UserError(f"{self.folder} holds outputs made with other inputs ({described}; recorded in "
                        f"{self.path}): use a new --run folder, or pass --overwrite to remove them and redo "
                        f"this stage")

    @contextmanager
    def recording(self, produced: Callable[[], bool]) -> Iterator[None]:
        """Record the fingerprint for the work inside the ``with`` block.

        Args:
            produced: whether the folder holds any output yet (a reported checkpoint, a first
                embedding file): when the block fails and this is false, a record this block
                wrote is removed again, so that a corrected rerun starts afresh.
        """
        fresh = not storage.exists(self.path)
        if fresh:
            storage.write_json_atomic(self.path, self.fingerprint)
        try:
            yield
        except BaseException:
            if fresh and not _produced(produced):
                remove_tree(self.path)
            raise


def _produced(produced: Callable[[], bool]) -> bool:
    try:
        return bool(produced())
    except Exception:  # e.g. an unreachable object store while failing: keep the record
        return True


def remove_tree(path: str) -> None:
    """Delete the file or folder at ``path`` with everything under it (local or object store); no-op if absent."""
    import pyarrow.fs as pafs

    if not storage.is_uri(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
        return
    fs, inner = storage.filesystem(path)
    kind = fs.get_file_info(inner).type
    if kind == pafs.FileType.File:
        fs.delete_file(inner)
    elif kind == pafs.FileType.Directory:
        fs.delete_dir(inner)


def has_files(folder: str, suffix: str = "", ignore: tuple[str, ...] = (INPUTS_FILE,)) -> bool:
    """Whether ``folder`` holds any file (ending in ``suffix``) besides the names in ``ignore``."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(folder)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    return any(info.type == pafs.FileType.File and info.base_name.endswith(suffix)
               and info.base_name not in ignore for info in fs.get_file_info(selector))


# -- the run-folder lock ------------------------------------------------------------------------


_HELD: dict[str, int] = {}  # lock path -> nesting depth in this process (``lussray run`` calls the stages)


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks (Linux), to tell a reused pid apart; None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's holder process still runs (only decidable on its own host)."""
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's live process
    recorded, current = holder.get("started"), _process_start(pid)
    return recorded is None or current is None or recorded == current


def _holder(command: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid()),
            "since": datetime.datetime.now().isoformat(timespec="seconds"), "command": command}


def _read_holder(path: str) -> dict[str, Any]:
    try:
        holder = json.loads(storage.read_bytes(path))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_mine(holder: dict[str, Any]) -> bool:
    return holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()


def _refuse(path: str, holder: dict[str, Any]) -> UserError:
    who = (f"{holder.get('command', 'a lussray command')} (pid {holder.get('pid', '?')} on host "
           f"{holder.get('host', '?')}, since {holder.get('since', '?')})")
    return UserError(f"the run folder {os.path.dirname(path) if not storage.is_uri(path) else path.rsplit('/', 1)[0]} "
                     f"is in use by {who}: wait for it to finish or use another --run folder; if that process "
                     f"is gone (e.g. its machine died), delete {path}")


def _stale(holder: dict[str, Any]) -> bool:
    return holder.get("host") == socket.gethostname() and not _alive(holder)


def _lock_local(path: str, command: str) -> None:
    """Create the lock file with its content in one atomic step: a hard link fails when the name exists."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    written = f"{path}.{socket.gethostname()}-{os.getpid()}"
    with open(written, "w") as handle:
        json.dump(_holder(command), handle)
    try:
        for _ in range(5):  # a stale lock is taken over, then the creation retried
            try:
                os.link(written, path)
                return
            except FileExistsError:
                holder = _read_holder(path)
                if holder and not _stale(holder):
                    raise _refuse(path, holder) from None
                _take_over(path, holder)  # its holder is dead, or it is unreadable (not a lussray lock)
        raise _refuse(path, _read_holder(path))
    finally:
        os.unlink(written)


def _take_over(path: str, stale: dict[str, Any]) -> None:
    """Remove a stale lock, unless another process replaced it meanwhile (then put theirs back)."""
    moved = f"{path}.stale-{os.getpid()}"
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return  # another process took it over first
    if _read_holder(moved) != stale:
        try:
            os.link(moved, path)
        except FileExistsError:
            pass
    os.unlink(moved)


def _lock_object_store(path: str, command: str) -> None:
    holder = _read_holder(path) if storage.exists(path) else None
    if holder is not None and not _stale(holder) and not _is_mine(holder):
        raise _refuse(path, holder)
    mine = _holder(command)
    storage.write_json_atomic(path, mine)
    if _read_holder(path) != json.loads(json.dumps(mine)):  # another writer's PUT landed after ours
        raise _refuse(path, _read_holder(path))


@contextmanager
def run_lock(run: str | None, command: str = "lussray") -> Iterator[None]:
    """Hold ``<run>/.lock`` (holder host, pid, start time, command) while the block runs.

    Locally the lock file is created atomically and complete: a hard link to a written file, which
    fails when the name exists (as ``O_EXCL`` does) and never shows a half-written lock. A lock
    whose holder process is dead on this host (its pid gone, or reused: the start time differs) is
    stale and taken over. A lock held by another host cannot be checked: it is
    refused, naming the holder and the file to delete if that run is gone. Nested uses in one
    process (``lussray run`` calling the stages) share the lock.

    On object storage (``s3://``, ``gs://``) the lock is an object, **best effort**: there is no
    atomic create-if-absent, so two runs starting within the same moment may both get it; the
    write is read back to catch most such races.

    Raises:
        UserError: if another live process holds the lock.
    """
    if not run:
        yield
        return
    path = storage.join(storage.absolute(run), LOCK_FILE)
    if _HELD.get(path):
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    (_lock_object_store if storage.is_uri(path) else _lock_local)(path, command)
    _HELD[path] = 1
    try:
        yield
    finally:
        _HELD.pop(path, None)
        if _is_mine(_read_holder(path)):
            remove_tree(path)
