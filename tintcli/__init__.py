"""tint: a command-line experiment runner for multi-task model merging.

Every registered merging method's function is importable from here by its own name, data-free
(state dicts in, state dict out) and test-time adaptive alike (those also take an
``AdaptationContext`` of unlabeled images):

    from tintcli import task_arithmetic_merge, ties_merge, tsv_merge, adamerging_merge

and so are the registry's entry points (``run``, ``merge``, ``adapt``, ``registered``) and the
task-vector helpers. The method names come from the registry (``tintcli/methods.py``), so a new
method is exported with no list to edit.
"""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {  # name -> the module that defines it (the methods' functions: the registry's)
    **dict.fromkeys(("task_vector", "add_task_vector", "ties_task_vectors", "trim_top_k"),
                    "tintcli.merging"),
    **dict.fromkeys(("run", "merge", "adapt", "registered", "MERGE_METHODS"), "tintcli.methods"),
}


def _method_functions() -> dict:
    from tintcli.methods import registered

    return {method.fn.__name__: method.fn for method in registered().values()}


def __getattr__(name: str):
    # Lazy, so that `tint --help` does not pay for importing torch.
    import importlib
    import importlib.util

    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    # a submodule (`from tintcli import cache`) is the import system's to load, not a method
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is None:
        functions = _method_functions()
        if name in functions:
            return functions[name]
    raise AttributeError(f"module 'tintcli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_method_functions()])


__all__ = ["__version__", *_EXPORTS]  # and every registered method's function (dir(tintcli))
