"""tint: a command-line experiment runner for multi-task model merging.

The merging methods are plain functions on state dicts, importable from here:

    from tintcli import task_arithmetic_merge, ties_merge, weight_average

and so are the test-time adaptive ones (``adamerging_merge``, ``tinting_merge``), which also
take an ``AdaptationContext`` of unlabeled images (``tintcli.adaptation``).
"""

from __future__ import annotations

__version__ = "0.1.0"

_MERGING = ("task_vector", "add_task_vector", "weight_average", "task_arithmetic_merge",
            "ties_merge", "ties_task_vectors", "trim_top_k", "adamerging_merge", "tinting_merge",
            "merge", "adapt", "MERGE_METHODS")


def __getattr__(name: str):
    # Lazy, so that `tint --help` does not pay for importing torch.
    if name in _MERGING:
        from tintcli import merging

        return getattr(merging, name)
    raise AttributeError(f"module 'tintcli' has no attribute {name!r}")


__all__ = ["__version__", *_MERGING]
