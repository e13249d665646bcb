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


class LazyTaskVector(Mapping[str, torch.Tensor]):
    """tau_k computed one entry at a time, when read: stacking task vectors on a device then
    holds one extra tensor on the host, not a second copy of every expert."""

    def __init__(self, expert: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor]):
        self.expert, self.keys_ = expert, [k for k, v in pretrained.items() if mergeable(v)]
        self.pretrained = pretrained

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys_:
            raise KeyError(key)
        return self.expert[key].float() - self.pretrained[key].float()

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def add_task_vector(pretrained: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                    lam: float = 1.0) -> StateDict:
    """theta_0 + lam * delta, in theta_0's dtypes; non-float entries come from theta_0."""
    return {k: (v + lam * delta[k].to(v.dtype)) if k in delta else v.clone()
            for k, v in pretrained.items()}
