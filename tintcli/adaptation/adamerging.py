"""AdaMerging (Yang et al., ICLR 2024, https://arxiv.org/abs/2310.02575) and AdaMerging++.

theta = theta_0 + sum_k lambda_k tau_k with one lambda per task (task-wise) or per task and
parameter tensor (layer-wise), learned on unlabeled test images by minimising the Shannon
entropy of each task's predictions (mean over its batch), summed over tasks. Heads frozen;
Adam, lr 1e-3, 500 steps, lambda from 0.3, clamped to [0, 1]. AdaMerging++ does the same with
TIES-trimmed, sign-consistent task vectors (``ties_top_k``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from tintcli.adaptation import (
    AdaptationContext,
    AdaptationRun,
    check_common,
)
from tintcli.adaptation.losses import entropy
from tintcli.checks import number, one_of, whole
from tintcli.io import EXTRA, StateDict, encoder_entries
from tintcli.merged import Merged
from tintcli.merging.ties import ties_task_vectors
from tintcli.methods import declared_values, register


class AdaMerging(AdaptationRun):
    """One AdaMerging run: the coefficients and their optimiser."""

    name = "adamerging"

    def __init__(self, pretrained: StateDict, experts: Mapping[str, StateDict],
                 context: AdaptationContext, granularity: str = "layer",
                 ties_top_k: float | None = None, lam_init: float = 0.3, lr: float = 1e-3,
                 batch_size: int = 32):
        pretrained, vectors = context.task_vectors(pretrained, experts)
        if ties_top_k is not None:
            vectors = ties_task_vectors(vectors, ties_top_k)
        super().__init__(context, pretrained, vectors, granularity, lam_init, batch_size)
        self.heads = {t: context.head(t) for t in self.tasks}  # frozen
        self.optimizer = context.runtime.adam(self.merger.parameters(), lr=lr,
                                               betas=(0.9, 0.999))
        # the encoder's merged entries (extras such as CLIP text leftovers are merged but
        # never run, so their lambdas get no gradient)
        self.encoder_keys = [k for k in self.merger.keys if not k.startswith(EXTRA)]

    def step(self, images: dict[str, torch.Tensor] | None = None) -> float:
        """One step over every task's batch. Each task's forward/backward runs on its own
        (so memory holds one task's activations at a time) into a detached copy of the merged
        weights; one backward then carries the summed gradient through the merge to lambda."""
        images = self.next_batches() if images is None else images
        merged = self.merge()
        keys = self.encoder_keys
        leaves = {k: merged[k].detach().requires_grad_() for k in keys}
        weights = {**encoder_entries(merged), **leaves}
        losses = []
        for task in self.tasks:
            with self.autocast():
                logits = self.heads[task](self.forward(weights, images[task]))
            loss = entropy(logits)
            self.scaler.scale(loss).backward()
            losses.append(loss.detach())
        total = self.step_loss(losses)
        self.optimizer.zero_grad()
        torch.autograd.backward([merged[k] for k in keys], [leaves[k].grad for k in keys])
        self.optimizer_step(self.optimizer)
        self.steps_done += 1
        return total

    def benchmark(self, plain: nn.Module) -> tuple[str, int, Callable, Callable]:
        """What ``tint bench`` times: this method's step on one batch of every task, and a
        plain forward+backward of ``plain`` (an ordinary module) with the same loss on the
        same batches."""
        images = self.next_batches()

        def plain_step() -> None:
            for task, x in images.items():
                entropy(self.heads[task](plain(x))).backward()

        return ("AdaMerging step (all tasks)", sum(len(x) for x in images.values()),
                lambda: self.step(images), plain_step)

    def advance(self) -> float:
        self.curve.append(self.step())
        return self.curve[-1]


def check_adamerging(params: Mapping[str, object], encoder=None, tasks=None) -> None:
    check_common(params)
    whole(params, "steps")
    one_of(params, "granularity", ("task", "layer"))
    if params.get("ties_top_k") is not None:
        number(params, "ties_top_k", 0, 100, must="null or a percentage in [0, 100]")


def _variant(params: Mapping[str, object]) -> str:
    """The reference row: layer-wise, task-wise, or ++ (TIES-trimmed vectors)."""
    layer = params.get("granularity", "layer") == "layer"
    if params.get("ties_top_k") is not None:
        return "adamerging_pp" if layer else "adamerging_task_pp"
    return "adamerging" if layer else "adamerging_task"


@register("adamerging", adaptive=True, check=check_adamerging, pretty="AdaMerging",
          paper="https://arxiv.org/abs/2310.02575", code="https://github.com/EnnengYang/AdaMerging",
          variant=_variant, trainer=AdaMerging)
def adamerging_merge(pretrained: StateDict, experts: Mapping[str, StateDict],
                     context: AdaptationContext, granularity: str = "layer",
                     ties_top_k: float | None = None, lam_init: float = 0.3, lr: float = 1e-3,
                     steps: int = 500, batch_size: int = 32) -> Merged:
    """``granularity``: one λ per task and parameter tensor (layer) or per task (task);
    ``ties_top_k``: AdaMerging++, TIES-trim (top-k %) and sign-elect the task vectors first;
    ``lam_init``: λ's start (clamped to [0, 1]); Adam (betas 0.9, 0.999) at ``lr`` for
    ``steps``; ``batch_size`` images per task per step (16 in the paper's text, 32 in its
    code)."""
    params = declared_values(adamerging_merge, locals())
    run = AdaMerging(pretrained, experts, context, granularity, ties_top_k, lam_init, lr,
                     batch_size)
    run.train(steps, params)
    adapted = run.adapted(context.heads, {}, {"unit": "step", "loss": run.curve})
    if _variant(params) == "adamerging":  # layer-wise, plain: what Surgery starts from
        context.learned[LAYER_WISE] = adapted.lambdas
    return adapted


# where a run's layer-wise AdaMerging leaves its λ in ``AdaptationContext.learned``
LAYER_WISE = "adamerging (layer-wise)"
