"""Run records: results.json in each run directory, W&B when enabled, sweep summaries."""

from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from tintcli.errors import Interrupted, TintError, fail
from tintcli.io import write_json
from tintcli.objective import check_objective
from tintcli.paths import ERROR, PACKAGE_DIR, PARTIAL, RESULTS

SWEEP: dict[str, Any] = {}  # this process's multirun: its folder, and jobs and failures
_PACKAGES = ("tintcli", "torch", "timm", "datasets", "hydra-core", "omegaconf", "safetensors",
             "numpy")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["tint_git_commit"] = _git_commit()
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


RUN_ID = secrets.token_hex(2)  # one per process: run directories stay apart within a second
_CLAIMED: dict[Path, FileLock] = {}


def register_resolvers() -> None:
    """``${tint_run_id:}`` in the run-directory patterns (conf/*.yaml)."""
    if not OmegaConf.has_resolver("tint_run_id"):
        OmegaConf.register_new_resolver("tint_run_id", lambda: RUN_ID)


def claim_run_dir(run_dir: Path, overwrite: bool, console: Console | None = None
                  ) -> Path | None:
    """Make ``run_dir`` this run's, before any work, or say why it cannot be: it must be
    writable, no other tint run may be using it (a lock held until this process ends), and a
    finished run's results are replaced only with ``overwrite=true``. Rows an interrupted run
    left there are kept, renamed, never deleted; returns where (None: there were none)."""
    run_dir = Path(run_dir).resolve()
    if run_dir not in _CLAIMED:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=run_dir):
                pass
            lock = FileLock(str(run_dir / ".tint-run.lock"), timeout=0)
            lock.acquire()
        except Timeout as err:
            raise TintError(f"run directory {run_dir} is in use by another tint run\n"
                            "Choose another hydra.run.dir, or wait for that run to end.") from err
        except OSError as err:
            raise TintError(f"cannot use {run_dir} as the run directory: "
                            f"{err.strerror or err}\nPass a writable hydra.run.dir=<folder>."
                            ) from err
        _CLAIMED[run_dir] = lock
    if (run_dir / RESULTS).exists() and not overwrite:
        raise TintError(f"{run_dir / RESULTS} already exists: this run directory holds a "
                        "finished run\nChoose another hydra.run.dir, or pass overwrite=true "
                        "to replace it.")
    partial = run_dir / PARTIAL
    if partial.exists():
        kept = next(run_dir / f"results.partial.{n}.json" for n in range(1, 10_000)
                    if not (run_dir / f"results.partial.{n}.json").exists())
        partial.rename(kept)
        (console or Console(stderr=True)).print(
            f"[yellow]note:[/] an earlier run's unfinished rows are kept as {kept.name}")
        _KEPT[run_dir] = kept
    return _KEPT.get(run_dir)


_KEPT: dict[Path, Path] = {}  # run directory -> where its earlier run's rows were kept


class ClaimRunDir(Callback):
    """Claims the run directory before Hydra writes its ``.hydra/`` into it, so a refused
    run leaves a finished or running one untouched, and a bad directory is one clear line."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            claim_run_dir(Path(config.hydra.run.dir), bool(config.get("overwrite", False)))
        except TintError as err:
            fail(err)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        SWEEP.update({"dir": str(sweep_dir), "started": time.time()})
        if "optuna" in str(config.hydra.sweeper.get("_target_", "")).lower():
            try:  # before any trial: a search that cannot choose right must not start
                check_objective(config, searching=True)
            except TintError as err:
                fail(err)
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=sweep_dir):
                pass
        except OSError as err:
            fail(TintError(f"cannot use {sweep_dir} as the sweep directory: "
                           f"{err.strerror or err}\nPass a writable hydra.sweep.dir=<folder>."))


def record_failure(err: Exception, multirun: bool) -> TintError:
    """Write a job's error to ``error.json`` in its run directory (with the traceback when it
    is not a TintError: a bug), say so in a sweep, and return the error to report at the end."""
    import traceback

    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    first, *rest = str(err).splitlines() or [type(err).__name__]
    if not isinstance(err, TintError):
        first = f"{type(err).__name__}: {first}"
    overrides = list(hydra_cfg.overrides.task)
    payload = {"error": first, "details": rest, "overrides": overrides,
               "job": hydra_cfg.job.get("num"), "traceback": None if isinstance(err, TintError)
               else traceback.format_exc()}
    if not (run_dir / RESULTS).exists():  # a finished run's folder is never touched
        try:
            write_json(run_dir / ERROR, payload)
        except OSError:
            pass  # the error is still printed, and reported at the end
    if multirun and not isinstance(err, Interrupted):  # Ctrl-C ends the sweep instead
        Console(stderr=True).print(f"[bold red]job {payload['job']} failed[/] "
                                   f"({' '.join(overrides) or 'no overrides'}): {first}\n"
                                   "  the sweep goes on", soft_wrap=True, highlight=False)
    return err if isinstance(err, TintError) else TintError(first)


def sweep_failure() -> TintError | None:
    """The one error a finished sweep with failed jobs ends with (None: no sweep, or none
    failed). Its jobs may have run in other processes: their error.json files tell."""
    firsts = SWEEP.get("errors") or []
    if not firsts:
        return None
    return TintError(f"{len(firsts)} of {SWEEP.get('jobs', len(firsts))} sweep jobs failed: "
                     f"{firsts[0]}" + (f" (and {len(firsts) - 1} more)" if len(firsts) > 1
                                       else "") +
                     f"\nThe others finished. {SWEEP['dir']}/sweep.json lists every job; each "
                     "failed job's error.json holds its error.")


def write_results(run_dir: Path, payload: dict[str, Any]) -> Path:
    path = run_dir / RESULTS
    write_json(path, payload)
    return path


def wandb_mode(configured: str) -> str:
    """``auto``: online where W&B credentials are configured (WANDB_API_KEY, or a netrc entry
    for api.wandb.ai as ``wandb login`` writes), else offline, to sync later."""
    if configured != "auto":
        return configured
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc

        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def _sweep_group() -> str | None:
    """The sweep's folder name, shared by its jobs wherever a launcher runs them."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


