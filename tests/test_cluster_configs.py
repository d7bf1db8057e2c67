"""Cluster configurations: the launcher YAMLs against the schema the installed Ray ships, the KubeRay
manifests against the fields KubeRay needs, and both against the resources the dataset presets request.

Nothing here reaches a cloud: the checks end where `ray up` / `kubectl apply` would start.
"""

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from lussray import storage
from lussray.cli import build_parser
from lussray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_FILES = sorted((ROOT / "cluster").glob("*.yaml"))
RAYCLUSTER = ROOT / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = ROOT / "cluster" / "kuberay" / "rayjob.yaml"
SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
PRESETS = ("imagenet-s50", "imagenet-s300", "imagenet-s919")
TRAINING_STAGES = ("pretrain", "attention", "finetune")
TRAIN_TYPE, POOL_TYPE = "gpu_8x", "gpu_1x"  # launcher node types
TRAIN_GROUP, POOL_GROUP = "gpu-8x", "gpu-1x"  # KubeRay worker groups


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _validate_launcher(config: dict) -> None:
    """What `ray up` checks before it talks to a cloud: the JSON schema, then Ray's own checks."""
    jsonschema.validate(config, SCHEMA, cls=jsonschema.Draft7Validator)
    validate_config(prepare_config(copy.deepcopy(config)))


# -- resource demand of the presets ------------------------------------------------------------


def _train_demand(config, stage: str) -> tuple[float, float]:
    """(CPUs, GPUs) of the packed placement group of a training stage."""
    loop = getattr(config, stage).loop
    assert loop.use_gpu, f"{config.dataset.name}: {stage}.loop.use_gpu is off"
    return loop.num_workers * loop.cpus_per_worker, loop.num_workers * loop.gpus_per_worker


def _pool_demands(config) -> list[tuple[str, int, float, float]]:
    """(what, actors, CPUs per actor, GPUs per actor) of every GPU actor pool of a preset."""
    pools = [("labelgen pool", config.labelgen.actor_pool_max, config.labelgen.cpus_per_actor,
              config.labelgen.gpus_per_actor),
             ("k-means", config.labelgen.kmeans_actors, config.labelgen.kmeans_cpus_per_actor,
              config.labelgen.gpus_per_actor)]
    if config.predict.gpus_per_actor > 0:
        pools.append(("predict pool", config.predict.actor_pool_max, 1.0, config.predict.gpus_per_actor))
    return pools


# -- Ray cluster launcher ----------------------------------------------------------------------


def test_there_are_launcher_configs_for_aws_and_gcp():
    assert [path.name for path in LAUNCHER_FILES] == ["aws.yaml", "gcp.yaml"]


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.stem)
def test_launcher_config_validates_against_rays_schema(path):
    config = _load(path)
    _validate_launcher(config)
    assert config["provider"]["type"] == path.stem


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.stem)
def test_launcher_node_types(path):
    config = _load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head schedules nothing and has no GPU
    for name, gpus in ((TRAIN_TYPE, 8), (POOL_TYPE, 1)):
        assert types[name]["min_workers"] == 0 and types[name]["max_workers"] >= 1, name
        assert types[name]["resources"]["GPU"] == gpus, name
    assert config["max_workers"] == sum(t.get("max_workers", 0) for t in types.values())
    # the cluster runs the Ray the project pins, and installs this checkout with the GPU extra
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert any("lussray[gpu]" in command for command in config["setup_commands"])
    assert config["file_mounts"] == {"~/lussray": "."}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.stem)
def test_launcher_node_types_fit_the_presets(path, preset):
    types = _load(path)["available_node_types"]
    config = load_config(preset)
    for stage in TRAINING_STAGES:  # placement strategy PACK: one node must hold the whole group
        cpus, gpus = _train_demand(config, stage)
        assert cpus <= types[TRAIN_TYPE]["resources"]["CPU"] and gpus <= types[TRAIN_TYPE]["resources"]["GPU"], stage
    pool = types[POOL_TYPE]
    for what, actors, cpus, gpus in _pool_demands(config):
        assert cpus <= pool["resources"]["CPU"] and gpus <= pool["resources"]["GPU"], what
        assert actors * gpus <= pool["max_workers"] * pool["resources"]["GPU"], what


