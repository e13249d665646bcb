"""Representation Surgery with AdaMerging (Yang et al., ICML 2024,
https://arxiv.org/abs/2402.02705): the layer-wise AdaMerging encoder, frozen, and per task an
adapter on its final feature z that removes the "representation bias" against that task's expert:

    z' = z - W_up · ReLU(W_down · z),   W_down: d -> rank (Kaiming-uniform, as nn.Linear),
                                         W_up: rank -> d (zero: z' = z at the start), no bias,

trained with L1(z', the expert encoder's feature of the same image) on the task's unlabeled
test images; Adam, lr 1e-3, batches of 16. Task t is scored with its zero-shot head on z'
(``SurgeryHead``): the outcome is a ``Merged`` with one shared encoder and a head per task, so
evaluation, saving and ``tint table`` need nothing new.

λ: learned first in the same run by AdaMerging (layer-wise, its own defaults), or taken from a
finished AdaMerging run's ``lambdas.safetensors`` (``lambdas=<path>``) so that a sweep does not
relearn them. Schedules (two presets): the authors' (``main_AdaMerging_with_surgery.py``: 500
iterations over the tasks in a fixed order, two steps per task each: ``steps_per_task=2``,
``shuffle=false``) and SyMerge's longer re-run (1,000 epochs of one step per task, tasks
shuffled each epoch). Either way the encoder is frozen, so its features on the adaptation
images are computed once, like the experts' (the authors recompute them every step: the same
numbers, at the cost of a forward per step).

Reference: https://github.com/EnnengYang/RepresentationSurgery (``src/merging_model.py``,
``main_AdaMerging_with_surgery.py``). ProbSurgery (``prob_surgery``, 1998v7/ProbSurgery,
ICML 2025) is the same run with a stochastic adapter (``ProbSurgeryAdapter``) and a KL term.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from safetensors import safe_open
from torch import nn
from torch.func import functional_call

from tintcli.adaptation.run import (
    AdaptationContext,
    EpochRun,
    check_common,
)
from tintcli.checks import number, whole
from tintcli.encoders import feature_dim, meta_encoder
from tintcli.errors import TintError
from tintcli.io import EXTRA, StateDict, encoder_entries, load_state_dict
from tintcli.memory import MemoryModel
from tintcli.merged import Merged
from tintcli.methods import Outcome, declared_values, register


class SurgeryAdapter(nn.Module):
    """z - up(ReLU(down(z))): the identity at the start (``up`` is zero)."""

    def __init__(self, dim: int, rank: int = 16, generator: torch.Generator | None = None):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        with torch.no_grad():  # nn.Linear's own initialisation, drawn from the run's generator
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
            self.up.weight.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z - self.up(F.relu(self.down(z)))

    def train_forward(self, z: torch.Tensor, generator: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """What a training step sees: the corrected features and a penalty (none)."""
        return self(z), 0.0


class ProbSurgeryAdapter(nn.Module):
    """ProbSurgery's stochastic correction (1998v7/ProbSurgery, ``src_ours/merging_model.py``):
    h = ReLU(W1·z) (d -> hidden, Kaiming-uniform), μ = Wμ·h, log σ² = Wσ·h (both zero at the
    start, no bias). Training sees z − (μ + ε·σ) and the KL of N(μ, σ²) to N(0, I) (mean over
    the batch of its sum over features); evaluation sees z − μ."""

    def __init__(self, dim: int, hidden: int = 128, generator: torch.Generator | None = None):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.mean = nn.Linear(hidden, dim, bias=False)
        self.log_var = nn.Linear(hidden, dim, bias=False)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.up.weight, a=math.sqrt(5), generator=generator)
            self.mean.weight.zero_()
            self.log_var.weight.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z - self.mean(F.relu(self.up(z)))

    def train_forward(self, z: torch.Tensor, generator: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.up(z))
        mu, log_var = self.mean(h), self.log_var(h)
        eps = torch.randn(mu.shape, generator=generator).to(mu.device, mu.dtype)
        kl = (-0.5 * (1 + log_var - mu ** 2 - log_var.exp()).sum(1)).mean()
        return z - (mu + eps * (0.5 * log_var).exp()), kl


class SurgeryHead(nn.Module):
    """A task's head on its surgically corrected features: how evaluation runs task t."""

    def __init__(self, adapter: nn.Module, head: nn.Module):
        super().__init__()
        self.adapter, self.head = adapter, head

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.adapter(z))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> SurgeryHead:
        from tintcli.heads import ZeroShotHead

        if "adapter.mean.weight" in state:  # ProbSurgery's
            hidden, dim = state["adapter.up.weight"].shape
            adapter: nn.Module = ProbSurgeryAdapter(dim, hidden)
        else:
            rank, dim = state["adapter.down.weight"].shape
            adapter = SurgeryAdapter(dim, rank)
        head = cls(adapter, ZeroShotHead.from_state_dict(
            {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}))
        head.adapter.load_state_dict({k[len("adapter."):]: v for k, v in state.items()
                                      if k.startswith("adapter.")})
        return head.requires_grad_(False)


