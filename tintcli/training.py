"""Supervised training, used by tint to build its own zoo (pretraining and fine-tuning)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _param_groups(encoder: nn.Module, head: nn.Module, lr: float, weight_decay: float,
                  layer_decay: float | None) -> list[dict]:
    """No weight decay on norms and biases; with ``layer_decay``, the usual ViT fine-tuning
    recipe (BEiT, MAE): layer i of n trains at lr * layer_decay ** (n - i), so the embeddings
    move least and the last blocks most."""
    if layer_decay is None:
        params = [p for p in encoder.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    else:
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(encoder, weight_decay=weight_decay,
                                          layer_decay=layer_decay)
    head_params = [p for p in head.parameters() if p.requires_grad]
    if head_params:
        groups.append({"params": head_params, "weight_decay": 0.0})
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale", 1.0)
    return [g for g in groups if g["params"]]


def train_classifier(encoder: nn.Module, head: nn.Module, inputs: torch.Tensor,
                     labels: torch.Tensor, *, steps: int, batch_size: int, lr: float,
                     weight_decay: float, device: torch.device, seed: int,
                     layer_decay: float | None = None,
                     on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW with linear warm-up and cosine decay on random batches; returns the losses.

    Only parameters with ``requires_grad`` train, so a frozen head stays exactly as built.
    """
    opt = torch.optim.AdamW(_param_groups(encoder, head, lr, weight_decay, layer_decay))
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    g = torch.Generator().manual_seed(seed)
    encoder.train()
    head.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(len(labels), (batch_size,), generator=g)
        x, y = inputs[idx].to(device), labels[idx].to(device)
        loss = F.cross_entropy(head(encoder(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    encoder.eval()
    return losses
