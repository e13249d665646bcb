"""TSV-M, task singular vectors merging (Gargiulo et al., CVPR 2025,
https://arxiv.org/abs/2412.00081).

Per matrix, each task vector keeps its top k = floor(min(m, n) / T) singular triplets; the
T blocks of U, of S and of Vᵀ are concatenated, U and Vᵀ are replaced by their polar factors
(the nearest matrices with orthonormal columns / rows, so the tasks' directions stop
interfering) and Δ = U⊥ diag(S) V⊥ᵀ. Every other tensor takes the mean of the task vectors.
θ = θ0 + α·Δ: the authors pick α in {0.1, ..., 3.0} on validation by average normalised
accuracy (``find_optimal_coef(..., metric="avg_normalized_top1")``, ``src/eval/eval_utils.py``;
the whole grid: their repository has no early stopping), FusionBench fixes α = 1. TSV-M is
transpose-equivariant (the SVD of τᵀ is V S Uᵀ, and so are the polar factors), so a matrix's
orientation in the source format does not matter.
``tsv_delta`` returns Δ once, so a validation grid over α costs one ``add_task_vector`` a point.

References: FusionBench ``fusion_bench/method/task_singular_vector/utils/TSVM_utils.py``
(``compute_and_sum_svd_mem_reduction``,
https://github.com/tanganke/fusion_bench/blob/main/fusion_bench/method/task_singular_vector/utils/TSVM_utils.py)
and the authors' ``src/utils/TSVM_utils.py``
(https://github.com/AntoAndGar/task_singular_vectors). tests/test_reference_svd.py checks
this module against a transcription of FusionBench's function.

Which tensors are matrices (``matrix_shape``):
- 2-D tensors: attention qkv (fused, as open_clip's ``in_proj_weight`` the authors decompose
  whole), attention out proj, MLP fc1 / fc2, the image projection ``head.weight``.
- timm's ``pos_embed`` (1, N, D) is open_clip's ``positional_embedding`` (N, D) and Hugging
  Face's ``position_embedding.weight``: a matrix in both references, so leading size-1
  dimensions of a tensor of three or more dimensions are dropped first (``cls_token``
  (1, 1, D) becomes open_clip's 1-D ``class_embedding``, a non-matrix).
- Not matrices, so the mean of τt: 1-D norms and biases, 0-D scalars, the 4-D patch
  embedding (open_clip's ``conv1``), and any key containing ``text_projection`` (the authors'
  code excludes it; FusionBench decomposes every 2-D tensor unless ``exclude_keys``
  names it, which does not matter on its Hugging Face pools, which have no text tower).
- The other ``text.*`` extras follow the same rule as the authors' code, which sees them
  too: 2-D ``text.token_embedding.weight`` / ``text.positional_embedding`` are matrices,
  ``text.ln_final.*`` and ``text.logit_scale`` take the mean. Their task vectors are zero in
  task_vectors checkpoints; a tensor whose task vectors are all zero gives Δ = 0 without any
  SVD, exactly what the reference computes for it at the cost of T SVDs.

Reference behaviour kept on purpose:
- k = 0 (min(m, n) < T, e.g. a 6x4 matrix with 8 tasks): the matrix gets Δ = 0.
- A rank-deficient τt (rank ρ < k) contributes k - ρ singular vectors that LAPACK picks
  arbitrarily in its null space; they have singular value ~0 but enter the polar factor and
  so move the other tasks' directions. The reference's result therefore depends on that
  choice; this module feeds torch.linalg.svd the same tensors in the same order, so on the
  same LAPACK it gives the same numbers (an all-zero task vector is such a case: its U, V are
  LAPACK's identity columns).
- The task vectors are taken in float32 (float64 stays float64), whatever the experts' dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch

from tintcli.checks import device, positive
from tintcli.errors import TintError
from tintcli.io import StateDict
from tintcli.merging.task_vectors import LazyTaskVector, add_task_vector, mergeable
from tintcli.methods import register

Device = torch.device | str | None
# α, chosen on the validation split from the authors' grid (TSV and ISO: 0.1, 0.2, ..., 3.0)
ALPHAS = tuple(round(0.1 * i, 1) for i in range(1, 31))


def check_tsv(params: Mapping[str, object], encoder=None, tasks=None) -> None:
    """α must be a finite number > 0 (the authors search 0.1 to 3.0); ``device`` one this
    machine has (null: where the tensors are)."""
    positive(params, "alpha")
    device(params, "device")


def check_experts(experts: Mapping[str, object], method: str, least: int = 1) -> None:
    if len(experts) < least:
        raise ValueError(f"{method} needs at least {'two tasks' if least == 2 else 'one expert'}"
                         f", got {len(experts)}")


def matrix_shape(key: str, shape: Sequence[int]) -> tuple[int, int] | None:
    """(m, n) where the reference decomposes the tensor, None where it takes the mean."""
    if "text_projection" in key:
        return None
    dims = list(shape)
    if len(dims) > 2:  # timm's (1, N, D) pos_embed is open_clip's (N, D) positional_embedding
        while dims and dims[0] == 1:
            dims.pop(0)
    return (dims[0], dims[1]) if len(dims) == 2 else None


def task_vectors(pretrained: Mapping[str, torch.Tensor],
                 experts: Mapping[str, Mapping[str, torch.Tensor]]) -> list[LazyTaskVector]:
    """τt computed one tensor at a time, when read: T full copies never exist together."""
    return [LazyTaskVector(expert, pretrained) for expert in experts.values()]


def slices(vectors: Sequence[Mapping[str, torch.Tensor]], key: str, device: Device = None,
           shape: Sequence[int] | None = None):
    """Each task's τt[key] in turn, on ``device``, in float32 (or float64), reshaped."""
    for vector in vectors:
        tensor = vector[key]
        if tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()
        if device is not None:
            tensor = tensor.to(device)
        yield tensor if shape is None else tensor.reshape(shape)


