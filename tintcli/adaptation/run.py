"""What every test-time adaptive run shares, whatever the method: its inputs
(``AdaptationContext``: the unlabeled images, heads, device, and the experts' outputs on
those images, computed once), its base class (``AdaptationRun``: lambda over the task
vectors, a seeded ``BatchStream`` per task, checkpointed steps), its checks (``check_common``,
``read_losses``) and its outcome (``Merged``). The trainers (``adamerging.py``,
``tinting.py``) subclass ``AdaptationRun``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from torch import nn

from tintcli.adaptation.checkpoints import Checkpoint
from tintcli.adaptation.merger import LambdaMerger
from tintcli.errors import TintError
from tintcli.io import StateDict, check_finite_weights, encoder_entries
from tintcli.merged import Merged
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
    # where this method's run keeps its checkpoint (None: it keeps none), how often it saves
    # one (in steps: AdaMerging steps, Tinting task-steps), and what must match for a saved
    # one to be resumed (the run's config; the method and its parameters are added to it)
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 100
    checkpoint_key: dict = field(default_factory=dict)
    console: Console | None = None  # where notes go (None: stderr)
    # the images' true labels: only an oracle may learn from them (loss=crossgt, oracle=true)
    labels: Mapping[str, torch.Tensor] | None = None
    # what one method learned that a later one of the same run reuses: layer-wise
    # AdaMerging's λ, keyed by its parameters (Surgery and ProbSurgery start from them)
    learned: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    # the experts' logits / features on the images, by kind, then task: computed once a run
    _expert_outputs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict,
                                                                repr=False)

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

    def expert_logits(self, experts: Mapping[str, StateDict]) -> dict[str, torch.Tensor]:
        """Each expert's logits on its task's adaptation images, on the device: computed on
        first use and reused for the rest of the run, by every method that needs them."""
        return self._expert_outputs_of(experts, "logits")

    def expert_features(self, experts: Mapping[str, StateDict]) -> dict[str, torch.Tensor]:
        """Each expert encoder's features (before the head) on its task's adaptation
        images, computed once as the logits are (Surgery's and ``l1feature``'s target)."""
        return self._expert_outputs_of(experts, "features")

    @torch.no_grad()  # not inference_mode: these become targets inside autograd graphs
    def _expert_outputs_of(self, experts: Mapping[str, StateDict], kind: str
                           ) -> dict[str, torch.Tensor]:
        outputs = self._expert_outputs.setdefault(kind, {})
        missing = [t for t in self.tasks if t not in outputs]
        encoder = copy.deepcopy(self.encoder).to(self.device).eval() if missing else None
        for task in missing:
            encoder.load_state_dict(encoder_entries(experts[task]))
            head, out = self.head(task), []
            for inputs in self.runtime.batches(self.images[task]):
                with self.runtime.autocast():
                    features = encoder(inputs)
                    out.append((head(features) if kind == "logits" else features).float())
            outputs[task] = torch.cat(out)
        return outputs

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def report(self, done: int, total: int, loss: float, per_task: list[float]) -> None:
        """Tell the run (progress bar, W&B) where training is, as it trains; ``per_task``:
        each task's current coefficient (λ averaged over layers; WEMoE: routing weight)."""
        if self.on_step is not None:
            self.on_step(done, total, loss, per_task)

    def note(self, message: str) -> None:
        """A one-line note to the user (a checkpoint resumed, or not used and why)."""
        console = self.console or Console(stderr=True)
        console.print(f"[yellow]note:[/] {escape(message)}", soft_wrap=True, highlight=False)


