"""What a search maximises: the ``objective`` a run's config names, and its value in a
finished run's rows. Checked by the sweep callbacks before any trial (tracking.py) and by
each run (recipes/merge.py)."""

from __future__ import annotations

from omegaconf import DictConfig

from tintcli.errors import TintError


def check_objective(cfg: DictConfig, searching: bool = False) -> None:
    """``objective``: which row (``method``: a method name; null = the last method row), which
    split (``val`` to choose by, as every search must; ``test``) and which ``metric``
    (average, normalized_average, or a task's name)."""
    spec = cfg.get("objective") or {}
    split, metric = spec.get("split", "val"), str(spec.get("metric", "average"))
    if split not in ("val", "test"):
        raise TintError(f"objective.split={split} must be val or test")
    if metric not in ("average", "normalized_average", *cfg.tasks.names):
        raise TintError(f"objective.metric={metric} must be average, normalized_average or a "
                        "task of the task set")
    if searching and split == "test":
        raise TintError("a search chooses on validation, never on test: set objective.split=val")
    if searching and split == "val" and not (cfg.get("eval") or {}).get("validation", False):
        raise TintError("objective.split=val needs every row scored on validation\nSet "
                        "eval.validation=true (the search presets do).")


def objective(payload: dict, cfg: DictConfig) -> float | None:
    """The value the config's ``objective`` names, from a finished run's rows (None when the
    run did not score it: a plain run without eval.validation)."""
    spec = cfg.get("objective") or {}
    merged = [r for r in payload["rows"] if r["kind"] == "merged"]
    if spec.get("method"):
        merged = [r for r in merged if r.get("method") == spec.method]
    if not merged:
        return None
    row = merged[-1] if spec.get("split", "val") == "test" else merged[-1].get("validation")
    if row is None:
        return None
    metric = str(spec.get("metric", "average"))
    value = row["accuracy"].get(metric) if metric in row.get("accuracy", {}) else row.get(metric)
    return None if value is None else float(value)