def _set(config: dict, keys: tuple, value) -> None:
    for key in keys[:-1]:
        config = config[key]
    config[keys[-1]] = value


BROKEN_LAUNCHER_EDITS = {
    "misspelt top-level key": (("max_worker",), 4),
    "negative max_workers": (("max_workers",), -1),
    "GPU count as a string": (("available_node_types", TRAIN_TYPE, "resources", "GPU"), "8"),
    "fractional CPU count": (("available_node_types", POOL_TYPE, "resources", "CPU"), 15.5),
    "setup command not a list": (("setup_commands",), "pip install lussray"),
    "unknown head node type": (("head_node_type",), "gpu_16x"),
    "unknown docker option": (("docker", "gpus"), "all"),
}


@pytest.mark.parametrize("edit", BROKEN_LAUNCHER_EDITS, ids=str)
@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.stem)
def test_broken_launcher_config_is_rejected(path, edit):
    config = _load(path)
    _set(config, *BROKEN_LAUNCHER_EDITS[edit])
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate_launcher(config)


def test_launcher_config_without_node_config_is_rejected():
    config = _load(LAUNCHER_FILES[0])
    del config["available_node_types"][POOL_TYPE]["node_config"]
    with pytest.raises(jsonschema.ValidationError, match="node_config"):
        _validate_launcher(config)


# -- KubeRay -----------------------------------------------------------------------------------


