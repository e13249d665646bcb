"""Model pools: the one object that hands out, per task, the pretrained encoder state, the
task's expert and the task's zero-shot head, all in tint's encoder layout, and validates them.

Kinds (config group ``pool``):

- ``synth``: the built-in zoo (``tintcli/zoo.py``), built and cached by tint itself;
- ``task_vectors``: a folder as the task_vectors / AdaMerging / Model Tinting releases lay it
  out: ``zeroshot.pt``, ``<Task>/finetuned.pt``, ``head_<Task>.pt`` (whole pickled modules,
  read without running their code: ``tintcli/checkpoints/pickles.py``);
- ``hf``: Hugging Face CLIP checkpoints (FusionBench's): a base ``CLIPModel`` and one
  fine-tuned ``CLIPVisionModel`` per task, as hub ids or local ``save_pretrained`` folders;
- ``local``: tint's own safetensors layout (``pretrained.safetensors``,
  ``experts/<task>.safetensors``, ``heads/<task>.safetensors``);
- ``stand_in``: random weights and generated pixels at real size, for ``tint bench`` alone
  (``tintcli/stand_in.py``).

The task -> checkpoint table is checked before any merging: a task without a checkpoint, or a
checkpoint whose keys or shapes do not match the encoder, fails naming the task and the file;
so does a head whose class count is not its task's (once loaded, before any evaluation).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape
from torch import nn

from tintcli.errors import TintError
from tintcli.heads import ZeroShotHead
from tintcli.io import (
    StateDict,
    check_finite_weights,
    check_same_layout,
    encoder_entries,
    file_sha256,
    load_state_dict,
)
from tintcli.tasks import TaskSplit, num_classes
from tintcli.tasks.synthetic import SYNTH_FAMILIES


class Pool(Protocol):
    """What every pool kind hands out: ``FilePool`` (the checkpoint pools) and the built-in
    zoo (``tintcli.zoo.Zoo``). Experts and heads are checked when handed out."""

    kind: str
    pretrained_file: Path
    # the checkpoint format the pool's weights come from (``open_clip``, ``hf``): how it
    # orients each matrix, which methods that are not transpose-equivariant follow
    # (``tintcli.checkpoints.convert.STORED_TRANSPOSED``)
    source_format: str

    def pretrained(self) -> StateDict: ...

    def expert(self, task: str, pretrained: StateDict | None = None) -> StateDict: ...

    def head(self, task: str) -> ZeroShotHead: ...

    def checkpoint_hashes(self) -> dict: ...

    def reference_accuracies(self) -> dict[str, tuple[float, float]] | None:
        """(zero-shot, expert) accuracy per task where the pool measured them itself, on the
        test data ``data_digests`` names; None: the workbench measures them (and checks
        that each expert beats zero-shot, which catches a wrong task -> checkpoint map)."""

    def data_digests(self) -> dict[str, dict[str, str]] | None:
        """Per task, the digests of the data its reference accuracies were measured on; None
        where it measured none (the test data the run loads is then what they are on)."""

    def test_splits(self) -> dict[str, TaskSplit] | None:
        """The pool's own test data (the stand-in's, generated); None: the task set's."""


def load_pool(cfg: DictConfig, tasks: list[str], encoder: nn.Module, device: torch.device,
              console: Console | None = None) -> Pool:
    """The run's pool, whatever its kind (``cfg.pool.kind``; without a pool group, as in
    ``tint zoo``'s config, ``synth``): the zoo is built for these tasks, or found cached; a
    checkpoint pool is opened, its task table checked before any data or weights are read."""
    kind = cfg.pool.kind if "pool" in cfg else "synth"
    if kind == "synth":
        from tintcli.zoo import ensure_zoo

        return ensure_zoo(cfg.encoder, cfg.tasks, tasks, device, console)
    if kind == "stand_in":  # tint bench's made-up pool at real size
        from tintcli.stand_in import open_stand_in

        return open_stand_in(cfg, tasks)
    return open_pool(cfg.pool, tasks, encoder, cfg.encoder.name, cfg.tasks)


