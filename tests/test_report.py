"""The results table: every figure printed whole, at 80 columns and wide."""

import pytest
from rich.console import Console

from tintcli.evaluation import summarize
from tintcli.report import results_table

TASKS = ["scenes", "vehicles", "aerial", "landuse", "house_numbers", "signs", "digits",
         "textures"]


@pytest.mark.parametrize("width", [80, 200])
def test_every_accuracy_is_printed_whole(width):
    experts = {t: 0.9 + i / 100 for i, t in enumerate(TASKS)}
    merged = {t: 0.5 + i / 100 for i, t in enumerate(TASKS)}
    rows = [{"name": "experts", "kind": "reference", **summarize(experts, experts)},
            {"name": "ties top_k=20 merge=sum λ=0.3", "kind": "merged",
             **summarize(merged, experts)}]
    console = Console(width=width, record=True)
    console.print(results_table(rows, TASKS, "synth8", console.width))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= width
    for value in [*experts.values(), *merged.values()]:
        assert f"{100 * value:.1f}" in text
    assert "house_numbers" in text and "100.0" in text and "53.5" in text


def test_over_seeds_gives_mean_and_sample_std_per_method():
    from tintcli.tracking import over_seeds

    def job(seed, average, extra=()):
        return {"overrides": [f"seed={seed}", *extra], "seed": seed, "tasks": ["a"],
                "rows": [{"name": "ties", "kind": "merged", "average": average,
                          "normalized_average": average, "accuracy": {"a": average}}]}

    jobs = [job(0, 0.5), job(1, 0.7), job(2, 0.6), job(0, 0.1, ["method.lam=0.9"])]
    (group,) = over_seeds(jobs)  # the lone lam=0.9 job has no seeds to aggregate
    assert group["seeds"] == [0, 1, 2] and group["overrides"] == []
    row = group["rows"][0]
    assert row["average"]["mean"] == pytest.approx(0.6)
    assert row["average"]["std"] == pytest.approx(0.1)  # sample std (n - 1), not 0.0816
    assert row["accuracy"]["a"]["std"] == pytest.approx(0.1)


def test_mean_std_is_one_computation_for_the_sweep_summary_and_tint_table():
    from tintcli.recipes.table import Row
    from tintcli.report import mean_std
    from tintcli.tracking import _mean_std

    assert mean_std([0.5, 0.7, 0.6]) == pytest.approx((0.6, 0.1))  # sample std (n - 1)
    assert mean_std([]) == (None, None) and _mean_std([]) == {"mean": None, "std": None}
    # a lone value: no ± in tint table; the sweep summary has always recorded 0.0
    assert mean_std([0.4]) == (0.4, None) and _mean_std([0.4]) == {"mean": 0.4, "std": 0.0}
    row = Row("ties", "merged", "ties", {}, runs=[{"average": 0.5}, {"average": None}])
    assert row.stat(lambda r: r["average"]) == (0.5, None)


def test_a_sweep_marks_its_best_by_validation_never_by_test():
    from tintcli.report import sweep_table

    def job(lam, test, val):
        row = {"name": f"task_arithmetic λ={lam}", "kind": "merged", "average": test,
               "normalized_average": test}
        if val is not None:
            row["validation"] = {"average": val}
        return {"overrides": [f"method.lam={lam}"], "rows": [row]}

    def marked(jobs):
        console = Console(width=200, record=True)
        console.print(sweep_table(jobs))
        return [line for line in console.export_text().splitlines()
                if "★" in line and "task_arithmetic" in line]

    # λ 0.5 is best on test (80.0) but 0.3 is best on validation (75.0): 0.3 is marked
    (line,) = marked([job(0.3, 0.70, 0.75), job(0.5, 0.80, 0.60)])
    assert "λ=0.3" in line and "75.0 ★" in line
    assert marked([job(0.3, 0.70, None), job(0.5, 0.80, None)]) == []  # no validation: none
