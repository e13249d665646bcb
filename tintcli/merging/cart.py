"""CART (Choi et al., 2024, "Revisiting Weight Averaging for Model Merging"): low-rank task
vectors centred on the weight average.

Reference: JH-GEECS/CART, https://github.com/JH-GEECS/CART — ``src/merging.py``
(``StaticMergeModule._merge_weights("CART")``, ``_get_origin``,
``_get_truncated_task_vectors``) and ``configs/CART/ViT-b-32_{8,14,20}_CART.yaml``
(``prior`` = lam, ``initial_rank_ratio`` = rank_fraction).

theta_avg = theta_0 + (1/T) sum_t tau_t. For each attention / MLP weight matrix, each task's
centred deviation theta_t - theta_avg is replaced by its rank-k truncated SVD,
k = max(1, int(rank_fraction * min(m, n))); theta = theta_avg + lam * sum_t lowrank_t.
Defaults are the B/32 8-task config (lam 2.0, rank_fraction 0.12); the authors use
1.5 / 0.16 for 14 tasks and 1.9 / 0.32 for 20.

Which matrices: the reference truncates the keys containing "attn" or "mlp" but neither "ln"
nor "bias", i.e. in open_clip the four matrices of every residual block (``attn.in_proj_weight``
with q, k, v fused, ``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight``). In
tint's timm layout those are the 2-D ``blocks.{l}.attn.*`` / ``blocks.{l}.mlp.*`` weights
(``attn.qkv.weight`` keeps q, k, v fused, as open_clip does; FusionBench's Hugging Face layout
splits them and so gives other numbers). Every other floating-point entry (biases, norms, the
4-D patch embedding, cls/pos embeddings, the head, the ``text.*`` extras) is left untruncated;
the reference adds lam * sum_t (theta_t - theta_avg) there, which is zero up to rounding,
so those entries are theta_avg (``text.*`` extras: theta_0, their task vectors being zero).
Integer buffers are copied from theta_0.

Memory: one tensor at a time, its T expert slices stacked (element-wise entries in slices of
``consensus.CHUNK``); one full SVD per task and matrix, as the reference (~130 s for B/32 x 8
on one loaded CPU core, measured).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from tintcli.checks import number
from tintcli.errors import TintError
from tintcli.io import StateDict
from tintcli.merging.task_vectors import mergeable, merged_in_chunks
from tintcli.methods import register

_ATTN_OR_MLP = re.compile(r"^blocks\.\d+\.(attn|mlp)\.")


def is_lowrank_matrix(key: str, tensor: torch.Tensor) -> bool:
    """An attention or MLP weight matrix of a residual block (what CART truncates)."""
    return bool(_ATTN_OR_MLP.match(key)) and tensor.dim() == 2


def check_cart(params: Mapping[str, object], encoder=None, tasks=None) -> None:
    number(params, "lam")
    number(params, "rank_fraction", 0, 1, must="a fraction in (0, 1]")
    if params.get("rank_fraction") == 0:
        raise ValueError("rank_fraction=0 must be a fraction in (0, 1]")


def truncated_rank(shape: torch.Size, rank_fraction: float) -> int:
    """k = max(1, int(rank_fraction * min(m, n))), as the reference rounds it."""
    return max(1, int(rank_fraction * min(shape)))


def low_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation (truncated SVD). A wide matrix (``mlp.fc2``) is
    decomposed as it is, as the reference does: transposing it would be ~2.5x faster on CPU
    (and a little more accurate), but rounds differently, by up to ~5e-6 on B/32-like data."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _average(theta0: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    """theta_avg = theta_0 + (1/T) sum_t tau_t, the reference's arithmetic."""
    return theta0 + (1.0 / len(thetas)) * (thetas - theta0).sum(0)


@register("cart", check=check_cart, pretty="CART", paper="https://arxiv.org/abs/2412.12153",
          code="https://github.com/JH-GEECS/CART")
def cart_merge(pretrained: Mapping[str, torch.Tensor],
               experts: Mapping[str, Mapping[str, torch.Tensor]], lam: float = 2.0,
               rank_fraction: float = 0.12) -> StateDict:
    check_cart({"lam": lam, "rank_fraction": rank_fraction})
    if not experts:
        raise TintError("CART needs at least one expert")
    out: StateDict = {}
    for key, value in pretrained.items():
        if not mergeable(value):
            out[key] = value.clone()
            continue
        if is_lowrank_matrix(key, value):
            thetas = torch.stack([e[key].float() for e in experts.values()])
            theta_avg = _average(value.float(), thetas)
            rank = truncated_rank(value.shape, rank_fraction)
            merged = theta_avg + lam * sum(low_rank(theta - theta_avg, rank) for theta in thetas)
            out[key] = merged.to(value.dtype)
            continue
        # every other entry: theta_avg, element-wise, in slices
        out[key] = merged_in_chunks(pretrained, experts, key,
                                    lambda part, theta0, thetas: _average(theta0, thetas))
    return out
