"""metrics.jsonl across attempts: a resume keeps the rows up to its checkpoint, a restart none."""

import json

from lussray.stages.loop import METRICS_FILE, _MetricsLog


def _row(step: int, **extra) -> dict:
    return {"stage": "s", "step": step, "total_steps": 9, "epoch": 0, "loss": 1.0 / step, **extra}


def _first_attempt(run_dir, steps) -> None:
    log = _MetricsLog(str(run_dir), True)
    for step in steps:
        log.write(_row(step))
    with open(run_dir / METRICS_FILE, "a") as handle:
        handle.write('{"stage": "s", "step": 6, "tot')  # a kill cut the last line short


def _steps(run_dir) -> list:
    rows = map(json.loads, (run_dir / METRICS_FILE).read_text().splitlines())
    return [row.get("event", row["step"]) for row in rows]


def test_a_resume_drops_the_rows_after_its_checkpoint(tmp_path):
    _first_attempt(tmp_path, range(1, 6))
    log = _MetricsLog(str(tmp_path), True)
    log.write({"stage": "s", "event": "resume", "step": 3, "total_steps": 9, "epoch": 0})
    log.write(_row(4))
    assert _steps(tmp_path) == [1, 2, 3, "resume", 4]


def test_a_restart_from_nothing_drops_every_earlier_row(tmp_path):
    _first_attempt(tmp_path, range(1, 6))
    log = _MetricsLog(str(tmp_path), True)
    log.write(_row(1))
    assert _steps(tmp_path) == [1]
    assert json.loads((tmp_path / METRICS_FILE).read_text())["loss"] == 1.0
