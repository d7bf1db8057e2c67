import pytest

from lussray.config import (ConfigError, LabelgenConfig, LussConfig, available_datasets, check_values, load_config,
                            unranged_keys)


def test_presets_carry_reference_hyperparameters():
    s50 = load_config("imagenet-s50")
    assert s50.pretrain.arch == "resnet18" and s50.pretrain.num_prototypes == 500
    assert s50.pretrain.crops.num_crops == [2, 6] and s50.pretrain.crops.crop_sizes == [224, 96]
    assert s50.pretrain.queue_length == 2048 and s50.pretrain.freeze_prototypes_steps == 1001
    # tau is swept (the published 0.41 suits only the authors' checkpoints); pretraining reads train
    assert s50.attention.loop.base_lr == 6.0 and s50.labelgen.tau is None and s50.pretrain.split == "train"
    s919 = load_config("imagenet-s919")
    assert s919.pretrain.arch == "resnet50" and s919.pretrain.hidden_mlp == 2048
    assert s919.dataset.num_classes == 919 and s919.labelgen.tau is None
    assert s919.pretrain.split == "train-full"  # the reference pretrains S919 on ImageNet-1k train
    assert s919.pretrain.loop.batch_size_per_worker == 32 and s919.pretrain.loop.num_workers == 8
    assert set(available_datasets()) >= {"synthetic-demo", "imagenet-s50", "imagenet-s300", "imagenet-s919"}


def test_overrides_and_experiment_file(tmp_path):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("pretrain:\n  loop:\n    epochs: 7\n")
    config = load_config("imagenet-s50", experiment, ["pretrain.loop.base_lr=0.3"])
    assert config.pretrain.loop.epochs == 7 and config.pretrain.loop.base_lr == 0.3
    assert config.pretrain.arch == "resnet18"


def test_unknown_key_names_key_and_file(tmp_path):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("pretrain:\n  lr_typo: 1\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml.*pretrain\.lr_typo"):
        load_config("synthetic-demo", experiment)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"pretrain\.loop\.epochs"):
        load_config("synthetic-demo", overrides=["pretrain.loop.epochs=many"])


@pytest.mark.parametrize("bad", ["noequals", "dataset.nope=1"])
def test_bad_override(bad):
    with pytest.raises(ConfigError):
        load_config("synthetic-demo", overrides=[bad])


def test_unknown_dataset_lists_choices():
    with pytest.raises(ConfigError, match="imagenet-s50"):
        load_config("imagenet-s51")


def test_missing_experiment_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("synthetic-demo", tmp_path / "missing.yaml")


def test_every_numeric_key_has_a_range():
    # a new numeric field needs ranged(default, low, high) in lussray/config.py
    assert unranged_keys() == []


@pytest.mark.parametrize("dataset", available_datasets())
def test_defaults_and_every_preset_are_in_range(dataset):
    check_values(LussConfig())
    load_config(dataset)


