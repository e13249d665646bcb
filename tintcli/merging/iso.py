"""ISO-C and ISO-CTS, isotropic merging (Marczak et al., ICML 2025,
https://arxiv.org/abs/2502.04959).

ISO-C: per matrix, M = Σt τt = U S Vᵀ and Δ = U·mean(S)·Vᵀ: the same directions as task
arithmetic with a flat spectrum, so no few dominant directions drown the rest.
ISO-CTS: per matrix, r = min(m, n), common size c = r - round((r - floor(f·r)) / T)·T
(Python's round, half to even, as the reference), per-task size s = (r - c) / T; the top-c
factors of Σt τt plus, per task, the top-s factors of τt with its projection on the common
space removed; U and Vᵀ concatenated (task blocks, then the common block), replaced by their
polar factors, and every singular value set to the mean of the r kept ones.
Every other tensor takes the mean of the task vectors. θ = θ0 + α·Δ: the authors pick α in
{0.1, ..., 3.0} on validation, FusionBench fixes 1.0 (its docs use 1.5); f = 0.8.
The ``*_delta`` functions return Δ once, so a validation grid over α is cheap.

References: FusionBench ``fusion_bench/method/isotropic_merging/iso_utils.py`` (``iso_c``,
``iso_cts``,
https://github.com/tanganke/fusion_bench/blob/main/fusion_bench/method/isotropic_merging/iso_utils.py)
and the authors' ``src/utils/iso.py`` (https://github.com/danielm1405/iso-merging); the two
are the same computation (FusionBench has ``exclude_keys`` where the authors skip every key
containing ``text_projection``). tests/test_reference_svd.py checks this module against a
transcription of FusionBench's functions.

Matrices and the rest are told apart as in TSV-M (``tintcli.merging.tsv.matrix_shape``): 2-D
tensors and timm's (1, N, D) ``pos_embed`` are matrices; 1-D norms and biases, 0-D scalars,
the 4-D patch embedding and ``text_projection`` (the authors' skip rule) take the mean; the other
2-D ``text.*`` extras are matrices as in the authors' code (zero task vectors: Δ = 0, no SVD).

Orientation: ISO-CTS is not transpose-equivariant (it removes the common space from the left,
τt − Uc Ucᵀ τt), so a matrix gives another Δ when stored transposed. The authors run on
open_clip state dicts, where CLIP's image projection is ``visual.proj`` [width, embed], the
transpose of tint's ``head.weight``; FusionBench runs on Hugging Face's
``visual_projection.weight``, stored as tint stores it. ``orientation`` names the format whose
storage ISO-CTS follows (``tintcli.checkpoints.convert.STORED_TRANSPOSED``): a run takes its
pool's source format, a plain call the authors' (open_clip). ISO-C is transpose-equivariant
(the SVD of Mᵀ is V S Uᵀ) and needs none.

Search: α is chosen by average normalised accuracy on validation, scoring the grid in
ascending order and stopping after 3 points in a row that do not raise the best average
accuracy (iso-merging's ``find_optimal_coef(..., metric="avg_normalized_top1")`` over the
points its ``early_stopping`` sweep scored, ``src/eval/eval.py``); ``method.patience=null``
scores the whole grid.

Reference behaviour kept on purpose: a rank-deficient Σt τt (ISO-C, ISO-CTS's common space)
or a rank-deficient projected τt (ISO-CTS) has singular vectors LAPACK picks arbitrarily in
its null space, and the flat spectrum gives them the mean singular value: the reference's
Δ depends on that choice. This module gives torch.linalg.svd the same tensors in the same
order (the sum added task by task, the projection computed as (Uc Ucᵀ) τt) so that on the
same LAPACK it gives the same numbers. ISO-CTS's s = 0 (r < T, e.g. a 6x4 matrix with 8
tasks at f = 0.8) leaves the common space alone, i.e. ISO-C on that matrix; a size where the
reference's c would be negative (r < T at a small f, where the reference fails) is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from tintcli.checkpoints.convert import SOURCE_FORMATS, STORED_TRANSPOSED
from tintcli.checks import device, number, one_of, positive
from tintcli.errors import TintError
from tintcli.io import StateDict
from tintcli.merging.task_vectors import add_task_vector
from tintcli.merging.tsv import (
    ALPHAS,
    Device,
    check_experts,
    fold_sum,
    matrix_deltas,
    polar,
    svd,
)
from tintcli.methods import register


def check_iso_c(params: Mapping[str, object], encoder=None, tasks=None) -> None:
    """α must be a finite number > 0 (the authors search 0.1 to 3.0)."""
    positive(params, "alpha")
    device(params, "device")


def check_iso_cts(params: Mapping[str, object], encoder=None, tasks=None) -> None:
    """α as for ISO-C; the common fraction f in (0, 1] (f = 1: no task-specific space);
    ``orientation`` a source format (null: the pool's)."""
    check_iso_c(params)
    must = "a fraction in (0, 1]"
    number(params, "common_fraction", 0, 1, must=must)
    if params.get("common_fraction", 1) == 0:
        raise ValueError(f"common_fraction={params['common_fraction']} must be {must}")
    if params.get("orientation") is not None:
        one_of(params, "orientation", SOURCE_FORMATS)


# iso-merging's sweep (config/config.yaml: early_stopping: true, early_stopping_patience: 3)
ISO_PATIENCE = 3

Columns = Callable[[], Iterator[torch.Tensor]]  # a fresh pass over the T slices of a matrix


def _iso_c_matrix(columns: Columns, key: str, tasks: int) -> torch.Tensor:
    u, s, vh = svd(fold_sum(columns()), key, "ISO-C")
    return (u * s.mean()) @ vh


def iso_c_delta(pretrained: Mapping[str, torch.Tensor],
                experts: Mapping[str, Mapping[str, torch.Tensor]],
                device: Device = None) -> StateDict:
    """Δ of ISO-C in float32 (unscaled); SVDs on ``device``, Δ on θ0's device."""
    check_experts(experts, "ISO-C")
    return matrix_deltas(pretrained, experts, device, _iso_c_matrix)


@register("iso_c", check=check_iso_c, pretty="ISO-C", paper="https://arxiv.org/abs/2502.04959",
          code="https://github.com/danielm1405/iso-merging", search={"alpha": ALPHAS},
          delta=iso_c_delta, choose_by="normalized_average", patience=ISO_PATIENCE)
def iso_c_merge(pretrained: Mapping[str, torch.Tensor],
                experts: Mapping[str, Mapping[str, torch.Tensor]], alpha: float = 1.0,
                device: Device = None) -> StateDict:
    """θ0 + α·Δ (ISO-C), in θ0's dtypes; integer buffers come from θ0."""
    check_iso_c({"alpha": alpha})
    return add_task_vector(pretrained, iso_c_delta(pretrained, experts, device), alpha)


def common_size(rank: int, tasks: int, common_fraction: float) -> int:
    """c such that r - c splits evenly over the tasks, nearest to floor(f·r) (reference)."""
    common = int(rank * common_fraction)
    return rank - round((rank - common) / tasks) * tasks


def _iso_cts_matrix(columns: Columns, key: str, tasks: int, common_fraction: float) -> torch.Tensor:
    total = fold_sum(columns())
    rank = min(total.shape)
    common = common_size(rank, tasks, common_fraction)
    if common < 0:
        raise TintError(f"ISO-CTS: '{key}' {tuple(total.shape)} is too small for {tasks} tasks "
                        f"at common_fraction {common_fraction} (common size {common} < 0); "
                        "raise common_fraction")
    per_task = (rank - common) // tasks
    u, s, vh = svd(total, key, "ISO-CTS")
    u_common = u[:, :common]
    us: list[torch.Tensor] = []
    ss: list[torch.Tensor] = []
    vhs: list[torch.Tensor] = []
    if per_task > 0:
        projector = u_common @ u_common.T
        for tau in columns():
            u_t, s_t, vh_t = svd(tau - projector @ tau, key, "ISO-CTS")
            us.append(u_t[:, :per_task])
            ss.append(s_t[:per_task])
            vhs.append(vh_t[:per_task])
    u = polar(torch.cat([*us, u_common], dim=1), key, "ISO-CTS")
    vh = polar(torch.cat([*vhs, vh[:common]], dim=0), key, "ISO-CTS")
    return (u * torch.cat([*ss, s[:common]]).mean()) @ vh


def iso_cts_delta(pretrained: Mapping[str, torch.Tensor],
                  experts: Mapping[str, Mapping[str, torch.Tensor]],
                  common_fraction: float = 0.8, orientation: str | None = None,
                  device: Device = None) -> StateDict:
    """Δ of ISO-CTS in float32 (unscaled); SVDs on ``device``, Δ on θ0's device. A matrix
    that the ``orientation`` format stores transposed (open_clip's ``visual.proj``; None:
    open_clip, the authors') is decomposed as that format stores it."""
    check_experts(experts, "ISO-CTS")
    check_iso_cts({"common_fraction": common_fraction, "orientation": orientation})
    stored_transposed = STORED_TRANSPOSED[orientation or "open_clip"]

    def matrix_delta(columns: Columns, key: str, tasks: int) -> torch.Tensor:
        if key not in stored_transposed:
            return _iso_cts_matrix(columns, key, tasks, common_fraction)
        as_stored = lambda: (tau.T.contiguous() for tau in columns())  # noqa: E731
        return _iso_cts_matrix(as_stored, key, tasks, common_fraction).T

    return matrix_deltas(pretrained, experts, device, matrix_delta)


@register("iso_cts", check=check_iso_cts, pretty="ISO-CTS",
          paper="https://arxiv.org/abs/2502.04959",
          code="https://github.com/danielm1405/iso-merging", search={"alpha": ALPHAS},
          delta=iso_cts_delta, choose_by="normalized_average", patience=ISO_PATIENCE)
def iso_cts_merge(pretrained: Mapping[str, torch.Tensor],
                  experts: Mapping[str, Mapping[str, torch.Tensor]], alpha: float = 1.0,
                  common_fraction: float = 0.8, orientation: str | None = None,
                  device: Device = None) -> StateDict:
    """θ0 + α·Δ (ISO-CTS), in θ0's dtypes; integer buffers come from θ0."""
    check_iso_cts({"alpha": alpha, "common_fraction": common_fraction,
                   "orientation": orientation})
    return add_task_vector(pretrained, iso_cts_delta(pretrained, experts, common_fraction,
                                                     orientation, device), alpha)
