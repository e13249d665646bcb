"""`tint merge`: merge the experts, score every task, write results.json, print the table.

Data-free methods merge state dicts; test-time adaptive ones (AdaMerging, Model Tinting /
SyMerge, Surgery, ProbSurgery, WEMoE, LOT) first learn on the tasks' unlabeled test images,
and also leave their learned lambdas, tinted layers, adapters or routers and a lambda heatmap
(and, with save_merged=true, the merged encoder) under ``adapted/<method>/`` in the run
directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from tintcli.adaptation.saved import save_adapted
from tintcli.encoders import build_encoder, resolve_device
from tintcli.errors import Interrupted, Terminated, TintError, stop_requested
from tintcli.io import (
    DIGEST_MODES,
    digest_mode,
    on_device,
    save_state_dict,
    set_digest_mode,
    write_json,
)
from tintcli.memory import check_fits
from tintcli.methods import adapt, check_parameters, get_method
from tintcli.objective import check_objective
from tintcli.report import progress_bar, realism_text, results_table
from tintcli.runtime import check_compile, check_residency, resolve_precision, runtime_options
from tintcli.selection import choose
from tintcli.stand_in import check_not_stand_in
from tintcli.tasks import check_image_size, describe, task_names
from tintcli.tracking import (
    ERROR,
    PARTIAL,
    RESULTS,
    Tracker,
    claim_run_dir,
    versions,
    write_results,
)
from tintcli.workbench import Workbench


def method_runs(method_cfg: DictConfig) -> list[tuple[str, str, DictConfig]]:
    """(key, row label, method config) for each method the ``method`` group asks for."""
    if method_cfg.name == "compare":
        return [(key, _label(m), m) for key, m in method_cfg.methods.items()]
    return [(method_cfg.name, _label(method_cfg), method_cfg)]


def _params(method_cfg: DictConfig) -> dict[str, Any]:
    """The method's parameters (null: chosen on validation over its ``grid``)."""
    params = OmegaConf.to_container(method_cfg, resolve=True)
    for key in ("name", "label", "grid", "patience"):
        params.pop(key, None)
    return params


def _grid(method_cfg: DictConfig) -> dict[str, Any] | None:
    grid = method_cfg.get("grid")
    return OmegaConf.to_container(grid, resolve=True) if grid is not None else None


def _patience(method_cfg: DictConfig) -> Any:
    """The search's early stopping (null: the whole grid; a method without a search has
    none)."""
    return method_cfg.get("patience")


def source_oriented(params: dict[str, Any], source_format: str) -> dict[str, Any]:
    """The parameters with an ``orientation`` left null set to the pool's source format
    (``tintcli/methods.py``: the methods that are not transpose-equivariant)."""
    if "orientation" in params and params["orientation"] is None:
        return {**params, "orientation": source_format}
    return params


def _label(method_cfg: DictConfig) -> str:
    if method_cfg.get("label"):
        return str(method_cfg.label)
    params = " ".join(f"{'λ' if k == 'lam' else k}={v}"  # null: chosen, or not used
                      for k, v in _params(method_cfg).items() if v is not None)
    return f"{method_cfg.name} {params}".strip()


def check_run_config(cfg: DictConfig) -> list[str]:
    """The run's own settings, before any work (the methods check theirs)."""
    if not (isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool) and cfg.seed >= 0):
        raise TintError(f"seed={cfg.seed} must be a whole number >= 0")
    for key in ("save_merged", "overwrite"):
        if not isinstance(cfg[key], bool):
            raise TintError(f"{key}={cfg[key]} must be true or false")
    resolve_precision(cfg.get("precision", "auto"), resolve_device(cfg.device))
    if str(cfg.get("vectors_dtype", "fp32")) not in ("fp32", "bf16"):
        raise TintError(f"vectors_dtype={cfg.vectors_dtype} must be fp32 or bf16")
    if str(cfg.get("digests", "memo")) not in DIGEST_MODES:
        raise TintError(f"digests={cfg.digests} must be memo or full")
    every = cfg.get("checkpoint_every", 100)
    if not (isinstance(every, int) and not isinstance(every, bool) and every >= 0):
        raise TintError(f"checkpoint_every={every} must be a whole number >= 0 (0: never)")
    for key in ("batch_size", "workers"):
        value = (cfg.get("eval") or {}).get(key, 1)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0
                and (value > 0 or key == "workers")):
            raise TintError(f"eval.{key}={value} must be a whole number "
                            f"{'>= 0' if key == 'workers' else '>= 1'}")
    options = runtime_options(cfg)
    check_residency(options["resident_pixels"])
    check_compile(options["compile"])
    if not isinstance((cfg.get("eval") or {}).get("validation", False), bool):
        raise TintError(f"eval.validation={cfg.eval.validation} must be true or false")
    tasks = task_names(cfg.tasks)
    check_not_stand_in(cfg)
    if cfg.tasks.source == "hub" and cfg.pool.kind == "synth":
        raise TintError(f"tasks={cfg.tasks.name} holds real datasets, but pool=synth has only "
                        "tint's own synthetic experts\nPick a pool of real checkpoints with its "
                        "encoder: encoder=clip_vit_b32 pool=hf (FusionBench's, from the hub), "
                        "pool=task_vectors pool.path=<release folder>, or pool=local "
                        "pool.path=<folder>.")
    return tasks


