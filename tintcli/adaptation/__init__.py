"""Test-time adaptive merging: AdaMerging and Model Tinting (``adamerging.py``,
``tinting.py``: trainers, registered as methods) and what they share.

An adaptive method learns merging coefficients (and, for Tinting, one task-specific layer per
task) on unlabeled test images. The pieces here are method-agnostic:

- ``AdaptationContext``: the adaptation images, heads and device of one run, plus the experts'
  outputs on those images, computed once and reused (they never change during adaptation);
- ``LambdaMerger`` (merger.py): theta(lambda) built on the device from stacked task vectors;
- ``SAMPLERS`` (samplers.py): which pseudo-labelled samples a step learns from;
- ``Adapted``: what a method returns, and what tint scores and saves.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from tintcli.errors import TintError
from tintcli.io import StateDict, check_finite_weights, encoder_entries
from tintcli.runtime import Runtime

# (steps done, total steps, last loss, each task's lambda averaged over layers)
StepCallback = Callable[[int, int, float, list[float]], None]


@dataclass
class AdaptationContext:
    """Unlabeled adaptation images of every task, with the encoder and heads to run them."""

    encoder: nn.Module                     # the architecture; weights come per step
    heads: Mapping[str, nn.Module]         # each task's zero-shot head (left untouched)
    images: Mapping[str, torch.Tensor]     # uint8 [N, H, W, 3]: on the device where they fit
    runtime: Runtime                       # device, precision, normalisation
    seed: int = 0
    on_step: StepCallback | None = None
    vectors_dtype: torch.dtype = torch.float32  # how the stacked task vectors are stored
    _expert_logits: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def tasks(self) -> list[str]:
        return list(self.images)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def inputs(self, task: str, index: torch.Tensor) -> torch.Tensor:
        """The encoder's inputs for rows ``index`` of the task's images, on the device."""
        images = self.images[task]
        return self.runtime.inputs(images[index.to(images.device)])

    def task_vectors(self, pretrained: StateDict, experts: Mapping[str, StateDict]
                     ) -> tuple[StateDict, list[Mapping[str, torch.Tensor]]]:
        """theta_0 and tau_k for each task, in the encoder's own order (input to output), so
        that layer-wise lambdas read from the patch embedding up (checkpoints sort keys by
        name). tau_k is computed entry by entry when read (``LazyTaskVector``). An expert with
        NaN/inf weights is refused by name: it would poison every task's merged weights, and
        the first task's loss would take the blame."""
        from tintcli.merging.task_vectors import LazyTaskVector

        order = [k for k in self.encoder.state_dict() if k in pretrained]
        pretrained = {**{k: pretrained[k] for k in order}, **pretrained}
        for task in self.tasks:
            check_finite_weights(experts[task], f"the expert for task '{task}'")
        return pretrained, [LazyTaskVector(experts[t], pretrained) for t in self.tasks]

    def head(self, task: str) -> nn.Module:
        return self.heads[task].to(self.device).eval().requires_grad_(False)

    @torch.no_grad()  # not inference_mode: these become targets inside autograd graphs
    def expert_logits(self, experts: Mapping[str, StateDict]) -> dict[str, torch.Tensor]:
        """Each expert's logits on its task's adaptation images, on the device: computed on
        first use and reused for the rest of the run, by every method that needs them."""
        missing = [t for t in self.tasks if t not in self._expert_logits]
        encoder = copy.deepcopy(self.encoder).to(self.device).eval() if missing else None
        for task in missing:
            encoder.load_state_dict(encoder_entries(experts[task]))
            head, out = self.head(task), []
            for inputs in self.runtime.batches(self.images[task]):
                with self.runtime.autocast():
                    out.append(head(encoder(inputs)).float())
            self._expert_logits[task] = torch.cat(out)
        return self._expert_logits

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def report(self, done: int, total: int, loss: float, merger: LambdaMerger) -> None:
        """Tell the run (progress bar, W&B) where training is, as it trains."""
        if self.on_step is not None:
            self.on_step(done, total, loss, merger.lambdas().detach().mean(0).tolist())


def batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of indices into ``count`` samples: each pass over the data
    is a new permutation (like a shuffled DataLoader); a short remainder is dropped."""
    batch_size = min(batch_size, count)
    while True:
        order = torch.randperm(count, generator=generator)
        for i in range(0, count - batch_size + 1, batch_size):
            yield order[i : i + batch_size]


def check_common(params: Mapping[str, object]) -> None:
    """The checks of what every adaptive run takes (AdaptationRun): lr, batch size, lambda's
    start. Each method's own check calls this, then checks its own parameters."""
    from tintcli.checks import number, positive, whole

    positive(params, "lr")
    whole(params, "batch_size")
    number(params, "lam_init", 0, 1, must="in [0, 1] (lambdas are clamped there)")


def check_finite(loss: torch.Tensor, method: str, step: int, task: str) -> None:
    """Stop at once, naming where, when adaptation diverges (NaN or inf loss)."""
    value = loss.detach().item()
    if not math.isfinite(value):
        raise TintError(f"{method}: the adaptation loss is {value} at step {step} on task "
                        f"'{task}'\nCheck that task's expert checkpoint for NaN/inf weights, or "
                        "lower the method's lr.")


@dataclass
class Adapted:
    """An adaptive method's outcome: one merged encoder, plus per-task tints.

    ``heads`` hold each task's head (tinted, or the zero-shot one); ``tints`` hold, per task,
    the encoder entries that task overrides (empty unless an encoder module was tinted);
    ``tinted`` names what was tinted ("head", a module name, or None).
    ``lambdas`` is [layers, tasks] (task-wise methods have one row, ``layer_names == ['all']``).
    """

    method: str
    state: StateDict
    heads: dict[str, nn.Module]
    tints: dict[str, StateDict]
    lambdas: torch.Tensor
    layer_names: list[str]
    tasks: list[str]
    loss_curve: dict[str, object]
    tinted: str | None = None

    def task_state(self, task: str) -> StateDict:
        return {**self.state, **self.tints[task]} if task in self.tints else self.state


from tintcli.adaptation.merger import LambdaMerger  # noqa: E402
from tintcli.adaptation.samplers import SAMPLERS, pseudo_label_loss  # noqa: E402


class AdaptationRun:
    """What every adaptive run holds: lambda over the task vectors, the encoder to run on the
    merged weights, and a seeded batch stream per task. Methods subclass it with their step."""

    name = "adaptation"

    def __init__(self, context: AdaptationContext, pretrained: StateDict,
                 vectors: list[StateDict], granularity: str, lam_init: float, batch_size: int):
        self.context = context
        self.tasks = context.tasks
        self.encoder = context.encoder.to(context.device).eval()
        self.merger = LambdaMerger(pretrained, vectors, granularity, lam_init, context.device,
                                   context.vectors_dtype)
        # fp16 autocast needs loss scaling (bf16 and fp32 do not: the scaler is then a no-op)
        self.scaler = torch.amp.GradScaler(context.device.type,
                                           enabled=context.runtime.precision == "fp16")
        self.generator = context.generator()
        self.streams = {t: batches(len(context.images[t]), batch_size, self.generator)
                        for t in self.tasks}
        self.steps_done = 0

    def next_index(self, task: str) -> torch.Tensor:
        return next(self.streams[task])

    def images(self, task: str, index: torch.Tensor) -> torch.Tensor:
        return self.context.inputs(task, index)

    def autocast(self):
        return self.context.runtime.autocast()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step on gradients backpropagated from ``self.scaler.scale(loss)``."""
        self.scaler.step(optimizer)
        self.scaler.update()

    def adapted(self, heads: Mapping[str, nn.Module], tints: dict[str, StateDict],
                loss_curve: dict[str, object], tinted: str | None = None) -> Adapted:
        """The outcome, on the CPU: merged encoder at the learned lambda, heads and tints."""
        with torch.no_grad():
            state = {k: v.detach().cpu() for k, v in self.merger().items()}
        return Adapted(self.name, state, dict(heads), tints, self.merger.lambdas().detach().cpu(),
                       self.merger.layer_names, self.tasks, loss_curve, tinted)

# The trainers (importing them registers them as methods).
from tintcli.adaptation.adamerging import adamerging_merge  # noqa: E402
from tintcli.adaptation.tinting import tinting_merge  # noqa: E402

__all__ = ["AdaptationContext", "AdaptationRun", "Adapted", "LambdaMerger", "SAMPLERS",
           "batches", "check_finite", "check_common", "pseudo_label_loss", "adamerging_merge",
           "tinting_merge"]