class BatchStream:
    """Endless shuffled batches of indices into ``count`` samples: each pass over the data
    is a new permutation (like a shuffled DataLoader); a short remainder is dropped. Its state
    (the current permutation, the position in it) is explicit, for checkpoints."""

    def __init__(self, count: int, batch_size: int, generator: torch.Generator,
                 device: torch.device | str = "cpu"):
        self.count, self.batch_size, self.generator = count, min(batch_size, count), generator
        self.order: torch.Tensor | None = None  # drawn when the first batch is
        self.position = 0
        # the permutation where the samples are, copied once a pass (a copy per batch would
        # make the host wait for the device at every step)
        self.device = torch.device(device)
        self.on_device: torch.Tensor | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> torch.Tensor:
        if self.order is None or self.position + self.batch_size > self.count:
            self.order, self.position = torch.randperm(self.count, generator=self.generator), 0
            self.on_device = self.order.to(self.device)
        self.position += self.batch_size
        return self.on_device[self.position - self.batch_size : self.position]

    def state(self) -> dict[str, Any]:
        return {"order": self.order, "position": self.position}  # order is replaced, never edited

    def load_state(self, state: Mapping[str, Any]) -> None:
        order, position = state["order"], int(state["position"])
        if order is not None and (tuple(order.shape) != (self.count,)
                                  or not 0 <= position <= self.count):
            raise ValueError(f"a batch stream over {len(order)} samples at {position}, not over "
                             f"{self.count}")
        self.order, self.position = order, position
        self.on_device = None if order is None else order.to(self.device)


def check_common(params: Mapping[str, object]) -> None:
    """The checks of what every adaptive run takes (AdaptationRun): lr, batch size, lambda's
    start. Each method's own check calls this, then checks its own parameters."""
    from tintcli.checks import number, positive, whole

    positive(params, "lr")
    whole(params, "batch_size")
    number(params, "lam_init", 0, 1, must="in [0, 1] (lambdas are clamped there)")


def read_losses(losses: list[torch.Tensor | float], method: str,
                where: Sequence[tuple[int, str]]) -> list[float]:
    """Losses kept on the device as steps were taken, read back in one transfer (those on the
    CPU, as a resumed checkpoint gives them, are read where they are), and checked: the
    first NaN or inf stops the run naming its step and task (``where``: one (step, task) per
    loss). A step that read its loss at once would make the host wait for the device at
    every step; this waits once."""
    def on_device(loss: object) -> bool:
        return isinstance(loss, torch.Tensor) and loss.device.type != "cpu"

    tensors = [loss.detach().float() for loss in losses if on_device(loss)]
    read = iter(torch.stack(tensors).tolist() if tensors else [])
    values = [next(read) if on_device(loss) else float(loss) for loss in losses]
    for value, (step, task) in zip(values, where, strict=True):
        if not math.isfinite(value):
            raise TintError(f"{method}: the adaptation loss is {value} at step {step} on task "
                            f"'{task}'\nCheck that task's expert checkpoint for NaN/inf "
                            "weights, or lower the method's lr.")
    return values


