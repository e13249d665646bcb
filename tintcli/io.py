"""Checkpoint and result files: atomic writes, hashes, and loads that fail clearly."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tintcli.errors import TintError

StateDict = dict[str, torch.Tensor]

# Entries merged like the rest that are not the encoder's own: the CLIP text-tower leftovers
# of task_vectors checkpoints, which the reference TIES counts in its top-k ranking.
EXTRA = "text."


def encoder_entries(state: Mapping[str, torch.Tensor]) -> StateDict:
    """What loads into the encoder: every entry but the extras."""
    return {k: v for k, v in state.items() if not k.startswith(EXTRA)}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _numbers_by_value(obj: Any) -> Any:
    """An override ``logit_scale=30`` must not rebuild what 30.0 built."""
    if isinstance(obj, dict):
        return {str(k): _numbers_by_value(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_numbers_by_value(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)
    return obj


def canonical(obj: Any) -> Any:
    """The JSON form a cache key is stored and compared in: numbers by value, keys as
    strings, anything else by its ``str``."""
    return json.loads(json.dumps(_numbers_by_value(obj), sort_keys=True, default=str))


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (configs that decide a cached artefact)."""
    text = json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


DIGEST_MODES = ("memo", "full")
_digest_mode = "memo"


def set_digest_mode(mode: str) -> None:
    """How ``file_sha256`` gets a digest in this process. ``memo`` (the default) trusts the
    memo while the file's (size, mtime, inode) are unchanged, so a check costs a ``stat``; it
    misses damage that kept all three (bytes overwritten in place and the mtime set back).
    ``full`` hashes every file from its bytes on every call and refreshes the memo: what
    ``tint cache verify`` uses, and what a run can ask for when it must not trust the memo."""
    global _digest_mode
    if mode not in DIGEST_MODES:
        raise TintError(f"unknown digest mode '{mode}'; use one of {', '.join(DIGEST_MODES)}")
    _digest_mode = mode


def digest_mode() -> str:
    """``memo`` or ``full`` (see ``set_digest_mode``)."""
    return _digest_mode


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime, inode) under the cache's
    ``digests/``: a 20-task checkpoint pool or a pixel cache is hashed once, not on every
    run, and any rewrite of the file (a new mtime) is hashed again. In ``full`` digest mode
    the memo is not read, only refreshed."""
    path = Path(path).resolve()
    if _digest_mode == "memo":
        try:
            known = json.loads(_memo(path).read_text())
            if known["path"] == str(path) and known["stamp"] == _stamp(path):
                return str(known["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    digest = sha256_file(path)
    remember_sha256(path, digest)
    return digest


def remember_sha256(path: Path, digest: str) -> None:
    """Memoise a digest just computed elsewhere (a file hashed before it was renamed)."""
    path = Path(path).resolve()
    try:
        write_json(_memo(path), {"path": str(path), "stamp": _stamp(path), "sha256": digest})
    except OSError:
        pass  # a read-only cache: hash again next time


def _memo(path: Path) -> Path:
    from tintcli.paths import cache_dir

    return cache_dir() / "digests" / f"{fingerprint(str(path))}.json"


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename: readers never see half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide shared caches
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.write("\n")

    atomic_write(path, write)


class OnDevice(Mapping[str, torch.Tensor]):
    """A state dict read onto ``device`` one tensor at a time. Data-free merges compute where
    their inputs are, so on CUDA they see this view of the (CPU-loaded) checkpoints: the SVD
    methods take seconds there, not minutes, and no whole copy of the pool moves."""

    def __init__(self, state: Mapping[str, torch.Tensor], device: torch.device | str):
        self.state, self.device = state, torch.device(device)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.state[key].to(self.device)

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def on_device(pretrained: Mapping[str, torch.Tensor],
              experts: Mapping[str, Mapping[str, torch.Tensor]], device: torch.device
              ) -> tuple[Mapping[str, torch.Tensor], dict[str, Mapping[str, torch.Tensor]]]:
    """θ0 and the experts as seen from ``device`` (unchanged where they already are there)."""
    if next(iter(pretrained.values())).device == device:
        return pretrained, dict(experts)
    return OnDevice(pretrained, device), {t: OnDevice(e, device) for t, e in experts.items()}


def save_state_dict(state: Mapping[str, torch.Tensor], path: Path, metadata: dict | None = None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_state_dict(path: Path, what: str, expected_sha256: str | None = None) -> StateDict:
    """Load a safetensors checkpoint; a missing, altered or unreadable file is a TintError."""
    path = Path(path)
    if not path.is_file():
        raise TintError(f"missing checkpoint for {what}: {path} does not exist\n"
                        "Run the command again (tint rebuilds its own cache entries), or fix "
                        "the path in the config.")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise TintError(f"corrupt checkpoint for {what}: {path} does not match the sha256 "
                        "recorded for it\nRun the command again: tint checks its cache and "
                        "rebuilds what is damaged.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise TintError(f"corrupt checkpoint for {what}: {path} is not a readable safetensors "
                        f"file ({err})") from err


def check_finite_weights(state: Mapping[str, torch.Tensor], what: str) -> None:
    """A checkpoint with NaN/inf weights poisons every merge it enters: refuse it by name."""
    bad = next((k for k, v in state.items() if v.is_floating_point()
                and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise TintError(f"{what} has NaN/inf weights in '{bad}'\n"
                        "Rebuild or re-download that checkpoint.")


def check_same_layout(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                      what: str, against: str = "the pretrained encoder") -> None:
    """Experts must have exactly the pretrained encoder's keys and shapes to be merged."""
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    if missing or extra:
        raise TintError(f"{what} does not match the keys of {against}: "
                        f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
                        f"unexpected {extra[:3]}{'…' if len(extra) > 3 else ''}")
    for key, tensor in reference.items():
        if other[key].shape != tensor.shape:
            raise TintError(f"{what} does not match {against}: {key} has shape "
                            f"{tuple(other[key].shape)}, expected {tuple(tensor.shape)}")
