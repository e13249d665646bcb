"""Rich tables for the terminal: results, benchmark realism, sweeps; and the mean ± std over
seeds they show (``mean_std``, also what ``tint table`` shows)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


def mean_std(values: Sequence[float], single: float | None = None
             ) -> tuple[float | None, float | None]:
    """The mean and the sample std (n - 1) of one number over seeds; (None, None) with no
    values. A lone value has no spread: its std is ``single`` (``tint table`` keeps None and
    shows no ±; the sweep summary, tracking.over_seeds, records 0.0)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else single


def progress_bar(console: Console) -> Progress:
    """The bar every long job shows: label, bar, steps done, a free ``info`` field, time."""
    return Progress(TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), console=console, transient=False)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def results_table(rows: list[dict[str, Any]], tasks: list[str], title: str,
                  width: int | None = None) -> Table:
    """Top-1 accuracy in %: one row per zero-shot / experts / merged encoder, one column per
    task. Where that would not fit ``width`` (an 80-column terminal with 8 tasks), the table
    is transposed: one row per task, one column per method."""
    caption = "top-1 accuracy %; norm = mean of accuracy / the task's expert accuracy"
    wide = (max(len(r["name"]) for r in rows) + sum(max(5, len(t)) for t in tasks)
            + 11 + 3 * (len(tasks) + 3))
    if width is not None and wide > width:
        return _by_task(rows, tasks, title, caption)
    table = Table(title=title, title_justify="left", caption=caption)
    table.add_column("method", no_wrap=True)
    for task in tasks:
        table.add_column(task, justify="right")
    table.add_column("avg", justify="right", style="bold")
    table.add_column("norm", justify="right")
    for i, row in enumerate(rows):
        style = "dim" if row["kind"] == "reference" else None
        table.add_row(row["name"], *[_pct(row["accuracy"][t]) for t in tasks],
                      _pct(row["average"]), _pct(row["normalized_average"]), style=style,
                      end_section=i + 1 < len(rows) and rows[i + 1]["kind"] != row["kind"])
    return table


def _by_task(rows: list[dict[str, Any]], tasks: list[str], title: str, caption: str) -> Table:
    table = Table(title=title, title_justify="left", caption=caption)
    table.add_column("task", no_wrap=True)
    for row in rows:
        table.add_column(row["name"], justify="right", overflow="fold",
                         style="dim" if row["kind"] == "reference" else None)
    for i, task in enumerate(tasks):
        table.add_row(task, *[_pct(r["accuracy"][task]) for r in rows],
                      end_section=i + 1 == len(tasks))
    table.add_row("avg", *[_pct(r["average"]) for r in rows], style="bold")
    table.add_row("norm", *[_pct(r["normalized_average"]) for r in rows])
    return table


def realism_text(realism: dict[str, Any]) -> Text:
    """The built-in benchmark's realism targets (DEVELOPERS.md): are they met?"""
    text = Text("benchmark realism: ", style="bold")
    for i, check in enumerate(realism["checks"]):
        mark, style = ("✓", "green") if check["ok"] else ("✗", "red")
        text.append(("  ·  " if i else "") + f"{check['what']} {mark}", style=style)
    sweep = realism["task_arithmetic_sweep"]
    text.append("\ntask arithmetic λ sweep (test): " + "  ".join(
        f"{lam}:{_pct(avg)}" for lam, avg in sweep.items()), style="dim")
    if realism.get("best_lambda_chosen_on"):
        text.append(f"\nbest λ {realism['best_lambda']} chosen on the validation split",
                    style="dim")
    return text


def sweep_table(jobs: list[dict[str, Any]]) -> Table:
    """Every multirun job's merged rows side by side; the best is marked by its validation
    average (rows scored with eval.validation=true), never by test."""
    merged = [[r for r in job["rows"] if r["kind"] == "merged"] for job in jobs]
    scored = [r["validation"]["average"] for rows in merged for r in rows if r.get("validation")]
    best = max(scored) if scored else None
    caption = ("★ = best validation average; avg and norm are on test" if scored else
               "no row was scored on validation (eval.validation=true), so none is marked best")
    table = Table(title="sweep summary", title_justify="left", caption=caption)
    table.add_column("job", justify="right")
    table.add_column("overrides")
    table.add_column("method")
    if scored:
        table.add_column("val", justify="right")
    table.add_column("avg", justify="right", style="bold")
    table.add_column("norm", justify="right")
    for job, rows in zip(jobs, merged, strict=True):
        for row in rows:
            val = (row.get("validation") or {}).get("average")
            mark = " ★" if best is not None and val == best else ""
            cells = [_pct(val) + mark] if scored else []
            name = Path(job["dir"]).name if job.get("dir") else "-"
            table.add_row(name, " ".join(job["overrides"]) or "-", row["name"], *cells,
                          _pct(row["average"]), _pct(row["normalized_average"]))
    return table


def failed_table(failed: list[dict[str, Any]]) -> Table:
    """The sweep's jobs that failed, and why (each one's error.json)."""
    table = Table(title="failed jobs", title_justify="left", title_style="bold red")
    table.add_column("job", justify="right")
    table.add_column("overrides")
    table.add_column("error")
    for job in failed:
        table.add_row(Path(job["dir"]).name, " ".join(job["overrides"]) or "-", job["error"])
    return table


def _pm(stat: dict[str, float | None]) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def seeds_table(group: dict[str, Any], width: int | None = None) -> Table:
    """Mean ± std over seeds per method; per-task means too where the width allows."""
    tasks = group["tasks"]
    names = max(len(r["name"]) for r in group["rows"])
    per_task = width is None or names + 30 + sum(max(5, len(t)) + 3 for t in tasks) <= width
    title = (f"mean ± std over seeds {', '.join(map(str, group['seeds']))}"
             + (f" · {' '.join(group['overrides'])}" if group["overrides"] else ""))
    table = Table(title=title, title_justify="left", caption="top-1 accuracy %")
    table.add_column("method", no_wrap=True)
    for task in tasks if per_task else []:
        table.add_column(task, justify="right")
    table.add_column("avg", justify="right", style="bold")
    table.add_column("norm", justify="right")
    for i, row in enumerate(group["rows"]):
        cells = [_pct(row["accuracy"][t]["mean"]) for t in tasks] if per_task else []
        table.add_row(row["name"], *cells, _pm(row["average"]), _pm(row["normalized_average"]),
                      style="dim" if row["kind"] == "reference" else None,
                      end_section=i + 1 < len(group["rows"])
                      and group["rows"][i + 1]["kind"] != row["kind"])
    return table
