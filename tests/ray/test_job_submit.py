"""The README's cluster recipe on loopback: `ray start --head`, `ray job submit --working-dir .`.

The head runs in its own session with its own ports and temp dir, so it neither joins nor
disturbs the session's `ray_cluster` fixture or other Ray instances on the machine, and this
process never connects to it (only the `ray` CLI and the dashboard's HTTP API do). Teardown ends
exactly the processes of that session instead of `ray stop`, which stops every Ray instance of
the machine (the other tests' clusters included); the job's driver, which Ray starts in a session
of its own, is stopped through the job API if it is still running and otherwise dies with its
supervisor.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lussray.cli import main
from lussray.stages.loop import CHECKPOINT_FILE, METRICS_FILE

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: its `ray`, and the `python` a job's entrypoint finds
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
TINY = [  # no ray.* overrides: the job's driver joins the cluster it was submitted to (RAY_ADDRESS)
    "dataset.num_classes=3",
    "pretrain.hidden_mlp=32", "pretrain.feat_dim=16", "pretrain.num_prototypes=8", "pretrain.queue_length=0",
    "pretrain.crops.num_crops=[2]", "pretrain.crops.crop_sizes=[48]",
    "pretrain.crops.min_scales=[0.3]", "pretrain.crops.max_scales=[1.0]",
    "pretrain.loop.batch_size_per_worker=8", "pretrain.loop.log_every_steps=1",
    "ingest.map_batch_size=8", "ingest.cpus_per_map_task=0.5",
]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:  # exited meanwhile
                pass
    return pids


def _end_session(sid: int, grace_s: float = 5.0) -> None:
    """SIGTERM every process of session ``sid`` (the head and its workers), SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while _session_pids(sid) and time.time() < deadline:
            time.sleep(0.2)
    assert not _session_pids(sid), "processes of the test's Ray head survived SIGKILL"


def _http_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def ray_head():
    """A Ray head on loopback with the job server; ended with all its processes afterwards."""
    gcs, dashboard, client, agent = _free_ports(4)
    # short: Ray's unix socket paths under the temp dir must stay below 108 characters
    temp_dir = tempfile.mkdtemp(prefix="lussray-head-")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)
    start = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent), "--num-cpus", "4", "--disable-usage-stats",
         "--temp-dir", temp_dir],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = start.communicate(timeout=120)
        assert start.returncode == 0, output[-3000:]
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 60
        while True:  # the job server may answer a moment after `ray start` returns
            try:
                _http_json(f"{address}/api/version")
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        yield SimpleNamespace(address=address, env=env)
    finally:
        if start.poll() is None:
            start.kill()
        _end_session(start.pid)  # `ray start` led a new session: every head process and worker is in it
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def shards(tmp_path):
    assert main(["synth", "--out", str(tmp_path / "tree"), "--classes", "3", "--train-per-class", "12",
                 "--val-per-class", "1", "--test-per-class", "1", "--semi-per-class", "1", "--size", "48",
                 "--workers", "1"]) == 0
    assert main(["prepare", "--src", str(tmp_path / "tree"), "--out", str(tmp_path / "shards"), "--splits", "train",
                 "--workers", "1", "--samples-per-shard", "16", "dataset.num_classes=3"]) == 0
    return tmp_path / "shards"


def test_ray_job_submit_pretrains_and_checkpoints(ray_head, shards, tmp_path):
    run = tmp_path / "run"
    job_id = f"lussray-test-{uuid.uuid4().hex[:8]}"
    # the README's command, from the repository root: the job runs the uploaded copy of the code
    for _ in range(10):  # a fresh head's job agent may not be up yet: Ray answers "please try again later"
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", ray_head.address, "--submission-id", job_id,
             "--no-wait", "--working-dir", ".", "--",
             "python", "-m", "lussray.train", "--dataset", "synthetic-demo", "--data", str(shards), "--run",
             str(run), "--max-steps", "2", *TINY],
            check=False, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=120)
        if submit.returncode == 0 or "No available agent to submit job" not in submit.stderr + submit.stdout:
            break
        time.sleep(3)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]

    url = f"{ray_head.address}/api/jobs/{job_id}"
    deadline = time.time() + 300
    try:
        while (job := _http_json(url))["status"] not in TERMINAL:
            assert time.time() < deadline, f"job still {job['status']} after 300 s"
            time.sleep(2)
    finally:  # the driver runs in a session of its own: stop it through Ray rather than leave it running
        if _http_json(url)["status"] not in TERMINAL:
            urllib.request.urlopen(urllib.request.Request(f"{url}/stop", method="POST"), timeout=10).close()
    logs = _http_json(f"{url}/logs")["logs"]
    assert job["status"] == "SUCCEEDED", f"{job['status']}: {job.get('message')}\n{logs[-4000:]}"
    assert job["runtime_env"]["working_dir"].startswith("gcs://")  # the working dir was packaged and uploaded

    checkpoint = run / "pretrain" / "checkpoint_step=00000002" / CHECKPOINT_FILE
    assert checkpoint.is_file(), sorted(p.name for p in (run / "pretrain").iterdir())
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 2 and state["config"]["pretrain"]["feat_dim"] == 16
    rows = [json.loads(line) for line in (run / "pretrain" / METRICS_FILE).read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    assert "[pretrain] done:" in logs
