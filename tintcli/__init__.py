"""tint: a command-line experiment runner for multi-task model merging.

The merging methods are plain functions on state dicts, importable from here:

    from tintcli import task_arithmetic_merge, ties_merge, weight_average

and so are the test-time adaptive ones (``adamerging_merge``, ``tinting_merge``, defined in
``tintcli/adaptation/``), which also take an ``AdaptationContext`` of unlabeled images.
"""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {  # name -> the module that defines it
    **dict.fromkeys(("task_vector", "add_task_vector", "weight_average",
                     "task_arithmetic_merge", "ties_merge", "ties_task_vectors", "trim_top_k"),
                    "tintcli.merging"),
    "adamerging_merge": "tintcli.adaptation.adamerging",
    "tinting_merge": "tintcli.adaptation.tinting",
    **dict.fromkeys(("merge", "adapt", "MERGE_METHODS"), "tintcli.methods"),
}
_MERGING = tuple(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so that `tint --help` does not pay for importing torch.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tintcli' has no attribute {name!r}")


__all__ = ["__version__", *_MERGING]
