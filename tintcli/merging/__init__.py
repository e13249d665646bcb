"""Merging methods: plain functions, state dicts in, state dict out.

A data-free method is one small module that registers a function

    fn(pretrained: StateDict, experts: Mapping[str, StateDict], **params) -> StateDict

plus one YAML under ``conf/method/`` whose fields (other than ``name`` and ``label``) are
``params``. A test-time adaptive method (AdaMerging, Model Tinting) registers with
``adaptive=True`` and also takes the unlabeled adaptation data:

    fn(pretrained, experts, context: AdaptationContext, **params) -> Adapted
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


# Importing the modules registers their methods.
from tintcli.merging import (  # noqa: E402,F401
    adamerging,
    task_arithmetic,
    ties,
    tinting,
    weight_averaging,
)
from tintcli.merging.adamerging import adamerging_merge  # noqa: E402
from tintcli.merging.task_arithmetic import task_arithmetic_merge  # noqa: E402
from tintcli.merging.task_vectors import add_task_vector, task_vector  # noqa: E402
from tintcli.merging.ties import ties_merge, ties_task_vectors, trim_top_k  # noqa: E402
from tintcli.merging.tinting import tinting_merge  # noqa: E402
from tintcli.merging.weight_averaging import weight_average  # noqa: E402

__all__ = ["MERGE_METHODS", "Method", "register", "get_method", "check_parameters", "merge",
           "adapt", "task_vector", "add_task_vector", "weight_average", "task_arithmetic_merge",
           "ties_merge", "ties_task_vectors", "trim_top_k", "adamerging_merge", "tinting_merge"]
