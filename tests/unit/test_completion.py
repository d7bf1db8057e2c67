"""Completion keyed by inputs, the run-folder lock and the checkpoint record (no Ray, milliseconds)."""

import functools
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from lussray import completion
from lussray.completion import StageRecord, config_fingerprint, differences, run_lock
from lussray.config import load_config
from lussray.errors import UserError
from lussray.stages.loop import CHECKPOINT_FILE, SNAPSHOT_FILE, drop_incomplete_checkpoints, latest_checkpoint


@functools.lru_cache(maxsize=None)
def _config(overrides: tuple[str, ...]):
    return load_config("synthetic-demo", overrides=list(overrides))


def _fingerprint(*overrides: str) -> dict:
    config = _config(overrides)
    return {"format": completion.FORMAT_VERSION,
            **config_fingerprint(config, "pretrain", "ingest.eval_short_side", "seed")}


# -- fingerprints -------------------------------------------------------------------------------


def test_config_fingerprint_nests_paths_and_leaves_out_resource_keys():
    fingerprint = _fingerprint()
    assert fingerprint["ingest"] == {"eval_short_side": 256}
    assert fingerprint["pretrain"]["arch"] == "resnet18" and "crops" in fingerprint["pretrain"]
    loop = fingerprint["pretrain"]["loop"]
    assert "base_lr" in loop and fingerprint["seed"] == 0
    assert not {"cpus_per_worker", "log_every_steps", "checkpoint_every_steps", "max_failures"} & set(loop)


@pytest.mark.parametrize("override, key", [
    ("pretrain.arch=resnet50", "pretrain.arch"),
    ("pretrain.loop.base_lr=0.1", "pretrain.loop.base_lr"),
    ("pretrain.crops.flip_p=0.1", "pretrain.crops.flip_p"),
    ("ingest.eval_short_side=128", "ingest.eval_short_side"),
    ("seed=3", "seed"),
])
def test_differences_name_the_changed_key_as_a_dotted_path(override, key):
    assert differences(_fingerprint(), _fingerprint(override)) == [key]


def test_resource_keys_and_equal_values_make_no_difference():
    assert differences(_fingerprint(), _fingerprint("pretrain.loop.cpus_per_worker=2", "pretrain.loop.use_gpu=true",
                                                    "pretrain.loop.log_every_steps=3")) == []
    # a JSON round trip (tuples become lists) is no difference either
    assert differences({"a": [1, 2]}, {"a": (1, 2)}) == []


def test_a_key_missing_on_one_side_is_a_difference():
    assert differences({"a": {"b": 1}}, {"a": {"b": 1, "c": None}}) == ["a.c"]


def test_checkpoint_and_data_fingerprints(tmp_path):
    checkpoint = tmp_path / "run" / "pretrain" / "checkpoint_step=00000002" / CHECKPOINT_FILE
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"x" * 10)
    assert completion.checkpoint_fingerprint(str(checkpoint), str(tmp_path / "run")) == {
        "path": "pretrain/checkpoint_step=00000002/checkpoint.pt", "bytes": 10, "record_sha256": None}
    # a stage retrained with other inputs writes a checkpoint of the same path and size: its record tells
    (tmp_path / "run" / "pretrain" / "inputs.json").write_text('{"pretrain": {"arch": "resnet18"}}')
    before = completion.checkpoint_fingerprint(str(checkpoint), str(tmp_path / "run"))
    (tmp_path / "run" / "pretrain" / "inputs.json").write_text('{"pretrain": {"arch": "resnet50"}}')
    assert differences(before, completion.checkpoint_fingerprint(str(checkpoint), str(tmp_path / "run"))) == [
        "record_sha256"]
    assert completion.checkpoint_fingerprint(None) is None
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "manifest.json").write_text('{"num_samples": 3}')
    found = completion.data_fingerprint(str(tmp_path / "data"), ["train", "validation", "train"])
    assert found == {"train": completion.sha256_bytes(b'{"num_samples": 3}'), "validation": None}


# -- the record ---------------------------------------------------------------------------------