@pytest.mark.parametrize("override, message", [
    ("pretrain.loop.num_workers=0", r"pretrain\.loop\.num_workers=0 .*>= 1"),
    ("attention.loop.batch_size_per_worker=0", r"attention\.loop\.batch_size_per_worker=0 .*>= 1"),
    ("finetune.loop.batch_size_per_worker=-8", r"finetune\.loop\.batch_size_per_worker=-8 .*>= 1"),
    ("pretrain.loop.checkpoint_every_steps=0", r"pretrain\.loop\.checkpoint_every_steps=0 .*>= 1"),
    ("semisup.loop.max_failures=-1", r"semisup\.loop\.max_failures=-1 .*>= 0"),
    ("labelgen.tau=2", r"labelgen\.tau=2\.0 .*in \[0, 1\]"),
    ("labelgen.tau_step=0", r"labelgen\.tau_step=0\.0 .*in \(0, 1\]"),
    ("pretrain.crops.flip_p=1.5", r"pretrain\.crops\.flip_p=1\.5 .*in \[0, 1\]"),
    ("pretrain.loop.base_lr=-0.1", r"pretrain\.loop\.base_lr=-0\.1 .*>= 0"),
    ("pretrain.loop.weight_decay=nan", r"pretrain\.loop\.weight_decay=nan"),
    ("pretrain.temperature=0", r"pretrain\.temperature=0\.0 .*> 0"),
    ("labelgen.kmeans_redo=0", r"labelgen\.kmeans_redo=0 .*>= 1"),
    ("ray.num_cpus=0", r"ray\.num_cpus=0 .*>= 1"),
    ("dataset.num_classes=1000", r"dataset\.num_classes=1000 .*in \[1, 999\]"),
    ("pretrain.crops.num_crops=[2,0]", r"pretrain\.crops\.num_crops\[1\]=0 .*>= 1"),
    ("labelgen.score_scale=minmax", r"labelgen\.score_scale='minmax'.*absolute, image"),
    ("labelgen.tau_split=train", r"labelgen\.tau_split='train'.*validation, train-semi"),
    ("fs4.labels.keep_fraction=0", r"fs4\.labels\.keep_fraction=0\.0 .*in \(0, 1\]"),
    ("fs4.labels.num_clusters=0", r"fs4\.labels\.num_clusters=0 .*>= 1"),
    ("fs4.labels.feature=fc", r"fs4\.labels\.feature='fc'.*projector, backbone"),
    ("fs4.cam_head=gap", r"fs4\.cam_head='gap'.*modified, classical"),
    ("fs4.pixel_weight=-1", r"fs4\.pixel_weight=-1\.0 .*>= 0"),
])
def test_out_of_range_values_are_refused_naming_key_and_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("synthetic-demo", overrides=[override])


@pytest.mark.parametrize("overrides, message", [
    (["labelgen.tau_min=0.5", "labelgen.tau_max=0.4"], r"labelgen\.tau_min=0\.5 exceeds labelgen\.tau_max=0\.4"),
    (["predict.actor_pool_min=3"], r"predict\.actor_pool_min=3 exceeds predict\.actor_pool_max=1"),
    (["pretrain.crops.min_scales=[0.5,0.4]"], r"pretrain\.crops\.min_scales\[1\]=0\.4 exceeds .*max_scales\[1\]=0\.3"),
    (["pretrain.crops.num_crops=[2]"], r"pretrain\.crops\.num_crops=\[2\], pretrain\.crops\.crop_sizes=\[64, 32\]"),
    (["synth.semi_per_class=61"], r"synth\.semi_per_class=61 exceeds synth\.train_per_class=60"),
    (["fs4.labels.crop_size=300"], r"fs4\.labels\.crop_size=300 exceeds fs4\.labels\.resize=256"),
])
def test_inconsistent_keys_are_refused_naming_both(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("synthetic-demo", overrides=overrides)


def test_optional_keys_accept_none_and_bounds_are_inclusive():
    config = load_config("imagenet-s50", overrides=["labelgen.tau=null", "ray.num_cpus=null", "labelgen.tau_max=1",
                                                    "pretrain.loop.max_failures=0", "labelgen.num_clusters=null"])
    assert config.labelgen.tau is None and config.ray.num_cpus is None and config.labelgen.tau_max == 1.0


def test_score_scale_choices_are_pixel_labels_scales():
    from dataclasses import fields

    from lussray.clustering.pixel_labels import SCORE_SCALES

    choices = next(spec for spec in fields(LabelgenConfig) if spec.name == "score_scale").metadata["choices"]
    assert tuple(choices) == tuple(SCORE_SCALES)


def test_range_check_runs_before_any_stage_work(tmp_path, capsys):
    from lussray.cli import main

    assert main(["train", "--data", str(tmp_path / "none"), "--run", str(tmp_path / "run"),
                 "pretrain.loop.num_workers=0"]) == 2
    assert "pretrain.loop.num_workers=0 is out of range: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value, accepted", [("0.4", True), ("0", True), ("1", True), ("2", False),
                                             ("-0.1", False), ("nan", False), ("x", False)])
def test_labelgen_tau_flag_uses_the_key_range(value, accepted, capsys):
    import argparse

    from lussray.stages import labelgen

    parser = argparse.ArgumentParser()
    labelgen.add_arguments(parser)
    if accepted:
        assert parser.parse_args(["--tau", value]).tau == float(value)
    else:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--tau", value])
        assert exit_info.value.code == 2 and "--tau" in capsys.readouterr().err
