"""tools/gpu_check.py: the toy-size CPU run covers every section without Ray, faiss or omegaconf."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.py"
BLOCKED = ("ray", "omegaconf", "faiss")  # what the lent GPU machine lacks


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


def _expected_sections() -> set[str]:
    names = {f"{kind}_{preset}_{dtype}" for kind in ("pass", "attention", "finetune") for preset in ("s50", "s919")
             for dtype in ("bf16", "fp16")}
    return names | {"distributed", "kmeans", "jpeg_decode", "inference_s50", "inference_s919", "imports"}


def _numbers(tree, path=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _numbers(value, f"{path}[{index}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


@pytest.fixture
def in_process(monkeypatch):
    """For ``main()`` in this process: other tests import omegaconf here, and ``--cpu`` sets one torch thread."""
    monkeypatch.setattr(gpu_check, "FORBIDDEN_MODULES", ())
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    """One ``--cpu`` run in a subprocess where importing Ray, faiss or omegaconf fails."""
    folder = tmp_path_factory.mktemp("gpu_check")
    for name in BLOCKED:  # shadow the installed packages, as on the GPU machine
        (folder / "blocked" / name).mkdir(parents=True)
        (folder / "blocked" / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder / "blocked"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", "tmp.json"], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=300)
    return result, folder / "tmp.json"


@pytest.mark.slow
def test_cpu_run_has_every_section_with_finite_numbers(cpu_report):
    result, out = cpu_report
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(result.stdout.strip().splitlines()[-1]) == report  # the JSON is the last stdout line
    assert report["mode"] == "cpu-toy" and report["failed"] == []
    assert set(report["sections"]) == _expected_sections()
    for name, section in report["sections"].items():
        assert section["ok"] is True, (name, section.get("error"))
    bad = [(path, value) for path, value in _numbers(report) if not math.isfinite(value)]
    assert not bad


@pytest.mark.slow
def test_cpu_run_figures_are_measured(cpu_report):
    sections = json.loads(cpu_report[1].read_text())["sections"]
    for name, section in sections.items():
        if name.split("_")[0] in ("pass", "attention", "finetune"):
            assert section["images_per_s"] > 0 and section["step_ms"] > 0 and section["peak_memory_mb"] > 0, name
            assert ("grad_scale" in section) == name.endswith("fp16"), name  # fp16 runs the GradScaler
    distributed = sections["distributed"]
    assert distributed["backend"] == "gloo" and distributed["sinkhorn_max_abs_diff"] <= 1e-6
    assert distributed["ddp_s50_fp16_images_per_s"] > 0
    kmeans = sections["kmeans"]
    assert kmeans["ids_agreement"] == 1.0 and kmeans["counts_equal_block_stats"] is True
    assert kmeans["device_iteration_s"] > 0 and kmeans["cpu_torch_iteration_s"] > 0
    assert sections["jpeg_decode"]["device_images_per_s"] > 0 and sections["jpeg_decode"]["mean_abs_diff_vs_pil"] <= 3
    for preset in ("s50", "s919"):
        assert sections[f"inference_{preset}"]["embed_fp32_images_per_s"] > 0
    assert "Traceback" not in cpu_report[0].stderr


def test_a_failing_section_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch, capsys, in_process):
    def boom():
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(gpu_check, "sections", lambda device, sizes, presets: [("broken", boom),
                                                                               ("fine", lambda: {"x_ms": 1.5})])
    out = tmp_path / "report.json"
    assert gpu_check.main(["--cpu", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["failed"] == ["broken"]
    assert report["sections"]["broken"]["error"] == "RuntimeError: CUDA error: out of memory"
    assert report["sections"]["fine"] == {"ok": True, "x_ms": 1.5, "seconds": pytest.approx(0, abs=1)}
    assert report["sections"]["imports"]["ok"] is True
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report


def test_sections_past_the_budget_are_skipped_as_failures(tmp_path, monkeypatch, in_process):
    monkeypatch.setattr(gpu_check, "sections", lambda device, sizes, presets: [("late", lambda: {"x": 1.0})])
    out = tmp_path / "report.json"
    assert gpu_check.main(["--cpu", "--out", str(out), "--budget-s", "-1"]) == 1
    assert json.loads(out.read_text())["sections"]["late"]["error"].startswith("skipped")


@pytest.mark.parametrize("preset", gpu_check.PRESETS, ids=lambda p: p.name)
def test_presets_match_the_published_configs(preset):
    from lussray.config import load_config
    from lussray.stages.pretrain import queue_length_per_worker

    config = load_config(f"imagenet-{preset.name}")
    pre, att, loop = config.pretrain, config.attention, config.pretrain.loop
    assert (pre.arch, pre.hidden_mlp, pre.num_prototypes, pre.feat_dim) == (
        preset.arch, preset.hidden_mlp, preset.num_prototypes, gpu_check.FEAT_DIM)
    assert (tuple(pre.crops.num_crops), tuple(pre.crops.crop_sizes)) == (preset.num_crops, preset.crop_sizes)
    assert (pre.crops.min_scales[0], pre.crops.max_scales[0]) == preset.global_scale
    assert (pre.shallow_stages, pre.loss_weights, pre.p2p_grid_size) == ([3], [1.0, 1.0], gpu_check.P2P_GRID_SIZE)
    assert (pre.temperature, pre.sinkhorn_epsilon, pre.sinkhorn_iterations) == (0.1, 0.05, 3)  # PASSMethod defaults
    assert (att.crops.num_crops, att.crops.crop_sizes) == ([2], [preset.crop_sizes[0]])
    assert (pre.queue_length, att.queue_length) == (preset.queue_length, preset.attention_queue_length)
    assert (loop.batch_size_per_worker, loop.num_workers) == (preset.batch_size, gpu_check.NUM_WORKERS)
    assert (loop.base_lr, att.loop.base_lr, config.finetune.loop.base_lr) == (
        preset.pretrain_lr, preset.attention_lr, preset.finetune_lr)
    assert loop.weight_decay == gpu_check.WEIGHT_DECAY
    assert config.dataset.num_classes == config.labelgen.num_clusters == preset.num_classes
    assert (config.labelgen.batch_size, config.ingest.eval_short_side) == (preset.labelgen_batch_size,
                                                                           preset.eval_short_side)
    for length in (preset.queue_length, preset.attention_queue_length):
        global_batch = preset.batch_size * gpu_check.NUM_WORKERS
        assert preset.queue_per_worker(length) == queue_length_per_worker(length, global_batch, gpu_check.NUM_WORKERS)


def test_normalize_is_the_pretraining_normalisation():
    from lussray.data.augment import MULTICROP_STD
    from lussray.stages.pretrain import normalize_views

    views = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    assert torch.equal(gpu_check.normalize(views, MULTICROP_STD), normalize_views(views))


def test_only_runs_the_named_sections(tmp_path, monkeypatch, in_process):
    monkeypatch.setattr(gpu_check, "sections", lambda device, sizes, presets: [("kmeans", lambda: {"x": 1.0}),
                                                                               ("pass_s50_bf16", lambda: {"y": 2.0})])
    out = tmp_path / "report.json"
    assert gpu_check.main(["--cpu", "--out", str(out), "--only", "pass_,nothing"]) == 0
    assert list(json.loads(out.read_text())["sections"]) == ["pass_s50_bf16", "imports"]


def test_imports_check_fails_on_a_forbidden_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", object())
    with pytest.raises(ImportError, match="faiss"):
        gpu_check.imports_section()
