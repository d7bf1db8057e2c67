import pytest
import torch

from lussray.methods.queue import FeatureQueue


def _batch(value, batch=2, crops=2, dim=3):
    return torch.full((crops, batch, dim), float(value))


def test_fifo_order_and_filled():
    queue = FeatureQueue(num_assign_crops=2, length_per_worker=4, feat_dim=3, start_epoch=1)
    assert not queue.active(0) and queue.active(1)
    queue.push(_batch(1))
    assert not queue.filled and not queue.usable(1)
    queue.push(_batch(2))
    assert queue.filled and queue.usable(1) and not queue.usable(0)
    queue.push(_batch(3))
    # newest rows first, the oldest batch dropped
    assert queue.embeddings[:, :, 0].tolist() == [[3, 3, 2, 2]] * 2


def test_push_larger_than_queue_keeps_the_first_rows():
    queue = FeatureQueue(1, 2, 1)
    queue.push(torch.arange(5.0).view(1, 5, 1))
    assert queue.embeddings.flatten().tolist() == [0, 1] and queue.filled


def test_state_dict_round_trip():
    queue = FeatureQueue(2, 4, 3)
    queue.push(torch.randn(2, 2, 3))
    state = queue.state_dict()
    assert set(state) == {"embeddings", "num_pushed"}
    restored = FeatureQueue(2, 4, 3)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.embeddings, queue.embeddings)
    assert int(restored.num_pushed) == 2 and not restored.filled
    restored.push(torch.randn(2, 2, 3))
    assert restored.filled


def test_disabled_queue():
    queue = FeatureQueue(2, 0, 3)
    queue.push(_batch(1))
    assert not queue.active(100) and not queue.usable(100)


def test_shape_checks():
    with pytest.raises(ValueError):
        FeatureQueue(2, 4, 3).push(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError):
        FeatureQueue(0, 4, 3)