def _record(folder, *overrides, extra=()) -> StageRecord:
    return StageRecord(str(folder), _fingerprint(*overrides), "pretrain", extra_outputs=[str(p) for p in extra])


def test_same_inputs_pass_other_inputs_are_refused_naming_the_key_and_the_ways_out(tmp_path):
    folder = tmp_path / "pretrain"
    _record(folder).check()  # no record yet
    with _record(folder).recording(produced=lambda: True):
        (folder / "output").write_text("done")
    assert json.loads((folder / "inputs.json").read_text())["pretrain"]["arch"] == "resnet18"
    _record(folder).check()
    _record(folder, "pretrain.loop.torch_threads=3").check()
    with pytest.raises(UserError) as refused:
        _record(folder, "pretrain.arch=resnet50").check()
    message = str(refused.value)
    assert 'pretrain.arch: "resnet18" -> "resnet50"' in message
    assert "--run" in message and "--overwrite" in message and str(folder) in message
    assert (folder / "output").exists()


def test_overwrite_removes_outputs_of_other_inputs_only(tmp_path):
    folder, zipped = tmp_path / "test", tmp_path / "test.zip"
    with _record(folder).recording(produced=lambda: True):
        (folder / "a.png").write_text("old")
    zipped.write_text("old zip")
    _record(folder, extra=[zipped]).check(overwrite=True)  # same inputs: kept
    assert (folder / "a.png").exists() and zipped.exists()
    _record(folder, "pretrain.arch=resnet50", extra=[zipped]).check(overwrite=True)
    assert not folder.exists() and not zipped.exists()


def test_a_failure_before_any_output_leaves_no_record(tmp_path):
    folder = tmp_path / "labelgen"
    with pytest.raises(RuntimeError), _record(folder).recording(produced=lambda: False):
        assert (folder / "inputs.json").exists()  # recorded while the work runs
        raise RuntimeError("raised in an actor")
    assert not (folder / "inputs.json").exists()
    _record(folder, "pretrain.arch=resnet50").check()  # the corrected rerun is not refused


def test_a_failure_after_some_output_keeps_the_record(tmp_path):
    folder = tmp_path / "labelgen"
    with pytest.raises(RuntimeError), _record(folder).recording(produced=lambda: True):
        raise RuntimeError("failed on the second shard")
    with pytest.raises(UserError):
        _record(folder, "pretrain.arch=resnet50").check()


def test_an_unreadable_record_is_refused_not_trusted(tmp_path):
    folder = tmp_path / "predict"
    folder.mkdir()
    (folder / "inputs.json").write_text("{trunc")
    with pytest.raises(UserError, match="other inputs"):
        _record(folder).check()


# -- the lock -----------------------------------------------------------------------------------


def _write_lock(run, pid: int, host: str | None = None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / ".lock").write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                           "started": completion._process_start(pid), "command": "lussray run"}))


def test_the_lock_refuses_a_second_holder_naming_it(tmp_path):
    run = tmp_path / "run"
    _write_lock(run, os.getppid())  # a live process that is not this one
    with pytest.raises(UserError) as refused, run_lock(str(run)):
        pass
    message = str(refused.value)
    assert f"pid {os.getppid()}" in message and socket.gethostname() in message and "lussray run" in message
    assert json.loads((run / ".lock").read_text())["pid"] == os.getppid()  # untouched


def test_a_lock_of_another_host_is_refused(tmp_path):
    run = tmp_path / "run"
    _write_lock(run, 1, host="elsewhere.example")
    with pytest.raises(UserError, match="elsewhere.example"), run_lock(str(run)):
        pass


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    run = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(run, dead.pid)
    with run_lock(str(run), "lussray train"):
        holder = json.loads((run / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "lussray train"
        with run_lock(str(run)):  # nested in the same process (`lussray run` calling the stages)
            pass
        assert (run / ".lock").exists()
    assert not (run / ".lock").exists()
    assert sorted(os.listdir(run)) == []  # no temporaries left


def test_the_lock_is_released_when_the_command_fails(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(UserError), run_lock(str(run)):
        raise UserError("bad input")
    assert not (run / ".lock").exists()


# -- the checkpoint record (Ray Train's snapshot) -------------------------------------------------


def _checkpoint(stage, step: int) -> int:
    folder = stage / f"checkpoint_step={step:08d}"
    folder.mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(64)}, "step": step}, folder / CHECKPOINT_FILE)
    return (folder / CHECKPOINT_FILE).stat().st_size


