"""`tint table` on hand-made results.json files: rows by method and parameters, mean ± std
over seeds, the paper's numbers only where the setting matches, every output format."""

import csv
import io
import json

import pytest

from tintcli.recipes.table import find_results, gather, lambda_plot, records, render

TASKS = ["mnist", "svhn"]


def _row(name, method, params, acc, kind="merged", val=None):
    row = {"name": name, "kind": kind, "accuracy": dict(zip(TASKS, acc, strict=True)),
           "average": sum(acc) / len(acc), "normalized_average": sum(acc) / len(acc) / 0.9}
    if kind == "merged":
        row.update(method=method, params=params)
    if val is not None:
        row["validation"] = {"average": val}
    return row


def _write(folder, rows, seed=0, encoder="clip_vit_b32", tasks="vit8", pool="task_vectors",
           extra=None):
    folder.mkdir(parents=True)
    config = {"encoder": {"name": encoder}, "tasks": {"name": tasks},
              "pool": {"kind": pool}, "seed": seed, "method": {"name": "x"}, **(extra or {})}
    references = [_row("zero-shot", None, None, [0.4, 0.5], "reference"),
                  _row("experts", None, None, [0.9, 0.9], "reference")]
    (folder / "results.json").write_text(json.dumps(
        {"config": config, "seed": seed, "tasks": TASKS, "rows": references + rows}))


def test_rows_are_methods_and_parameters_averaged_over_seeds(tmp_path):
    # two seeds of the same TIES run, labelled differently; and TIES at another lambda
    _write(tmp_path / "a", [_row("TIES", "ties", {"lam": 0.3, "top_k": 20}, [0.7, 0.8])], 0)
    _write(tmp_path / "b", [_row("my ties", "ties", {"top_k": 20, "lam": 0.3}, [0.8, 0.9])], 1)
    _write(tmp_path / "c", [_row("TIES", "ties", {"lam": 0.5, "top_k": 20}, [0.1, 0.2])], 0)
    # a run that differs in more than the seed (another sampler) is another row
    _write(tmp_path / "d", [_row("TIES", "ties", {"lam": 0.3, "top_k": 20}, [0.2, 0.2])], 2,
           extra={"sampler": {"name": "confidence"}})
    (setting,) = gather(find_results([str(tmp_path)]))
    rows = records(setting)
    # zero-shot, experts, TIES at 0.3 (2 seeds), TIES at 0.5, TIES at 0.3 with the other sampler
    assert [(r["row"], r["seeds"]) for r in rows] == [
        ("zero-shot", 3), ("experts", 3), ("TIES", 2), ("TIES", 1), ("TIES", 1)]  # seeds 0-2
    ties = rows[2]
    assert ties["average"][0] == pytest.approx(0.8)  # mean of 0.75 and 0.85
    assert ties["average"][1] == pytest.approx(0.0707, abs=1e-4)  # sample std
    assert ties["mnist"][0] == pytest.approx(0.75)
    assert rows[0]["average"] == (pytest.approx(0.45), pytest.approx(0.0))
    assert rows[3]["params"] == {"lam": 0.5, "top_k": 20}
    assert ties["paper"] == 72.9  # SyMerge's table: TIES, ViT-B/32, 8 tasks, task_vectors


@pytest.mark.parametrize(("encoder", "tasks", "pool", "expected"), [
    ("clip_vit_l14", "vit20", "task_vectors", 73.0),
    ("clip_vit_b32", "vit8", "hf", 72.2),            # FusionBench's re-run
    ("clip_vit_b32", "vit14", "hf", "not comparable"),  # a setting no paper reports
    ("synth_vit", "synth8", "synth", "not comparable"),
])
def test_paper_numbers_only_where_the_setting_matches(tmp_path, encoder, tasks, pool, expected):
    _write(tmp_path / "r", [_row("TIES", "ties", {"lam": 0.3}, [0.7, 0.8])], encoder=encoder,
           tasks=tasks, pool=pool)
    (setting,) = gather(find_results([str(tmp_path)]))
    assert [r["paper"] for r in records(setting) if r["row"] == "TIES"] == [expected]


