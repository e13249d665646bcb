"""`tint convert`: write any checkpoint pool as a `local` pool (tint's safetensors layout),
once, so later runs start in seconds instead of unpickling or converting every checkpoint."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from tintcli.encoders import build_encoder
from tintcli.errors import TintError
from tintcli.io import save_state_dict, write_json
from tintcli.pools import open_pool
from tintcli.tasks import task_names


def convert(cfg: DictConfig, console: Console) -> Path:
    if cfg.get("out") in (None, "", "???"):
        raise TintError("out is not set: pass out=<folder> for the local pool")
    out = Path(str(cfg.out)).expanduser()
    if (out / "pool.json").exists() and not cfg.overwrite:
        raise TintError(f"{out} already holds a converted pool\nChoose another out=, or pass "
                        "overwrite=true.")
    tasks = [str(n) for n in cfg.names] if cfg.get("names") else task_names(cfg.tasks)
    if not tasks or len(set(tasks)) != len(tasks):
        raise TintError(f"names={tasks} must list each of the pool's tasks once")
    pool = open_pool(cfg.pool, tasks, build_encoder(cfg.encoder), cfg.encoder.name, cfg.tasks)
    hashes = pool.checkpoint_hashes()
    with console.status("converting the pretrained encoder"):
        pretrained = pool.pretrained()
        save_state_dict(pretrained, out / "pretrained.safetensors")
    for task in tasks:
        with console.status(f"converting the expert and head for '{task}'"):
            save_state_dict(pool.expert(task, pretrained), out / "experts" / f"{task}.safetensors")
            save_state_dict(pool.head(task).state_dict(), out / "heads" / f"{task}.safetensors")
    write_json(out / "pool.json", {"converted_from": OmegaConf.to_container(cfg.pool),
                                   "source_format": pool.source_format,
                                   "encoder": cfg.encoder.name, "tasks": tasks,
                                   "source_sha256": hashes})
    console.print(f"converted {len(tasks)} task(s) to {out}; use it with pool=local "
                  f"pool.path={out}")
    return out
