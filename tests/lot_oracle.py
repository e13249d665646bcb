"""LOT Merging (Sun et al., "Towards Minimizing Feature Drift in Model Merging: Layer-wise Task
Vector Fusion for Adaptive Knowledge Integration", arXiv 2505.23859), written straight from its
layer-wise objective, in float64, as a test oracle. It must not import from tintcli.

Per layer l and task t, with Xt the layer's input on task t's exemplars (every token of every
exemplar is a row) and τt = θt − θ0 the task vector, LOT picks the merged task vector T that
minimises the feature drift between the expert and the merged model, layer by layer:

    min_T  Σt ‖f(Xt; θ0 + T) − f(Xt; θ0 + τt)‖²_F

which is a convex quadratic with a closed form for each kind of parameter:

  linear weight (y = x W):        T* = (Σt XtᵀXt)⁺ Σt XtᵀXt τt                    (Eq. 9)
  norm scale (y = x̂ ⊙ γ + β):     T*_j = Σt ‖x̂t[:, j]‖² τt,j / Σt ‖x̂t[:, j]‖²      (Eq. 12)
  bias / shift (input ≡ 1):       T* = Σt nt τt / Σt nt   (nt rows; the mean of τt when equal)
  everything else (patch embedding, class token, position embedding): the mean of τt

Xt is the input the expert t itself gives the layer on task t's exemplars (``inputs="expert"``,
the default: the drift is measured against the expert's own features), or the pretrained
model's (``inputs="pretrained"``). The paper's equation numbers are those that third-party
descriptions of it cite (Eq. 9 linear, Eq. 12 normalisation); its body was not available here.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def _layer_inputs(encoder: nn.Module, state: dict[str, Tensor], images: Tensor
                  ) -> dict[str, Tensor]:
    """Module name -> the rows the module sees on ``images`` in the model ``state``: a Linear's
    input x, a LayerNorm's normalised input x̂ = (x − mean) / sqrt(var + eps) (what γ scales)."""
    model = copy.deepcopy(encoder).double().eval()
    model.load_state_dict({k: v.double() for k, v in state.items()})
    rows: dict[str, Tensor] = {}

    def hook(name: str, module: nn.Module):
        def record(_module, args, _output):
            x = args[0].double()
            if isinstance(module, nn.LayerNorm):
                x = nn.functional.layer_norm(x, module.normalized_shape, eps=module.eps)
            rows[name] = x.reshape(-1, x.shape[-1])
        return record

    handles = [m.register_forward_hook(hook(n, m)) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.LayerNorm))]
    with torch.no_grad():
        model(images.double())
    for handle in handles:
        handle.remove()
    return rows


def lot_reference(encoder: nn.Module, pretrained: dict[str, Tensor],
                  experts: dict[str, dict[str, Tensor]], exemplars: dict[str, Tensor],
                  inputs: str = "expert") -> dict[str, Tensor]:
    """θ0 + T*, in float64, for the timm ViT ``encoder`` (its weights are not used: only its
    architecture). ``exemplars[t]``: task t's normalised encoder inputs [n, 3, H, W]."""
    if inputs not in ("expert", "pretrained"):
        raise ValueError(f"inputs must be 'expert' or 'pretrained', not {inputs!r}")
    tasks = list(experts)
    theta0 = {k: v.double() for k, v in pretrained.items()}
    tau = {t: {k: experts[t][k].double() - theta0[k] for k in theta0} for t in tasks}
    X = {t: _layer_inputs(encoder, experts[t] if inputs == "expert" else pretrained,
                          exemplars[t]) for t in tasks}

    # default, for every parameter no rule below covers: the mean of the task vectors
    delta = {k: sum(tau[t][k] for t in tasks) / len(tasks) for k in theta0}

    for name, module in encoder.named_modules():
        if isinstance(module, nn.Linear):
            # Eq. 9. nn.Linear computes x Wᵀ, so the paper's W (in x out) is weight.T.
            gram = sum(X[t][name].T @ X[t][name] for t in tasks)
            moment = sum(X[t][name].T @ X[t][name] @ tau[t][f"{name}.weight"].T
                         for t in tasks)
            delta[f"{name}.weight"] = (torch.linalg.pinv(gram) @ moment).T
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            # Eq. 12: per dimension, the task vectors weighted by each task's Σ x̂².
            weight = {t: (X[t][name] ** 2).sum(0) for t in tasks}
            delta[f"{name}.weight"] = (sum(weight[t] * tau[t][f"{name}.weight"]
                                           for t in tasks) / sum(weight.values()))
        else:
            continue
        key = f"{name}.bias"
        if key in theta0:
            # bias / shift: its input is the constant 1, so Σt nt (T − τt) = 0.
            n = {t: X[t][name].shape[0] for t in tasks}
            delta[key] = sum(n[t] * tau[t][key] for t in tasks) / sum(n.values())

    return {k: theta0[k] + delta[k] for k in theta0}
