"""`tint zoo build`: build the benchmark zoo (or find it cached) and report its realism."""

from __future__ import annotations

import time

from omegaconf import DictConfig
from rich.console import Console

from tintcli.benchmark import realism
from tintcli.encoders import build_encoder, resolve_device
from tintcli.evaluation import evaluate_state, summarize
from tintcli.report import realism_text, results_table
from tintcli.tasks import task_names
from tintcli.zoo import ensure_zoo, test_sets


def build(cfg: DictConfig, console: Console) -> dict:
    started = time.time()
    device = resolve_device(cfg.device)
    tasks = task_names(cfg.tasks)
    zoo = ensure_zoo(cfg.encoder, cfg.tasks, tasks, device, console)
    pretrained = zoo.pretrained()
    experts = {t: zoo.expert(t, pretrained) for t in tasks}
    heads = {t: zoo.head(t) for t in tasks}
    data = test_sets(cfg.encoder, cfg.tasks, tasks)
    encoder = build_encoder(cfg.encoder).to(device)
    with console.status("checking the benchmark's realism targets"):
        bench = realism(zoo, tasks, pretrained, experts,
                        lambda state: evaluate_state(encoder, state, heads, data, device))
    expert_acc = {t: zoo.entries[t].expert_accuracy for t in tasks}
    rows = [
        {"name": "zero-shot", "kind": "reference",
         **summarize({t: zoo.entries[t].zeroshot_accuracy for t in tasks}, expert_acc)},
        {"name": "experts", "kind": "reference", **summarize(expert_acc, expert_acc)},
    ]
    console.print(results_table(rows, tasks, f"zoo {zoo.pretrained_file.parent}"))
    console.print(realism_text(bench))
    console.print(f"zoo ready in {time.time() - started:.0f}s")
    return bench
