"""Weight averaging: theta = mean_k theta_k (model soups, Wortsman et al., ICML 2022)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tintcli.io import StateDict
from tintcli.merging.task_vectors import mergeable
from tintcli.methods import register


@register("weight_averaging", pretty="Weight averaging",
          paper="https://arxiv.org/abs/2203.05482",
          code="https://github.com/mlfoundations/model-soups")
def weight_average(pretrained: Mapping[str, torch.Tensor],
                   experts: Mapping[str, Mapping[str, torch.Tensor]]) -> StateDict:
    models = list(experts.values())
    return {k: torch.stack([m[k].float() for m in models]).mean(0).to(v.dtype)
            if mergeable(v) else v.clone() for k, v in pretrained.items()}
