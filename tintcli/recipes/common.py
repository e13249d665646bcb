"""What every recipe needs: the zoo's checkpoints, heads and test data, loaded once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch import nn

from tintcli.adaptation import AdaptationContext, Adapted
from tintcli.benchmark import realism
from tintcli.cache import ensure_json
from tintcli.encoders import build_encoder, resolve_device
from tintcli.errors import TintError
from tintcli.evaluation import evaluate_state, evaluate_tasks, summarize
from tintcli.io import StateDict, fingerprint
from tintcli.paths import cache_dir
from tintcli.pools import FilePool, check_experts_beat_zero_shot, open_pool
from tintcli.tasks import split_entry, task_names
from tintcli.zoo import Zoo, ensure_zoo, test_sets


@dataclass
class Workbench:
    """The pretrained encoder, the experts, the heads and the test sets of one task set,
    from one model pool, with each task's zero-shot and expert reference accuracies."""

    tasks: list[str]
    pool: Zoo | FilePool
    pretrained: StateDict
    experts: dict[str, StateDict]
    heads: dict[str, nn.Module]
    test_data: dict[str, tuple[torch.Tensor, torch.Tensor]]
    encoder: nn.Module
    device: torch.device
    references: dict[str, tuple[float, float]]  # task -> (zero-shot, expert) accuracy
    data_digests: dict[str, dict[str, str]]

    @classmethod
    def load(cls, cfg: DictConfig, console: Console) -> Workbench:
        device = resolve_device(cfg.device)
        tasks = task_names(cfg.tasks)
        kind = cfg.pool.kind if "pool" in cfg else "synth"
        encoder = build_encoder(cfg.encoder)
        if kind == "synth":
            pool: Zoo | FilePool = ensure_zoo(cfg.encoder, cfg.tasks, tasks, device, console)
        else:
            pool = open_pool(cfg.pool, tasks, encoder, cfg.encoder.name)
        with console.status(f"loading the {kind} pool's checkpoints"):
            pretrained = pool.pretrained()
            experts = {t: pool.expert(t, pretrained) for t in tasks}
            heads = {t: pool.head(t) for t in tasks}
        test_data = test_sets(cfg.encoder, cfg.tasks, tasks)
        if isinstance(pool, Zoo):  # the zoo measured its accuracies on these very splits
            digests = pool.data_digests()
        else:
            size, seed = int(cfg.tasks.image_size), int(cfg.tasks.seed)
            digests = {t: {"test": split_entry(t, "test", cfg.tasks.test_size, size,
                                               seed).digest} for t in tasks}
        bench = cls(tasks, pool, pretrained, experts, heads, test_data, encoder.to(device),
                    device, {}, digests)
        bench.references = pool.reference_accuracies() or bench.measure_references(cfg)
        if kind != "synth":
            check_experts_beat_zero_shot(bench.references, kind)
        return bench

    @property
    def zoo(self) -> Zoo:
        if not isinstance(self.pool, Zoo):
            raise TintError("only the synth pool has a zoo")
        return self.pool

    def measure_references(self, cfg: DictConfig) -> dict[str, tuple[float, float]]:
        """Zero-shot and expert accuracy per task, cached by the digests of the checkpoints
        and the test data and by what else decides them (the pool's settings, the encoder,
        device type, torch)."""
        key = {"checkpoints": self.pool.checkpoint_hashes(), "data": self.data_digests,
               "pool": OmegaConf.to_container(cfg.pool, resolve=True),  # e.g. head templates
               "encoder": OmegaConf.to_container(cfg.encoder, resolve=True),
               "device": self.device.type, "torch": torch.__version__}

        def measure() -> dict[str, list[float]]:
            zeroshot = self.score(self.pretrained)
            return {t: [zeroshot[t], evaluate_state(self.encoder, self.experts[t],
                                                    {t: self.heads[t]},
                                                    {t: self.test_data[t]}, self.device)[t]]
                    for t in self.tasks}

        value = ensure_json(cache_dir() / "references" / fingerprint(key), key, measure,
                            "the zero-shot and expert accuracies")
        return {t: (value[t][0], value[t][1]) for t in self.tasks}

    @property
    def expert_accuracy(self) -> dict[str, float]:
        return {t: self.references[t][1] for t in self.tasks}

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
        """Zero-shot and experts on the same test data (measured when the zoo was built, or
        when the pool was first scored on these test splits)."""
        zeroshot = {t: self.references[t][0] for t in self.tasks}
        return [self.row("zero-shot", zeroshot, "reference"),
                self.row("experts", self.expert_accuracy, "reference")]

    def realism(self) -> dict | None:
        """The built-in benchmark's realism targets; None for real checkpoint pools."""
        if not isinstance(self.pool, Zoo):
            return None
        return realism(self.zoo, self.tasks, self.pretrained, self.experts, self.score)
