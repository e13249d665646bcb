"""`tint` end to end through its command line, as a researcher would run it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, compose_config
from safetensors.torch import load_file


def test_help_lists_the_subcommands(run_tint):
    out = run_tint("--help")
    assert out.returncode == 0
    assert "merge" in out.stdout and "zoo build" in out.stdout


def test_merge_runs_the_table_and_records_everything(run_tint, tmp_path):
    run_dir = tmp_path / "run"
    out = run_tint("merge", *TINY, f"hydra.run.dir={run_dir}", "save_merged=true")
    assert out.returncode == 0, out.stderr
    results = json.loads((run_dir / "results.json").read_text())
    names = [row["name"] for row in results["rows"]]
    assert names == ["zero-shot", "experts", "weight_averaging", "task_arithmetic λ=0.3",
                     "TIES (dis-sum, top-20%, λ=0.3)"]
    for row in results["rows"]:
        assert set(row["accuracy"]) == {"signs", "digits", "textures"}
        assert abs(row["average"] - sum(row["accuracy"].values()) / 3) < 1e-9
    experts, ties = results["rows"][1], results["rows"][-1]
    normalized = [ties["accuracy"][t] / experts["accuracy"][t] for t in experts["accuracy"]]
    assert abs(ties["normalized_average"] - sum(normalized) / 3) < 1e-12  # over each expert
    assert results["config"]["method"]["methods"]["ties"]["top_k"] == 20
    assert results["seed"] == 0 and results["versions"]["torch"]
    assert set(results["checkpoints"]["experts"]) == {"signs", "digits", "textures"}
    assert len(results["realism"]["task_arithmetic_sweep"]) == 10
    assert (run_dir / ".hydra" / "config.yaml").exists()
    for label in ("zero-shot", "experts", "weight_averaging", "TIES", "benchmark realism"):
        assert label in out.stdout
    # the saved merged encoder is the one that was scored: loaded back, it scores the same
    from conftest import compose_config
    from rich.console import Console

    from tintcli.workbench import Workbench

    bench = Workbench.load(compose_config(overrides=["device=cpu"]), Console(quiet=True))
    for key, row in zip(("weight_averaging", "task_arithmetic", "ties"), results["rows"][2:],
                        strict=True):
        assert bench.score(load_file(run_dir / "merged" / f"{key}.safetensors")) == \
            row["accuracy"], key

    # a rerun into the same directory must not clobber the finished run
    before = (run_dir / "results.json").read_bytes()
    again = run_tint("merge", *TINY, f"hydra.run.dir={run_dir}")
    assert again.returncode == 2
    assert again.stderr.splitlines()[0].startswith("error: ")
    assert "already exists" in again.stderr.splitlines()[0]
    assert (run_dir / "results.json").read_bytes() == before


def test_single_method_matches_the_python_api(tint_here, tmp_path, tiny_cache):
    import torch
    from conftest import compose_config

    from tintcli.encoders import build_encoder
    from tintcli.evaluation import evaluate_state
    from tintcli.merging import task_arithmetic_merge
    from tintcli.runtime import Runtime
    from tintcli.tasks import load_split, task_names
    from tintcli.zoo import ensure_zoo

    out = tint_here("merge", *TINY, "method=task_arithmetic", "method.lam=0.7",
                   f"hydra.run.dir={tmp_path / 'ta'}")
    assert out.returncode == 0, out.stderr
    row = json.loads((tmp_path / "ta" / "results.json").read_text())["rows"][-1]
    assert row["name"] == "task_arithmetic λ=0.7"
    assert "steps" not in out.stdout  # (no row learns: no step path in the title)

    cfg = compose_config()
    tasks = task_names(cfg.tasks)
    zoo = ensure_zoo(cfg.encoder, cfg.tasks, tasks, torch.device("cpu"))
    pre = zoo.pretrained()
    merged = task_arithmetic_merge(pre, {t: zoo.expert(t, pre) for t in tasks}, lam=0.7)
    acc = evaluate_state(build_encoder(cfg.encoder), merged, {t: zoo.head(t) for t in tasks},
                         {t: (lambda s: (s.images, s.labels))(
                             load_split(cfg.tasks, cfg.encoder, t, "test")) for t in tasks},
                         Runtime.create(torch.device("cpu"), cfg.encoder, "fp32"))
    assert row["accuracy"] == acc


def test_multirun_sweep_prints_and_writes_a_summary(tint_here, tmp_path):
    sweep = tmp_path / "sweep"
    out = tint_here("merge", "-m", *TINY, "method=task_arithmetic", "method.lam=0.1,0.9",
                   f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr
    summary = json.loads((sweep / "sweep.json").read_text())
    assert [job["rows"][-1]["params"]["lam"] for job in summary["jobs"]] == [0.1, 0.9]
    assert "sweep summary" in out.stdout
    assert (sweep / "0" / "results.json").exists() and (sweep / "1" / "results.json").exists()


def test_cfg_job_prints_the_composed_config_without_running(tint_here, tmp_path):
    out = tint_here("merge", *TINY, "method=ties", "method.merge=mean", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "merge: mean" in out.stdout and "name: synth_tiny" in out.stdout
    assert not (tmp_path / "runs").exists()


def _first_line(out):
    return out.stderr.strip().splitlines()[0]


def test_unknown_task_is_a_one_line_error(tint_here):
    out = tint_here("merge", *TINY, "tasks.names=[digits,nope]")
    assert out.returncode == 2
    assert _first_line(out) == "error: unknown task 'nope' in tasks 'synth_tiny'"
    assert "Traceback" not in out.stderr


def test_unknown_method_and_bad_override_are_clear(tint_here):
    out = tint_here("merge", *TINY, "method=nope")
    assert out.returncode != 0
    assert "Could not find 'method/nope'" in _first_line(out)
    assert "Traceback" not in out.stderr
    out = tint_here("merge", *TINY, "method=ties", "method.lamda=0.5")
    assert out.returncode == 2
    assert _first_line(out) == "error: method=ties has no setting 'method.lamda'"
    assert out.stderr.splitlines()[1].strip() == "method has: name, top_k, merge, lam, label"
    assert "Traceback" not in out.stderr and not (Path.cwd() / "runs").exists()


@pytest.mark.parametrize("args, first, has", [
    (["method=all", "method.methods.tsv_m.nonexistent=1"],
     "method=all has no setting 'method.methods.tsv_m.nonexistent'",
     "method.methods.tsv_m has: name, alpha, device, grid, patience"),
    # a sweep over methods: the one that lacks the setting is named
    (["method=tsv_m,ties", "method.alpha=1.0"], "method=ties has no setting 'method.alpha'",
     "method has: name, top_k, merge, lam, label"),
    (["method=iso_c", "method.alpha.x=1"], "method=iso_c has no setting 'method.alpha.x'",
     "method.alpha is a value, not a group"),
])
def test_a_setting_the_method_lacks_is_one_line_naming_what_it_has(tint_here, args, first,
                                                                     has):
    out = tint_here("merge", *(["-m"] if "," in " ".join(args) else []), *TINY, *args)
    assert out.returncode == 2
    assert _first_line(out) == f"error: {first}"
    assert out.stderr.splitlines()[1].strip().startswith(has)
    assert "Traceback" not in out.stderr and not (Path.cwd() / "runs").exists()


def test_a_setting_the_method_has_passes_the_check(tint_here):
    out = tint_here("merge", *TINY, "method=tsv_m", "method.alpha=1.0", "method.grid.alpha=[1]",
                    "--cfg", "job")
    assert out.returncode == 0, out.stderr


def test_the_readmes_python_route_composes_the_config_by_itself(tmp_path):
    """The block of docs/python-api.md (the README's "Python API") that composes tint's
    config, run alone as it is in a fresh interpreter: nothing registers the methods'
    declared parameters beforehand (it failed with "Could not load 'method/declared/ties'"
    unless register_configs() was called)."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text()
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("from hydra import compose"))
    block = []
    for line in lines[start:]:
        if line.startswith("```"):
            break
        block.append(line)
    script = tmp_path / "compose.py"
    script.write_text("\n".join(block))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "0.4" in out.stdout  # the block prints the method's config it composed