class RowLog:
    """The run's payload and its rows, flushed to ``results.partial.json`` whenever a row
    is added: whatever stops the run later (an error, Ctrl-C, a full disk), every finished
    row is on disk, or, where the disk refused it, printed."""

    def __init__(self, path: Path, payload: dict, console: Console):
        self.path, self.payload, self.console = path, payload, console
        self.unsaved: OSError | None = None
        self.flush()

    @property
    def rows(self) -> list[dict]:
        return self.payload["rows"]

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.flush()

    def flush(self) -> None:
        try:
            write_json(self.path, self.payload)
        except OSError as err:
            if self.unsaved is None:
                self.console.print(f"[yellow]warning:[/] cannot save rows to {self.path} "
                                   f"({err.strerror or err}); they will be printed")
            self.unsaved = err

    def keep(self, title: str, error: str) -> str:
        """Record why the run stopped and say where its finished rows are (printing them if
        they could not be saved)."""
        self.payload["error"] = error
        self.flush()
        merged = sum(row["kind"] == "merged" for row in self.rows)
        if self.unsaved is not None:
            self.console.print(results_table(self.rows, self.payload["tasks"], title,
                                             self.console.width))
            return (f"{merged} finished method row(s) could not be saved "
                    f"({self.unsaved.strerror or self.unsaved}): the table above holds them")
        return f"Rows finished before this ({merged} method row(s)): {self.path}"


def finished_same(run_dir: Path, cfg: DictConfig) -> dict | None:
    """The results of a finished run of this very config (seed included) in ``run_dir``."""
    try:
        done = json.loads((run_dir / RESULTS).read_text())
    except (OSError, ValueError):
        return None
    return done if done.get("config") == OmegaConf.to_container(cfg, resolve=True) else None


