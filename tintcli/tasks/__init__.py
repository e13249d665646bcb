"""Task sets and their splits: which tasks a run uses, and each split's pixels.

A task set (config group ``tasks``) is either ``source: synthetic`` (tint's generated
benchmark, ``generated.py``) or ``source: hub`` (real datasets, one YAML per task in
``conf/task/``, loaded with Hugging Face ``datasets``: ``hub.py``). Either way a split reaches
a run the same way: as uint8 pixels from the pixel cache (``pixels.py``), normalised on the
device. Splits are ``train``, ``test`` and ``val``: validation is carved from train with a
fixed seed (``tasks.validation``), as FusionBench does, and is what every choice is made on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from tintcli.errors import TintError
from tintcli.tasks.pixels import Transform, pixel_split, validation_rows
from tintcli.tasks.synthetic import SYNTH_FAMILIES

SPLITS = ("train", "val", "test")


@dataclass
class TaskSplit:
    """One task's split: uint8 pixels [N, H, W, 3] (memory-mapped) and labels [N]."""

    task: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    digest: str                       # the pixel cache entry's content digest
    source: dict = field(default_factory=dict)  # where it came from: dataset, fingerprint, rows

    def __len__(self) -> int:
        return len(self.labels)


def task_names(tasks_cfg: DictConfig) -> list[str]:
    """The task set's names, validated: an unknown or repeated name is a clear error."""
    names = [str(n) for n in tasks_cfg.names]
    source = tasks_cfg.get("source")
    if source == "synthetic":
        known = list(SYNTH_FAMILIES)
    elif source == "hub":
        known = list(tasks_cfg.get("data") or {})
    else:
        raise TintError(f"tasks.source={source} is not a task source tint knows: synthetic, hub")
    for name in names:
        if name not in known:
            raise TintError(f"unknown task '{name}' in tasks '{tasks_cfg.name}'\nThis task set "
                            f"has: {', '.join(known)}" + (" (add one with a conf/task/ YAML "
                                                          "under tasks.data)" * (source == "hub")))
    if len(set(names)) != len(names):
        raise TintError(f"task set '{tasks_cfg.name}' lists a task twice: {names}")
    if not names:
        raise TintError(f"task set '{tasks_cfg.name}' is empty; list tasks in tasks.names")
    for key, low in (("image_size", 8), ("train_size", 1), ("test_size", 1), ("seed", 0)):
        value = tasks_cfg.get(key)
        if value is None and key == "test_size" and source == "hub":
            continue
        if key in tasks_cfg and not (isinstance(value, int) and not isinstance(value, bool)
                                     and value >= low):
            raise TintError(f"tasks.{key}={value} must be a whole number >= {low}")
    validation = tasks_cfg.get("validation") or {}
    fraction = validation.get("fraction", 0.1)
    if not (isinstance(fraction, float | int) and 0 < fraction < 1):
        raise TintError(f"tasks.validation.fraction={fraction} must be a number in (0, 1)")
    if source == "hub":
        for name in names:
            task = tasks_cfg.data[name]
            if not task.get("classnames"):
                raise TintError(f"task '{name}' has no classnames (conf/task/{name}.yaml)")
            if not task.get("hub") and not task.get("path") and not tasks_cfg.get("data_root"):
                raise TintError(f"task '{name}' has neither a hub id nor a local path\n"
                                f"Set tasks.data.{name}.hub or tasks.data.{name}.path.")
    return names


def num_classes(tasks_cfg: DictConfig, task: str) -> int:
    if tasks_cfg.source == "synthetic":
        return SYNTH_FAMILIES[task].num_classes
    return len(tasks_cfg.data[task].classnames)


def transform(tasks_cfg: DictConfig, encoder_cfg: DictConfig) -> Transform:
    """The encoder's evaluation transform (CLIP: bicubic short side to 224, centre crop);
    tint's generated tasks are drawn at the encoder's size already."""
    size = encoder_cfg.get("image_size") or tasks_cfg.get("image_size")
    if not size:
        raise TintError(f"encoder '{encoder_cfg.name}' sets no image_size for the task set "
                        f"'{tasks_cfg.name}'\nSet encoder.image_size (CLIP encoders: 224).")
    return Transform(int(size), str(encoder_cfg.get("interpolation", "bicubic")),
                     str(encoder_cfg.get("crop", "center")))


