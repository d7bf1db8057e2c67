import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lussray.methods.sinkhorn import sinkhorn
from lussray.methods.swav_loss import SwAVLoss


def _scores(batch, num_prototypes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, num_prototypes, generator=generator) * 2 - 1  # cosine-like


@pytest.mark.parametrize("batch,num_prototypes", [(16, 8), (12, 30), (40, 5)])
@pytest.mark.parametrize("epsilon", [0.05, 0.5])
def test_marginals(batch, num_prototypes, epsilon):
    codes = sinkhorn(_scores(batch, num_prototypes), epsilon=epsilon, num_iters=300)
    q = codes.t() / batch  # the K x B transport plan before the final scaling by B
    torch.testing.assert_close(q.sum(dim=0), torch.full((batch,), 1 / batch))  # samples: exact
    torch.testing.assert_close(q.sum(dim=1), torch.full((num_prototypes,), 1 / num_prototypes), rtol=1e-3, atol=1e-5)


def test_rows_are_distributions_after_three_iterations():
    codes = sinkhorn(_scores(8, 20))
    assert codes.shape == (8, 20) and torch.all(codes >= 0)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(8))


def test_matches_plain_transcription_and_is_shift_invariant():
    scores = _scores(10, 7).double()
    q = torch.exp(scores / 0.05).t()
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(dim=1, keepdim=True) * 7
        q /= q.sum(dim=0, keepdim=True) * 10
    torch.testing.assert_close(sinkhorn(scores, 0.05, 3), (q * 10).t().float())
    torch.testing.assert_close(sinkhorn(scores + 30.0, 0.05, 3), (q * 10).t().float())  # no overflow


def test_flag_without_process_group_is_single_process():
    scores = _scores(6, 4)
    torch.testing.assert_close(sinkhorn(scores, distributed=True), sinkhorn(scores, distributed=False))


def _worker(rank, world_size, init_file, scores, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        local = scores.chunk(world_size)[rank]
        codes = sinkhorn(local, 0.05, 3, distributed=True)
        # SwAV loss gradient of this worker's half: two crops of the same rows, shifted.
        crops = [local.clone().requires_grad_(), (local.flip(1) * 0.5).requires_grad_()]
        loss, _ = SwAVLoss(distributed=True)(crops)
        loss.backward()
        torch.save({"codes": codes, "grads": [c.grad for c in crops]}, f"{result_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_equals_single_process(tmp_path):
    world_size = 2
    scores = _scores(12, 9, seed=3)
    # fork where available: the workers inherit the imported torch instead of importing it
    # again (seconds each on a small machine).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    args = (world_size, str(tmp_path / "init"), scores, str(tmp_path))
    mp.start_processes(_worker, args=args, nprocs=world_size, start_method=method)
    parts = [torch.load(tmp_path / f"{rank}.pt") for rank in range(world_size)]
    torch.testing.assert_close(torch.cat([p["codes"] for p in parts]), sinkhorn(scores, 0.05, 3))

    crops = [scores.clone().requires_grad_(), (scores.flip(1) * 0.5).requires_grad_()]
    loss, _ = SwAVLoss(distributed=False)(crops)
    loss.backward()
    for c, crop in enumerate(crops):
        # DDP averages gradients over workers: mean of the per-worker gradients.
        averaged = torch.cat([p["grads"][c] for p in parts]) / world_size
        torch.testing.assert_close(averaged, crop.grad)