def run(cfg: DictConfig, run_dir: Path, overrides: list[str], console: Console,
        resume: bool = False) -> dict:
    """One run. ``resume`` (a sweep's job): a job whose results.json holds this same resolved
    config is done already and skipped, unless ``overwrite=true``; a killed job left no
    results.json and runs again."""
    started = time.time()
    if resume and not cfg.overwrite and (done := finished_same(run_dir, cfg)) is not None:
        console.print(f"finished already with this config, skipped: {run_dir / RESULTS}")
        return done
    tasks = check_run_config(cfg)  # the task set's names, checked
    check_objective(cfg)
    runs = method_runs(cfg.method)
    architecture = build_encoder(cfg.encoder)  # no weights: what tint= may name, say
    check_image_size(architecture, cfg.tasks, cfg.encoder)
    for _, label, method_cfg in runs:
        method = check_parameters(method_cfg.name, _params(method_cfg), architecture,
                                  _grid(method_cfg), tasks, _patience(method_cfg))
        if len(tasks) < method.min_tasks:
            raise TintError(f"{method.pretty} needs at least {method.min_tasks} tasks; "
                            f"tasks={cfg.tasks.name} has {len(tasks)}\n"
                            "Pick more tasks (tasks.names=[...]), or another method.")
        if method.memory is not None:
            check_fits(label, method.memory(cfg.encoder, len(tasks), _params(method_cfg),
                                            str(cfg.get("vectors_dtype", "fp32"))),
                       resolve_device(cfg.device), cfg.get("memory_limit_gib"))
    earlier = rows_to_resume(claim_run_dir(run_dir, cfg.overwrite, console), cfg)
    set_digest_mode(str(cfg.get("digests", "memo")))
    torch.manual_seed(cfg.seed)
    bench = Workbench.load(cfg, console, checked_tasks=tasks)
    title = (f"{cfg.tasks.name} · {cfg.encoder.name} · {len(bench.tasks)} tasks · "
             f"{bench.device.type} {bench.runtime.precision}")
    if any(get_method(method_cfg.name).adaptive for _, _, method_cfg in runs):
        title += f" · {bench.runtime.step_path} steps"  # runtime.compile, for the rows that learn
    log = RowLog(run_dir / PARTIAL, {
        "command": "merge",
        "overrides": overrides,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "seed": cfg.seed,
        "device": str(bench.device),
        "precision": bench.runtime.precision,
        "pixels_on_device": bench.pixels_resident,  # runtime.resident_pixels, as it resolved
        "step_path": bench.runtime.step_path,  # runtime.compile
        "versions": versions(),
        "pool": OmegaConf.to_container(cfg.pool, resolve=True) if "pool" in cfg else None,
        "layout": layout_record(bench.pool.source_format),
        "checkpoints": bench.pool.checkpoint_hashes(),
        "digests": digest_mode(),  # memo: trusted while (size, mtime, inode) held; full: hashed
        "task_set": describe(cfg.tasks),
        "data": bench.data_record(),
        # every row's numbers are on test; anything chosen (a best λ) is chosen on val
        "splits": {"scored": "test", "chosen_on": "val",
                   "validation": OmegaConf.to_container(cfg.tasks.get("validation") or {})},
        "tasks": bench.tasks,
        "rows": bench.reference_rows(),
        "started_at": started,
    }, console)
    tracker = Tracker(console=console)
    try:
        try:
            tracker = Tracker.start(cfg, run_dir, overrides, console)
            for row in log.rows:
                tracker.row(row)
            _run_methods(cfg, run_dir, runs, bench, log, console, tracker, earlier)
            with console.status("checking the benchmark's realism targets"):
                log.payload["realism"] = bench.realism()  # None for real checkpoint pools
            log.payload["data"] = bench.data_record()  # with validation, if it was used
        except BaseException as err:
            tracker.finish(None, run_dir, failed=True)  # W&B learns the run failed
            stop = stop_requested()
            if stop is not None and not isinstance(err, KeyboardInterrupt):
                raise stop from err  # Ctrl-C that an extension turned into its own error
            raise
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (errors.Terminated)
        why = "terminated" if isinstance(stop, Terminated) else "interrupted"
        raise Interrupted.by(stop, log.keep(title, why)) from stop
    except TintError as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise type(err)(f"{err}\n{log.keep(title, first)}") from err
    except OSError as err:
        message = f"cannot write {err.filename or 'a file'}: {err.strerror or err}"
        raise TintError(f"{message}\n{log.keep(title, message)}") from err
    payload = {**log.payload, "duration_s": time.time() - started}
    console.print(results_table(payload["rows"], bench.tasks, title, console.width))
    if payload.get("realism"):
        console.print(realism_text(payload["realism"]))
    try:
        path = write_results(run_dir, payload)
    except OSError as err:
        message = f"cannot write {run_dir / RESULTS}: {err.strerror or err}"
        raise TintError(f"{message}\n{log.keep(title, message)}") from err
    log.path.unlink(missing_ok=True)
    (run_dir / ERROR).unlink(missing_ok=True)  # an earlier failure of this job, now redone
    console.print(f"results: {path}")
    tracker.finish(payload, run_dir)
    return payload


def layout_record(source_format: str) -> dict:
    """How the pool's checkpoint format stores the matrices that tint's layout stores
    otherwise, and the rule the methods that are not transpose-equivariant follow."""
    from tintcli.checkpoints.convert import STORED_TRANSPOSED

    return {"source_format": source_format,
            "stored_transposed": STORED_TRANSPOSED[source_format],
            "rule": "methods that are not transpose-equivariant (ISO-CTS) decompose each "
                    "matrix as the source format stores it (method.orientation: null)"}


def rows_to_resume(kept: Path | None, cfg: DictConfig) -> dict[str, dict]:
    """The method rows an interrupted run of this very config left in this run directory
    (a requeued SLURM job, a rerun after Ctrl-C), by method key: they are not computed
    again."""
    try:
        earlier = json.loads(kept.read_text()) if kept is not None else {}
    except (OSError, ValueError):
        return {}
    config = earlier.get("config") if isinstance(earlier, dict) else None
    if not isinstance(config, dict) or {**config, "overwrite": False} != _resumable(cfg):
        return {}
    return {row["key"]: row for row in earlier.get("rows", [])
            if isinstance(row, dict) and row.get("kind") == "merged" and "key" in row}


def _resumable(cfg: DictConfig) -> dict:
    """The resolved config as a resumed run must match it (``overwrite`` aside)."""
    return {**OmegaConf.to_container(cfg, resolve=True), "overwrite": False}


