"""ResNet backbones that return the output of every stage.

PASS pretrains a ResNet (R18 for ImageNet-S50, R50 for S300/S919) and reads the outputs of
``layer1``..``layer4`` (called c1..c4 here): c4 feeds the image and pixel branches, the shallow
stages (c3 by default) feed the deep-to-shallow supervision.

The reference (SwAV's ``src/resnet.py``, reused by PASS) pads the input with
``ConstantPad2d(1)`` and then runs a 7x7 stride-2 convolution with padding 2. That is the same
function as torchvision's convolution with padding 3, so lussray builds the plain torchvision
ResNet (``weights=None``) and SwAV/PASS ``conv1`` weights load unchanged. torchvision initialises
convolutions with ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` and BatchNorm with
weight 1 and bias 0, as the reference does. Average pooling and the classifier are not built.

References:
    - [0]: PASS / ImageNet-S, "Large-scale Unsupervised Semantic Segmentation", TPAMI 2022,
      arXiv:2106.03149.
    - [1]: SwAV, 2020, arXiv:2006.09882.
"""

from __future__ import annotations

from torch import Tensor, nn

#: Names of the stage outputs, shallowest first; stage ``s`` (1..4) is ``f"c{s}"``.
STAGES = ("c1", "c2", "c3", "c4")

#: Architectures that can be built (torchvision constructors).
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _out_channels(layer: nn.Module) -> int:
    # The last convolution of a residual stage produces its output width (conv2 of a
    # BasicBlock, conv3 of a Bottleneck, or the downsample of the first block: all equal).
    convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].out_channels)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without avgpool/fc that returns the four stage outputs.

    Submodule names are torchvision's (``conv1``, ``bn1``, ``layer1``..``layer4``), so a
    torchvision or SwAV/PASS backbone state dict maps onto it by prefix only.

    Attributes:
        arch: The architecture name.
        num_features: Channels of each stage output, e.g. ``{"c1": 64, ..., "c4": 512}`` for R18
            and ``{"c1": 256, "c2": 512, "c3": 1024, "c4": 2048}`` for R50.
    """

    def __init__(self, arch: str = "resnet50", zero_init_residual: bool = False) -> None:
        """Build the backbone with random weights.

        Args:
            arch: One of :data:`ARCHS`.
            zero_init_residual: Zero the last BN of each residual branch (the reference keeps the
                default, False).

        Raises:
            ValueError: If ``arch`` is not supported.
        """
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
        # Imported here: torchvision's package import pulls in torch._dynamo (seconds), which
        # processes that only import the blocks (Ray Data tasks, the CLI) do not need.
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
        self.arch = arch
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        self.num_features: dict[str, int] = {
            name: _out_channels(layer)
            for name, layer in zip(STAGES, (self.layer1, self.layer2, self.layer3, self.layer4))
        }

    @property
    def out_channels(self) -> int:
        """Channels of the last stage (512 for R18, 2048 for R50)."""
        return self.num_features["c4"]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Run the network.

        Args:
            x: Normalised images, (B, 3, H, W).

        Returns:
            ``{"c1": (B, C1, H/4, W/4), "c2": (B, C2, H/8, W/8), "c3": (B, C3, H/16, W/16),
            "c4": (B, C4, H/32, W/32)}`` (sizes rounded up by the strided convolutions).
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return {"c1": c1, "c2": c2, "c3": c3, "c4": c4}


def stage_name(stage: int) -> str:
    """The output name of a 1-based stage index (``3 -> "c3"``).

    Raises:
        ValueError: If ``stage`` is not in 1..4.
    """
    if stage not in (1, 2, 3, 4):
        raise ValueError(f"stage must be 1..4, got {stage}")
    return f"c{stage}"


__all__ = ["ARCHS", "STAGES", "ResNetBackbone", "stage_name"]
