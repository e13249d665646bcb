"""EMR-Merging: elect, mask and rescale (Huang et al., NeurIPS 2024,
https://arxiv.org/abs/2405.17461). No data and no hyperparameters, but one model per task,
not one merged model.

- Elect: σ = sign(Σt τt) per entry, a zero sum counting as negative; the unified vector
  τuni = σ ⊙ max over t of |τt| where τt agrees with σ (0 where no task agrees).
- Mask: Mt = [τt·σ > 0], the entries where task t agrees with the elected sign.
- Rescale: λt = Σp mean|τt,p| / Σp mean|Mt,p ⊙ τuni,p|, p over the tensors (each tensor's
  mean counts once, whatever its size, as in the reference).
Task t runs θ0 + λt·Mt ⊙ τuni, so evaluation must know the task (in tint it always does).

References: FusionBench ``fusion_bench/method/emr_merging/utils.py`` (``emr_merge``,
https://github.com/tanganke/fusion_bench/blob/main/fusion_bench/method/emr_merging/utils.py)
and the authors' ``merge_vit/src/main_emr_merging.py``
(https://github.com/harveyhuang18/EMR_Merging); they differ only in electing the sign from
the sum (FusionBench) or the mean (the authors) of the τt, the same sign.
tests/test_reference_svd.py checks this module against a transcription of FusionBench's.

Every floating-point entry is treated alike, elementwise: matrices, 1-D norms and biases,
0-D scalars, the 4-D patch embedding and the ``text.*`` extras (the reference sees the whole
state dict too; their τt are zero in task_vectors checkpoints, so they add nothing to either
sum of λt and their masks are empty). Integer buffers come from θ0.

One divergence, on purpose: a task none of whose entries agrees with σ (an all-zero τt, an
expert equal to θ0) has λt = 0/0 or x/0 in the reference, which then gives that task an
all-NaN model; here λt = 0 and the task runs θ0 (its mask is empty, so any finite λt would).

Masks are stored as packed bits (``pack_bits``: uint8, 8 entries a byte, least significant
bit first, the flattened tensor zero-padded to a multiple of 8): T·n/8 bytes, a quarter of
one float32 copy of the model for 8 tasks. τuni is kept in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tintcli.io import StateDict
from tintcli.merged import Merged
from tintcli.merging.task_vectors import add_task_vector, mergeable
from tintcli.merging.tsv import all_zero, check_experts, fold_sum, slices, task_vectors
from tintcli.methods import register

_BITS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def check_emr(params: Mapping[str, object], encoder=None, tasks=None) -> None:
    """EMR has no parameters to check; the pool size is checked by ``check_emr_tasks``."""


def check_emr_tasks(tasks: int) -> None:
    """A single task's 'merge' is its expert again: EMR needs at least two tasks."""
    if tasks < 2:
        raise ValueError(f"EMR needs at least two tasks, got {tasks}")


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 entries a byte, least significant bit first."""
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(-1, 8) * _BITS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The bool tensor of ``shape`` that ``pack_bits`` packed."""
    bits = (packed.unsqueeze(1) & _BITS.to(packed.device)).ne(0).flatten()
    return bits[:shape.numel()].view(shape)


@dataclass
class EMRMerged:
    """τuni, one packed mask per task and tensor, one scale per task; θ0 by reference."""

    pretrained: Mapping[str, torch.Tensor]
    unified: StateDict  # τuni, float32
    masks: dict[str, dict[str, torch.Tensor]]  # task -> key -> pack_bits(Mt[key])
    scales: dict[str, float]  # task -> λt

    @property
    def tasks(self) -> list[str]:
        return list(self.scales)

    def mask(self, task: str, key: str) -> torch.Tensor:
        """Mt[key] as a bool tensor."""
        return unpack_bits(self.masks[task][key], self.unified[key].shape)

    def task_delta(self, task: str) -> StateDict:
        """Mt ⊙ τuni (unscaled), float32."""
        return {key: uni * self.mask(task, key) for key, uni in self.unified.items()}

    def task_state(self, task: str) -> StateDict:
        """θ0 + λt·Mt ⊙ τuni, in θ0's dtypes: the model task ``task`` runs."""
        return add_task_vector(self.pretrained, self.task_delta(task), self.scales[task])


def emr_merge(pretrained: Mapping[str, torch.Tensor],
              experts: Mapping[str, Mapping[str, torch.Tensor]]) -> EMRMerged:
    """Elect τuni, mask and rescale, one tensor at a time (each τt slice computed twice
    rather than T slices held at once)."""
    check_experts(experts, "EMR", least=2)
    names, vectors = list(experts), task_vectors(pretrained, experts)
    unified: StateDict = {}
    masks: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    kept = torch.zeros(len(names), dtype=torch.float64)  # Σp mean|τt,p|
    rescaled = torch.zeros(len(names), dtype=torch.float64)  # Σp mean|Mt,p ⊙ τuni,p|
    for key, base in pretrained.items():
        if not mergeable(base):
            continue
        if all_zero(experts, base, key):  # the text extras: nothing agrees, nothing to keep
            unified[key] = torch.zeros(base.shape, device=base.device)
            empty = pack_bits(torch.zeros(base.shape, dtype=torch.bool, device=base.device))
            for name in names:
                masks[name][key] = empty
            continue
        sign = torch.where(fold_sum(slices(vectors, key)) > 0, 1.0, -1.0)
        uni = torch.zeros_like(sign)
        agree = []
        for t, tau in enumerate(slices(vectors, key)):
            magnitude = tau.abs()
            agree.append(tau * sign > 0)
            uni = torch.maximum(uni, magnitude * agree[-1])
            kept[t] += magnitude.mean().item()
        for t, name in enumerate(names):
            rescaled[t] += (uni * agree[t]).mean().item()
            masks[name][key] = pack_bits(agree[t])
        unified[key] = uni * sign
    scales = {name: (kept[t] / rescaled[t]).item() if rescaled[t] > 0 else 0.0
              for t, name in enumerate(names)}
    return EMRMerged(pretrained, unified, masks, scales)


@register("emr", check=check_emr, pretty="EMR-Merging", paper="https://arxiv.org/abs/2405.17461",
          code="https://github.com/harveyhuang18/EMR_Merging", min_tasks=2)
def emr(pretrained: Mapping[str, torch.Tensor],
        experts: Mapping[str, Mapping[str, torch.Tensor]]) -> Merged:
    """EMR as tint runs it: every task its own model, from τuni, 1-bit masks and a scale."""
    result = emr_merge(pretrained, experts)
    return Merged("emr", dict(pretrained), overrides=result.task_state,
                  info={"scales": result.scales})
