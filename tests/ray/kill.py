"""Killing a running lussray command the way a laptop user does (SIGKILL of the driver's process group),
and finding the Ray processes of one run to kill them (only that run's: other clusters share the machine)."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable


def _session_alive(session: int) -> bool:
    """Whether a live process of this session remains: Ray's workers keep the driver's session, not its group."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, sid = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except OSError:  # exited while listed
            continue
        if int(sid) == session and state != "Z":
            return True
    return False


def kill_driver(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGKILL the driver started with start_new_session=True, then wait until its workers have died too.

    The workers (in process groups of their own) outlive the driver by a few seconds and can still write
    meanwhile, for example register one more checkpoint, so a test reads the run's folder only afterwards.
    """
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + timeout_s
    while _session_alive(proc.pid):
        if time.time() > deadline:
            raise AssertionError(f"Ray's processes outlived the killed driver by {timeout_s:.0f} s")
        time.sleep(0.5)


def _parents() -> dict[int, int]:
    """{pid: parent pid} of every live process."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while listed
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    return parents


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def processes(*, under: int | None = None, session: int | None = None) -> dict[int, str]:
    """{pid: command line} of the live processes descending from ``under`` or in ``session``.

    Only these, never a name match over the machine: other Ray clusters run there too.
    """
    parents = _parents()
    if under is not None:
        children: dict[int, list[int]] = {}
        for pid, parent in parents.items():
            children.setdefault(parent, []).append(pid)
        found, todo = set(), [under]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    else:
        found = set()
        for pid in parents:
            try:
                if os.getsid(pid) == session:
                    found.add(pid)
            except OSError:
                continue
    return {pid: _cmdline(pid) for pid in sorted(found)}


def wait_for_process(match: str | Callable[[str], bool], *, under: int | None = None, session: int | None = None,
                     timeout_s: float, running: Callable[[], bool] = lambda: True) -> int:
    """The pid of the first process (see :func:`processes`) whose command line matches.

    ``match`` is a prefix or a predicate of the command line. Ray names a worker after what it runs:
    ``ray::EmbeddingShard`` idle, ``ray::EmbeddingShard.load`` while in that method. Raises
    AssertionError after ``timeout_s`` or once ``running()`` is false.
    """
    test = match if callable(match) else (lambda command: command.startswith(match))
    deadline = time.time() + timeout_s
    while time.time() < deadline and running():
        for pid, command in processes(under=under, session=session).items():
            if test(command):
                return pid
        time.sleep(0.01)
    raise AssertionError(f"no process {match!r} appeared ({'deadline passed' if running() else 'the run ended'})")


def registered_steps(stage_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train's snapshot records in a stage folder (a rerun resumes from these)."""
    try:
        text = (stage_dir / "checkpoint_manager_snapshot.json").read_text()
    except OSError:
        return []
    return [int(step) for step in re.findall(r"checkpoint_step=(\d+)", text)]
