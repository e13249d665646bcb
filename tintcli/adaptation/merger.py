"""theta(lambda) = theta_0 + sum_k lambda_k tau_k, computed on the device at every step.

The task vectors are stacked once, on the device, grouping the tensors of equal shape (a
ViT's blocks repeat a dozen shapes): [tensors, tasks, numel] per group, allocated on the device
and filled one tensor at a time (the host never holds a stacked copy), in float32 or, to halve
the largest term of adaptation's memory, bfloat16 (``vectors_dtype``). Each step combines
them with the current coefficients by one batched matmul per group, and the encoder runs on
the result through ``torch.func.functional_call``. Nothing is rebuilt and nothing goes through
the CPU, and beyond theta_0 and one merged copy, memory grows with the number of tasks only by
the task vectors themselves. Autograd carries the gradient back to lambda:
d loss / d lambda_kl = <d loss / d theta_l, tau_kl>.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from tintcli.errors import TintError
from tintcli.io import StateDict


class LambdaMerger(nn.Module):
    """Learnable merging coefficients over stacked task vectors.

    ``granularity="task"``: one lambda per task (AdaMerging task-wise);
    ``granularity="layer"``: one lambda per task and parameter tensor (layer-wise).
    Coefficients are clamped to [0, 1] where they are used, as in the official code; theta_0's
    own coefficient stays 1.
    """

    def __init__(self, pretrained: Mapping[str, torch.Tensor],
                 vectors: Sequence[Mapping[str, torch.Tensor]], granularity: str = "layer",
                 init: float = 0.3, device: torch.device | str = "cpu",
                 vectors_dtype: torch.dtype = torch.float32):
        super().__init__()
        if granularity not in ("task", "layer"):
            raise TintError(f"granularity must be 'task' or 'layer', got '{granularity}'")
        if not vectors:
            raise TintError("adaptive merging needs at least one task vector")
        self.granularity = granularity
        self.keys = [k for k in pretrained if k in vectors[0]]  # the merged (float) entries
        self.layout = {k: (pretrained[k].shape, pretrained[k].dtype) for k in self.keys}
        self.fixed = {k: v.to(device) for k, v in pretrained.items() if k not in self.layout}
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, key in enumerate(self.keys):
            by_shape.setdefault(tuple(pretrained[key].shape), []).append(i)
        # per group of equal shapes: its layers' indices (``groups``) and, as buffers, those
        # indices, theta_0 [n, numel] and the task vectors [n, tasks, numel]; theta_0's merged
        # entries live only here
        self.groups: list[list[int]] = []
        for rows in by_shape.values():
            numel = pretrained[self.keys[rows[0]]].numel()
            base = torch.empty(len(rows), numel, device=device)
            stacked = torch.empty(len(rows), len(vectors), numel, device=device,
                                  dtype=vectors_dtype)
            for j, i in enumerate(rows):
                base[j].copy_(pretrained[self.keys[i]].flatten())
                for k, vector in enumerate(vectors):
                    stacked[j, k].copy_(vector[self.keys[i]].flatten())
            # (buffers, not state: a checkpoint holds λ alone; they follow the module's device)
            g = len(self.groups)
            self.register_buffer(f"index{g}", torch.tensor(rows, device=device), persistent=False)
            self.register_buffer(f"base{g}", base, persistent=False)
            self.register_buffer(f"stacked{g}", stacked, persistent=False)
            self.groups.append(rows)
        rows = len(self.keys) if granularity == "layer" else 1
        self.raw = nn.Parameter(torch.full((rows, len(vectors)), float(init), device=device))

    @property
    def layer_names(self) -> list[str]:
        return list(self.keys) if self.granularity == "layer" else ["all"]

    def lambdas(self) -> torch.Tensor:
        """[rows, tasks], clamped to [0, 1]."""
        return self.raw.clamp(0.0, 1.0)

    def forward(self) -> StateDict:
        """The merged state dict, differentiable in lambda."""
        lam = self.lambdas()
        merged = dict(self.fixed)
        for g, rows in enumerate(self.groups):
            index, base = getattr(self, f"index{g}"), getattr(self, f"base{g}")
            stacked = getattr(self, f"stacked{g}")
            coeff = lam[index] if self.granularity == "layer" else lam.expand(len(rows), -1)
            group = base + torch.bmm(coeff.unsqueeze(1).to(stacked.dtype), stacked).squeeze(1)
            for i, flat in zip(rows, group.unbind(0), strict=True):
                shape, dtype = self.layout[self.keys[i]]
                merged[self.keys[i]] = flat.view(shape).to(dtype)
        return merged
