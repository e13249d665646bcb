"""Consensus TA (Wang et al., 2024, "Localizing Task Information for Improved Model Merging
and Compression"): task arithmetic restricted to the weights that several tasks use.

Reference: nik-dim/tall_masks, https://github.com/nik-dim/tall_masks —
``src/utils/tallmask_utils.py`` (``generate_task_masks``, ``construct_consensus_mask``) and
``src/eval/aggregation.py`` (method ``consensus`` with its default ``k: 100``, i.e. no
magnitude pruning of the task vectors before they are summed).

1. tau = sum_t tau_t;
2. TALL mask of task t: m_t = |theta_0 - theta_t| > lambda_t * |theta_0 + tau - theta_t|
   (strictly greater). The authors build the masks for every lambda in ``TALL_LAMBDAS`` and
   keep, per task, the one whose per-task model theta_0 + m_t * tau has the best validation
   accuracy on that task (``tall_mask_models`` is that model; tint's selection makes the
   choice, ``lambdas: null``); a number or a {task: lambda} mapping fixes it;
3. consensus mask: the entries with sum_t m_t >= ``min_agreement`` (2 by default: drops the
   "catastrophic" weights no task uses and the "selfish" ones only one task uses);
4. theta = theta_0 + alpha * (consensus mask * tau); the authors pick alpha from
   ``CONSENSUS_ALPHAS`` on validation (average normalised accuracy).

Which tensors: every floating-point entry, element by element, whatever its shape (1-D
norms and biases, the 4-D patch embedding, cls/pos embeddings, the head, ``text.*``
extras), as the reference flattens the whole state dict. ``text.*`` extras have tau = 0,
so no task's mask holds them and they stay theta_0. Integer buffers are copied from theta_0.

Memory: one tensor at a time, its T expert slices stacked, in slices of at most ``CHUNK``
entries; ``tall_masks`` itself returns T boolean state dicts (one byte per entry and task).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tintcli.checks import number, positive, whole
from tintcli.errors import TintError
from tintcli.io import StateDict
from tintcli.merged import Merged
from tintcli.merging.task_vectors import mergeable, merged_in_chunks, stacked_chunks
from tintcli.methods import register

TALL_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)  # the authors' per-task grid for lambda_t
CONSENSUS_ALPHAS = tuple(round(0.1 * i, 1) for i in range(1, 11))  # 0.1, ..., 1.0

Lambdas = Mapping[str, float] | float


def check_consensus(params: Mapping[str, object], encoder=None, tasks=None) -> None:
    """α > 0 (the authors search 0.1 to 1.0); ``min_agreement`` at most the number of tasks
    (more keeps no entry: the merge would be θ0); each λt >= 0, one per task of the set."""
    positive(params, "alpha")
    whole(params, "min_agreement", 1)
    agreement = params.get("min_agreement")
    if tasks is not None and isinstance(agreement, int) and agreement > len(tasks):
        raise ValueError(f"min_agreement={agreement} is more than the {len(tasks)} task(s) of "
                         "the task set: no entry would be kept and the merge would be θ0; use "
                         f"a value from 1 to {len(tasks)}")
    if "lambdas" in params:
        lambdas = params["lambdas"]
        values = ({f"lambdas.{task}": v for task, v in lambdas.items()}
                  if isinstance(lambdas, Mapping) else {"lambdas": lambdas})
        for key in values:
            number(values, key, 0, None, must="a finite number >= 0 (a TALL-mask lambda)")
        if isinstance(lambdas, Mapping) and tasks is not None:
            try:
                task_lambdas(lambdas, list(tasks))
            except TintError as err:
                raise ValueError(str(err)) from err


def task_lambdas(lambdas: Lambdas, tasks: list[str]) -> list[float]:
    """lambda_t per task, in the experts' order: one number for all, or one per task name."""
    if not isinstance(lambdas, Mapping):
        return [float(lambdas)] * len(tasks)
    missing, extra = set(tasks) - set(lambdas), set(lambdas) - set(tasks)
    if missing or extra:
        raise TintError(f"lambdas must name exactly the tasks of the set ({', '.join(tasks)})"
                        + "".join(f"; {what}: {', '.join(sorted(names))}" for what, names in
                                  (("missing", missing), ("not in the set", extra)) if names))
    return [float(lambdas[t]) for t in tasks]


