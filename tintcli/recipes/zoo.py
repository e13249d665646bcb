"""`tint zoo build`: build the benchmark zoo (or find it cached) and report its realism."""

from __future__ import annotations

import time

from omegaconf import DictConfig
from rich.console import Console

from tintcli.report import realism_text, results_table
from tintcli.workbench import Workbench


def build(cfg: DictConfig, console: Console) -> dict:
    started = time.time()
    bench = Workbench.load(cfg, console)  # the zoo config has no pool group: synth
    with console.status("checking the benchmark's realism targets"):
        realism = bench.realism()
    title = f"zoo {bench.pool.pretrained_file.parent}"
    console.print(results_table(bench.reference_rows(), bench.tasks, title, console.width))
    console.print(realism_text(realism))
    console.print(f"zoo ready in {time.time() - started:.0f}s")
    return realism
