"""HP: hidden-positive masks, loss against a float64 transcription, 3x3 propagation, EMA, pools."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lussray.methods.hp import (
    HPMethod,
    ReferencePools,
    consistency_loss,
    denominator_mask,
    gather_rows,
    hidden_positive_lambda,
    hidden_positive_loss,
    hidden_positive_masks,
    keep_at_random,
    local_positive_weights,
    pool_thresholds,
    propagate_local,
    should_renew,
)
from lussray.models.stego_head import HPHeads, ema_update_, flatten_patches


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def brute_force_masks(x, pool):
    """Eqs. (2)-(3) by loops: j is a positive of i if sim > c_i or sim > c_j, j != i."""
    n = x.shape[0]
    c = [max(float(x[i] @ q) for q in pool) for i in range(n)]
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, j in itertools.product(range(n), range(n)):
        sim = float(x[i] @ x[j])
        mask[i, j] = i != j and (sim > c[i] or sim > c[j])
    return mask


def test_masks_match_brute_force_and_are_symmetric():
    torch.manual_seed(0)
    x, pool = unit(12, 3), unit(5, 3)
    c = pool_thresholds(x, pool)
    full = hidden_positive_masks(x @ x.t(), c, c, torch.arange(12))
    assert torch.equal(full, brute_force_masks(x, pool))
    assert torch.equal(full, full.t())
    assert not bool(full.diagonal().any())
    # one image's rows of the batch give the same rows
    rows = hidden_positive_masks(x[4:8] @ x.t(), c[4:8], c, torch.arange(4, 8))
    assert torch.equal(rows, full[4:8])


def test_thresholds_are_the_closest_pool_entry():
    x, pool = unit(7, 4), unit(9, 4)
    expected = torch.tensor([max(float(x[i] @ q) for q in pool) for i in range(7)])
    torch.testing.assert_close(pool_thresholds(x, pool), expected)


def test_denominator_keeps_positives_and_a_fraction_rho_of_the_rest():
    generator = torch.Generator().manual_seed(0)
    positives = torch.rand(200, 1000, generator=generator) < 0.05
    self_index = torch.arange(200) + 300
    is_self = F.one_hot(self_index, 1000).bool()
    kept = denominator_mask(positives, keep_at_random((200, 1000), 0.2, generator=generator), self_index)
    assert bool(kept[positives & ~is_self].all())
    assert not bool(kept[is_self].any())
    others = ~positives & ~is_self
    fraction = kept[others].float().mean().item()
    assert abs(fraction - 0.2) < 0.01  # 190k Bernoulli(0.2) draws: sd ~ 0.001
    assert not bool(denominator_mask(positives, keep_at_random((200, 1000), 0.0), self_index)[others].any())
    assert bool(denominator_mask(positives, keep_at_random((200, 1000), 1.0), self_index)[others].all())


def slow_hp_loss(z, z_mix, f, s, pool_ag, pool_sp, p, lam, tau, rho_all, reweighting):
    """Eqs. (5)-(11) as the reference's loss_version 1, anchor by anchor in float64 (rho 0 or 1)."""
    z, z_mix, f, s = (t.double() for t in (z, z_mix, f, s))
    n = z.shape[0]
    c_ag = [max(float(f[i] @ q) for q in pool_ag.double()) for i in range(n)]
    c_sp = [max(float(s[i] @ q) for q in pool_sp.double()) for i in range(n)]
    total = 0.0
    for b in range(n // p):
        per_anchor = {"z": [], "mix": []}
        weights_sum = []
        for i in range(b * p, (b + 1) * p):
            w, keep, any_ag = [], [], False
            for j in range(n):
                sf, ss = float(f[i] @ f[j]), float(s[i] @ s[j])
                ag = j != i and (sf > c_ag[i] or sf > c_ag[j])
                sp = j != i and (ss > c_sp[i] or ss > c_sp[j])
                w.append(float(ag) + lam * float(sp))
                keep.append(j != i and (ag or rho_all))
                any_ag = any_ag or ag
            if not any_ag:  # anchors without a task-agnostic positive are dropped
                continue
            weights_sum.append(sum(w))
            for name, vectors in (("z", z), ("mix", z_mix)):
                logits = [float(vectors[i] @ vectors[j]) / tau for j in range(n)]
                top = max(logits)
                denominator = sum(torch.exp(torch.tensor(logits[j] - top, dtype=torch.float64)).item()
                                  for j in range(n) if keep[j])
                log_prob = [logits[j] - top - torch.log(torch.tensor(denominator, dtype=torch.float64)).item()
                            for j in range(n)]
                per_anchor[name].append(sum(w[j] * log_prob[j] for j in range(n)) / sum(w))
        if not weights_sum:
            continue
        mean_w = sum(weights_sum) / len(weights_sum)
        for name in ("z", "mix"):
            scale = [ws / mean_w if reweighting else 1.0 for ws in weights_sum]
            terms = [(tau / 0.07) * m * sc for m, sc in zip(per_anchor[name], scale)]
            total += -sum(terms) / len(terms)
    return total / (n // p) / 2


@pytest.mark.parametrize("rho,reweighting,lam", [(0.0, True, 0.3), (1.0, False, 0.0), (1.0, True, 1.0)])
def test_loss_against_float64_transcription(rho, reweighting, lam):
    torch.manual_seed(3)
    images, p = 3, 4
    n = images * p
    z, z_mix, f, s = unit(n, 5), unit(n, 5), unit(n, 3), unit(n, 5)
    pool_ag, pool_sp = unit(6, 3), unit(6, 5)
    loss, stats = hidden_positive_loss(z, z_mix, f, s, pool_ag, pool_sp, patches_per_image=p, lam=lam, tau=0.6,
                                       rho=rho, reweighting=reweighting)
    expected = slow_hp_loss(z, z_mix, f, s, pool_ag, pool_sp, p, lam, 0.6, rho == 1.0, reweighting)
    assert stats["kept_anchors"].item() > 0.3  # the case exercises real anchors
    assert abs(loss.item() - expected) < 1e-4 * max(1.0, abs(expected))


def test_checkpointed_loss_and_gradients_equal_the_plain_ones():
    torch.manual_seed(4)
    inputs = [unit(8, 5), unit(8, 5), unit(8, 3), unit(8, 5), unit(4, 3), unit(4, 5)]
    results = []
    for checkpoint in (True, False):
        z, z_mix = inputs[0].clone().requires_grad_(), inputs[1].clone().requires_grad_()
        loss, _ = hidden_positive_loss(z, z_mix, *inputs[2:], patches_per_image=4, lam=0.4, tau=0.7, rho=0.5,
                                       generator=torch.Generator().manual_seed(9), checkpoint=checkpoint)
        loss.backward()
        results.append((loss.detach(), z.grad, z_mix.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert results[0][1].abs().sum() > 0


def test_loss_gradient_reaches_projections_and_image_without_positives_adds_zero():
    z = unit(8, 4).requires_grad_()
    f = torch.zeros(8, 3)
    f[:, 0] = 1.0  # all features identical ...
    pool = F.one_hot(torch.tensor([0]), 3).float()  # ... and equal to the pool entry: c = 1, no sim > 1
    loss, stats = hidden_positive_loss(z, None, f, unit(8, 4), pool, unit(2, 4), patches_per_image=4, lam=0.5,
                                       tau=0.8, rho=0.5)
    assert loss.item() == 0.0 and stats["kept_anchors"].item() == 0.0
    loss, _ = hidden_positive_loss(z, None, unit(8, 3), unit(8, 4), unit(3, 3), unit(2, 4), patches_per_image=4,
                                   lam=0.5, tau=0.8, rho=0.5)
    loss.backward()
    assert z.grad.abs().sum() > 0


def slow_local_mix(affinity, code, sigma):
    """Eqs. (7)-(9) with an explicit loop over the 3x3 neighbourhood, float64."""
    batch, dim, h, w = code.shape
    out = torch.zeros(batch, dim, h, w, dtype=torch.float64)
    for b in range(batch):
        for i in range(h * w):
            row = affinity[b, i].double()
            row = row.clamp(torch.quantile(row, 0.1).item(), torch.quantile(row, 0.9).item())
            t = row.softmax(0) * sigma
            t = torch.where(t < t.mean(), torch.zeros_like(t), t)
            y, x = divmod(i, w)
            neighbours = [(y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                          if 0 <= y + dy < h and 0 <= x + dx < w]
            acc = torch.zeros(dim, dtype=torch.float64)
            for ny, nx in neighbours:
                acc += t[ny * w + nx] * code[b, :, ny, nx].double()
            out[b, :, y, x] = acc / len(neighbours)
    return out


def test_local_propagation_matches_explicit_3x3_loop():
    torch.manual_seed(0)
    h, w = 4, 5
    affinity = torch.randn(2, h * w, h * w) * 3
    affinity[:, 7, 8] = 50.0  # a strong neighbour
    code = torch.randn(2, 3, h, w)
    weights = local_positive_weights(affinity, h, w, sigma=20.0)
    assert weights.shape == (2, 9, h, w)
    mixed = propagate_local(code, weights)
    torch.testing.assert_close(mixed.double(), slow_local_mix(affinity, code, 20.0), rtol=1e-5, atol=1e-6)
    assert (weights[:, :, 0, 0] == 0).sum() >= 2 * 5  # a corner has only 4 neighbours inside


def test_local_propagation_sends_gradient_to_neighbours():
    affinity = torch.zeros(1, 9, 9)
    affinity[0, 4, 5] = 10.0  # centre patch attends to its right neighbour
    code = torch.randn(1, 2, 3, 3, requires_grad=True)
    mixed = propagate_local(code, local_positive_weights(affinity, 3, 3))
    mixed[0, :, 1, 1].sum().backward()
    assert code.grad[0, :, 1, 2].abs().sum() > 0
    assert code.grad[0, :, 0, 0].abs().sum() == 0


def test_lambda_ramp_after_warmup():
    assert hidden_positive_lambda(0, 10, 110) == 0.0
    assert hidden_positive_lambda(10, 10, 110) == 0.0
    assert hidden_positive_lambda(60, 10, 110) == 0.5
    assert hidden_positive_lambda(500, 10, 110) == 1.0
    assert hidden_positive_lambda(5, 10, 10) == 0.0


def test_should_renew():
    assert [s for s in range(50) if should_renew(s, 20)] == [20, 40]
    assert not should_renew(20, 0)


def test_ema_update_moves_parameters_and_copies_buffers():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    ema = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    online[1].running_mean.fill_(2.0)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update_(ema, online, 0.9)
    for old, new, p in zip(before, ema.parameters(), online.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * p.detach())
    assert torch.equal(ema[1].running_mean, online[1].running_mean)


def test_hp_heads_ema_is_frozen_and_follows_the_head():
    heads = HPHeads(6, 4, 3)
    assert not any(p.requires_grad for p in heads.ema_head.parameters())
    with torch.no_grad():
        heads.head.linear.weight.add_(1.0)
    old = heads.ema_head.linear.weight.clone()
    heads.update_ema(0.99)
    torch.testing.assert_close(heads.ema_head.linear.weight, 0.99 * old + 0.01 * heads.head.linear.weight)


def test_pools_fill_ring_renew_and_survive_state_dict():
    pools = ReferencePools(4, 2, 3)
    pools.push_(unit(3, 2), unit(3, 3))
    assert not pools.ready
    f, s = unit(3, 2), unit(3, 3)
    pools.push_(f, s)
    assert pools.ready and int(pools.num_agnostic) == 4
    torch.testing.assert_close(pools.agnostic[3], f[0])
    assert torch.equal(pools.specific, pools.staging)  # first Q^sp from the same images
    fixed_agnostic = pools.agnostic.clone()
    s2 = unit(6, 3)
    pools.push_(unit(6, 2), s2)
    assert torch.equal(pools.agnostic, fixed_agnostic)  # Q^ag never changes once full
    assert not torch.equal(pools.specific, pools.staging)  # Q^sp waits for the renewal
    assert {tuple(r) for r in pools.staging.tolist()} == {tuple(r) for r in s2[-4:].tolist()}
    pools.renew_()
    assert torch.equal(pools.specific, pools.staging)
    restored = ReferencePools(4, 2, 3)
    restored.load_state_dict(pools.state_dict())
    assert restored.ready and int(restored.num_staged) == 12
    for name in ("agnostic", "specific", "staging"):
        assert torch.equal(getattr(restored, name), getattr(pools, name))


def test_consistency_is_mean_euclidean_distance():
    z, z_aug = unit(5, 3), unit(5, 3)
    expected = torch.stack([torch.linalg.vector_norm(z[i] - z_aug[i] + 1e-6) for i in range(5)]).mean()
    torch.testing.assert_close(consistency_loss(z, z_aug), expected)


def test_gather_rows_without_process_group_is_identity():
    rows = torch.randn(3, 2)
    assert gather_rows(rows, True) is rows


def test_training_steps_fill_pools_then_train_with_hidden_positives():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    heads = HPHeads(6, 4, num_classes=3)
    method = HPMethod(feat_dim=6, dim=4, pool_size=4, tau=0.5, rho=0.5, warmup=1, renew_interval=2)
    logs_seen = []
    for step in range(4):
        method.before_step(heads, step)
        features = torch.randn(2, 6, 3, 3)
        patches = flatten_patches(features).reshape(2, 9, 6)
        affinity = patches @ patches.transpose(1, 2)
        heads.zero_grad()
        loss, logs = method.training_step(heads, features, features + 0.1 * torch.randn_like(features), affinity,
                                          torch.randint(3, (2, 12, 12)), step, 4, generator=generator)
        loss.backward()
        method.after_backward(heads, step)
        logs_seen.append(logs)
        assert torch.isfinite(loss)
    assert [log["pools_ready"] for log in logs_seen] == [0.0, 0.0, 1.0, 1.0]
    assert logs_seen[0]["loss_hp"] == 0.0 and logs_seen[3]["loss_hp"] != 0.0
    assert logs_seen[3]["lambda"] > 0.0
    assert heads.projector.weight.grad.abs().sum() > 0 and heads.head.linear.weight.grad.abs().sum() > 0
    assert {"pools.agnostic", "pools.specific", "pools.staging", "pools.num_agnostic"} <= set(method.state_dict())
