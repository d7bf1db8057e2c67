"""``lussray synth``: write a synthetic ImageNet-S tree (``lussray.data.synthetic``) or, with
``--kind scenes``, a generated scene-centric dataset (``lussray.data.synthetic_scenes``).

Run::

    lussray synth --out data/synth-demo                     # the sizes of config.synth
    lussray synth --out data/synth-bench --classes 50 --train-per-class 100 --size 256 --workers 8
    lussray synth --dataset synthetic-scenes --out data/synth-scenes        # synth.kind: scenes
    lussray synth --kind scenes --out data/scenes --train-images 2000 --size 256 --workers 8

Every flag left out takes its value from ``synth`` in the resolved config (``--dataset``,
``--config``, ``synth.key=value`` overrides). Rerunning into a complete folder with the same
arguments does nothing.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from lussray.config import LussConfig
from lussray.data import synthetic_scenes
from lussray.data.synthetic import MANIFEST_NAME, SynthArguments, default_workers, existing_manifest, generate_dataset
from lussray.errors import UserError

# each one a flag and a config.synth key
_DATA_FLAGS = tuple(field.name for field in fields(SynthArguments))
_SCENE_FLAGS = tuple(field.name for field in fields(synthetic_scenes.SceneArguments))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``lussray synth``; each data flag defaults to the config's ``synth`` value."""
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to create (new, or empty)")
    parser.add_argument("--classes", type=int, metavar="N", help="number of categories (<= 999)")
    parser.add_argument("--train-per-class", type=int, metavar="N", help="train images per class (no ground truth)")
    parser.add_argument("--val-per-class", type=int, metavar="N", help="validation images per class")
    parser.add_argument("--test-per-class", type=int, metavar="N", help="test images per class")
    parser.add_argument("--semi-per-class", type=int, metavar="N",
                        help="train images per class copied to train-semi/ with ground truth")
    parser.add_argument("--size", type=int, metavar="PX", help="image side in pixels (square images)")
    parser.add_argument("--seed", type=int, metavar="S", help="dataset seed: same seed and sizes, same bytes")
    parser.add_argument("--min-area", type=float, metavar="F",
                        help="smallest area fraction of the main object, up to 0.7 (generator default 0.02)")
    parser.add_argument("--background-contrast", type=float, metavar="C",
                        help="contrast of the background textures in [0, 1] (generator default 1; 0: flat colours)")
    parser.add_argument("--background-pool-size", type=int, metavar="N",
                        help="background styles shared by all images (generator default 32; 0: a new style per image)")
    parser.add_argument("--background-saturation", type=float, metavar="S",
                        help="saturation of the background colours in [0, 1] (generator default 1; 0: grey)")
    scenes = parser.add_argument_group("--kind scenes")
    scenes.add_argument("--kind", choices=("objects", "scenes"),
                        help="objects: an ImageNet-S tree; scenes: stuff regions + thing objects (default: synth.kind)")
    scenes.add_argument("--thing-classes", type=int, metavar="T", help="thing classes, ids 0..T-1 (default 6)")
    scenes.add_argument("--stuff-classes", type=int, metavar="S", help="stuff classes, ids T..T+S-1 (default 6)")
    scenes.add_argument("--train-images", type=int, metavar="N", help="train images (labelled)")
    scenes.add_argument("--val-images", type=int, metavar="N", help="validation images")
    parser.add_argument("--workers", type=int, metavar="W",
                        help="worker processes (default: one per core, at most 8); the output does not depend on it")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _values(args: argparse.Namespace, config: LussConfig, names: tuple[str, ...], other: tuple[str, ...],
            kind: str) -> dict:
    """The flag or config value of each of ``names``; a flag of the other kind is an error."""
    given = [name for name in other if name not in names and getattr(args, name) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UserError(f"{flags} does not apply to --kind {kind}")
    return {name: getattr(args, name) if getattr(args, name) is not None else getattr(config.synth, name)
            for name in names}


def _run_scenes(args: argparse.Namespace, config: LussConfig) -> int:
    values = _values(args, config, _SCENE_FLAGS, _DATA_FLAGS, "scenes")
    arguments = synthetic_scenes.SceneArguments(**values)
    arguments.validate()
    if existing_manifest(args.out, arguments, synthetic_scenes.GENERATOR, synthetic_scenes.GENERATOR_VERSION):
        print(f"synth: {args.out} is already complete ({MANIFEST_NAME} has the same arguments); nothing to do")
        return 0
    workers = args.workers if args.workers is not None else default_workers()
    manifest = synthetic_scenes.generate_scenes(args.out, **values, workers=workers, log=_log)
    counts = ", ".join(f"{split} {count}" for split, count in manifest["counts"].items())
    print(f"synth: wrote {args.out} ({counts}; {manifest['num_classes']} classes)")
    return 0


def run(args: argparse.Namespace, config: LussConfig) -> int:
    """Generate the dataset, or report that ``--out`` already holds it."""
    if (args.kind or config.synth.kind) == "scenes":
        return _run_scenes(args, config)
    values = _values(args, config, _DATA_FLAGS, _SCENE_FLAGS, "objects")
    arguments = SynthArguments(**values)
    arguments.validate()
    existing = existing_manifest(args.out, arguments)
    if existing is not None:
        print(f"synth: {args.out} is already complete ({MANIFEST_NAME} has the same arguments); nothing to do")
        return 0
    workers = args.workers if args.workers is not None else default_workers()
    manifest = generate_dataset(args.out, **values, workers=workers, log=_log)
    counts = ", ".join(f"{split} {count}" for split, count in manifest["counts"].items())
    print(f"synth: wrote {args.out} ({counts})")
    return 0
