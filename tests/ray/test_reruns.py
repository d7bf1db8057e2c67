"""Reruns on tiny data: other inputs are refused naming the key, --overwrite redoes, broken outputs are repaired.

One short pretraining (2 steps) serves the training checks; labelgen and predict start from
random checkpoints, as tests/ray/test_labelgen.py and test_finetune_predict.py do.
"""

import json
import os
import socket
import zipfile
from pathlib import Path

import pytest
import torch

from lussray.cli import main
from lussray.models.pass_model import PASSModel, PixelAttentionModel
from lussray.models.segmenter import Segmenter
from lussray.stages.loop import CHECKPOINT_FILE, METRICS_FILE, SNAPSHOT_FILE, latest_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CLASSES = 3
MODEL = ["pretrain.hidden_mlp=32", "pretrain.feat_dim=16", "pretrain.num_prototypes=8"]
LOOP = ["num_workers=1", "batch_size_per_worker=4", "epochs=1", "checkpoint_every_steps=1", "log_every_steps=1",
        "torch_threads=1"]
TINY = [
    f"dataset.num_classes={CLASSES}", *MODEL, "pretrain.queue_length=0",
    "pretrain.crops.num_crops=[2,1]", "pretrain.crops.crop_sizes=[64,32]",
    "pretrain.crops.min_scales=[0.3,0.1]", "pretrain.crops.max_scales=[1.0,0.3]",
    "attention.crops.crop_sizes=[64]", "attention.queue_length=0",
    *[f"{stage}.loop.{kv}" for stage in ("pretrain", "attention") for kv in LOOP],
    "ingest.map_batch_size=8", "ingest.cpus_per_map_task=0.5", "ingest.eval_short_side=64",
    "labelgen.crop_size=56", "labelgen.kmeans_redo=1", "labelgen.kmeans_iterations=3", "labelgen.batch_size=8",
    "labelgen.actor_pool_max=1", "labelgen.kmeans_actors=1", "labelgen.torch_threads=1",
    "predict.batch_size=8", "predict.torch_threads=1",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """9 training images (2 steps of 4), 2 validation images per class, 4 images per shard."""
    root = tmp_path_factory.mktemp("reruns")
    assert main(["synth", "--out", str(root / "tree"), "--classes", str(CLASSES), "--train-per-class", "3",
                 "--val-per-class", "2", "--test-per-class", "1", "--semi-per-class", "1", "--size", "64",
                 "--workers", "1"]) == 0
    assert main(["prepare", "--src", str(root / "tree"), "--out", str(root / "shards"), "--workers", "1",
                 "--samples-per-shard", "4", f"dataset.num_classes={CLASSES}"]) == 0
    return root / "shards"


@pytest.fixture(scope="module")
def pretrained(shards, tmp_path_factory, ray_cluster) -> Path:
    """A run folder whose pretraining is complete (2 steps, a checkpoint after each)."""
    run = tmp_path_factory.mktemp("pretrained") / "run"
    assert main(["train", "--data", str(shards), "--run", str(run), *TINY]) == 0
    return run


def _train(shards: Path, run: Path, *extra: str) -> int:
    return main(["train", "--data", str(shards), "--run", str(run), *TINY, *extra])


def test_train_rerun_with_other_inputs_is_refused_naming_the_key(shards, pretrained, capsys):
    snapshot = json.loads((pretrained / "pretrain" / SNAPSHOT_FILE).read_text())
    assert [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]] == [
        "checkpoint_step=00000001", "checkpoint_step=00000002"]
    assert all(r["metrics"]["checkpoint_bytes"] > 0 for r in snapshot["checkpoint_results"])
    assert json.loads((pretrained / "pretrain" / "inputs.json").read_text())["pretrain"]["arch"] == "resnet18"
    capsys.readouterr()
    assert _train(shards, pretrained, "pretrain.loop.cpus_per_worker=0.4") == 0  # resources are no input
    assert "[pretrain] complete at step 2" in capsys.readouterr().out

    assert _train(shards, pretrained, "pretrain.arch=resnet50") == 2
    err = capsys.readouterr().err
    assert 'pretrain.arch: "resnet18" -> "resnet50"' in err and "--overwrite" in err and "--run" in err
    # `lussray run` hands the same config to each stage's check
    assert main(["run", "--data", str(shards), "--run", str(pretrained), *TINY, "pretrain.arch=resnet50"]) == 2
    assert "pretrain.arch" in capsys.readouterr().err
    assert not (pretrained / "attention").exists()


def test_a_truncated_final_checkpoint_is_not_complete_and_the_rerun_repairs_it(shards, pretrained, capsys):
    final = pretrained / "pretrain" / "checkpoint_step=00000002" / CHECKPOINT_FILE
    data = final.read_bytes()
    final.write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    assert _train(shards, pretrained) == 0
    out = capsys.readouterr().out
    assert "complete at step" not in out
    assert "checkpoint_step=00000002 is incomplete" in out
    rows = [json.loads(line) for line in (pretrained / "pretrain" / METRICS_FILE).read_text().splitlines()]
    assert [row["step"] for row in rows if row.get("event") == "resume"] == [1]
    repaired = torch.load(final, weights_only=True)
    assert repaired["step"] == 2 and "prototypes.weight" in repaired["model"]
    assert latest_checkpoint(str(pretrained / "pretrain")) == str(final)