def _run_methods(cfg: DictConfig, run_dir: Path, runs: list[tuple[str, str, DictConfig]],
                 bench: Workbench, log: RowLog, console: Console, tracker: Tracker,
                 earlier: dict[str, dict]) -> None:
    context = None  # one per run, so the experts' outputs are computed once for all methods
    validation = bool((cfg.get("eval") or {}).get("validation", False))
    with progress_bar(console) as progress:
        for key, label, method_cfg in runs:
            bar = progress.add_task(label, total=None, info="")
            if key in earlier:  # finished before the run was stopped: kept, not redone
                log.add(earlier[key])
                tracker.row(log.rows[-1])
                progress.update(bar, total=1, completed=1,
                                info=f"avg {100 * earlier[key]['average']:.1f}% (resumed)")
                continue
            params = source_oriented(_params(method_cfg), bench.pool.source_format)
            method = get_method(method_cfg.name)  # parameters were checked before loading
            extra: dict[str, Any] = {"reference": {"pretty": method.pretty, "row": method.row(
                params), "paper": method.paper, "code": method.code}}
            if method.is_oracle(params):  # learnt from true labels: never a result
                label, extra["oracle"] = f"{label} (oracle: true labels)", True
            if method.adaptive:
                context = context or bench.adaptation_context(cfg.seed)
                def on_step(done, total, loss, lambdas, bar=bar, key=key) -> None:
                    progress.update(bar, completed=done, total=total, info=f"loss {loss:.4f}")
                    tracker.step(key, done, total, loss, lambdas, bench.tasks)

                context.on_step = on_step
                # a stopped run (SLURM's time limit, Ctrl-C) resumes from its last checkpoint
                every = int(cfg.get("checkpoint_every", 100))
                context.checkpoint_dir = run_dir / "checkpoints" / key if every else None
                context.checkpoint_every = every or 1
                context.checkpoint_key = {"config": _resumable(cfg),
                                          "checkpoints": bench.pool.checkpoint_hashes()}
                context.console = console
                merged = adapt(method_cfg.name, bench.pretrained, bench.experts, context,
                               **params)
                extra["adaptation"] = {
                    "loss_curve": merged.loss_curve,
                    "lambdas": {"layers": merged.layer_names, "tasks": merged.tasks,
                                "values": merged.lambdas.tolist()},
                    "files": save_adapted(merged, run_dir / "adapted" / key, label,
                                          merged=cfg.save_merged)}
            else:
                def on_point(done, total, bar=bar) -> None:
                    progress.update(bar, completed=done, total=total, info="grid on validation")

                normalize = (bench.expert_accuracy_on("val")
                             if method.choose_by == "normalized_average" else None)
                # computed on the run's device (CUDA: seconds for the SVD methods)
                merged = choose(method, *on_device(bench.pretrained, bench.experts,
                                                   bench.device), params,
                                _grid(method_cfg), lambda m: bench.score_merged(m, "val"),
                                normalize, on_point, _patience(method_cfg))
                if cfg.save_merged and merged.per_task:  # no one encoder to keep
                    console.print(f"[yellow]note:[/] {label}: each task runs its own model, "
                                  "so save_merged keeps no merged encoder for it")
                elif cfg.save_merged:
                    save_state_dict(merged.state, run_dir / "merged" / f"{key}.safetensors",
                                    {"method": label})
            accuracy = bench.score_merged(merged)
            if validation:
                extra["validation"] = _validation(bench.score_merged(merged, "val"))
            if "search" in merged.info:  # what was chosen on validation, and every grid point
                extra["search"] = merged.info["search"]  # params keep the config's null
                label = f"{label} ({_chosen(merged.info['search'])})"
            log.add(bench.row(label, accuracy, method=method_cfg.name, key=key, params=params,
                              **extra))
            tracker.row(log.rows[-1])
            average = sum(accuracy.values()) / len(accuracy)
            progress.update(bar, total=progress.tasks[bar].total or 1,
                            completed=progress.tasks[bar].total or 1,
                            info=f"avg {100 * average:.1f}%")


def _chosen(search: dict) -> str:
    """``α=1.2, lambdas per task on val`` for a row's label."""
    chosen = [f"{'α' if k == 'alpha' else k}={v:g}" if isinstance(v, float) else f"{k}={v}"
              for k, v in search["chosen"].items()]
    chosen += [f"{k} per task" for k in search.get("per_task", {})]
    return ", ".join(chosen) + " on val"


def _validation(accuracy: dict[str, float]) -> dict:
    """A row's scores on the validation split: what sweeps and searches choose by."""
    return {"accuracy": accuracy, "average": sum(accuracy.values()) / len(accuracy)}
