"""Checkpoints of an adaptive run, so that a stopped run (SLURM's time limit, pre-emption,
Ctrl-C, SIGTERM) goes on from where it was and ends with exactly an uninterrupted run's numbers.

A run's state is a tree of dicts and lists whose leaves are tensors and JSON values. Its
folder holds the tensors in ``state-<steps>.safetensors`` and the rest in ``checkpoint.json``:
the tree (each tensor replaced by ``{"@tensor": name}``), the key the run was made for, how many
steps it had done, and the tensors file's name and sha256. The JSON is written last and names
its tensors file, so a reader sees the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file

from tintcli.io import StateDict, canonical, save_state_dict, sha256_file, write_json

POINTER = "checkpoint.json"
TENSOR = "@tensor"


class Resumable(Protocol):
    def state(self) -> Any: ...
    def load_state(self, state: Any) -> None: ...


def split(tree: Any) -> tuple[Any, StateDict]:
    """The tree with each tensor replaced by ``{"@tensor": its path}``, and CPU copies of the
    tensors by path (a copy: the live ones go on changing, and may share memory)."""
    tensors: StateDict = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().to("cpu", copy=True)
            return {TENSOR: path}
        if isinstance(node, Mapping):
            return {str(k): walk(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        return node

    return walk(tree, ""), tensors


def join(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """What ``split`` split."""
    if isinstance(tree, dict):
        if set(tree) == {TENSOR}:
            return tensors[tree[TENSOR]]
        return {k: join(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [join(v, tensors) for v in tree]
    return tree


def differences(saved: Any, wanted: Any, path: str = "") -> list[str]:
    """Where two keys differ (dotted paths), to say why a checkpoint is not resumed."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        return [d for k in sorted(set(saved) | set(wanted))
                for d in differences(saved.get(k), wanted.get(k), f"{path}.{k}" if path else k)]
    return [] if saved == wanted else [path or "everything"]


def first_line(err: BaseException) -> str:
    """Notes are one line; some errors (safetensors') run to several."""
    return (str(err).splitlines() or [""])[0]


class Checkpoint:
    """One run's checkpoint folder (``folder=None``: no checkpointing, every call does nothing).

    ``key`` is what must match for a saved state to be resumed: the run's config, the method
    and its parameters. ``note`` prints a one-line note (resuming, not resuming and why)."""

    def __init__(self, folder: Path | None, key: Mapping[str, Any], note: Callable[[str], None]):
        self.folder = None if folder is None else Path(folder)
        self.key = canonical(key)
        self.note = note
        self.step: int | None = None  # the steps done of the state last saved or loaded
        self.failed = False           # a save failed (noted once)

    def resume(self, run: Resumable) -> bool:
        """Load the saved state into ``run`` if it was made for this key. One made for another
        key, or damaged in any way, is not used: a note says why, and the run starts afresh."""
        if self.folder is None or not (self.folder / POINTER).exists():
            return False
        fresh = None
        try:
            info = json.loads((self.folder / POINTER).read_text())
            if info["key"] != self.key:
                where = ", ".join(differences(info["key"], self.key)[:3])
                self.note(f"not resuming from {self.folder}: that checkpoint was made with other "
                          f"settings ({where}); starting afresh")
                return False
            path = self.folder / info["tensors"]
            if sha256_file(path) != info["sha256"]:
                raise ValueError(f"{path.name} does not match its sha256")
            saved, step = join(info["state"], load_file(str(path))), int(info["steps_done"])
            fresh = join(*split(run.state()))
            run.load_state(saved)
        except Exception as err:  # noqa: BLE001 - whatever is wrong with it, it is not used
            if fresh is not None:  # loaded in part: back to the start
                run.load_state(fresh)
            self.note(f"not resuming from the damaged checkpoint in {self.folder} "
                      f"({type(err).__name__}: {first_line(err)}); starting afresh")
            return False
        self.step = step
        self.note(f"resuming from step {step} (checkpoint in {self.folder})")
        return True

    def save(self, state: Any, step: int) -> None:
        """Save ``state`` (``step`` steps done), unless that is the state saved last. Best effort:
        a checkpoint that cannot be written is noted once, and the run goes on without it."""
        if self.folder is None or step == self.step:
            return
        name = f"state-{step:06d}.safetensors"
        try:
            tree, tensors = split(state)
            save_state_dict(tensors, self.folder / name)
            write_json(self.folder / POINTER, {
                "key": self.key, "steps_done": step, "tensors": name,
                "sha256": sha256_file(self.folder / name), "state": tree})
        except Exception as err:  # noqa: BLE001 - a full disk must not end a long run
            if not self.failed:
                self.note(f"cannot save a checkpoint in {self.folder} ({first_line(err)}); the "
                          "run goes on without one")
            self.failed = True
            return
        self.step = step
        self._remove(keep=name)

    def remove(self) -> None:
        """The run is done (its results are saved elsewhere): its checkpoint goes."""
        if self.folder is None:
            return
        with contextlib.suppress(OSError):
            (self.folder / POINTER).unlink(missing_ok=True)
        self._remove(keep=None)
        with contextlib.suppress(OSError):
            self.folder.rmdir()  # (unless it holds someone else's files)

    def _remove(self, keep: str | None) -> None:
        """Older states, and what a write killed on the spot left (``atomic_write``'s temps)."""
        for old in [*self.folder.glob("state-*.safetensors"), *self.folder.glob(".*.tmp")]:
            if old.name != keep:
                with contextlib.suppress(OSError):
                    old.unlink(missing_ok=True)
