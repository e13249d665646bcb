"""Choosing a method's parameters on the validation split, as its authors did.

A method declares which parameters are chosen and over which grid (``register(search=...)``);
a config value of null means "choose", a number fixes it. The points of the grid (the
product, where several are searched) are merged and scored on validation in order; the best
by the method's metric (``choose_by``; ties: the first) is kept, and every point scored and
the choice go to results.json. Test is never looked at here.

Where the authors stop early (``patience``: ISO's sweep), the search stops after that many
points in a row whose average validation accuracy is not above the best so far (the
authors' ``early_stopping``, which watches the plain average even where the choice is by
normalised accuracy), and chooses among the points it scored.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

from tintcli.errors import TintError
from tintcli.io import StateDict
from tintcli.merged import Merged
from tintcli.merging.task_vectors import add_task_vector
from tintcli.methods import Method, run

Score = Callable[[Merged], dict[str, float]]  # per-task validation accuracy of a merged model


def searched(method: Method, params: Mapping[str, Any],
             grid: Mapping[str, Any] | None) -> dict[str, tuple]:
    """The parameters this configuration leaves to validation, with their grids (the
    config's ``grid`` where it gives one, else the method's own)."""
    grids = {**method.search, **(grid or {})}
    return {k: tuple(grids[k]) for k in method.search if params.get(k) is None}


def choose(method: Method, pretrained: StateDict, experts: Mapping[str, StateDict],
           params: Mapping[str, Any], grid: Mapping[str, Any] | None, score: Score,
           normalize: Mapping[str, float] | None = None,
           on_point: Callable[[int, int], None] | None = None,
           patience: int | None = None) -> Merged:
    """The method's ``Merged`` at the grid point with the best validation score (the plain
    merge where nothing is searched). ``normalize``: each task's expert accuracy, for methods
    that choose by normalised accuracy. Parameters the method chooses per task
    (``method.per_task``) are chosen first, each task by its own validation accuracy on the
    method's probe; the grid over the others then runs with those choices fixed.
    ``patience``: the early stopping (None: the whole grid)."""
    grids = searched(method, params, grid)
    if not grids:
        return run(method.name, pretrained, experts, **params)
    fixed = {k: v for k, v in params.items() if k not in grids}
    per_task = {k: grids.pop(k) for k in list(grids) if k in method.per_task}
    if grids and method.choose_by == "normalized_average" and normalize is None:
        raise TintError(f"{method.pretty} chooses {', '.join(grids)} by normalised accuracy: "
                        "give each task's expert accuracy on validation (normalize=)")
    points = [dict(zip(grids, values, strict=True))
              for values in itertools.product(*grids.values())]
    total = sum(len(v) for v in per_task.values()) + (len(points) if grids else 0)
    done = [0]

    def step() -> None:
        done[0] += 1
        if on_point is not None:
            on_point(done[0], total)

    per_task_info = {}
    for key, values in per_task.items():
        fixed[key], per_task_info[key] = _choose_per_task(
            method.per_task[key], pretrained, experts, values, score, step)
    if not grids:
        merged, point, best_value, trials = (run(method.name, pretrained, experts, **fixed), {},
                                             None, [])
    else:
        if method.delta is not None and set(grids) == {"alpha"}:  # θ0 + α·Δ: one Δ for all
            delta = method.delta(pretrained, experts, **fixed)

            def make(point: dict) -> Merged:
                return Merged(method.name, add_task_vector(pretrained, delta, point["alpha"]))
        else:
            def make(point: dict) -> Merged:
                return run(method.name, pretrained, experts, **fixed, **point)

        trials, best, best_value = [], None, None
        stop = EarlyStop(patience)
        for point in points:
            merged = make(point)
            accuracy = score(merged)
            value = metric(accuracy, method.choose_by, normalize)
            trials.append({"params": point, "value": value, "accuracy": accuracy})
            if best_value is None or value > best_value:
                best, best_value = (point, merged), value
            step()
            if stop.after(accuracy):
                break
        point, merged = best
    merged.info["search"] = {"split": "val", "metric": method.choose_by,
                             "grid": {k: list(v) for k, v in grids.items()},
                             "chosen": point, "value": best_value, "trials": trials,
                             "stopping": EarlyStop.record(patience, len(trials), len(points))}
    if per_task_info:
        merged.info["search"]["per_task"] = per_task_info
    return merged


class EarlyStop:
    """The authors' early stopping (iso-merging's ``evaluate_task_vector``): the best average
    validation accuracy so far starts at 0; a point above it resets the count, any other
    adds one, and the search ends at the ``patience``-th in a row."""

    def __init__(self, patience: int | None):
        self.patience, self.best, self.since = patience, 0.0, 0

    def after(self, accuracy: Mapping[str, float]) -> bool:
        """Whether the search stops after this point."""
        if self.patience is None:
            return False
        average = metric(accuracy, "average")
        if average > self.best:
            self.best, self.since = average, 0
        else:
            self.since += 1
        return self.since >= self.patience

    @staticmethod
    def record(patience: int | None, scored: int, points: int) -> dict:
        """What results.json says of it: the rule, and how much of the grid was scored."""
        if patience is None:
            return {"rule": "whole grid", "scored": scored, "of": points}
        return {"rule": f"early stopping: {patience} points in a row without a better "
                        "average validation accuracy", "patience": patience,
                "scored": scored, "of": points}


def _choose_per_task(probe: Callable[..., Merged], pretrained: StateDict,
                     experts: Mapping[str, StateDict], values: tuple, score: Score,
                     step: Callable[[], None]
                     ) -> tuple[dict[str, Any], dict]:
    """{task: the value whose probe model scores best on that task's validation split} (ties:
    the first), and the record of every value's per-task accuracies."""
    trials, chosen, best = [], {}, {}
    for value in values:
        accuracy = score(probe(pretrained, experts, value))
        trials.append({"value": value, "accuracy": accuracy})
        for task, acc in accuracy.items():
            if task not in best or acc > best[task]:
                chosen[task], best[task] = value, acc
        step()
    return chosen, {"grid": list(values), "chosen": chosen, "trials": trials}


def metric(accuracy: Mapping[str, float], by: str,
           normalize: Mapping[str, float] | None = None) -> float:
    """A validation score: the ``average`` accuracy, or the ``normalized_average`` (each task's
    accuracy over its expert's, ``normalize``) the authors of TSV, ISO, LiNeS and TALL masks
    choose by."""
    if by == "normalized_average":
        values = [accuracy[t] / normalize[t] for t in accuracy if normalize.get(t)]
        return sum(values) / max(len(values), 1)
    return sum(accuracy.values()) / max(len(accuracy), 1)
