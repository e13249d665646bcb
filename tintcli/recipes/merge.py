"""`tint merge`: merge the experts, score every task, write results.json, print the table.

Data-free methods merge state dicts; test-time adaptive ones (AdaMerging, Model Tinting)
first learn on the tasks' unlabeled test images, and also leave their learned lambdas, tinted
layers, merged encoder and a lambda heatmap under ``adapted/<method>/`` in the run directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from tintcli.adaptation.saved import save_adapted
from tintcli.encoders import build_encoder
from tintcli.errors import TintError
from tintcli.io import save_state_dict, write_json
from tintcli.merging import adapt, check_parameters, get_method, merge
from tintcli.recipes.common import Workbench
from tintcli.report import progress_bar, realism_text, results_table
from tintcli.tracking import claim_run_dir, log_wandb, versions, write_results

PARTIAL = "results.partial.json"


def method_runs(method_cfg: DictConfig) -> list[tuple[str, str, DictConfig]]:
    """(key, row label, method config) for each method the ``method`` group asks for."""
    if method_cfg.name == "compare":
        return [(key, _label(m), m) for key, m in method_cfg.methods.items()]
    return [(method_cfg.name, _label(method_cfg), method_cfg)]


def _params(method_cfg: DictConfig) -> dict[str, Any]:
    params = OmegaConf.to_container(method_cfg, resolve=True)
    params.pop("name")
    params.pop("label", None)
    return params


def _label(method_cfg: DictConfig) -> str:
    if method_cfg.get("label"):
        return str(method_cfg.label)
    params = " ".join(f"{'λ' if k == 'lam' else k}={v}" for k, v in _params(method_cfg).items())
    return f"{method_cfg.name} {params}".strip()


def run(cfg: DictConfig, run_dir: Path, overrides: list[str], console: Console) -> dict:
    started = time.time()
    claim_run_dir(run_dir, cfg.overwrite)
    torch.manual_seed(cfg.seed)
    runs = method_runs(cfg.method)
    architecture = build_encoder(cfg.encoder)  # no weights: what tint= may name, say
    for _, _, method_cfg in runs:
        check_parameters(method_cfg.name, _params(method_cfg), architecture)
    bench = Workbench.load(cfg, console)

    payload = {
        "command": "merge",
        "overrides": overrides,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "seed": cfg.seed,
        "device": str(bench.device),
        "versions": versions(),
        "checkpoints": bench.zoo.checkpoint_hashes(),
        "tasks": bench.tasks,
        "rows": bench.reference_rows(),
        "started_at": started,
    }
    try:
        _run_methods(cfg, run_dir, runs, bench, payload["rows"], console)
    except (TintError, KeyboardInterrupt) as err:
        if not any(row["kind"] == "merged" for row in payload["rows"]):
            raise
        # never lose the rows already finished
        write_json(run_dir / PARTIAL, {**payload, "error": str(err).splitlines()[0]})
        if isinstance(err, TintError):
            raise TintError(f"{err}\nRows finished before the error: {run_dir / PARTIAL}") from err
        raise
    with console.status("checking the benchmark's realism targets"):
        payload["realism"] = bench.realism()
    payload["duration_s"] = time.time() - started
    path = write_results(run_dir, payload)
    (run_dir / PARTIAL).unlink(missing_ok=True)
    title = f"{cfg.tasks.name} · {cfg.encoder.name} · {len(bench.tasks)} tasks"
    console.print(results_table(payload["rows"], bench.tasks, title, console.width))
    console.print(realism_text(payload["realism"]))
    console.print(f"results: {path}")
    log_wandb(cfg, payload, run_dir)
    return payload


def _run_methods(cfg: DictConfig, run_dir: Path, runs: list[tuple[str, str, DictConfig]],
                 bench: Workbench, rows: list[dict], console: Console) -> None:
    context = None  # one per run, so the experts' outputs are computed once for all methods
    with progress_bar(console) as progress:
        for key, label, method_cfg in runs:
            bar = progress.add_task(label, total=None, info="")
            params = _params(method_cfg)
            method = get_method(method_cfg.name)  # parameters were checked before loading
            extra: dict[str, Any] = {}
            if method.adaptive:
                context = context or bench.adaptation_context(cfg.seed)
                context.on_step = lambda done, total, loss, bar=bar: progress.update(
                    bar, completed=done, total=total, info=f"loss {loss:.4f}")
                adapted = adapt(method_cfg.name, bench.pretrained, bench.experts, context,
                                **params)
                accuracy = bench.score_adapted(adapted)
                extra["adaptation"] = {
                    "loss_curve": adapted.loss_curve,
                    "lambdas": {"layers": adapted.layer_names, "tasks": adapted.tasks,
                                "values": adapted.lambdas.tolist()},
                    "files": save_adapted(adapted, run_dir / "adapted" / key, label)}
            else:
                merged = merge(method_cfg.name, bench.pretrained, bench.experts, **params)
                accuracy = bench.score(merged)
                if cfg.save_merged:
                    save_state_dict(merged, run_dir / "merged" / f"{key}.safetensors",
                                    {"method": label})
            rows.append(bench.row(label, accuracy, method=method_cfg.name, params=params,
                                  **extra))
            average = sum(accuracy.values()) / len(accuracy)
            progress.update(bar, total=progress.tasks[bar].total or 1,
                            completed=progress.tasks[bar].total or 1,
                            info=f"avg {100 * average:.1f}%")
