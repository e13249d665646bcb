"""Task vectors: tau_k = theta_k - theta_0, over the floating-point entries of a state dict."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tintcli.io import StateDict


def mergeable(tensor: torch.Tensor) -> bool:
    """Integer buffers (counters, index tables) are copied from theta_0, never merged."""
    return tensor.is_floating_point()


def task_vector(expert: Mapping[str, torch.Tensor],
                pretrained: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: expert[k].float() - v.float() for k, v in pretrained.items() if mergeable(v)}


def add_task_vector(pretrained: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                    lam: float = 1.0) -> StateDict:
    """theta_0 + lam * delta, in theta_0's dtypes; non-float entries come from theta_0."""
    return {k: (v + lam * delta[k].to(v.dtype)) if k in delta else v.clone()
            for k, v in pretrained.items()}
