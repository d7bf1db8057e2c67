"""STEGO/HP predictors (cluster probe, linear probe, frozen k-means centroids) in one process, and their scoring."""

import dataclasses

import numpy as np
import pytest
import torch

from lussray.eval.pixel import ConfusionAccumulator, confusion
from lussray.models.pass_model import PASSModel
from lussray.models.stego_head import HPHeads, STEGOHeads
from lussray.stages.featurizer import RESNET, FeaturizerSpec
from lussray.stages.probe_predict import ProbePredictor, build_heads, read_heads_record
from lussray.stages.scene_baselines import CentroidPredictor

SHAPE = {"in_dim": 512, "dim": 8, "num_classes": 3, "extra_clusters": 1, "nonlinear": True, "dropout": 0.1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe-predict")
    torch.manual_seed(0)
    stage1 = root / "stage1.pt"
    torch.save({"model": PASSModel("resnet18", hidden_dim=16, feat_dim=8, num_prototypes=4,
                                   shallow_stages=()).state_dict(), "step": 1}, stage1)
    spec = FeaturizerSpec(RESNET, "resnet18", str(stage1))
    out = {}
    for kind, heads in (("stego", STEGOHeads(**SHAPE)), ("hp", HPHeads(**SHAPE))):
        path = root / f"{kind}.pt"
        record = {"kind": kind, "shape": SHAPE, "featurizer": dataclasses.asdict(spec)}
        torch.save({"model": heads.state_dict(), "step": 4, "config": {"heads": record}}, path)
        out[kind] = (str(path), heads)
    centroids = root / "centroids.npy"
    np.save(centroids, np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32))
    return {"spec": spec, "centroids": str(centroids), **out}


def _images(count: int = 2, size: int = 64) -> list[np.ndarray]:
    return [np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8) for i in range(count)]


def test_heads_are_rebuilt_from_the_checkpoint_record(files):
    for kind in ("stego", "hp"):
        path, heads = files[kind]
        rebuilt = build_heads(read_heads_record(path))
        assert not rebuilt.training
        for name, value in rebuilt.state_dict().items():
            assert torch.equal(value, heads.state_dict()[name])  # HP's EMA head and projector are left out


@pytest.mark.parametrize("probe,flip", [("cluster", False), ("cluster", True), ("linear", False)])
def test_probe_predictor_labels_every_pixel_at_the_label_size(files, probe, flip):
    predictor = ProbePredictor(files["stego"][0], probe=probe, flip=flip)
    images = _images()
    maps = predictor.predict(images, [(64, 64), (40, 48)], [None, None])
    assert [m.shape for m in maps] == [(64, 64), (40, 48)]
    assert all(m.dtype == np.int64 and m.min() >= 0 and m.max() < (4 if probe == "cluster" else 3) for m in maps)
    # the cluster probe's argmax equals the nearest centroid by cosine of the code (alpha only sharpens)
    if probe == "cluster" and not flip:
        from lussray.stages.featurizer import to_input

        heads = build_heads(read_heads_record(files["stego"][0]))
        with torch.no_grad():
            code = heads.head(predictor.featurizer(to_input(np.stack(images), "cpu"), attention=False).features)
            cosines = heads.cluster_probe(code)
        small = cosines.argmax(1)[0].numpy()
        assert (np.kron(small, np.ones((8, 8), int)) == maps[0]).mean() > 0.7  # the same map, upsampled


def test_flip_tta_of_a_mirror_image_is_the_mirror_prediction(files):
    predictor = ProbePredictor(files["stego"][0], flip=True)
    image = _images(1)[0]
    direct = predictor.predict([image], [(64, 64)], [None])[0]
    mirrored = predictor.predict([image[:, ::-1].copy()], [(64, 64)], [None])[0]
    assert (direct[:, ::-1] == mirrored).mean() > 0.99


def test_refinement_gets_probabilities_and_the_image_at_the_label_size(files):
    seen = []

    def refine(probabilities, image):
        seen.append((probabilities.shape, image.shape, float(probabilities.sum(0).mean())))
        return probabilities.argmax(0)

    predictor = ProbePredictor(files["stego"][0], refine_fn=refine)
    predictor.predict(_images(1), [(48, 32)], [None])
    assert seen[0][0] == (4, 48, 32) and seen[0][1] == (48, 32, 3) and seen[0][2] == pytest.approx(1.0, abs=1e-5)


def test_centroid_predictor_and_pixel_scores(files):
    predictor = CentroidPredictor(dataclasses.asdict(files["spec"]), files["centroids"])
    maps = predictor.predict(_images(), [(64, 64), (64, 64)], [None, None])
    assert all(m.shape == (64, 64) and m.max() < 4 for m in maps)
    accumulator = ConfusionAccumulator(3, 4)
    for prediction in maps:
        accumulator.add(confusion(prediction, (prediction % 3).astype(np.int32), 3, 4))
    from lussray.config import load_config
    from lussray.stages.probe_predict import score_pixels

    metrics = score_pixels(load_config("synthetic-scenes"), accumulator, "hungarian")
    assert metrics["num_images"] == 2 and metrics["matching"] == "hungarian" and 0 < metrics["Acc"] <= 100