class AdaptationRun:
    """What every adaptive run holds: lambda over the task vectors, the encoder to run on the
    merged weights, and a seeded batch stream per task. Methods subclass it with their step
    (``advance``) and what they train (``trained``); ``train`` runs the steps, checkpointed.

    A run's state has two parts: what the steps learned (``learned``: the trained modules,
    Adam's state, the loss scale) and where the run is (``progress``: steps done, the loss
    curve, the generator's and the batch streams' states). The learned part changes only in
    an optimiser update, so a stop anywhere else in a step resumes from the last step boundary:
    the learned part as it is, with the progress as it was at that boundary (``mark``)."""

    name = "adaptation"

    def __init__(self, context: AdaptationContext, pretrained: StateDict,
                 vectors: list[StateDict] | None, granularity: str, lam_init: float,
                 batch_size: int):
        self.context = context
        self.tasks = context.tasks
        self.encoder = context.encoder.to(context.device).eval()
        # the encoder on a step's weights: eager, or compiled (runtime.compile)
        self.forward = context.runtime.encoder_forward(self.encoder)
        # (vectors None: a method that learns no λ over whole task vectors, as WEMoE)
        self.merger = None if vectors is None else LambdaMerger(
            pretrained, vectors, granularity, lam_init, context.device, context.vectors_dtype)
        # a step's merge, compiled as the encoder is: its fixed tensors (θ_0, the stacked
        # task vectors) keep their addresses, so a CUDA graph reads them where they are
        self.merge = None if self.merger is None else context.runtime.compiled(self.merger)
        if self.merger is not None and context.runtime.compile:
            for tensor in self.merger.buffers():
                torch._dynamo.mark_static_address(tensor)
        # fp16 autocast needs loss scaling (bf16 and fp32 do not: the scaler is then a no-op)
        self.scaler = torch.amp.GradScaler(context.device.type,
                                           enabled=context.runtime.precision == "fp16")
        self.generator = context.generator()
        self.streams = {t: BatchStream(len(context.images[t]), batch_size, self.generator,
                                       context.images[t].device) for t in self.tasks}
        self.steps_done = 0
        self.curve: list[float] = []
        self.updating = False  # from an optimiser update to the end of its step

    def next_index(self, task: str) -> torch.Tensor:
        return next(self.streams[task])

    def images(self, task: str, index: torch.Tensor) -> torch.Tensor:
        return self.context.inputs(task, index)

    def next_batches(self) -> dict[str, torch.Tensor]:
        """The next batch of every task (a step over all tasks: AdaMerging, WEMoE)."""
        return {t: self.images(t, self.next_index(t)) for t in self.tasks}

    def autocast(self):
        return self.context.runtime.autocast()

    def step_loss(self, losses: list[torch.Tensor]) -> float:
        """A step over every task (AdaMerging, WEMoE): its tasks' losses, one per task, read
        back at once and checked (``read_losses``), summed."""
        return sum(read_losses(losses, self.name,
                               [(self.steps_done + 1, task) for task in self.tasks]))

    def optimizer_step(self, optimizer: torch.optim.Optimizer,
                       skip: torch.Tensor | None = None) -> None:
        """Step on gradients backpropagated from ``self.scaler.scale(loss)``. ``skip``: a
        boolean on the device, true when the step had nothing to learn from (no sample kept):
        then nothing moves, Adam's momentum and step count included. A fused Adam (CUDA:
        ``Runtime.adam``) skips on the device, as it does on the loss scaler's overflow, and
        the host never waits; otherwise the host reads ``skip`` (on the CPU that is free)."""
        self.updating = True
        if skip is not None:
            if optimizer.defaults.get("fused") and not self.scaler.is_enabled():
                optimizer.found_inf = skip.float()  # read by fused Adam: skip when nonzero
                try:
                    optimizer.step()
                finally:
                    del optimizer.found_inf
                return
            if bool(skip):
                return
        self.scaler.step(optimizer)
        self.scaler.update()

    def advance(self) -> float | None:
        """One step of the method's schedule, with its place in the loss curve; the loss to
        report, or None (mid-epoch)."""
        raise NotImplementedError

    def per_task(self) -> list[float]:
        """Each task's coefficient now, for progress and W&B: λ averaged over layers."""
        return self.merger.lambdas().detach().mean(0).tolist()

    def trained(self) -> dict[str, nn.Module]:
        """The modules the optimiser moves."""
        return {"merger": self.merger}

    def train(self, total: int, params: Mapping[str, Any]) -> None:
        """Run steps until ``total`` are done, from the checkpoint in the context's
        ``checkpoint_dir`` where one was made for the same run, method and ``params``. Saves a
        checkpoint every ``checkpoint_every`` steps and when the loop is left by an exception
        (Ctrl-C, SIGTERM, a requeue's sys.exit), then re-raises; removes it once done."""
        context = self.context
        key = {"run": context.checkpoint_key, "method": self.name, "params": dict(params),
               "seed": context.seed, "images": {t: len(context.images[t]) for t in self.tasks},
               "precision": context.runtime.precision, "vectors_dtype": str(context.vectors_dtype)}
        checkpoint = Checkpoint(context.checkpoint_dir, key, context.note)
        checkpoint.resume(self)
        every = max(1, context.checkpoint_every)
        mark = self.progress()  # the last step boundary
        try:
            for _ in range(total - self.steps_done):
                loss = self.advance()
                mark, self.updating = self.progress(), False
                if self.steps_done % every == 0 and self.steps_done < total:
                    checkpoint.save(self.state(mark), self.steps_done)
                if loss is not None:
                    context.report(self.steps_done, total, loss, self.per_task())
        except BaseException:
            if not self.updating:  # (stopped mid-update, the state is neither before nor after)
                checkpoint.save(self.state(mark), mark["steps_done"])
            raise
        checkpoint.remove()

    def progress(self) -> dict[str, Any]:
        """Where the run is, as a copy (it is taken at every step boundary)."""
        return {"steps_done": self.steps_done, "curve": list(self.curve),
                "generator": self.generator.get_state(),
                "streams": {t: stream.state() for t, stream in self.streams.items()}}

    def load_progress(self, progress: Mapping[str, Any]) -> None:
        self.steps_done, self.curve = int(progress["steps_done"]), list(progress["curve"])
        self.generator.set_state(progress["generator"])
        for task, stream in self.streams.items():
            stream.load_state(progress["streams"][task])

    def state(self, progress: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The whole state: what was learned, and ``progress`` (by default, the current)."""
        optimizer = self.optimizer.state_dict()
        learned = {"modules": {name: m.state_dict() for name, m in self.trained().items()},
                   "optimizer": {"state": {str(i): s for i, s in optimizer["state"].items()},
                                 "param_groups": optimizer["param_groups"]},
                   "scaler": self.scaler.state_dict()}
        return {"learned": learned,
                "progress": self.progress() if progress is None else progress}

    def load_state(self, state: Mapping[str, Any]) -> None:
        learned = state["learned"]
        for name, module in self.trained().items():
            module.load_state_dict(learned["modules"][name])
        optimizer = learned["optimizer"]
        self.optimizer.load_state_dict({
            "state": {int(i): s for i, s in optimizer["state"].items()},
            "param_groups": optimizer["param_groups"]})
        self.scaler.load_state_dict(learned["scaler"])
        self.load_progress(state["progress"])

    def adapted(self, heads: Mapping[str, nn.Module], tints: dict[str, StateDict],
                loss_curve: dict[str, object], tinted: str | None = None) -> Merged:
        """The outcome, on the CPU: merged encoder at the learned lambda, heads and tints."""
        with torch.no_grad():
            state = {k: v.detach().cpu() for k, v in self.merger().items()}
        return Merged(self.name, state, dict(heads), tints, self.merger.lambdas().detach().cpu(),
                       self.merger.layer_names, self.tasks, loss_curve, tinted)


class EpochRun(AdaptationRun):
    """A run in epochs of one step per task entry of ``epoch_order()`` (Model Tinting: the
    tasks shuffled; Surgery: its schedule): ``advance`` takes the epoch's next step, and an
    epoch's last step adds the epoch's mean loss to the curve. Subclasses define
    ``epoch_order`` and ``step(task)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch: list[str] = []          # this epoch's order of tasks (empty between epochs)
        self.epoch_losses: list[float] = []  # its steps' losses so far

    def epoch_order(self) -> list[str]:
        raise NotImplementedError

    def step(self, task: str) -> torch.Tensor | float:
        raise NotImplementedError

    def advance(self) -> float | None:
        """The epoch's next task's step (an epoch's order is drawn at its start); an epoch's
        last step reads its steps' losses back from the device at once (each step keeps its
        loss there: no step waits for the device), stops if one is NaN or inf, and adds the
        epoch's mean loss to the curve, and returns it."""
        if not self.epoch:
            self.epoch, self.epoch_losses = self.epoch_order(), []
        self.epoch_losses.append(self.step(self.epoch[len(self.epoch_losses)]))
        if len(self.epoch_losses) < len(self.epoch):
            return None
        first = self.steps_done - len(self.epoch) + 1
        losses = read_losses(self.epoch_losses, self.name,
                             [(first + i, task) for i, task in enumerate(self.epoch)])
        self.curve.append(sum(losses) / len(losses))
        self.epoch = []
        return self.curve[-1]

    def progress(self) -> dict[str, Any]:
        return {**super().progress(), "epoch": list(self.epoch),
                "epoch_losses": list(self.epoch_losses)}

    def load_progress(self, progress: Mapping[str, Any]) -> None:
        super().load_progress(progress)
        self.epoch = list(progress["epoch"])
        self.epoch_losses = list(progress["epoch_losses"])  # (tensors, on the CPU)
