"""The model zoo: a pretrained encoder, per-task zero-shot heads and fine-tuned experts.

This is the one place that maps tasks to checkpoints and validates them: an expert is
handed out only after its digest, keys, shapes and values check out. For the built-in
benchmark tint builds the zoo itself:

1. pretrain the encoder on a mixture of every synthetic family with noisy captions (class
   labels, a fraction replaced at random), the analogue of web-scale image-text pretraining,
   and, CLIP-style, learned caption embeddings whose rows become the zero-shot heads;
2. cut each task's zero-shot head from those caption embeddings;
3. fine-tune one expert per task from the pretrained encoder with that head frozen.

Each piece is a cache entry (``tintcli/cache.py``): ``pretrained/`` is keyed by the encoder
config, and each task's ``tasks/<task>-<fingerprint>/`` by its own recipe plus the sha256s
of what it was built from (the pretrained encoder, the caption embeddings, the task's train
and test data). So changing a config rebuilds exactly what it decides, a subset of tasks
reuses what was built for the full set, and a damaged or stale piece is rebuilt, never used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import Progress

from tintcli import cache
from tintcli.encoders import build_encoder
from tintcli.errors import TintError
from tintcli.evaluation import accuracy
from tintcli.heads import CaptionEmbeddings, ZeroShotHead
from tintcli.io import (
    StateDict,
    check_finite_weights,
    check_same_layout,
    fingerprint,
    load_state_dict,
    save_state_dict,
)
from tintcli.paths import cache_dir
from tintcli.report import progress_bar
from tintcli.runtime import Runtime
from tintcli.tasks.generated import GENERATOR_VERSION, load_synthetic, synthetic_entry
from tintcli.tasks.synthetic import SYNTH_FAMILIES
from tintcli.training import train_classifier

ZOO_FORMAT = 3


@dataclass(frozen=True)
class TaskEntry:
    """One task's checkpoints in the zoo and their reference accuracies on its test split."""

    task: str
    head_file: Path
    head_sha256: str
    expert_file: Path
    expert_sha256: str
    zeroshot_accuracy: float
    expert_accuracy: float


@dataclass(frozen=True)
class Zoo:
    """The ``synth`` pool (``tintcli/pools.py``: ``Pool``), with the accuracies measured when
    each entry was built."""

    kind = "synth"  # (not a field)
    # tint's CLIP encoder is OpenAI's visual tower: the methods' authors see it as open_clip
    # stores it (``tintcli.checkpoints.convert.STORED_TRANSPOSED``)
    source_format = "open_clip"
    encoder_cfg: DictConfig
    root: Path
    pretrained_file: Path
    pretrained_sha256: str
    entries: dict[str, TaskEntry]
    test_data: dict[str, str]  # each task's test-split digest: what the accuracies were on

    @property
    def tasks(self) -> list[str]:
        return list(self.entries)

    def entry(self, task: str) -> TaskEntry:
        if task not in self.entries:
            raise TintError(f"no expert for task '{task}' in the zoo of encoder "
                            f"'{self.encoder_cfg.name}'; it has: {', '.join(self.entries)}")
        return self.entries[task]

    def pretrained(self) -> StateDict:
        return load_state_dict(self.pretrained_file, "the pretrained encoder",
                               self.pretrained_sha256)

    def expert(self, task: str, pretrained: StateDict | None = None) -> StateDict:
        entry = self.entry(task)
        state = load_state_dict(entry.expert_file, f"expert '{task}'", entry.expert_sha256)
        check_same_layout(pretrained or self.pretrained(), state, f"expert '{task}'")
        check_finite_weights(state, f"the expert for task '{task}'")
        return state

    def head(self, task: str) -> ZeroShotHead:
        entry = self.entry(task)
        return ZeroShotHead.from_state_dict(
            load_state_dict(entry.head_file, f"head '{task}'", entry.head_sha256))

    def checkpoint_hashes(self) -> dict:
        return {
            "pretrained": self.pretrained_sha256,
            "experts": {t: e.expert_sha256 for t, e in self.entries.items()},
            "heads": {t: e.head_sha256 for t, e in self.entries.items()},
        }

    def reference_accuracies(self) -> dict[str, tuple[float, float]]:
        """(zero-shot, expert) accuracy per task, measured when each entry was built."""
        return {t: (e.zeroshot_accuracy, e.expert_accuracy) for t, e in self.entries.items()}

    def data_digests(self) -> dict:
        return {t: {"test": digest} for t, digest in self.test_data.items()}

    def test_splits(self) -> None:
        return None  # the task set's (synth8's, generated and cached by the task set)


