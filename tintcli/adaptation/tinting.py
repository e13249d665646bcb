"""Model Tinting (https://arxiv.org/abs/2412.19098, later "SyMerge"; code AIM-SKKU/SyMerge).

Layer-wise AdaMerging coefficients plus one trainable task-specific layer per task: by
default that task's classification head, initialised from its zero-shot head (weight and
bias trained). Trained jointly with Adam (lr 1e-2) for 500 epochs; each epoch visits the
tasks in a shuffled order and takes one step per task on a batch of 32 of its unlabeled test
images, with cross-entropy to the pseudo-labels of that task's expert. The ``sampler`` picks
which samples count: ``all`` (Model Tinting) or ``confidence`` (Model Tinting++). ``loss``
takes SyMerge's names (``losses.py``): ``crosspseudo`` (the default: with ``sampler``),
``crosspseudoconf`` (the confidence sampler whatever ``sampler`` says), ``selfentropy``,
``l1feature``, and ``crossgt`` (true labels: only with ``oracle=true``). ``symerge`` is the
final paper's name for Model Tinting++: this trainer with ``loss=crosspseudoconf``.

``tint`` can instead name a module of the encoder (e.g. ``blocks.3.mlp.fc2``): each task
then gets its own copy of that module's weights, starting from the merged ones (a trainable
per-task offset that starts at zero), and the heads stay frozen.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tintcli.adaptation import (
    SAMPLERS,
    AdaptationContext,
    EpochRun,
    check_common,
)
from tintcli.adaptation.losses import LOSSES, ORACLES, TARGETS
from tintcli.checks import one_of, whole
from tintcli.io import StateDict, encoder_entries
from tintcli.merged import Merged
from tintcli.methods import ORACLE, declared_values, register


def tintable_modules(encoder: nn.Module) -> list[str]:
    """The encoder's leaf modules that hold weights: what ``tint=`` may name."""
    return [n for n, m in encoder.named_modules()
            if n and not list(m.children()) and list(m.state_dict())]


def tinted_keys(encoder: nn.Module, module: str) -> list[str]:
    """The state-dict entries of the encoder module named ``module``; a name that is no
    module with weights is a ValueError listing the ones there are."""
    names = dict(encoder.named_modules())
    entries = list(names[module].state_dict()) if module in names and module else []
    if not entries:
        raise ValueError(f"tint={module} names no module of the encoder with weights\n"
                         f"Use tint=head, or one of: {', '.join(tintable_modules(encoder))}")
    return [f"{module}.{k}" for k in entries]


def check_tinting(params: Mapping[str, object], encoder: nn.Module | None, tasks=None) -> None:
    """The common checks, the schedule and sampler, then the tinted module against the
    encoder, so that a typo in ``tint`` fails before the zoo or any data loads."""
    check_common(params)
    whole(params, "epochs")
    one_of(params, "sampler", list(SAMPLERS))
    one_of(params, "loss", list(LOSSES))
    loss = params.get("loss", "crosspseudo")
    if loss in ORACLES and params.get("oracle") is not True:
        raise ValueError(f"loss={loss} learns from the test images' true labels: an oracle, "
                         "never a result\nPass oracle=true to run it (every table labels "
                         "its row as an oracle).")
    if params.get("oracle") not in (None, True, False):
        raise ValueError(f"oracle={params['oracle']} must be true or false")
    if params.get("sampler", "all") != "all" and TARGETS.get(loss) != "logits":
        raise ValueError(f"sampler={params['sampler']} picks pseudo-labelled samples: it "
                         f"applies to loss=crosspseudo, not loss={loss}")
    if "tint" in params and not (isinstance(params["tint"], str) and params["tint"]):
        raise ValueError(f"tint={params['tint']} must be 'head' or the name of an encoder "
                         "module")
    if encoder is not None and params.get("tint", "head") != "head":
        tinted_keys(encoder, str(params["tint"]))


