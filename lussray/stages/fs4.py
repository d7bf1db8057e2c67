"""``lussray fs4 ACTION``: the stages of FS^4 (pseudo labels, training; clustering and prediction are PiCIE's).

    lussray fs4 labels --dataset synthetic-scenes --data demo-out/scene-shards --run demo-out/fs4-run
    lussray fs4 train --dataset synthetic-scenes --data demo-out/scene-shards --run demo-out/fs4-run
    lussray fs4 cluster --dataset synthetic-scenes --data demo-out/scene-shards --run demo-out/fs4-run
    lussray predict --method fs4 --dataset synthetic-scenes --data demo-out/scene-shards --run demo-out/fs4-run \\
        --split validation [--crf]

Actions:

- ``labels``: the pyramid-global-guided pseudo labels (:func:`lussray.stages.fs4_labels.generate`).
- ``train``: FS^4 training on the selected views (:func:`lussray.stages.fs4_train.train`).
- ``cluster``: the final k-means of the trained network's pixel features (PiCIE's,
  :func:`lussray.stages.picie.cluster` with ``stage="fs4"``, into ``<run>/fs4-clusters``).

The command resolves its config with FS^4's method layers (PiCIE's, then ``configs/method/fs4.yaml``
and ``configs/method/fs4/<dataset>.yaml``), as ``lussray run --method fs4`` does.
"""

from __future__ import annotations

import argparse

from lussray import storage
from lussray.config import LussConfig
from lussray.errors import UserError

#: The method whose config layers this command merges (read by ``lussray.cli.config_method``).
CONFIG_METHOD = "fs4"
#: ``lussray fs4 ACTION``: action -> help.
ACTIONS = {"labels": "pyramid-global-guided pseudo labels: six views per image, global k-means, active selection",
           "train": "FS^4 training on the selected views: PiCIE's loss + the global guidance loss, CAE, CAM head",
           "cluster": "the final k-means of a trained FS^4 network's pixel features (PiCIE's)"}


def add_arguments(parser: argparse.ArgumentParser, action: str) -> None:
    """Flags of ``lussray fs4 ACTION``."""
    if action == "labels":
        parser.add_argument("--checkpoint", help="the initial self-supervised model: a SwAV, PASS or MoCo-v2 ResNet "
                            "file (default: the latest stage-1 checkpoint under <run>/pretrain)")
    elif action == "train":
        parser.add_argument("--init", metavar="CHECKPOINT",
                            help="the backbone, a lussray or torchvision checkpoint or 'random' (default: the "
                            "latest PASS stage-1 checkpoint under <run>/pretrain, the labels' initial model)")
        parser.add_argument("--max-steps", type=int, help="stop after this many steps (checkpointing first)")
    else:
        parser.add_argument("--checkpoint", help="the FS^4 checkpoint (default: the latest under <run>/fs4)")
        parser.add_argument("--out", metavar="DIR", help="the output folder (default <run>/fs4-clusters)")


def run(args: argparse.Namespace, config: LussConfig) -> int:
    """Run the action for ``--data`` into ``--run``."""
    from lussray.stages import fs4_labels, fs4_train, picie

    if not args.data or not args.run:
        raise UserError("--data DIR (shards of `lussray prepare`) and --run DIR are required")
    data, run_root = storage.absolute(args.data), storage.absolute(args.run)
    if args.action == "labels":
        fs4_labels.generate(config, data, run_root,
                            checkpoint=storage.absolute(args.checkpoint) if args.checkpoint else None,
                            overwrite=args.overwrite)
    elif args.action == "train":
        init = args.init if args.init in (None, "random") else storage.absolute(args.init)
        fs4_train.train(config, run_root, init=init, max_steps=args.max_steps, overwrite=args.overwrite)
    else:
        picie.cluster(config, data, run_root, checkpoint=storage.absolute(args.checkpoint) if args.checkpoint else None,
                      out=storage.absolute(args.out) if args.out else None, overwrite=args.overwrite,
                      stage=fs4_train.STAGE)
    return 0