# --------------------------------------------------------------------------- keys


def _plain(cfg) -> object:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


NOISE_SETTINGS = ("pretrain.caption_noise", "text_noise")  # per-family fractions under zoo


def _family_value(encoder_cfg: DictConfig, name: str, family: str) -> float:
    """The family's value of the per-family setting ``encoder.zoo.<name>``: one number, or
    {default: x, <family>: y, ...} (default 0). Each must be a fraction in [0, 1]."""
    setting = OmegaConf.select(encoder_cfg.zoo, name, default=0.0)
    if OmegaConf.is_dict(setting):
        raw = setting.get(family, setting.get("default", 0.0))
    else:
        raw = setting
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = None
    if value is None or not 0.0 <= value <= 1.0:
        raise TintError(f"encoder.zoo.{name} for '{family}' is {raw}; it must be a number in "
                        "[0, 1], as one value or {default: x, <task>: y}")
    return value


def _check_fractions(encoder_cfg: DictConfig) -> None:
    """Say which noise level is not a fraction before any work."""
    for name in NOISE_SETTINGS:
        for family in SYNTH_FAMILIES:
            _family_value(encoder_cfg, name, family)


def pretrain_key(encoder_cfg: DictConfig) -> dict:
    """Everything that decides the pretrained encoder."""
    return {
        "format": ZOO_FORMAT, "generator": GENERATOR_VERSION,
        "timm_model": encoder_cfg.timm_model, "timm_kwargs": _plain(encoder_cfg.timm_kwargs),
        "mean": _plain(encoder_cfg.mean), "std": _plain(encoder_cfg.std),
        "seed": encoder_cfg.zoo.seed, "pretrain": _plain(encoder_cfg.zoo.pretrain),
    }


def task_key(encoder_cfg: DictConfig, tasks_cfg: DictConfig, task: str) -> dict:
    """Everything in the config that decides one task's head, expert and reference
    accuracies (it names the task's folder; the entry's key adds its inputs' digests)."""
    return {
        "pretrained": fingerprint(pretrain_key(encoder_cfg)), "task": task,
        "image_size": tasks_cfg.image_size, "seed": tasks_cfg.seed,
        "train_size": tasks_cfg.train_size, "test_size": tasks_cfg.test_size,
        "logit_scale": encoder_cfg.logit_scale,
        "finetune": _plain(encoder_cfg.zoo.finetune),
        "text_noise": _family_value(encoder_cfg, "text_noise", task),
    }


def zoo_root(encoder_cfg: DictConfig) -> Path:
    return cache_dir() / "zoo" / f"{encoder_cfg.name}-{fingerprint(pretrain_key(encoder_cfg))}"


# --------------------------------------------------------------------------- building


def _check_sizes(encoder_cfg: DictConfig, tasks_cfg: DictConfig) -> None:
    img = encoder_cfg.timm_kwargs.get("img_size")
    if img is not None and int(img) != int(tasks_cfg.image_size):
        raise TintError(f"encoder '{encoder_cfg.name}' takes {img}px images but task set "
                        f"'{tasks_cfg.name}' has {tasks_cfg.image_size}px ones\n"
                        "Pick a matching encoder or set tasks.image_size.")


def _train_inputs(images: torch.Tensor, encoder_cfg: DictConfig) -> torch.Tensor:
    """The encoder's float inputs to train on, normalised as every forward's (Runtime.inputs),
    on the CPU (training moves each batch to the device). Laid out channels-last, as the zoo
    has always trained on: on CUDA the layout picks the conv kernels, so another layout could
    change the last bits of the weights a rebuilt zoo gets."""
    runtime = Runtime.create(torch.device("cpu"), encoder_cfg, "fp32")
    return runtime.inputs(images).contiguous(memory_format=torch.channels_last)


def _train_with_bar(progress: Progress, label: str, steps: int, **kwargs) -> list[float]:
    bar = progress.add_task(label, total=steps, info="")

    def on_step(step: int, loss: float) -> None:
        progress.update(bar, advance=1, info=f"loss {loss:.3f}")

    return train_classifier(steps=steps, on_step=on_step, **kwargs)


