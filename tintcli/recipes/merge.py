"""`tint merge`: merge the experts, score every task, write results.json, print the table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from tintcli.io import save_state_dict
from tintcli.merging import check_parameters, merge
from tintcli.recipes.common import Workbench
from tintcli.report import realism_text, results_table
from tintcli.tracking import claim_run_dir, log_wandb, versions, write_results


def method_runs(method_cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(row label, method config) for each method the ``method`` group asks for."""
    if method_cfg.name == "compare":
        return [(_label(m), m) for m in method_cfg.methods.values()]
    return [(_label(method_cfg), method_cfg)]


def _params(method_cfg: DictConfig) -> dict[str, Any]:
    params = OmegaConf.to_container(method_cfg, resolve=True)
    params.pop("name")
    return params


def _label(method_cfg: DictConfig) -> str:
    params = " ".join(f"{'λ' if k == 'lam' else k}={v}" for k, v in _params(method_cfg).items())
    return f"{method_cfg.name} {params}".strip()


def run(cfg: DictConfig, run_dir: Path, overrides: list[str], console: Console) -> dict:
    started = time.time()
    claim_run_dir(run_dir, cfg.overwrite)
    torch.manual_seed(cfg.seed)
    runs = method_runs(cfg.method)
    for _, method_cfg in runs:
        check_parameters(method_cfg.name, _params(method_cfg))
    bench = Workbench.load(cfg, console)

    rows = bench.reference_rows()
    with console.status("merging and evaluating") as status:
        for label, method_cfg in runs:
            status.update(f"merging and evaluating: {label}")
            params = _params(method_cfg)
            merged = merge(method_cfg.name, bench.pretrained, bench.experts, **params)
            rows.append(bench.row(label, bench.score(merged), method=method_cfg.name,
                                  params=params))
            if cfg.save_merged:
                save_state_dict(merged, run_dir / "merged" / f"{method_cfg.name}.safetensors",
                                {"method": label})
        status.update("checking the benchmark's realism targets")
        realism = bench.realism()

    payload = {
        "command": "merge",
        "overrides": overrides,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "seed": cfg.seed,
        "device": str(bench.device),
        "versions": versions(),
        "checkpoints": bench.zoo.checkpoint_hashes(),
        "tasks": bench.tasks,
        "rows": rows,
        "realism": realism,
        "started_at": started,
        "duration_s": time.time() - started,
    }
    path = write_results(run_dir, payload)
    title = f"{cfg.tasks.name} · {cfg.encoder.name} · {len(bench.tasks)} tasks"
    console.print(results_table(rows, bench.tasks, title, console.width))
    console.print(realism_text(realism))
    console.print(f"results: {path}")
    log_wandb(cfg, payload, run_dir)
    return payload
