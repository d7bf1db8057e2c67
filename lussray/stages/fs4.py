"""``lussray fs4 ACTION``: the stages of FS^4 that are its own (the training stage extends PiCIE's).

    lussray fs4 labels --dataset synthetic-scenes --data demo-out/scene-shards --run demo-out/fs4-run

Actions:

- ``labels``: the pyramid-global-guided pseudo labels (:func:`lussray.stages.fs4_labels.generate`).

The command resolves its config with FS^4's method layers (``configs/method/fs4.yaml`` and
``configs/method/fs4/<dataset>.yaml``), as ``lussray run --method fs4`` will.
"""

from __future__ import annotations

import argparse

from lussray import storage
from lussray.config import LussConfig
from lussray.errors import UserError

#: The method whose config layers this command merges (read by ``lussray.cli.config_method``).
CONFIG_METHOD = "fs4"
#: ``lussray fs4 ACTION``: action -> help.
ACTIONS = {"labels": "pyramid-global-guided pseudo labels: six views per image, global k-means, active selection"}


def add_arguments(parser: argparse.ArgumentParser, action: str) -> None:
    """Flags of ``lussray fs4 ACTION``."""
    parser.add_argument("--checkpoint", help="the initial self-supervised model: a SwAV, PASS or MoCo-v2 ResNet file "
                        "(default: the latest stage-1 checkpoint under <run>/pretrain)")


def run(args: argparse.Namespace, config: LussConfig) -> int:
    """Run the action for ``--data`` into ``--run``."""
    from lussray.stages import fs4_labels

    if not args.data or not args.run:
        raise UserError("--data DIR (shards of `lussray prepare`) and --run DIR are required")
    fs4_labels.generate(config, storage.absolute(args.data), storage.absolute(args.run),
                        checkpoint=storage.absolute(args.checkpoint) if args.checkpoint else None,
                        overwrite=args.overwrite)
    return 0
