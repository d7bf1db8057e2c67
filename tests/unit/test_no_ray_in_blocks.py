"""The pure blocks (models, losses, optimizers, data codecs, evaluation) must not import Ray."""

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import importlib, importlib.util, pkgutil, sys

    def present(name):
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            return False

    imported = []
    for package in ("lussray.models", "lussray.methods", "lussray.optim", "lussray.eval"):
        if not present(package):
            continue
        module = importlib.import_module(package)
        imported.append(package)
        for info in pkgutil.iter_modules(module.__path__, package + "."):
            importlib.import_module(info.name)
            imported.append(info.name)
    for name in ("lussray.data.imagenet_s", "lussray.data.augment", "lussray.clustering.lloyd", "lussray.data.fs4_views",
                 "lussray.data.cocostuff", "lussray.data.cityscapes", "lussray.data.synthetic_scenes",
                 "lussray.data.picie_views", "lussray.completion", "lussray.pipelines",
                 "lussray.data.scene_views", "lussray.data.partners"):
        if present(name):
            importlib.import_module(name)
            imported.append(name)
    print(" ".join(imported))
    loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
    assert not loaded, f"ray was imported: {loaded[:5]}"
    """
)


def test_blocks_do_not_import_ray():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = result.stdout.split()
    assert "lussray.methods.sinkhorn" in imported and "lussray.models.pass_model" in imported
    assert "lussray.models.segmenter" in imported and "lussray.methods.knn" in imported
