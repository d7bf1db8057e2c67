"""tools/fs4_ablation.py: every row's config resolves, the FS^4 rows get PiCIE's budget, labels are shared (no Ray)."""

import importlib.util
import sys
from pathlib import Path

from lussray.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    sys.path.insert(0, str(ROOT / "tools"))  # the tool imports its sibling seeds.py, as when run as a script
    try:
        spec = importlib.util.spec_from_file_location("fs4_ablation_tool", ROOT / "tools" / "fs4_ablation.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["fs4_ablation_tool"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "tools"))


ablation = _load_script()


def test_rows_add_one_module_each_and_take_picie_budget():
    base = load_config("synthetic-scenes", method="fs4")
    fair = ablation.comparable(base)
    configs = {row.folder: load_config("synthetic-scenes", overrides=[*fair, *row.overrides], method="fs4")
               for row in ablation.ROWS}
    cae, gg, pgg, full = configs["cae"], configs["gg"], configs["pgg"], configs["fs4"]
    assert cae.fs4.cae and cae.fs4.global_weight == 0 and not cae.fs4.labels.pyramid
    assert cae.fs4.labels.keep_fraction == 1
    assert gg.fs4.global_weight == 1 and gg.fs4.cam_head == "classical" and not gg.fs4.labels.pyramid
    assert pgg.fs4.labels.pyramid and pgg.fs4.labels.keep_fraction == 0.4 and pgg.fs4.cam_head == "classical"
    assert full.fs4.cam_head == "modified" and full.fs4.cae
    for config in (cae, gg, pgg, full):
        assert config.fs4.view_size == base.picie.crop_size and config.fs4.base_size == base.picie.base_size
        assert (config.fs4.loop.epochs, config.fs4.loop.batch_size_per_worker, config.fs4.loop.base_lr) == (
            base.picie.loop.epochs, base.picie.loop.batch_size_per_worker, base.picie.loop.base_lr)


def test_rows_with_the_same_label_settings_share_the_labels(tmp_path):
    (tmp_path / "cae" / "fs4-labels").mkdir(parents=True)
    (tmp_path / "cae" / "fs4-labels" / "summary.json").write_text("{}")
    row = {row.folder: row for row in ablation.ROWS}
    ablation.share_labels(tmp_path, row["pgg"])  # pyramid labels: not the whole-image ones
    assert not (tmp_path / "pgg" / "fs4-labels").exists()
    ablation.share_labels(tmp_path, row["gg"])
    assert (tmp_path / "gg" / "fs4-labels" / "summary.json").is_file()


def test_gains_are_each_row_minus_the_one_before():
    names = [row.name for row in ablation.ROWS]
    per_seed = {0: {name: {"mIoU": float(i), "Acc": 0.0} for i, name in enumerate(names)},
                1: {name: {"mIoU": 2.0 * i, "Acc": 0.0} for i, name in enumerate(names)}}
    assert ablation.gains(per_seed) == {name: [1.0, 2.0] for name in names[1:]}