def test_unknown_command(tint_here):
    out = tint_here("mrege")
    assert out.returncode == 2
    assert _first_line(out) == ("error: unknown command 'mrege'; tint has: merge, bench, "
                                "zoo build, convert, table, cache verify")


def test_zoo_build_reports_realism(tint_here):
    out = tint_here("zoo", "build", *TINY)
    assert out.returncode == 0, out.stderr
    assert "benchmark realism" in out.stdout and "zero-shot" in out.stdout


def test_experiment_presets_compose():
    from conftest import compose_config

    cfg = compose_config(overrides=["+experiment=synth8_ta_sweep"], tiny=False)
    assert cfg.method.name == "task_arithmetic" and cfg.tasks.name == "synth8"
    cfg = compose_config(overrides=["+experiment=synth8_table"], tiny=False)
    assert set(cfg.method.methods) == {"weight_averaging", "task_arithmetic", "ties",
                                       "consensus_ta", "tsv_m", "iso_c", "iso_cts", "emr",
                                       "pcb", "lines_ta", "cart"}  # every data-free row
    # TIES dis-mean is the original paper's, at its own lambda (about 1), and says so
    cfg = compose_config(overrides=["method=ties_mean"])
    assert (cfg.method.merge, cfg.method.lam) == ("mean", 1.0)
    assert cfg.method.label == "TIES (dis-mean, top-20%, λ=1.0)"
    cfg = compose_config(overrides=["method=ties", "method.lam=0.5"])
    assert cfg.method.label == "TIES (dis-sum, top-20%, λ=0.5)"
    cfg = compose_config(overrides=["+experiment=synth8_adaptive"], tiny=False)
    methods = cfg.method.methods
    assert methods.adamerging_task.granularity == "task" and methods.adamerging_pp.ties_top_k == 20
    assert methods.tinting.sampler == "all" and methods.tinting_pp.sampler == "confidence"


