"""Task data: which tasks exist, and their splits as pixel tensors cached on disk.

Splits are stored with Hugging Face ``datasets`` (``save_to_disk``) as decoded uint8 pixels,
so images are generated or decoded once, never again per evaluation. Each split is a cache
entry (``tintcli/cache.py``): checked against its digests whenever it is read.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from tintcli.cache import Entry, ensure
from tintcli.errors import TintError
from tintcli.io import fingerprint
from tintcli.paths import cache_dir
from tintcli.tasks.synthetic import SYNTH_FAMILIES, generate

# Bump when the generators change, so cached splits are regenerated.
GENERATOR_VERSION = 11
SPLITS = ("pretrain", "train", "test")


@dataclass
class TaskSplit:
    task: str
    split: str
    images: torch.Tensor  # uint8 [N, H, W, 3]
    labels: torch.Tensor  # int64 [N]
    num_classes: int
    digest: str = ""      # the cache entry's content digest

    def __len__(self) -> int:
        return len(self.labels)


def available_tasks(source: str) -> list[str]:
    if source == "synthetic":
        return list(SYNTH_FAMILIES)
    raise TintError(f"unknown task source '{source}'; tint knows: synthetic")


def task_names(tasks_cfg: DictConfig) -> list[str]:
    """The task set's names, validated: an unknown or repeated name is a clear error."""
    names = list(tasks_cfg.names)
    known = available_tasks(tasks_cfg.source)
    for name in names:
        if name not in known:
            raise TintError(f"unknown task '{name}' in tasks '{tasks_cfg.name}'\n"
                            f"Available {tasks_cfg.source} tasks: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise TintError(f"task set '{tasks_cfg.name}' lists a task twice: {names}")
    if not names:
        raise TintError(f"task set '{tasks_cfg.name}' is empty; list tasks in tasks.names")
    for key, low in (("image_size", 8), ("train_size", 1), ("test_size", 1), ("seed", 0)):
        value = tasks_cfg.get(key)
        if key in tasks_cfg and not (isinstance(value, int) and not isinstance(value, bool)
                                     and value >= low):
            raise TintError(f"tasks.{key}={value} must be a whole number >= {low}")
    return names


def num_classes(task: str) -> int:
    return SYNTH_FAMILIES[task].num_classes


def _split_seed(seed: int, task: str, split: str) -> int:
    return zlib.crc32(f"{seed}/{task}/{split}".encode())


@dataclass(frozen=True)
class SplitEntry:
    """A split's checked cache entry and the digest of its content (its arrow files; the
    ``state.json`` that ``datasets`` writes holds a random fingerprint)."""

    entry: Entry

    @property
    def path(self) -> Path:
        return self.entry.path

    @property
    def digest(self) -> str:
        files = self.entry.manifest["files"]
        return fingerprint({name: sha for name, sha in files.items() if name.endswith(".arrow")})


def split_entry(task: str, split: str, count: int, image_size: int, seed: int) -> SplitEntry:
    """One split's cache entry, generated and stored on first use and checked on every use."""
    if split not in SPLITS:
        raise TintError(f"unknown split '{split}'; use one of {SPLITS}")
    size = int(image_size)
    parts = [GENERATOR_VERSION, task, split, count, size, seed]
    path = cache_dir() / "data" / "synthetic" / f"{task}-{split}-{fingerprint(parts)}"

    def build(folder: Path) -> None:
        import datasets  # slow import: only when data is really needed

        datasets.disable_progress_bars()
        images, labels = generate(task, count, size, _split_seed(seed, task, split))
        features = datasets.Features({
            "image": datasets.Array3D(shape=(size, size, 3), dtype="uint8"),
            "label": datasets.ClassLabel(num_classes=SYNTH_FAMILIES[task].num_classes),
        })
        datasets.Dataset.from_dict({"image": images.numpy(), "label": labels.numpy()},
                                   features=features).save_to_disk(str(folder))

    key = dict(zip(("generator", "task", "split", "count", "size", "seed"), parts, strict=True))
    return SplitEntry(ensure(path, key, build, f"the {task} {split} split"))


def load_split(task: str, split: str, count: int, image_size: int, seed: int) -> TaskSplit:
    """Load one split from the cache (checked against its digests), generating it first if
    it is missing or damaged."""
    import datasets

    datasets.disable_progress_bars()
    entry = split_entry(task, split, count, image_size, seed)
    columns = datasets.load_from_disk(str(entry.path)).with_format("torch")[:]
    return TaskSplit(task, split, columns["image"].to(torch.uint8), columns["label"].long(),
                     num_classes(task), entry.digest)
