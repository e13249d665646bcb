"""`tint cache verify [--fix] [PATH]`: hash every file of every cache entry from its bytes.

A run checks an entry's files through the digest memo (a ``stat`` per file), which misses
bytes overwritten in place with the mtime set back (``tintcli/cache.py``). This command
ignores the memo: it re-hashes every file listed in every entry's manifest, names each
damaged entry and why, and refreshes the memo on the way. With ``--fix`` it removes the
damaged entries (under each entry's lock, as a build does), so the next run that needs one
builds it again, and removes the temporary folders that killed builds left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from filelock import Timeout
from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from tintcli import cache
from tintcli.errors import Interrupted, TintError
from tintcli.io import digest_mode, set_digest_mode
from tintcli.paths import cache_dir


@dataclass
class Found:
    """What is under a cache folder: its entries, and temporary folders of builds."""

    entries: list[Path]
    temporary: list[Path]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tint cache", description="Look after tint's cache ($TINT_CACHE).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    verify = commands.add_parser(
        "verify", help="re-hash every file of every entry; name the damaged ones",
        description="Re-hash every file of every cache entry from its bytes (not trusting the "
                    "digest memo) and name each damaged entry and why. Exit status 0 when all "
                    "are sound (or were fixed), 1 when damage was found and is still there.")
    verify.add_argument("--fix", action="store_true",
                        help="remove damaged entries (the next run that needs one rebuilds "
                             "it) and the temporary folders of killed builds")
    verify.add_argument("path", nargs="?", type=Path, metavar="PATH",
                        help="the cache folder, or a folder inside it (default: $TINT_CACHE, "
                             "else $XDG_CACHE_HOME/tint, else ~/.cache/tint)")
    return parser


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    console = Console(highlight=False)
    previous = digest_mode()
    set_digest_mode("full")
    try:
        return verify(args.path or cache_dir(), args.fix, console)
    except KeyboardInterrupt:
        raise Interrupted("interrupted (Ctrl-C) while verifying the cache\n"
                          "Stopping damaged nothing: run it again to check it all.") from None
    finally:
        set_digest_mode(previous)


def find(root: Path) -> Found:
    """Every entry (a folder holding a manifest) under ``root``, and the temporary folders
    (``.<name>.*.tmp``) of builds. Entries are not searched inside: an entry's files are
    its own, and a temporary folder is not an entry even once its manifest is written."""
    found = Found([], [])
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        if cache.MANIFEST in files:
            found.entries.append(here)
            subfolders.clear()
            continue
        for name in list(subfolders):
            if name.startswith(".") and name.endswith(".tmp"):
                found.temporary.append(here / name)
                subfolders.remove(name)
            elif here == root and name == "digests":  # the memo: thousands of small files
                subfolders.remove(name)
        subfolders.sort()
    found.entries.sort()
    return found


def verify(root: Path, fix: bool, console: Console) -> int:
    """Check (and with ``fix`` remove) every entry under ``root``; the exit status."""
    root = Path(root).expanduser()
    if not root.exists():
        raise TintError(f"no tint cache at {root}: the folder does not exist\n"
                        "Pass the cache folder (tint's default is $TINT_CACHE, else "
                        "~/.cache/tint), or run a command that builds something first.")
    if not root.is_dir():
        raise TintError(f"{root} is not a folder\nPass the cache folder (tint's default is "
                        "$TINT_CACHE, else ~/.cache/tint).")
    found = find(root)
    sizes = {entry: _size(entry) for entry in found.entries}
    damaged: list[Path] = []
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task("verifying the cache", total=sum(sizes.values()))
        done = 0
        for entry in found.entries:
            _, why = cache.check(entry, cache.ANY_KEY,
                                 on_file=lambda f: progress.advance(bar, _file_size(f)))
            done += sizes[entry]
            progress.update(bar, completed=done)  # a damaged entry's unread files too
            if why:
                damaged.append(entry)
                console.print(f"[yellow]damaged:[/] {escape(str(entry))}: {escape(why)}",
                              soft_wrap=True)
    left = [entry for entry in damaged if not (fix and _remove(entry, console))]
    if fix:
        for folder in found.temporary:
            _remove_dead_build(folder, console)
    checked = f"{_entries(len(found.entries))} ({decimal(sum(sizes.values()))}) in {root}"
    if not damaged:
        console.print(f"[green]all sound:[/] {checked}", soft_wrap=True)
    elif not left:
        console.print(f"[green]fixed:[/] {checked}: removed {len(damaged)} damaged; the next "
                      "run that needs one rebuilds it", soft_wrap=True)
    else:
        hint = "" if fix else "; `tint cache verify --fix` removes damaged entries"
        console.print(f"[red]damage:[/] {checked}: {len(left)} damaged{hint}", soft_wrap=True)
    if found.temporary and not fix:
        console.print(f"{len(found.temporary)} temporary build folder(s) (builds in progress, or "
                      "killed ones: `--fix` removes those)", soft_wrap=True)
    return 1 if left else 0


def _remove(entry: Path, console: Console) -> bool:
    """Remove a damaged entry under its lock, so that no build is running on it; True when
    it is gone or was rebuilt meanwhile by another process."""
    entry_lock = cache.lock(entry)
    try:
        try:
            entry_lock.acquire(timeout=0)
        except Timeout:
            console.print(f"waiting for another tint process that is building "
                          f"{escape(str(entry))}", soft_wrap=True)
            entry_lock.acquire()
        try:
            _, why = cache.check(entry, cache.ANY_KEY)  # rebuilt while we were hashing?
            if not why:
                console.print(f"sound now (rebuilt meanwhile): {escape(str(entry))}",
                              soft_wrap=True)
                return True
            shutil.rmtree(entry)
        finally:
            entry_lock.release()
    except OSError as err:
        console.print(f"[red]cannot remove[/] {escape(str(entry))}: {err.strerror or err}",
                      soft_wrap=True)
        return False
    console.print(f"removed {escape(str(entry))}", soft_wrap=True)
    return True


def _remove_dead_build(folder: Path, console: Console) -> None:
    """A build's temporary folder is removed only when its entry's lock is free (no live
    builder); a busy lock means a build in progress, left alone."""
    name = folder.name[1:-len(".tmp")].rsplit(".", 1)[0]  # ".<name>.<random>.tmp"
    entry_lock = cache.lock(folder.parent / name)
    try:
        entry_lock.acquire(timeout=0)
    except (Timeout, OSError):
        return
    try:
        if cache.remove_dead_builds(folder.parent / name):
            console.print(f"removed the temporary folder(s) of a killed build of "
                          f"{escape(str(folder.parent / name))}", soft_wrap=True)
    finally:
        entry_lock.release()


def _entries(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def _size(entry: Path) -> int:
    """Bytes of the files an entry's manifest lists (what verifying it reads)."""
    try:
        files = json.loads((entry / cache.MANIFEST).read_text()).get("files") or {}
        return sum(_file_size(entry / name) for name in files)
    except (OSError, ValueError, AttributeError):
        return 0


def _file_size(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError:
        return 0
