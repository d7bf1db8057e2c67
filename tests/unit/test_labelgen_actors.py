"""The labelgen actors' own parts, in one process: the prefetch thread, batched pixel maps, the pool's figures."""

import threading
import time

import numpy as np
import pytest
import torch

from lussray.stages.labelgen import PoolStats, prefetched


def test_labelgen_batches_give_the_pixel_maps_of_one_image_at_a_time(tmp_path):
    from lussray.models.pass_model import PixelAttentionModel
    from lussray.stages.labelgen import LabelShards

    torch.manual_seed(0)
    model = {"arch": "resnet18", "hidden_dim": 16, "feat_dim": 8, "num_prototypes": 4, "shallow_stages": ()}
    torch.save({"model": PixelAttentionModel(**model).state_dict()}, tmp_path / "attention.pt")
    labeller = LabelShards(str(tmp_path / "attention.pt"), {**model, "shallow_stages": []}, 32, 1,
                           centroids=np.random.default_rng(0).standard_normal((3, 512)), tau=0.5, num_classes=3,
                           score_scale="absolute", batch_size=8)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in [(40, 52, 3), (48, 48, 3), (40, 52, 3),
                                                                          (33, 64, 3), (48, 48, 3)]]
    batched = labeller.pixel_maps_batch(images)
    for image, (ids, scores) in zip(images, batched):
        alone_ids, alone_scores = labeller.pixel_maps_batch([image])[0]
        assert ids.shape == scores.shape == image.shape[:2]
        assert (ids == alone_ids).mean() > 0.99  # batched convolutions may round differently: rare ties flip
        np.testing.assert_allclose(scores, alone_scores, atol=1e-5)


def test_prefetched_keeps_the_order_and_runs_ahead_in_a_thread():
    produced = []

    def items():
        for i in range(5):
            produced.append((i, threading.current_thread().name))
            yield i

    stream = prefetched(items(), 2)
    assert next(stream) == 0
    deadline = time.time() + 10
    while len(produced) < 3 and time.time() < deadline:  # up to 2 more wait in the queue
        time.sleep(0.01)
    assert [i for i, _ in produced[:3]] == [0, 1, 2] and produced[0][1] == "lussray-prefetch"
    assert list(stream) == [1, 2, 3, 4]


def test_prefetched_raises_the_producers_error_and_stops_it_when_closed():
    def failing():
        yield 1
        raise ValueError("bad shard")

    stream = prefetched(failing(), 2)
    assert next(stream) == 1
    with pytest.raises(ValueError, match="bad shard"):
        next(stream)
    endless = prefetched(iter(range(10**9)), 2)
    assert next(endless) == 0
    endless.close()  # joins the producer: it stops instead of filling the queue for ever
    assert not any(t.name == "lussray-prefetch" for t in threading.enumerate())


def test_pool_stats_separate_start_up_from_the_steady_rate():
    stats = PoolStats()
    start = stats.started
    row = {"forward_s": 0.8, "input_wait_s": 0.1, "write_s": 0.05, "decode_s": 0.3, "num_images": 100}
    for pid, began in ((1, start + 10), (2, start + 12)):  # two actors up after 10 and 12 s
        for shard in range(3):
            stats.add({**row, "pid": pid, "began": began + shard, "ended": began + shard + 1, "ready_at": began - 1})
    figures = stats.summary()
    assert figures["actors"] == 2 and figures["images"] == 600 and figures["startup_s"] == 12.0
    assert figures["ready_s"] == 11.0
    assert figures["steady_images_per_s"] == pytest.approx(200.0)  # each actor: 300 images in 3 s
    assert figures["shares"] == pytest.approx({"forward": 0.8, "input_wait": 0.1, "write": 0.05, "other": 0.05})
    assert figures["decode_share"] == pytest.approx(0.3)
    assert PoolStats().summary() == {}