class Tinting(EpochRun):
    """One Model Tinting run: layer-wise lambda, the tinted layers and their optimiser."""

    name = "tinting"

    def __init__(self, pretrained: StateDict, experts: Mapping[str, StateDict],
                 context: AdaptationContext, tint: str = "head", sampler: str = "all",
                 lam_init: float = 0.3, lr: float = 1e-2, batch_size: int = 32,
                 loss: str = "crosspseudo"):
        if loss == "crosspseudo" and sampler == "confidence":
            loss = "crosspseudoconf"  # Model Tinting++ as its YAML (sampler=confidence) says
        self.loss_fn = LOSSES[loss]
        self.tint = tint
        keys = [] if tint == "head" else tinted_keys(context.encoder, tint)
        pretrained, vectors = context.task_vectors(pretrained, experts)
        super().__init__(context, pretrained, vectors, "layer", lam_init, batch_size)
        if tint == "head":
            self.heads = nn.ModuleDict({t: copy.deepcopy(context.heads[t]).requires_grad_(True)
                                        for t in self.tasks}).to(context.device)
        else:
            self.heads = nn.ModuleDict({t: context.head(t) for t in self.tasks})
        # per task, a trainable offset on each tinted entry (ParameterDict keys cannot hold '.')
        self.offsets = nn.ModuleDict({t: nn.ParameterDict(
            {k.replace(".", "/"): nn.Parameter(torch.zeros_like(pretrained[k], dtype=torch.float,
                                                                device=context.device))
             for k in keys}) for t in self.tasks})
        trainable = [*self.merger.parameters(), *self.heads.parameters(),
                     *self.offsets.parameters()]
        self.optimizer = context.runtime.adam([p for p in trainable if p.requires_grad],
                                               lr=lr)
        # what the loss learns from, computed once per run, then reused (none: selfentropy)
        what = TARGETS[loss]
        self.targets = (context.expert_logits(experts) if what == "logits" else
                        context.expert_features(experts) if what == "features" else
                        _labels(context) if what == "labels" else None)

    def _tinted(self, merged: StateDict, task: str) -> StateDict:
        """The task's own entries: merged weights plus its offsets (none when tinting heads)."""
        return {k.replace("/", "."): merged[k.replace("/", ".")] + offset
                for k, offset in self.offsets[task].items()}

    def epoch_order(self) -> list[str]:
        order = torch.randperm(len(self.tasks), generator=self.generator)
        return [self.tasks[i] for i in order]

    def trained(self) -> dict[str, nn.Module]:
        tinted = {"heads": self.heads} if self.tint == "head" else {"offsets": self.offsets}
        return {**super().trained(), **tinted}

    def next_batch(self, task: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        index = self.next_index(task)
        if self.targets is None:
            return self.images(task, index), None
        return self.images(task, index), self.targets[task][index.to(self.targets[task].device)]

    def step(self, task: str, batch: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> torch.Tensor:
        """One step on one task's batch: merge on the device, forward, one backward. The
        loss stays on the device (the epoch reads its losses back at once, and checks them):
        nothing in the step waits for the device (Tinting++ on the CPU aside, see
        ``optimizer_step``)."""
        images, targets = self.next_batch(task) if batch is None else batch
        merged = self.merge()
        weights = {**encoder_entries(merged), **self._tinted(merged, task)}
        with self.autocast():
            features = self.forward(weights, images)
            logits = self.heads[task](features)
        loss, kept = self.loss_fn(logits, features, targets)
        self.steps_done += 1
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        # nothing kept (Tinting++'s sampler), nothing to learn from: Adam's momentum alone
        # must not move anything (kept is a count on the device: skipped there where it can)
        self.optimizer_step(self.optimizer, None if isinstance(kept, int) else kept == 0)
        return loss.detach()

    def benchmark(self, plain: nn.Module) -> tuple[str, int, Callable, Callable]:
        """What ``tint bench`` times: one step on one task's batch, and a plain
        forward+backward of ``plain`` with the same loss on the same batch."""
        task = self.tasks[0]
        batch = self.next_batch(task)
        head = self.heads[task]

        def plain_step() -> None:
            features = plain(batch[0])
            self.loss_fn(head(features), features, batch[1])[0].backward()

        return (f"Model Tinting step (one task: {task})", len(batch[0]),
                lambda: self.step(task, batch), plain_step)

    def result(self, loss_curve: list[float]) -> Merged:
        tints = {}
        if self.tint != "head":
            with torch.no_grad():
                merged = self.merger()
                tints = {t: {k: v.detach().cpu() for k, v in self._tinted(merged, t).items()}
                         for t in self.tasks}
        heads = {t: copy.deepcopy(self.heads[t]).cpu().requires_grad_(False)
                 for t in self.tasks}
        return self.adapted(heads, tints, {"unit": "epoch (mean over tasks)", "loss": loss_curve},
                            self.tint)


def _labels(context: AdaptationContext) -> dict[str, torch.Tensor]:
    if context.labels is None:
        raise ValueError("loss=crossgt needs the adaptation images' true labels, and this "
                         "context has none")
    return {t: context.labels[t].to(context.device) for t in context.tasks}


def _row(params: Mapping[str, Any]) -> str:
    """The reference row: the paper's Model Tinting / SyMerge row, except an oracle's."""
    return ORACLE if params.get("loss") in ORACLES else "tinting"


@register("tinting", adaptive=True, check=check_tinting, pretty="Model Tinting",
          paper="https://arxiv.org/abs/2412.19098", code="https://github.com/AIM-SKKU/SyMerge",
          trainer=Tinting, variant=_row)
def tinting_merge(pretrained: StateDict, experts: Mapping[str, StateDict],
                  context: AdaptationContext, tint: str = "head", sampler: str = "all",
                  lam_init: float = 0.3, lr: float = 1e-2, epochs: int = 500,
                  batch_size: int = 32, loss: str = "crosspseudo",
                  oracle: bool = False) -> Merged:
    """``tint``: the tinted layer, each task's head or an encoder module (blocks.3.mlp.fc2);
    ``sampler``: which pseudo-labelled samples count (all; confidence: Tinting++);
    ``lam_init``: λ's start; Adam at ``lr`` for λ and the tinted layers; ``epochs`` of one
    step per task, tasks in shuffled order; ``batch_size`` images per step; ``loss``:
    SyMerge's names (losses.py); ``oracle``: allows ``loss=crossgt`` (true labels)."""
    params = declared_values(tinting_merge, locals())
    run = Tinting(pretrained, experts, context, tint, sampler, lam_init, lr, batch_size, loss)
    run.train(epochs * len(run.tasks), params)
    return run.result(run.curve)


@register("symerge", adaptive=True, check=check_tinting, pretty="SyMerge",
          paper="https://arxiv.org/abs/2412.19098", code="https://github.com/AIM-SKKU/SyMerge",
          trainer=Tinting, variant=_row)
def symerge_merge(pretrained: StateDict, experts: Mapping[str, StateDict],
                  context: AdaptationContext, tint: str = "head", sampler: str = "all",
                  lam_init: float = 0.3, lr: float = 1e-2, epochs: int = 500,
                  batch_size: int = 32, loss: str = "crosspseudoconf",
                  oracle: bool = False) -> Merged:
    """SyMerge, the final paper's name for Model Tinting++: the same trainer, the same
    numbers, with its default loss ``crosspseudoconf``."""
    return tinting_merge(pretrained, experts, context, tint, sampler, lam_init, lr, epochs,
                         batch_size, loss, oracle)
