"""Model Tinting (arXiv 2412.19098, later "SyMerge"), as PAPER.md defines it.

Layer-wise AdaMerging coefficients plus one trainable task-specific layer per task: by
default that task's classification head, initialised from its zero-shot head (weight and
bias trained). Trained jointly with Adam (lr 1e-2) for 500 epochs; each epoch visits the
tasks in a shuffled order and takes one step per task on a batch of 32 of its unlabeled test
images, with cross-entropy to the pseudo-labels of that task's expert. The ``sampler`` picks
which samples count: ``all`` (Model Tinting) or ``confidence`` (Model Tinting++).

``tint`` can instead name a module of the encoder (e.g. ``blocks.3.mlp.fc2``): each task
then gets its own copy of that module's weights, starting from the merged ones (a trainable
per-task offset that starts at zero), and the heads stay frozen.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call

from tintcli.adaptation import (
    SAMPLERS,
    AdaptationContext,
    Adapted,
    LambdaMerger,
    batches,
    check_finite,
    pseudo_label_loss,
    task_vectors,
)
from tintcli.errors import TintError
from tintcli.io import StateDict
from tintcli.merging import register


def tinted_keys(encoder: nn.Module, module: str) -> list[str]:
    """The state-dict entries of the encoder module named ``module``."""
    names = dict(encoder.named_modules())
    if module not in names or module == "":
        hint = ", ".join(n for n, m in encoder.named_modules() if n and not list(m.children()))
        raise TintError(f"cannot tint '{module}': the encoder has no such module\n"
                        f"Use tint=head, or one of: {hint}")
    return [f"{module}.{k}" for k in names[module].state_dict()]


class Tinting:
    """One Model Tinting run: lambda, the tinted layers, their optimiser and batch streams."""

    name = "tinting"

    def __init__(self, pretrained: StateDict, experts: Mapping[str, StateDict],
                 context: AdaptationContext, tint: str = "head", sampler: str = "all",
                 lam_init: float = 0.3, lr: float = 1e-2, batch_size: int = 32):
        if sampler not in SAMPLERS:
            raise TintError(f"unknown sampler '{sampler}'; tint has: {', '.join(SAMPLERS)}")
        self.context = context
        self.tasks = context.tasks
        self.sampler = SAMPLERS[sampler]
        self.encoder = context.encoder.to(context.device).eval()
        pretrained = context.in_encoder_order(pretrained)
        vectors = task_vectors(pretrained, experts, self.tasks)
        self.merger = LambdaMerger(pretrained, vectors, "layer", lam_init, context.device)
        self.tint = tint
        if tint == "head":
            self.heads = nn.ModuleDict({t: copy.deepcopy(context.heads[t]).requires_grad_(True)
                                        for t in self.tasks}).to(context.device)
            self.offsets = nn.ModuleDict()
        else:
            keys = tinted_keys(self.encoder, tint)
            self.heads = nn.ModuleDict({t: context.head(t) for t in self.tasks})
            self.offsets = nn.ModuleDict({t: nn.ParameterDict(
                {k.replace(".", "/"): nn.Parameter(torch.zeros_like(self.merger.base[k]))
                 for k in keys}) for t in self.tasks})
        trainable = [*self.merger.parameters(), *self.heads.parameters(),
                     *self.offsets.parameters()]
        self.optimizer = torch.optim.Adam([p for p in trainable if p.requires_grad], lr=lr)
        self.generator = context.generator()
        self.streams = {t: batches(len(context.images[t]), batch_size, self.generator)
                        for t in self.tasks}
        self.targets = context.expert_logits(experts)  # computed once per run, then reused
        self.steps_done = 0

    def _weights(self, merged: StateDict, task: str) -> StateDict:
        if not self.offsets:
            return merged
        offsets = {k.replace("/", "."): v for k, v in self.offsets[task].items()}
        return {**merged, **{k: merged[k] + offset for k, offset in offsets.items()}}

    def epoch_order(self) -> list[str]:
        order = torch.randperm(len(self.tasks), generator=self.generator)
        return [self.tasks[i] for i in order]

    def next_batch(self, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        index = next(self.streams[task])
        return (self.context.images[task][index].to(self.context.device),
                self.targets[task][index.to(self.targets[task].device)])

    def step(self, task: str, batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
        """One step on one task's batch: merge on the device, forward, one backward."""
        images, expert_logits = self.next_batch(task) if batch is None else batch
        weights = self._weights(self.merger(), task)
        logits = self.heads[task](functional_call(self.encoder, weights, (images,)))
        loss, _ = pseudo_label_loss(logits, expert_logits, self.sampler)
        check_finite(loss, self.name, self.steps_done + 1, task)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.steps_done += 1
        return loss.item()

    def result(self, loss_curve: list[float]) -> Adapted:
        with torch.no_grad():
            merged = self.merger()
            state = {k: v.detach().cpu() for k, v in merged.items()}
            tints = {}
            if self.offsets:
                tints = {t: {k: v.detach().cpu() for k, v in self._weights(merged, t).items()
                             if k.replace(".", "/") in self.offsets[t]} for t in self.tasks}
        heads = {t: copy.deepcopy(self.heads[t]).cpu().requires_grad_(False)
                 for t in self.tasks}
        return Adapted(self.name, state, heads, tints, self.merger.lambdas().detach().cpu(),
                       self.merger.layer_names, self.tasks,
                       {"unit": "epoch (mean over tasks)", "loss": loss_curve}, self.tint)


@register("tinting", adaptive=True)
def tinting_merge(pretrained: StateDict, experts: Mapping[str, StateDict],
                  context: AdaptationContext, tint: str = "head", sampler: str = "all",
                  lam_init: float = 0.3, lr: float = 1e-2, epochs: int = 500,
                  batch_size: int = 32) -> Adapted:
    run = Tinting(pretrained, experts, context, tint, sampler, lam_init, lr, batch_size)
    total = epochs * len(run.tasks)
    curve = []
    for _ in range(epochs):
        losses = [run.step(task) for task in run.epoch_order()]
        curve.append(sum(losses) / len(losses))
        context.report(run.steps_done, total, curve[-1])
    return run.result(curve)
