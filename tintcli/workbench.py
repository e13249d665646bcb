"""The run's workbench: the pool's checkpoints, the heads and the test data, loaded once for
every recipe (`tint merge`, `tint bench`, `tint zoo`) and for Python callers. It is the core
object the commands share, so it lives beside the pools and the evaluation, not among them."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch import nn

from tintcli.adaptation import AdaptationContext
from tintcli.benchmark import realism
from tintcli.cache import ensure_json
from tintcli.encoders import build_encoder, resolve_device
from tintcli.evaluation import evaluate_state, evaluate_tasks, summarize
from tintcli.io import StateDict, fingerprint
from tintcli.merged import Merged
from tintcli.paths import cache_dir
from tintcli.pools import Pool, check_experts_beat_zero_shot, load_pool
from tintcli.runtime import PRECISIONS, Runtime, runtime_options
from tintcli.tasks import TaskSplit, check_image_size, load_split, task_names
from tintcli.zoo import Zoo


@dataclass
class Workbench:
    """The pretrained encoder, the experts, the heads and the test (and, on demand, validation)
    splits of one task set, from one model pool, with each task's zero-shot and expert
    reference accuracies, and the runtime (device, precision) every forward uses."""

    tasks: list[str]
    pool: Pool
    pretrained: StateDict
    experts: dict[str, StateDict]
    heads: dict[str, nn.Module]
    splits: dict[str, dict[str, TaskSplit]]  # split -> task -> pixels; "test" always loaded
    encoder: nn.Module
    runtime: Runtime
    references: dict[str, tuple[float, float]]  # task -> (zero-shot, expert) accuracy
    data_digests: dict[str, dict[str, str]]
    cfg: DictConfig | None = None

    @classmethod
    def load(cls, cfg: DictConfig, console: Console,
             checked_tasks: list[str] | None = None) -> Workbench:
        """``checked_tasks``: the task names a recipe already read and checked against the
        encoder's image size, so that neither is done twice. (The encoder is built here, after
        the recipe seeded torch, whose generator its initialisation draws from, as always.)"""
        device = resolve_device(cfg.device)
        runtime = Runtime.create(device, cfg.encoder, **runtime_options(cfg))
        encoder = build_encoder(cfg.encoder)
        tasks = checked_tasks
        if tasks is None:
            tasks = task_names(cfg.tasks)
            check_image_size(encoder, cfg.tasks, cfg.encoder)
        pool = load_pool(cfg, tasks, encoder, device, console)
        test = pool.test_splits() or {
            t: load_split(cfg.tasks, cfg.encoder, t, "test", console) for t in tasks}
        with console.status(f"loading the {pool.kind} pool's checkpoints"):
            pretrained = pool.pretrained()
            experts = {t: pool.expert(t, pretrained) for t in tasks}
            heads = {t: pool.head(t) for t in tasks}
        if runtime.keeps_resident(sum(s.images.numel() for s in test.values())):
            with console.status(f"copying the test pixels to {device}"):
                test = {t: replace(s, images=s.images.to(device)) for t, s in test.items()}
        # the data the pool measured its accuracies on (the zoo: these very splits), else
        # the test data, on which the workbench measures them
        digests = pool.data_digests() or {t: {"test": test[t].digest} for t in tasks}
        bench = cls(tasks, pool, pretrained, experts, heads, {"test": test}, encoder.to(device),
                    runtime, {}, digests, cfg)
        measured = pool.reference_accuracies()
        bench.references = measured or bench.measure_references(cfg)
        if measured is None:  # measured here: check the pool's task -> checkpoint map
            # (a pool that brings its own, the zoo, built its experts from its own map)
            check_experts_beat_zero_shot(bench.references, pool.kind,
                                         bool(cfg.pool.get("check_experts", True)), console)
        return bench

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def test_data(self) -> dict[str, TaskSplit]:
        return self.splits["test"]

    def split(self, name: str) -> dict[str, TaskSplit]:
        """A split of every task (validation is carved from train and cached on first use)."""
        if name not in self.splits:
            self.splits[name] = {t: load_split(self.cfg.tasks, self.cfg.encoder, t, name)
                                 for t in self.tasks}
        return self.splits[name]

    def data_record(self) -> dict:
        """Per split and task: where the pixels came from and their digest (results.json)."""
        return {split: {t: {**d.source, "digest": d.digest} for t, d in data.items()}
                for split, data in self.splits.items()}

    def measure_references(self, cfg: DictConfig) -> dict[str, tuple[float, float]]:
        """Zero-shot and expert accuracy per task, cached by the digests of the checkpoints
        and the test data and by what else decides them (the pool's settings, the encoder,
        device type, torch)."""
        key = {"checkpoints": self.pool.checkpoint_hashes(), "data": self.data_digests,
               "pool": {k: v for k, v in OmegaConf.to_container(cfg.pool, resolve=True).items()
                        if k != "check_experts"},  # e.g. head templates; not what it guards
               "encoder": OmegaConf.to_container(cfg.encoder, resolve=True),
               "device": self.device.type, "precision": self.runtime.precision,
               "torch": torch.__version__}

        def measure() -> dict[str, list[float]]:
            zeroshot = self.score(self.pretrained)
            return {t: [zeroshot[t], self.score(self.experts[t], tasks=[t])[t]]
                    for t in self.tasks}

        value = ensure_json(cache_dir() / "references" / fingerprint(key), key, measure,
                            "the zero-shot and expert accuracies")
        return {t: (value[t][0], value[t][1]) for t in self.tasks}

    @property
    def expert_accuracy(self) -> dict[str, float]:
        return {t: self.references[t][1] for t in self.tasks}

    def _data(self, split: str, tasks: list[str] | None = None) -> dict:
        data = self.split(split)
        return {t: (data[t].images, data[t].labels) for t in tasks or self.tasks}

    def score(self, state: StateDict, split: str = "test",
              tasks: list[str] | None = None) -> dict[str, float]:
        """Per-task top-1 accuracy of an encoder state with each task's head."""
        return evaluate_state(self.encoder, state, self.heads, self._data(split, tasks),
                              self.runtime)

    def score_merged(self, merged: Merged, split: str = "test") -> dict[str, float]:
        """Per-task accuracy of any method's outcome: task t's encoder state (the shared one,
        or its own) with task t's head (its own where the method made one)."""
        heads = {t: merged.head(t, self.heads[t]) for t in self.tasks}
        if merged.model is not None:  # a routed encoder (WEMoE): it runs as it is
            model = merged.model.to(self.device)
            try:
                return evaluate_tasks(model, None, heads, self._data(split), self.runtime)
            finally:
                merged.model.cpu()
        return evaluate_tasks(self.encoder, merged.task_state, heads, self._data(split),
                              self.runtime)

    def expert_accuracy_on(self, split: str) -> dict[str, float]:
        """Each expert's accuracy on its own task's ``split`` (test: the cached references),
        what methods that choose by normalised accuracy divide by on validation."""
        if split == "test":
            return self.expert_accuracy
        return {t: self.score(self.experts[t], split, [t])[t] for t in self.tasks}

    @property
    def pixels_resident(self) -> bool:
        """Whether the test pixels live on the device (``runtime.resident_pixels``)."""
        return all(s.images.device == self.device for s in self.test_data.values()) \
            and self.device.type == "cuda"

    def adaptation_context(self, seed: int) -> AdaptationContext:
        """Test-time adaptation uses each task's unlabeled test images, as in the papers:
        uint8, where the test pixels are (on the device when ``runtime.resident_pixels`` put
        them there: one copy serves evaluation and adaptation)."""
        images = {t: self.test_data[t].images for t in self.tasks}
        dtype = str(self.cfg.get("vectors_dtype", "fp32")) if self.cfg is not None else "fp32"
        labels = {t: self.test_data[t].labels for t in self.tasks}  # for an oracle alone
        return AdaptationContext(self.encoder, self.heads, images, self.runtime, seed,
                                 vectors_dtype=PRECISIONS[dtype], labels=labels)

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
        validation = {t: d.digest for t, d in self.split("val").items()}
        return realism(self.pool, self.tasks, self.pretrained, self.experts,
                       lambda state, split: self.score(state, split), validation,
                       {"device": self.device.type, "precision": self.runtime.precision,
                        "torch": torch.__version__})