class Tracker:
    """One run's Weights & Biases mirror, live: the resolved config at start, the adaptation
    loss and each task's lambda at every step, each row's accuracies as its method finishes,
    the results table and the lambda heatmaps at the end. Runs of one sweep share a ``group``
    (the sweep folder), ``job_type`` is the method. A W&B failure warns once and stops the
    mirror; it never costs the run (results.json is tint's record). wandb is imported only
    when enabled."""

    def __init__(self, run: Any = None, console: Console | None = None):
        self.run, self.console = run, console or Console(stderr=True)

    @classmethod
    def start(cls, cfg: DictConfig, run_dir: Path, overrides: list[str],
              console: Console | None = None) -> Tracker:
        tracker = cls(None, console)
        wcfg = cfg.tracking.wandb
        if not wcfg.enabled:
            return tracker
        mode = wandb_mode(str(wcfg.mode))

        def init() -> Any:
            import wandb

            method = cfg.method.name
            name = " ".join([method, *(o for o in overrides if not o.startswith("method="))])
            return wandb.init(project=wcfg.project, entity=wcfg.entity, mode=mode,
                              dir=str(run_dir), group=_sweep_group(),
                              job_type=method, name=name[:120] or run_dir.name,
                              config=OmegaConf.to_container(cfg, resolve=True),
                              reinit="finish_previous",  # a sweep's next job, one process
                              settings=wandb.Settings(silent=True))  # tint says where it is

        tracker.run = tracker._safely(init)
        if tracker.run is not None and mode == "offline":
            tracker.console.print(f"W&B: offline (no credentials found); to upload: wandb sync "
                                  f"{run_dir / 'wandb'}/offline-run-*", soft_wrap=True)
        elif tracker.run is not None:
            tracker.console.print(f"W&B: {tracker.run.url}", soft_wrap=True)
        return tracker

    def _safely(self, fn) -> Any:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - any W&B failure: warn once, keep running
            self.console.print(f"[yellow]warning:[/] W&B logging stopped ({type(err).__name__}:"
                               f" {err}); the results are in results.json", soft_wrap=True)
            self.run = None
            return None

    def step(self, method: str, done: int, total: int, loss: float,
             lambdas: list[float], tasks: list[str]) -> None:
        if self.run is None:
            return
        metrics = {f"{method}/loss": loss, f"{method}/progress": done / max(total, 1),
                   **{f"{method}/lambda/{t}": lam for t, lam in zip(tasks, lambdas, strict=True)}}
        self._safely(lambda: self.run.log(metrics))

    def row(self, row: dict[str, Any]) -> None:
        if self.run is None:
            return
        values = {f"{row['name']}/average": row["average"],
                  **{f"{row['name']}/{t}": acc for t, acc in row["accuracy"].items()}}
        self._safely(lambda: self.run.summary.update(values))

    def finish(self, payload: dict[str, Any] | None, run_dir: Path, failed: bool = False) -> None:
        if self.run is None:
            return

        def end() -> None:
            import wandb

            if payload is not None:
                tasks = payload["tasks"]
                table = wandb.Table(columns=["row", *tasks, "average", "normalized_average"])
                for row in payload["rows"]:
                    table.add_data(row["name"], *[row["accuracy"][t] for t in tasks],
                                   row["average"], row["normalized_average"])
                images = {f"lambdas/{p.parent.name}": wandb.Image(str(p))
                          for p in sorted(run_dir.glob("adapted/*/lambdas.png"))}
                self.run.log({"results": table, **images})
            self.run.finish(exit_code=1 if failed else 0)

        self._safely(end)
        self.run = None


