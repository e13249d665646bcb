"""LOT Merging (Sun et al., NeurIPS 2025, https://arxiv.org/abs/2505.23859): no training,
a closed form per layer that minimises the feature drift between each expert and the merged
model on a few unlabeled exemplars per task,

    min_T Σt ‖Xt (θ0 + T) − Xt (θ0 + τt)‖²   (Xt: the layer's inputs in expert t on task t's
                                              exemplars, every token a row)

- linear weights: T* = (Σt XtᵀXt)⁺ Σt XtᵀXt τt (the pseudo-inverse: directions no exemplar
  reaches get no task vector);
- LayerNorm scales: per feature j, Σt ‖x̂t,j‖² τt,j / Σt ‖x̂t,j‖² (x̂: the normalised input
  the scale multiplies), a feature-weighted average;
- biases and LayerNorm shifts (their input is the constant 1): the mean of τt;
- embeddings (patch embedding, class token, position embedding) and anything else: the mean.

The closed form is defined by each layer's inputs (Xt's columns are the layer's input
features, whatever the checkpoint format's storage of its weight), so, unlike ISO-CTS, LOT has
no orientation to follow: CLIP's image projection is the linear layer ``head`` here, its
inputs the 768 pooled features, as open_clip's ``x @ visual.proj``.

Only the sums Σt XtᵀXt and Σt XtᵀXt τt are kept (float64, one [in, in] and one [in, out] per
linear layer), accumulated batch by batch as the exemplars pass (no layer input is kept);
one forward of each expert over its exemplars.

The paper's method section and the authors' code (SunWenJu123/model-merging) were not
available here; the forms above follow the paper's abstract and objective, and are checked
against an independent transcription (``tests/lot_oracle.py``). The number of exemplars per
task is a parameter (``exemplars``, 64 by default: the paper's reviewers describe 16 to 64).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from tintcli.adaptation.run import AdaptationContext
from tintcli.checks import whole
from tintcli.io import StateDict, encoder_entries
from tintcli.merged import Merged
from tintcli.methods import register


class _Moments:
    """Per layer, the running sums over tasks that the closed forms need."""

    def __init__(self) -> None:
        self.gram: dict[str, torch.Tensor] = {}    # Linear: Σt XtᵀXt
        self.moment: dict[str, torch.Tensor] = {}  # Linear: Σt XtᵀXt τtᵀ
        self.energy: dict[str, torch.Tensor] = {}  # LayerNorm: Σt ‖x̂t‖² per feature
        self.scaled: dict[str, torch.Tensor] = {}  # LayerNorm: Σt ‖x̂t‖² τt per feature

    @staticmethod
    def add(store: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        store[name] = store[name] + value if name in store else value


def _layers(encoder: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in encoder.named_modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.LayerNorm)
                                            and m.elementwise_affine)}


def exemplar_index(count: int, exemplars: int, generator: torch.Generator) -> torch.Tensor:
    """``exemplars`` rows drawn without replacement (all of them where there are fewer)."""
    return torch.randperm(count, generator=generator)[:exemplars]


@torch.no_grad()
def lot_merge_state(pretrained: StateDict, experts: Mapping[str, StateDict],
                    context: AdaptationContext, exemplars: int) -> StateDict:
    """θ0 + T*, the merged state dict (float entries in the pretrained's dtypes)."""
    tasks = context.tasks
    generator = context.generator()
    encoder = copy.deepcopy(context.encoder).to(context.device).eval()
    layers = _layers(encoder)
    sums = _Moments()
    device = context.device
    seen: dict[str, torch.Tensor] = {}  # one task's XᵀX (Linear) or Σ x̂² (LayerNorm)

    def record(name: str, module: nn.Module):
        def keep(_module, args, _output) -> None:  # summed as the batches pass: no X is kept
            x = args[0].to(torch.float64)
            if isinstance(module, nn.LayerNorm):  # what the scale multiplies
                x = nn.functional.layer_norm(x, module.normalized_shape, eps=module.eps)
            x = x.reshape(-1, x.shape[-1])
            _Moments.add(seen, name, x.T @ x if isinstance(module, nn.Linear)
                         else (x ** 2).sum(0))
        return keep

    for task in tasks:
        expert = experts[task]
        encoder.load_state_dict(encoder_entries(expert))
        hooks = [m.register_forward_hook(record(n, m)) for n, m in layers.items()]
        try:
            index = exemplar_index(len(context.images[task]), exemplars, generator)
            for start in range(0, len(index), context.runtime.batch_size):
                encoder(context.inputs(task, index[start: start + context.runtime.batch_size]))
        finally:
            for hook in hooks:
                hook.remove()
        for name, module in layers.items():
            key = f"{name}.weight"
            tau = expert[key].to(device, torch.float64) - pretrained[key].to(device, torch.float64)
            if isinstance(module, nn.Linear):
                _Moments.add(sums.gram, name, seen[name])
                _Moments.add(sums.moment, name, seen[name] @ tau.T)
            else:
                _Moments.add(sums.energy, name, seen[name])
                _Moments.add(sums.scaled, name, seen[name] * tau)
        seen.clear()
    merged = dict(pretrained)
    closed = {}
    for name, module in layers.items():
        if isinstance(module, nn.Linear):
            closed[f"{name}.weight"] = (torch.linalg.pinv(sums.gram.pop(name))
                                        @ sums.moment.pop(name)).T
        else:
            energy = sums.energy.pop(name)
            closed[f"{name}.weight"] = sums.scaled.pop(name) / energy.clamp_min(1e-300)
    for key, base in pretrained.items():
        if not base.is_floating_point():
            continue
        if key in closed:
            delta = closed[key].cpu()
        else:  # biases, norms' shifts, embeddings, the rest: the mean of the task vectors
            delta = sum(experts[t][key].double() - base.double() for t in tasks) / len(tasks)
        merged[key] = (base.double() + delta).to(base.dtype)
    return merged


class LOT:
    """What ``tint bench`` times of LOT (it has no steps): the whole closed form, against a
    plain forward of the encoder over the same exemplars."""

    def __init__(self, pretrained: StateDict, experts: Mapping[str, StateDict],
                 context: AdaptationContext, exemplars: int = 64):
        self.pretrained, self.experts, self.context = pretrained, experts, context
        self.exemplars = exemplars

    def benchmark(self, plain: nn.Module):
        context = self.context
        generator = context.generator()
        batches = [context.inputs(t, exemplar_index(len(context.images[t]), self.exemplars,
                                                     generator)) for t in context.tasks]

        def forward() -> None:
            with torch.no_grad():
                for x in batches:
                    plain(x)

        return (f"LOT closed form (all tasks, {self.exemplars} exemplars each; plain: forward "
                "only)", sum(len(x) for x in batches),
                lambda: lot_merge_state(self.pretrained, self.experts, context, self.exemplars),
                forward)


def check_lot(params: Mapping[str, object], encoder: nn.Module | None, tasks=None) -> None:
    whole(params, "exemplars")


@register("lot", adaptive=True, check=check_lot, pretty="LOT Merging",
          paper="https://arxiv.org/abs/2505.23859",
          code="https://github.com/SunWenJu123/model-merging", trainer=LOT)
def lot_merge(pretrained: StateDict, experts: Mapping[str, StateDict],
              context: AdaptationContext, exemplars: int = 64) -> Merged:
    """``exemplars``: unlabeled test images per task (drawn with the run's seed) whose layer
    inputs the closed forms are fitted on."""
    state = lot_merge_state(pretrained, experts, context, exemplars)
    return Merged("lot", state, lambdas=torch.ones(1, len(context.tasks)),
                  layer_names=["all"], tasks=context.tasks,
                  info={"exemplars": exemplars})
