"""The cache on a shared cluster: group-readable entries, builds killed outright, read-only
caches, and `tint cache verify` for damage the digest memo cannot see.

Entries here are a few bytes built by small functions, not the zoo, so each test takes
seconds; the zoo's own cache behaviour is tested in test_reliability.py.
"""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from rich.console import Console

from tintcli import cache
from tintcli.io import _memo, digest_mode, set_digest_mode
from tintcli.recipes import cache as cache_recipe
from tintcli.tasks import task_names

EXE = shutil.which("tint", path=str(Path(sys.executable).parent))
KEY = {"what": "a test entry", "version": 1}


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """A private, empty TINT_CACHE for this test (this process and its subprocesses)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("TINT_CACHE", str(path))
    return path


def build(folder: Path) -> dict:
    """Files as real builders write them: plain writes, a subfolder, and a file made through
    mkstemp (0600 whatever the umask, like io.atomic_write's before its chmod)."""
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (folder / "part").mkdir()
    (folder / "part" / "labels.txt").write_text("0 1 2\n")
    fd, name = tempfile.mkstemp(dir=folder / "part")
    os.write(fd, b"made by mkstemp")
    os.close(fd)
    os.replace(name, folder / "part" / "private.bin")
    return {"note": "built"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def recording() -> Console:
    return Console(record=True, width=300)


@pytest.fixture
def umask():
    """Set the process umask for one test, and put it (and cache.py's reading of it) back."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_to(mask: int) -> None:
        os.umask(mask)
        cache._umask.cache_clear()

    yield set_to
    os.umask(previous)
    cache._umask.cache_clear()


# ------------------------------------------------------------------ 1. modes from the umask


@pytest.mark.parametrize("mask", [0o077, 0o002])
def test_an_entry_gets_the_modes_the_umask_gives(root, umask, mask):
    """A 0700 entry folder (what mkdtemp makes) in a group cache is unreadable to the group."""
    umask(mask)
    (root / "things").mkdir(parents=True)
    (root / "things" / ".entry.lock").touch(mode=0o644)  # as filelock < 4 leaves it
    os.chmod(root / "things" / ".entry.lock", 0o644)
    entry = cache.ensure(root / "things" / "entry", KEY, build, "a test entry", recording())
    folder_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    assert mode(entry.path) == folder_mode
    assert mode(entry.path / "part") == folder_mode
    for name in ("weights.bin", "part/labels.txt", "part/private.bin", cache.MANIFEST):
        assert mode(entry.path / name) == file_mode, name
    assert mode(root / "things" / ".entry.lock") == file_mode
    memo = root / "digests"
    assert mode(memo) == folder_mode
    assert {mode(f) for f in memo.iterdir()} == {file_mode}


# ------------------------------------------------------------------ 2. builders killed outright

KILLED_BUILDER = """
import sys, time
from pathlib import Path
from tintcli import cache

def build(folder):
    (folder / "half.bin").write_bytes(b"half")
    print("building", flush=True)
    time.sleep(600)

cache.ensure(Path(sys.argv[1]), {"what": "a test entry", "version": 1}, build, "a test entry")
"""


def test_a_killed_builders_temporary_folder_is_removed_by_the_next_build(root):
    path = root / "things" / "entry"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILDER, str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "building\n"
    finally:
        proc.kill()  # kill -9: no finally, no cleanup
        proc.wait()
    (left,) = (root / "things").glob(".entry.*.tmp")
    assert (left / "half.bin").is_file()
    # temporary folders of other entries ("entry-2", "entry.b") are not this entry's
    others = [root / "things" / ".entry-2.abc123.tmp", root / "things" / ".entry.b.abc123.tmp"]
    for other in others:
        other.mkdir()
    console = recording()
    entry = cache.ensure(path, KEY, build, "a test entry", console)
    assert entry.manifest["note"] == "built"
    assert not left.exists()
    assert "removed 1 temporary folder(s) that a killed build of a test entry left" \
        in console.export_text()
    assert all(other.is_dir() for other in others)


# ------------------------------------------------------------------ 3. a read-only cache


class ReadOnlyLock:
    """Root ignores file modes, so a read-only cache is made by refusing its locks."""

    def __init__(self, path, mode=None):
        pass

    def acquire(self, timeout=None):
        raise PermissionError(30, "Read-only file system")


READ_ONLY_RUN = """
import sys
from pathlib import Path
from tintcli import cache

class ReadOnlyLock:
    def __init__(self, path, mode=None):
        pass
    def acquire(self, timeout=None):
        raise PermissionError(30, "Read-only file system")

def build(folder):
    (folder / "x").write_text("x")

cache.FileLock = ReadOnlyLock
entry = cache.ensure(Path(sys.argv[1]), {"k": 1}, build, "x")
print(entry.path, entry.kept, (entry.path / "x").read_text(), flush=True)
"""


def test_a_read_only_caches_temporary_entry_is_removed_at_exit(root):
    done = subprocess.run([sys.executable, "-c", READ_ONLY_RUN, str(root / "entry")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    folder, kept, content = done.stdout.split()
    assert "building it for this run only" in done.stderr
    assert (kept, content) == ("False", "x")  # it was there during the run...
    assert Path(folder).name.startswith("tint-entry-")
    assert not Path(folder).exists()  # ...and is gone after it
    assert not (root / "entry").exists()


def test_builders_are_told_whether_their_entry_is_kept(root, monkeypatch):
    seen = {}

    def build_and_look(folder: Path) -> None:
        seen[folder] = cache.kept(folder)
        (folder / "x").write_text("x")

    kept = cache.ensure(root / "kept", KEY, build_and_look, "an entry", recording())
    monkeypatch.setattr(cache, "FileLock", ReadOnlyLock)
    once = cache.ensure(root / "once", KEY, build_and_look, "an entry", recording())
    assert (kept.kept, once.kept) == (True, False)
    assert list(seen.values()) == [True, False]


class Stop(Exception):
    pass


@pytest.mark.parametrize("read_only", [False, True])
def test_the_zoo_says_it_is_cached_only_when_it_is(root, monkeypatch, read_only):
    """What the zoo says when it starts building (the build itself is cut short)."""
    from tintcli import zoo

    def pretrain(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(zoo, "_pretrain", pretrain)
    if read_only:
        monkeypatch.setattr(cache, "FileLock", ReadOnlyLock)
    console = recording()
    cfg = compose_config()
    with pytest.raises(Stop):
        zoo.ensure_zoo(cfg.encoder, cfg.tasks, task_names(cfg.tasks), torch.device("cpu"),
                       console)
    text = console.export_text()
    assert ("cached for later runs" in text) is not read_only
    assert ("for this run only" in text) is read_only


# ------------------------------------------------------------------ 4. damage the memo misses


def damage_in_place(file: Path) -> None:
    """Overwrite bytes in place (same size, same inode) and set the mtime back: the one
    damage a memoised check cannot see."""
    before = file.stat()
    with open(file, "r+b") as f:
        first = f.read(2)
        f.seek(0)
        f.write(bytes(b ^ 0xFF for b in first))
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = file.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == \
        (before.st_size, before.st_mtime_ns, before.st_ino)


@pytest.fixture
def full_mode_restored():
    yield
    set_digest_mode("memo")


def test_full_hashing_sees_damage_that_the_memo_cannot(root, full_mode_restored):
    entry = cache.ensure(root / "entry", KEY, build, "a test entry", recording())
    damage_in_place(entry.file("weights.bin"))
    assert digest_mode() == "memo"
    manifest, why = cache.check(entry.path, KEY)
    assert manifest is not None and why == ""  # the documented trade of the memo
    set_digest_mode("full")
    assert cache.check(entry.path, KEY) == (None, "weights.bin does not match its recorded sha256")


def test_an_unknown_digest_mode_is_refused():
    from tintcli.errors import TintError

    with pytest.raises(TintError, match="unknown digest mode 'fast'; use one of memo, full"):
        set_digest_mode("fast")


def tint_cache(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, "cache", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "300"})


def test_tint_cache_verify_finds_and_fixes_damage_the_memo_cannot_see(root):
    damaged = cache.ensure(root / "things" / "damaged", KEY, build, "a test entry", recording())
    sound = cache.ensure(root / "things" / "sound", KEY, build, "a test entry", recording())
    damage_in_place(damaged.file("weights.bin"))  # the last file checked
    forgotten = _memo(sound.file("weights.bin").resolve())
    forgotten.unlink()  # verifying memoises what it hashes

    done = tint_cache("verify")
    assert done.returncode == 1, done.stderr
    assert f"damaged: {damaged.path}: weights.bin does not match its recorded sha256" \
        in done.stdout
    assert str(sound.path) not in done.stdout
    assert "damage: 2 entries" in done.stdout
    assert "1 damaged; `tint cache verify --fix` removes" in done.stdout
    assert forgotten.is_file()
    assert damaged.path.is_dir()  # reported, not removed
    # the memo now holds the damaged file's real digest: a run's memoised check sees it too
    assert cache.check(damaged.path, KEY)[1] == "weights.bin does not match its recorded sha256"

    done = tint_cache("verify", "--fix", str(root))
    assert done.returncode == 0, done.stderr
    assert f"removed {damaged.path}" in done.stdout
    assert not damaged.path.exists() and cache.check(sound.path, KEY)[0] is not None
    rebuilt = cache.ensure(damaged.path, KEY, build, "a test entry", recording())
    assert rebuilt.manifest["files"] == sound.manifest["files"]

    done = tint_cache("verify")
    assert done.returncode == 0, done.stderr
    assert "all sound: 2 entries" in done.stdout


def test_verify_skips_and_fixes_the_folders_of_killed_builds(root, capsys):
    cache.ensure(root / "entry", KEY, build, "a test entry", recording())
    dead = root / ".entry.k1ll3d_x.tmp"  # killed after writing its manifest: not an entry
    shutil.copytree(root / "entry", dead)
    (dead / "weights.bin").write_bytes(b"half")
    assert cache_recipe.main(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert "all sound: 1 entry" in out and "1 temporary build folder(s)" in out
    assert dead.is_dir()
    assert cache_recipe.main(["verify", "--fix", str(root)]) == 0
    assert not dead.exists() and (root / "entry").is_dir()


def test_verify_leaves_a_build_in_progress_alone(root, capsys):
    cache.ensure(root / "entry", KEY, build, "a test entry", recording())
    building = root / ".entry.inpr0gr5.tmp"
    building.mkdir()
    with cache.lock(root / "entry"):
        assert cache_recipe.main(["verify", "--fix", str(root)]) == 0
    assert building.is_dir()


def test_verify_names_an_unreadable_manifest(root, capsys):
    entry = cache.ensure(root / "entry", KEY, build, "a test entry", recording())
    (entry.path / cache.MANIFEST).write_text("{not json")
    assert cache_recipe.main(["verify", str(root)]) == 1
    assert "its manifest is not readable JSON" in capsys.readouterr().out


def test_verify_of_a_missing_folder_is_one_clear_line(tmp_path):
    done = tint_cache("verify", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: no tint cache at {tmp_path / 'nowhere'}: the folder "
                                  "does not exist")
    assert "Traceback" not in done.stderr


def test_verify_of_an_empty_cache_is_sound(root, capsys):
    root.mkdir()
    assert cache_recipe.main(["verify", str(root)]) == 0
    assert "all sound: 0 entries (0 bytes)" in capsys.readouterr().out
