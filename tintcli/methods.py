"""The registry of merging methods, data-free (``tintcli/merging/``) and test-time adaptive
(``tintcli/adaptation/``): one name per method, and everything else about it, declared once,
where the method is written (mergekit's ``easy_define`` and timm's registry in spirit).

A data-free method registers a plain function on state dicts

    fn(pretrained: StateDict, experts: Mapping[str, StateDict], **params) -> StateDict | Merged

(it returns a ``Merged`` only where it makes a model per task, as EMR does), and an adaptive
one (``adaptive=True``) also takes the unlabeled adaptation data:

    fn(pretrained, experts, context: AdaptationContext, **params) -> Merged

Its signature declares its parameters and their defaults (the config group
``method/declared/<name>`` is made from it: no second copy in a YAML); ``check=`` checks their
values before any work (helpers in ``tintcli/checks.py``), given the parameters, the encoder
and the task names where known; ``pretty``, ``paper`` and ``code`` are what tables and the
README cite; ``search`` names the parameters chosen on the validation split and their grids (a
config value of null means "choose"; a number fixes it), ``choose_by`` the validation metric
its authors choose by, ``patience`` their early stopping over the grid (the config's
``patience``; null: the whole grid), and ``delta`` (optional) the function giving the Δ of
θ0 + α·Δ, so that a grid over α costs one Δ.

A method whose result depends on how a matrix is stored (ISO-CTS: not transpose-equivariant)
declares an ``orientation`` parameter: left null, a run gives it its pool's source format
(``Pool.source_format``), so the method sees each matrix as the authors' code saw it in that
format (``tintcli.checkpoints.convert.STORED_TRANSPOSED``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from tintcli.errors import TintError
from tintcli.io import StateDict
from tintcli.merged import Merged

# (parameters, encoder or None, the task names or None): raises ValueError naming the bad one
Check = Callable[[dict, nn.Module | None, Sequence[str] | None], None]


@dataclass(frozen=True)
class Outcome:
    """How an adaptive method's own learned parts are saved beside its λ and read back
    (``tintcli/adaptation/saved.py``), named ``tinted`` in ``tints.safetensors``' metadata
    (and in ``Merged.tinted``): ``head`` rebuilds a task's head from its saved entries
    (Surgery's adapter with the zero-shot head it feeds); ``save`` gives a routed model's
    tensors and metadata, ``load(encoder, pretrained, experts, tasks, tensors, metadata)``
    rebuilds it and its starting state (WEMoE's routers)."""

    tinted: str
    head: Callable[[StateDict], nn.Module] | None = None
    save: Callable[[nn.Module], tuple[StateDict, dict[str, str]]] | None = None
    load: Callable[..., tuple[nn.Module, StateDict]] | None = None


@dataclass(frozen=True)
class Method:
    fn: Callable
    adaptive: bool = False  # learns from unlabeled test images (an AdaptationContext)
    # checks parameter values before any work (raises ValueError naming the bad one), so that
    # a typo fails at once, not deep inside torch or after the table's earlier methods ran;
    # called with the parameters and, where known, the encoder (an architecture, no weights)
    check: Check | None = None
    name: str = ""
    pretty: str = ""                 # the row name tables print
    paper: str | None = None         # the paper's URL
    code: str | None = None          # the reference code's URL
    # parameters chosen on the validation split, with their grids (null in the config: chosen)
    search: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    # (pretrained, experts, **other parameters) -> Δ, for methods whose merge is θ0 + alpha·Δ
    delta: Callable[..., StateDict] | None = None
    # the name of the reference row a configuration of it reproduces (a variant: AdaMerging++)
    variant: Callable[[Mapping[str, Any]], str] | None = None
    choose_by: str = "average"  # the validation metric the search maximises
    # the search stops after this many grid points in a row that do not raise the best
    # average validation accuracy (the authors' early stopping); None: the whole grid
    patience: int | None = None
    # adaptive: the class whose ``benchmark(plain)`` gives the step ``tint bench`` times
    trainer: type | None = None
    min_tasks: int = 1  # EMR: 2 (checked against the task set before any work)
    # searched parameters chosen per task, each on its own task's validation split (Consensus
    # TA's TALL-mask λt): name -> probe(pretrained, experts, value) -> a Merged whose task t
    # model is what task t's choice is scored on; the choice is then {task: value}
    per_task: Mapping[str, Callable[..., Merged]] = field(default_factory=dict)
    # adaptive: (encoder config, tasks, parameters, vectors dtype) -> its device memory
    # (``tintcli/memory.py``), checked against the device before any work
    memory: Callable[..., Any] | None = None
    # adaptive: how its own learned parts are saved and loaded back, beyond λ and tinted heads
    outcome: Outcome | None = None

    @property
    def positional(self) -> int:
        return 3 if self.adaptive else 2

    @property
    def defaults(self) -> dict[str, Any]:
        """The parameters the signature declares, with their defaults (null: chosen on
        validation, for the ``search`` ones)."""
        parameters = list(inspect.signature(self.fn).parameters.values())[self.positional:]
        return {p.name: None if p.name in self.search else
                (None if p.default is inspect.Parameter.empty else p.default)
                for p in parameters}

    def row(self, params: Mapping[str, Any]) -> str:
        """The reference row (the paper's) this configuration is; ``ORACLE`` for one that
        learns from the true labels."""
        return self.variant(params) if self.variant is not None else self.name

    def is_oracle(self, params: Mapping[str, Any]) -> bool:
        """Whether this configuration learns from the true labels: never a result, and every
        table marks it."""
        return self.row(params) == ORACLE


MERGE_METHODS: dict[str, Method] = {}
ORACLE = "oracle"  # the row of a configuration that learns from the true labels (variant=)


def declared_values(fn: Callable, scope: Mapping[str, Any]) -> dict[str, Any]:
    """The values of ``fn``'s declared parameters (those with a default in its signature) in
    ``scope``, its ``locals()`` on entry: what a method's resume checkpoint is keyed by,
    read from the one declaration, so no parameter can be left out of the key."""
    return {p.name: scope[p.name] for p in inspect.signature(fn).parameters.values()
            if p.default is not inspect.Parameter.empty}


def register(name: str, adaptive: bool = False, check: Check | None = None, *,
             pretty: str | None = None, paper: str | None = None, code: str | None = None,
             search: Mapping[str, tuple[float, ...]] | None = None,
             delta: Callable[..., StateDict] | None = None,
             variant: Callable[[Mapping[str, Any]], str] | None = None,
             choose_by: str = "average", patience: int | None = None,
             trainer: type | None = None, min_tasks: int = 1,
             per_task: Mapping[str, Callable[..., Merged]] | None = None,
             memory: Callable[..., Any] | None = None,
             outcome: Outcome | None = None) -> Callable[[Callable], Callable]:
    def add(fn: Callable) -> Callable:
        MERGE_METHODS[name] = Method(fn, adaptive, check, name, pretty or name, paper, code,
                                     dict(search or {}), delta, variant, choose_by, patience,
                                     trainer, min_tasks, dict(per_task or {}), memory,
                                     outcome)
        return fn

    return add


def get_method(name: str) -> Method:
    _discover()
    if name not in MERGE_METHODS:
        raise TintError(f"unknown merging method '{name}'; tint has: "
                        f"{', '.join(sorted(MERGE_METHODS))}")
    return MERGE_METHODS[name]


def check_parameters(name: str, params: Mapping[str, object],
                     encoder: nn.Module | None = None,
                     grid: Mapping[str, object] | None = None,
                     tasks: Sequence[str] | None = None,
                     patience: object = None) -> Method:
    """The method, once its config's parameters match its signature and pass its own check
    (before any work). With ``encoder``, checks that need the architecture (a module to
    tint) run too, and with ``tasks`` (the task names) those that need the task set. A
    searched parameter left null is checked at every point of its grid (``grid``: the
    config's, else the method's own); ``patience`` is the config's early stopping."""
    method = get_method(name)
    if patience is not None and not (isinstance(patience, int) and not isinstance(
            patience, bool) and patience >= 1):
        raise TintError(f"bad parameters for method '{name}': patience={patience} must be a "
                        "whole number >= 1 (grid points without a better validation "
                        "average before the search stops), or null for the whole grid")
    signature = inspect.signature(method.fn)
    try:  # binding, not calling: a TypeError from inside fn stays the bug it is
        bound = signature.bind(*[None] * method.positional, **params)
    except TypeError as err:
        accepted = list(signature.parameters)[method.positional:]
        raise TintError(f"bad parameters for method '{name}': {err}\n"
                        f"It takes: {', '.join(accepted) or 'no parameters'}") from err
    unknown = sorted(set(grid or {}) - set(method.search))
    if unknown:
        raise TintError(f"bad parameters for method '{name}': grid.{unknown[0]} names no "
                        "parameter it chooses on validation\nIt chooses: "
                        f"{', '.join(method.search) or 'nothing'}")
    bound.apply_defaults()
    values = dict(list(bound.arguments.items())[method.positional:])
    grids = {**method.search, **(grid or {})}
    chosen = [k for k in method.search if values.get(k) is None]
    for key in chosen:
        points = grids[key]
        if not isinstance(points, list | tuple) or not points:
            raise TintError(f"bad parameters for method '{name}': grid.{key}={points} must "
                            f"list the values of {key} to choose from on validation")
    if method.check is None:
        return method
    fixed = {k: v for k, v in values.items() if k not in chosen}
    points = [("", fixed)] + [(f" (in grid.{k})", {**fixed, k: point})
                              for k in chosen for point in grids[k]]
    for where, point in points:
        try:
            method.check(point, encoder, None if tasks is None else list(tasks))
        except ValueError as err:
            raise TintError(f"bad parameters for method '{name}': {err}{where}") from err
    return method


def merge(name: str, pretrained: StateDict, experts: Mapping[str, StateDict],
          **params) -> StateDict:
    """Run a data-free method by its registered name: its state dict (see ``run`` for the
    ``Merged`` of any method)."""
    method = check_parameters(name, params, tasks=list(experts))
    if method.adaptive:
        raise TintError(f"'{name}' adapts at test time: call tintcli.merging.adapt with an "
                        "AdaptationContext of unlabeled images")
    return _merged(method, method.fn(pretrained, experts, **params)).state


def adapt(name: str, pretrained: StateDict, experts: Mapping[str, StateDict], context,
          **params) -> Merged:
    """Run a test-time adaptive method by its registered name."""
    method = check_parameters(name, params, context.encoder, tasks=list(experts))
    if not method.adaptive:
        raise TintError(f"'{name}' is data-free: call tintcli.merging.merge")
    return method.fn(pretrained, experts, context, **params)


def run(name: str, pretrained: StateDict, experts: Mapping[str, StateDict], context=None,
        **params) -> Merged:
    """Any method, called one way: a ``Merged`` (``context``: the unlabeled adaptation data,
    for the adaptive methods; data-free ones ignore it)."""
    method = get_method(name)
    if method.adaptive:
        return adapt(name, pretrained, experts, context, **params)
    check_parameters(name, params, tasks=list(experts))
    return _merged(method, method.fn(pretrained, experts, **params))


def _merged(method: Method, out: StateDict | Merged) -> Merged:
    return out if isinstance(out, Merged) else Merged(method.name, out)


def _discover() -> None:
    """Import every module of ``tintcli/merging/`` and ``tintcli/adaptation/`` (importing a
    method's module registers it), on first use: a new method is one file plus one YAML,
    with no list to edit, and the registry never imports the method packages at import."""
    import importlib
    import pkgutil

    if _DISCOVERED:
        return
    modules: list[str] = []
    for package in ("tintcli.merging", "tintcli.adaptation"):
        path = importlib.import_module(package).__path__
        for module in pkgutil.iter_modules(path):
            modules.append(f"{package}.{module.name}")
            importlib.import_module(modules[-1])
    # the registry's order is the modules' (then each module's own), whatever a caller
    # imported first: tables, `tint bench` and the configs list the methods the same way
    rank = {name: i for i, name in enumerate(modules)}
    ordered = sorted(MERGE_METHODS.items(), key=lambda kv: rank.get(kv[1].fn.__module__, -1))
    MERGE_METHODS.clear()
    MERGE_METHODS.update(ordered)
    _DISCOVERED.append(True)


_DISCOVERED: list[bool] = []


def registered() -> dict[str, Method]:
    """Every method by name."""
    _discover()
    return MERGE_METHODS


def outcomes() -> dict[str, Outcome]:
    """Every declared outcome by the name it is saved under (``Outcome.tinted``)."""
    return {m.outcome.tinted: m.outcome for m in registered().values() if m.outcome is not None}


def register_configs() -> None:
    """Each method's declared parameters as the config ``method/declared/<name>`` (Hydra's
    ConfigStore), which its YAML presets extend: the signature is the one place they live."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, method in registered().items():
        search = ({"grid": {k: list(v) for k, v in method.search.items()},
                   "patience": method.patience} if method.search else {})
        store.store(group="method/declared", name=name,
                    node={"name": name, **method.defaults, **search}, provider="tint")
