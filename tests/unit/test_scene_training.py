"""STEGO and HP adapters of the shared loop, single process on fake batches."""

import io

import pytest
import torch
from torch import nn

from lussray.models.pass_model import PASSModel
from lussray.models.vit import FeaturizerOutput
from lussray.stages.featurizer import RESNET, FeaturizerSpec
from lussray.stages.hp import HPAdapter
from lussray.stages.loop import StepState
from lussray.stages.loop import LoopSpec, scheduled_optimizer
from lussray.stages.scene_training import WorkerFeaturizer, adam_groups, constant_factor, step_generator
from lussray.stages.stego import ProbeOnlyAdapter, StegoAdapter

CLASSES, FEAT, DIM = 3, 16, 8
HEADS = {"in_dim": FEAT, "dim": DIM, "num_classes": CLASSES, "extra_clusters": 0, "nonlinear": True, "dropout": 0.0}
RATES = {"head_lr": 5e-3, "linear_lr": 5e-3, "cluster_lr": 5e-3}


class FakeFeaturizer:
    """Fixed features per image (looked up by the image's first pixel) and a cosine affinity."""

    def __init__(self, num_images: int, size: int = 6, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.bank = torch.randn(num_images, FEAT, size, size, generator=generator)

    def __call__(self, images: torch.Tensor, attention: bool = False) -> FeaturizerOutput:
        features = self.bank[images[:, 0, 0, 0].long()]
        flat = nn.functional.normalize(features.flatten(2), dim=1)
        affinity = torch.bmm(flat.transpose(1, 2), flat) / 0.1 if attention else None
        return FeaturizerOutput(features, affinity, None)


def _batch(ids, partner_ids=None, aug_ids=None) -> dict[str, torch.Tensor]:
    def images(index):
        out = torch.zeros(len(index), 48, 48, 3, dtype=torch.uint8)
        out[:, 0, 0, 0] = torch.tensor(index, dtype=torch.uint8)
        return out

    labels = torch.stack([torch.full((48, 48), i % CLASSES, dtype=torch.int32) for i in ids])
    labels[:, :4] = 1000  # an ignored band
    batch = {"image": images(ids), "label": labels}
    if partner_ids is not None:
        batch["image_pos"] = images(partner_ids)
    if aug_ids is not None:
        batch["image_aug"] = images(aug_ids)
    return batch


def _spec() -> FeaturizerSpec:
    return FeaturizerSpec(RESNET, "resnet18", "unused.pt")


def _optimizer(adapter, model):
    """The loop's optimizer of an adapter: its groups, each scaled by the constant schedule factor."""
    spec = LoopSpec(stage="t", method_factory=None, optimizer_factory=adam_groups, lr_at=constant_factor, stream=None,
                    seed=0, run_dir="", batch_size_per_worker=1, steps_per_epoch=1, epochs=1,
                    checkpoint_every_steps=1, log_every_steps=1)
    optimizer = scheduled_optimizer(spec, model, adapter)
    for group in optimizer.param_groups:  # what the loop does before every step
        group["lr"] = constant_factor(0, 1) * group["lr_scale"]
    return optimizer


def _train(adapter, batch, steps: int) -> tuple[nn.Module, list[float]]:
    torch.manual_seed(0)
    model = adapter.build_model()
    optimizer = _optimizer(adapter, model)
    losses = []
    for step in range(steps):
        state = StepState(step, 0, steps, steps)
        adapter.before_step(model, state)
        loss, terms = adapter.training_step(model, batch, state)
        assert torch.isfinite(loss) and all(isinstance(v, float) for v in terms.values())
        optimizer.zero_grad()
        loss.backward()
        adapter.after_backward(model, state)
        optimizer.step()
        losses.append(float(loss.detach()))
    return model, losses


def test_stego_step_is_finite_and_decreases_on_a_tiny_problem():
    adapter = StegoAdapter(_spec(), HEADS, RATES, correspondence={"feature_samples": 5, "neg_samples": 2}, seed=3)
    adapter.features = FakeFeaturizer(4)
    _, losses = _train(adapter, _batch([0, 1, 2, 3], partner_ids=[1, 0, 3, 2]), 40)
    assert losses[-1] < losses[0] - 0.1


def test_stego_probes_send_no_gradient_into_the_head():
    adapter = StegoAdapter(_spec(), HEADS, RATES, correspondence_weight=0.0, seed=3)
    adapter.features = FakeFeaturizer(4)
    model = adapter.build_model()
    loss, _ = adapter.training_step(model, _batch([0, 1, 2, 3], partner_ids=[1, 0, 3, 2]), StepState(0, 0, 1, 1))
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.head.parameters())
    assert model.linear_probe.weight.grad.abs().sum() > 0 and model.cluster_probe.centroids.grad.abs().sum() > 0


def test_stego_draws_are_seeded_by_seed_rank_and_step():
    adapter = StegoAdapter(_spec(), HEADS, RATES, seed=3)
    adapter.features = FakeFeaturizer(4)
    torch.manual_seed(0)
    model = adapter.build_model().eval()
    batch = _batch([0, 1, 2, 3], partner_ids=[1, 0, 3, 2])
    first = adapter.training_step(model, batch, StepState(5, 0, 10, 10))[1]
    assert adapter.training_step(model, batch, StepState(5, 0, 10, 10))[1] == first
    assert adapter.training_step(model, batch, StepState(6, 0, 10, 10))[1]["loss_random"] != first["loss_random"]
    assert not torch.equal(torch.rand(3, generator=step_generator(3, "stego", 0, 5)),
                           torch.rand(3, generator=step_generator(3, "stego", 1, 5)))


