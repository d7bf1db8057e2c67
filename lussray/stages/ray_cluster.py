"""The Ray cluster of a run: start or join it, check it can hold a request, keep its console readable.

A run owns its cluster. Without ``ray.address`` (or ``RAY_ADDRESS``, which ``ray job submit`` and
KubeRay set) it starts a private local cluster; it joins an existing one only when asked
(``ray.address=auto`` or an address). ``ray.address=local`` starts a private one even when
``RAY_ADDRESS`` is set. The first line of output says which: ``[ray] started a private local
cluster (4 CPUs)`` or ``[ray] joined the cluster at ...``.

Before a Train ``fit`` or an actor pool, :func:`require` checks that the cluster can hold the
request (workers or actors x CPUs/GPUs). On a cluster without an autoscaler a request that does not
fit fails at once with a :class:`~lussray.errors.UserError` naming the config key; with an
autoscaler it asks for the nodes (``ray.autoscaler.sdk.request_resources``) and waits up to
``ray.resource_wait_s``. A private cluster has none; on a joined one the autoscaler is detected
from what it writes to the GCS (see :func:`has_autoscaler`); ``ray.autoscaler=true/false``
overrides the detection. Actor pools wait ``ray.actor_start_timeout_s`` for their actors
(``DataContext.wait_for_min_actors_s``), the k-means ``ray.get`` calls ``ray.get_timeout_s``.

Console: Ray Data's plan and progress lines stay in the Ray Data log file
(``DataContext.print_on_execution_start``, progress bars off, ``use_ray_tqdm`` off); Ray Train's own
INFO lines stay in its log files (``RunConfig(logging_config=...)`` in :mod:`lussray.stages.loop`);
the lines of :data:`NOISE` are dropped, in the driver and, on a private cluster, in every worker
(``worker_process_setup_hook``, :func:`setup_worker`): above all Ray Train's placement-group
cleaner, which, without the dashboard's State API, warns "Failed to query Ray Train Controller
actor state" every second for the rest of the session.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from lussray.errors import UserError

log = logging.getLogger(__name__)

# Ray log lines with nothing for a person to act on: logger name -> message prefixes dropped.
NOISE: dict[str, tuple[str, ...]] = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": (
        "Failed to query Ray Train Controller actor state",),
    "ray.data._internal.progress": ("Progress bars disabled",),
    "ray.data._internal.execution.streaming_executor": ("✔️  Dataset",),
}
ERROR_COLUMN = "__lussray_error__"  # the column of an error row (see Guarded)
POLL_S = 5.0  # how often to look for new nodes while the autoscaler works


# -- start or join -------------------------------------------------------------------------------


class _NoiseFilter(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _noise() -> dict[str, tuple[str, ...]]:
    import ray

    # Ray Train logs every report under a logger named after its file, outside "ray.train" (its
    # path, built without importing ray.train, which would slow every worker's start)
    context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    return {**NOISE, context: ("Reporting training result",)}


def quiet_ray_logs() -> None:
    """Drop the :data:`NOISE` lines in this process (the driver, or a worker through :func:`setup_worker`)."""
    for name, prefixes in _noise().items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoiseFilter) for f in logger.filters):
            logger.addFilter(_NoiseFilter(prefixes))


def setup_worker() -> None:
    """The ``worker_process_setup_hook`` of a private cluster: every worker process runs it first.

    Besides :func:`quiet_ray_logs`: ``RAY_ADDRESS`` is this cluster's own, so the State API calls of
    Ray Train's placement-group cleaner never resolve "auto" to another cluster on the machine
    (with several running they raise instead, and the cleaner's thread dies with a traceback);
    Ray Train's print redirection is off (it printed every worker line twice); DDP's gradient
    stride hint is not repeated by every worker.
    """
    import warnings

    import ray

    try:
        quiet_ray_logs()
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
        os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    except Exception as error:  # noqa: BLE001 - a failing hook would stop the worker: a noisy one is better
        log.warning("lussray worker setup: %s", error)


def configure_data_context(ray_config: Any) -> None:
    """This driver's Ray Data settings: no plan or progress on the console, bounded actor start."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.print_on_execution_start = False
    context.enable_progress_bars = False
    context.use_ray_tqdm = False
    # An actor pool waits this long for its minimum actors (scheduled and constructed, the
    # model loaded), then fails instead of waiting forever (Ray's default, -1).
    context.wait_for_min_actors_s = int(ray_config.actor_start_timeout_s)


def _resources_line() -> str:
    import ray

    total = ray.cluster_resources()
    parts = [f"{total.get('CPU', 0):g} CPUs"]
    if total.get("GPU"):
        parts.append(f"{total['GPU']:g} GPUs")
    nodes = len([node for node in ray.nodes() if node.get("Alive")])
    if nodes > 1:
        parts.append(f"{nodes} nodes")
    return ", ".join(parts)


# This process's cluster, like the connection itself: the RayConfig init_ray used, and whether
# init_ray started the cluster (a private one never autoscales).
_SESSION: dict[str, Any] = {}


def current_config() -> Any:
    """The ``RayConfig`` :func:`init_ray` connected with (the defaults before it ran)."""
    from lussray.config import RayConfig

    return _SESSION.get("config") or RayConfig()


#: Ray's message when its raylet does not register with the GCS within its fixed 30 s, which happens
#: on a machine whose cores are busy with other work; the same start then usually succeeds.
RAY_START_TIMEOUT = "timed out during startup"
PRIVATE_CLUSTER_ATTEMPTS = 3


def _start_private_cluster(ray_config: Any) -> None:
    """``ray.init`` of this run's own local cluster, started again when Ray gives up waiting for its raylet."""
    import ray

    for attempt in range(1, PRIVATE_CLUSTER_ATTEMPTS + 1):
        try:
            ray.init(address="local", num_cpus=ray_config.num_cpus, include_dashboard=False, log_to_driver=True,
                     runtime_env={"worker_process_setup_hook": f"{__name__}.setup_worker"})
            return
        except Exception as error:  # noqa: BLE001 - Ray raises a bare Exception for this
            if RAY_START_TIMEOUT not in str(error) or attempt == PRIVATE_CLUSTER_ATTEMPTS:
                raise
            print(f"[ray] the local cluster did not start in time (attempt {attempt} of "
                  f"{PRIVATE_CLUSTER_ATTEMPTS}; a busy machine?), starting it again", flush=True)
            ray.shutdown()


def init_ray(ray_config: Any) -> None:
    """Start this run's private local cluster, or join the one it is given (see the module doc).

    Args:
        ray_config: the ``RayConfig`` section (address, num_cpus, timeouts).
    """
    import ray

    _SESSION["config"] = ray_config
    quiet_ray_logs()
    if not ray.is_initialized():
        address = ray_config.address or os.environ.get("RAY_ADDRESS")
        if address and address != "local":
            ray.init(address=address, log_to_driver=True)
            _SESSION["private"] = False
            where = ray.get_runtime_context().gcs_address
            print(f"[ray] joined the cluster at {address} ({where}; {_resources_line()})", flush=True)
        else:
            _start_private_cluster(ray_config)
            _SESSION["private"] = True
            print(f"[ray] started a private local cluster ({_resources_line()})", flush=True)
    configure_data_context(ray_config)


# -- resource checks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Demand:
    """``count`` bundles of ``cpus`` CPUs and ``gpus`` GPUs that must run at once, and their keys.

    Attributes:
        what: what asks, for messages ("pretrain training workers").
        count: number of bundles (workers, actors).
        cpus: CPUs per bundle.
        gpus: GPUs per bundle.
        count_key: the config key setting ``count``.
        cpus_key: the config key setting ``cpus``.
        gpus_key: the config key(s) setting ``gpus``.
    """

    what: str
    count: int
    cpus: float
    gpus: float
    count_key: str
    cpus_key: str
    gpus_key: str

    def bundle(self) -> dict[str, float]:
        """One bundle as a Ray resource dict."""
        return {name: value for name, value in (("CPU", self.cpus), ("GPU", self.gpus)) if value > 0}


def bundles_that_fit(nodes: Iterable[dict[str, float]], demand: Demand) -> int:
    """How many of ``demand``'s bundles the nodes' total resources hold (a bundle never spans nodes)."""
    bundle = demand.bundle()
    if not bundle:
        return demand.count
    fitted = 0
    for node in nodes:
        fitted += int(min(node.get(name, 0.0) / value + 1e-9 for name, value in bundle.items()))
    return fitted


def shortfall(nodes: list[dict[str, float]], demand: Demand) -> str:
    """Why ``demand`` does not fit ``nodes``, naming the key to change first."""
    most_gpus = max((node.get("GPU", 0.0) for node in nodes), default=0.0)
    most_cpus = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
    total_gpus = sum(node.get("GPU", 0.0) for node in nodes)
    total_cpus = sum(node.get("CPU", 0.0) for node in nodes)
    asks = f"{demand.what} ask for {demand.count} ({demand.count_key}) x {demand.cpus:g} CPUs ({demand.cpus_key})"
    if demand.gpus > 0:
        asks += f" + {demand.gpus:g} GPUs ({demand.gpus_key})"
    if demand.gpus > most_gpus:
        why, key = f"the cluster has no node with {demand.gpus:g} GPUs (it has {total_gpus:g} GPUs)", demand.gpus_key
    elif demand.cpus > most_cpus:
        why, key = f"the cluster has no node with {demand.cpus:g} CPUs (largest: {most_cpus:g})", demand.cpus_key
    else:
        why = (f"the cluster holds only {bundles_that_fit(nodes, demand)} of them "
               f"({total_cpus:g} CPUs, {total_gpus:g} GPUs)")
        key = demand.count_key
    return f"{asks}, but {why}: change {key.split(' / ')[0]} or give the run a larger cluster (ray.address)"


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def has_autoscaler(ray_config: Any) -> bool:
    """Whether the cluster adds nodes on demand (best effort; ``ray.autoscaler`` overrides it).

    A private cluster never does. Otherwise yes when the GCS holds either record an autoscaler
    writes: the node types of autoscaler v2 / KubeRay (the record Ray Train and Ray Data read,
    ``get_cluster_config``) with one that can still grow, or a v1 monitor's status (what ``ray
    status`` prints) mapping nodes to configured node types. No such record: a fixed cluster.
    """
    if ray_config.autoscaler is not None:
        return bool(ray_config.autoscaler)
    if _SESSION.get("private"):
        return False
    return _autoscaler_v2_can_grow() or _autoscaler_v1_reports()


def _autoscaler_v2_can_grow() -> bool:
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no record, or another Ray's layout: no autoscaler known
        return False
    if not config or not config.node_group_configs:
        return False
    return any(group.max_count == -1 or group.max_count > group.min_count
               for group in config.node_group_configs if group.resources and group.max_count != 0)


def _autoscaler_v1_reports() -> bool:
    import json

    try:
        from ray.experimental.internal_kv import _internal_kv_get

        status = _internal_kv_get("__autoscaling_status")  # ray_constants.DEBUG_AUTOSCALING_STATUS
        report = (json.loads(status) if status else {}).get("autoscaler_report") or {}
    except Exception:  # noqa: BLE001 - as above
        return False
    # Every `ray start --head` runs a read-only one that names each node "node_<id>"; a real one
    # maps nodes to the node types of its config.
    mapping = report.get("node_type_mapping") or {}
    return any(node_type != f"node_{node_id}" for node_id, node_type in mapping.items())


def _request_resources(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def require(demand: Demand, ray_config: Any, *, nodes: Callable[[], list[dict[str, float]]] = _alive_nodes,
            autoscaler: Optional[bool] = None, request: Callable[[list], None] = _request_resources,
            clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Return once the cluster can hold ``demand``; else fail with a UserError naming its key.

    Args:
        demand: what the stage is about to ask Ray for.
        ray_config: the ``RayConfig`` (``resource_wait_s``, ``autoscaler``).
        nodes: the alive nodes' total resources (tests pass their own).
        autoscaler: whether the cluster autoscales (default: :func:`has_autoscaler`).
        request: asks the autoscaler for bundles (``request_resources``).
        clock: monotonic seconds.
        sleep: waits between looks at the nodes.

    Raises:
        UserError: the request does not fit and no autoscaler adds the nodes within
            ``ray.resource_wait_s`` seconds (at once without an autoscaler).
    """
    if demand.count <= 0 or bundles_that_fit(current := nodes(), demand) >= demand.count:
        return
    if not (has_autoscaler(ray_config) if autoscaler is None else autoscaler):
        raise UserError(f"{shortfall(current, demand)} (the cluster has no autoscaler)")
    wait_s = float(ray_config.resource_wait_s)
    print(f"[ray] waiting up to {wait_s:.0f} s (ray.resource_wait_s) for the autoscaler to add nodes for "
          f"{demand.count} x {demand.bundle()} ({demand.what})", flush=True)
    request([demand.bundle()] * demand.count)
    deadline = clock() + wait_s
    try:
        while clock() < deadline:
            sleep(min(POLL_S, max(deadline - clock(), 0.0)))
            if bundles_that_fit(current := nodes(), demand) >= demand.count:
                return
    finally:
        request([])  # the stage's own tasks hold the nodes from here; no standing minimum
    raise UserError(f"{shortfall(current, demand)} (waited ray.resource_wait_s={wait_s:g} s for the autoscaler)")


def pool_demand(section_key: str, pool: Any, what: str) -> Demand:
    """The :class:`Demand` of an actor pool section (``actor_pool_min``, ``cpus_per_actor``, ``gpus_per_actor``)."""
    return Demand(what, int(pool.actor_pool_min), float(pool.cpus_per_actor), float(pool.gpus_per_actor),
                  f"{section_key}.actor_pool_min", f"{section_key}.cpus_per_actor", f"{section_key}.gpus_per_actor")


def section_key(section: Any) -> str:
    """The top-level config key of a section object (``config.predict`` -> ``"predict"``)."""
    from typing import get_type_hints

    from lussray.config import LussConfig

    for name, kind in get_type_hints(LussConfig).items():
        if isinstance(kind, type) and isinstance(section, kind):
            return name
    return type(section).__name__


# -- errors inside actors ------------------------------------------------------------------------


def describe(error: BaseException, where: str) -> str:
    """One line for ``error`` raised while working on ``where`` (a UserError names its file already)."""
    first = (str(error).strip().splitlines() or [""])[0].strip()  # the rest is a traceback or a library's advice
    if isinstance(error, UserError):
        return first if where in first else f"{where}: {first}"
    return f"{where}: {type(error).__name__}: {first}"


class Guarded:
    """A ``map_batches`` callable class around ``factory`` that returns errors as rows.

    Raised inside an actor, an error reaches the driver as the actor's traceback, Ray Data's
    abbreviated stack and the full chain again; returned as a row of :data:`ERROR_COLUMN` it reaches
    the driver as data, where :func:`raise_error_rows` turns it into one UserError line.

    Args:
        factory: the callable class (its constructor loads the model once per actor).
        factory_kwargs: its constructor arguments.
        unit_column: the batch column naming what a call works on (a shard path, a sample key).
        label: names the actor in a constructor error without a file of its own.
    """

    def __init__(self, factory: Callable[..., Any], factory_kwargs: dict[str, Any], unit_column: str,
                 label: str) -> None:
        self.unit_column, self.error, self.inner = unit_column, None, None
        try:
            self.inner = factory(**factory_kwargs)
        except Exception as error:  # noqa: BLE001 - reported through the rows
            self.error = describe(error, label)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.error is not None:
            return {ERROR_COLUMN: np.asarray([self.error], dtype=object)}
        try:
            return self.inner(batch)
        except Exception as error:  # noqa: BLE001 - reported through the rows
            units = batch.get(self.unit_column)
            where = ", ".join(str(unit) for unit in list(units)[:3]) if units is not None else "a batch"
            return {ERROR_COLUMN: np.asarray([describe(error, where)], dtype=object)}


def raise_error_rows(batch: dict[str, Any]) -> None:
    """Raise the first error of a :class:`Guarded` batch (or row) as a UserError."""
    if ERROR_COLUMN in batch:
        values = batch[ERROR_COLUMN]
        errors = [str(value) for value in (values if isinstance(values, (list, np.ndarray)) else [values]) if value]
        if errors:
            raise UserError(errors[0])


def pool_errors(error: BaseException, what: str) -> UserError:
    """A one-line UserError for a Ray error of an actor pool (timeouts name ``ray.actor_start_timeout_s``)."""
    import ray.exceptions

    if isinstance(error, ray.exceptions.GetTimeoutError):
        return UserError(f"{what}: the actor pool did not start within ray.actor_start_timeout_s "
                         f"(the cluster lacks the resources, or the actors' constructor hangs)")
    first = (str(error).strip().splitlines() or [""])[0]
    return UserError(f"{what}: {type(error).__name__}: {first}")


def checked(items: Iterable[dict[str, Any]], what: str) -> Iterator[dict[str, Any]]:
    """Yield the rows or batches of a :class:`Guarded` pool; errors become one UserError line.

    Args:
        items: the pool's output iterator (``iter_rows()`` or ``iter_batches()``).
        what: names the pass in messages.

    Raises:
        UserError: an error row (it names the shard, sample or checkpoint), or a Ray error of the
            pool itself (a timeout names ``ray.actor_start_timeout_s``).
    """
    import ray.exceptions

    iterator = iter(items)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except ray.exceptions.RayError as error:
            raise pool_errors(error, what) from None
        raise_error_rows(item)
        yield item
