"""Nothing lost: interrupts, parallel runs, damaged caches, failures after the work is done.

Each test uses its own TINT_CACHE (the tiny zoo builds in seconds) and, where the behaviour
is about processes (Ctrl-C, two runs at once), real `tint` subprocesses.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config
from rich.console import Console

from tintcli.errors import TintError
from tintcli.tasks import task_names
from tintcli.tasks.generated import load_synthetic
from tintcli.zoo import ensure_zoo, zoo_root

EXE = shutil.which("tint", path=str(Path(sys.executable).parent))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private, empty TINT_CACHE for this test (this process and its subprocesses)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("TINT_CACHE", str(path))
    return path


def _as_a_background_job() -> None:
    """A shell without job control starts background jobs (`make test > log &` in a script,
    `nohup tint ...`) with SIGINT ignored, and Python then installs no KeyboardInterrupt
    handler: tint must restore it, or Ctrl-C cannot stop it. Every tint here starts so."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def tint(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.Popen([EXE, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_as_a_background_job)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()  # a no-op once it has ended; never leave a run behind a failed test
    return proc.returncode, out, err


def build_zoo(overrides=(), console=None):
    cfg = compose_config(overrides=list(overrides))
    return ensure_zoo(cfg.encoder, cfg.tasks, task_names(cfg.tasks), torch.device("cpu"),
                      console or Console(quiet=True))


def recorded(console: Console) -> str:
    return console.export_text()


# ------------------------------------------------------------------ 1. Ctrl-C keeps the rows


def test_ctrl_c_keeps_every_finished_row(cache, tmp_path):
    build_zoo()
    run_dir = tmp_path / "interrupted"
    proc = tint("merge", *TINY, "method=all", "method.methods.tinting.epochs=100000",
                f"hydra.run.dir={run_dir}", cwd=tmp_path)
    partial = run_dir / "results.partial.json"
    try:
        deadline = time.time() + 240
        rows: list = []
        while time.time() < deadline and proc.poll() is None:
            try:
                rows = json.loads(partial.read_text())["rows"]
            except (OSError, ValueError):
                rows = []
            if len(rows) >= 5:  # zero-shot, experts and the three data-free methods
                break
            time.sleep(0.2)
        assert len(rows) >= 5, "the data-free rows never reached results.partial.json"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        code, _, err = finish(proc, timeout=90)  # a Ctrl-C that does not stop it fails here
    finally:
        proc.kill()  # never leave a 100000-epoch run behind
        proc.communicate()
    assert code == 130, err
    assert err.splitlines()[0] == "error: interrupted (Ctrl-C)", err
    assert "Traceback" not in err
    kept = json.loads(partial.read_text())
    assert kept["error"] == "interrupted"
    assert [r["name"] for r in kept["rows"]][:5] == [
        "zero-shot", "experts", "weight_averaging", "task_arithmetic λ=0.3",
        "TIES (dis-sum, top-20%, λ=0.3)"]
    assert not (run_dir / "results.json").exists()


