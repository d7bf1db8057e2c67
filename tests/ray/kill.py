"""Killing a running lussray command the way a laptop user does: SIGKILL of the driver's process group."""

import os
import signal
import subprocess
import time
from pathlib import Path


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
