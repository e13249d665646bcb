"""The stand-in pool (``pool=stand_in``): a real-size run with no checkpoint and no dataset.

Random weights of the encoder's real shapes (θ0, and each expert θ0 plus a small random τ), a
random head per task with the task's class count, and generated uint8 pixels in the task set's
real test-set sizes (``test_images`` in each ``conf/task`` YAML; ``tasks.test_size`` caps them
as it caps real splits). Anyone with a GPU, planning a run or checking tint's speed, gets the
real-size figures of ``tint bench`` in one command and no download:

    tint bench pool=stand_in tasks=vit8 encoder=clip_vit_b32

Its accuracies mean nothing, so ``tint merge`` refuses it (``check_not_stand_in``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from tintcli.encoders import build_encoder, feature_dim
from tintcli.errors import TintError
from tintcli.heads import ZeroShotHead
from tintcli.io import StateDict, fingerprint
from tintcli.tasks import TaskSplit, num_classes

KIND = "stand_in"


def stand_in_checkpoints(encoder_cfg: DictConfig, tasks: list[str] | int, dtype: torch.dtype,
                         seed: int = 0, device: torch.device | str = "cpu",
                         scale: float = 1e-3) -> tuple[StateDict, dict[str, StateDict]]:
    """Random checkpoints of an encoder's real shapes: θ0 and one expert θ0 + τ per task with
    small random τ (``scale``), in ``dtype`` (bf16 halves an L/14 × 20 pool: 12 GB), made on
    ``device``. ``tasks``: the experts' names, or how many (named task0, task1, ...)."""
    names = [f"task{t}" for t in range(tasks)] if isinstance(tasks, int) else list(tasks)
    with torch.random.fork_rng(devices=[]):  # the encoder's initialisation, seeded, in private
        torch.manual_seed(seed)
        encoder = build_encoder(encoder_cfg)
    generator = torch.Generator(device=device).manual_seed(seed)
    pretrained = {k: v.to(device, dtype if v.is_floating_point() else v.dtype)
                  for k, v in encoder.state_dict().items()}
    experts = {name: {k: (v + scale * torch.randn(v.shape, generator=generator,
                                                  device=device).to(dtype))
                      if v.is_floating_point() else v
                      for k, v in pretrained.items()}
               for name in names}
    return pretrained, experts


def test_image_counts(tasks_cfg: DictConfig, tasks: list[str]) -> dict[str, int]:
    """Each task's test-set size (``tasks.test_size`` caps it, as it caps a real split)."""
    cap = tasks_cfg.get("test_size")
    counts = {}
    for task in tasks:
        spec = (tasks_cfg.get("data") or {}).get(task) or {}
        count = cap if tasks_cfg.source == "synthetic" else spec.get("test_images")
        if count is None:
            raise TintError(f"pool=stand_in needs the size of the test split of task "
                            f"'{task}', and conf/task/{task}.yaml gives none\nAdd "
                            f"test_images: <count> to it (tasks.data.{task}.test_images="
                            "<count>), or cap every task with tasks.test_size=<count>.")
        counts[task] = int(count) if cap is None else min(int(count), int(cap))
    return counts


@dataclass
class StandInPool:
    """The pool and the test data of a real-size benchmark, made up (see the module)."""

    tasks: list[str]
    encoder_cfg: DictConfig
    tasks_cfg: DictConfig
    image_size: int
    seed: int = 0
    dtype: str = "fp32"
    kind: str = KIND
    source_format: str = "open_clip"  # as the zoo's
    pretrained_file: Path = Path("stand_in")  # no file: nothing is read
    _states: tuple[StateDict, dict[str, StateDict]] | None = field(default=None, repr=False)

    @property
    def counts(self) -> dict[str, int]:
        return test_image_counts(self.tasks_cfg, self.tasks)

    def _checkpoints(self) -> tuple[StateDict, dict[str, StateDict]]:
        if self._states is None:
            dtype = torch.bfloat16 if self.dtype == "bf16" else torch.float32
            self._states = stand_in_checkpoints(self.encoder_cfg, self.tasks, dtype, self.seed)
        return self._states

    def pretrained(self) -> StateDict:
        return self._checkpoints()[0]

    def expert(self, task: str, pretrained: StateDict | None = None) -> StateDict:
        return self._checkpoints()[1][task]

    def head(self, task: str) -> ZeroShotHead:
        width = feature_dim(self.encoder_cfg)
        generator = torch.Generator().manual_seed(self.seed + 1 + self.tasks.index(task))
        rows = torch.randn(num_classes(self.tasks_cfg, task), width, generator=generator)
        return ZeroShotHead.from_embeddings(rows, 100.0)

    def test_splits(self) -> dict[str, TaskSplit]:
        """uint8 pixels [N, H, W, 3] and labels for every task, generated (N: its real
        test-set size), in host memory as the pixel cache's would be."""
        splits, digests = {}, self.data_digests()
        for i, (task, count) in enumerate(self.counts.items()):
            generator = torch.Generator().manual_seed(self.seed + 1000 + i)
            images = torch.randint(0, 256, (count, self.image_size, self.image_size, 3),
                                   dtype=torch.uint8, generator=generator)
            labels = torch.randint(0, num_classes(self.tasks_cfg, task), (count,),
                                   generator=generator)
            splits[task] = TaskSplit(task, "test", images, labels,
                                     num_classes(self.tasks_cfg, task),
                                     digests[task]["test"],
                                     {"stand_in": {"seed": self.seed, "images": count}})
        return splits

    def checkpoint_hashes(self) -> dict:
        return {KIND: {"seed": self.seed, "dtype": self.dtype, "encoder": str(
            self.encoder_cfg.name)}}

    def reference_accuracies(self) -> dict[str, tuple[float, float]]:
        return {t: (math.nan, math.nan) for t in self.tasks}  # random weights: no accuracy

    def data_digests(self) -> dict[str, dict[str, str]]:
        return {t: {"test": fingerprint({KIND: self.seed, "task": t, "images": n,
                                         "size": self.image_size})}
                for t, n in self.counts.items()}


def open_stand_in(cfg: DictConfig, tasks: list[str]) -> StandInPool:
    """The stand-in pool of ``cfg`` (its encoder, task set and ``pool`` settings), its test
    sizes checked before anything is made."""
    size = cfg.encoder.get("image_size") or cfg.tasks.get("image_size")
    if not size:
        raise TintError(f"pool=stand_in generates images of the encoder's input size, and "
                        f"encoder '{cfg.encoder.name}' sets no image_size\nSet "
                        "encoder.image_size (CLIP encoders: 224).")
    dtype = str(cfg.pool.get("dtype", "fp32"))
    if dtype not in ("fp32", "bf16"):
        raise TintError(f"pool.dtype={dtype} must be fp32 or bf16")
    pool = StandInPool(tasks, cfg.encoder, cfg.tasks, int(size), int(cfg.pool.get("seed", 0)),
                       dtype)
    pool.counts  # noqa: B018 - a task without a test size fails here, before any work
    return pool


def check_not_stand_in(cfg: DictConfig, command: str = "tint merge") -> None:
    """The stand-in pool's numbers mean nothing: only ``tint bench`` takes it."""
    if "pool" in cfg and cfg.pool.get("kind") == KIND:
        raise TintError(f"pool=stand_in has random weights and generated pixels: its "
                        f"accuracies mean nothing, so {command} does not take it\nUse it with "
                        "tint bench (speed and memory at real size); for results, pick a pool "
                        "of real checkpoints (pool=hf, pool=task_vectors, pool=local) or the "
                        "built-in benchmark (pool=synth).")