class SweepSummary(Callback):
    """After a multirun, print one table of every job's averages and write sweep.json; jobs
    that differ only in ``seed`` are also aggregated into mean ± std per method. Only this
    sweep's own jobs count: results an earlier sweep left in the same folder are listed apart
    ("not part of this sweep") and never averaged in."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        expected = sweep_jobs(config)
        jobs, failed, others = [], [], []
        folders = sorted({p.parent for name in (RESULTS, ERROR)
                          for p in sweep_dir.glob(f"*/{name}")}, key=_job_num)
        for folder in folders:
            record = _job_record(folder)
            if record is None:
                continue
            if not _of_this_sweep(record, folder, expected):
                others.append(record)
            elif "error" in record:
                failed.append(record)
            else:
                jobs.append(record)
        SWEEP.update({"jobs": len(jobs) + len(failed), "errors": [f["error"] for f in failed]})
        if not jobs and not failed and not others:
            return
        seeds = over_seeds(jobs)
        write_json(sweep_dir / "sweep.json", {"jobs": jobs, "failed": failed,
                                              "over_seeds": seeds, "not_part_of_sweep": others})
        from tintcli.report import failed_table, seeds_table, sweep_table

        console = Console()
        if jobs:
            console.print(sweep_table(jobs))
        if failed:
            console.print(failed_table(failed))
        for group in seeds:
            console.print(seeds_table(group, console.width))
        if others:
            console.print(f"[yellow]not part of this sweep[/] (left in {sweep_dir} by an earlier "
                          "sweep; not summarised): " + ", ".join(
                              f"{Path(o['dir']).name} ({' '.join(o['overrides']) or '-'})"
                              for o in others), soft_wrap=True)


def sweep_jobs(config: DictConfig) -> list[frozenset[str]] | None:
    """The override sets of this sweep's jobs in job-number order, as Hydra's basic sweeper
    expands its parameter list (``hydra.sweeper.params`` and the command line); None for a
    search sweeper, whose trials are not known in advance."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
        return None
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
    return [frozenset(job) for batch in BasicSweeper.split_arguments(overrides, None)
            for job in batch]


def _job_record(folder: Path) -> dict[str, Any] | None:
    """A job folder's results (or its error), as the summary lists it; None if unreadable."""
    try:
        if (folder / RESULTS).exists():
            result = json.loads((folder / RESULTS).read_text())
            return {"dir": str(folder), "overrides": result.get("overrides", []),
                    "seed": result.get("seed"), "tasks": result["tasks"], "rows": result["rows"]}
        error = json.loads((folder / ERROR).read_text())
        return {"dir": str(folder), "overrides": error.get("overrides", []),
                "error": error["error"]}
    except (OSError, ValueError, KeyError, TypeError):
        Console(stderr=True).print(f"[yellow]warning:[/] skipped {folder}: its results are "
                                   "not readable", soft_wrap=True)
        return None


def _of_this_sweep(record: dict[str, Any], folder: Path,
                   expected: list[frozenset[str]] | None) -> bool:
    """Job n of the basic sweeper's list, with job n's overrides (a folder named otherwise:
    any job's); for a search, a job written since it started."""
    overrides = frozenset(record["overrides"])
    if expected is not None:
        if folder.name.isdigit():
            return int(folder.name) < len(expected) and expected[int(folder.name)] == overrides
        return overrides in expected
    written = max(p.stat().st_mtime for p in (folder / RESULTS, folder / ERROR) if p.exists())
    return written >= SWEEP.get("started", 0)


def over_seeds(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over the jobs that differ only in their ``seed=`` override."""
    groups: dict[tuple[str, ...], list[dict]] = {}
    for job in jobs:
        key = tuple(o for o in job["overrides"] if not o.lstrip("+").startswith("seed="))
        groups.setdefault(key, []).append(job)
    out = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        rows = []
        for row in members[0]["rows"]:
            same = [next(r for r in m["rows"] if r["name"] == row["name"]) for m in members]
            rows.append({"name": row["name"], "kind": row["kind"],
                         "average": _mean_std([r["average"] for r in same]),
                         "normalized_average": _mean_std(
                             [r["normalized_average"] for r in same
                              if r["normalized_average"] is not None]),
                         "accuracy": {t: _mean_std([r["accuracy"][t] for r in same])
                                      for t in row["accuracy"]}})
        out.append({"overrides": list(key), "seeds": [m["seed"] for m in members],
                    "tasks": members[0]["tasks"], "rows": rows})
    return out


def _mean_std(values: list[float]) -> dict[str, float | None]:
    from tintcli.report import mean_std

    mean, std = mean_std(values, single=0.0)
    return {"mean": mean, "std": std}


def _job_num(path: Path) -> int:
    return int(path.name) if path.name.isdigit() else 1 << 30
