"""Loading initialisation weights from lussray, torchvision and public PASS/SwAV checkpoints.

Three layouts are recognised (always read with ``torch.load(weights_only=True)``):

- lussray's own checkpoints, ``{"model": state_dict, ...}``, keys named after lussray modules;
- a plain torchvision ResNet state dict (``conv1.weight``, ``layer1.0...``; ``fc.*`` is ignored);
- a MoCo (v1/v2) release, ``{"state_dict": ...}`` with the query encoder under ``encoder_q.``: only
  that encoder is read, as a torchvision ResNet (its MLP projector ``fc.*`` is dropped like
  torchvision's classifier; the key encoder ``encoder_k.*`` and the queue are not read);
- the PASS and SwAV releases: a state dict, or ``{"state_dict": state_dict, ...}`` as their
  training scripts save, keys usually prefixed with ``module.`` (DDP). The backbone sits at the top
  level like torchvision's; the heads are ``projection_head.*``, ``prototypes.weight``,
  ``projection_head_pixel.*``, ``predictor_head_pixel.*``, the D2S heads
  ``projection_head_pixel_shallow.projection_head_pixel<s>.*`` and
  ``projection_head_shallow.projection_head_shallow<s>.*`` (also accepted flattened as
  ``projection_head_pixel_shallow<s>.*`` / ``projection_head_shallow<s>.*``), the pixel attention
  ``fbg.atten.*`` / ``fbg.threshold`` and the fine-tuning classifier ``last_layer.*``.

Reference names are translated through the explicit prefix table :data:`KEY_TABLE`; lussray's head
modules keep the reference's layer order, so Sequential indices carry over. SwAV's stem
(ConstantPad2d(1) + conv padding 2) equals torchvision's conv padding 3, so ``conv1`` carries over.
SwAV's projection head lacks PASS's final BN(affine=False): its running statistics then show up as
missing keys and keep their initial values. ``num_batches_tracked`` counters are never reported as
missing (Jittor checkpoints have none, and they only matter for BN momentum=None).

Loading is by name into any lussray module that uses the attribute names ``backbone``,
``projection_head``, ``prototypes``, ``pixel_projection``, ``pixel_predictor``, ``shallow_heads``,
``pixel_attention`` and ``segmentation_head``; keys with a different shape are skipped and reported.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import IO, Any

import torch
from torch import Tensor, nn

from lussray.errors import UserError

log = logging.getLogger(__name__)

#: Top-level module names of lussray models; keys that start with one are already lussray keys.
LUSSRAY_PREFIXES = (
    "backbone.",
    "projection_head.",
    "prototypes.",
    "pixel_projection.",
    "pixel_predictor.",
    "shallow_heads.",
    "pixel_attention.",
    "segmentation_head.",
)

#: Reference key prefix -> lussray key prefix (None: drop the key). Matched from the start of the
#: key, first entry wins; the trailing dots keep ``projection_head.`` apart from
#: ``projection_head_pixel.``.
KEY_TABLE: tuple[tuple[str, str | None], ...] = (
    ("conv1.", "backbone.conv1."),
    ("bn1.", "backbone.bn1."),
    ("layer1.", "backbone.layer1."),
    ("layer2.", "backbone.layer2."),
    ("layer3.", "backbone.layer3."),
    ("layer4.", "backbone.layer4."),
    ("fc.", None),  # torchvision's ImageNet classifier
    ("projection_head_pixel.", "pixel_projection."),
    ("predictor_head_pixel.", "pixel_predictor."),
    ("fbg.atten.", "pixel_attention.layers."),
    ("fbg.threshold", "pixel_attention.offset"),
    ("last_layer.", "segmentation_head."),
)

#: The D2S heads carry the stage number in their name: pattern -> lussray prefix template.
STAGE_KEY_TABLE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"projection_head_pixel_shallow\.projection_head_pixel(\d)\."), "shallow_heads.{}.pixel."),
    (re.compile(r"projection_head_shallow\.projection_head_shallow(\d)\."), "shallow_heads.{}.image."),
    (re.compile(r"projection_head_pixel_shallow(\d)\."), "shallow_heads.{}.pixel."),
    (re.compile(r"projection_head_shallow(\d)\."), "shallow_heads.{}.image."),
)

_DDP_PREFIX = "module."
#: MoCo's query encoder (the network MoCo trains); its key encoder and queue sit beside it.
_MOCO_PREFIX = "encoder_q."


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        path: The file read.
        source_format: ``"lussray"``, ``"pass/swav"``, ``"moco"`` or ``"torchvision"``.
        loaded: Model keys that received a value.
        missing: Model keys the file did not provide (``num_batches_tracked`` excluded).
        unexpected: File keys (translated) that the model does not have.
        mismatched: ``"key: file shape != model shape"`` for keys skipped because of their shape.
        ignored: File keys dropped on purpose (torchvision ``fc.*``).
    """

    path: str
    source_format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"{self.path} ({self.source_format}): loaded {len(self.loaded)}, missing {len(self.missing)}, "
            f"unexpected {len(self.unexpected)}, shape-mismatched {len(self.mismatched)}, ignored {len(self.ignored)}"
        )