def all_zero(experts: Mapping[str, Mapping[str, torch.Tensor]], base: torch.Tensor,
             key: str) -> bool:
    """Every τt[key] is zero (the text-tower leftovers): their merged Δ is zero too."""
    return all(torch.equal(expert[key], base) for expert in experts.values())


def fold_sum(tensors) -> torch.Tensor:
    """Σt in task order, one addition at a time, as the references' ``sum`` adds: the sum's
    SVD (ISO) and its signs (EMR) then see bit-identical input."""
    total = None
    for tensor in tensors:
        total = tensor.clone() if total is None else total.add_(tensor)
    return total


def svd(matrix: torch.Tensor, key: str, method: str):
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError as err:
        raise TintError(f"{method}: the SVD of '{key}' {tuple(matrix.shape)} failed to "
                        f"converge ({err})") from err


def polar(matrix: torch.Tensor, key: str, method: str) -> torch.Tensor:
    """The orthonormal polar factor P Qᵀ of matrix = P Σ Qᵀ."""
    u, _, vh = svd(matrix, key, method)
    return u @ vh


def _tsv_matrix(columns, m: int, n: int, tasks: int, key: str) -> torch.Tensor:
    k = min(m, n) // tasks
    if k == 0:  # more tasks than directions: the reference's blocks are all empty
        return torch.zeros(m, n)
    us, ss, vhs = [], [], []
    for tau in columns:
        u, s, vh = svd(tau, key, "TSV-M")
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    u = polar(torch.cat(us, dim=1), key, "TSV-M")
    vh = polar(torch.cat(vhs, dim=0), key, "TSV-M")
    return (u * torch.cat(ss)) @ vh


def tsv_delta(pretrained: Mapping[str, torch.Tensor],
              experts: Mapping[str, Mapping[str, torch.Tensor]],
              device: Device = None) -> StateDict:
    """Δ of TSV-M in float32 (unscaled), for every floating-point entry of θ0; SVDs run on
    ``device`` (default: where the tensors are), Δ comes back to θ0's device."""
    check_experts(experts, "TSV-M")

    def matrix_delta(columns, key: str, tasks: int) -> torch.Tensor:
        return _tsv_matrix(columns(), *matrix_shape(key, pretrained[key].shape), tasks, key)

    return matrix_deltas(pretrained, experts, device, matrix_delta)


def matrix_deltas(pretrained: Mapping[str, torch.Tensor],
                  experts: Mapping[str, Mapping[str, torch.Tensor]], device: Device,
                  matrix_delta: Callable[..., torch.Tensor]) -> StateDict:
    """Per floating-point entry: ``matrix_delta(columns, key, tasks)`` for matrices (columns()
    gives the T task-vector slices), the mean of τt otherwise; what TSV and ISO share."""
    vectors, tasks = task_vectors(pretrained, experts), len(experts)
    delta: StateDict = {}
    for key, base in pretrained.items():
        if not mergeable(base):
            continue
        shape = matrix_shape(key, base.shape)
        if shape is None:
            merged = fold_sum(slices(vectors, key, device)) / tasks
        elif all_zero(experts, base, key):
            merged = torch.zeros(shape)
        else:
            merged = matrix_delta(partial(slices, vectors, key, device, shape), key, tasks)
        delta[key] = merged.reshape(base.shape).to(base.device)
    return delta


@register("tsv_m", check=check_tsv, pretty="TSV-M", paper="https://arxiv.org/abs/2412.00081",
          code="https://github.com/AntoAndGar/task_singular_vectors",
          search={"alpha": ALPHAS}, delta=tsv_delta, choose_by="normalized_average")
def tsv_merge(pretrained: Mapping[str, torch.Tensor],
              experts: Mapping[str, Mapping[str, torch.Tensor]], alpha: float = 1.0,
              device: Device = None) -> StateDict:
    """θ0 + α·Δ (TSV-M), in θ0's dtypes; integer buffers come from θ0."""
    check_tsv({"alpha": alpha})
    return add_task_vector(pretrained, tsv_delta(pretrained, experts, device), alpha)
