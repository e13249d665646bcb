"""LiNeS with task arithmetic (Wang et al., 2025, "LiNeS: Post-training Layer Scaling
Prevents Forgetting and Enhances Model Merging"): the summed task vector, scaled linearly
with depth, so shallow layers (general features) move less than deep ones.

Reference: wang-kee/LiNeS, https://github.com/wang-kee/LiNeS — ``src/eval/eval.py``
(``LiNeS_scaling`` and its multi-task call in ``evaluate``) and ``src/eval/aggregation.py``
(method ``sum`` with ``apply_lines``, ``k: 100``).

tau = sum_t tau_t; an entry of residual block l (0-based, of L blocks) is scaled by
alpha + beta * l / (L - 1), every other entry by alpha; theta = theta_0 + scaled tau.
The reference's multi-task alpha is (||sum_t tau_t||_1 / ||tau_merged||_1) / T, which is
exactly 1/T for task arithmetic (the merged vector *is* the sum): ``alpha=None``.
beta is chosen on validation from ``LINES_BETAS`` by average normalised accuracy, as the
reference's ``find_optimal_coef(..., metric="avg_normalized_top1")`` (``src/eval/eval_utils.py``)
over the whole grid.

Residual blocks: the reference tests whether ".{i}." occurs in an open_clip key for
i = 0..L-1 (``...transformer.resblocks.{i}...``) with L hard-coded as 12 (B/32, B/16) or 24
(L/14). In tint's timm layout the same entries are the keys starting ``blocks.{l}.``, and L is
counted from them. "Other" entries, scaled by alpha: the patch embedding (4-D), cls_token,
pos_embed, norm_pre, the final norm, the head (CLIP's projection) and the ``text.*`` extras
(zero task vectors, so they stay theta_0). Every floating-point entry takes part whatever its
shape; integer buffers are copied from theta_0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from tintcli.checks import number
from tintcli.errors import TintError
from tintcli.io import StateDict
from tintcli.merging.task_vectors import mergeable, merged_in_chunks
from tintcli.methods import register

LINES_BETAS = tuple(round(0.1 * i, 1) for i in range(1, 11))  # the authors' grid 0.1 .. 1.0

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def block_index(key: str) -> int | None:
    """The residual block a timm ViT key belongs to (``blocks.{l}.``), or None."""
    match = _BLOCK.match(key)
    return int(match.group(1)) if match else None


def num_blocks(keys: Iterable[str]) -> int:
    """L: the number of residual blocks, which must be numbered 0..L-1."""
    found = {i for i in map(block_index, keys) if i is not None}
    if found != set(range(len(found))) or len(found) < 2:
        raise TintError(f"LiNeS needs residual blocks numbered 0..L-1 with L >= 2; "
                        f"found blocks {sorted(found)}")
    return len(found)


def lines_scales(keys: Iterable[str], alpha: float, beta: float) -> dict[str, float]:
    """Each key's factor: alpha + beta * l / (L - 1) inside block l, alpha outside."""
    keys = list(keys)
    depth = num_blocks(keys)
    scales = {}
    for key in keys:
        layer = block_index(key)
        scales[key] = alpha if layer is None else alpha + beta * (layer / (depth - 1))
    return scales


def check_lines(params: Mapping[str, object], encoder=None, tasks=None) -> None:
    if params.get("alpha") is not None:
        number(params, "alpha")
    number(params, "beta")


@register("lines_ta", check=check_lines, pretty="LiNeS w/ TA",
          paper="https://arxiv.org/abs/2410.17146", code="https://github.com/wang-kee/LiNeS",
          search={"beta": LINES_BETAS}, choose_by="normalized_average")
def lines_ta_merge(pretrained: Mapping[str, torch.Tensor],
                   experts: Mapping[str, Mapping[str, torch.Tensor]],
                   alpha: float | None = None, beta: float = 0.5) -> StateDict:
    """theta_0 + depth-scaled sum of task vectors. ``alpha=None`` is 1/T (the reference's
    value for task arithmetic); ``beta`` 0.5 (mid-grid) is tint's default, not the
    authors' (they choose it on validation from ``LINES_BETAS``)."""
    check_lines({"alpha": alpha, "beta": beta})
    if not experts:
        raise TintError("LiNeS needs at least one expert")
    alpha = 1 / len(experts) if alpha is None else alpha
    keys = [k for k, v in pretrained.items() if mergeable(v)]
    scales = lines_scales(keys, alpha, beta)
    out: StateDict = {}
    for key, value in pretrained.items():
        if not mergeable(value):
            out[key] = value.clone()
            continue
        out[key] = merged_in_chunks(
            pretrained, experts, key,
            lambda part, theta0, thetas, k=key: theta0 + (thetas - theta0).sum(0) * scales[k])
    return out