def _pretrain(encoder_cfg: DictConfig, folder: Path, device: torch.device,
              progress: Progress) -> dict:
    """CLIP-style pretraining on every family's 'pretrain' split against learned caption
    embeddings, with a fraction of captions replaced by a random class of the same family
    (noisy web captions: what keeps zero-shot accuracy modest). Saves the encoder and the
    caption embeddings, from which every task's zero-shot head is cut."""
    zoo_cfg, recipe = encoder_cfg.zoo, encoder_cfg.zoo.pretrain
    size = int(encoder_cfg.timm_kwargs.img_size)
    g = torch.Generator().manual_seed(zoo_cfg.seed)
    inputs, labels, offsets, offset = [], [], {}, 0
    for family in SYNTH_FAMILIES:
        split = load_synthetic(family, "pretrain", recipe.images_per_family, size, zoo_cfg.seed)
        noise = _family_value(encoder_cfg, "pretrain.caption_noise", family)
        noisy = torch.rand(len(split), generator=g) < noise
        random_labels = torch.randint(split.num_classes, (len(split),), generator=g)
        inputs.append(_train_inputs(split.images, encoder_cfg))
        labels.append(offset + torch.where(noisy, random_labels, split.labels))
        offsets[family] = [offset, split.num_classes]
        offset += split.num_classes
    torch.manual_seed(zoo_cfg.seed)
    encoder = build_encoder(encoder_cfg).to(device)
    captions = CaptionEmbeddings(offset, encoder.num_features).to(device)
    losses = _train_with_bar(
        progress, "pretraining encoder", recipe.steps, encoder=encoder, head=captions,
        inputs=torch.cat(inputs), labels=torch.cat(labels), batch_size=recipe.batch_size,
        lr=recipe.lr, weight_decay=recipe.weight_decay, device=device, seed=zoo_cfg.seed)
    save_state_dict(encoder.state_dict(), folder / "pretrained.safetensors")
    save_state_dict(captions.state_dict(), folder / "captions.safetensors")
    return {"caption_offsets": offsets, "final_loss": losses[-1] if losses else None}


def _build_task(encoder_cfg: DictConfig, tasks_cfg: DictConfig, task: str, folder: Path,
                pretrained: StateDict, head: ZeroShotHead, device: torch.device,
                progress: Progress) -> dict:
    """Score the zero-shot head, fine-tune the expert with the head frozen, score it, save."""
    recipe = encoder_cfg.zoo.finetune
    size, seed = int(tasks_cfg.image_size), int(tasks_cfg.seed)
    train = load_synthetic(task, "train", tasks_cfg.train_size, size, seed)
    test = load_synthetic(task, "test", tasks_cfg.test_size, size, seed)
    train_x = _train_inputs(train.images, encoder_cfg)
    runtime = Runtime.create(device, encoder_cfg, "fp32")  # the zoo's references are exact

    encoder = build_encoder(encoder_cfg).to(device)
    encoder.load_state_dict(pretrained)
    head = head.to(device).requires_grad_(False)
    zeroshot_acc = accuracy(encoder, head, test.images, test.labels, runtime)
    _train_with_bar(progress, f"fine-tuning expert {task}", recipe.steps, encoder=encoder,
                    head=head, inputs=train_x, labels=train.labels,
                    batch_size=recipe.batch_size, lr=recipe.lr,
                    weight_decay=recipe.weight_decay, layer_decay=recipe.get("layer_decay"),
                    device=device, seed=seed)
    expert_acc = accuracy(encoder, head, test.images, test.labels, runtime)
    save_state_dict(head.state_dict(), folder / "head.safetensors")
    save_state_dict(encoder.state_dict(), folder / "expert.safetensors")
    return {"zeroshot_accuracy": zeroshot_acc, "expert_accuracy": expert_acc}


def _zeroshot_head(pretrained: cache.Entry, task: str, encoder_cfg: DictConfig) -> ZeroShotHead:
    """The task's rows of the pretrained caption embeddings, as a frozen zero-shot head.

    ``zoo.text_noise`` = rho turns each unit caption embedding e into sqrt(1 - rho^2) e + rho z,
    z a random unit direction orthogonal to e (so the head row is at cosine sqrt(1 - rho^2)
    from its caption): the stand-in for how badly CLIP's text tower grounds a task's class
    names. It lowers zero-shot accuracy without touching the image features, which is what
    CLIP looks like (zero-shot 48% on the eight tasks, linear probes far higher)."""
    captions = load_state_dict(pretrained.file("captions.safetensors"), "the caption embeddings",
                               pretrained.sha256("captions.safetensors"))["embeddings"]
    start, count = pretrained.manifest["caption_offsets"][task]
    rows = F.normalize(captions[start: start + count].float(), dim=-1)
    rho = _family_value(encoder_cfg, "text_noise", task)
    if rho > 0:
        g = torch.Generator().manual_seed(int(encoder_cfg.zoo.seed) * 1000 + start)
        noise = torch.randn(rows.shape, generator=g)
        noise = F.normalize(noise - (noise * rows).sum(-1, keepdim=True) * rows, dim=-1)
        rows = (1 - rho**2) ** 0.5 * rows + rho * noise
    return ZeroShotHead.from_embeddings(rows, float(encoder_cfg.logit_scale))


