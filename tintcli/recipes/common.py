"""What every recipe needs: the zoo's checkpoints, heads and test data, loaded once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from rich.console import Console
from torch import nn

from tintcli.adaptation import AdaptationContext, Adapted
from tintcli.benchmark import realism
from tintcli.encoders import build_encoder, resolve_device
from tintcli.evaluation import evaluate_state, evaluate_tasks, summarize
from tintcli.io import StateDict
from tintcli.tasks import task_names
from tintcli.zoo import Zoo, ensure_zoo, test_sets


@dataclass
class Workbench:
    """The pretrained encoder, the experts, the heads and the test sets of one task set."""

    tasks: list[str]
    zoo: Zoo
    pretrained: StateDict
    experts: dict[str, StateDict]
    heads: dict[str, nn.Module]
    test_data: dict[str, tuple[torch.Tensor, torch.Tensor]]
    encoder: nn.Module
    device: torch.device

    @classmethod
    def load(cls, cfg: DictConfig, console: Console) -> Workbench:
        device = resolve_device(cfg.device)
        tasks = task_names(cfg.tasks)
        zoo = ensure_zoo(cfg.encoder, cfg.tasks, tasks, device, console)
        pretrained = zoo.pretrained()
        return cls(tasks, zoo, pretrained, {t: zoo.expert(t, pretrained) for t in tasks},
                   {t: zoo.head(t) for t in tasks}, test_sets(cfg.encoder, cfg.tasks, tasks),
                   build_encoder(cfg.encoder).to(device), device)

    @property
    def expert_accuracy(self) -> dict[str, float]:
        return {t: self.zoo.entries[t].expert_accuracy for t in self.tasks}

    def score(self, state: StateDict) -> dict[str, float]:
        """Per-task top-1 accuracy of an encoder state with each task's head."""
        return evaluate_state(self.encoder, state, self.heads, self.test_data, self.device)

    def score_adapted(self, adapted: Adapted) -> dict[str, float]:
        """Per-task accuracy of an adapted model: its merged encoder (with the task's tint)
        and the task's own, possibly tinted, head."""
        return evaluate_tasks(self.encoder, adapted.task_state, adapted.heads, self.test_data,
                              self.device)

    def adaptation_context(self, seed: int) -> AdaptationContext:
        """Test-time adaptation uses each task's unlabeled test images, as in the papers."""
        return AdaptationContext(self.encoder, self.heads,
                                 {t: self.test_data[t][0] for t in self.tasks}, self.device, seed)

    def row(self, name: str, accuracy: dict[str, float], kind: str = "merged", **extra) -> dict:
        return {"name": name, "kind": kind, **extra, **summarize(accuracy, self.expert_accuracy)}

    def reference_rows(self) -> list[dict]:
        """Zero-shot and experts, as measured when the zoo was built on the same test data."""
        zeroshot = {t: self.zoo.entries[t].zeroshot_accuracy for t in self.tasks}
        return [self.row("zero-shot", zeroshot, "reference"),
                self.row("experts", self.expert_accuracy, "reference")]

    def realism(self) -> dict:
        return realism(self.zoo, self.tasks, self.pretrained, self.experts, self.score)