def test_adamerging_variants_take_their_own_reference(tmp_path):
    _write(tmp_path / "r", [
        _row("AdaMerging", "adamerging", {"granularity": "layer", "ties_top_k": None}, [.8, .8]),
        _row("AdaMerging++", "adamerging", {"granularity": "layer", "ties_top_k": 20}, [.8, .8]),
        _row("AdaMerging tw", "adamerging", {"granularity": "task", "ties_top_k": None}, [.7, .7]),
    ], pool="hf")
    (setting,) = gather(find_results([str(tmp_path)]))
    papers = {r["row"]: r["paper"] for r in records(setting)}
    assert papers == {"zero-shot": 48.2, "experts": 90.3, "AdaMerging": 82.6,
                      "AdaMerging++": None, "AdaMerging tw": 68.7}


def test_every_format_holds_the_same_numbers(tmp_path):
    _write(tmp_path / "r", [_row("task_arithmetic λ=0.3", "task_arithmetic", {"lam": 0.3},
                                 [0.625, 0.75])])
    (setting,) = gather(find_results([str(tmp_path)]))
    markdown = render(setting, "md")
    assert "| task_arithmetic λ=0.3 | 62.5 | 75.0 | 68.8 | 76.4 | 1 | 69.1 |" in markdown
    table = list(csv.reader(io.StringIO(render(setting, "csv"))))
    assert table[0][1:] == ["method", "mnist", "svhn", "avg", "norm", "seeds", "paper avg"]
    assert table[3][1:] == ["task_arithmetic λ=0.3", "62.5", "75.0", "68.8", "76.4", "1", "69.1"]
    latex = render(setting, "latex")
    assert r"task\_arithmetic λ=0.3 & 62.5 & 75.0 & 68.8 & 76.4 & 1 & 69.1 \\" in latex
    assert latex.startswith(r"\begin{tabular}{lrrrrrr}")