def test_hp_step_decreases_updates_the_ema_and_keeps_probes_off_the_head():
    method = {"pool_size": 8, "tau": 0.5, "rho": 0.5, "ema_m": 0.9, "warmup": 2, "renew_interval": 3,
              "gather_distributed": False}
    adapter = HPAdapter(_spec(), HEADS, {**RATES, "head_weight_decay": 0.1}, method=method, total_steps=30, seed=1)
    adapter.features = FakeFeaturizer(8)
    batch = _batch(list(range(8)), aug_ids=list(range(8)))
    model, losses = _train(adapter, batch, 30)
    assert adapter.losses.pools.ready
    assert losses[-1] < losses[3] - 0.05  # once the pools are full the HP term trains
    # one more step, checking the momentum update p_ema <- m p_ema + (1 - m) p of after_backward
    ema_before = [p.clone() for p in model.ema_head.parameters()]
    state = StepState(30, 0, 31, 31)
    loss, _ = adapter.training_step(model, batch, state)
    loss.backward()
    adapter.after_backward(model, state)
    for before, ema, online in zip(ema_before, model.ema_head.parameters(), model.head.parameters()):
        torch.testing.assert_close(ema, 0.9 * before + 0.1 * online.detach())
    # the probes alone put no gradient on the head
    model.zero_grad()
    out = model(adapter.features(batch["image"]).features)
    (out.linear_logits.sum() + out.cluster_cosines.sum()).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.head.parameters())


def test_random_head_baseline_trains_only_the_probes():
    adapter = ProbeOnlyAdapter(_spec(), HEADS, {**RATES, "head_lr": 0.0})
    adapter.features = FakeFeaturizer(4)
    torch.manual_seed(0)  # as the loop, before it builds the model
    head = {k: v.clone() for k, v in adapter.build_model().head.state_dict().items()}
    model, losses = _train(adapter, _batch([0, 1, 2, 3]), 15)
    for name, value in model.head.state_dict().items():
        assert torch.equal(value, head[name])  # the random head, never trained
    assert [g["name"] for g in adapter.param_groups(model)] == ["linear_probe", "cluster_probe"]
    assert losses[-1] < losses[0]


def test_optimizer_groups_keep_their_own_rates_and_weight_decay():
    adapter = HPAdapter(_spec(), HEADS, {"head_lr": 1e-3, "head_weight_decay": 0.1, "linear_lr": 2e-3,
                                         "cluster_lr": 3e-3}, method={"pool_size": 4})
    model = adapter.build_model()
    optimizer = _optimizer(adapter, model)
    rates = {g["name"]: (g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups}
    assert rates == {"head": (1e-3, 0.1, 6), "linear_probe": (2e-3, 0.0, 2), "cluster_probe": (3e-3, 0.0, 1),
                     "projector": (1e-3, 0.0, 2)}
    assert not any(p is q for g in optimizer.param_groups for p in g["params"] for q in model.ema_head.parameters())


def test_worker_featurizer_builds_the_stage1_resnet_from_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = PASSModel("resnet18", hidden_dim=16, feat_dim=8, num_prototypes=4, shallow_stages=())
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "step": 1}, buffer)
    path = tmp_path / "stage1.pt"
    path.write_bytes(buffer.getvalue())
    features = WorkerFeaturizer(FeaturizerSpec(RESNET, "resnet18", str(path), affinity_temperature=0.5))
    out = features(torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8), attention=True)
    assert out.features.shape == (2, 512, 8, 8) and out.patch_affinity.shape == (2, 64, 64)
    assert not any(p.requires_grad for p in features.module.parameters())
    torch.testing.assert_close(out.patch_affinity.diagonal(dim1=1, dim2=2), torch.full((2, 64), 2.0))


def test_each_group_steps_at_its_own_rate():
    adapter = StegoAdapter(_spec(), HEADS, {"head_lr": 1e-3, "linear_lr": 4e-3, "cluster_lr": 0.0})
    model = adapter.build_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = _optimizer(adapter, model)
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()  # Adam's first step moves every weight by lr (sign of a constant gradient)
    moved = {name: float((p.detach() - before[name]).abs().max()) for name, p in model.named_parameters()}
    assert moved["head.linear.weight"] == pytest.approx(1e-3, rel=1e-3)
    assert moved["linear_probe.weight"] == pytest.approx(4e-3, rel=1e-3)
    assert moved["cluster_probe.centroids"] == 0.0


def test_method_configs_reach_the_loss_options():
    from lussray.config import load_config
    from lussray.stages.scene_training import adapter_factory

    for method, key in (("hp", "checkpoint_loss"), ("stego", "center_features")):
        config = load_config("synthetic-scenes", method=method)
        section = getattr(config, method)
        factory = adapter_factory(method, _spec(), HEADS, section, seed=0, stage=method, total_steps=10)
        options = factory.keywords["method"] if method == "hp" else factory.keywords["correspondence"]
        assert options[key] is (method == "stego")  # scenes: STEGO centres, HP does not checkpoint
