"""Methods as the axis of ``lussray run``: dispatch, config layers, the final JSON line."""

import pytest

from lussray import config as config_module
from lussray.cli import main
from lussray.config import ConfigError, load_config
from lussray.errors import UserError
from lussray.pipelines import METHOD_NAMES, PLANNED_METHODS, method_module
from lussray.stages.pipeline import final_line


def test_unknown_method_is_refused_naming_the_choices():
    with pytest.raises(UserError) as error:
        method_module("dino")
    for name in METHOD_NAMES:
        assert name in str(error.value)


def test_unbuilt_method_names_its_issue(monkeypatch):
    monkeypatch.setitem(PLANNED_METHODS, "toy", "a toy method")
    with pytest.raises(UserError, match="not implemented yet.*a toy method"):
        method_module("toy")


def test_fs4_declares_its_stages_in_order_and_sits_on_picie_layers():
    stages = method_module("fs4").STAGES
    assert [stage.name for stage in stages] == ["train", "fs4-labels", "fs4", "fs4-clusters", "predict"]
    assert all(stage.reads and stage.writes and stage.completion for stage in stages)
    assert [path.stem for path in config_module.method_files("fs4", "synthetic-scenes")] == [
        "picie", "synthetic-scenes", "fs4", "synthetic-scenes"]
    config = load_config("synthetic-scenes", method="fs4")
    assert config.picie.kmeans_images == 0 and config.fs4.labels.num_clusters == 12  # both layers merged


def test_pass_declares_its_stages_in_order():
    stages = method_module("pass").STAGES
    assert [stage.name for stage in stages] == ["train", "attention", "labelgen", "finetune", "predict"]
    assert all(stage.reads and stage.writes and stage.completion for stage in stages)


def test_cli_refuses_unknown_method_with_exit_2(tmp_path, capsys):
    assert main(["run", "--method", "nope", "--data", str(tmp_path), "--run", str(tmp_path / "run")]) == 2
    assert "choose one of" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_method_layers_merge_between_dataset_and_overrides(tmp_path, monkeypatch):
    methods = tmp_path / "method"
    (methods / "toy").mkdir(parents=True)
    (methods / "toy.yaml").write_text("labelgen: {kmeans_redo: 7, kmeans_iterations: 9}\n")
    (methods / "toy" / "synthetic-demo.yaml").write_text("labelgen: {kmeans_redo: 5}\n")
    monkeypatch.setattr(config_module, "METHOD_DIR", methods)
    config = load_config("synthetic-demo", method="toy")
    assert config.labelgen.kmeans_iterations == 9  # method layer over base and dataset
    assert config.labelgen.kmeans_redo == 5  # method x dataset over method (the preset says 3)
    assert load_config("synthetic-demo", overrides=["labelgen.kmeans_redo=2"], method="toy").labelgen.kmeans_redo == 2
    with pytest.raises(ConfigError, match="no config for method"):
        load_config("synthetic-demo", method="absent")


def test_pass_layers_leave_the_preset_as_it_was():
    assert load_config("synthetic-demo", method="pass") == load_config("synthetic-demo")


def test_final_line_has_the_headline_and_every_baseline():
    rows = {"pipeline": {"mIoU": 30.0, "Acc": 40.0, "FMeasure": 50.0}, "pipeline + CRF": {"mIoU": 31.0}}
    found = {"all_other": {"mIoU": 10.0}, "random_backbone": {"mIoU": 20.0, "Acc": 1.0}}
    assert final_line("pass", rows, found, 3) == {"method": "pass", "seed": 3, "mIoU": 30.0, "Acc": 40.0, "F": 50.0,
                                                  "baselines": {"all_other": 10.0, "random_backbone": 20.0}}
    pixel = final_line("picie", {"pipeline": {"mIoU": 12.0, "Acc": 45.0}}, {})
    assert pixel == {"method": "picie", "seed": 0, "mIoU": 12.0, "Acc": 45.0, "baselines": {}}


def test_fs4_run_composes_its_stages_and_picie_baselines_from_the_same_start(tmp_path, monkeypatch):
    from lussray.pipelines import RunOptions, StageTimer
    from lussray.stages import fs4_labels, fs4_train, picie, pretrain

    calls = []
    start = str(tmp_path / "run" / "pretrain" / "checkpoint_step=00000009" / "checkpoint.pt")

    def record(name, result):
        def stage(*args, **kwargs):
            calls.append((name, args[2] if name != "fs4" else args[1], kwargs.get("init") or kwargs.get("checkpoint"),
                          kwargs.get("stage")))
            return result
        return stage

    monkeypatch.setattr(pretrain, "pretrain", record("pretrain", {}))
    monkeypatch.setattr(fs4_labels, "initial_checkpoint", lambda run, given: given or start)
    monkeypatch.setattr(fs4_labels, "generate", record("fs4-labels", {}))
    monkeypatch.setattr(fs4_train, "train", record("fs4", {"checkpoint": "FS4"}))
    monkeypatch.setattr(picie, "train", record("picie", {"checkpoint": "PICIE"}))
    monkeypatch.setattr(picie, "cluster", record("cluster", {}))
    monkeypatch.setattr(picie, "predict", record("predict", {"metrics": {"mIoU": 1.0, "Acc": 2.0}}))
    config = load_config("synthetic-scenes", method="fs4")
    run = str(tmp_path / "run")
    result = method_module("fs4").run_method(config, "DATA", run, RunOptions(baselines=True), StageTimer())
    assert list(result.baselines) == ["picie", "random_backbone"] and result.protocol == "pixel"
    assert calls[:5] == [("pretrain", run, None, None), ("fs4-labels", run, start, None), ("fs4", run, start, None),
                         ("cluster", run, "FS4", "fs4"), ("predict", run, "FS4", "fs4")]
    picie_run, random_run = f"{run}/baselines/picie", f"{run}/baselines/random-backbone"
    assert calls[5:] == [("picie", picie_run, start, None), ("cluster", picie_run, "PICIE", None),
                         ("predict", picie_run, "PICIE", None), ("picie", random_run, "random", None),
                         ("cluster", random_run, "PICIE", None), ("predict", random_run, "PICIE", None)]
