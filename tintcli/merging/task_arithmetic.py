"""Task arithmetic: theta = theta_0 + lam * sum_k tau_k, lam = 0.3 by default (Ilharco et al.,
ICLR 2023, https://arxiv.org/abs/2212.04089)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tintcli.checks import number
from tintcli.io import StateDict
from tintcli.merging.task_vectors import add_task_vector, task_vector
from tintcli.methods import register


@register("task_arithmetic", check=lambda params, *_: number(params, "lam"),
          pretty="Task Arithmetic", paper="https://arxiv.org/abs/2212.04089",
          code="https://github.com/mlfoundations/task_vectors")
def task_arithmetic_merge(pretrained: Mapping[str, torch.Tensor],
                          experts: Mapping[str, Mapping[str, torch.Tensor]],
                          lam: float = 0.3) -> StateDict:
    """``lam``: the scaling of the summed task vectors (0.3: the benchmark's)."""
    total: dict[str, torch.Tensor] = {}
    for expert in experts.values():
        for k, v in task_vector(expert, pretrained).items():
            total[k] = total[k] + v if k in total else v
    return add_task_vector(pretrained, total, lam)
