"""Methods as the axis of ``lussray run``: which stages a method runs, in order, and how it is scored.

    lussray run --method pass --dataset synthetic-demo --data demo-out/shards --run demo-out/run --baselines

A method is one module here (``pass_`` for PASS) that declares its stages as :class:`Stage` records
(what each reads, writes and how its completion is recorded) and composes the typed stage functions
of :mod:`lussray.stages` in ``run_method``. The shared blocks (the Train loop, the actor pools, the
sharded k-means, the evaluators, the CRF) live in their own modules; a method only calls them.

Config layers of a method (later wins): ``configs/base.yaml`` < ``configs/dataset/<dataset>.yaml`` <
``configs/method/<method>.yaml`` < ``configs/method/<method>/<dataset>.yaml`` < ``--config`` <
``key=value`` (:func:`lussray.config.load_config`).
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from lussray.errors import UserError

DEFAULT_METHOD = "pass"

# name -> the module that runs it
METHOD_MODULES: dict[str, str] = {"pass": "lussray.pipelines.pass_", "picie": "lussray.pipelines.picie",
                                  "stego": "lussray.pipelines.stego", "hp": "lussray.pipelines.hp",
                                  "fs4": "lussray.pipelines.fs4"}

# name -> the issue that builds it (until then ``lussray run --method NAME`` says so)
PLANNED_METHODS: dict[str, str] = {}

METHOD_NAMES: tuple[str, ...] = (*METHOD_MODULES, *PLANNED_METHODS)


@dataclass(frozen=True)
class Stage:
    """One stage of a method, as ``lussray run`` composes it.

    Attributes:
        name: the stage's name (also its folder under the run folder, unless ``writes`` says otherwise).
        reads: what it consumes (shards of a split, an upstream stage's output).
        writes: what it produces, relative to the run folder.
        completion: how a finished stage is recognised (and so skipped by a rerun).
    """

    name: str
    reads: str
    writes: str
    completion: str


def method_module(name: str) -> ModuleType:
    """The module that runs method ``name``.

    Raises:
        UserError: for an unknown method (naming the choices) or one that is not built yet (naming its issue).
    """
    if name in METHOD_MODULES:
        return importlib.import_module(METHOD_MODULES[name])
    if name in PLANNED_METHODS:
        raise UserError(f"--method {name}: not implemented yet (issue \"{PLANNED_METHODS[name]}\")")
    raise UserError(f"--method {name!r}: unknown method; choose one of {', '.join(METHOD_NAMES)}")


@dataclass
class RunOptions:
    """The flags of ``lussray run`` a method reads."""

    baselines: bool = False
    crf: bool = False
    test: bool = False
    overwrite: bool = False
    featurizer: str | None = None  # STEGO/HP: a DINO checkpoint (default: the run's PASS stage-1 ResNet)
    select_on_labels: bool = False  # STEGO/HP: also the references' checkpoint choice on validation labels
    init: str | None = None  # PiCIE, FS^4: the backbone checkpoint (default: PASS stage-1 pretraining runs first)


@dataclass
class MethodResult:
    """What a method's ``run_method`` returns to ``lussray run``.

    Attributes:
        rows: the method's own scored rows by name (the first one is the headline), evaluator summaries.
        baselines: each baseline's evaluator summary, by name.
        protocol: the protocol the rows were scored with (``imagenet-s`` or ``pixel``).
    """

    rows: dict[str, dict[str, Any]]
    baselines: dict[str, dict[str, Any]]
    protocol: str


class StageTimer:
    """Runs stage functions, printing each start and its seconds; keeps the seconds per stage."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix, self.seconds = prefix, {}

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, timed under ``name``."""
        print(f"[run] {self.prefix}{name} ...", flush=True)
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - started, 1)
        print(f"[run] {self.prefix}{name}: {self.seconds[name]} s", flush=True)
        return result

    def merge(self, other: "StageTimer") -> None:
        """Take ``other``'s seconds under its prefix."""
        self.seconds.update({f"{other.prefix}{name}": value for name, value in other.seconds.items()})
