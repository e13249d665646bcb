"""Zero-shot classification heads.

As in the task-vectors code, a head is a linear layer over L2-normalised features whose
rows are unit class embeddings scaled by the logit scale (CLIP: exp(logit_scale) = 100).
CLIP builds the rows from text prompts; tint's synthetic benchmark builds them from the
pretrained encoder's mean feature of a few labelled images per class (class prototypes),
so heads, like CLIP's, never come from fine-tuning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ZeroShotHead(nn.Linear):
    """logits = normalize(features) @ weight.T + bias."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(F.normalize(features, dim=-1))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> ZeroShotHead:
        out_features, in_features = state["weight"].shape
        head = cls(in_features, out_features)
        head.load_state_dict(state)
        return head


def prototype_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   logit_scale: float) -> ZeroShotHead:
    """Rows = normalised mean of normalised features per class (the prompt-ensemble recipe)."""
    feats = F.normalize(features.float(), dim=-1)
    rows = torch.zeros(num_classes, feats.shape[1])
    rows.index_add_(0, labels, feats)
    rows = F.normalize(rows, dim=-1) * logit_scale
    head = ZeroShotHead(feats.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(rows)
        head.bias.zero_()
    return head