def check_surgery(params: Mapping[str, object], encoder: nn.Module | None, tasks=None) -> None:
    check_common(params)
    for key in ("rank", "hidden", "epochs", "steps_per_task"):
        whole(params, key)
    number(params, "kl_weight", 0, None, must="a finite number >= 0")
    for key in ("shuffle", "momentum_all_tasks"):
        if params.get(key) not in (None, True, False):
            raise ValueError(f"{key}={params[key]} must be true or false")
    if params.get("lambdas") is not None:  # readable, with its layer and task names
        _, layers, _ = saved_lambdas(str(params["lambdas"]))
        if encoder is not None:
            names = set(encoder.state_dict())
            other = [n for n in layers if n not in names and not n.startswith(EXTRA)]
            if other or "all" in layers:
                raise ValueError(f"lambdas={params['lambdas']} are not a layer-wise "
                                 "AdaMerging's λ for this encoder (it has no layer "
                                 f"'{(other or ['all'])[0]}')")


def saved_lambdas(path: str) -> tuple[torch.Tensor, list[str], list[str]]:
    """λ [layers, tasks] from a finished AdaMerging run's ``lambdas.safetensors``, with the
    layer and task names it was learned for."""
    if not Path(path).is_file():
        raise ValueError(f"lambdas={path} is no file\nPass the lambdas.safetensors of a "
                         "finished layer-wise AdaMerging run (adapted/<method>/ in its run "
                         "directory), or leave lambdas unset to learn them in this run.")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        layers, tasks = json.loads(meta["layers"]), json.loads(meta["tasks"])
        values = load_state_dict(Path(path), f"lambdas={path}")["lambdas"]
    except (KeyError, ValueError, OSError, TintError) as err:
        raise ValueError(f"lambdas={path} is not a lambdas.safetensors tint wrote ({err})"
                         ) from err
    if tuple(values.shape) != (len(layers), len(tasks)):
        raise ValueError(f"lambdas={path} holds λ of shape {tuple(values.shape)} for "
                         f"{len(layers)} layers and {len(tasks)} tasks")
    return values, layers, tasks


