import pytest
import torch

from lussray.models.pass_model import PASSModel, resolution_groups




B, FEAT, HIDDEN, K, G = 4, 32, 64, 20, 7


def _inputs(seed=0, grid_size=G):
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(B, 3, s, s, generator=generator) for s in (96, 96, 48, 48)]
    grids = tuple(torch.rand(B, grid_size, grid_size, 2, generator=generator) * 2 - 1 for _ in range(2))
    return views, grids


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PASSModel("resnet18", hidden_dim=HIDDEN, feat_dim=FEAT, num_prototypes=K, shallow_stages=(3,))


def test_forward_shapes(model):
    views, grids = _inputs()
    out = model(views, grids)
    assert len(out.embeddings) == len(out.scores) == 4
    assert all(e.shape == (B, FEAT) for e in out.embeddings)
    assert all(s.shape == (B, K) for s in out.scores)
    torch.testing.assert_close(torch.cat(out.embeddings).norm(dim=1), torch.ones(4 * B))
    assert [z.shape for z in out.pixel_projections] == [(B, FEAT, G, G)] * 2
    assert [p.shape for p in out.pixel_predictions] == [(B, FEAT, G, G)] * 2
    assert list(out.shallow_logits) == [3] and [t.shape for t in out.shallow_logits[3]] == [(B, K)] * 2


def test_scores_are_embeddings_against_prototypes(model):
    views, _ = _inputs(1)
    out = model(views)
    assert out.pixel_projections is None
    torch.testing.assert_close(out.scores[2], out.embeddings[2] @ model.prototypes.weight.t())


def test_stage_widths_follow_the_backbone():
    r18 = PASSModel("resnet18", hidden_dim=8, feat_dim=4, num_prototypes=3, shallow_stages=(1, 2, 3))
    assert [r18.shallow_heads[s].pixel[0].in_channels for s in ("1", "2", "3")] == [64, 128, 256]


def test_forward_has_no_side_effect_on_prototypes(model):
    before = model.prototypes.weight.detach().clone()
    model(_inputs(2)[0])
    assert torch.equal(model.prototypes.weight, before)


def test_resolution_groups():
    views = [torch.zeros(1, 3, s, s) for s in (8, 8, 4, 4, 4, 8)]
    assert resolution_groups(views) == [(0, 2), (2, 5), (5, 6)]
    with pytest.raises(ValueError):
        resolution_groups([])


def test_needs_two_global_views(model):
    views = [torch.randn(2, 3, 64, 64)] + [torch.randn(2, 3, 32, 32)] * 2
    with pytest.raises(ValueError):
        model(views)


def test_bad_shallow_stages():
    with pytest.raises(ValueError):
        PASSModel("resnet18", hidden_dim=8, feat_dim=4, num_prototypes=3, shallow_stages=(4,))