def test_ctrl_c_ends_a_sweep_not_only_its_job(cache, tmp_path):
    """A sweep goes on past a failed job, but Ctrl-C is no failed job: nothing after it runs."""
    build_zoo()
    sweep = tmp_path / "sweep"
    proc = tint("merge", "-m", *TINY, "method=tinting", "method.epochs=100000", "seed=0,1",
                f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and \
                not (sweep / "0" / "results.partial.json").exists():
            time.sleep(0.2)
        time.sleep(1)  # into the first job's adaptation
        proc.send_signal(signal.SIGINT)
        code, _, err = finish(proc, timeout=90)  # a Ctrl-C that does not stop it fails here
    finally:
        proc.kill()
        proc.communicate()
    assert code == 130 and "error: interrupted (Ctrl-C)" in err
    assert "the sweep goes on" not in err
    assert not (sweep / "1").exists()  # the second job never started


def test_sigterm_stops_like_ctrl_c_with_its_own_status(cache, tmp_path):
    """SLURM's SIGTERM (time limit, pre-emption) killed the run on the spot: no message, no
    error field. Now it unwinds like Ctrl-C: status 143, one line, the rows kept."""
    build_zoo()
    run_dir = tmp_path / "terminated"
    proc = tint("merge", *TINY, "method=tinting", "method.epochs=100000",
                f"hydra.run.dir={run_dir}", cwd=tmp_path)
    partial = run_dir / "results.partial.json"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not partial.exists():
            time.sleep(0.2)
        time.sleep(1)  # into the adaptation
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc, timeout=90)  # a Ctrl-C that does not stop it fails here
    finally:
        proc.kill()
        proc.communicate()
    assert code == 143
    assert err.splitlines()[0] == "error: terminated (SIGTERM)"
    assert f"Rows finished before this (0 method row(s)): {partial}" in err.replace("\n", "")
    assert "Traceback" not in err
    kept = json.loads(partial.read_text())
    assert kept["error"] == "terminated"
    assert [r["name"] for r in kept["rows"]] == ["zero-shot", "experts"]