def test_wandb_offline_run_is_recorded(run_tint, tmp_path):
    out = run_tint("merge", *TINY, "method=weight_averaging", f"hydra.run.dir={tmp_path / 'wb'}",
                   "tracking.wandb.enabled=true", "tracking.wandb.mode=offline")
    assert out.returncode == 0, out.stderr
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_merging_functions_are_importable_from_the_package():
    import tintcli

    assert tintcli.ties_merge is tintcli.merging.ties.ties_merge
    assert tintcli.tinting_merge is tintcli.adaptation.tinting.tinting_merge
    from tintcli.methods import registered

    assert {"weight_averaging", "task_arithmetic", "ties", "adamerging",
            "tinting"} <= set(registered())


def test_adaptive_methods_over_seeds_give_mean_and_std(tint_here, tmp_path):
    sweep = tmp_path / "seeds"
    out = tint_here("merge", "-m", *TINY, "method=tinting_pp", "method.epochs=2", "seed=0,1",
                   "save_merged=true", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr
    assert "mean ± std over seeds 0, 1" in out.stdout
    assert "cpu fp32 · eager steps" in " ".join(out.stdout.split())  # the steps' path
    summary = json.loads((sweep / "sweep.json").read_text())
    (group,) = summary["over_seeds"]
    assert group["seeds"] == [0, 1]
    runs = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    tinted = [r["rows"][-1] for r in runs]
    row = next(r for r in group["rows"] if r["name"] == "Model Tinting++")
    assert abs(row["average"]["mean"] - (tinted[0]["average"] + tinted[1]["average"]) / 2) < 1e-9
    # the seed drives the adaptation batches; the spread is the sample std over seeds
    assert tinted[0]["adaptation"]["loss_curve"] != tinted[1]["adaptation"]["loss_curve"]
    import statistics

    assert row["average"]["std"] == statistics.stdev([t["average"] for t in tinted])

    first = tinted[0]
    assert first["params"]["sampler"] == "confidence" and first["params"]["epochs"] == 2
    curve = first["adaptation"]["loss_curve"]
    assert len(curve["loss"]) == 2 and curve["unit"].startswith("epoch")
    lambdas = first["adaptation"]["lambdas"]
    assert len(lambdas["values"]) == len(lambdas["layers"]) > 10
    assert lambdas["tasks"] == ["signs", "digits", "textures"]
    files = first["adaptation"]["files"]
    assert open(files["heatmap"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    tints = load_file(files["tints"])
    assert {"signs.weight", "signs.bias", "textures.weight"} <= set(tints)
    assert load_file(files["lambdas"])["lambdas"].shape == (len(lambdas["layers"]), 3)
    assert "blocks.0.attn.qkv.weight" in load_file(files["merged"])


def test_sampler_group_sets_the_tinting_sampler(tint_here):
    out = tint_here("merge", *TINY, "method=tinting", "sampler=confidence", "--cfg", "job",
                   "--resolve")
    assert out.returncode == 0, out.stderr
    assert "sampler: confidence" in out.stdout


def test_a_failing_method_keeps_the_rows_already_finished(tiny_cache, tmp_path, monkeypatch):
    from conftest import compose_config
    from rich.console import Console

    from tintcli.errors import TintError
    from tintcli.recipes import merge

    def fail(name, *args, **kwargs):
        raise TintError(f"{name} broke")

    monkeypatch.setattr(merge, "adapt", fail)
    run_dir = tmp_path / "partial"
    cfg = compose_config(overrides=["method=all", "device=cpu"])
    with pytest.raises(TintError, match="adamerging broke") as err:
        merge.run(cfg, run_dir, [], Console(quiet=True))
    assert "Rows finished before this (11 method row(s))" in str(err.value)  # the data-free
    partial = json.loads((run_dir / "results.partial.json").read_text())
    names = [r["name"] for r in partial["rows"]]
    assert names[-1] == "cart λ=2.0 rank_fraction=0.12" and len(names) == 13
    assert partial["error"] == "adamerging broke"
    assert not (run_dir / "results.json").exists()


BAD_IN_A_TABLE = [
    ("method.methods.tinting.lr=nan", "bad parameters for method 'tinting': lr=nan must be a "
                                      "positive number"),
    ("method.methods.tinting.tint=blocks.9", "bad parameters for method 'tinting': "
                                             "tint=blocks.9 names no module of the encoder "
                                             "with weights"),
    ("method.methods.ties.lam=nan", "bad parameters for method 'ties': lam=nan must be a "
                                    "finite number"),
    ("method.methods.ties.top_k=150", "bad parameters for method 'ties': top_k=150 must be a "
                                      "percentage in [0, 100]"),
    ("method.methods.lot.exemplars=0", "bad parameters for method 'lot': exemplars=0 must be a "
                                       "whole number >= 1"),
    ("method.methods.wemoe.blocks=[7]", "bad parameters for method 'wemoe': blocks=[7]: block "
                                        "7 is not one of this encoder's 2 blocks (0 to 1)"),
    # the first method of the table whose memory model cannot fit (Surgery's is checked too)
    ("memory_limit_gib=0.001", "Surgery w/ AdaMerging needs about 7.8 MiB on cpu (synth_vit_tiny "
                               "× 3 tasks; largest: features, merged + experts' (10000 "
                               "images/task) 7.3 MiB; task vectors (3 x fp32) 0.3 MiB) and "
                               "memory_limit_gib=0.001"),
]


def test_a_bad_value_fails_before_any_work(tint_here, tmp_path):
    """End to end, once: the one line, no traceback, and in the run directory nothing but
    Hydra's files, the lock and error.json (no results, no partial rows)."""
    override, message = BAD_IN_A_TABLE[0]
    run_dir = tmp_path / "bad"
    out = tint_here("merge", *TINY, "method=all", override, f"hydra.run.dir={run_dir}")
    assert out.returncode == 2
    assert _first_line(out) == f"error: {message}"
    assert "Traceback" not in out.stderr
    assert {p.name for p in run_dir.iterdir()} == {".hydra", "merge.log", ".tint-run.lock",
                                                   "error.json"}
    assert json.loads((run_dir / "error.json").read_text())["error"] == message


@pytest.mark.parametrize("override, message", BAD_IN_A_TABLE)
def test_a_bad_value_of_any_method_in_a_table_fails_before_any_row(tmp_path, override,
                                                                    message):
    """In process, for each method of method=all: the whole table is checked first, so a
    bad value of its last method fails before its first row."""
    from rich.console import Console

    from tintcli.errors import TintError
    from tintcli.recipes import merge

    cfg = compose_config(overrides=["method=all", "device=cpu", override])
    with pytest.raises(TintError) as err:
        merge.run(cfg, tmp_path / "bad", [], Console(quiet=True))
    assert str(err.value).splitlines()[0] == message
    assert not (tmp_path / "bad" / "results.partial.json").exists()


STAND_IN = ["pool=stand_in", "tasks=vit8", "tasks.names=[eurosat,dtd,mnist]",
            "tasks.test_size=48", "tasks.data.dtd.test_images=24",  # dtd's split: 24 < the cap
            "encoder=clip_vit_b32", "encoder.num_classes=16", "encoder.image_size=32",
            "encoder.timm_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, "
            "num_heads: 2}"]


def test_bench_times_every_adaptation_step_at_the_stand_in_pools_real_sizes(tint_here, tmp_path):
    """`tint bench pool=stand_in`: no checkpoint, no dataset; each task's test split is
    generated at its real size (conf/task's test_images) under the tasks.test_size cap, and
    every step is timed on its real batches, on the path the table's title names."""
    out = tint_here("bench", *STAND_IN, "repeats=2", "warmup=1", "eval_repeats=1",
                   f"hydra.run.dir={tmp_path / 'b'}")
    assert out.returncode == 0, out.stderr
    payload = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert payload["step_path"] == "eager" and "eager steps" in out.stdout
    results = payload["results"]
    assert [r["step"].split()[0] for r in results] == ["AdaMerging", "LOT", "Surgery", "Model",
                                                       "WEMoE"]
    # AdaMerging's and WEMoE's steps take a batch of every task, Surgery's and Tinting's one
    # task's batch (a split smaller than a batch: all of it); LOT's closed form every task's
    # exemplars (64, or the whole smaller split)
    assert [r["batch"] for r in results] == [32 + 24 + 32, 48 + 24 + 48, 16, 32, 3 * 16]
    # each step's launches, counted by the profiler (Surgery's adapter step on cached
    # features launches far fewer than a forward+backward of the encoder)
    surgery = results[2]
    assert 0 < surgery["adaptive_ops"] < surgery["plain_ops"] / 2
    assert "ratio" in out.stdout
    # evaluation is timed over every task's whole test split, as a run scores it
    assert (payload["evaluation"]["tasks"], payload["evaluation"]["images"]) == (3, 120)
    assert set(payload["peak_memory"]) == {"evaluation", "adamerging", "lot", "surgery",
                                           "tinting", "wemoe"}
    models = {(m["encoder"], m["tasks"], m["vectors_dtype"]): m["terms"]
              for m in payload["memory_models"]}  # the README's rows
    assert models["clip_vit_l14", 20, "bf16"]["task vectors (20 x bf16)"] == \
        20 * 303_966_208 * 2
    # vit8's real test sets (87,433 images at 224 x 224), as pool=stand_in would make them
    assert models["clip_vit_b32", 8, "fp32"]["test pixels on the device (uint8)"] == \
        87_433 * 224 * 224 * 3
    assert models["clip_vit_b32", 3, "fp32"]["test pixels on the device (uint8)"] == \
        120 * 32 * 32 * 3
    # every method's own memory model (the registry's), printed and recorded
    from tintcli.methods import registered

    own = {name for name, method in registered().items() if method.memory is not None}
    assert {"wemoe", "surgery", "prob_surgery"} <= own
    assert {m["method"] for m in payload["learned_memory_models"]} == own
    assert "each method's own memory model" in out.stdout


def test_bench_times_whole_runs_end_to_end(tint_here, tmp_path):
    """parts=[run]: each of run_methods as tint merge runs it (its YAML's schedule: every step
    counted), timed whole; here on a stand-in of the tiny synthetic encoder (its heads as
    wide as its features). A data-free name is refused before anything is built."""
    common = ["bench", "pool=stand_in", *TINY, "device=cpu", "parts=[run]",
              "tinting.epochs=2", "adamerging.steps=3"]
    out = tint_here(*common, "run_methods=[tinting,adamerging]",
                    f"hydra.run.dir={tmp_path / 'r'}")
    assert out.returncode == 0, out.stderr
    runs = json.loads((tmp_path / "r" / "bench.json").read_text())["runs"]
    assert [(r["method"], r["steps"]) for r in runs] == [("tinting", 2 * 3), ("adamerging", 3)]
    assert all(r["seconds"] > 0 and r["peak"] > 0 for r in runs)
    assert "whole runs" in out.stdout
    out = tint_here(*common, "run_methods=[ties]", f"hydra.run.dir={tmp_path / 'bad'}")
    assert out.returncode != 0
    assert out.stderr.startswith("error: run_methods: ties learns nothing"), out.stderr
    assert not (tmp_path / "bad" / "bench.json").exists()


def test_merge_refuses_the_stand_in_pool_before_any_work(tmp_path):
    from tintcli.errors import TintError
    from tintcli.recipes.merge import check_run_config

    with pytest.raises(TintError, match="pool=stand_in has random weights"):
        check_run_config(compose_config(overrides=STAND_IN, tiny=False))


def test_bench_times_every_registered_data_free_merge_on_stand_in_shapes(tint_here, tmp_path):
    """parts=[merges] with merge_shapes: no benchmark is built, and the table lists every
    data-free method the registry has (not a hand-written list)."""
    from tintcli.methods import registered

    out = tint_here("bench", "parts=[merges]", "device=cpu",
                   "merge_shapes=[{encoder: synth_vit_tiny, tasks: 3, dtype: fp32}]",
                   f"hydra.run.dir={tmp_path / 'b'}")
    assert out.returncode == 0, out.stderr
    payload = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert payload["evaluation"] is None and payload["results"] == []
    data_free = {n for n, m in registered().items() if not m.adaptive}
    assert {m["method"] for m in payload["merges"]} == data_free
    assert all(m["merge_s"] > 0 and "synth_vit_tiny × 3" in m["where"] for m in payload["merges"])
    from omegaconf import OmegaConf

    from tintcli.errors import TintError
    from tintcli.recipes.bench import _parts

    with pytest.raises(TintError, match="^parts=speed is not a part tint bench measures"):
        _parts(OmegaConf.create({"parts": ["speed"]}))


def test_a_true_label_oracle_row_is_labelled_as_one(tint_here, tmp_path):
    """loss=crossgt learns from the test labels (refused without oracle=true: see
    test_adaptation); with oracle=true its row says so and maps to no paper row."""
    out = tint_here("merge", *TINY, "method=symerge", "method.loss=crossgt", "method.oracle=true",
                   "method.epochs=1", f"hydra.run.dir={tmp_path / 'yes'}")
    assert out.returncode == 0, out.stderr
    row = json.loads((tmp_path / "yes" / "results.json").read_text())["rows"][-1]
    assert row["name"] == "SyMerge (oracle: true labels)" and row["oracle"] is True
    assert row["reference"]["row"] == "oracle"


def test_bench_timing_is_the_median_of_the_timed_calls_after_warmup(monkeypatch):
    import torch

    from tintcli.recipes import bench

    # one warmup call of 100 s (ignored), then calls of 1, 5 and 2 s: median 2 (mean 2.67)
    clock, durations = [0.0], iter([100.0, 1.0, 5.0, 2.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def call() -> None:
        clock[0] += next(durations)

    assert bench._timed(call, torch.device("cpu"), warmup=1, repeats=3) == 2.0


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tint_here, tmp_path):
    sweep = tmp_path / "sweep"
    out = tint_here("merge", "-m", *TINY, "method=task_arithmetic", "method.lam=0.3,nan,0.5",
                   f"hydra.sweep.dir={sweep}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-2].startswith(
        "error: 1 of 3 sweep jobs failed: bad parameters for method 'task_arithmetic': "
        "lam=nan must be a finite number")
    assert (sweep / "0" / "results.json").exists() and (sweep / "2" / "results.json").exists()
    error = json.loads((sweep / "1" / "error.json").read_text())
    assert "lam=nan" in error["error"] and "method.lam=nan" in error["overrides"]
    summary = json.loads((sweep / "sweep.json").read_text())
    assert [job["dir"] for job in summary["failed"]] == [str(sweep / "1")]
    assert [job["rows"][-1]["params"]["lam"] for job in summary["jobs"]] == [0.3, 0.5]


def test_a_rerun_sweep_skips_finished_jobs_and_redoes_a_killed_one(tint_here, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "method=task_arithmetic", "method.lam=0.1,0.9",
            f"hydra.sweep.dir={sweep}"]
    assert tint_here("merge", *args).returncode == 0
    finished = (sweep / "0" / "results.json").stat().st_mtime_ns
    killed = sweep / "1" / "results.json"
    killed.rename(sweep / "1" / "results.partial.json")  # as a job killed before its end
    out = tint_here("merge", *args)
    assert out.returncode == 0, out.stderr
    assert f"finished already with this config, skipped: {sweep / '0' / 'results.json'}" in \
        out.stdout.replace("\n", "")
    assert (sweep / "0" / "results.json").stat().st_mtime_ns == finished
    assert killed.exists() and (sweep / "1" / "results.partial.1.json").exists()
    # the same folder with another config is not the same job: refused, not overwritten
    other = tint_here("merge", "-m", *TINY, "method=task_arithmetic", "method.lam=0.5",
                     f"hydra.sweep.dir={sweep}")
    assert other.returncode == 2 and "holds a finished run" in other.stderr
    assert (sweep / "0" / "results.json").stat().st_mtime_ns == finished
    assert not (sweep / "0" / "error.json").exists()  # the finished run's folder untouched


def test_wandb_logs_offline_as_it_trains_without_credentials(run_tint, tmp_path, monkeypatch):
    """The real wandb library, no credentials: offline mode, said so; the run file holds the
    loss and each task's lambda at every step, the rows, the group and the job type."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no netrc, no wandb settings
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    out = run_tint("merge", *TINY, "method=adamerging", "method.steps=3",
                   "tracking.wandb.enabled=true", f"hydra.run.dir={tmp_path / 'w'}")
    assert out.returncode == 0, out.stderr
    assert "W&B: offline (no credentials found); to upload: wandb sync" in \
        (out.stdout + out.stderr).replace("\n", "")
    (record,) = (tmp_path / "w" / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()
    assert data.count(b"adamerging/loss") >= 3  # one history record per step, as it trains
    assert all(f"adamerging/lambda/{t}".encode() in data for t in ("signs", "digits"))
    assert b"zero-shot/average" in data and b"results" in data
    assert b"adamerging" in data  # job_type
    # adaptive runs keep lambdas and heatmap; merged weights only with save_merged=true
    adapted = tmp_path / "w" / "adapted" / "adamerging"
    assert (adapted / "lambdas.safetensors").exists()
    assert not (adapted / "merged.safetensors").exists()
