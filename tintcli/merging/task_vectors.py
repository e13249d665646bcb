"""Task vectors: tau_k = theta_k - theta_0, over the floating-point entries of a state dict."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

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


CHUNK = 1 << 22  # entries per slice: T x 16 MiB per fp32 temporary


def stacked_chunks(pretrained: Mapping[str, torch.Tensor],
                   experts: Mapping[str, Mapping[str, torch.Tensor]], key: str,
                   size: int | None = None) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """One entry of theta_0 and of the T experts, flattened and in fp32, in slices of at most
    ``size`` (default ``CHUNK``) entries: (slice, theta_0 part, stacked (T, part)).
    Element-wise merges loop over these so that their (T, n) temporaries stay small even for
    the largest tensor (the ``text.token_embedding`` extra: 25M entries for B/32). Shared by
    the element-wise data-free merges (consensus, pcb, lines, cart)."""
    size = size or CHUNK
    theta0 = pretrained[key].reshape(-1)
    flats = [expert[key].reshape(-1) for expert in experts.values()]
    for start in range(0, theta0.numel(), size):
        part = slice(start, start + size)
        yield part, theta0[part].float(), torch.stack([f[part].float() for f in flats])


def merged_in_chunks(pretrained: Mapping[str, torch.Tensor],
                     experts: Mapping[str, Mapping[str, torch.Tensor]], key: str,
                     combine: Callable[[slice, torch.Tensor, torch.Tensor], torch.Tensor]
                     ) -> torch.Tensor:
    """Entry ``key`` merged element-wise: ``combine(slice, theta_0 part, stacked experts'
    parts)`` over ``stacked_chunks``, in theta_0's dtype and shape."""
    value = pretrained[key]
    merged = torch.empty(value.numel(), dtype=value.dtype, device=value.device)
    for part, theta0, thetas in stacked_chunks(pretrained, experts, key):
        merged[part] = combine(part, theta0, thetas)
    return merged.reshape(value.shape)