def _snapshot(stage, sizes: dict[int, int | None]) -> None:
    results = [{"version": 0, "checkpoint_dir_name": f"checkpoint_step={step:08d}",
                "metrics": {"step": step, **({"checkpoint_bytes": size} if size else {})}} for step, size in sizes.items()]
    (stage / SNAPSHOT_FILE).write_text(json.dumps({
        "ray_version": "2.60.0", "checkpoint_results": results, "checkpoint_report_indices": list(range(len(results))),
        "latest_checkpoint_result": results[-1], "pending_training_results": [], "pending_validation_specs": [],
        "current_report_index": len(results), "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}))


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_only_checkpoints_of_ray_trains_record_count(tmp_path):
    stage = tmp_path / "pretrain"
    sizes = {step: _checkpoint(stage, step) for step in (2, 4)}
    _checkpoint(stage, 6)  # copied by a killed run but never recorded
    _snapshot(stage, sizes)
    assert latest_checkpoint(str(stage)).endswith("checkpoint_step=00000004/checkpoint.pt")


def test_a_truncated_final_checkpoint_is_not_latest_and_is_dropped_from_the_record(tmp_path, capsys):
    stage = tmp_path / "pretrain"
    sizes = {step: _checkpoint(stage, step) for step in (2, 4)}
    _snapshot(stage, sizes)
    _truncate(stage / "checkpoint_step=00000004" / CHECKPOINT_FILE)
    assert latest_checkpoint(str(stage)).endswith("checkpoint_step=00000002/checkpoint.pt")
    assert drop_incomplete_checkpoints(str(stage), "pretrain") == ["checkpoint_step=00000004"]
    snapshot = json.loads((stage / SNAPSHOT_FILE).read_text())
    assert [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]] == ["checkpoint_step=00000002"]
    assert snapshot["checkpoint_report_indices"] == [0]
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_step=00000002"
    assert not (stage / "checkpoint_step=00000004").exists()
    assert "continues from checkpoint_step=00000002" in capsys.readouterr().out
    assert drop_incomplete_checkpoints(str(stage), "pretrain") == []


def test_without_recorded_sizes_or_a_record_a_checkpoint_must_load(tmp_path):
    stage = tmp_path / "attention"
    for step in (1, 3):
        _checkpoint(stage, step)
    _truncate(stage / "checkpoint_step=00000003" / CHECKPOINT_FILE)
    assert latest_checkpoint(str(stage)).endswith("checkpoint_step=00000001/checkpoint.pt")  # hand-placed folders
    _snapshot(stage, {1: None, 3: None})  # a record from before lussray reported sizes
    assert latest_checkpoint(str(stage)).endswith("checkpoint_step=00000001/checkpoint.pt")
    drop_incomplete_checkpoints(str(stage), "attention")
    assert json.loads((stage / SNAPSHOT_FILE).read_text())["latest_checkpoint_result"]["checkpoint_dir_name"] \
        == "checkpoint_step=00000001"


def test_when_no_checkpoint_is_intact_training_starts_afresh(tmp_path):
    stage = tmp_path / "finetune"
    _snapshot(stage, {2: _checkpoint(stage, 2)})
    _truncate(stage / "checkpoint_step=00000002" / CHECKPOINT_FILE)
    assert latest_checkpoint(str(stage)) is None
    drop_incomplete_checkpoints(str(stage), "finetune")
    snapshot = json.loads((stage / SNAPSHOT_FILE).read_text())
    assert snapshot["checkpoint_results"] == [] and snapshot["latest_checkpoint_result"] is None


def test_the_module_does_not_import_ray():
    probe = "import sys, lussray.completion; assert not [m for m in sys.modules if m.split('.')[0] == 'ray']"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0
