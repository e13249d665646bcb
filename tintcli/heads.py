"""Zero-shot classification heads, and the caption embeddings they come from.

As in the task-vectors code, a head is a linear layer over L2-normalised features whose rows
are unit class embeddings scaled by the encoder's ``logit_scale`` (CLIP: 100). CLIP takes the
rows from its text tower; tint's synthetic benchmark takes them from ``CaptionEmbeddings``, the
analogue of that tower: one learned embedding per (family, class) "caption", trained with
the image encoder CLIP-style (cosine logits, learned temperature) during pretraining. So the
heads, like CLIP's, sit in their own region of the sphere (the modality gap) and are never
class means of image features, nor fine-tuned.
"""

from __future__ import annotations

import math

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

    @classmethod
    def from_embeddings(cls, rows: torch.Tensor, logit_scale: float) -> ZeroShotHead:
        """Rows = unit class embeddings x logit scale, bias 0 (task-vectors' ClassificationHead)."""
        head = cls(rows.shape[1], rows.shape[0])
        with torch.no_grad():
            head.weight.copy_(F.normalize(rows.float(), dim=-1) * logit_scale)
            head.bias.zero_()
        return head


class CaptionEmbeddings(nn.Module):
    """CLIP's contrastive logits against a fixed vocabulary of class captions."""

    def __init__(self, num_captions: int, dim: int, max_scale: float = 100.0):
        super().__init__()
        self.embeddings = nn.Parameter(torch.randn(num_captions, dim) * dim**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's init
        self.max_scale = max_scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale.exp().clamp(max=self.max_scale)
        return scale * F.normalize(features, dim=-1) @ F.normalize(self.embeddings, dim=-1).T


@torch.no_grad()
def text_tower_head(model: nn.Module, tokenizer, classnames: list[str],
                    templates: list[str]) -> ZeroShotHead:
    """A task's zero-shot head from a Hugging Face ``CLIPModel``'s text tower, as the
    task_vectors code builds it: per class, embed every template filled with the class
    name, L2-normalise, average over templates, normalise again; rows scaled by
    ``exp(logit_scale)``."""
    rows = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates], padding=True,
                           return_tensors="pt")
        features = model.get_text_features(**tokens)
        features = getattr(features, "pooler_output", features)  # transformers 5 wraps it
        rows.append(F.normalize(F.normalize(features.float(), dim=-1).mean(0), dim=-1))
    return ZeroShotHead.from_embeddings(torch.stack(rows), float(model.logit_scale.exp()))
