"""What every merging method returns, and what evaluation, saving, ``tint table`` and
``tint bench`` understand: one ``Merged``.

Most methods make one shared encoder (``state``). Some make a model per task, and say how
compactly: tinted layers (``tints``: a task's own entries), EMR's per-task masks and scales
(``overrides``: a function of the task, from 1-bit masks), tinted heads (``heads``). Evaluation
asks ``task_state(t)`` and ``head(t)`` and never needs to know which method made them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tintcli.io import StateDict

# A task's own encoder entries, computed when asked (EMR: θ0 + λt·Mt ⊙ τuni from bit masks)
Overrides = Callable[[str], StateDict]


@dataclass
class Merged:
    """A method's outcome.

    ``state``: the merged encoder every task shares. ``heads``: each task's head where the
    method changed it (tinted heads), else empty (the pool's zero-shot heads are used).
    ``tints``: per task, the encoder entries that task overrides (tinted modules).
    ``overrides``: per task, entries computed on demand (EMR). ``lambdas`` is [layers, tasks]
    for methods that learn or choose coefficients (task-wise: one row, ``['all']``).
    ``info``: what results.json records of the method (its choice on validation, the grid).
    ``model``: a module evaluation runs instead of the encoder (WEMoE's routed encoder).
    """

    method: str
    state: StateDict
    heads: dict[str, nn.Module] = field(default_factory=dict)
    tints: dict[str, StateDict] = field(default_factory=dict)
    lambdas: torch.Tensor | None = None
    layer_names: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    loss_curve: dict[str, object] = field(default_factory=dict)
    tinted: str | None = None
    overrides: Overrides | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # a model that replaces the encoder for every task (WEMoE's routed encoder: its weights
    # depend on the input, so no state dict holds them); ``state`` is then its starting point
    model: nn.Module | None = None

    @property
    def per_task(self) -> bool:
        """Whether task t runs its own model (evaluation needs the task, as it always has)."""
        return bool(self.tints) or self.overrides is not None

    def task_state(self, task: str) -> StateDict:
        state = self.state
        if self.overrides is not None:
            state = {**state, **self.overrides(task)}
        if task in self.tints:
            state = {**state, **self.tints[task]}
        return state

    def head(self, task: str, default: nn.Module) -> nn.Module:
        return self.heads.get(task, default)