def _masks(theta0: torch.Tensor, thetas: torch.Tensor, scale: torch.Tensor,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """tau and the T TALL masks of a slice. The reference's arithmetic: |theta_0 - theta_t|
    (= |tau_t| exactly) against |theta_0 + tau - theta_t| times lambda_t in fp32 (as a Python
    scalar multiplies an fp32 tensor)."""
    taus = thetas - theta0
    tau = taus.sum(0)
    return tau, taus.abs_() > (theta0 + tau - thetas).abs_().mul_(scale)


def _float_keys(pretrained: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, v in pretrained.items() if mergeable(v)]


def tall_masks(pretrained: Mapping[str, torch.Tensor],
               experts: Mapping[str, Mapping[str, torch.Tensor]],
               lambdas: Lambdas) -> dict[str, StateDict]:
    """Per task, a boolean mask per float entry: where theta_t is closer to theta_0 + tau
    than to theta_0 by the factor lambda_t (the authors' per-task localisation)."""
    tasks = list(experts)
    scale = torch.tensor(task_lambdas(lambdas, tasks)).reshape(-1, 1)
    out: dict[str, StateDict] = {task: {} for task in tasks}
    for key in _float_keys(pretrained):
        value = pretrained[key]
        masks = torch.empty(len(tasks), value.numel(), dtype=torch.bool, device=value.device)
        for part, theta0, thetas in stacked_chunks(pretrained, experts, key):
            masks[:, part] = _masks(theta0, thetas, scale.to(theta0.device))[1]
        for task, mask in zip(tasks, masks, strict=True):
            out[task][key] = mask.reshape(value.shape)
    return out


def consensus_delta(pretrained: Mapping[str, torch.Tensor],
                    experts: Mapping[str, Mapping[str, torch.Tensor]], lambdas: Lambdas = 0.4,
                    min_agreement: int = 2) -> StateDict:
    """mask ⊙ τ: the merge is θ0 + alpha·this, so a grid over alpha needs it once."""
    merged = consensus_merge(pretrained, experts, 1.0, lambdas, min_agreement)
    return {k: merged[k].float() - v.float() for k, v in pretrained.items() if mergeable(v)}


def tall_mask_models(pretrained: Mapping[str, torch.Tensor],
                     experts: Mapping[str, Mapping[str, torch.Tensor]],
                     lambdas: Lambdas) -> Merged:
    """The authors' probe for choosing lambda_t: task t runs theta_0 + m_t * tau, the
    multi-task vector at coefficient 1 under its own TALL mask (``eval_masks`` in
    tall_masks' ``main.py``), each task's model built when asked."""
    masks = tall_masks(pretrained, experts, lambdas)
    tau = {key: merged_in_chunks(pretrained, experts, key,
                                 lambda part, theta0, thetas: (thetas - theta0).sum(0))
           for key in _float_keys(pretrained)}

    def task_state(task: str) -> StateDict:
        return {key: (pretrained[key].float() + masks[task][key] * tau[key].float())
                .to(pretrained[key].dtype) for key in tau}

    return Merged("consensus_ta", dict(pretrained), overrides=task_state)


@register("consensus_ta", check=check_consensus, pretty="Consensus TA",
          paper="https://arxiv.org/abs/2405.07813", code="https://github.com/nik-dim/tall_masks",
          search={"alpha": CONSENSUS_ALPHAS, "lambdas": TALL_LAMBDAS}, delta=consensus_delta,
          choose_by="normalized_average", per_task={"lambdas": tall_mask_models})
def consensus_merge(pretrained: Mapping[str, torch.Tensor],
                    experts: Mapping[str, Mapping[str, torch.Tensor]], alpha: float = 0.3,
                    lambdas: Lambdas = 0.4, min_agreement: int = 2) -> StateDict:
    """theta_0 + alpha * tau on the entries at least ``min_agreement`` TALL masks keep.

    ``alpha`` 0.3 and ``lambdas`` 0.4 (mid-grid) are tint's defaults, not the authors': they
    choose both on validation (``CONSENSUS_ALPHAS``, ``TALL_LAMBDAS``)."""
    check_consensus({"alpha": alpha, "lambdas": lambdas, "min_agreement": min_agreement},
                    tasks=list(experts))
    if not experts:
        raise TintError("Consensus TA needs at least one expert")
    scale = torch.tensor(task_lambdas(lambdas, list(experts))).reshape(-1, 1)
    out: StateDict = {}
    for key, value in pretrained.items():
        if not mergeable(value):
            out[key] = value.clone()
            continue
        def combine(part: slice, theta0: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
            tau, masks = _masks(theta0, thetas, scale.to(theta0.device))
            return theta0 + alpha * (tau * (masks.sum(0) >= min_agreement))

        out[key] = merged_in_chunks(pretrained, experts, key, combine)
    return out
