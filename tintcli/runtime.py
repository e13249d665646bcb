"""Where and how tensors are computed: the device, the precision, and the images' way in.

Images travel as uint8 (4x less than float32 over the bus and in memory) and become the
encoder's normalised float input on the device. On CUDA, batches are read from the
memory-mapped pixel cache by background workers into pinned memory and copied without
blocking, so the next batch loads while the device computes; precision ``bf16``/``fp16``
runs the forward under autocast (AMP), ``fp32`` keeps exact float32 for comparisons.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from tintcli.errors import TintError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESIDENCY = ("auto", "always", "never")  # runtime.resident_pixels


def resolve_precision(name: object, device: torch.device) -> str:
    """``auto``: bf16 AMP on CUDA (fp16 where the GPU lacks bf16), exact fp32 on the CPU."""
    name = str(name)
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name not in PRECISIONS:
        raise TintError(f"precision={name} is not one tint knows\n"
                        f"Use precision=auto, {', '.join(PRECISIONS)}.")
    return name


def runtime_options(cfg: DictConfig) -> dict:
    """A run config's settings of how tensors are computed (``precision``, the ``eval:`` and
    ``runtime:`` blocks), as ``Runtime.create`` takes them."""
    evaluation, runtime = cfg.get("eval") or {}, cfg.get("runtime") or {}
    return {"precision": cfg.get("precision", "auto"),
            "batch_size": int(evaluation.get("batch_size", 512)),
            "workers": int(evaluation.get("workers", 2)),
            "resident_pixels": runtime.get("resident_pixels", "auto"),
            "compile": runtime.get("compile", False)}


def check_residency(value: object) -> str:
    """``runtime.resident_pixels``: one of ``RESIDENCY``."""
    if str(value) not in RESIDENCY:
        raise TintError(f"runtime.resident_pixels={value} is not a choice tint knows\n"
                        f"Use {', '.join(RESIDENCY)}.")
    return str(value)


def check_compile(value: object) -> bool:
    """``runtime.compile``: true or false."""
    if not isinstance(value, bool):
        raise TintError(f"runtime.compile={value} must be true or false")
    return value


class _Slices(torch.utils.data.Dataset):
    """Batch i of a (memory-mapped) uint8 tensor, as one contiguous copy."""

    def __init__(self, images: torch.Tensor, batch_size: int):
        self.images, self.batch_size = images, batch_size

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i * self.batch_size: (i + 1) * self.batch_size].clone()


@dataclass(frozen=True)
class Runtime:
    """The device, the precision and the normalisation every forward of a run uses."""

    device: torch.device
    precision: str = "fp32"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    batch_size: int = 512   # evaluation batch
    workers: int = 2        # background loaders (CUDA only; on the CPU they would compete)
    resident_pixels: str = "auto"  # whether the test pixels live on the device (RESIDENCY)
    compile: bool = False   # adaptation's encoder forward+backward through torch.compile

    @classmethod
    def create(cls, device: torch.device, encoder_cfg: DictConfig, precision: object = "auto",
               batch_size: int = 512, workers: int = 2, resident_pixels: object = "auto",
               compile: object = False) -> Runtime:
        return cls(device, resolve_precision(precision, device),
                   tuple(float(m) for m in encoder_cfg.mean),
                   tuple(float(s) for s in encoder_cfg.std), int(batch_size), int(workers),
                   check_residency(resident_pixels), check_compile(compile))

    @property
    def step_path(self) -> str:
        """Which path adaptation steps take: ``compiled`` (runtime.compile) or ``eager``."""
        return "compiled" if self.compile else "eager"

    def compiled(self, fn: Callable) -> Callable:
        """``fn`` itself, or with ``compile`` through ``torch.compile``, compiled on its first
        call (CUDA: ``reduce-overhead``, CUDA graphs, for a step's thousands of small
        launches; shapes static: a step's batch never changes)."""
        if not self.compile:
            return fn
        mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        return torch.compile(fn, mode=mode, dynamic=False)

    def encoder_forward(self, encoder: torch.nn.Module
                        ) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
        """``forward(weights, images)``: the encoder run on the given weights (the merged
        state of an adaptation step), as ``functional_call``; ``compiled`` with ``compile``."""
        from torch.func import functional_call

        def forward(weights: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
            return functional_call(encoder, weights, (images,))

        return self.compiled(forward)

    def adam(self, params, **options) -> torch.optim.Adam:
        """Adam for an adaptation run: on CUDA fused (one kernel a step for every parameter,
        and a step it can skip on the device: ``AdaptationRun.optimizer_step``), else torch's
        default (on the CPU: today's numbers, exactly)."""
        return torch.optim.Adam(params, fused=self.device.type == "cuda" or None, **options)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    @functools.cached_property
    def _mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """On the device once, not copied there again for every batch."""
        return (torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1),
                torch.tensor(self.std, device=self.device).view(1, 3, 1, 1))

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] (any device) -> the encoder's float [N, 3, H, W] on the device."""
        images = images.to(self.device, non_blocking=True)
        mean, std = self._mean_std
        # NCHW contiguous, as the encoder is fastest on (a permuted view runs its conv slower)
        x = images.permute(0, 3, 1, 2).contiguous().float().div_(255)
        return (x - mean) / std

    def batches(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """The encoder's inputs, batch by batch, in order."""
        if images.device.type != "cpu" or self.device.type != "cuda":  # already there / no bus
            for start in range(0, len(images), self.batch_size):
                yield self.inputs(images[start: start + self.batch_size])
            return
        loader = torch.utils.data.DataLoader(
            _Slices(images, self.batch_size), batch_size=None, pin_memory=True,
            num_workers=self.workers, prefetch_factor=4 if self.workers else None)
        for batch in loader:
            yield self.inputs(batch)

    def keeps_resident(self, nbytes: int) -> bool:
        """Whether pixels of ``nbytes`` live on the device for the whole run (read there by
        every evaluation and adaptation step, never copied again), by ``resident_pixels``.
        On the CPU they are where the device reads them already."""
        if self.device.type != "cuda" or self.resident_pixels == "never":
            return False
        if self.resident_pixels == "auto":
            return self.fits(nbytes)
        free, _ = torch.cuda.mem_get_info(self.device)
        if nbytes > 0.9 * free:
            from tintcli.memory import size

            raise TintError(f"runtime.resident_pixels=always: the test pixels need "
                            f"{size(nbytes)} and {self.device} has {size(free)} free\nUse "
                            "runtime.resident_pixels=auto (they stream from the host where "
                            "they do not fit), or a smaller task set.")
        return True

    def fits(self, nbytes: int, share: float = 0.25) -> bool:
        """Whether ``nbytes`` can live on the device (CUDA: within ``share`` of free memory)."""
        if self.device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        return nbytes <= share * free
