"""Distance matching blocks: instance embeddings and the weighted kNN vote."""

import math

import pytest
import torch

from lussray.methods.knn import dense_features, instance_embeddings, knn_vote


def _slow_vote(pixels, bank, labels, num_labels, k, temperature):
    """Float64 transcription of the DINO-style weighted vote, one pixel at a time."""
    bank = bank.double() / bank.double().norm(dim=1, keepdim=True)
    out = []
    for p in pixels.double():
        p = p / p.norm()
        sims = [(float(p @ b), int(y)) for b, y in zip(bank, labels)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_labels
        for sim, y in sims[:k]:
            votes[y] += math.exp(sim / temperature)
        out.append(max(range(num_labels), key=lambda c: (votes[c], -c)))
    return torch.tensor(out)


@pytest.mark.parametrize("k,temperature,chunk", [(10, 0.07, 1 << 24), (3, 0.5, 7), (100, 0.07, 40)])
def test_knn_vote_matches_transcription(k, temperature, chunk):
    torch.manual_seed(0)
    bank, labels = torch.randn(20, 6), torch.randint(0, 4, (20,))
    pixels = torch.randn(50, 6)
    got = knn_vote(pixels, bank, labels, 4, k=k, temperature=temperature, chunk_elements=chunk)
    assert torch.equal(got, _slow_vote(pixels, bank, labels, 4, k, temperature))


def test_one_hot_features_are_classified_exactly():
    eye = torch.eye(5)
    bank, labels = eye[[0, 1, 2, 3, 4, 2, 2]], torch.tensor([0, 1, 2, 3, 4, 2, 2])
    pixel_labels = torch.randint(0, 5, (200,))
    assert torch.equal(knn_vote(eye[pixel_labels], bank, labels, 5), pixel_labels)


def test_knn_vote_refuses_an_empty_bank():
    with pytest.raises(ValueError):
        knn_vote(torch.randn(3, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 2)


def test_instance_embeddings_mean_over_all_positions_skip_ignore():
    features = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)
    label = torch.zeros(8, 8, dtype=torch.long)  # nearest-resized to 4 x 4 (every other pixel)
    label[:4, :4] = 3
    label[6:, 6:] = 1000
    embeddings, ids = instance_embeddings(features, label)
    assert ids.tolist() == [0, 3]
    small = label[::2, ::2]
    for row, v in enumerate(ids.tolist()):
        mask = (small == v).float()
        assert torch.allclose(embeddings[row], (features * mask).sum((1, 2)) / 16)


def test_dense_features_upsample_by_four():
    assert dense_features(torch.randn(2, 8, 3, 5)).shape == (2, 8, 12, 20)
