"""The one cache mechanism. Every entry tint builds and keeps (task data, the zoo's pretrained
encoder and experts, realism verdicts, and whatever comes later) is made through here.

An entry is a folder: its files plus a ``manifest.json`` that lists each file's sha256 and
records the entry's ``key`` (everything that decided it, including the digests of what it
was built from). So:

- it is built in a unique temporary folder beside its place (``.<name>.*.tmp``), under a file
  lock, and renamed into place whole: a reader never sees half an entry, and two processes
  that need the same entry build it once (the second waits for the lock, then finds it
  built). A builder killed outright (``kill -9``) leaves its temporary folder; the next
  builder removes it: while it holds the lock, no live builder of that entry can have one;
- its folders and files get the modes the user's umask gives (``mkdtemp`` alone would make
  the folder 0700), as do its lock file and the digest memo, so a cache in a group folder
  with umask 002 is the group's: readable, and rebuildable by any member;
- it is checked whenever it is read: a missing or damaged manifest, a missing file, a file
  whose sha256 differs or a key built from other inputs makes the entry stale; tint says
  which and why, and builds it again;
- reading takes no lock, so a read-only cache of complete entries works, and where an entry
  cannot be stored (read-only or full disk) it is built in a temporary folder
  (``/tmp/tint-entry-*``), used for this run and removed when the process exits.

Digests are memoised by (path, size, mtime, inode) (``io.file_sha256``), so large entries are
not re-hashed on every run: any rewrite of a file changes its mtime and is caught. The trade:
bytes overwritten in place with the mtime set back are not seen by a memoised check. Full
hashing (``io.set_digest_mode("full")``, and ``tint cache verify``, which re-hashes every
entry and with ``--fix`` removes the damaged ones) sees them.
"""

from __future__ import annotations

import atexit
import functools
import glob
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
ANY_KEY: Any = object()  # ``check(path, ANY_KEY)``: whole, whatever it was built from


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


def check(path: Path, key: Any,
          on_file: Callable[[Path], None] | None = None) -> tuple[dict | None, str]:
    """(manifest, "") when the entry at ``path`` is whole and was built from ``key`` (any
    key for ``ANY_KEY``); else (None, why not). ``on_file(file)`` is called after each file
    is checked (a progress bar)."""
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
    if key is not ANY_KEY and manifest.get("key") != canonical(key):
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
        if on_file is not None:
            on_file(file)
    return manifest, ""


def lock(path: Path) -> FileLock:
    """The lock held by whoever builds, rebuilds or removes the entry at ``path``."""
    return FileLock(str(_lock_file(path)))


def _lock_file(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _share_lock(path: Path) -> None:
    """Give the entry's lock file the umask's mode once we hold it: older filelocks make it
    0644 whatever the umask, and a group member who cannot open it would take a shared cache
    for a read-only one. Only its owner can change it, and that is the one who made it."""
    want = 0o666 & ~_umask()
    try:
        if _lock_file(path).stat().st_mode & 0o777 != want:
            os.chmod(_lock_file(path), want)
    except OSError:
        pass  # another user's lock file: theirs to set


def kept(folder: Path) -> bool:
    """Whether the folder a build is writing into becomes a cache entry (False: the cache
    could not hold it, and it is used for this run only). For messages said while building."""
    return Path(folder) not in _TEMPORARY


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
        entry_lock = lock(path)
        try:
            entry_lock.acquire(timeout=0)
        except Timeout:  # another process is building it: wait, then use what it built
            console.print(f"waiting for another tint process that is building {what} ({path})",
                          soft_wrap=True)
            entry_lock.acquire()
    except OSError as err:  # a read-only cache, a full disk: build it, use it, keep nothing
        console.print(f"[yellow]warning:[/] cannot store {what} in {path.parent} "
                      f"({err.strerror or err}); building it for this run only", soft_wrap=True)
        folder = _temporary_folder(what)
        return Entry(folder, _build_into(folder, key, build), kept=False)
    try:
        _share_lock(path)
        removed = remove_dead_builds(path)
        if removed:
            console.print(f"removed {removed} temporary folder(s) that a killed build of {what} "
                          f"left in {path.parent}", soft_wrap=True)
        manifest, why = check(path, key)  # another process may have built it meanwhile
        if manifest is not None:
            return Entry(path, manifest)
        if why != "not built":
            console.print(f"[yellow]rebuilding {what}[/]: {why} ({path})", soft_wrap=True)
        folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            manifest = _build_into(folder, key, build)
            _share(folder)
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
        entry_lock.release()
    return Entry(path, manifest)


def remove_dead_builds(path: Path) -> int:
    """Remove the temporary folders (``.<name>.*.tmp``) that killed builders of the entry at
    ``path`` left behind; how many. Call it holding the entry's lock: a live builder holds
    that lock as long as its temporary folder exists, so every one found now is a dead
    builder's (flock locks die with their process)."""
    removed = 0
    for folder in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        middle = folder.name[len(path.name) + 2: -len(".tmp")]
        # mkdtemp's names have no dots: ".a.b.x.tmp" belongs to an entry "a.b", not to "a"
        if "." not in middle and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
            removed += not folder.exists()
    return removed


@functools.cache
def _umask() -> int:
    """The process's umask, read once: the only way to read it is to set it."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _share(folder: Path) -> None:
    """Give a built entry the modes the umask gives: ``mkdtemp`` made its folder 0700 and
    writers through ``mkstemp`` make files 0600, which would hide it from the group."""
    folder_mode, file_mode = 0o777 & ~_umask(), 0o666 & ~_umask()
    os.chmod(folder, folder_mode)
    for root, folders, files in os.walk(folder):
        for names, mode in ((folders, folder_mode), (files, file_mode)):
            for name in names:
                item = os.path.join(root, name)
                if not os.path.islink(item):  # chmod would change what the link points to
                    os.chmod(item, mode)


_TEMPORARY: set[Path] = set()  # entries built for this run only; removed at exit


def _temporary_folder(what: str) -> Path:
    """A private folder for an entry the cache cannot hold: used by this run, removed when
    the process exits (nothing else ever reads it)."""
    try:
        folder = Path(tempfile.mkdtemp(prefix="tint-entry-"))
    except OSError as err:
        raise TintError(f"cannot build {what}: neither the cache nor {tempfile.gettempdir()} "
                        f"can be written ({err.strerror or err})\n"
                        "Point TINT_CACHE (or TMPDIR) at a writable folder.") from err
    _TEMPORARY.add(folder)
    return folder


@atexit.register
def _remove_temporary() -> None:
    for folder in _TEMPORARY:
        shutil.rmtree(folder, ignore_errors=True)


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