def translate_key(key: str) -> str | None:
    """The lussray name of a checkpoint key (``module.`` already stripped); None drops it.

    Args:
        key: A key of a lussray, torchvision, SwAV or PASS state dict.

    Returns:
        The translated key; keys nothing matches are returned unchanged (they will be reported
        as unexpected).
    """
    if key.startswith(LUSSRAY_PREFIXES):
        return key
    for pattern, template in STAGE_KEY_TABLE:
        match = pattern.match(key)
        if match:
            return template.format(match.group(1)) + key[match.end() :]
    for source, target in KEY_TABLE:
        if key.startswith(source):
            return None if target is None else target + key[len(source) :]
    return key


def read_state_dict(path: str | os.PathLike[str] | IO[bytes]) -> tuple[dict[str, Tensor], str]:
    """Read a checkpoint and return its model state dict (``module.`` stripped) and its format.

    Args:
        path: Local path, object-store URI or binary file object.

    Returns:
        ``(state_dict, source_format)``.

    Raises:
        UserError: If the file is missing, cannot be read safely, or holds no state dict.
    """
    name = getattr(path, "name", None) or str(path)
    try:
        if isinstance(path, (str, os.PathLike)) and "://" in str(path):
            from lussray import storage  # pyarrow filesystems, only for object-store URIs

            obj = torch.load(io.BytesIO(storage.read_bytes(str(path))), map_location="cpu", weights_only=True)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise UserError(f"checkpoint not found: {name}") from err
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise UserError(f"cannot read checkpoint {name} with torch.load(weights_only=True): {err}") from err
    source_format = "pass/swav"
    state: Any = obj
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state, source_format = obj["model"], "lussray"
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{name} holds no state dict (expected name -> tensor, a 'model' or a 'state_dict' entry)")
    state = {(k[len(_DDP_PREFIX) :] if k.startswith(_DDP_PREFIX) else k): v for k, v in state.items()}
    if source_format != "lussray" and any(k.startswith(_MOCO_PREFIX) for k in state):
        return {k[len(_MOCO_PREFIX) :]: v for k, v in state.items() if k.startswith(_MOCO_PREFIX)}, "moco"
    if source_format != "lussray":
        if any(k.startswith(LUSSRAY_PREFIXES[0]) for k in state):
            source_format = "lussray"
        elif "fc.weight" in state and not any(k.startswith(("projection_head", "prototypes")) for k in state):
            source_format = "torchvision"
    return state, source_format


def load_pretrained(model: nn.Module, path: str | os.PathLike[str] | IO[bytes], *, strict: bool = False) -> LoadReport:
    """Load initialisation weights into ``model`` by (translated) name.

    Args:
        model: A lussray model (e.g. :class:`~lussray.models.pass_model.PASSModel`), not DDP-wrapped.
        path: Checkpoint file (see the module docstring for the layouts).
        strict: Raise unless every model key is loaded and every file key is used.

    Returns:
        A :class:`LoadReport`.

    Raises:
        UserError: If the file cannot be read, no key matches the model, or ``strict`` fails.
    """
    name = getattr(path, "name", None) or str(path)
    state, source_format = read_state_dict(path)
    own = model.state_dict()
    to_load: dict[str, Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    ignored: list[str] = []
    for key, value in state.items():
        target = translate_key(key)
        if target is None:
            ignored.append(key)
        elif target not in own:
            unexpected.append(key)
        elif own[target].shape != value.shape:
            mismatched.append(f"{target}: {tuple(value.shape)} != {tuple(own[target].shape)}")
        else:
            to_load[target] = value
    if not to_load:
        sample = ", ".join(list(state)[:5])
        raise UserError(f"{name}: none of its {len(state)} keys matches the model (first keys: {sample})")
    missing = [k for k in own if k not in to_load and not k.endswith("num_batches_tracked")]
    report = LoadReport(name, source_format, sorted(to_load), missing, unexpected, mismatched, ignored)
    if strict and (missing or unexpected or mismatched):
        raise UserError(
            f"{name} does not match the model exactly: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"mismatched {mismatched[:5]}"
        )
    model.load_state_dict(to_load, strict=False)
    log.info("%s", report.summary())
    return report
