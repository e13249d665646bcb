"""Merging methods: plain functions, state dicts in, state dict out.

A method is one small module that registers a function

    fn(pretrained: StateDict, experts: Mapping[str, StateDict], **params) -> StateDict

plus one YAML under ``conf/method/`` whose fields (other than ``name``) are ``params``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

from tintcli.errors import TintError
from tintcli.io import StateDict

MergeFn = Callable[..., StateDict]
MERGE_METHODS: dict[str, MergeFn] = {}


def register(name: str) -> Callable[[MergeFn], MergeFn]:
    def add(fn: MergeFn) -> MergeFn:
        MERGE_METHODS[name] = fn
        return fn

    return add


def get_method(name: str) -> MergeFn:
    if name not in MERGE_METHODS:
        raise TintError(f"unknown merging method '{name}'; tint has: "
                        f"{', '.join(sorted(MERGE_METHODS))}")
    return MERGE_METHODS[name]


def check_parameters(name: str, params: Mapping[str, object]) -> MergeFn:
    """The method, once its config's parameters match its signature (before any work)."""
    fn = get_method(name)
    signature = inspect.signature(fn)
    try:  # binding, not calling: a TypeError from inside fn stays the bug it is
        signature.bind(None, None, **params)
    except TypeError as err:
        accepted = list(signature.parameters)[2:]
        raise TintError(f"bad parameters for method '{name}': {err}\n"
                        f"It takes: {', '.join(accepted) or 'no parameters'}") from err
    return fn


def merge(name: str, pretrained: StateDict, experts: Mapping[str, StateDict],
          **params) -> StateDict:
    return check_parameters(name, params)(pretrained, experts, **params)


# Importing the modules registers their methods.
from tintcli.merging import task_arithmetic, ties, weight_averaging  # noqa: E402,F401
from tintcli.merging.task_arithmetic import task_arithmetic_merge  # noqa: E402
from tintcli.merging.task_vectors import add_task_vector, task_vector  # noqa: E402
from tintcli.merging.ties import ties_merge, trim_top_k  # noqa: E402
from tintcli.merging.weight_averaging import weight_average  # noqa: E402

__all__ = ["MERGE_METHODS", "register", "get_method", "check_parameters", "merge", "task_vector",
           "add_task_vector", "weight_average", "task_arithmetic_merge", "ties_merge",
           "trim_top_k"]
