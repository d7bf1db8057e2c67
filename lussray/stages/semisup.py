"""The semi-supervised protocol: fine-tune on train-semi ground truth, evaluate on validation unmatched.

    lussray semisup --dataset synthetic-demo --data demo-out/shards --run demo-out/run [--init CKPT|random]

The protocol of LUSSeg/ImageNetSegModel (shared/reference/pass-imagenet-s.md, section 5): a
backbone (the latest ``<run>/pretrain`` checkpoint by default, any checkpoint
:func:`~lussray.models.checkpoints.load_pretrained` reads, or ``random``) with a 1x1 head of
N + 1 outputs is fine-tuned on ``train-semi`` with its ground truth (cross-entropy, ignore 1000;
joint RandomResizedCrop with scale (``semisup.min_scale``, 1) + flip) by the fine-tuning method of
:mod:`lussray.stages.finetune` on the shared loop (``<run>/semisup/checkpoint_step=<N>``,
resumable; ``<run>/semisup/inputs.json`` records its inputs, and a rerun with other ones is refused
unless ``--overwrite``). The model then predicts ``validation`` through the pool of
:mod:`lussray.stages.predict` (``<run>/semisup/validation/<wnid>/<name>.png``) and the evaluator scores it **without matching**:
the head's channels are the ground-truth ids. ``<run>/semisup/validation/summary.json`` holds the
metrics.

Deviations from the reference (ImageNetSegModel, written for MAE/ViT backbones): the optimiser is
the LARS + cosine schedule of PASS fine-tuning instead of AdamW with layer-wise lr decay, crops
get no colour jitter or blur, and the loss sees labels at half the crop resolution (the PASS
fine-tuning rule; the reference upsamples the outputs x2 and resizes the labels to them).
"""

from __future__ import annotations

import argparse
import dataclasses

from lussray import storage
from lussray.completion import checkpoint_fingerprint
from lussray.config import LussConfig
from lussray.data.imagenet_s import IGNORE_ID
from lussray.data.shards import read_manifest
from lussray.errors import UserError
from lussray.stages import finetune, predict

STAGE = "semisup"
TRAIN_SPLIT = "train-semi"
EVAL_SPLIT = "validation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lussray semisup``."""
    parser.add_argument("--init", metavar="CHECKPOINT",
                        help="backbone to start from: a lussray, torchvision or PASS/SwAV checkpoint, or "
                        "'random' (default: the latest under <run>/pretrain)")
    parser.add_argument("--max-steps", type=int, help="stop fine-tuning after this many steps")
    parser.add_argument("--out", metavar="DIR", help="prediction folder (default: <run>/semisup/validation)")


def run(args: argparse.Namespace, config: LussConfig) -> int:
    """Fine-tune on train-semi, predict validation, evaluate with ground-truth ids."""
    if not args.data or not args.run:
        raise UserError("--data DIR (shards of `lussray prepare`, with train-semi) and --run DIR are required")
    data, run_root = storage.absolute(args.data), storage.absolute(args.run)
    for split in (TRAIN_SPLIT, EVAL_SPLIT):
        if not read_manifest(data, split).get("has_segmentation"):
            raise UserError(f"{storage.join(data, split)} has no ground truth (seg.png): the protocol needs it")
    init = finetune.init_checkpoint(run_root, args.init)
    finetune.check_backbone(init, config.pretrain.arch)
    num_classes = config.dataset.num_classes
    # The pair pipeline with the protocol's crop scale; the config itself stays untouched.
    ingest = dataclasses.replace(config.ingest, finetune_min_scale=config.semisup.min_scale)
    checkpoint = finetune.train_segmenter(
        config, data, run_root, init, num_outputs=num_classes + 1, ingest=ingest, max_steps=args.max_steps,
        stage=STAGE, split=TRAIN_SPLIT, loop=config.semisup.loop, ignore_index=IGNORE_ID, overwrite=args.overwrite)
    out = storage.absolute(args.out) if args.out else storage.join(run_root, STAGE, EVAL_SPLIT)
    summary = predict.predict_segmenter(config, data, EVAL_SPLIT, out, checkpoint, match=predict.IDENTITY,
                                        stage=STAGE, run=run_root, overwrite=args.overwrite,
                                        inputs={"init": checkpoint_fingerprint(init, run_root) or finetune.RANDOM_INIT})
    if "metrics" in summary:
        print(f"[{STAGE}] validation mIoU {summary['metrics']['mIoU']:.2f} (no matching; backbone "
              f"{init or 'random'})", flush=True)
    return 0
