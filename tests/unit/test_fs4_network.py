"""FS^4's network: PanopticFPN (+ CAE) with the CAM head; shapes, gradients, the checkpoint record round trip."""

import pytest
import torch

from lussray.data.augment import IMAGENET_MEAN, IMAGENET_STD
from lussray.models.fpn import PanopticFPN
from lussray.models.fs4_heads import ClassicalCAMHead, ModifiedCAMHead
from lussray.models.fs4_network import FS4Network, build_fs4_network, record_kwargs


def _network(cae: bool, head: str = "modified") -> FS4Network:
    torch.manual_seed(0)
    return build_fs4_network(PanopticFPN("resnet18", 16), num_global_clusters=5, cam_head=head, cae=cae)


@pytest.mark.parametrize("cae, stride", [(False, 4), (True, 8)])
@pytest.mark.parametrize("head, kind", [("modified", ModifiedCAMHead), ("classical", ClassicalCAMHead)])
def test_features_and_scores_shapes_and_gradients(cae, stride, head, kind):
    network = _network(cae, head)
    assert isinstance(network.cam_head, kind) and (network.cae is not None) == cae
    images = torch.randn(2, 3, 64, 64)
    features, scores = network(images, with_scores=True)
    assert features.shape == (2, 16, 64 // stride, 64 // stride) and scores.shape == (2, 5)
    assert torch.equal(network(images), features)  # without scores: F alone, as PiCIE's network
    (features.mean() + scores.logsumexp(1).mean()).backward()
    assert all(p.grad is not None for p in network.parameters())  # backbone, FPN, CAE, CAM head all trained


def test_cae_sees_raw_colours_in_unit_range():
    network = _network(cae=True)
    seen = {}
    network.cae.register_forward_hook(lambda module, args, out: seen.setdefault("image", args[1]))
    rgb = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    network((rgb - mean) / std)
    torch.testing.assert_close(seen["image"], rgb)


def test_the_record_rebuilds_the_same_state_dict_keys():
    from lussray.stages.picie import network_from_record

    kwargs = {"num_global_clusters": 5, "cam_head": "classical", "cam_hidden_channels": None, "cae": True,
              "cae_chunk_bytes": 2**20}
    built = build_fs4_network(PanopticFPN("resnet18", 16), **kwargs)
    rebuilt = network_from_record({"arch": "resnet18", "width": 16, "fs4": {**kwargs, "unknown": 1}})
    assert record_kwargs({**kwargs, "unknown": 1}) == kwargs
    assert built.state_dict().keys() == rebuilt.state_dict().keys()
    assert isinstance(network_from_record({"arch": "resnet18", "width": 16}), PanopticFPN)