def test_a_lambda_sweep_gives_a_plot_and_a_single_run_none(tmp_path):
    for i, lam in enumerate((0.1, 0.3, 0.5)):
        _write(tmp_path / "sweep" / str(i), [_row(f"ta {lam}", "task_arithmetic", {"lam": lam},
                                                 [0.5 + lam / 10, 0.6], val=0.6 - abs(lam - 0.3))])
    (setting,) = gather(find_results([str(tmp_path / "sweep")]))
    assert lambda_plot(setting, tmp_path / "lambda.png")
    assert (tmp_path / "lambda.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _write(tmp_path / "one", [_row("ta", "task_arithmetic", {"lam": 0.3}, [0.5, 0.6])])
    (single,) = gather(find_results([str(tmp_path / "one")]))
    assert not lambda_plot(single, tmp_path / "none.png")


def test_the_command_reads_folders_and_says_what_is_wrong(tint_here, tmp_path):
    _write(tmp_path / "r", [_row("TIES", "ties", {"lam": 0.3}, [0.7, 0.8])])
    out = tint_here("table", str(tmp_path / "r"), "--format", "md", "--out",
                   str(tmp_path / "t.md"))
    assert out.returncode == 0, out.stderr
    assert "| TIES | 70.0 | 80.0 | 75.0 |" in (tmp_path / "t.md").read_text()
    missing = tint_here("table", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"error: {tmp_path / 'nowhere'} does not exist")


def test_each_setting_of_the_other_parameters_is_its_own_lambda_curve(tmp_path):
    """TIES swept over λ at top-k 10 and at top-k 20: two curves, never one mixed up."""
    from tintcli.recipes.table import lambda_sweeps

    for top_k in (10, 20):
        for i, lam in enumerate((0.1, 0.3, 0.5)):
            _write(tmp_path / f"k{top_k}" / str(i),
                   [_row("TIES", "ties", {"lam": lam, "top_k": top_k}, [top_k / 100, lam])])
    (setting,) = gather(find_results([str(tmp_path)]))
    curves = lambda_sweeps(setting)
    assert set(curves) == {"ties top_k=10", "ties top_k=20"}
    assert [p[0] for p in curves["ties top_k=10"]] == [0.1, 0.3, 0.5]
    assert curves["ties top_k=10"][0][1] == pytest.approx((0.10 + 0.1) / 2)


def test_a_damaged_results_file_is_skipped_with_a_warning_and_the_rest_printed(tint_here,
                                                                               tmp_path):
    """One job's results.json cut short (not JSON), another of the wrong shape: the table
    still comes, from the good run, with one warning line naming each damaged file."""
    _write(tmp_path / "sweep" / "0", [_row("TIES", "ties", {"lam": 0.3}, [0.7, 0.8])])
    cut = tmp_path / "sweep" / "1" / "results.json"
    cut.parent.mkdir()
    cut.write_text('{"config": {"encoder": {"na')
    shape = tmp_path / "sweep" / "2" / "results.json"
    shape.parent.mkdir()
    shape.write_text(json.dumps({"config": {"encoder": {"name": "clip_vit_b32"}},
                                 "rows": "none"}))
    out = tint_here("table", str(tmp_path / "sweep"), "--format", "md")
    assert out.returncode == 0, out.stderr
    assert "| TIES | 70.0 | 80.0 | 75.0 |" in out.stdout
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: skipped {cut}: not JSON (Unterminated string starting at: "
                        "line 1 column 25 (char 24))",
                        f"warning: skipped {shape}: no config.tasks.name"]
    assert "1 results.json file(s) (2 skipped), 1 setting(s)" in out.stdout

    # nothing usable left: the clear error, naming the first damaged file
    out = tint_here("table", str(cut.parent), str(shape.parent))
    assert out.returncode == 2
    assert f"error: {cut} is not a tint results.json (not JSON" in out.stderr
    assert "(and 1 more damaged)" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(("damage", "why"), [
    (lambda r: r.update(rows=[]), "no 'rows' list, or it is empty"),
    (lambda r: r["rows"][2].update(average="n/a"), "rows[2]: 'average' is missing or not a"),
    (lambda r: r["rows"][2]["accuracy"].update(svhn=None), "rows[2]: 'accuracy' is missing"),
    (lambda r: r.update(tasks="mnist"), "no 'tasks' list of task names"),
    (lambda r: r.update(seed=[0]), "'seed' is not a number"),
])
def test_a_file_of_the_wrong_shape_is_skipped_whole(tmp_path, damage, why):
    """Checked before any of its rows count: never half a file in the table, nor a crash
    while rendering it."""
    from rich.console import Console

    _write(tmp_path / "good", [_row("TIES", "ties", {"lam": 0.3}, [0.7, 0.8])], seed=0)
    _write(tmp_path / "bad", [_row("TIES", "ties", {"lam": 0.3}, [0.1, 0.1])], seed=1)
    path = tmp_path / "bad" / "results.json"
    result = json.loads(path.read_text())
    damage(result)
    path.write_text(json.dumps(result))
    console, skipped = Console(file=io.StringIO(), width=300), []
    (setting,) = gather(find_results([str(tmp_path)]), console, skipped)
    assert [(p, w[:len(why)]) for p, w in skipped] == [(path, why)]
    assert console.file.getvalue().startswith(f"warning: skipped {path}: {why}")
    assert [(r["row"], r["seeds"], r["average"][0]) for r in records(setting)] == [
        ("zero-shot", 1, pytest.approx(0.45)), ("experts", 1, pytest.approx(0.9)),
        ("TIES", 1, pytest.approx(0.75))]


def test_every_paper_row_names_a_method_tint_registers():
    """A reference row is found by the method's declared row name: a key that names no
    registered method (a typo, a renamed method) would never print its paper number."""
    from tintcli.methods import registered
    from tintcli.recipes.table import REFERENCES

    rows = {row for references in REFERENCES.values() for row in references}
    known = set(registered()) | {"adamerging_task", "adamerging_pp", "adamerging_task_pp"}
    assert rows - {"zero-shot", "experts"} <= known
    assert REFERENCES[("clip_vit_b32", "vit8", "task_vectors")]["surgery"] == 87.5
