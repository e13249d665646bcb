"""TIES-merging (Yadav et al., NeurIPS 2023, https://arxiv.org/abs/2306.01708), as the
benchmark code (AdaMerging, FusionBench) runs it.

1. trim: per task vector, keep the ``top_k`` % entries of largest magnitude, ranked over the
   whole flattened model, and zero the rest: int(n * k) + 1 entries as the reference code
   keeps (``kthvalue(n - int(n * k))`` with ``>=``), entries tied with the threshold too;
2. elect: per entry, the sign of the sum of the trimmed vectors (mass election); an entry
   whose sum is zero takes the sign that most entries elected (the official code's
   "majority" rule);
3. disjoint merge: over the tasks whose trimmed entry agrees with the elected sign, the
   ``mean`` (original paper, "dis-mean": its lambda is about 1) or the ``sum``
   (AdaMerging / FusionBench code, "dis-sum": lambda 0.3);
then theta = theta_0 + lam * merged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tintcli.checks import number, one_of
from tintcli.errors import TintError
from tintcli.io import StateDict
from tintcli.merging.task_vectors import add_task_vector, task_vector
from tintcli.methods import register


def trim_top_k(vector: Mapping[str, torch.Tensor], top_k: float) -> StateDict:
    """Keep the top_k % entries by magnitude over all tensors together.

    The reference's convention, to the last entry: of n entries it keeps those at least as
    large as the (n - int(n * top_k / 100))-th smallest magnitude, i.e. int(n * k) + 1 of
    them, and every entry tied with that threshold. ``top_k=100`` keeps everything (where
    the reference would fail)."""
    if not 0 <= top_k <= 100:
        raise TintError(f"TIES top_k must be a percentage in [0, 100], got {top_k}")
    magnitudes = torch.cat([v.abs().flatten() for v in vector.values()])
    n = magnitudes.numel()
    rank = n - int(n * (top_k / 100))  # 1-based rank of the threshold among the smallest
    if rank < 1 or n == 0:
        return {key: v.clone() for key, v in vector.items()}
    threshold = magnitudes.kthvalue(rank).values
    return {key: v * (v.abs() >= threshold) for key, v in vector.items()}


def elect_signs(trimmed: list[Mapping[str, torch.Tensor]]) -> StateDict:
    """Per entry, sign(sum_k); zero sums take the majority of all elected signs."""
    signs = {key: torch.sign(torch.stack([t[key] for t in trimmed]).sum(0))
             for key in trimmed[0]}
    majority = torch.sign(sum(s.sum() for s in signs.values()))
    return {key: torch.where(s == 0, majority, s) for key, s in signs.items()}


def _agrees(vector: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return ((vector > 0) & (sign > 0)) | ((vector < 0) & (sign < 0))


def disjoint_merge(trimmed: list[Mapping[str, torch.Tensor]], signs: Mapping[str, torch.Tensor],
                   merge: str) -> StateDict:
    if merge not in ("mean", "sum"):
        raise TintError(f"TIES merge must be 'mean' or 'sum' (disjoint mean / sum), got '{merge}'")
    out = {}
    for key, sign in signs.items():
        stacked = torch.stack([t[key] for t in trimmed])
        agrees = _agrees(stacked, sign)
        total = (stacked * agrees).sum(0)
        if merge == "mean":
            total = total / agrees.sum(0).clamp(min=1)
        out[key] = total
    return out


def ties_task_vectors(vectors: list[Mapping[str, torch.Tensor]],
                      top_k: float = 20) -> list[StateDict]:
    """Steps 1-2 without the merge: each task vector trimmed, keeping only the entries that
    agree with the elected sign. AdaMerging++ learns coefficients for these."""
    trimmed = [trim_top_k(v, top_k) for v in vectors]
    signs = elect_signs(trimmed)
    return [{key: t[key] * _agrees(t[key], signs[key]) for key in signs} for t in trimmed]


def check_ties(params: Mapping[str, object], encoder=None, tasks=None) -> None:
    number(params, "top_k", 0, 100, must="a percentage in [0, 100]")
    one_of(params, "merge", ("mean", "sum"))
    number(params, "lam")


@register("ties", check=check_ties, pretty="TIES", paper="https://arxiv.org/abs/2306.01708",
          code="https://github.com/prateeky2806/ties-merging")
def ties_merge(pretrained: Mapping[str, torch.Tensor],
               experts: Mapping[str, Mapping[str, torch.Tensor]], top_k: float = 20,
               merge: str = "sum", lam: float = 0.3) -> StateDict:
    """``top_k``: % of each task vector's entries kept, by magnitude over the whole model;
    ``merge``: the disjoint "sum" (the benchmark code's, with ``lam`` 0.3) or "mean" (the
    paper's, with ``lam`` about 1: ``method=ties_mean``)."""
    trimmed = [trim_top_k(task_vector(e, pretrained), top_k) for e in experts.values()]
    merged = disjoint_merge(trimmed, elect_signs(trimmed), merge)
    return add_task_vector(pretrained, merged, lam)
