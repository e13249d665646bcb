"""`tint bench`: the adaptation step's cost against a plain forward+backward.

For each adaptive method, the same batch goes once through the method's real step (merge on
the device, forward, backward, optimiser step) and once through a plain forward+backward of
the encoder as an ordinary module with the same loss. The ratio is the price of learning the
merge; the target is <= 1.3.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from tintcli.adaptation import pseudo_label_loss
from tintcli.adaptation.adamerging import AdaMerging, entropy
from tintcli.adaptation.tinting import Tinting
from tintcli.encoders import build_encoder
from tintcli.io import encoder_entries, write_json
from tintcli.methods import check_parameters
from tintcli.recipes.common import Workbench
from tintcli.tracking import versions

TARGET_RATIO = 1.3


def _timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds per call."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _init_kwargs(cls: type, method_cfg: DictConfig, encoder: torch.nn.Module) -> dict:
    params = OmegaConf.to_container(method_cfg, resolve=True)
    params.pop("label", None)
    check_parameters(params.pop("name"), params, encoder)
    accepted = inspect.signature(cls).parameters
    return {k: v for k, v in params.items() if k in accepted}


def run(cfg: DictConfig, run_dir: Path, console: Console) -> dict:
    architecture = build_encoder(cfg.encoder)
    ada_kwargs = _init_kwargs(AdaMerging, cfg.adamerging, architecture)  # fail before any work
    tint_kwargs = _init_kwargs(Tinting, cfg.tinting, architecture)
    bench = Workbench.load(cfg, console)
    context = bench.adaptation_context(cfg.seed)
    plain = bench.encoder.train(False)
    plain.load_state_dict(encoder_entries(bench.pretrained))
    plain.requires_grad_(True)
    measure = lambda fn: _timed(fn, bench.device, cfg.warmup, cfg.repeats)  # noqa: E731
    rows = []

    with console.status("timing AdaMerging steps"):
        ada = AdaMerging(bench.pretrained, bench.experts, context,
                         **ada_kwargs)
        images = ada.next_batches()

        def plain_ada() -> None:
            for task, x in images.items():
                entropy(context.head(task)(plain(x))).backward()

        rows.append(("AdaMerging step (all tasks)", sum(len(x) for x in images.values()),
                     measure(lambda: ada.step(images)), measure(plain_ada)))

    with console.status("timing Model Tinting steps"):
        tint = Tinting(bench.pretrained, bench.experts, context,
                       **tint_kwargs)
        task = tint.tasks[0]
        batch = tint.next_batch(task)
        head = tint.heads[task]

        def plain_tint() -> None:
            pseudo_label_loss(head(plain(batch[0])), batch[1], tint.sampler)[0].backward()

        rows.append((f"Model Tinting step (one task: {task})", len(batch[0]),
                     measure(lambda: tint.step(task, batch)), measure(plain_tint)))

    results = [{"step": name, "batch": size, "adaptive_s": ours, "plain_s": base,
                "ratio": ours / base, "steps_per_s": 1 / ours} for name, size, ours, base in rows]
    payload = {"command": "bench", "device": str(bench.device), "encoder": cfg.encoder.name,
               "tasks": bench.tasks, "threads": torch.get_num_threads(),
               "target_ratio": TARGET_RATIO, "results": results, "versions": versions(),
               "config": OmegaConf.to_container(cfg, resolve=True)}
    write_json(run_dir / "bench.json", payload)
    console.print(bench_table(results, f"adaptation step vs plain forward+backward · "
                                       f"{cfg.encoder.name} · {bench.device}"))
    console.print(f"results: {run_dir / 'bench.json'}")
    return payload


def bench_table(results: list[dict], title: str) -> Table:
    table = Table(title=title, title_justify="left",
                  caption=f"median of timed steps; target ratio ≤ {TARGET_RATIO}")
    for column in ("step", "images", "adaptive ms", "plain ms", "ratio", "steps/s"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for r in results:
        ok = "[green]✓[/]" if r["ratio"] <= TARGET_RATIO else "[red]✗[/]"
        table.add_row(r["step"], str(r["batch"]), f"{1000 * r['adaptive_s']:.1f}",
                      f"{1000 * r['plain_s']:.1f}", f"{r['ratio']:.2f} {ok}",
                      f"{r['steps_per_s']:.1f}")
    return table
