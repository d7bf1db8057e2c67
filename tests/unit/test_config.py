import pytest

from lussray.config import ConfigError, available_datasets, load_config


def test_presets_carry_reference_hyperparameters():
    s50 = load_config("imagenet-s50")
    assert s50.pretrain.arch == "resnet18" and s50.pretrain.num_prototypes == 500
    assert s50.pretrain.crops.num_crops == [2, 6] and s50.pretrain.crops.crop_sizes == [224, 96]
    assert s50.pretrain.queue_length == 2048 and s50.pretrain.freeze_prototypes_steps == 1001
    assert s50.attention.loop.base_lr == 6.0 and s50.labelgen.tau == pytest.approx(0.41)
    s919 = load_config("imagenet-s919")
    assert s919.pretrain.arch == "resnet50" and s919.pretrain.hidden_mlp == 2048
    assert s919.dataset.num_classes == 919 and s919.labelgen.tau == pytest.approx(0.37)
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