@dataclass
class FilePool:
    """A pool whose checkpoints are files: each read through ``load`` (a format's reader
    and converter), checked against the encoder, and digested (memoised) for the record."""

    kind: str
    tasks: list[str]
    encoder: nn.Module
    pretrained_file: Path
    expert_files: dict[str, Path]
    head_files: dict[str, Path]
    load_encoder: Callable[[Path, str], StateDict]
    load_head: Callable[[Path, str], ZeroShotHead]  # (file, task) -> head
    encoder_name: str = "?"
    available: Callable[[], list[str]] | None = None  # the pool's own task names, if listable
    heads_from_names: bool = False  # built from class names (hf's text tower), not read
    # task -> its class count, where the task set knows the task (set by open_pool)
    num_classes: dict[str, int] = field(default_factory=dict)
    classes_are: str = "class names"  # what the count counts, for the error
    source_format: str = "open_clip"  # the format the files came from (Pool.source_format)
    _pretrained: StateDict | None = field(default=None, repr=False)

    def validate(self) -> None:
        """Every task has its files (named with the path searched), before any loading; a task
        set the pool does not cover fails naming the tasks it lacks and those it has."""
        lacking = [t for t in self.tasks if not self.expert_files[t].exists()]
        if lacking and self.available is not None:
            has = sorted(self.available())
            more = f" and {len(lacking) - 1} more" if len(lacking) > 1 else ""
            raise TintError(f"the task set and the {self.kind} pool do not cover the same "
                            f"tasks: no expert for {', '.join(lacking)} "
                            f"({self.expert_files[lacking[0]]}{more} does not exist)\n"
                            f"The pool has: {', '.join(has) or 'nothing'}. Pick a task set "
                            "within it (tasks.names=[...]) or check the pool's folder names "
                            "(pool.dirs).")
        missing = [("the pretrained encoder", self.pretrained_file)] if not \
            self.pretrained_file.exists() else []
        for task in self.tasks:
            for what, files in (("expert", self.expert_files), ("head", self.head_files)):
                if not files[task].exists():
                    missing.append((f"the {what} for task '{task}'", files[task]))
        if missing:
            what, path = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise TintError(f"{self.kind} pool: no checkpoint for {what}: {path} does not "
                            f"exist{more}\nCheck pool.path and the task -> folder names "
                            "(pool.dirs).")

    def pretrained(self) -> StateDict:
        if self._pretrained is None:
            state = self.load_encoder(self.pretrained_file, "the pretrained encoder")
            check_same_layout(self.encoder.state_dict(), encoder_entries(state),
                              f"the pretrained encoder ({self.pretrained_file})",
                              f"encoder={self.encoder_name} (check encoder.timm_kwargs)")
            self._pretrained = state
        return self._pretrained

    def expert(self, task: str, pretrained: StateDict | None = None) -> StateDict:
        path = self.expert_files[task]
        state = self.load_encoder(path, f"the expert for task '{task}'")
        check_same_layout(pretrained or self.pretrained(), state,
                          f"the expert for task '{task}' ({path})")
        check_finite_weights(state, f"the expert for task '{task}' ({path})")
        return state

    def head(self, task: str) -> ZeroShotHead:
        head = self.load_head(self.head_files[task], task)
        if task in self.num_classes:
            check_head_classes(head, task, self.num_classes[task], self.head_files[task],
                               self.classes_are)
        return head

    def checkpoint_hashes(self) -> dict:
        return {"pretrained": file_sha256(self.pretrained_file),
                "experts": {t: file_sha256(p) for t, p in self.expert_files.items()},
                "heads": {t: file_sha256(p) for t, p in self.head_files.items()}}

    def reference_accuracies(self) -> None:
        return None  # measured by the workbench on the task data (and cached)

    def data_digests(self) -> None:
        return None  # the references are measured on the test data the run loads

    def test_splits(self) -> None:
        return None  # the task set's


