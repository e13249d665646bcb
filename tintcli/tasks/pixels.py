"""The pixel cache: each split decoded, resized and cropped once, stored as uint8, memory-mapped.

Decoding JPEG/PNG and resizing to 224 costs far more than a ViT-B/32 forward on a GPU, so no
evaluation or adaptation decodes an image: they read ``images.npy`` ([N, S, S, 3] uint8,
memory-mapped) and ``labels.npy`` from a cache entry (``tintcli/cache.py``: built once under a
lock, checked on every read), and normalise on the device. An entry is keyed by the dataset's
fingerprint, the rows taken (a validation carve, a size limit), the columns and the transform,
so every run and every sweep over the same data reuses it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from tintcli.cache import ensure, kept
from tintcli.errors import TintError
from tintcli.io import fingerprint
from tintcli.paths import cache_dir

PIXELS_FORMAT = 1
BATCH = 64  # images decoded per worker task


@dataclass(frozen=True)
class Transform:
    """CLIP's evaluation transform: resize the short side to ``size`` (``interpolation``), then
    centre-crop ``size`` x ``size``. An image already ``size`` x ``size`` is kept as is."""

    size: int
    interpolation: str = "bicubic"
    crop: str = "center"

    def __call__(self, image: Any) -> np.ndarray:
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            mode = InterpolationMode(self.interpolation)
            image = TF.center_crop(TF.resize(image, self.size, interpolation=mode), self.size)
        return np.asarray(image, dtype=np.uint8)


@dataclass
class Pixels:
    """One cached split: uint8 images [N, S, S, 3] (memory-mapped) and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    digest: str  # the entry's content digest: what every number measured on it records

    def __len__(self) -> int:
        return len(self.labels)


class _Decode(torch.utils.data.Dataset):
    """Batch b of the selected rows, decoded and transformed (runs in DataLoader workers)."""

    def __init__(self, dataset: Any, rows: Sequence[int], image_column: str,
                 label_column: str, transform: Transform):
        self.dataset, self.rows, self.transform = dataset, list(rows), transform
        self.image_column, self.label_column = image_column, label_column

    def __len__(self) -> int:
        return (len(self.rows) + BATCH - 1) // BATCH

    def __getitem__(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        batch = self.dataset[self.rows[b * BATCH: (b + 1) * BATCH]]
        images = np.stack([self.transform(x) for x in batch[self.image_column]])
        return images, np.asarray([int(y) for y in batch[self.label_column]], dtype=np.int64)


def pixel_split(name: str, source: dict, open_dataset: Callable[[], Any],
                rows: Sequence[int] | None, image_column: str, label_column: str,
                num_classes: int, transform: Transform, workers: int = 0,
                console: Console | None = None) -> Pixels:
    """The cached pixels of ``rows`` of a dataset (all rows when None), building them once.

    ``source`` identifies the dataset (its ``datasets`` fingerprint and size, or the digest of
    generated data); ``open_dataset`` opens it, called only when the entry must be built.
    """
    key = {"format": PIXELS_FORMAT, "source": source, "columns": [image_column, label_column],
           "rows": None if rows is None else fingerprint(list(map(int, rows))),
           "count": None if rows is None else len(rows), "transform": asdict(transform)}
    path = cache_dir() / "pixels" / f"{name.replace('/', '-')}-{fingerprint(key)}"

    def build(folder: Path) -> dict:
        dataset = open_dataset()
        for column in (image_column, label_column):
            if column not in dataset.column_names:
                raise TintError(f"{name}: the dataset has no column '{column}' (it has "
                                f"{', '.join(dataset.column_names)})\nSet the task's "
                                "image_column / label_column.")
        selected = range(len(dataset)) if rows is None else rows
        count, size = len(selected), transform.size
        images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(count, size, size, 3))
        labels = np.zeros(count, dtype=np.int64)
        loader = torch.utils.data.DataLoader(
            _Decode(dataset, selected, image_column, label_column, transform), batch_size=None,
            num_workers=workers if count > 4 * BATCH else 0)
        done = 0
        out = console or Console(stderr=True)
        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeRemainingColumn(), console=out,
                      transient=True, disable=not out.is_terminal) as progress:
            # (a transient bar in a log or a pipe would leave an empty line there)
            doing = "caching" if kept(folder) else "decoding (for this run only)"
            bar = progress.add_task(f"{doing} {name} pixels", total=count)
            for batch_images, batch_labels in loader:
                images[done: done + len(batch_labels)] = batch_images
                labels[done: done + len(batch_labels)] = batch_labels
                done += len(batch_labels)
                progress.update(bar, completed=done)
        images.flush()
        del images
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if len(bad):
            raise TintError(f"{name}: label {int(bad[0])} in column '{label_column}' is outside "
                            f"the task's {num_classes} classes\nCheck the task's label_column "
                            "and classnames.")
        np.save(folder / "labels.npy", labels)
        return {"count": count}

    entry = ensure(path, key, build, f"the {name} pixels", console)
    # copy-on-write mapping: pages are read on demand, and nothing is ever written back
    images = np.load(entry.file("images.npy"), mmap_mode="c")
    labels = np.load(entry.file("labels.npy"))
    return Pixels(torch.from_numpy(images), torch.from_numpy(labels),
                  fingerprint(entry.manifest["files"]))


def validation_rows(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train rows, validation rows) as FusionBench carves them: ``torch.utils.data.random_split``
    of ``count`` rows into ``count - int(count * fraction)`` and ``int(count * fraction)`` with a
    generator seeded ``seed``, i.e. one ``randperm``, train first."""
    if not 0 < fraction < 1:
        raise TintError(f"tasks.validation.fraction={fraction} must be in (0, 1)")
    held = int(count * fraction)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return order[: count - held], order[count - held:]
