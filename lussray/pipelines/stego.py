"""STEGO on scene data: PASS stage 1 (or a DINO file), KNN pairs, correspondence distillation, the probes.

    lussray run --method stego --dataset synthetic-scenes --data scenes/shards --run runs/stego --baselines
    lussray run --method stego --dataset cocostuff27 --data coco/shards --run runs/stego \\
        --featurizer dino_vitbase8_pretrain.pth --crf

Stages (:data:`STAGES`) and rows: :mod:`lussray.pipelines.scene`.
"""

from __future__ import annotations

from lussray.config import LussConfig
from lussray.pipelines import MethodResult, RunOptions, Stage, StageTimer
from lussray.pipelines.scene import run_scene_method

REPORT = False  # report.html shows PASS's stages; the scene methods' rows are in metrics.json

STAGES: tuple[Stage, ...] = (
    Stage("train", reads="<data>/train shards (only without --featurizer)", writes="pretrain/checkpoint_step=*/",
          completion="the final step's checkpoint in Ray Train's record, loadable, same inputs.json"),
    Stage("knn", reads="<data>/train shards, the featurizer", writes="knn/ (features, items, neighbours per shard)",
          completion="knn/summary.json written last, same inputs.json"),
    Stage("stego", reads="<data>/train shards, knn/, the featurizer", writes="stego/checkpoint_step=*/",
          completion="the final step's checkpoint in Ray Train's record, loadable, same inputs.json"),
    Stage("predict", reads="<data>/validation shards, the stego checkpoint",
          writes="predict/stego/validation-{cluster,cluster-crf,linear}/ (PNGs, summary.json)",
          completion="summary.json written last, same inputs.json"),
)


def run_method(config: LussConfig, data: str, run: str, options: RunOptions, timer: StageTimer) -> MethodResult:
    """Every STEGO stage, then its baselines when asked for."""
    return run_scene_method("stego", config, data, run, options, timer)
