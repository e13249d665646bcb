"""`tint merge`: merge the experts, score every task, write results.json, print the table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from tintcli.benchmark import realism
from tintcli.encoders import build_encoder, resolve_device
from tintcli.evaluation import evaluate_state, summarize
from tintcli.io import save_state_dict
from tintcli.merging import merge
from tintcli.report import realism_text, results_table
from tintcli.tasks import task_names
from tintcli.tracking import claim_run_dir, log_wandb, versions, write_results
from tintcli.zoo import ensure_zoo, test_sets


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
    device = resolve_device(cfg.device)
    tasks = task_names(cfg.tasks)
    runs = method_runs(cfg.method)

    zoo = ensure_zoo(cfg.encoder, cfg.tasks, tasks, device, console)
    pretrained = zoo.pretrained()
    experts = {t: zoo.expert(t, pretrained) for t in tasks}
    heads = {t: zoo.head(t) for t in tasks}
    data = test_sets(cfg.encoder, cfg.tasks, tasks)
    encoder = build_encoder(cfg.encoder).to(device)
    expert_acc = {t: zoo.entries[t].expert_accuracy for t in tasks}

    def score(state):
        return evaluate_state(encoder, state, heads, data, device)

    rows = [
        {"name": "zero-shot", "kind": "reference",
         **summarize({t: zoo.entries[t].zeroshot_accuracy for t in tasks}, expert_acc)},
        {"name": "experts", "kind": "reference", **summarize(expert_acc, expert_acc)},
    ]
    with console.status("merging and evaluating") as status:
        for label, method_cfg in runs:
            status.update(f"merging and evaluating: {label}")
            merged = merge(method_cfg.name, pretrained, experts, **_params(method_cfg))
            rows.append({"name": label, "kind": "merged", "method": method_cfg.name,
                         "params": _params(method_cfg), **summarize(score(merged), expert_acc)})
            if cfg.save_merged:
                save_state_dict(merged, run_dir / "merged" / f"{method_cfg.name}.safetensors",
                                {"method": label})
        status.update("checking the benchmark's realism targets")
        bench = realism(zoo, tasks, pretrained, experts, score)

    payload = {
        "command": "merge",
        "overrides": overrides,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "seed": cfg.seed,
        "device": str(device),
        "versions": versions(),
        "checkpoints": zoo.checkpoint_hashes(),
        "tasks": tasks,
        "rows": rows,
        "realism": bench,
        "started_at": started,
        "duration_s": time.time() - started,
    }
    path = write_results(run_dir, payload)
    title = f"{cfg.tasks.name} · {cfg.encoder.name} · {len(tasks)} tasks"
    console.print(results_table(rows, tasks, title))
    console.print(realism_text(bench))
    console.print(f"results: {path}")
    log_wandb(cfg, payload, run_dir)
    return payload