def ensure_zoo(encoder_cfg: DictConfig, tasks_cfg: DictConfig, tasks: list[str],
               device: torch.device, console: Console | None = None) -> Zoo:
    """The zoo for these tasks, building whatever is missing, stale or damaged."""
    console = console or Console()
    if encoder_cfg.get("zoo") is None:
        raise TintError(f"encoder '{encoder_cfg.name}' has no zoo recipe; tint can build "
                        "only its own synthetic zoo (encoder=synth_vit)")
    if tasks_cfg.source != "synthetic":
        raise TintError(f"tint builds zoos only for synthetic tasks, not '{tasks_cfg.source}'")
    _check_sizes(encoder_cfg, tasks_cfg)
    _check_fractions(encoder_cfg)
    build_encoder(encoder_cfg)  # a bad encoder config fails here, before any data or training
    root = zoo_root(encoder_cfg)
    name = encoder_cfg.name
    announced = False

    def announce(what: str, folder: Path) -> None:
        nonlocal announced
        if not announced:
            if cache.kept(folder):
                console.print(f"[bold]Building the {name} zoo[/] in {root} ({what}); it is "
                              "cached for later runs.")
            else:
                console.print(f"[bold]Building the {name} zoo[/] ({what}) in a temporary "
                              "folder, for this run only.")
            announced = True

    with progress_bar(console) as progress:
        def build_pretrained(folder: Path) -> dict:
            announce(f"pretrained encoder + {len(tasks)} expert(s)", folder)
            return _pretrain(encoder_cfg, folder, device, progress)

        # training on another device type or torch gives other weights: part of every key
        built_on = {"device": device.type, "torch": torch.__version__}
        pre = cache.ensure(root / "pretrained", {**pretrain_key(encoder_cfg), "built_on": built_on},
                           build_pretrained, f"the {name} pretrained encoder", console)
        inputs = {"pretrained": pre.sha256("pretrained.safetensors"),
                  "captions": pre.sha256("captions.safetensors"), "built_on": built_on}
        size, seed = int(tasks_cfg.image_size), int(tasks_cfg.seed)
        keys, test_data = {}, {}
        for task in tasks:
            train = synthetic_entry(task, "train", tasks_cfg.train_size, size, seed)
            test = synthetic_entry(task, "test", tasks_cfg.test_size, size, seed)
            test_data[task] = test.digest
            keys[task] = {**task_key(encoder_cfg, tasks_cfg, task), "inputs": {
                **inputs, "train_data": train.digest, "test_data": test.digest}}
        folders = {t: root / "tasks" / f"{t}-{fingerprint(task_key(encoder_cfg, tasks_cfg, t))}"
                   for t in tasks}
        pretrained: StateDict | None = None
        entries = {}
        for task in tasks:
            def build_task(folder: Path, task: str = task) -> dict:
                nonlocal pretrained
                # said only by a process that really builds (others wait on its locks)
                announce(f"{sum(cache.check(folders[t], keys[t])[0] is None for t in tasks)}"
                         " expert(s)", folder)
                if pretrained is None:  # checked against its digest: never train from damage
                    pretrained = load_state_dict(pre.file("pretrained.safetensors"),
                                                 "the pretrained encoder", inputs["pretrained"])
                return _build_task(encoder_cfg, tasks_cfg, task, folder, pretrained,
                                   _zeroshot_head(pre, task, encoder_cfg), device, progress)

            entry = cache.ensure(folders[task], keys[task], build_task, f"the expert for '{task}'",
                                 console)
            m = entry.manifest
            entries[task] = TaskEntry(
                task, entry.file("head.safetensors"), entry.sha256("head.safetensors"),
                entry.file("expert.safetensors"), entry.sha256("expert.safetensors"),
                m["zeroshot_accuracy"], m["expert_accuracy"])
    return Zoo(encoder_cfg, root, pre.file("pretrained.safetensors"),
               inputs["pretrained"], entries, test_data)