# ------------------------------------------------------------------------- the formats


def _checkpoint_name(tasks_cfg: DictConfig | None, task: str, kind: str) -> str:
    """The name a release gives the task's checkpoint (conf/task/<task>.yaml: checkpoints)."""
    if tasks_cfg is not None and task in (tasks_cfg.get("data") or {}):
        return str((tasks_cfg.data[task].get("checkpoints") or {}).get(kind, task))
    return task


def _task_vectors(cfg: DictConfig, tasks: list[str], encoder: nn.Module,
                  tasks_cfg: DictConfig | None = None) -> FilePool:
    from tintcli.checkpoints.convert import from_open_clip, text_leftovers
    from tintcli.checkpoints.pickles import load_pickled, module_state_dict

    root = _folder(cfg.path, "pool.path", "the task_vectors release folder")
    dirs = {t: str((cfg.get("dirs") or {}).get(t, _checkpoint_name(tasks_cfg, t, "task_vectors")))
            for t in tasks}
    scope = cfg.get("ties_scope", "full")
    if scope not in ("full", "vision"):
        raise TintError(f"pool.ties_scope={scope} must be full or vision")

    def load_encoder(path: Path, what: str) -> StateDict:
        state = module_state_dict(load_pickled(path, what))
        extras = text_leftovers(state) if scope == "full" else {}
        return {**from_open_clip(state, encoder), **extras}

    def load_head(path: Path, task: str) -> ZeroShotHead:
        record = load_pickled(path, f"the head for task '{task}'")
        return ZeroShotHead.from_state_dict(dict(module_state_dict(record)))

    return FilePool("task_vectors", tasks, encoder, root / "zeroshot.pt",
                    {t: root / dirs[t] / "finetuned.pt" for t in tasks},
                    {t: root / f"head_{dirs[t]}.pt" for t in tasks}, load_encoder, load_head,
                    available=lambda: [p.parent.name for p in root.glob("*/finetuned.pt")],
                    source_format="open_clip")


def _local(cfg: DictConfig, tasks: list[str], encoder: nn.Module,
           tasks_cfg: DictConfig | None = None) -> FilePool:
    root = _folder(cfg.path, "pool.path", "the local pool folder")

    return FilePool("local", tasks, encoder, root / "pretrained.safetensors",
                    {t: root / "experts" / f"{t}.safetensors" for t in tasks},
                    {t: root / "heads" / f"{t}.safetensors" for t in tasks},
                    lambda path, what: load_state_dict(path, what), _safetensors_head,
                    available=lambda: [p.stem for p in (root / "experts").glob("*.safetensors")],
                    source_format=_converted_from(root))


def _converted_from(root: Path) -> str:
    """The source format of a local pool: that of the pool ``tint convert`` read, as its
    ``pool.json`` records it; a folder written otherwise is taken as tint's own (open_clip's)."""
    import json

    from tintcli.checkpoints.convert import SOURCE_FORMATS

    try:
        record = json.loads((root / "pool.json").read_text())
        found = record.get("source_format") or (
            "hf" if record["converted_from"]["kind"] == "hf" else "open_clip")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "open_clip"
    return found if found in SOURCE_FORMATS else "open_clip"