def check_image_size(encoder: torch.nn.Module, tasks_cfg: DictConfig,
                     encoder_cfg: DictConfig) -> None:
    """The pixels' size must be the size the encoder was built for: say so before any work."""
    built = getattr(getattr(encoder, "patch_embed", None), "img_size", None)
    size = transform(tasks_cfg, encoder_cfg).size
    if built is not None and tuple(built) != (size, size):
        raise TintError(f"the images are {size}x{size} (encoder.image_size="
                        f"{encoder_cfg.get('image_size')}) but the encoder "
                        f"'{encoder_cfg.name}' takes {built[0]}x{built[1]}\nSet encoder.image_size="
                        f"{built[0]}, or build the encoder for {size} "
                        f"(encoder.timm_kwargs.img_size={size}).")


def load_split(tasks_cfg: DictConfig, encoder_cfg: DictConfig, task: str, split: str,
               console: Console | None = None) -> TaskSplit:
    """One task's split as cached pixels (built on first use, checked on every use)."""
    if split not in SPLITS:
        raise TintError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    if tasks_cfg.source == "synthetic":
        opener, source, image_column, label_column = _synthetic(tasks_cfg, task, split)
        limit = None
    else:
        opener, source, image_column, label_column = _hub(tasks_cfg, task, split)
        limit = tasks_cfg.get("test_size") if split == "test" else None
    rows = None
    if split == "val" or (split == "train" and "validation" in tasks_cfg):
        validation = tasks_cfg.get("validation") or {}
        fraction, seed = float(validation.get("fraction", 0.1)), int(validation.get("seed", 0))
        train_rows, val_rows = validation_rows(source["rows"], fraction, seed)
        rows = val_rows if split == "val" else train_rows
        source = {**source, "carved": {"from": "train", "fraction": fraction, "seed": seed,
                                       "take": split}}
    if limit is not None and limit < source["rows"]:
        rows = list(range(int(limit)))
    count = num_classes(tasks_cfg, task)
    pixels = pixel_split(f"{task}/{split}", source, opener, rows, image_column, label_column,
                         count, transform(tasks_cfg, encoder_cfg),
                         int(tasks_cfg.get("workers", 0) or 0), console)
    return TaskSplit(task, split, pixels.images, pixels.labels, count, pixels.digest,
                     {**source, "count": len(pixels)})


def _synthetic(tasks_cfg: DictConfig, task: str, split: str):
    """tint's generated split (val and train both come from the generated train split)."""
    from tintcli.tasks.generated import synthetic_entry

    stored = "test" if split == "test" else "train"
    count = int(tasks_cfg.test_size if stored == "test" else tasks_cfg.train_size)
    entry = synthetic_entry(task, stored, count, int(tasks_cfg.image_size), int(tasks_cfg.seed))

    def opener():
        import datasets

        return datasets.load_from_disk(str(entry.path)).with_format("numpy")

    source = {"dataset": f"synthetic/{task}", "split": stored, "digest": entry.digest,
              "rows": count}
    return opener, source, "image", "label"


def _hub(tasks_cfg: DictConfig, task: str, split: str):
    from tintcli.tasks.hub import local_copy, open_split, source_id

    task_cfg = tasks_cfg.data[task]
    stored = "test" if split == "test" else "train"
    folder = local_copy(task_cfg, tasks_cfg.get("data_root"))
    dataset = open_split(task_cfg, stored, folder)
    return (lambda: dataset), source_id(dataset, task_cfg, stored, folder), \
        str(task_cfg.image_column), str(task_cfg.label_column)


def describe(tasks_cfg: DictConfig) -> dict:
    """The task set as results.json records it (the splits' sources are added per split)."""
    plain = OmegaConf.to_container(tasks_cfg, resolve=True)
    for task in (plain.get("data") or {}).values():  # long lists: the digests say enough
        task.pop("classnames", None)
        task.pop("templates", None)
    return plain
