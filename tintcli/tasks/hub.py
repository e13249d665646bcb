"""Real task data through Hugging Face ``datasets``: a hub id, or a local copy in its place.

A task's YAML (``conf/task/<task>.yaml``) names the hub dataset (FusionBench's), its config,
its split names and columns. Without a network, a local copy stands in for the hub id:
``tasks.data.<task>.path`` or ``tasks.data_root/<task>``, either a ``save_to_disk`` folder
(a ``DatasetDict`` or one ``Dataset`` per split folder) or parquet files laid out as the hub
lays them out (``data/<split>-*.parquet``, ``<split>-*.parquet`` or ``<split>/*.parquet``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tintcli.errors import TintError


def local_copy(task_cfg: DictConfig, data_root: object) -> Path | None:
    """The folder that stands in for the task's hub id, if one is configured."""
    if task_cfg.get("path"):
        folder = Path(str(task_cfg.path)).expanduser()
        if not folder.is_dir():
            raise TintError(f"tasks.data.{task_cfg.name}.path={folder} is not a folder\n"
                            "Point it at a save_to_disk folder or a folder of parquet files.")
        return folder
    if data_root:
        folder = Path(str(data_root)).expanduser() / str(task_cfg.name)
        return folder if folder.is_dir() else None
    return None


def open_split(task_cfg: DictConfig, split: str, folder: Path | None = None) -> Any:
    """The task's ``split`` ("train" or "test": mapped through the task's ``splits``) as a
    ``datasets.Dataset`` (memory-mapped arrow; nothing decoded yet), from the local copy
    ``folder`` (``local_copy``) or else the hub."""
    import datasets

    datasets.disable_progress_bars()
    name = str(task_cfg.splits.get(split, split))
    if folder is not None:
        return _open_local(folder, name, str(task_cfg.name))
    hub, config = str(task_cfg.hub), task_cfg.get("hub_config")
    try:
        return datasets.load_dataset(hub, config, split=name)
    except Exception as err:  # noqa: BLE001 - no network, no such dataset, no access
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
        raise TintError(
            f"cannot load dataset '{hub}'{f' ({config})' if config else ''} split '{name}' for "
            f"task '{task_cfg.name}': {type(err).__name__}: {reason}\n"
            f"Point tint at a local copy: tasks.data.{task_cfg.name}.path=<a save_to_disk folder "
            f"or a folder of parquet files>, or tasks.data_root=<folder holding "
            f"{task_cfg.name}/>." + ("" if offline else
            "\nOr download it where there is a network (it then stays in the Hugging Face cache;"
            " set HF_DATASETS_OFFLINE=1 to use it offline).")) from err


def _open_local(folder: Path, split: str, task: str) -> Any:
    import datasets

    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise TintError(f"{folder} (task '{task}') has no split '{split}'; it has "
                                f"{', '.join(loaded)}\nSet tasks.data.{task}.splits.")
            return loaded[split]
        return loaded
    if (folder / split / "state.json").is_file():  # one save_to_disk folder per split
        return datasets.load_from_disk(str(folder / split))
    patterns = (f"data/{split}-*.parquet", f"{split}-*.parquet", f"{split}/*.parquet",
                f"data/{split}/*.parquet", f"{split}.parquet")
    for pattern in patterns:
        files = sorted(folder.glob(pattern))
        if files:
            return datasets.load_dataset("parquet", data_files={split: [str(f) for f in files]},
                                         split=split)
    raise TintError(f"{folder} (task '{task}') holds neither a save_to_disk dataset nor "
                    f"parquet files for split '{split}' ({', '.join(patterns)})")


def source_id(dataset: Any, task_cfg: DictConfig, split: str, folder: Path | None) -> dict:
    """What identifies an opened dataset in cache keys and in results.json: where it came from,
    its ``datasets`` fingerprint and its size."""
    return {"dataset": str(folder) if folder is not None else str(task_cfg.hub),
            "config": task_cfg.get("hub_config"), "split": str(task_cfg.splits.get(split, split)),
            "fingerprint": dataset._fingerprint, "rows": len(dataset)}
