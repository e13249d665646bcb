"""Shared fixtures: a private tint cache holding the tiny synthetic zoo, built once."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tintcli.paths import CONF_DIR

TINY = ["encoder=synth_vit_tiny", "tasks=synth_tiny"]


def compose_config(name: str = "merge", overrides: list[str] | None = None, tiny: bool = True):
    from tintcli.methods import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=[*(TINY if tiny else []), *(overrides or [])])


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """TINT_CACHE for the whole session, with the tiny zoo already built in it."""
    from tintcli.tasks import task_names
    from tintcli.zoo import ensure_zoo

    cache = tmp_path_factory.mktemp("tint-cache")
    previous = os.environ.get("TINT_CACHE")
    os.environ["TINT_CACHE"] = str(cache)
    cfg = compose_config()
    ensure_zoo(cfg.encoder, cfg.tasks, task_names(cfg.tasks), torch.device("cpu"))
    yield cache
    if previous is None:
        os.environ.pop("TINT_CACHE", None)
    else:
        os.environ["TINT_CACHE"] = previous


@pytest.fixture
def run_tint(tiny_cache, tmp_path):
    """Run the installed `tint` command as a user would, in a scratch working folder."""
    exe = shutil.which("tint", path=str(Path(sys.executable).parent))
    prefix = [exe] if exe else [sys.executable, "-m", "tintcli.cli"]

    def run(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "TINT_CACHE": str(tiny_cache), "COLUMNS": "200"}
        return subprocess.run([*prefix, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)

    return run


@pytest.fixture
def tint_here(tiny_cache, tmp_path, monkeypatch):
    """`tint` as ``run_tint`` runs it (the same arguments, exit code, stdout and stderr), but
    in this process: no second start of torch, timm and transformers (~3 s a call). For
    tests of what a command does, not of the process (signals, parallel runs keep run_tint)."""
    import contextlib
    import io
    import signal

    from hydra.core.global_hydra import GlobalHydra

    import tintcli.cli as cli
    from tintcli import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str) -> subprocess.CompletedProcess:
        for state in (cli.COMMAND, cli.RUN_DIRS, cli.FAILED):
            state.clear()
        tracking.SWEEP.clear()
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        argv, out, err = sys.argv, io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = cli.main(list(args))
                except SystemExit as exit_:
                    code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            sys.argv = argv
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            GlobalHydra.instance().clear()
            cli.IN_MAIN = False
        return subprocess.CompletedProcess(["tint", *args], code, out.getvalue(),
                                           err.getvalue())

    return run
