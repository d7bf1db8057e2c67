"""tools/seeds.py: steps run once and are skipped on a rerun, the table's statistics and checks (no Ray)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("seeds_tool", ROOT / "tools" / "seeds.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["seeds_tool"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


seeds = _load_script()


def _counting_step(tmp_path: Path, name: str = "count", code: str = "") -> "seeds.Step":
    """A step that appends a line to calls.txt and writes its result file."""
    result = tmp_path / f"{name}.out"
    script = (f"from pathlib import Path; Path({str(tmp_path / 'calls.txt')!r}).open('a').write('x\\n'); {code}"
              f"Path({str(result)!r}).write_text('done')")
    return seeds.Step(name, (sys.executable, "-c", script), result)


def _calls(tmp_path: Path) -> int:
    path = tmp_path / "calls.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_finished_step_is_skipped_and_other_arguments_run_again(tmp_path):
    step = _counting_step(tmp_path)
    record = seeds.run_step(step, tmp_path)
    assert _calls(tmp_path) == 1 and record["args"] == list(step.args)
    assert json.loads((tmp_path / "steps" / "count.json").read_text())["args"] == list(step.args)
    seeds.run_step(step, tmp_path)
    assert _calls(tmp_path) == 1  # recorded with the same arguments: not started again
    changed = seeds.Step(step.name, (*step.args[:-1], step.args[-1] + "; 1"), step.result)
    seeds.run_step(changed, tmp_path)
    assert _calls(tmp_path) == 2
    step.result.unlink()  # the record alone is not enough
    seeds.run_step(changed, tmp_path)
    assert _calls(tmp_path) == 3


def test_a_failing_step_stops_with_its_status_and_log(tmp_path, capsys):
    step = seeds.Step("fails", (sys.executable, "-c", "print('boom'); raise SystemExit(3)"), tmp_path / "never")
    with pytest.raises(SystemExit) as stopped:
        seeds.run_step(step, tmp_path)
    assert stopped.value.code == 3
    error = capsys.readouterr().err
    assert "boom" in error and str(tmp_path / "logs" / "fails.log") in error
    assert not (tmp_path / "steps" / "fails.json").exists()


def test_a_ray_start_timeout_is_retried(tmp_path):
    marker = tmp_path / "started-once"
    code = (f"import sys; m = Path({str(marker)!r})\n"
            f"if not m.exists(): m.write_text(''); print({seeds.RAY_START_TIMEOUT!r}); sys.exit(1)\n")
    step = _counting_step(tmp_path, "flaky", code)
    seeds.run_step(step, tmp_path, retries=1)
    assert _calls(tmp_path) == 2 and step.result.exists()


def _rows(pipeline: float, baseline: float, pretrained: float, random: float) -> dict:
    def metrics(value):
        return {"mIoU": value, "Acc": value + 10, "F": value + 5}

    return {"pipeline": metrics(pipeline), "baseline: all_other": {"mIoU": 11.6, "Acc": 0.0, "F": 0.0},
            "baseline: random_backbone": metrics(baseline), "distmatch, pretrained": metrics(pretrained),
            "distmatch, random": metrics(random), "semisup, pretrained": metrics(pretrained),
            "semisup, random": metrics(random)}


def test_statistics_over_seeds():
    rows = seeds.aggregate({0: _rows(30, 20, 50, 40), 1: _rows(40, 25, 60, 45), 2: _rows(35, 15, 55, 42)})
    assert rows["pipeline"]["mIoU"] == {"mean": 35.0, "min": 30, "max": 40, "values": [30, 40, 35]}
    assert rows["baseline: random_backbone"]["Acc"]["mean"] == 30.0
    assert "pipeline" in seeds.table(rows, [0, 1, 2]).splitlines()[2]


def test_checks_name_every_row_that_is_not_beaten_on_every_seed():
    verdict = seeds.checks({0: _rows(30, 20, 50, 40), 1: _rows(40, 41, 60, 60)})
    assert verdict["pipeline_beats_every_baseline"][0] == [] and verdict["pretrained_beats_random"][0] == []
    assert verdict["pipeline_beats_every_baseline"][1] == [
        "baseline: random_backbone mIoU 41 >= 40", "baseline: random_backbone Acc 51 >= 50",
        "baseline: random_backbone F 46 >= 45"]
    assert len(verdict["pretrained_beats_random"][1]) == 6  # a tie is not a win, on both protocols
    assert not verdict["all_pass"]
    assert seeds.checks({0: _rows(30, 20, 50, 40)})["all_pass"]


def test_synth_classes_also_sets_the_dataset_classes():
    assert seeds.with_class_count(["synth.classes=8", "synth.size=160"]) == [
        "synth.classes=8", "synth.size=160", "dataset.num_classes=8"]
    assert seeds.with_class_count(["synth.classes=8", "dataset.num_classes=8"]) == [
        "synth.classes=8", "dataset.num_classes=8"]
    assert seeds.with_class_count([]) == []


def test_a_scene_method_runs_its_pipeline_alone_and_is_checked_on_its_own_metrics(tmp_path):
    steps = seeds.seed_steps(tmp_path, 3, ("--dataset", "synthetic-scenes"), False, method="picie")
    assert [step.name for step in steps] == ["run"]
    assert steps[0].args[3:6] == ("run", "--method", "picie") and steps[0].args[-1] == "seed=3"
    run = tmp_path / "seed-3"
    run.mkdir()
    pixel = {"mIoU": 30.0, "Acc": 60.0, "matching": "hungarian"}  # no F in the pixel protocol
    (run / "metrics.json").write_text(json.dumps({
        "method": "picie", "metrics": {"picie": pixel},
        "baselines": {"random_backbone": {"mIoU": 20.0, "Acc": 61.0}, "initial_kmeans": {"mIoU": 10.0, "Acc": 40.0}}}))
    rows = seeds.seed_rows(tmp_path, 3)
    assert rows == {"picie": {"mIoU": 30.0, "Acc": 60.0}, "baseline: random_backbone": {"mIoU": 20.0, "Acc": 61.0},
                    "baseline: initial_kmeans": {"mIoU": 10.0, "Acc": 40.0}}
    verdict = seeds.checks({3: rows})
    assert verdict["pipeline_beats_every_baseline"][3] == ["baseline: random_backbone Acc 61.0 >= 60.0"]
    assert verdict["pretrained_beats_random"][3] == [] and not verdict["all_pass"]
    assert seeds.markdown(seeds.aggregate({3: rows})).splitlines()[0] == "| row | mIoU | Acc |"
