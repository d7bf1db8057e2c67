"""PiCIE's hooks of the shared loop on fake batches (no Ray): the epoch's clustering, the step, a resume."""

import numpy as np
import pytest
import torch

from lussray.config import ConfigError, load_config
from lussray.stages import picie
from lussray.stages.loop import StepState

KWARGS = {"arch": "resnet18", "width": 16, "num_clusters": (3, 5), "init_checkpoint": None, "seed": 0,
          "base_size": 48, "kmeans_iterations": 3, "kmeans_pixels_per_image": 8}


def _batches(epoch):
    rng = np.random.default_rng(epoch)
    out = []
    for start in (0, 2):
        boxes = np.array([[8, 4, 32, 32, 0], [0, 10, 38, 38, 1]], np.float32)
        out.append({"view1": torch.from_numpy(rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)),
                    "view2": torch.from_numpy(rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)),
                    "boxes": torch.from_numpy(boxes), "__key__": np.array([f"k{start}", f"k{start + 1}"])})
    return out


def _state(step, epoch, batches=_batches):
    return StepState(step, epoch, steps_per_epoch=2, total_steps=4, epoch_batches=lambda e: iter(batches(e)))


def _no_pass(epoch):
    raise AssertionError("the restored epoch was clustered again")


def test_epoch_hook_labels_the_epoch_and_the_step_trains_on_them():
    method = picie.PiCIEMethod(**KWARGS)
    model = method.build_model()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    method.before_epoch(model, _state(0, 0))
    clusters = method.state_module().clusters
    assert clusters.epoch == 0 and clusters.keys == ["k0", "k1", "k2", "k3"]
    assert clusters.labels.shape == (4, 2, 2, 8, 8)  # images, heads (3 and 5), views, 32 / 4
    # the passes ran on batch statistics and left the running statistics as they were
    assert model.training and all(torch.equal(before[name], b) for name, b in model.named_buffers())
    batch = _batches(0)[1]
    loss, terms = method.training_step(model, batch, _state(1, 0))
    loss.backward()
    assert torch.isfinite(loss) and {"loss_within", "loss_cross", "loss_head1", "kmeans_objective"} <= set(terms)
    assert all(p.grad is not None for p in model.decoder.parameters())
    # the network is a function of the seed alone (the driver's initial_kmeans checkpoint equals the workers' start)
    again = picie.PiCIEMethod(**KWARGS).build_model()
    torch.manual_seed(123)  # the global generator does not matter
    assert all(torch.equal(a, b) for a, b in zip(picie.PiCIEMethod(**KWARGS).build_model().state_dict().values(),
                                                 again.state_dict().values()))


def test_a_resumed_worker_keeps_the_checkpointed_epoch_and_clusters_the_next():
    method = picie.PiCIEMethod(**KWARGS)
    model = method.build_model()
    method.before_epoch(model, _state(0, 0))
    saved = method.state_module().state_dict()
    resumed = picie.PiCIEMethod(**KWARGS)
    resumed.state_module().load_state_dict(saved)
    resumed.before_epoch(model, _state(1, 0, _no_pass))  # mid-epoch 0: the checkpoint's labels
    batch = _batches(0)[0]
    torch.testing.assert_close(resumed.training_step(model, batch, _state(1, 0))[0],
                               method.training_step(model, batch, _state(1, 0))[0], rtol=0, atol=0)
    resumed.before_epoch(model, _state(2, 1))  # the next epoch: clustered again
    assert resumed.state_module().clusters.epoch == 1


def test_config_rules_and_training_keys():
    config = load_config("synthetic-scenes", method="picie")
    assert picie.num_clusters(config) == (12,)
    assert picie.num_clusters(load_config("synthetic-scenes", method="picie", overrides=["picie.overcluster_k=30"])) \
        == (12, 30)
    keys = picie.training_keys(config)
    assert "picie.loop" in keys and "picie.cluster" not in keys and "picie.crf_alpha" not in keys
    for override, message in (("picie.jitter=[0.3,0.3]", "need 4"), ("picie.crop_size=130", "exceeds"),
                              ("picie.crop_size=62", "multiple of 4"), ("picie.jitter=[0.3,0.3,0.3,0.6]", "hue")):
        with pytest.raises(ConfigError, match=message):
            picie.check_config(load_config("synthetic-scenes", method="picie", overrides=[override]))
    cocostuff = load_config("cocostuff27", method="picie")
    assert cocostuff.picie.loop.base_lr == 1e-4 and cocostuff.picie.num_clusters == 27
    assert load_config("cityscapes27", method="picie").picie.loop.base_lr == 1e-3


def test_commands_take_picie_layers_and_trailing_overrides(capsys):
    from lussray.cli import main

    assert main(["picie", "train", "--dataset", "synthetic-scenes", "--init", "random", "--dry-run",
                 "picie.loop.epochs=3"]) == 0
    printed = capsys.readouterr().out
    assert "base_size: 128" in printed and "epochs: 3" in printed  # picie/synthetic-scenes.yaml, then the override
    assert main(["predict", "--method", "picie", "--split", "validation", "--dataset", "synthetic-scenes",
                 "--dry-run"]) == 0
    assert "base_size: 128" in capsys.readouterr().out
    assert main(["predict", "--split", "validation", "--dataset", "synthetic-scenes", "--dry-run"]) == 0
    assert "base_size: 640" in capsys.readouterr().out  # --method pass: no PiCIE layers
    assert main(["picie", "train", "--dataset", "synthetic-scenes", "--dry-run", "notakey"]) == 2
    assert "override 'notakey' is not of the form key=value" in capsys.readouterr().err


def test_predict_refuses_a_dataset_without_the_pixel_protocol(tmp_path, capsys):
    from lussray.cli import main

    assert main(["predict", "--method", "picie", "--split", "validation", "--data", str(tmp_path), "--run",
                 str(tmp_path / "run")]) == 2
    assert "pixel protocol" in capsys.readouterr().err
