"""The registry of merging methods, data-free (``tintcli/merging/``) and test-time adaptive
(``tintcli/adaptation/``): one name per method, its function, and its own value check.

A data-free method registers

    fn(pretrained: StateDict, experts: Mapping[str, StateDict], **params) -> StateDict

and an adaptive one (``adaptive=True``) also takes the unlabeled adaptation data:

    fn(pretrained, experts, context: AdaptationContext, **params) -> Adapted

Its signature declares its parameters; ``check=`` names a function that checks their values
(helpers in ``tintcli/checks.py``). The YAML under ``conf/method/`` gives the defaults.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from tintcli.errors import TintError
from tintcli.io import StateDict

Check = Callable[[dict, nn.Module | None], None]  # (parameters, encoder or None)


@dataclass(frozen=True)
class Method:
    fn: Callable
    adaptive: bool  # needs unlabeled test images (an AdaptationContext) after the experts
    # checks parameter values before any work (raises ValueError naming the bad one), so that
    # a typo fails at once, not deep inside torch or after the table's earlier methods ran;
    # called with the parameters and, where known, the encoder (an architecture, no weights)
    check: Check | None = None

    @property
    def positional(self) -> int:
        return 3 if self.adaptive else 2


MERGE_METHODS: dict[str, Method] = {}


def register(name: str, adaptive: bool = False,
             check: Check | None = None) -> Callable[[Callable], Callable]:
    def add(fn: Callable) -> Callable:
        MERGE_METHODS[name] = Method(fn, adaptive, check)
        return fn

    return add


def get_method(name: str) -> Method:
    _discover()
    if name not in MERGE_METHODS:
        raise TintError(f"unknown merging method '{name}'; tint has: "
                        f"{', '.join(sorted(MERGE_METHODS))}")
    return MERGE_METHODS[name]


def check_parameters(name: str, params: Mapping[str, object],
                     encoder: nn.Module | None = None) -> Method:
    """The method, once its config's parameters match its signature and pass its own check
    (before any work). With ``encoder``, checks that need the architecture (a module to
    tint) run too."""
    method = get_method(name)
    signature = inspect.signature(method.fn)
    try:  # binding, not calling: a TypeError from inside fn stays the bug it is
        bound = signature.bind(*[None] * method.positional, **params)
    except TypeError as err:
        accepted = list(signature.parameters)[method.positional:]
        raise TintError(f"bad parameters for method '{name}': {err}\n"
                        f"It takes: {', '.join(accepted) or 'no parameters'}") from err
    if method.check is not None:
        bound.apply_defaults()
        values = dict(list(bound.arguments.items())[method.positional:])
        try:
            method.check(values, encoder)
        except ValueError as err:
            raise TintError(f"bad parameters for method '{name}': {err}") from err
    return method


def merge(name: str, pretrained: StateDict, experts: Mapping[str, StateDict],
          **params) -> StateDict:
    """Run a data-free method by its registered name."""
    method = check_parameters(name, params)
    if method.adaptive:
        raise TintError(f"'{name}' adapts at test time: call tintcli.merging.adapt with an "
                        "AdaptationContext of unlabeled images")
    return method.fn(pretrained, experts, **params)


def adapt(name: str, pretrained: StateDict, experts: Mapping[str, StateDict], context,
          **params):
    """Run a test-time adaptive method by its registered name; returns an ``Adapted``."""
    method = check_parameters(name, params, context.encoder)
    if not method.adaptive:
        raise TintError(f"'{name}' is data-free: call tintcli.merging.merge")
    return method.fn(pretrained, experts, context, **params)


def _discover() -> None:
    """Import every module of ``tintcli/merging/`` and ``tintcli/adaptation/`` (importing a
    method's module registers it), on first use: a new method is one file plus one YAML,
    with no list to edit, and the registry never imports the method packages at import."""
    import importlib
    import pkgutil

    if _DISCOVERED:
        return
    for package in ("tintcli.merging", "tintcli.adaptation"):
        path = importlib.import_module(package).__path__
        for module in pkgutil.iter_modules(path):
            importlib.import_module(f"{package}.{module.name}")
    _DISCOVERED.append(True)


_DISCOVERED: list[bool] = []


def registered() -> dict[str, Method]:
    """Every method by name."""
    _discover()
    return MERGE_METHODS
