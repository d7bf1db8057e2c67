"""Shards and a pretraining run folder on an S3-compatible object store, with a resume from it.

A moto S3 server on loopback stands in for S3. Every lussray process reaches it through
``AWS_ENDPOINT_URL`` (``lussray.storage.filesystem``), Ray Train through the ``storage_filesystem``
that ``stages.loop.fit`` passes on, and the test itself reads the bucket with boto3 only, so the
pytest process never opens a pyarrow S3 filesystem.
"""

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer

from lussray import storage
from lussray.cli import main
from lussray.stages.loop import CHECKPOINT_FILE, METRICS_FILE, state_fingerprint
from tests.ray.tensorboard_events import scalars

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BUCKET = "lussray-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
TINY = [
    "ray.address=local", "ray.num_cpus=4",
    "dataset.num_classes=3",
    "pretrain.hidden_mlp=32", "pretrain.feat_dim=16", "pretrain.num_prototypes=8",
    "pretrain.queue_length=16", "pretrain.queue_start_epoch=0", "pretrain.freeze_prototypes_steps=1",
    "pretrain.crops.num_crops=[2]", "pretrain.crops.crop_sizes=[48]",
    "pretrain.crops.min_scales=[0.3]", "pretrain.crops.max_scales=[1.0]",
    "pretrain.loop.num_workers=1", "pretrain.loop.batch_size_per_worker=8", "pretrain.loop.epochs=20",
    "pretrain.loop.checkpoint_every_steps=2", "pretrain.loop.log_every_steps=1",
    "ingest.map_batch_size=8", "ingest.cpus_per_map_task=0.5",
]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A fresh bucket on a local S3 server, and the environment that points lussray at it."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
               "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        yield SimpleNamespace(client=client, env=env, cwd=tmp_path_factory.mktemp("cwd"))
    finally:
        server.stop()


def _lussray(s3, *args: str, timeout: int = 300) -> str:
    """Run a lussray command against the fake S3 in its own process; returns its output."""
    result = subprocess.run([sys.executable, "-m", "lussray.cli", *args], check=False, env=s3.env, cwd=s3.cwd,
                            capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def _get(s3, key: str) -> bytes:
    return s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def test_shards_and_run_folder_on_s3_with_resume(s3, tmp_path):
    tree = tmp_path / "tree"
    assert main(["synth", "--out", str(tree), "--classes", "3", "--train-per-class", "12", "--val-per-class", "1",
                 "--test-per-class", "1", "--semi-per-class", "1", "--size", "48", "--workers", "1"]) == 0
    shards, run = f"s3://{BUCKET}/shards", f"s3://{BUCKET}/runs/r1"

    # 1. shards written straight to the bucket
    _lussray(s3, "prepare", "--src", str(tree), "--out", shards, "--splits", "train", "--workers", "1",
             "--samples-per-shard", "16", "dataset.num_classes=3")
    manifest = json.loads(_get(s3, "shards/train/manifest.json"))
    assert manifest["num_samples"] == 36
    tars = [key for key in _keys(s3, "shards/train/") if key.endswith(".tar")]
    assert [f"shards/train/{s['name']}" for s in manifest["shards"]] == tars

    # 2. two steps, streamed from the bucket, checkpointed into it
    train = ["train", "--data", shards, "--run", run, *TINY]
    _lussray(s3, *train, "--max-steps", "2")
    first = torch.load(io.BytesIO(_get(s3, f"runs/r1/pretrain/checkpoint_step=00000002/{CHECKPOINT_FILE}")),
                       weights_only=True)
    assert first["step"] == 2

    # 3. a second run with a higher step budget resumes from that checkpoint
    output = _lussray(s3, *train, "--max-steps", "4")
    assert "resumed from the checkpoint at step 2" in output, output[-4000:]
    rows = [json.loads(line) for line in _get(s3, f"runs/r1/pretrain/{METRICS_FILE}").decode().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # both runs' rows, in one object
    resume = [r for r in rows if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 2
    assert resume[0]["state_fingerprint"] == pytest.approx(state_fingerprint(first), rel=1e-9)
    # TensorBoard events in the bucket too: one file per run, read back as one curve
    events = [key for key in _keys(s3, "runs/r1/pretrain/") if key.rsplit("/", 1)[-1].startswith("events.out.")]
    assert len(events) == 2, events
    for key in events:
        (tmp_path / "events").mkdir(exist_ok=True)
        (tmp_path / "events" / key.rsplit("/", 1)[-1]).write_bytes(_get(s3, key))
    curve = scalars(tmp_path / "events")["loss/total"]
    assert [step for step, _ in curve] == [1, 2, 3, 4]
    assert [value for _, value in curve] == pytest.approx([r["loss"] for r in rows if "loss" in r], rel=1e-6)
    final = torch.load(io.BytesIO(_get(s3, f"runs/r1/pretrain/checkpoint_step=00000004/{CHECKPOINT_FILE}")),
                       weights_only=True)
    assert final["step"] == 4 and final["config"]["pretrain"]["feat_dim"] == 16
    assert any(key.endswith("checkpoint_manager_snapshot.json") for key in _keys(s3, "runs/r1/pretrain/"))

    # nothing went to a local folder named after the URI
    assert not any(Path(s3.cwd).iterdir()), list(Path(s3.cwd).iterdir())


def test_s3_endpoint_prefers_the_s3_specific_variable(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert storage.s3_endpoint() is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    assert storage.s3_endpoint() == "http://generic:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")
    assert storage.s3_endpoint() == "http://s3-only:9000"