class Surgery(EpochRun):
    """One Surgery run: λ fixed, one adapter per task and their optimiser."""

    name = "surgery"

    def __init__(self, pretrained: StateDict, experts: Mapping[str, StateDict],
                 context: AdaptationContext, lambda_values: torch.Tensor | None = None,
                 rank: int = 16, lr: float = 1e-3, batch_size: int = 16,
                 steps_per_task: int = 2, shuffle: bool = False, hidden: int | None = None,
                 kl_weight: float = 0.0, momentum_all_tasks: bool = True):
        pretrained, vectors = context.task_vectors(pretrained, experts)
        super().__init__(context, pretrained, vectors, "layer", 0.3, batch_size)
        self.name = "surgery" if hidden is None else "prob_surgery"  # (its checkpoints' key)
        lambdas = lambda_values  # (None: task arithmetic at 0.3, for tint bench alone)
        if lambdas is not None:
            if tuple(lambdas.shape) != tuple(self.merger.raw.shape):
                raise TintError(f"Surgery: the given λ are {tuple(lambdas.shape)} [layers, "
                                f"tasks]; this encoder and task set need "
                                f"{tuple(self.merger.raw.shape)}")
            with torch.no_grad():
                self.merger.raw.copy_(lambdas)
        self.merger.requires_grad_(False)
        self.steps_per_task, self.shuffle = steps_per_task, shuffle
        with torch.no_grad():
            self.merged_state = encoder_entries(self.merger())
            self.features = self._features()  # the frozen encoder's, once per run
        self.targets = context.expert_features(experts)
        dim = next(iter(self.features.values())).shape[1]
        # Surgery's adapters, or ProbSurgery's (``hidden`` set) with their KL term's weight
        self.kl_weight = kl_weight
        self.adapters = nn.ModuleDict({t: SurgeryAdapter(dim, rank, self.generator)
                                       if hidden is None else
                                       ProbSurgeryAdapter(dim, hidden, self.generator)
                                       for t in self.tasks}).to(context.device)
        self.optimizer = context.runtime.adam(self.adapters.parameters(), lr=lr,
                                               betas=(0.9, 0.999))
        # The authors' code (torch 1.x) zeroes gradients rather than dropping them, so their
        # one Adam moves every task's adapter at every step on its momentum, not only the
        # stepping task's; False: only the stepping task's (torch 2's zero_grad, FusionBench)
        self.momentum_all_tasks = momentum_all_tasks

    def _features(self) -> dict[str, torch.Tensor]:
        out = {}
        for task in self.tasks:
            parts = []
            for inputs in self.context.runtime.batches(self.context.images[task]):
                with self.autocast():
                    parts.append(functional_call(self.encoder, self.merged_state,
                                                 (inputs,)).float())
            out[task] = torch.cat(parts)
        return out

    def epoch_order(self) -> list[str]:
        tasks = self.tasks
        if self.shuffle:
            tasks = [tasks[i] for i in torch.randperm(len(tasks), generator=self.generator)]
        return [t for t in tasks for _ in range(self.steps_per_task)]

    def next_batch(self, task: str, index: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        index = (self.next_index(task) if index is None else index).to(
            self.features[task].device)
        return self.features[task][index], self.targets[task][index]

    def step(self, task: str, batch: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> torch.Tensor:
        """One step on one task's batch: its adapter on the frozen features, L1 to the
        expert's features. The loss stays on the device (the epoch reads and checks it)."""
        features, targets = self.next_batch(task) if batch is None else batch
        with self.autocast():
            corrected, penalty = self.adapters[task].train_forward(features, self.generator)
        loss = F.l1_loss(corrected.float(), targets) + self.kl_weight * penalty
        self.steps_done += 1
        self.optimizer.zero_grad(set_to_none=not self.momentum_all_tasks)
        self.scaler.scale(loss).backward()
        self.optimizer_step(self.optimizer)
        return loss.detach()

    def trained(self) -> dict[str, nn.Module]:
        return {"adapters": self.adapters}

    def benchmark(self, plain: nn.Module) -> tuple[str, int, Callable, Callable]:
        """What ``tint bench`` times: one adapter step (the encoder is frozen and its
        features cached), against a plain forward+backward of the encoder on the images."""
        task = self.tasks[0]
        index = self.next_index(task)  # one batch of images, for both steps
        batch, images = self.next_batch(task, index), self.images(task, index)

        def plain_step() -> None:
            F.l1_loss(plain(images).float(), batch[1]).backward()

        return (f"Surgery step (one task: {task})", len(index),
                lambda: self.step(task, batch), plain_step)

    def result(self) -> Merged:
        heads = {t: copy.deepcopy(SurgeryHead(self.adapters[t], self.context.head(t))).cpu()
                 .requires_grad_(False) for t in self.tasks}
        return self.adapted(heads, {}, {"unit": "epoch (mean over tasks)", "loss": self.curve},
                            ADAPTERS.tinted)


def _adamerging_lambdas(pretrained: StateDict, experts: Mapping[str, StateDict],
                        context: AdaptationContext, lambdas: str | None) -> torch.Tensor:
    """λ [layers, tasks]: read from ``lambdas`` (a finished run's file), else those of this
    run's layer-wise AdaMerging row where it has one, else learned here by layer-wise
    AdaMerging with its defaults, checkpointed in a folder of its own."""
    if lambdas is None:
        from tintcli.adaptation.adamerging import LAYER_WISE, adamerging_merge

        if LAYER_WISE in context.learned:  # this run's AdaMerging row learned them already
            context.note("λ from this run's layer-wise AdaMerging row (the same seed and "
                         "images), not learned again")
            return context.learned[LAYER_WISE]
        inner = dataclasses.replace(context, checkpoint_dir=None if context.checkpoint_dir is None
                                    else context.checkpoint_dir / "adamerging")
        return adamerging_merge(pretrained, experts, inner).lambdas
    values, _, tasks = saved_lambdas(lambdas)
    if tasks != context.tasks:
        raise TintError(f"lambdas={lambdas} were learned for the tasks {tasks}; this run has "
                        f"{context.tasks}")
    return values


# each task's adapter is saved with the zero-shot head it feeds, and rebuilt as one head
ADAPTERS = Outcome("adapter", head=SurgeryHead.from_state_dict)

IMAGES_PER_TASK = 10_000  # the memory model's test images per task (SUN397's test set: 19,850)


def surgery_memory(encoder_cfg: DictConfig, tasks: int, params: Mapping[str, object],
                   vectors_dtype: str = "fp32") -> MemoryModel:
    """Surgery's (and ProbSurgery's) device memory after its λ are learned: the λ merge it
    computes the frozen features with (θ0, the task vectors, one merged copy), the frozen
    encoder's and the experts' features on ``IMAGES_PER_TASK`` adaptation images a task
    (fp32), and the adapters with their gradient and Adam's moments (Surgery's two
    d x rank matrices, ProbSurgery's three d x hidden)."""
    encoder = meta_encoder(encoder_cfg)
    count = sum(p.numel() for p in encoder.parameters())
    dim = feature_dim(encoder_cfg)
    vector_bytes = 2 if vectors_dtype == "bf16" else 4
    adapter = (3 * dim * int(params["hidden"]) if "hidden" in params
               else 2 * dim * int(params.get("rank") or 16))
    terms = {
        "theta_0 + merged theta (fp32)": 2 * count * 4,
        f"task vectors ({tasks} x {vectors_dtype})": tasks * count * vector_bytes,
        f"features, merged + experts' ({IMAGES_PER_TASK} images/task)":
            2 * tasks * IMAGES_PER_TASK * dim * 4,
        "adapters + gradient + Adam": 4 * tasks * adapter * 4,
    }
    batch = int(params.get("batch_size") or 16)
    return MemoryModel(str(encoder_cfg.name), tasks, batch, vectors_dtype, terms)


@register("surgery", adaptive=True, check=check_surgery, pretty="Surgery w/ AdaMerging",
          paper="https://arxiv.org/abs/2402.02705",
          code="https://github.com/EnnengYang/RepresentationSurgery", trainer=Surgery,
          memory=surgery_memory, outcome=ADAPTERS)
def surgery_merge(pretrained: StateDict, experts: Mapping[str, StateDict],
                  context: AdaptationContext, lambdas: str | None = None, rank: int = 16,
                  lr: float = 1e-3, epochs: int = 500, steps_per_task: int = 2,
                  shuffle: bool = False, batch_size: int = 16,
                  momentum_all_tasks: bool = True) -> Merged:
    """``lambdas``: a finished AdaMerging run's ``lambdas.safetensors`` (unset: learned here
    first by layer-wise AdaMerging with its defaults); ``rank`` of each adapter; Adam at
    ``lr``; ``epochs`` over the tasks, ``steps_per_task`` steps on each, in a fixed order or
    ``shuffle``d each epoch; ``batch_size`` images a step; ``momentum_all_tasks``: Adam moves
    every task's adapter at every step, as the authors' code did under torch 1.x (false: only
    the stepping task's, as torch 2 and FusionBench)."""
    params = declared_values(surgery_merge, locals())
    values = _adamerging_lambdas(pretrained, experts, context, lambdas)
    run = Surgery(pretrained, experts, context, values, rank, lr, batch_size, steps_per_task,
                  shuffle, momentum_all_tasks=momentum_all_tasks)
    run.train(epochs * len(run.tasks) * steps_per_task, params)
    return run.result()


@register("prob_surgery", adaptive=True, check=check_surgery, pretty="ProbSurgery w/ AdaMerging",
          code="https://github.com/1998v7/ProbSurgery", trainer=Surgery,  # ICML 2025
          memory=surgery_memory, outcome=ADAPTERS)
def prob_surgery_merge(pretrained: StateDict, experts: Mapping[str, StateDict],
                       context: AdaptationContext, lambdas: str | None = None,
                       hidden: int = 128, kl_weight: float = 1e-4, lr: float = 1e-3,
                       epochs: int = 500, batch_size: int = 16,
                       momentum_all_tasks: bool = True) -> Merged:
    """ProbSurgery on layer-wise AdaMerging's λ (``lambdas`` as for ``surgery``): per task a
    stochastic adapter of ``hidden`` units trained on L1 + ``kl_weight``·KL; the authors'
    schedule, 5 × 100 rounds of one step per task in order (``epochs`` rounds);
    ``momentum_all_tasks`` as for ``surgery`` (the authors pin torch 1.13)."""
    params = declared_values(prob_surgery_merge, locals())
    values = _adamerging_lambdas(pretrained, experts, context, lambdas)
    run = Surgery(pretrained, experts, context, values, lr=lr, batch_size=batch_size,
                  steps_per_task=1, shuffle=False, hidden=hidden, kl_weight=kl_weight,
                  momentum_all_tasks=momentum_all_tasks)
    run.train(epochs * len(run.tasks), params)
    return run.result()