def test_attention_rerun_with_another_init_or_lr_is_refused_and_overwrite_retrains(shards, pretrained, capsys):
    run = ["attention", "--max-steps", "1", "--data", str(shards), "--run", str(pretrained), *TINY]
    assert main(run) == 0
    capsys.readouterr()
    step1 = pretrained / "pretrain" / "checkpoint_step=00000001" / CHECKPOINT_FILE
    assert main([*run, "--init", str(step1)]) == 2
    assert 'init.path: "pretrain/checkpoint_step=00000002/checkpoint.pt" -> "pretrain/checkpoint_step=00000001' \
        in capsys.readouterr().err
    assert main([*run, "attention.loop.base_lr=0.01"]) == 2
    assert "attention.loop.base_lr" in capsys.readouterr().err

    assert main([*run, "attention.loop.base_lr=0.01", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "--overwrite: removing" in out and "complete at step" not in out
    retrained = latest_checkpoint(str(pretrained / "attention"))
    assert torch.load(retrained, weights_only=True)["config"]["attention"]["loop"]["base_lr"] == 0.01
    assert json.loads((pretrained / "attention" / "inputs.json").read_text())["attention"]["loop"]["base_lr"] == 0.01


def test_a_locked_run_folder_is_refused_naming_the_holder(shards, pretrained, capsys):
    lock = pretrained / ".lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "command": "lussray run"}))
    try:
        assert _train(shards, pretrained) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getppid()}" in err and "lussray run" in err and str(lock) in err
    finally:
        lock.unlink()


# -- labelgen -----------------------------------------------------------------------------------


def _stage_checkpoint(folder: Path, model: torch.nn.Module) -> Path:
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "step": 1}, folder / CHECKPOINT_FILE)
    return folder / CHECKPOINT_FILE


def test_labelgen_rerun_with_other_tau_k_or_score_scale_is_refused(shards, tmp_path, ray_cluster, capsys):
    torch.manual_seed(0)
    run = tmp_path / "run"
    shape = {"arch": "resnet18", "hidden_dim": 32, "feat_dim": 16, "num_prototypes": 8, "shallow_stages": ()}
    attention = _stage_checkpoint(run / "attention" / "checkpoint_step=00000001", PixelAttentionModel(**shape))
    stage1 = _stage_checkpoint(tmp_path / "stage1", PASSModel(**shape))
    labelgen = ["labelgen", "--data", str(shards), "--run", str(run), "--tau", "0.5", *TINY,
                "labelgen.score_scale=absolute"]

    # a failure inside the actors before any output leaves no inputs record behind ...
    try:
        code = main([*labelgen, "--checkpoint", str(stage1)])
    except Exception as error:  # the actor's error, as it reaches the driver
        code, message = None, str(error)
    else:
        message = capsys.readouterr().err
    assert code != 0 and "pixel attention" in message
    assert not (run / "labelgen" / "inputs.json").exists()
    # ... so the corrected rerun is not refused
    assert main(labelgen) == 0
    assert json.loads((run / "labelgen" / "inputs.json").read_text())["checkpoint"]["path"] == str(
        attention.relative_to(run))

    for flag, key in ((["--tau", "0.3"], "labelgen.tau"), (["labelgen.num_clusters=4"], "labelgen.num_clusters"),
                      (["labelgen.score_scale=image"], "labelgen.score_scale")):
        capsys.readouterr()
        assert main([*labelgen, *flag]) == 2, key
        captured = capsys.readouterr()
        assert key in captured.err and "--overwrite" in captured.err and "complete" not in captured.out
    assert main(labelgen) == 0  # the same inputs: complete


# -- predict ------------------------------------------------------------------------------------


def test_predict_rerun_with_other_settings_is_refused_overwrite_redoes_and_the_zip_holds_this_run(
        shards, tmp_path, ray_cluster, capsys):
    torch.manual_seed(0)
    checkpoint = tmp_path / "segmenter.pt"
    torch.save({"model": Segmenter("resnet18", CLASSES + 1).state_dict()}, checkpoint)
    out = tmp_path / "pred"
    predict = ["predict", "--split", "validation", "--data", str(shards), "--checkpoint", str(checkpoint),
               "--out", str(out), *TINY]
    assert main(predict) == 0
    for override, key in (("ingest.eval_short_side=48", "ingest.eval_short_side"),
                          ("predict.max_res=32", "predict.max_res")):
        capsys.readouterr()
        assert main([*predict, override]) == 2
        assert key in capsys.readouterr().err

    (out / "n99999999").mkdir()
    (out / "n99999999" / "stray.png").write_bytes(b"not from this run")
    capsys.readouterr()
    assert main([*predict, "ingest.eval_short_side=48", "--overwrite", "--submission"]) == 0
    assert "--overwrite: removing" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["ingest"]["eval_short_side"] == 48 and summary["num_images"] == 2 * CLASSES
    with zipfile.ZipFile(tmp_path / "pred.zip") as archive:
        names = set(archive.namelist())
    assert len(names - {"match.json", "method.txt"}) == 2 * CLASSES and not any("n99999999" in n for n in names)

    (out / "n99999999").mkdir(exist_ok=True)
    (out / "n99999999" / "stray.png").write_bytes(b"not from this run")
    assert main([*predict, "ingest.eval_short_side=48", "--submission"]) == 0  # complete: repacked
    with zipfile.ZipFile(tmp_path / "pred.zip") as archive:
        assert not any("n99999999" in n for n in archive.namelist())
