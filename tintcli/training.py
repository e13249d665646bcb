"""Supervised training, used by tint to build its own zoo (pretraining and fine-tuning)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def train_classifier(encoder: nn.Module, head: nn.Module, inputs: torch.Tensor,
                     labels: torch.Tensor, *, steps: int, batch_size: int, lr: float,
                     weight_decay: float, device: torch.device, seed: int,
                     on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW with linear warm-up and cosine decay on random batches; returns the losses.

    Only parameters with ``requires_grad`` train, so a frozen head stays exactly as built.
    """
    params = [p for m in (encoder, head) for p in m.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
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
