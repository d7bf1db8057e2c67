"""Faults a cluster sees, injected on tiny data: a Train worker, an actor of the labelgen pool and a
whole node SIGKILLed mid-run; the run finishes with the outputs of an unbroken one.

Every wait is for an event (a file, a metrics row, a process of the run appearing) with a generous
deadline; processes are found only among the run's own (its session or its node's), never by a
name match over the machine. The k-means actor killed mid-iteration is in test_kmeans.py.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from lussray.cli import main
from lussray.data.shards import iter_tar, shard_paths
from lussray.models.pass_model import PixelAttentionModel
from lussray.errors import UserError
from lussray.stages.loop import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    checkpoint_step,
    reported_checkpoints,
    state_fingerprint,
)
from tests.ray.kill import kill_driver, processes, wait_for_process

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def _wait_for(condition, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    """``condition()``'s first truthy value; fails after ``timeout_s`` or when ``proc`` ended first."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout_s:.0f} s")


def _finish(proc: subprocess.Popen, log: Path, timeout_s: float) -> str:
    """Wait for the run to end; its output, or a failure showing its end."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_driver(proc)
        raise AssertionError(f"the run did not finish within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}") from None
    output = log.read_text()
    assert proc.returncode == 0, output[-4000:]
    return output


# -- a Ray Train worker ---------------------------------------------------------------------------

TRAIN = [
    "ray.address=local", "ray.num_cpus=4", "dataset.num_classes=3",
    "pretrain.hidden_mlp=32", "pretrain.feat_dim=16", "pretrain.num_prototypes=8",
    "pretrain.queue_length=32", "pretrain.queue_start_epoch=1", "pretrain.freeze_prototypes_steps=2",
    "pretrain.crops.num_crops=[2]", "pretrain.crops.crop_sizes=[48]",
    "pretrain.crops.min_scales=[0.3]", "pretrain.crops.max_scales=[1.0]",
    "pretrain.loop.batch_size_per_worker=8", "pretrain.loop.epochs=20", "pretrain.loop.base_lr=0.3",
    "pretrain.loop.checkpoint_every_steps=4", "pretrain.loop.log_every_steps=1", "pretrain.loop.max_failures=2",
    "ingest.map_batch_size=8", "ingest.cpus_per_map_task=0.5",
]
# 64 images / (2 workers x 8) = 4 steps per epoch, a checkpoint every 4; the kill comes after step 5,
# and the steps left (half a second each here) leave it time to land before the run would end
TRAIN_STEPS = 40


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-train")
    assert main(["synth", "--out", str(root / "tree"), "--classes", "2", "--train-per-class", "32",
                 "--val-per-class", "1", "--test-per-class", "1", "--semi-per-class", "1", "--size", "48",
                 "--workers", "1"]) == 0
    assert main(["prepare", "--src", str(root / "tree"), "--out", str(root / "shards"), "--splits", "train",
                 "--workers", "1", "--samples-per-shard", "16", "dataset.num_classes=2"]) == 0
    return root / "shards"


def _rows(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):  # not written yet, or a line half-written
        return []


def _saved_states(stage: Path) -> dict[int, float]:
    """{step: state fingerprint} of the checkpoints on disk (one Ray is still copying is skipped)."""
    states = {}
    for folder in stage.glob("checkpoint_step=*"):
        try:
            state = torch.load(folder / CHECKPOINT_FILE, weights_only=True)
        except Exception:  # noqa: BLE001 - being written: never registered, never resumed from
            continue
        states[state["step"]] = state_fingerprint(state)
    return states


def test_a_train_worker_killed_mid_epoch_resumes_from_its_checkpoint(train_shards, tmp_path):
    run, log = tmp_path / "run", tmp_path / "train.log"
    metrics = run / "pretrain" / METRICS_FILE
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lussray.train", "--data", str(train_shards), "--run", str(run),
                                 "--max-steps", str(TRAIN_STEPS), *TRAIN, "dataset.num_classes=2"],
                                env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # mid-epoch: a checkpoint registered by Ray Train (in its snapshot: reported is not enough,
        # the controller registers it a moment later) and the step after it done
        def registered_then_a_step() -> bool:
            try:
                steps = [checkpoint_step(name) for name in reported_checkpoints(str(run / "pretrain")) or {}]
            except UserError:  # the snapshot being rewritten
                return False
            return bool(steps) and any(r.get("step") == max(steps) + 1 and "loss" in r for r in _rows(metrics))

        _wait_for(registered_then_a_step, 400, "a registered checkpoint and the step after it", proc)
        worker = wait_for_process("ray::RayTrainWorker", session=proc.pid, timeout_s=60)
        os.kill(worker, signal.SIGKILL)  # a worker, not the driver: Ray Train restarts the group (max_failures)
        killed_after = max(r["step"] for r in _rows(metrics) if "loss" in r)
        assert killed_after < TRAIN_STEPS, "the run ended before the worker was killed"
        saved = _saved_states(run / "pretrain")  # before Ray deletes step 4's (it keeps two)
        output = _finish(proc, log, 400)
    finally:
        if proc.poll() is None:
            kill_driver(proc)
    rows = _rows(metrics)
    resume = [r for r in rows if r.get("event") == "resume"]
    assert len(resume) == 1, output[-3000:]
    step = resume[0]["step"]
    assert step % 4 == 0 and 4 <= step <= killed_after, (step, killed_after)  # the last checkpoint before the kill
    # the optimizer and the SwAV queue came back as they were saved
    saved.update({s: f for s, f in _saved_states(run / "pretrain").items() if s not in saved})
    assert resume[0]["state_fingerprint"] == pytest.approx(saved[step], rel=1e-9)
    after = [r["step"] for r in rows[rows.index(resume[0]) + 1:] if "loss" in r]
    assert after == list(range(step + 1, TRAIN_STEPS + 1))
    final = torch.load(sorted((run / "pretrain").glob("checkpoint_step=*"))[-1] / CHECKPOINT_FILE, weights_only=True)
    assert final["step"] == TRAIN_STEPS and final["method"]["queue.embeddings"].abs().sum() > 0


# -- the labelgen actor pool, and a node ---------------------------------------------------------

LABELGEN = ["dataset.num_classes=3", "pretrain.hidden_mlp=32", "pretrain.feat_dim=16", "pretrain.num_prototypes=8",
            "labelgen.crop_size=56", "ingest.eval_short_side=64", "labelgen.kmeans_redo=1",
            "labelgen.kmeans_iterations=5", "labelgen.batch_size=4", "labelgen.torch_threads=1"]


@pytest.fixture(scope="module")
def labelgen_data(tmp_path_factory):
    """120 training images in 6 shards of 20, and a random stage-2 checkpoint."""
    root = tmp_path_factory.mktemp("faults-labelgen")
    assert main(["synth", "--out", str(root / "tree"), "--classes", "3", "--train-per-class", "40",
                 "--val-per-class", "2", "--test-per-class", "1", "--semi-per-class", "1", "--size", "64",
                 "--workers", "1"]) == 0
    assert main(["prepare", "--src", str(root / "tree"), "--out", str(root / "shards"), "--splits", "train",
                 "validation", "--workers", "1", "--samples-per-shard", "20", "dataset.num_classes=3"]) == 0
    torch.manual_seed(0)
    model = PixelAttentionModel(arch="resnet18", hidden_dim=32, feat_dim=16, num_prototypes=8, shallow_stages=())
    torch.save({"model": model.state_dict(), "step": 1}, root / "attention.pt")
    return root


def _labelgen_cmd(data: Path, run: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "lussray.cli", "labelgen", "--data", str(data / "shards"), "--run", str(run),
            "--checkpoint", str(data / "attention.pt"), "--tau", "0.3", *LABELGEN, *overrides]


def _assert_every_image_once(data: Path, run: Path) -> None:
    """Every training image exactly once in the embeddings and in the pseudo-label shards."""
    train = sorted(key for path in shard_paths(str(data / "shards"), "train") for key, _ in iter_tar(path))
    embedded = sorted(key for path in (run / "labelgen" / "embeddings").glob("*.parquet")
                      for key in pq.read_table(path, columns=["key"]).column("key").to_pylist())
    labelled = sorted(key for path in shard_paths(str(run / "labelgen" / "pseudo"), "train")
                      for key, _ in iter_tar(path))
    assert embedded == train and labelled == train
    assert json.loads((run / "labelgen" / "summary.json").read_text())["images"] == len(train)


def _in_a_call(command: str) -> bool:
    """A process of a labelgen pool actor running a task (Ray appends the method to its name)."""
    return command.startswith("ray::MapWorker(MapBatches(Guarded)).") and "__init__" not in command


def test_an_embedding_actor_killed_mid_shard_has_its_shard_redone(labelgen_data, tmp_path):
    run, log = tmp_path / "run", tmp_path / "labelgen.log"
    embeddings = run / "labelgen" / "embeddings"
    total = len(shard_paths(str(labelgen_data / "shards"), "train"))
    with open(log, "w") as out:
        proc = subprocess.Popen(_labelgen_cmd(labelgen_data, run, "ray.address=local", "ray.num_cpus=4",
                                              "labelgen.actor_pool_max=1", "labelgen.kmeans_actors=1"),
                                env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # the embedding pass in its steady state: a shard written, the actor inside its next one
        _wait_for(lambda: list(embeddings.glob("*.parquet")), 400, "a first embedded shard", proc)
        actor = wait_for_process(_in_a_call, session=proc.pid, timeout_s=60)
        os.kill(actor, signal.SIGKILL)
        done_at_kill = len(list(embeddings.glob("*.parquet")))
        output = _finish(proc, log, 400)
    finally:
        if proc.poll() is None:
            kill_driver(proc)
    assert done_at_kill < total, "the embedding pass had ended before the kill"
    assert "embed: shard 6/6" in output
    _assert_every_image_once(labelgen_data, run)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _end_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (a node started with `ray start`), then wait for them to go."""
    for pid in processes(session=sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_for(lambda: not processes(session=sid), 60, f"the end of session {sid}'s processes")


def _start_node(args: list[str], temp_dir: str) -> subprocess.Popen:
    """`ray start` in a session of its own (the node's processes stay in it); returns once it is up."""
    env = {key: value for key, value in ENV.items() if key not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    start = subprocess.Popen([str(BIN / "ray"), "start", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
                              "--temp-dir", temp_dir, *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output, _ = start.communicate(timeout=180)
    assert start.returncode == 0, output[-3000:]
    return start


def _at_work(command: str) -> bool:
    """A labelgen actor at work: a pool actor in a call, or a k-means actor."""
    return _in_a_call(command) or command.startswith("ray::EmbeddingShard")


def test_a_node_killed_mid_labelgen_leaves_the_stage_to_the_other(labelgen_data, tmp_path):
    gcs, client, agent, *node_ports = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="lussray-nodes-")  # short: Ray's socket paths stay below 108 characters
    nodes: list[subprocess.Popen] = []
    run, log = tmp_path / "run", tmp_path / "labelgen.log"
    proc = None
    try:
        # a head without CPUs and two worker nodes: every actor runs on a worker node, and whichever of
        # them dies, the other can hold the whole stage (a pool actor and the k-means actors)
        nodes.append(_start_node(["--head", "--port", str(gcs), "--num-cpus", "0", "--include-dashboard", "false",
                                  "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent)],
                                 temp_dir))
        for agent_port, node_port in (node_ports[:2], node_ports[2:]):
            nodes.append(_start_node([f"--address=127.0.0.1:{gcs}", "--num-cpus", "2",
                                      "--dashboard-agent-listen-port", str(agent_port),
                                      "--node-manager-port", str(node_port)], temp_dir))
        workers = [node.pid for node in nodes[1:]]  # their sessions: every process of each worker node
        with open(log, "w") as out:
            proc = subprocess.Popen(_labelgen_cmd(labelgen_data, run, f"ray.address=127.0.0.1:{gcs}",
                                                  "labelgen.actor_pool_min=1", "labelgen.actor_pool_max=2",
                                                  "labelgen.kmeans_actors=2", "labelgen.kmeans_cpus_per_actor=0.5"),
                                    env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        # the first worker node with a labelgen actor at work dies whole
        victim = _wait_for(lambda: next((sid for sid in workers
                                         if any(map(_at_work, processes(session=sid).values()))), None),
                           400, "a labelgen actor at work on a worker node", proc)
        _end_session(victim)
        output = _finish(proc, log, 600)
    finally:
        if proc is not None and proc.poll() is None:
            kill_driver(proc)
        for node in reversed(nodes):
            _end_session(node.pid)
    assert "joined the cluster" in output
    _assert_every_image_once(labelgen_data, run)


# -- the object store ------------------------------------------------------------------------------

STORE_BYTES = 80 * 10**6  # just above Ray's minimum (75 MiB)


@pytest.fixture(scope="module")
def big_view_shards(tmp_path_factory):
    """300 training images: two 224 px views each are 90 MB per epoch, more than the object store holds."""
    root = tmp_path_factory.mktemp("faults-store")
    assert main(["synth", "--out", str(root / "tree"), "--classes", "2", "--train-per-class", "150",
                 "--val-per-class", "1", "--test-per-class", "1", "--semi-per-class", "1", "--size", "64",
                 "--workers", "1"]) == 0
    assert main(["prepare", "--src", str(root / "tree"), "--out", str(root / "shards"), "--splits", "train",
                 "--workers", "1", "--samples-per-shard", "50", "dataset.num_classes=2"]) == 0
    return root / "shards"


def _spill_requests(temp_dir: str) -> int:
    """The raylet's cumulative spill requests, from the state dump it writes every few seconds."""
    total = 0
    for dump in Path(temp_dir).glob("session_*/logs/debug_state.txt"):
        for line in dump.read_text(errors="replace").splitlines():
            if "cumulative spill requests:" in line:
                total = max(total, int(line.rsplit(":", 1)[1]))
    return total


def test_training_with_an_object_store_smaller_than_its_read_ahead_spills_and_finishes(big_view_shards, tmp_path):
    gcs, client, agent = _free_ports(3)
    temp_dir = tempfile.mkdtemp(prefix="lussray-store-")
    head = None
    run, log = tmp_path / "run", tmp_path / "train.log"
    proc = None
    try:
        head = _start_node(["--head", "--port", str(gcs), "--num-cpus", "4", "--include-dashboard", "false",
                            "--object-store-memory", str(STORE_BYTES), "--ray-client-server-port", str(client),
                            "--dashboard-agent-listen-port", str(agent)], temp_dir)
        # Ray Data may read 512 MB ahead of the workers (ingest.max_ahead_mb): far more than the store holds
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "lussray.train", "--data", str(big_view_shards), "--run",
                                     str(run), "--max-steps", "2", f"ray.address=127.0.0.1:{gcs}",
                                     "dataset.num_classes=2", "pretrain.hidden_mlp=32", "pretrain.feat_dim=16",
                                     "pretrain.num_prototypes=8", "pretrain.queue_length=0",
                                     "pretrain.crops.num_crops=[2]", "pretrain.crops.crop_sizes=[224]",
                                     "pretrain.crops.min_scales=[0.3]", "pretrain.crops.max_scales=[1.0]",
                                     "pretrain.loop.batch_size_per_worker=2", "ingest.max_ahead_mb=512",
                                     "ingest.map_batch_size=16", "ingest.cpus_per_map_task=0.5"],
                                    env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _finish(proc, log, 600)
        spilled = _wait_for(lambda: _spill_requests(temp_dir), 60, "spill in the raylet's state dump")
    finally:
        if proc is not None and proc.poll() is None:
            kill_driver(proc)
        if head is not None:
            _end_session(head.pid)
    assert spilled > 0
    final = torch.load(run / "pretrain" / "checkpoint_step=00000002" / CHECKPOINT_FILE, weights_only=True)
    assert final["step"] == 2
