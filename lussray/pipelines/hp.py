"""HP (hidden positives) on scene data: PASS stage 1 (or a DINO file), HP training, the probes.

    lussray run --method hp --dataset synthetic-scenes --data scenes/shards --run runs/hp --baselines
    lussray run --method hp --dataset cocostuff27 --data coco/shards --run runs/hp \\
        --featurizer dino_deitsmall8_300ep_pretrain.pth --crf

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
    Stage("hp", reads="<data>/train shards, the featurizer", writes="hp/checkpoint_step=*/ (heads, EMA head, "
          "per-worker pools)", completion="the final step's checkpoint in Ray Train's record, loadable, same inputs.json"),
    Stage("predict", reads="<data>/validation shards, the hp checkpoint",
          writes="predict/hp/validation-{cluster,cluster-crf,linear}/ (PNGs, summary.json)",
          completion="summary.json written last, same inputs.json"),
)


def run_method(config: LussConfig, data: str, run: str, options: RunOptions, timer: StageTimer) -> MethodResult:
    """Every HP stage, then its baselines when asked for."""
    return run_scene_method("hp", config, data, run, options, timer)
