"""The fs4 config section and method layers, and the `lussray fs4 ACTION` command."""

import pytest

from lussray.cli import main
from lussray.config import load_config


@pytest.mark.parametrize("dataset", ["synthetic-scenes", "cocostuff27", "cityscapes27"])
def test_fs4_layers_pin_the_papers_values(dataset):
    config = load_config(dataset, method="fs4")
    assert config.fs4.labels.keep_fraction == 0.4 and config.fs4.cam_head == "modified"
    assert (config.fs4.loop.base_lr, config.fs4.loop.weight_decay, config.fs4.loop.epochs) == (0.001, 0.0, 10)
    assert config.fs4.labels.num_clusters == (12 if dataset == "synthetic-scenes" else 50)
    if dataset != "synthetic-scenes":  # the supplement's global batch of 128
        assert config.fs4.loop.num_workers * config.fs4.loop.batch_size_per_worker == 128


def test_fs4_command_resolves_with_fs4_layers_and_needs_an_action(tmp_path, capsys):
    assert main(["fs4", "labels", "--dataset", "synthetic-scenes", "--dry-run"]) == 0
    assert "num_clusters: 12" in capsys.readouterr().out  # configs/method/fs4/synthetic-scenes.yaml
    with pytest.raises(SystemExit):
        main(["fs4", "--dataset", "synthetic-scenes"])
    assert "ACTION" in capsys.readouterr().err
    assert main(["fs4", "labels", "--dataset", "synthetic-scenes", "--run", str(tmp_path / "run")]) == 2
    assert "--data DIR" in capsys.readouterr().err


def test_fs4_train_and_cluster_actions_parse_and_need_their_inputs(tmp_path, capsys):
    assert main(["fs4", "train", "--dataset", "synthetic-scenes", "--init", "random", "--max-steps", "3",
                 "--dry-run"]) == 0
    assert "cam_head: modified" in capsys.readouterr().out
    assert main(["fs4", "cluster", "--dataset", "synthetic-scenes", "--dry-run"]) == 0
    run = tmp_path / "run"
    # without the pseudo labels, training is refused before any cluster work
    assert main(["fs4", "train", "--dataset", "synthetic-scenes", "--data", str(tmp_path), "--run", str(run),
                 "--init", "random"]) == 2
    assert "lussray fs4 labels" in capsys.readouterr().err
    # without a trained network, the final k-means names the command that makes one
    assert main(["fs4", "cluster", "--dataset", "synthetic-scenes", "--data", str(tmp_path), "--run", str(run)]) == 2
    assert "lussray fs4 train" in capsys.readouterr().err


def test_fs4_views_take_picies_photometric_keys_and_fingerprint_them():
    from lussray.config import ConfigError
    from lussray.stages import fs4_train

    overrides = ["picie.grayscale_p=0", "picie.blur_p=0", "picie.jitter=[0.3,0.3,0.3,0]"]
    config = load_config("synthetic-scenes", method="fs4", overrides=overrides)
    kwargs = fs4_train.FS4Method.stream_kwargs(config.fs4, config.picie)
    assert (kwargs["grayscale_p"], kwargs["blur_p"], kwargs["jitter"]) == (0.0, 0.0, [0.3, 0.3, 0.3, 0.0])
    assert {"picie.grayscale_p", "picie.blur_p", "picie.jitter", "picie.jitter_p"} <= set(fs4_train.training_keys(config))
    with pytest.raises(ConfigError, match="picie.jitter"):
        fs4_train.build_spec(load_config("synthetic-scenes", method="fs4", overrides=["picie.jitter=[0.3,0.3]"]),
                             "/nonexistent-run", None)