def test_ctrl_c_before_the_run_body_is_one_line_not_a_traceback(cache, tmp_path):
    """While the zoo builds (Hydra composed, no row yet): status 130, one line that says no
    row was finished, no KeyboardInterrupt traceback."""
    run_dir = tmp_path / "early"
    proc = tint("merge", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and \
                not (run_dir / ".hydra").exists():
            time.sleep(0.05)
        time.sleep(0.5)  # building the zoo (the cache is empty)
        proc.send_signal(signal.SIGINT)
        code, _, err = finish(proc, timeout=90)  # a Ctrl-C that does not stop it fails here
    finally:
        proc.kill()
        proc.communicate()
    assert code == 130
    assert err.splitlines()[:2] == ["error: interrupted (Ctrl-C)",
                                    "  No method row was finished yet."]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


# ---------------------------------------------------------- 2. one run directory per run


def test_two_runs_started_together_get_their_own_run_directories(cache, tmp_path):
    build_zoo()
    procs = [tint("merge", *TINY, "method=weight_averaging", f"seed={seed}", cwd=tmp_path)
             for seed in (0, 1)]
    for proc in procs:
        code, _, err = finish(proc, timeout=90)  # a Ctrl-C that does not stop it fails here
        assert code == 0, err
    dirs = sorted((tmp_path / "runs" / "merge").iterdir())
    assert len(dirs) == 2
    for folder in dirs:  # each results.json belongs with its own .hydra record
        results = json.loads((folder / "results.json").read_text())
        overrides = (folder / ".hydra" / "overrides.yaml").read_text()
        assert f"seed={results['seed']}" in overrides
    assert {json.loads((d / "results.json").read_text())["seed"] for d in dirs} == {0, 1}


def test_one_run_directory_is_never_shared_by_two_runs(cache, tmp_path):
    build_zoo()
    run_dir = tmp_path / "same"
    procs = [tint("merge", *TINY, "method=weight_averaging", f"seed={seed}",
                  f"hydra.run.dir={run_dir}", cwd=tmp_path) for seed in (0, 1)]
    outcomes = [finish(proc) for proc in procs]
    assert sorted(code for code, _, _ in outcomes) == [0, 2]
    (loser,) = [err for code, _, err in outcomes if code == 2]
    assert ("is in use by another tint run" in loser.splitlines()[0]
            or "already exists" in loser.splitlines()[0])
    results = json.loads((run_dir / "results.json").read_text())
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert f"seed={results['seed']}" in overrides and "seed=" + str(1 - results["seed"]) \
        not in overrides


# --------------------------------------------------------- 3. two cold builds at once


def test_cold_builds_at_once_build_once_and_leave_a_sound_cache(cache, tmp_path):
    """Three processes build the same empty cache together; the larger pretraining splits
    widen the window in which their writes overlap (before the cache design, a fixed
    temporary name broke one build in two trials, and the cache for good)."""
    bigger = [*TINY, "encoder.zoo.pretrain.images_per_family=1500"]
    procs = [tint("zoo", "build", *bigger, cwd=tmp_path) for _ in range(3)]
    for proc in procs:
        code, _, err = finish(proc, timeout=90)  # a Ctrl-C that does not stop it fails here
        assert code == 0, err
    assert not list(cache.rglob("*.tmp")), "a temporary build folder was left behind"
    console = Console(record=True, width=200)
    build_zoo(bigger[2:], console=console)
    assert "Building" not in recorded(console) and "rebuilding" not in recorded(console)
    code, out, err = finish(tint("merge", *bigger, "method=weight_averaging",
                                 f"hydra.run.dir={tmp_path / 'after'}", cwd=tmp_path))
    assert code == 0, err


# ------------------------------------------------------------ 4. damage is never used


def flip_bytes(path: Path, at: int = -64, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[at + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_pretrained_encoder_is_rebuilt_before_any_expert_trains_from_it(cache):
    zoo = build_zoo()
    pretrained_file = zoo.pretrained_file
    good = pretrained_file.read_bytes()
    flip_bytes(pretrained_file)
    shutil.rmtree(zoo.entries["digits"].expert_file.parent)  # an expert to build from it
    console = Console(record=True, width=300)
    rebuilt = build_zoo(console=console)
    text = recorded(console)
    assert "rebuilding the synth_vit_tiny pretrained encoder" in text
    assert "pretrained.safetensors does not match its recorded sha256" in text
    assert pretrained_file.read_bytes() == good  # the build is deterministic: same weights
    digits = json.loads((rebuilt.entries["digits"].expert_file.parent / "manifest.json")
                        .read_text())
    assert digits["key"]["inputs"]["pretrained"] == rebuilt.pretrained_sha256


def test_experts_built_from_another_pretrained_encoder_are_rebuilt(cache):
    """A changed input invalidates what was built from it: here the pretrained entry is
    replaced by a valid one with other weights (as a changed recipe would)."""
    from tintcli import cache as tint_cache
    from tintcli.io import load_state_dict, save_state_dict
    from tintcli.workbench import Workbench

    def realism_verdicts() -> set:
        Workbench.load(compose_config(overrides=["device=cpu"]), Console(quiet=True)).realism()
        return {p for p in (zoo.root / "realism").iterdir() if p.is_dir()}

    zoo = build_zoo()
    first = realism_verdicts()
    entry = zoo.pretrained_file.parent
    state = load_state_dict(zoo.pretrained_file, "pretrained")
    state["norm.bias"] = state["norm.bias"] + 0.5
    manifest = json.loads((entry / "manifest.json").read_text())
    extra = {k: v for k, v in manifest.items() if k not in ("format", "key", "files",
                                                             "built_at")}

    captions = (entry / "captions.safetensors").read_bytes()

    def build(folder):
        save_state_dict(state, folder / "pretrained.safetensors")
        (folder / "captions.safetensors").write_bytes(captions)
        return extra

    shutil.rmtree(entry)
    tint_cache.ensure(entry, manifest["key"], build, "a replaced pretrained encoder")
    console = Console(record=True, width=300)
    rebuilt = build_zoo(console=console)
    text = recorded(console)
    for task in ("signs", "digits", "textures"):
        assert f"rebuilding the expert for '{task}': it was built from other inputs" in text
        assert rebuilt.entries[task].expert_sha256 != zoo.entries[task].expert_sha256
    # and the realism verdict, keyed by checkpoint contents, is measured again
    assert len(first) == 1 and len(realism_verdicts() - first) == 1


def test_flipped_pixels_in_the_data_cache_are_caught_and_regenerated(cache):
    first = load_synthetic("digits", "test", 20, 32, 0)
    (arrow,) = (cache / "data" / "synthetic").glob("digits-test-*/*.arrow")
    flip_bytes(arrow, at=len(arrow.read_bytes()) // 2)
    console_text = _stderr_of(lambda: load_synthetic("digits", "test", 20, 32, 0))
    again = load_synthetic("digits", "test", 20, 32, 0)
    assert "does not match its recorded sha256" in console_text
    assert torch.equal(first.images, again.images)


def test_a_truncated_arrow_file_is_rebuilt_not_a_crash(cache):
    first = load_synthetic("digits", "test", 20, 32, 0)
    (arrow,) = (cache / "data" / "synthetic").glob("digits-test-*/*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])
    again = load_synthetic("digits", "test", 20, 32, 0)
    assert torch.equal(first.images, again.images)


def _stderr_of(fn) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        fn()
    return buffer.getvalue()


@pytest.mark.parametrize("content", ["[1, 2, 3]", '{"format": 2}', '{"format": 3}',
                                     "not json at all", '{"format": 3, "files": {"x": 1}}'])
def test_a_manifest_of_the_wrong_shape_is_rebuilt_not_a_traceback(cache, content):
    zoo = build_zoo()
    manifest = zoo.entries["digits"].expert_file.parent / "manifest.json"
    manifest.write_text(content)
    console = Console(record=True, width=300)
    rebuilt = build_zoo(console=console)
    assert "rebuilding the expert for 'digits'" in recorded(console)
    assert rebuilt.entries["digits"].expert_sha256 == zoo.entries["digits"].expert_sha256


def test_a_missing_expert_file_is_rebuilt_by_the_next_run(cache, tmp_path):
    zoo = build_zoo()
    zoo.entries["digits"].expert_file.unlink()
    code, out, err = finish(tint("merge", *TINY, "method=weight_averaging",
                                 f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path))
    assert code == 0, err
    assert "rebuilding the expert for 'digits': expert.safetensors is missing" in out + err


# -------------------------------------------- 5. failures after the methods ran keep the rows


def _run_in_process(run_dir, overrides=()):
    from tintcli.recipes import merge

    cfg = compose_config(overrides=["device=cpu", *overrides])
    console = Console(record=True, width=200)
    return merge.run(cfg, run_dir, [], console), console


def test_a_damaged_realism_verdict_is_measured_again(cache, tmp_path, capsys):
    payload, _ = _run_in_process(tmp_path / "first")
    (value,) = (zoo_root(compose_config().encoder) / "realism").glob("*/value.json")
    value.write_text('{"checks": "garbage"')
    capsys.readouterr()
    again, _ = _run_in_process(tmp_path / "second")
    assert "rebuilding the benchmark's realism verdict: value.json does not match its " \
        "recorded sha256" in capsys.readouterr().err
    assert again["realism"] == payload["realism"]


def test_full_digests_catch_damage_behind_a_kept_mtime_and_results_say_which(cache, tmp_path,
                                                                             capsys):
    """Bytes overwritten in place with the mtime set back (`cp -p`, silent disk corruption)
    pass the memoised check (a stat), and results.json says the digests were memoised;
    digests=full hashes every file, catches it and rebuilds the expert."""
    from tintcli.io import set_digest_mode

    expert = build_zoo().entries["digits"].expert_file
    stat = expert.stat()
    with open(expert, "r+b") as f:  # same inode, same size
        f.seek(stat.st_size - 64)
        f.write(bytes(b ^ 0xFF for b in f.read(16)))
    os.utime(expert, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    try:
        memo, _ = _run_in_process(tmp_path / "memo", ["method=weight_averaging"])
        assert memo["digests"] == "memo"
        assert "does not match its recorded sha256" not in "".join(capsys.readouterr())
        full, _ = _run_in_process(tmp_path / "full", ["method=weight_averaging", "digests=full"])
    finally:
        set_digest_mode("memo")  # the process-wide default, for the tests after this one
    assert full["digests"] == "full"
    assert "rebuilding the expert for 'digits': expert.safetensors does not match its " \
        "recorded sha256" in "".join(capsys.readouterr()).replace("\n", "")


def test_a_read_only_cache_still_gives_the_results(cache, tmp_path, monkeypatch, capsys):
    """Root ignores file modes, so the read-only cache is made by refusing its locks."""
    build_zoo()
    from tintcli import cache as tint_cache

    class ReadOnlyLock:
        def __init__(self, path):
            pass

        def acquire(self, timeout=None):
            raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(tint_cache, "FileLock", ReadOnlyLock)
    payload, console = _run_in_process(tmp_path / "ro")
    assert "cannot store the benchmark's realism verdict" in capsys.readouterr().err
    assert (tmp_path / "ro" / "results.json").is_file()
    assert len(payload["realism"]["checks"]) == 5


@pytest.mark.parametrize("failing", [("results.json",), ("results.partial.json",),
                                     ("results.json", "results.partial.json")])
def test_a_full_disk_keeps_or_prints_every_row(cache, tmp_path, monkeypatch, failing):
    build_zoo()
    from tintcli.recipes import merge

    real = merge.write_json

    def full_disk(path, payload):
        if Path(path).name in failing:
            raise OSError(28, "No space left on device", str(path))
        real(path, payload)

    monkeypatch.setattr(merge, "write_json", full_disk)
    monkeypatch.setattr("tintcli.tracking.write_json", full_disk)
    if failing == ("results.partial.json",):  # the rows could not be flushed, but the
        payload, console = _run_in_process(tmp_path / "full")  # results could: a warning
        assert "cannot save rows to" in recorded(console)
        assert json.loads((tmp_path / "full" / "results.json").read_text())["rows"] == \
            json.loads(json.dumps(payload["rows"]))
        return
    with pytest.raises(TintError) as err:
        _run_in_process(tmp_path / "full")
    first, *rest = str(err.value).splitlines()
    assert first.startswith("cannot write") and "No space left on device" in first
    if failing == ("results.json",):
        kept = json.loads((tmp_path / "full" / "results.partial.json").read_text())
        assert [r["name"] for r in kept["rows"]][-1] == "TIES (dis-sum, top-20%, λ=0.3)"
    else:  # nothing could be saved: the rows were printed instead
        assert "the table above holds them" in rest[-1]


def test_an_unusable_run_directory_is_one_clear_line(cache, tmp_path):
    for run_dir, why in (("/proc/x", "cannot use /proc/x as the run directory"),
                         ("/proc", "cannot use /proc as the run directory")):
        code, _, err = finish(tint("merge", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path))
        assert code == 2
        assert err.splitlines()[0].startswith(f"error: {why}")
        assert "Traceback" not in err


def test_a_rerun_keeps_an_interrupted_runs_rows(cache, tmp_path):
    run_dir = tmp_path / "again"
    run_dir.mkdir()
    (run_dir / "results.partial.json").write_text('{"rows": ["earlier"]}')
    _run_in_process(run_dir, ["method=weight_averaging"])
    assert json.loads((run_dir / "results.partial.1.json").read_text()) == {"rows": ["earlier"]}
    assert (run_dir / "results.json").is_file()


# ------------------------------------------ 6.-7. bad values: one line, before any work


BAD_VALUES = [
    ("seed=abc", "seed=abc must be a whole number >= 0"),
    ("device=gpu", "device=gpu is not a device torch knows; use auto, cpu, cuda or cuda:<index>"),
    ("method=task_arithmetic method.lam=nan",
     "bad parameters for method 'task_arithmetic': lam=nan must be a finite number"),
    ("method=ties method.top_k=150",
     "bad parameters for method 'ties': top_k=150 must be a percentage in [0, 100]"),
    ("tasks.test_size=-5", "tasks.test_size=-5 must be a whole number >= 1"),
    ("tasks.seed=0.5", "tasks.seed=0.5 must be a whole number >= 0"),
    # a mandatory setting left unset (???): OmegaConf raised MissingMandatoryValue in the run
    ("pool=local", "pool.path is not set"),
    # a method's device: torch's RuntimeError once the SVDs began
    ("method=tsv_m method.device=gpu", "bad parameters for method 'tsv_m': device=gpu is not a "
     "device torch knows; use auto, cpu, cuda or cuda:<index>"),
    ("method=iso_c method.device=ipu", "bad parameters for method 'iso_c': device=ipu names an "
     "ipu device; tint runs on cpu or cuda: use auto, cpu or cuda"),
    # Consensus TA's values that ran: a negative α, a mask no entry can pass, a task not in the
    # set (refused only once the merge began)
    ("method=consensus_ta method.alpha=-1",
     "bad parameters for method 'consensus_ta': alpha=-1 must be a positive number"),
    ("method=consensus_ta method.min_agreement=10", "bad parameters for method 'consensus_ta': "
     "min_agreement=10 is more than the 3 task(s) of the task set: no entry would be kept and "
     "the merge would be θ0; use a value from 1 to 3"),
    ("method=consensus_ta method.lambdas={foo:0.5,signs:0.3}", "bad parameters for method "
     "'consensus_ta': lambdas must name exactly the tasks of the set (signs, digits, "
     "textures); missing: digits, textures; not in the set: foo"),
    ("method=iso_cts method.orientation=timm", "bad parameters for method 'iso_cts': "
     "orientation=timm must be one of: open_clip, hf"),
    ("method=iso_c method.patience=0", "bad parameters for method 'iso_c': patience=0 must be a "
     "whole number >= 1 (grid points without a better validation average before the search "
     "stops), or null for the whole grid"),
]


def test_a_bad_value_fails_in_one_line_before_the_zoo_loads(cache, tmp_path):
    """End to end, once: status 2, the one error line, no traceback, nothing built."""
    code, _, err = finish(tint("merge", *TINY, "seed=abc", f"hydra.run.dir={tmp_path / 'bad'}",
                               cwd=tmp_path))
    assert code == 2
    assert err.splitlines()[0] == "error: seed=abc must be a whole number >= 0"
    assert "Traceback" not in err
    assert not (cache / "zoo").exists()  # nothing was built or loaded


@pytest.mark.parametrize("override, message", BAD_VALUES)
def test_each_bad_value_is_its_own_line_before_the_zoo_loads(cache, tmp_path, override,
                                                             message):
    """The same checks in process (what `tint merge` runs before any work, the line the CLI
    prints after its 'error: '), for every kind of bad value."""
    from tintcli.cli import check_settings_set
    from tintcli.recipes import merge

    cfg = compose_config(overrides=override.split())
    with pytest.raises(TintError) as err:
        check_settings_set(cfg)
        merge.run(cfg, tmp_path / "bad", [], Console(quiet=True))
    assert str(err.value).splitlines()[0] == message
    assert not (cache / "zoo").exists()  # nothing was built or loaded


def _with_memory_models() -> list[str]:
    from tintcli.methods import registered

    return [name for name, method in registered().items() if method.memory is not None]


@pytest.mark.parametrize("name", _with_memory_models())
def test_every_methods_memory_model_is_checked_before_any_work(cache, tmp_path, name):
    """A method that declares its memory (WEMoE, Surgery, ProbSurgery) is refused before the
    zoo loads when it cannot fit (here: memory_limit_gib far below the tiny encoder's
    needs), naming its size; Surgery's model was declared nowhere and never checked."""
    from tintcli.recipes import merge

    cfg = compose_config(overrides=[f"method={name}", "memory_limit_gib=0.00001"])
    with pytest.raises(TintError, match=r"needs about [\d.]+ MiB on cpu .* and "
                                        r"memory_limit_gib=1e-05"):
        merge.run(cfg, tmp_path / "bad", [], Console(quiet=True))
    assert not (cache / "zoo").exists()


# ------------------------------------- 8. a stopped run, rerun, ends as if never stopped

FAST = ["method=data_free", "+method@method.methods.adamerging_task=adamerging",
        "method.methods.adamerging_task.granularity=task", "method.methods.adamerging_task.steps=2",
        "+method@method.methods.adamerging=adamerging", "method.methods.adamerging.steps=4",
        "checkpoint_every=2"]


def test_a_run_stopped_by_sigterm_resumes_its_rows_and_checkpoint_to_the_same_numbers(
        tiny_cache, tmp_path, monkeypatch):
    """SLURM's requeue, on the tiny config: stopped by SIGTERM (Terminated) at a fixed step of
    layer-wise AdaMerging, then run again with the same config in the same run directory: the
    rows finished before the stop are kept, not redone, AdaMerging goes on from its last
    checkpoint, and every number equals an uninterrupted run's."""
    from tintcli.adaptation import AdaptationContext
    from tintcli.errors import Interrupted, Terminated

    whole, _ = _run_in_process(tmp_path / "whole", FAST)
    report, calls = AdaptationContext.report, []

    def stop_at_the_fourth_step(self, done, total, loss, merger):
        calls.append(done)
        if len(calls) == 2 + 3:  # task-wise AdaMerging's 2 steps, then layer-wise's third
            raise Terminated()
        report(self, done, total, loss, merger)

    monkeypatch.setattr(AdaptationContext, "report", stop_at_the_fourth_step)
    with pytest.raises(Interrupted, match="terminated"):
        _run_in_process(tmp_path / "stopped", FAST)
    monkeypatch.setattr(AdaptationContext, "report", report)
    assert (tmp_path / "stopped" / "checkpoints" / "adamerging" / "checkpoint.json").exists()
    resumed, console = _run_in_process(tmp_path / "stopped", FAST)
    text = recorded(console)
    names = [r["name"] for r in whole["rows"] if r["kind"] == "merged"]
    assert text.count("(resumed)") == names.index("AdaMerging (layer-wise)")  # those before
    assert "note: resuming from step 3 (checkpoint in" in text  # saved as it was stopped
    for mine, theirs in zip(resumed["rows"], whole["rows"], strict=True):  # λ, curves, ...
        assert json.dumps(mine).replace(str(tmp_path / "stopped"), "RUN") == \
            json.dumps(theirs).replace(str(tmp_path / "whole"), "RUN")


def test_ctrl_c_that_an_extension_swallows_still_stops_the_run_as_ctrl_c(tiny_cache, tmp_path,
                                                                        monkeypatch):
    """Ctrl-C landing while pyarrow calls back into Python (it reads `datasets`' image
    columns that way) is swallowed there and surfaces as pyarrow's own error ("ArrowInvalid:
    Schema at index 0 was different"; seen on CI): the run must still end as interrupted,
    exit 130 with its finished rows kept, not as a failure with a traceback."""
    from tintcli import errors
    from tintcli.adaptation import AdaptationContext

    def ctrl_c_inside_an_extension(self, done, total, loss, merger):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # the real signal, through tint's handler
            time.sleep(1)
        except KeyboardInterrupt:
            raise ValueError("Schema at index 0 was different") from None  # what pyarrow does

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    errors.install_stop_handlers()
    try:
        monkeypatch.setattr(AdaptationContext, "report", ctrl_c_inside_an_extension)
        with pytest.raises(errors.Interrupted, match="interrupted") as stop:
            _run_in_process(tmp_path / "stopped", FAST)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        errors._RECEIVED.clear()  # this process's later tests were never stopped
    assert stop.value.exit_code == 130
    assert "results.partial.json" in str(stop.value)  # where the finished rows are