def _hf(cfg: DictConfig, tasks: list[str], encoder: nn.Module,
        tasks_cfg: DictConfig | None = None) -> FilePool:
    from tintcli.checkpoints.convert import from_hf_clip

    for key in ("base", "experts"):
        if not cfg.get(key):
            raise TintError(f"pool.{key} is not set, and the encoder names no hub checkpoints "
                            "(encoder.hub)\nSet pool.base and pool.experts (hub ids or "
                            "save_pretrained folders), or use encoder=clip_vit_b32|b16|l14.")
    base = _hf_weights(str(cfg.base), "pool.base")
    experts = {t: _hf_weights(str(cfg.experts).format(task=_checkpoint_name(tasks_cfg, t, "hf")),
                              f"the expert for '{t}'") for t in tasks}
    projection: dict[str, torch.Tensor] = {}

    def load_encoder(path: Path, what: str) -> StateDict:
        state = _read_hf(path, what)
        if not projection:
            projection["weight"] = _read_hf(base, "the base CLIP model")[
                "visual_projection.weight"]
        return from_hf_clip(state, projection["weight"])

    if cfg.get("heads"):  # a folder of <task>.safetensors heads (what tint convert writes)
        heads_dir = _folder(cfg.heads, "pool.heads", "the zero-shot heads folder")
        head_files = {t: heads_dir / f"{t}.safetensors" for t in tasks}
        load_head = _safetensors_head
    else:  # from the base model's text tower, with each task's class names and templates
        data = (tasks_cfg.get("data") if tasks_cfg is not None else None) or {}
        classnames = {t: (cfg.get("classnames") or {}).get(t) or data.get(t, {}).get("classnames")
                      for t in tasks}
        templates = {t: (cfg.get("templates") or {}).get(t) or data.get(t, {}).get("templates")
                     for t in tasks}
        lacking = [t for t in tasks if not classnames.get(t) or not templates.get(t)]
        if lacking:
            raise TintError(f"hf pool: no zero-shot heads for {', '.join(lacking)}: give "
                            "pool.classnames and pool.templates per task (the text tower "
                            "embeds them; a conf/task/ YAML has them), or "
                            "pool.heads=<folder of <task>.safetensors>")
        text = _TextTower(base.parent)
        head_files = {t: base for t in tasks}  # the heads' digests are the base model's

        def load_head(path: Path, task: str) -> ZeroShotHead:
            return text.head(list(classnames[task]), list(templates[task]))

    return FilePool("hf", tasks, encoder, base, experts, head_files, load_encoder, load_head,
                    heads_from_names=not cfg.get("heads"), source_format="hf")


class _TextTower:
    """The base CLIPModel and its tokenizer, loaded once, only when a head is asked for."""

    def __init__(self, folder: Path):
        self.folder, self.model, self.tokenizer = folder, None, None

    def head(self, classnames: list[str], templates: list[str]) -> ZeroShotHead:
        from tintcli.heads import text_tower_head

        if self.model is None:
            import transformers

            self.model = transformers.CLIPModel.from_pretrained(self.folder).eval()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.folder)
        return text_tower_head(self.model, self.tokenizer, classnames, templates)


def _safetensors_head(path: Path, task: str) -> ZeroShotHead:
    return ZeroShotHead.from_state_dict(load_state_dict(path, f"the head for task '{task}'"))


def _read_hf(path: Path, what: str) -> StateDict:
    if path.suffix == ".bin":  # pytorch_model.bin: tensors only, never code
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise TintError(f"cannot read the checkpoint for {what}: {path} ({err})") from err
    return load_state_dict(path, what)


def _hf_weights(source: str, what: str) -> Path:
    """The weights file of a ``save_pretrained`` folder, or of a hub id (from the local
    Hugging Face cache, or downloaded). Without a network, says what to set instead."""
    folder = Path(source).expanduser()
    if not folder.exists():
        folder = _hub_snapshot(source, what)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise TintError(f"no model.safetensors or pytorch_model.bin in {folder} ({what})")


def _hub_snapshot(repo_id: str, what: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "model.safetensors", "pytorch_model.bin"]  # + tokenizer
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns,
                                      local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: try the hub below
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise TintError(f"cannot get {repo_id} ({what}): HF_HUB_OFFLINE is set and it is not "
                        "in the local Hugging Face cache\nDownload it where there is a network "
                        f"(huggingface-cli download {repo_id}), or point {what} at a local "
                        "save_pretrained folder.")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10))
    except Exception as err:  # noqa: BLE001 - no network, no such repo, no access
        raise TintError(f"cannot get {repo_id} ({what}) from the Hugging Face Hub: "
                        f"{type(err).__name__}\nWithout a network, point it at a local "
                        "save_pretrained folder, or download it first and set "
                        "HF_HUB_OFFLINE=1 (or HF_HOME) so tint finds it in the cache.") from err


