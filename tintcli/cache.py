"""The one cache mechanism. Every entry tint builds and keeps (task data, the zoo's pretrained
encoder and experts, realism verdicts, and whatever comes later) is made through here.

An entry is a folder: its files plus a ``manifest.json`` that lists each file's sha256 and
records the entry's ``key`` (everything that decided it, including the digests of what it
was built from). So:

- it is built in a unique temporary folder beside its place, under a file lock, and renamed
  into place whole: a reader never sees half an entry, and two processes that need the same
  entry build it once (the second waits for the lock, then finds it built);
- it is checked whenever it is read: a missing or damaged manifest, a missing file, a file
  whose sha256 differs or a key built from other inputs makes the entry stale; tint says
  which and why, and builds it again;
- reading takes no lock, so a read-only cache of complete entries works, and where an entry
  cannot be stored (read-only or full disk) it is built in a temporary folder and used once.

Digests are memoised by (path, size, mtime) (``io.file_sha256``), so large entries are not
re-hashed on every run; any change to a file's bytes changes its mtime and is caught.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from rich.console import Console

from tintcli.errors import TintError
from tintcli.io import canonical, file_sha256, remember_sha256, sha256_file, write_json

MANIFEST = "manifest.json"
FORMAT = 3


@dataclass(frozen=True)
class Entry:
    """A whole, checked cache entry: its folder and its manifest."""

    path: Path
    manifest: dict[str, Any]
    kept: bool = True  # False: built in a temporary folder because the cache could not hold it

    def file(self, name: str) -> Path:
        return self.path / name

    def sha256(self, name: str) -> str:
        return self.manifest["files"][name]


def check(path: Path, key: Any) -> tuple[dict | None, str]:
    """(manifest, "") when the entry at ``path`` is whole and was built from ``key``;
    else (None, why not)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return None, ("not built" if not path.exists()
                      else "it has no manifest (an older tint's entry, or an interrupted build)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, "its manifest is not readable JSON"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
            or not isinstance(files, dict)
            or not all(isinstance(d, str) for d in files.values())):
        return None, "its manifest is not a tint cache manifest of this version"
    if manifest.get("key") != canonical(key):
        return None, "it was built from other inputs"
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            return None, f"{name} is missing"
        try:
            if file_sha256(file) != digest:
                return None, f"{name} does not match its recorded sha256"
        except OSError as err:
            return None, f"{name} is not readable ({err.strerror or err})"
    return manifest, ""


def ensure(path: Path, key: Any, build: Callable[[Path], dict | None], what: str,
           console: Console | None = None) -> Entry:
    """The entry at ``path`` built from ``key``, building it when missing or stale.

    ``build(folder)`` writes the entry's files into the empty ``folder`` and returns extra
    manifest fields (accuracies, offsets, ...). Every file it writes is digested."""
    path = Path(path)
    manifest, why = check(path, key)
    if manifest is not None:
        return Entry(path, manifest)
    console = console or Console(stderr=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.parent / f".{path.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:  # another process is building it: wait, then use what it built
            console.print(f"waiting for another tint process that is building {what} ({path})",
                          soft_wrap=True)
            lock.acquire()
    except OSError as err:  # a read-only cache, a full disk: build it, use it, keep nothing
        console.print(f"[yellow]warning:[/] cannot store {what} in {path.parent} "
                      f"({err.strerror or err}); building it for this run only", soft_wrap=True)
        folder = Path(tempfile.mkdtemp(prefix="tint-entry-"))
        return Entry(folder, _build_into(folder, key, build), kept=False)
    try:
        manifest, why = check(path, key)  # another process may have built it meanwhile
        if manifest is not None:
            return Entry(path, manifest)
        if why != "not built":
            console.print(f"[yellow]rebuilding {what}[/]: {why} ({path})", soft_wrap=True)
        folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            manifest = _build_into(folder, key, build)
            if path.exists():  # stale: nobody else builds it while we hold the lock
                shutil.rmtree(path)
            os.replace(folder, path)
            for name, digest in manifest["files"].items():
                remember_sha256(path / name, digest)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    except OSError as err:
        raise TintError(f"cannot build {what} in {path.parent}: {err.strerror or err}\n"
                        "Free some disk space, or point TINT_CACHE at a writable folder.") from err
    finally:
        lock.release()
    return Entry(path, manifest)


def _build_into(folder: Path, key: Any, build: Callable[[Path], dict | None]) -> dict:
    extra = build(folder) or {}
    files = {str(f.relative_to(folder)): sha256_file(f)
             for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST}
    manifest = {"format": FORMAT, "key": canonical(key), **canonical(extra), "files": files,
                "built_at": time.time()}
    write_json(folder / MANIFEST, manifest)
    return manifest


def ensure_json(path: Path, key: Any, compute: Callable[[], Any], what: str,
                console: Console | None = None) -> Any:
    """A cached JSON value (an entry holding ``value.json``): computed once, then read."""
    def build(folder: Path) -> None:
        write_json(folder / "value.json", compute())

    entry = ensure(path, key, build, what, console)
    return json.loads(entry.file("value.json").read_text())
