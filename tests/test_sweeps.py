"""Sweeps beyond one process: the Optuna search preset chooses on validation, the submitit
launcher (its local executor: each job a fresh process, as on a cluster node) survives a
failing job, and the joblib launcher runs two jobs at once on a cold cache."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import TINY

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
pytest.importorskip("hydra_plugins.hydra_joblib_launcher")

SEARCH = ["+experiment=synth8_ta_search", *TINY, "tasks.validation.fraction=0.5",
          "hydra.sweeper.n_trials=4"]


def _trials(sweep):
    return [json.loads((sweep / str(i) / "results.json").read_text())["rows"][-1]
            for i in range(4)]


def test_the_optuna_preset_picks_its_best_lambda_on_validation(tint_here, tmp_path):
    out = tint_here("merge", *SEARCH, f"hydra.sweep.dir={tmp_path / 'a'}")
    assert out.returncode == 0, out.stderr
    best = yaml.safe_load((tmp_path / "a" / "optimization_results.yaml").read_text())
    trials = _trials(tmp_path / "a")
    by_validation = max(trials, key=lambda r: r["validation"]["average"])
    assert best["best_value"] == by_validation["validation"]["average"]  # validation's number
    assert best["best_params"]["method.lam"] == by_validation["params"]["lam"]
    # seeded: the same trials again
    again = tint_here("merge", *SEARCH, f"hydra.sweep.dir={tmp_path / 'b'}")
    assert again.returncode == 0, again.stderr
    assert [r["params"]["lam"] for r in _trials(tmp_path / "b")] == \
        [r["params"]["lam"] for r in trials]


def test_a_search_refuses_to_choose_on_test(tint_here, tmp_path):
    out = tint_here("merge", *SEARCH, "objective.split=test", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 2
    assert "a search chooses on validation, never on test" in out.stderr


def test_submitit_jobs_run_in_their_own_processes_and_a_failure_is_recorded(run_tint,
                                                                             tmp_path):
    sweep = tmp_path / "sweep"
    out = run_tint("merge", "-m", "+launcher=submitit_local", *TINY, "method=task_arithmetic",
                   "method.lam=0.3,nan", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 2
    assert "error: 1 of 2 sweep jobs failed: bad parameters for method" in out.stderr
    assert (sweep / "0" / "results.json").exists()
    assert "lam=nan" in json.loads((sweep / "1" / "error.json").read_text())["error"]
    assert list(sweep.glob(".submitit/*"))  # they went through submitit


def test_two_parallel_jobs_on_a_cold_cache_build_it_once(tmp_path):
    """joblib runs both jobs at once in worker processes; both need the tiny zoo, which no
    one has built: the locked cache builds each entry once and both jobs finish."""
    cache, sweep = tmp_path / "cache", tmp_path / "sweep"
    env = {**os.environ, "TINT_CACHE": str(cache)}
    command = [sys.executable, "-m", "tintcli.cli", "merge", "-m", "+launcher=local_parallel",
               *TINY, "method=task_arithmetic", "method.lam=0.3,0.7", f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr
    # the jobs share the build: each entry is built by one of them while the other waits on
    # its lock (which job builds which expert is a race, so both may say they build)
    text = out.stdout + out.stderr
    assert 1 <= text.count("Building the synth_vit_tiny zoo") <= 2
    rows = [json.loads((sweep / str(i) / "results.json").read_text())["rows"] for i in (0, 1)]
    assert rows[0][:2] == rows[1][:2]  # the same zoo: the same zero-shot and expert rows
    assert not list(cache.rglob("*.tmp")), "a temporary build folder was left behind"
    assert len(list(cache.glob("zoo/*/pretrained/manifest.json"))) == 1
    assert len(list(cache.glob("zoo/*/tasks/*/manifest.json"))) == 3


def test_an_installed_package_composes_the_same_config_as_the_checkout(tmp_path):
    """A cluster node or a container has tint installed, not this source tree: the wheel
    carries the configs (pkg://tintcli.conf), and composes exactly what the checkout does."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(root)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("tintcli-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    show = ("import sys, tintcli; from tintcli.cli import main; print(tintcli.__file__); "
            "main(['merge', '+tasks=vit8', '+experiment=synth8_table', '--cfg', 'job'])")

    def compose(pythonpath):
        env = {**os.environ, "PYTHONPATH": pythonpath}
        out = subprocess.run([sys.executable, "-c", show], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout.split("\n", 1)

    installed_from, installed = compose(str(tmp_path / "site"))
    checkout_from, checkout = compose(str(root))
    assert installed_from.startswith(str(tmp_path / "site"))
    assert installed == checkout and "hub: tanganke/sun397" in installed


@pytest.mark.parametrize("encoder", ["b32", "b16", "l14"])
@pytest.mark.parametrize("count", [8, 14, 20])
def test_each_paper_table_preset_is_its_encoder_task_set_and_every_method(encoder, count):
    from conftest import compose_config

    cfg = compose_config(overrides=[f"+experiment=paper_{encoder}_{count}"], tiny=False)
    assert cfg.encoder.name == f"clip_vit_{encoder}" and len(cfg.tasks.names) == count
    assert cfg.pool.kind == "hf" and cfg.pool.base == cfg.encoder.hub.base
    assert set(cfg.method.methods) >= {"task_arithmetic", "ties", "adamerging", "tinting"}
    assert cfg.save_merged is False


def _job(folder, overrides, seed, average):
    folder.mkdir(parents=True)
    row = {"name": "ties", "kind": "merged", "average": average, "normalized_average": average,
           "accuracy": {"digits": average}}
    (folder / "results.json").write_text(json.dumps(
        {"overrides": overrides, "seed": seed, "tasks": ["digits"], "rows": [row]}))


def test_a_reused_sweep_folder_summarises_only_this_sweeps_jobs(tmp_path):
    """`top_k=20,150,10` and then `top_k=20,10 seed=0,1` into one folder: the old job 2
    (top_k=10, seed 0, left by the first sweep) was put into the new summary and averaged
    with job 2 of the new sweep as if a second seed. Only the new sweep's own jobs count."""
    from omegaconf import OmegaConf

    from tintcli.tracking import SweepSummary

    sweep = tmp_path / "sweep"
    new = [("method.top_k=20", 0), ("method.top_k=20", 1), ("method.top_k=10", 0),
           ("method.top_k=10", 1)]
    for num, (top_k, seed) in enumerate(new):
        _job(sweep / str(num), [top_k, f"seed={seed}"], seed, 0.5 + num / 10)
    _job(sweep / "4", ["method.top_k=10", "seed=0"], 0, 0.1)  # an earlier sweep's job 4
    config = OmegaConf.create({"hydra": {
        "sweep": {"dir": str(sweep)},
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": None},
        "overrides": {"task": ["method.top_k=20,10", "seed=0,1"]}}})
    SweepSummary().on_multirun_end(config)
    summary = json.loads((sweep / "sweep.json").read_text())
    assert [job["dir"] for job in summary["jobs"]] == [str(sweep / str(n)) for n in range(4)]
    assert [o["dir"] for o in summary["not_part_of_sweep"]] == [str(sweep / "4")]
    top_10 = next(g for g in summary["over_seeds"] if g["overrides"] == ["method.top_k=10"])
    assert top_10["seeds"] == [0, 1]
    assert top_10["rows"][0]["average"]["mean"] == pytest.approx((0.7 + 0.8) / 2)
