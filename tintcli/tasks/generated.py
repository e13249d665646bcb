"""tint's own generated task data (``synthetic.py`` draws it), stored with Hugging Face
``datasets`` (``save_to_disk``) as uint8 pixels: each split is a cache entry
(``tintcli/cache.py``), generated once and checked against its digests whenever it is read.
The zoo trains on these splits; runs read them, like every dataset, through the pixel cache."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from tintcli.cache import Entry, ensure
from tintcli.errors import TintError
from tintcli.io import fingerprint
from tintcli.paths import cache_dir
from tintcli.tasks.synthetic import SYNTH_FAMILIES, generate

# Bump when the generators change, so cached splits are regenerated.
GENERATOR_VERSION = 11
SPLITS = ("pretrain", "train", "test")


@dataclass
class SyntheticSplit:
    task: str
    split: str
    images: torch.Tensor  # uint8 [N, H, W, 3]
    labels: torch.Tensor  # int64 [N]
    num_classes: int
    digest: str = ""      # the cache entry's content digest

    def __len__(self) -> int:
        return len(self.labels)


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


def synthetic_entry(task: str, split: str, count: int, image_size: int, seed: int) -> SplitEntry:
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


def load_synthetic(task: str, split: str, count: int, image_size: int, seed: int) -> SyntheticSplit:
    """Load one split from the cache (checked against its digests), generating it first if
    it is missing or damaged."""
    import datasets

    datasets.disable_progress_bars()
    entry = synthetic_entry(task, split, count, image_size, seed)
    columns = datasets.load_from_disk(str(entry.path)).with_format("torch")[:]
    return SyntheticSplit(task, split, columns["image"].to(torch.uint8), columns["label"].long(),
                     SYNTH_FAMILIES[task].num_classes, entry.digest)
