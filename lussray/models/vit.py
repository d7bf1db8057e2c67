"""Frozen featurizers for STEGO and HP: DINO ViTs loaded from a file, and lussray's stage-1 ResNet.

Every featurizer maps normalised images (B, 3, H, W) to a :class:`FeaturizerOutput`: dense
features at stride 8, (B, C, H/8, W/8), plus, when asked, a patch-to-patch affinity (B, N, N),
N = H/8 * W/8, that HP's local hidden positives propagate along (section 3.4 of [0]).

**DINO ViT-S/8 and ViT-B/8** ([1]) are timm's ``VisionTransformer`` (``pretrained=False``, never
a download), whose parameter names are those of DINO's release files (``cls_token``,
``pos_embed``, ``patch_embed.proj.*``, ``blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``,
``norm.*``). Weights come from a user-supplied file (:meth:`DinoViTFeaturizer.load_checkpoint`,
``torch.load(weights_only=True)``): a release file (``dino_deitsmall8_300ep_pretrain.pth``,
``dino_vitbase8_pretrain.pth``) or a state dict extracted from a training checkpoint (its
``teacher`` entry, ``module.``/``backbone.`` prefixes stripped, the DINO ``head.*`` ignored).

- Features: the last block's tokens after the final LayerNorm, CLS removed, as STEGO's and HP's
  ``DinoFeaturizer`` (``dino_feat_type: feat``).
- Patch affinity: the last block's *pre-softmax* attention scores ``q k^T / sqrt(d)``, averaged
  over heads, CLS row and column removed. HP's ``get_intermediate_feat`` returns exactly these
  (its attention hook is taken before the softmax) and HP then clamps, softmaxes and thresholds
  them (:func:`lussray.methods.hp.local_positive_weights`). The head mean equals one product of the
  concatenated queries and keys divided by the number of heads, so no (B, heads, T, T) tensor is
  built.
- CLS attention: the post-softmax attention of the CLS token to every patch, per head,
  (B, heads, H/8, W/8) (DINO's attention maps), for inspection.
- Position embeddings at another resolution than 224 are interpolated as DINO's
  ``interpolate_pos_encoding`` does (bicubic with ``scale_factor = (n + 0.1) / 28``, no
  antialiasing), not with timm's ``resample_abs_pos_embed`` (antialiased bicubic to the size), so
  a 320 crop sees the reference's embeddings.

**lussray's ResNet** (the PASS stage-1 backbone, ``lussray.models.backbone``) is the featurizer
when no DINO file is given (:class:`ResNetFeaturizer`): c4 upsampled x4 (stride 32 -> 8, as PASS's
pixel-attention path, ``lussray.models.pass_model.upsample_features``). A ResNet has no
attention, so **the cosine affinity of its L2-normalised features, divided by
``affinity_temperature``, stands in for the attention scores** wherever a method needs them
(HP's local hidden positives); ``cls_attention`` is None. The temperature (0.1 by default) brings
cosines in [-1, 1] to the range of ViT attention scores before HP's softmax; it is lussray's
choice, there is no reference value. BatchNorm runs in eval mode (running statistics): the
featurizer is frozen.

References:
    - [0]: HP, "Leveraging Hidden Positives for Unsupervised Semantic Segmentation", CVPR 2023.
    - [1]: DINO, "Emerging Properties in Self-Supervised Vision Transformers", 2021,
      arXiv:2104.14294.
    - [2]: STEGO, "Unsupervised Semantic Segmentation by Distilling Feature Correspondences",
      ICLR 2022.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
from typing import IO, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lussray.errors import UserError
from lussray.models.backbone import ARCHS as RESNET_ARCHS
from lussray.models.backbone import ResNetBackbone
from lussray.models.checkpoints import LUSSRAY_PREFIXES, LoadReport, load_pretrained, translate_key
from lussray.models.pass_model import upsample_features

#: DINO architectures: name -> (embed_dim, depth, num_heads); MLP ratio 4, qkv bias, LayerNorm eps 1e-6.
DINO_ARCHS: dict[str, tuple[int, int, int]] = {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}

#: Training resolution of the DINO releases; the position embeddings hold (224 / patch)^2 + 1 rows.
DINO_IMG_SIZE = 224

#: Names accepted by :func:`build_featurizer`.
FEATURIZERS = (*DINO_ARCHS, *RESNET_ARCHS)

#: Prefixes stripped from DINO training-checkpoint keys (DDP, then the multi-crop wrapper).
_DINO_PREFIXES = ("module.", "backbone.")


class FeaturizerOutput(NamedTuple):
    """What a frozen featurizer returns (a NamedTuple, so ``torch.utils._pytree`` sees its tensors).

    Attributes:
        features: Dense features, (B, C, h, w), h = H / stride, w = W / stride.
        patch_affinity: Patch-to-patch scores, (B, h*w, h*w) float32, rows and columns in raster
            order (row-major over (h, w)); None when not requested.
        cls_attention: CLS-to-patch softmax attention of the last block per head,
            (B, heads, h, w); None for the ResNet or when not requested.
    """

    features: Tensor
    patch_affinity: Tensor | None
    cls_attention: Tensor | None


def interpolate_pos_embed(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """The position embeddings for a ``grid`` of patches, interpolated as DINO does.

    Args:
        pos_embed: (1, 1 + S*S, C): the CLS entry, then an S x S grid in raster order.
        grid: (rows, cols) of the input's patch grid.

    Returns:
        (1, 1 + rows*cols, C); ``pos_embed`` itself when the grid is the stored square one.
    """
    rows, cols = grid
    stored = pos_embed.shape[1] - 1
    side = int(math.sqrt(stored))
    if rows * cols == stored and rows == cols:
        return pos_embed
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    # DINO adds 0.1 so that floor(side * scale) lands on the wanted size (dino issue #8).
    patch = F.interpolate(patch, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
    patch = patch.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat((pos_embed[:, :1], patch), dim=1)


def _freeze(module: nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    module.eval()


def _torch_load(path: str | os.PathLike[str] | IO[bytes]) -> Any:
    name = getattr(path, "name", None) or str(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise UserError(f"featurizer checkpoint not found: {name}") from err
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise UserError(
            f"cannot read featurizer checkpoint {name} with torch.load(weights_only=True): {err}. "
            "A DINO training checkpoint holds non-tensor entries (its 'args'); save its 'teacher' "
            "state dict alone, or use a release file such as dino_deitsmall8_300ep_pretrain.pth"
        ) from err


def read_dino_state_dict(path: str | os.PathLike[str] | IO[bytes]) -> tuple[dict[str, Tensor], list[str]]:
    """Read a DINO backbone state dict from a release file or an extracted training checkpoint.

    Accepted layouts: a plain state dict (the release files), or a dict with a ``teacher``
    (preferred, as DINO's evaluation scripts), ``student``, ``state_dict`` or ``model`` entry.
    ``module.`` and ``backbone.`` prefixes are stripped; the DINO projection head (``head.*``) is
    dropped.

    Args:
        path: Local path or binary file object.

    Returns:
        ``(state_dict, ignored)``: the backbone tensors and the keys dropped on purpose.

    Raises:
        UserError: If the file cannot be read safely or holds no state dict.
    """
    name = getattr(path, "name", None) or str(path)
    obj = _torch_load(path)
    state: Any = obj
    if isinstance(obj, dict):
        for entry in ("teacher", "student", "state_dict", "model"):
            if isinstance(obj.get(entry), dict):
                state = obj[entry]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{name} holds no state dict (expected name -> tensor, or a 'teacher' entry)")
    cleaned: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in state.items():
        short = key
        for prefix in _DINO_PREFIXES:
            if short.startswith(prefix):
                short = short[len(prefix) :]
        if short.startswith("head."):
            ignored.append(key)
        else:
            cleaned[short] = value
    return cleaned, ignored


def infer_dino_arch(state: dict[str, Tensor], name: str = "the checkpoint") -> tuple[str, int]:
    """The DINO architecture and patch size of a backbone state dict, from its shapes.

    The width (``pos_embed``'s last dimension: 384 ViT-S, 768 ViT-B) names the architecture and
    ``patch_embed.proj.weight`` (C, 3, p, p) the patch size; the number of heads is not in the
    shapes, so only DINO's two released widths are accepted.

    Args:
        state: A state dict from :func:`read_dino_state_dict`.
        name: The file, for messages.

    Returns:
        ``(arch, patch_size)``, e.g. ``("vit_small", 8)``.

    Raises:
        UserError: If the entries are missing or the width is not ViT-S's or ViT-B's.
    """
    pos_embed, patch = state.get("pos_embed"), state.get("patch_embed.proj.weight")
    if pos_embed is None or patch is None or patch.ndim != 4:
        raise UserError(f"{name} has no DINO ViT pos_embed / patch_embed.proj.weight: not a DINO ViT checkpoint")
    width = int(pos_embed.shape[-1])
    arch = next((arch for arch, (dim, _, _) in DINO_ARCHS.items() if dim == width), None)
    if arch is None:
        known = ", ".join(f"{arch} {dim}" for arch, (dim, _, _) in DINO_ARCHS.items())
        raise UserError(f"{name}: a ViT of width {width}; the DINO featurizers are {known}")
    return arch, int(patch.shape[-1])


class DinoViTFeaturizer(nn.Module):
    """A frozen DINO ViT (timm ``VisionTransformer``) returning stride-``patch_size`` features.

    Attributes:
        vit: The timm model; its ``state_dict`` keys are DINO's.
        arch: The architecture name (or ``"custom"``).
        stride: The patch size (8 for ViT-S/8 and ViT-B/8).
        num_features: Feature channels C (384 for ViT-S, 768 for ViT-B).
        num_heads: Attention heads of the last block.
    """

    def __init__(
        self,
        arch: str = "vit_small",
        patch_size: int = 8,
        *,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        img_size: int = DINO_IMG_SIZE,
    ) -> None:
        """Build the ViT with random weights (no download; load a file with :meth:`load_checkpoint`).

        Args:
            arch: ``"vit_small"`` or ``"vit_base"``; ignored when ``embed_dim``, ``depth`` and
                ``num_heads`` are all given (tiny test models).
            patch_size: Patch size (8 for the STEGO/HP models).
            embed_dim: Override of the architecture's width.
            depth: Override of the number of blocks.
            num_heads: Override of the number of heads.
            img_size: Resolution the position embeddings are stored for (224 for DINO's files).

        Raises:
            ValueError: If ``arch`` is unknown and no full override is given.
        """
        super().__init__()
        if None in (embed_dim, depth, num_heads) and arch not in DINO_ARCHS:
            raise ValueError(f"unknown ViT arch {arch!r}; expected one of {tuple(DINO_ARCHS)}")
        default = DINO_ARCHS.get(arch, (0, 0, 0))
        width = embed_dim or default[0]
        blocks = depth or default[1]
        heads = num_heads or default[2]
        # Imported here: timm pulls in torchvision and huggingface_hub (seconds), which processes
        # that only import the blocks do not need.
        from timm.models.vision_transformer import VisionTransformer

        self.vit = VisionTransformer(
            img_size=img_size, patch_size=patch_size, embed_dim=width, depth=blocks, num_heads=heads,
            mlp_ratio=4.0, qkv_bias=True, num_classes=0, global_pool="token", class_token=True,
            dynamic_img_size=True,
        )
        self.arch = arch if embed_dim is None and depth is None and num_heads is None else "custom"
        self.stride = patch_size
        self.num_features = width
        self.num_heads = heads
        _freeze(self.vit)

    def train(self, mode: bool = True) -> DinoViTFeaturizer:
        """Keep the frozen ViT in eval mode whatever the caller asks (no dropout, as the reference)."""
        super().train(mode)
        self.vit.eval()
        return self

    def _tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        if images.shape[-2] % self.stride or images.shape[-1] % self.stride:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {self.stride}")
        x = self.vit.patch_embed(images)
        grid = (images.shape[-2] // self.stride, images.shape[-1] // self.stride)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = torch.cat((self.vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.vit.pos_drop(x + interpolate_pos_embed(self.vit.pos_embed, grid))
        return self.vit.norm_pre(self.vit.patch_drop(x)), grid

    def _last_attention(self, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Head-mean pre-softmax patch scores and per-head CLS softmax attention of the last block."""
        attn = self.vit.blocks[-1].attn
        batch, tokens, _ = x.shape
        qkv = attn.qkv(self.vit.blocks[-1].norm1(x))
        qkv = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]).float(), attn.k_norm(qkv[1]).float()  # (B, heads, T, d)
        # sum_h q_h k_h^T is one product over the concatenated head dimensions.
        q_all = q.transpose(1, 2).reshape(batch, tokens, -1)
        k_all = k.transpose(1, 2).reshape(batch, tokens, -1)
        scores = torch.bmm(q_all[:, 1:], k_all[:, 1:].transpose(1, 2)) * (attn.scale / attn.num_heads)
        cls = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0, 1:]
        return scores, cls.reshape(batch, attn.num_heads, *grid)

    @torch.no_grad()
    def forward(self, images: Tensor, attention: bool = True) -> FeaturizerOutput:
        """Features (and the last block's attention) of normalised images.

        Args:
            images: (B, 3, H, W), H and W multiples of the patch size, ImageNet-normalised.
            attention: Also return ``patch_affinity`` and ``cls_attention``.

        Returns:
            A :class:`FeaturizerOutput`; features (B, C, H/p, W/p).

        Raises:
            ValueError: If H or W is not a multiple of the patch size.
        """
        x, grid = self._tokens(images)
        for block in self.vit.blocks[:-1]:
            x = block(x)
        scores = cls = None
        if attention:
            scores, cls = self._last_attention(x, grid)
        x = self.vit.norm(self.vit.blocks[-1](x))
        features = x[:, 1:].transpose(1, 2).reshape(x.shape[0], x.shape[-1], *grid)
        return FeaturizerOutput(features, scores, cls)

    def load_checkpoint(self, path: str | os.PathLike[str] | IO[bytes], *, strict: bool = False) -> LoadReport:
        """Load DINO weights from a file (see :func:`read_dino_state_dict`).

        Args:
            path: Local path or binary file object.
            strict: Raise unless every ViT key is loaded and every file key is used.

        Returns:
            A :class:`~lussray.models.checkpoints.LoadReport` (``source_format="dino"``), keys
            named as in the ViT (DINO's names).

        Raises:
            UserError: If the file cannot be read, no key matches, or ``strict`` fails.
        """
        name = getattr(path, "name", None) or str(path)
        state, ignored = read_dino_state_dict(path)
        own = self.vit.state_dict()
        to_load = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        unexpected = sorted(k for k in state if k not in own)
        mismatched = sorted(f"{k}: {tuple(v.shape)} != {tuple(own[k].shape)}"
                            for k, v in state.items() if k in own and own[k].shape != v.shape)
        if not to_load:
            raise UserError(f"{name}: none of its {len(state)} keys matches a DINO ViT (first keys: {list(state)[:5]})")
        missing = sorted(k for k in own if k not in to_load)
        report = LoadReport(name, "dino", sorted(to_load), missing, unexpected, mismatched, sorted(ignored))
        if strict and (missing or unexpected or mismatched):
            raise UserError(f"{name} does not match the {self.arch} ViT exactly: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}, mismatched {mismatched[:5]}")
        self.vit.load_state_dict(to_load, strict=False)
        return report


