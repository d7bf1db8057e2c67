"""The ``lussray`` command: one subcommand per pipeline stage.

Every subcommand takes the common flags ``--dataset NAME`` (a preset in configs/dataset/),
``--data DIR`` (the shards folder written by ``lussray prepare``), ``--config FILE`` (an
experiment overriding the preset), ``--run DIR`` (the run folder), ``--dry-run`` (print the
resolved config and stop), ``--overwrite`` (redo a stage whose folder holds outputs of other
inputs instead of refusing; :mod:`lussray.completion`) and trailing ``key=value`` overrides. A
command given ``--run`` holds that folder's lock (``<run>/.lock``) while it runs.

A subcommand lives in the module that owns its concept; the module provides
``add_arguments(parser)`` and ``run(args, config) -> int`` and is imported only when used. A module
with ``ACTIONS`` (``{action: help}``) is a command with actions, ``lussray fs4 labels``: its
``add_arguments(parser, action)`` is called per action, the common flags follow the action, and
``run`` reads it as ``args.action``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lussray.completion import run_lock
from lussray.config import ConfigError, available_datasets, load_config, to_yaml
from lussray.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("lussray.data.synthetic_cli", "generate an ImageNet-S-style dataset with ground truth"),
    "prepare": ("lussray.data.shards", "pack an ImageNet-S folder tree into webdataset shards"),
    "peek": ("lussray.data.ingest", "stream a few batches of a Ray Data pipeline and describe them"),
    "train": ("lussray.stages.pretrain", "stage 1: PASS representation learning on Ray Train"),
    "attention": ("lussray.stages.attention", "stage 2.1: pixel attention on the frozen backbone"),
    "labelgen": ("lussray.stages.labelgen", "stage 2.2-2.4: embeddings, sharded k-means, pseudo labels"),
    "knn": ("lussray.stages.knn", "STEGO's KNN pairs: image-level features (actor pool), sharded top-k search"),
    "finetune": ("lussray.stages.finetune", "stage 4: segmentation fine-tuning on the pseudo labels"),
    "predict": ("lussray.stages.predict", "stage 5: predictions of a split (actor pool), matching, submission"),
    "run": ("lussray.stages.pipeline", "every stage in order (skipping completed ones), metrics, report"),
    "distmatch": ("lussray.stages.distmatch", "distance-matching protocol (kNN on train-semi instances)"),
    "semisup": ("lussray.stages.semisup", "semi-supervised protocol (fine-tune on train-semi ground truth)"),
    "fs4": ("lussray.stages.fs4", "FS^4's own stages: `fs4 labels`, pyramid pseudo labels with active selection"),
    "evaluate": ("lussray.eval.evaluate", "score predictions as the official ImageNet-S evaluator does"),
    "picie": ("lussray.stages.picie", "PiCIE: training with its k-means every epoch (train), the final k-means (cluster)"),
}

# commands whose --method flag chooses the method (and so the config layers)
METHOD_FLAG_COMMANDS = ("run", "predict")


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    common = parser.add_argument_group("common options")
    common.add_argument(
        "--dataset", default="synthetic-demo", metavar="NAME",
        help=f"dataset preset, one of: {', '.join(available_datasets())} (default: synthetic-demo)",
    )
    common.add_argument("--data", metavar="DIR", help="shards folder written by `lussray prepare` (local, s3:// or gs://)")
    common.add_argument("--config", metavar="FILE", help="experiment YAML overriding the dataset preset")
    common.add_argument("--run", metavar="DIR", help="run folder for this stage's outputs")
    common.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    common.add_argument("--overwrite", action="store_true",
                        help="when a stage's folder holds outputs made with other inputs (config, checkpoint, "
                        "data), remove them and redo the stage (default: refuse, naming what differs)")
    common.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. pretrain.loop.epochs=5")


def _action_parsers(parser: argparse.ArgumentParser,
                    actions: dict[str, str] | None) -> list[tuple[str | None, argparse.ArgumentParser]]:
    """``[(None, parser)]``, or ``(action, nested parser)`` per action of a command with actions (``fs4 labels``).

    The module's ``ACTIONS`` maps each action to its help; its ``add_arguments(parser, action)`` adds
    that action's flags; ``run`` reads the action as ``args.action``.
    """
    if not actions:
        return [(None, parser)]
    nested = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    return [(action, nested.add_parser(action, help=text, description=text)) for action, text in actions.items()]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(prog="lussray", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if command in (None, name):
            module = importlib.import_module(module_name)
            for action, command_parser in _action_parsers(sub, getattr(module, "ACTIONS", None)):
                module.add_arguments(command_parser, *([action] if action else []))
                _add_common_arguments(command_parser)
        sub.set_defaults(module_name=module_name)
    return parser


def config_method(args: argparse.Namespace) -> str:
    """The method whose config layers apply: ``--method`` of ``lussray run`` / ``predict``, a method's own
    command's ``CONFIG_METHOD`` (``lussray picie``, ``lussray fs4``), else PASS."""
    from lussray.pipelines import DEFAULT_METHOD, method_module

    if args.command in METHOD_FLAG_COMMANDS:
        name = getattr(args, "method", None) or DEFAULT_METHOD
        method_module(name)  # an unknown or unbuilt method is refused before any config work
        return name
    # a method's own command (``lussray fs4 labels``) resolves with that method's layers
    return getattr(importlib.import_module(args.module_name), "CONFIG_METHOD", DEFAULT_METHOD)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lussray`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((token for token in argv if token in COMMANDS), "")
    parser = build_parser(command)
    # argparse gives a command's own positional (`lussray picie train`) and the trailing overrides
    # in one go, so overrides after an option come back unparsed: they are overrides all the same
    args, extra = parser.parse_known_args(argv)
    unknown = [token for token in extra if token.startswith("-") or "=" not in token]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        config = load_config(args.dataset, args.config, args.overrides, method=config_method(args))
        if args.dry_run:
            print(to_yaml(config), end="")
            return 0
        with run_lock(getattr(args, "run", None), f"lussray {args.command}"):
            return int(importlib.import_module(args.module_name).run(args, config) or 0)
    except (ConfigError, UserError) as error:
        print(f"lussray {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lussray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