def _folder(value: object, setting: str, what: str) -> Path:
    if value in (None, "", "???"):
        raise TintError(f"{setting} is not set: point it at {what}")
    folder = Path(str(value)).expanduser()
    if not folder.is_dir():
        raise TintError(f"{setting}={folder} is not a folder ({what})")
    return folder


POOLS: dict[str, Callable[..., FilePool]] = {
    "task_vectors": _task_vectors, "local": _local, "hf": _hf}


def open_pool(pool_cfg: DictConfig, tasks: list[str], encoder: nn.Module,
              encoder_name: str = "?", tasks_cfg: DictConfig | None = None) -> FilePool:
    """A checkpoint pool (every kind but ``synth``), its task table validated. The task set's
    YAMLs name each task's checkpoint in the pool's release (``checkpoints``), and give the
    class names and templates for heads built from a text tower."""
    if pool_cfg.kind not in POOLS:
        raise TintError(f"unknown pool kind '{pool_cfg.kind}'; tint has: synth, "
                        f"{', '.join(POOLS)}")
    pool = POOLS[pool_cfg.kind](pool_cfg, tasks, encoder, tasks_cfg)
    pool.encoder_name = encoder_name
    if tasks_cfg is not None and not pool.heads_from_names:
        pool.num_classes = _task_classes(tasks_cfg, tasks)
        pool.classes_are = "class names" if tasks_cfg.get("source") == "hub" else "classes"
    pool.validate()
    return pool


def _task_classes(tasks_cfg: DictConfig, tasks: list[str]) -> dict[str, int]:
    """Each task's class count, where the task set knows the task (``tint convert
    names=[...]`` may name a pool's own tasks that no task set holds)."""
    if tasks_cfg.get("source") == "synthetic":
        known = set(SYNTH_FAMILIES)
    else:
        known = {t for t, spec in (tasks_cfg.get("data") or {}).items()
                 if spec is not None and spec.get("classnames")}
    return {t: num_classes(tasks_cfg, t) for t in tasks if t in known}


def check_head_classes(head: nn.Linear, task: str, expected: int, path: Path,
                       classes_are: str = "class names") -> None:
    """A head with another class count than its task scores every image against the wrong
    classes (or fails mid-run on a label past its last row): refuse it before any evaluation."""
    if head.out_features != expected:
        raise TintError(f"the head for task '{task}' has {head.out_features} classes, but the "
                        f"task has {expected} {classes_are}\n{path} is probably another task's "
                        "head: check the task -> checkpoint names (pool.dirs, or the task "
                        "YAML's checkpoints), the heads folder (pool.heads), or the task's "
                        f"classnames (conf/task/{task}.yaml).")


def check_experts_beat_zero_shot(accuracies: Mapping[str, tuple[float, float]], pool: str,
                                 refuse: bool = True, console: Console | None = None) -> None:
    """An expert no better than zero-shot on its own task is almost always a wrong
    task -> checkpoint map (the papers' users met it): refuse it, naming the task. With
    ``refuse=False`` (``pool.check_experts=false``: a smoke run whose tiny test split ties)
    the finding is a warning and the run goes on."""
    for task, (zeroshot, expert) in accuracies.items():
        if expert > zeroshot:
            continue
        finding = (f"the expert for task '{task}' scores {100 * expert:.1f}% on its own test "
                   f"split, no better than zero-shot ({100 * zeroshot:.1f}%)")
        if refuse:
            raise TintError(f"{finding}\nThe {pool} pool's task -> checkpoint map is probably "
                            "wrong (e.g. two tasks swapped): check pool.dirs / pool.experts. "
                            "If the test split is too small to tell (a smoke run), "
                            "pool.check_experts=false makes this a warning.")
        (console or Console(stderr=True)).print(
            f"[yellow]warning:[/] {escape(finding)} (pool.check_experts=false: going on)",
            highlight=False, soft_wrap=True)