def _quantity(value) -> float:
    """A Kubernetes CPU or count quantity ("88", "500m", 8) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _pod_resources(template: dict) -> dict:
    """CPU and GPU limits of the Ray container (the first) of a pod template."""
    limits = template["spec"]["containers"][0]["resources"]["limits"]
    return {"CPU": _quantity(limits["cpu"]), "GPU": _quantity(limits.get("nvidia.com/gpu", 0))}


def _cluster_spec_problems(spec: dict) -> list[str]:
    """What KubeRay (or its autoscaler) would refuse, or what would leave GPU demand unserved."""
    problems = []
    if spec.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} is not the installed Ray {ray.__version__}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling is not true")
    head = spec.get("headGroupSpec") or {}
    if "rayStartParams" not in head:
        problems.append("headGroupSpec.rayStartParams is missing")
    containers = ((head.get("template") or {}).get("spec") or {}).get("containers") or []
    if not containers or not containers[0].get("image"):
        problems.append("headGroupSpec has no container image")
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append("no workerGroupSpecs")
    for group in groups:
        name = group.get("groupName")
        if not name or "rayStartParams" not in group:
            problems.append(f"worker group {name!r}: groupName and rayStartParams are required")
        low, replicas, high = group.get("minReplicas"), group.get("replicas"), group.get("maxReplicas")
        if None in (low, replicas, high) or not 0 <= low <= replicas <= high or high < 1:
            problems.append(f"worker group {name!r}: needs 0 <= minReplicas <= replicas <= maxReplicas, maxReplicas >= 1")
        pod = (group.get("template") or {}).get("spec") or {}
        if not pod.get("containers") or not pod["containers"][0].get("image"):
            problems.append(f"worker group {name!r}: no container image")
            continue
        resources = pod["containers"][0].get("resources") or {}
        gpu_limit, gpu_request = ((resources.get(kind) or {}).get("nvidia.com/gpu") for kind in ("limits", "requests"))
        if not gpu_limit or gpu_request != gpu_limit:
            problems.append(f"worker group {name!r}: nvidia.com/gpu must be in limits and equal in requests")
        if not (resources.get("requests") or {}).get("cpu") or not (resources.get("requests") or {}).get("memory"):
            problems.append(f"worker group {name!r}: cpu and memory requests are required")
    return problems


def _manifest_problems(doc: dict) -> list[str]:
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {doc.get('apiVersion')!r} is not ray.io/v1")
    if not (doc.get("metadata") or {}).get("name"):
        problems.append("metadata.name is missing")
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayCluster":
        return problems + _cluster_spec_problems(spec)
    if doc.get("kind") == "RayJob":
        if not spec.get("entrypoint"):
            problems.append("spec.entrypoint is missing")
        if "rayClusterSpec" not in spec and "clusterSelector" not in spec:
            problems.append("spec needs rayClusterSpec or clusterSelector")
        if spec.get("ttlSecondsAfterFinished") is not None and not spec.get("shutdownAfterJobFinishes"):
            problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        return problems + _cluster_spec_problems(spec.get("rayClusterSpec") or {})
    return problems + [f"kind {doc.get('kind')!r} is neither RayCluster nor RayJob"]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("path,kind", [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")], ids=["raycluster", "rayjob"])
def test_kuberay_manifest_has_what_kuberay_requires(path, kind):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1 and docs[0]["kind"] == kind
    assert _manifest_problems(docs[0]) == []
    spec = _cluster_spec(docs[0])
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert _pod_resources(spec["headGroupSpec"]["template"])["GPU"] == 0


def test_rayjob_runs_the_pretraining_entrypoint_on_object_storage():
    spec = _load(RAYJOB)["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "lussray.train"]
    args = build_parser("train").parse_args(["train", *argv[3:]])
    assert storage.is_uri(args.data) and storage.is_uri(args.run)
    assert load_config(args.dataset, args.config, args.overrides).dataset.name == "imagenet-s919"
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1  # a retry resumes
    yaml.safe_load(spec["runtimeEnvYAML"])  # KubeRay parses it as YAML


def test_rayjob_cluster_has_the_shapes_of_the_raycluster():
    def shapes(spec):
        return {group["groupName"]: (group["minReplicas"], group["maxReplicas"], group["template"])
                for group in spec["workerGroupSpecs"]}
    assert shapes(_load(RAYJOB)["spec"]["rayClusterSpec"]) == shapes(_load(RAYCLUSTER)["spec"])


@pytest.mark.parametrize("preset", PRESETS)
def test_kuberay_worker_groups_fit_the_presets(preset):
    groups = {group["groupName"]: group for group in _load(RAYCLUSTER)["spec"]["workerGroupSpecs"]}
    config = load_config(preset)
    train = _pod_resources(groups[TRAIN_GROUP]["template"])
    for stage in TRAINING_STAGES:
        cpus, gpus = _train_demand(config, stage)
        assert cpus <= train["CPU"] and gpus <= train["GPU"], stage
    pool = _pod_resources(groups[POOL_GROUP]["template"])
    for what, actors, cpus, gpus in _pool_demands(config):
        assert cpus <= pool["CPU"] and gpus <= pool["GPU"], what
        assert actors * gpus <= groups[POOL_GROUP]["maxReplicas"] * pool["GPU"], what


def _drop_gpu(doc):
    for kind in ("limits", "requests"):
        del _cluster_spec(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][kind][
            "nvidia.com/gpu"]


BROKEN_KUBERAY_EDITS = {
    "autoscaling off": (RAYCLUSTER, lambda doc: doc["spec"].update(enableInTreeAutoscaling=False)),
    "other Ray version": (RAYCLUSTER, lambda doc: doc["spec"].update(rayVersion="2.9.0")),
    "no head group": (RAYCLUSTER, lambda doc: doc["spec"].pop("headGroupSpec")),
    "replicas above max": (RAYCLUSTER, lambda doc: doc["spec"]["workerGroupSpecs"][1].update(replicas=9)),
    "GPU group without GPUs": (RAYCLUSTER, _drop_gpu),
    "wrong apiVersion": (RAYJOB, lambda doc: doc.update(apiVersion="ray.io/v1alpha1")),
    "no entrypoint": (RAYJOB, lambda doc: doc["spec"].pop("entrypoint")),
    "no cluster": (RAYJOB, lambda doc: doc["spec"].pop("rayClusterSpec")),
    "ttl without shutdown": (RAYJOB, lambda doc: doc["spec"].update(shutdownAfterJobFinishes=False)),
}


@pytest.mark.parametrize("edit", BROKEN_KUBERAY_EDITS, ids=str)
def test_broken_kuberay_manifest_is_reported(edit):
    path, change = BROKEN_KUBERAY_EDITS[edit]
    doc = _load(path)
    change(doc)
    assert _manifest_problems(doc)
