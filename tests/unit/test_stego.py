"""STEGO: head, correspondence-distillation loss against a float64 hand computation, probes."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from lussray.methods.stego import (
    CorrespondenceConfig,
    STEGOMethod,
    cluster_probe_loss,
    correlation_loss,
    correspondence_loss,
    derangement,
    linear_probe_loss,
    param_groups,
    tensor_correlation,
)
from lussray.models.stego_head import ClusterProbe, HPHeads, LinearProbe, SegmentationHead, STEGOHeads


def slow_sample(maps, coords):
    """Bilinear sampling, align_corners=True, border padding, written out per point (float64)."""
    batch, channels, height, width = maps.shape
    out = torch.zeros(batch, channels, *coords.shape[1:3], dtype=torch.float64)
    for b, i, j in itertools.product(range(batch), range(coords.shape[1]), range(coords.shape[2])):
        x = min(max((coords[b, i, j, 0].item() + 1) / 2 * (width - 1), 0.0), width - 1)
        y = min(max((coords[b, i, j, 1].item() + 1) / 2 * (height - 1), 0.0), height - 1)
        x0, y0 = int(x), int(y)
        x1, y1 = min(x0 + 1, width - 1), min(y0 + 1, height - 1)
        ax, ay = x - x0, y - y0
        m = maps[b].double()
        out[b, :, i, j] = ((1 - ax) * (1 - ay) * m[:, y0, x0] + ax * (1 - ay) * m[:, y0, x1]
                           + (1 - ax) * ay * m[:, y1, x0] + ax * ay * m[:, y1, x1])
    return out


def slow_correlation_loss(f1, f2, c1, c2, shift, pointwise, zero_clamp, stabilize):
    """Eq. (3) of STEGO entry by entry, float64."""
    batch, _, s1, t1 = f1.shape
    s2, t2 = f2.shape[-2:]
    fd = torch.zeros(batch, s1, t1, s2, t2, dtype=torch.float64)
    cd = torch.zeros_like(fd)
    for b, h, w, i, j in itertools.product(range(batch), range(s1), range(t1), range(s2), range(t2)):
        fd[b, h, w, i, j] = F.cosine_similarity(f1[b, :, h, w].double(), f2[b, :, i, j].double(), dim=0)
        cd[b, h, w, i, j] = F.cosine_similarity(c1[b, :, h, w].double(), c2[b, :, i, j].double(), dim=0)
    if pointwise:
        total = fd.mean()
        fd = fd - fd.mean(dim=(3, 4), keepdim=True)
        fd = fd - fd.mean() + total
    low = 0.0 if zero_clamp else -9999.0
    cd = cd.clamp(min=low)
    if stabilize:
        cd = cd.clamp(max=0.8)
    return -cd * (fd - shift)


def test_tensor_correlation_matches_loop():
    a, b = torch.randn(2, 3, 2, 3), torch.randn(2, 3, 4, 1)
    out = tensor_correlation(a, b)
    assert out.shape == (2, 2, 3, 4, 1)
    assert torch.isclose(out[1, 1, 2, 3, 0], (a[1, :, 1, 2] * b[1, :, 3, 0]).sum())


@pytest.mark.parametrize("pointwise,zero_clamp,stabilize", [(True, True, False), (False, False, False),
                                                            (True, False, True)])
def test_correlation_loss_against_float64(pointwise, zero_clamp, stabilize):
    torch.manual_seed(0)
    f1, f2, c1, c2 = torch.randn(2, 5, 2, 3), torch.randn(2, 5, 3, 2), torch.randn(2, 4, 2, 3), torch.randn(2, 4, 3, 2)
    loss, cd = correlation_loss(f1, f2, c1, c2, 0.3, pointwise=pointwise, zero_clamp=zero_clamp, stabilize=stabilize)
    expected = slow_correlation_loss(f1, f2, c1, c2, 0.3, pointwise, zero_clamp, stabilize)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert cd.shape == (2, 2, 3, 3, 2)


def test_correspondence_loss_against_hand_computation():
    torch.manual_seed(1)
    feats, feats_pos = torch.randn(3, 6, 4, 5), torch.randn(3, 6, 4, 5)
    code, code_pos = torch.randn(3, 4, 4, 5), torch.randn(3, 4, 4, 5)
    coords1, coords2 = torch.rand(3, 2, 2, 2) * 2.2 - 1.1, torch.rand(3, 2, 2, 2) * 2 - 1  # some points past the border
    perms = [torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])]
    cfg = CorrespondenceConfig(pos_intra_shift=0.1, pos_inter_shift=0.2, neg_inter_shift=0.5, pos_intra_weight=0.7,
                               pos_inter_weight=0.3, neg_inter_weight=0.6)
    loss, terms = correspondence_loss(feats, feats_pos, code, code_pos, coords1, coords2, perms, cfg)

    def term(fa, fb, ca, cb, shift):
        return slow_correlation_loss(fa, fb, ca, cb, shift, True, True, False).mean()

    f1, c1 = slow_sample(feats, coords1), slow_sample(code, coords1)
    self_term = term(f1, f1, c1, c1, 0.1)
    knn_term = term(f1, slow_sample(feats_pos, coords2), c1, slow_sample(code_pos, coords2), 0.2)
    random_term = torch.stack([term(f1, slow_sample(feats[p], coords2), c1, slow_sample(code[p], coords2), 0.5)
                               for p in perms]).mean()
    assert abs(terms["loss_self"].item() - self_term.item()) < 1e-5
    assert abs(terms["loss_knn"].item() - knn_term.item()) < 1e-5
    assert abs(terms["loss_random"].item() - random_term.item()) < 1e-5
    assert abs(loss.item() - (0.7 * self_term + 0.3 * knn_term + 0.6 * random_term).item()) < 1e-5


@pytest.mark.parametrize("size", range(2, 9))
def test_derangement_is_a_permutation_without_fixed_points(size):
    generator = torch.Generator().manual_seed(size)
    for _ in range(200):
        perm = derangement(size, generator=generator)
        assert sorted(perm.tolist()) == list(range(size))
        assert not bool((perm == torch.arange(size)).any())


def test_derangement_of_one_is_identity():
    assert derangement(1).tolist() == [0]


def test_head_is_linear_plus_nonlinear_branch():
    torch.manual_seed(0)
    head = SegmentationHead(6, 3).eval()
    features = torch.randn(2, 6, 4, 4)
    expected = head.linear(features) + head.nonlinear(features)
    torch.testing.assert_close(head(features), expected)
    assert SegmentationHead(6, 3, nonlinear=False).nonlinear is None
    head.train()
    assert not torch.equal(head(features), head(features))  # two dropout draws


def test_cluster_probe_cosines_and_loss():
    probe = ClusterProbe(3, 4)
    code = torch.randn(2, 3, 2, 2)
    cos = probe(code)
    i, j = 1, 0
    expected = F.cosine_similarity(code[1, :, i, j], probe.centroids[2], dim=0)
    assert torch.isclose(cos[1, 2, i, j], expected, atol=1e-6)
    assert torch.isclose(cluster_probe_loss(cos), -cos.max(dim=1).values.mean())
    assert torch.allclose(ClusterProbe.log_probs(cos).exp().sum(1), torch.ones(2, 2, 2))


def test_linear_probe_loss_skips_unlabelled_pixels():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.tensor([[[0, -1], [255, 2]]])
    expected = F.cross_entropy(torch.stack([logits[0, :, 0, 0], logits[0, :, 1, 1]]), torch.tensor([0, 2]))
    torch.testing.assert_close(linear_probe_loss(logits, labels), expected)
    empty = linear_probe_loss(logits, torch.full((1, 4, 4), -1))
    assert empty.item() == 0.0 and empty.requires_grad


def test_probes_see_detached_codes():
    heads = STEGOHeads(6, 4, num_classes=3)
    out = heads(torch.randn(2, 6, 3, 3))
    (out.linear_logits.sum() + out.cluster_cosines.sum()).backward()
    assert all(p.grad is None for p in heads.head.parameters())
    assert heads.linear_probe.weight.grad is not None and heads.cluster_probe.centroids.grad is not None


def test_probe_losses_decrease_on_a_separable_problem():
    torch.manual_seed(0)
    centres = torch.randn(3, 8) * 3
    labels = torch.randint(3, (4, 5, 5))
    code = (centres[labels] + 0.1 * torch.randn(4, 5, 5, 8)).permute(0, 3, 1, 2)
    linear, cluster = LinearProbe(8, 3), ClusterProbe(8, 3)
    optimizer = torch.optim.Adam([*linear.parameters(), *cluster.parameters()], lr=5e-2)
    history = []
    for _ in range(15):
        losses = (linear_probe_loss(linear(code), labels), cluster_probe_loss(cluster(code)))
        history.append([x.item() for x in losses])
        optimizer.zero_grad()
        sum(losses).backward()
        optimizer.step()
    assert history[-1][0] < 0.5 * history[0][0]
    assert history[-1][1] < history[0][1] - 0.1


def test_training_step_trains_the_head_with_the_correspondence_loss():
    torch.manual_seed(0)
    heads = STEGOHeads(6, 4, num_classes=3)
    method = STEGOMethod(correspondence=CorrespondenceConfig(feature_samples=3, neg_samples=2))
    features, features_pos = torch.randn(3, 6, 4, 4), torch.randn(3, 6, 4, 4)
    loss, logs = method.training_step(heads, features, features_pos, torch.randint(3, (3, 16, 16)),
                                      generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert set(logs) == {"loss", "loss_corr", "loss_self", "loss_knn", "loss_random", "loss_linear", "loss_cluster"}
    assert abs(logs["loss"] - (logs["loss_corr"] + logs["loss_linear"] + logs["loss_cluster"])) < 1e-5
    assert heads.head.linear.weight.grad.abs().sum() > 0


def test_param_groups_reproduce_the_reference_optimisers():
    heads = HPHeads(6, 4, 3)
    groups = {g["name"]: g for g in param_groups(heads, head_weight_decay=0.1, linear_lr=1e-3)}
    assert groups["head"]["lr"] == 5e-4 and groups["head"]["weight_decay"] == 0.1
    assert groups["linear_probe"]["lr"] == 1e-3 and groups["cluster_probe"]["lr"] == 5e-3
    assert groups["projector"]["weight_decay"] == 0.0
    grouped = {id(p) for g in groups.values() for p in g["params"]}
    assert grouped == {id(p) for p in heads.parameters() if p.requires_grad}
    assert not grouped & {id(p) for p in heads.ema_head.parameters()}
    assert "projector" not in {g["name"] for g in param_groups(STEGOHeads(6, 4, 3))}


def test_center_features_equals_the_loss_of_features_centred_by_the_batch_mean():
    torch.manual_seed(2)
    feats, feats_pos = torch.rand(3, 6, 4, 5) + 1.0, torch.rand(3, 6, 4, 5) + 1.0  # positive, as after a ReLU
    code, code_pos = torch.randn(3, 4, 4, 5), torch.randn(3, 4, 4, 5)
    coords1, coords2 = torch.rand(3, 2, 2, 2) * 2 - 1, torch.rand(3, 2, 2, 2) * 2 - 1
    perms = [torch.tensor([1, 2, 0])]
    mean = feats.mean(dim=(0, 2, 3), keepdim=True)
    centred, _ = correspondence_loss(feats, feats_pos, code, code_pos, coords1, coords2, perms,
                                     CorrespondenceConfig(center_features=True))
    by_hand, _ = correspondence_loss(feats - mean, feats_pos - mean, code, code_pos, coords1, coords2, perms,
                                     CorrespondenceConfig())
    plain, _ = correspondence_loss(feats, feats_pos, code, code_pos, coords1, coords2, perms, CorrespondenceConfig())
    torch.testing.assert_close(centred, by_hand)
    assert abs(centred.item() - plain.item()) > 1e-3