def cosine_affinity(features: Tensor, temperature: float = 1.0) -> Tensor:
    """Patch-to-patch cosine similarity divided by ``temperature``.

    Args:
        features: (B, C, h, w).
        temperature: Divisor of the cosines.

    Returns:
        (B, h*w, h*w) float32, raster order.
    """
    flat = F.normalize(features.float().flatten(2), dim=1)
    return torch.bmm(flat.transpose(1, 2), flat) / temperature


class ResNetFeaturizer(nn.Module):
    """lussray's frozen ResNet (PASS stage 1) as a stride-8 featurizer; cosine affinity as attention.

    Attributes:
        backbone: :class:`~lussray.models.backbone.ResNetBackbone` (frozen, eval mode).
        stride: 32 / upsample (8).
        num_features: c4 channels (512 for R18, 2048 for R50).
        affinity_temperature: Divisor of the cosines in ``patch_affinity``.
    """

    def __init__(self, arch: str = "resnet18", *, upsample: int = 4, affinity_temperature: float = 0.1) -> None:
        """Build the backbone with random weights (load with :meth:`load_checkpoint`).

        Args:
            arch: A torchvision ResNet name (:data:`lussray.models.backbone.ARCHS`).
            upsample: Bilinear upsampling of c4 (4: stride 32 -> 8, the PASS attention path).
            affinity_temperature: The cosine affinity is divided by it (see the module docstring).

        Raises:
            ValueError: If ``arch`` is unknown or ``affinity_temperature`` is not positive.
        """
        super().__init__()
        if affinity_temperature <= 0:
            raise ValueError(f"affinity_temperature must be positive, got {affinity_temperature}")
        self.backbone = ResNetBackbone(arch)
        self.upsample = upsample
        self.stride = 32 // upsample
        self.num_features = self.backbone.out_channels
        self.affinity_temperature = affinity_temperature
        _freeze(self.backbone)

    def train(self, mode: bool = True) -> ResNetFeaturizer:
        """Keep the frozen backbone in eval mode (BatchNorm on running statistics)."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def forward(self, images: Tensor, attention: bool = True) -> FeaturizerOutput:
        """Upsampled c4 features and their cosine affinity.

        Args:
            images: (B, 3, H, W), ImageNet-normalised.
            attention: Also return ``patch_affinity``.

        Returns:
            A :class:`FeaturizerOutput` with ``cls_attention`` None.
        """
        features = upsample_features(self.backbone(images)["c4"], self.upsample)
        affinity = cosine_affinity(features, self.affinity_temperature) if attention else None
        return FeaturizerOutput(features, affinity, None)

    def load_checkpoint(self, path: str | os.PathLike[str] | IO[bytes], *, strict: bool = False) -> LoadReport:
        """Load the backbone from a lussray, PASS/SwAV or torchvision checkpoint.

        Head weights in the file (projection head, prototypes, ...) are reported as ignored,
        not unexpected: only the backbone is a featurizer.

        Args:
            path: Checkpoint file (``lussray.models.checkpoints`` layouts).
            strict: Raise unless every backbone key is loaded.

        Returns:
            The :class:`~lussray.models.checkpoints.LoadReport`.

        Raises:
            UserError: If the file cannot be read, no key matches, or ``strict`` fails.
        """
        report = load_pretrained(self, path)
        heads = tuple(p for p in LUSSRAY_PREFIXES if p != "backbone.")
        ignored = [k for k in report.unexpected if (translate_key(k) or "").startswith(heads)]
        report = dataclasses.replace(report, unexpected=[k for k in report.unexpected if k not in ignored],
                                     ignored=sorted([*report.ignored, *ignored]))
        if strict and (report.missing or report.unexpected or report.mismatched):
            raise UserError(f"{report.path} does not match the {self.backbone.arch} backbone: missing "
                            f"{report.missing[:5]}, unexpected {report.unexpected[:5]}, "
                            f"mismatched {report.mismatched[:5]}")
        return report


def build_featurizer(
    name: str, checkpoint: str | os.PathLike[str] | None = None, **kwargs: Any
) -> tuple[DinoViTFeaturizer | ResNetFeaturizer, LoadReport | None]:
    """Build a frozen featurizer and load its weights.

    Args:
        name: ``"vit_small"`` / ``"vit_base"`` (DINO ViT, patch 8 unless ``patch_size`` is given)
            or a ResNet arch (``"resnet18"``, ``"resnet50"``, ...).
        checkpoint: The weights file; None keeps random weights (tests only).
        **kwargs: Passed to the featurizer's constructor.

    Returns:
        ``(featurizer, report)``; ``report`` is None without a checkpoint.

    Raises:
        UserError: If ``name`` is unknown or the checkpoint cannot be loaded.
    """
    if name in DINO_ARCHS:
        featurizer: DinoViTFeaturizer | ResNetFeaturizer = DinoViTFeaturizer(name, **kwargs)
    elif name in RESNET_ARCHS:
        featurizer = ResNetFeaturizer(name, **kwargs)
    else:
        raise UserError(f"unknown featurizer {name!r}; expected one of {FEATURIZERS}")
    report = featurizer.load_checkpoint(checkpoint) if checkpoint is not None else None
    return featurizer, report


__all__ = [
    "DINO_ARCHS",
    "FEATURIZERS",
    "DinoViTFeaturizer",
    "FeaturizerOutput",
    "ResNetFeaturizer",
    "build_featurizer",
    "cosine_affinity",
    "infer_dino_arch",
    "interpolate_pos_embed",
    "read_dino_state_dict",
]
