"""Samplers: which pseudo-labelled adaptation samples a step learns from (``sampler`` group).

Each is a plain function (merged logits, expert logits) -> boolean mask over the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def keep_all(merged_logits: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
    """Every sample, labelled with the expert's argmax (Model Tinting)."""
    return torch.ones(len(expert_logits), dtype=torch.bool, device=expert_logits.device)


def keep_confident(merged_logits: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
    """Model Tinting++: keep a sample when the merged model agrees with the expert, or when
    it disagrees and the expert is at least as confident; drop it when the merged model is
    the more confident of two that disagree."""
    merged_conf, merged_pred = F.softmax(merged_logits.detach().float(), -1).max(-1)
    expert_conf, expert_pred = F.softmax(expert_logits.float(), -1).max(-1)
    return (merged_pred == expert_pred) | (expert_conf >= merged_conf)


SAMPLERS: dict[str, Sampler] = {"all": keep_all, "confidence": keep_confident}


def pseudo_label_loss(merged_logits: torch.Tensor, expert_logits: torch.Tensor,
                      sampler: Sampler) -> tuple[torch.Tensor, int | torch.Tensor]:
    """Mean cross-entropy to the expert's argmax over the kept samples, and how many were
    kept (an int, or a count left on the device). A batch where nothing is kept gives a zero
    loss (no gradient), never a NaN. Nothing here waits for the device: the mask is a weight
    of 1 or 0 per sample (indexing with it would read its count back), and every sample kept
    (``keep_all``) needs no mask at all."""
    targets = expert_logits.argmax(-1)
    if sampler is keep_all:
        return F.cross_entropy(merged_logits, targets, reduction="sum") / len(targets), \
            len(targets)
    weight = sampler(merged_logits, expert_logits).to(merged_logits.dtype)
    kept = weight.sum()
    losses = F.cross_entropy(merged_logits, targets, reduction="none")
    return (losses * weight).sum() / kept.clamp(min=1), kept
