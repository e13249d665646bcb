"""The one method contract (tintcli/methods.py, merged.py, selection.py): what a method
declares is what runs, what is chosen on validation is chosen there, and every method's
outcome scores the same way."""

import pytest
import torch
from conftest import compose_config

from tintcli.errors import TintError
from tintcli.merged import Merged
from tintcli.methods import MERGE_METHODS, check_parameters, register, registered, run
from tintcli.selection import choose


@pytest.fixture
def scaled():
    """A method θ0 + α·Σ τ whose α is chosen on validation from a grid, with a declared Δ;
    it counts its calls."""
    calls = {"merge": 0, "delta": 0}

    def delta(pretrained, experts):
        calls["delta"] += 1
        return {k: sum(e[k] - v for e in experts.values()) for k, v in pretrained.items()}

    def check(params, encoder=None, tasks=None):
        if "alpha" in params and not params["alpha"] > 0:
            raise ValueError(f"alpha={params['alpha']} must be a positive number")

    @register("scaled_for_test", check=check, search={"alpha": (0.5, 1.0, 1.5, 2.0)},
              delta=delta)
    def scaled_merge(pretrained, experts, alpha: float = 1.0):
        calls["merge"] += 1
        return {k: v + alpha * d for (k, v), d in zip(pretrained.items(),
                                                      delta(pretrained, experts).values(),
                                                      strict=True)}

    yield MERGE_METHODS["scaled_for_test"], calls
    del MERGE_METHODS["scaled_for_test"]


POOL = ({"w": torch.zeros(2)}, {"a": {"w": torch.tensor([1.0, 0.0])},
                                "b": {"w": torch.tensor([0.0, 1.0])}})


def _peaked_at(best: float):
    """A validation score that peaks where the merged weight equals ``best``."""
    return lambda merged: {"a": 1 - abs(float(merged.state["w"][0]) - best), "b": 1.0}


def test_the_grid_point_best_on_validation_is_chosen_and_every_point_recorded(scaled):
    method, calls = scaled
    merged = choose(method, *POOL, {"alpha": None}, None, _peaked_at(1.5))
    search = merged.info["search"]
    assert search["chosen"] == {"alpha": 1.5} and search["split"] == "val"
    assert [t["params"]["alpha"] for t in search["trials"]] == [0.5, 1.0, 1.5, 2.0]
    assert torch.equal(merged.state["w"], torch.tensor([1.5, 1.5]))
    assert calls == {"merge": 0, "delta": 1}  # one Δ for the whole grid, no full merges


def test_ties_on_validation_keep_the_first_point_and_a_config_grid_replaces_the_methods(scaled):
    method, _ = scaled
    flat = choose(method, *POOL, {"alpha": None}, None, lambda merged: {"a": 0.5})
    assert flat.info["search"]["chosen"] == {"alpha": 0.5}
    mine = choose(method, *POOL, {"alpha": None}, {"alpha": [2.0, 1.5]}, _peaked_at(1.0))
    assert [t["params"]["alpha"] for t in mine.info["search"]["trials"]] == [2.0, 1.5]
    assert mine.info["search"]["chosen"] == {"alpha": 1.5}


def test_a_fixed_value_skips_the_search(scaled):
    method, calls = scaled
    merged = choose(method, *POOL, {"alpha": 2.0}, None, _peaked_at(1.0))
    assert "search" not in merged.info and calls["merge"] == 1
    assert torch.equal(merged.state["w"], torch.tensor([2.0, 2.0]))


@pytest.mark.parametrize("params, grid, message", [
    ({"alpha": None}, {"alpha": []}, "grid.alpha=[] must list the values of alpha"),
    ({"alpha": None}, {"alpha": [1.0, float("nan")]}, "alpha=nan must be a positive number "
                                                       "(in grid.alpha)"),
    ({"alpha": None}, {"beta": [1.0]}, "grid.beta names no parameter it chooses on validation"),
    ({"alpha": float("nan")}, None, "alpha=nan must be a positive number"),
])
def test_a_bad_grid_or_value_is_one_line_before_any_work(scaled, params, grid, message):
    with pytest.raises(TintError, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        check_parameters("scaled_for_test", params, None, grid)


def test_every_methods_config_is_what_its_signature_declares():
    """The YAMLs hold no second copy of a default: each method's composed config has exactly
    its function's parameters and defaults (null where chosen on validation), so a default
    changed in the code is the default a run uses."""
    for name, method in registered().items():
        if name.endswith("_for_test"):
            continue
        cfg = compose_config(overrides=[f"method={name}"]).method
        params = {k: v for k, v in cfg.items()
                  if k not in ("name", "label", "grid", "patience")}
        if name == "tinting":
            params["sampler"] = method.defaults["sampler"]  # the sampler group's, all
        assert params == method.defaults, name
        assert ("grid" in cfg) == bool(method.search), name
        assert cfg.get("patience") == method.patience, name  # the search's early stopping


def test_a_chosen_parameter_is_null_in_the_config_and_a_number_fixes_it():
    cfg = compose_config(overrides=["method=tsv_m"]).method
    assert cfg.alpha is None and list(cfg.grid.alpha)[:3] == [0.1, 0.2, 0.3]
    assert compose_config(overrides=["method=tsv_m", "method.alpha=1.0"]).method.alpha == 1.0


def test_a_per_task_outcome_scores_each_task_with_its_own_model(tiny_cache):
    """EMR's outcome: evaluation asks for task t's model and gets it (never the shared
    state), without knowing which method made it."""
    from rich.console import Console

    from tintcli.workbench import Workbench

    bench = Workbench.load(compose_config(overrides=["device=cpu"]), Console(quiet=True))
    merged = run("emr", bench.pretrained, bench.experts)
    assert isinstance(merged, Merged) and merged.per_task
    scores = bench.score_merged(merged)
    for task in bench.tasks:
        own = bench.score(merged.task_state(task), tasks=[task])[task]
        assert scores[task] == own
    assert not torch.equal(merged.task_state(bench.tasks[0])["blocks.0.mlp.fc1.weight"],
                           merged.task_state(bench.tasks[1])["blocks.0.mlp.fc1.weight"])


def _random_pool(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"cls_token": (1, 1, 8), "pos_embed": (1, 5, 8), "patch_embed.proj.weight":
              (8, 3, 2, 2), "blocks.0.attn.qkv.weight": (24, 8), "blocks.0.attn.qkv.bias": (24,),
              "blocks.0.mlp.fc1.weight": (16, 8), "blocks.1.mlp.fc2.weight": (8, 16),
              "blocks.1.norm1.weight": (8,), "norm.weight": (8,), "head.weight": (4, 8)}
    pretrained = {k: torch.randn(s, generator=generator) for k, s in shapes.items()}
    experts = {t: {k: v + 0.1 * torch.randn(v.shape, generator=generator)
                   for k, v in pretrained.items()} for t in ("a", "b", "c")}
    return pretrained, experts


def test_every_data_free_method_merges_a_read_only_view_as_it_merges_a_dict():
    """On CUDA, ``tint merge`` hands data-free methods ``OnDevice`` views of the CPU-loaded
    checkpoints (io.on_device). Catches a method that needs a real dict (``.copy()``,
    ``isinstance(.., dict)``), writes into its inputs, or reads a key the view lacks."""
    from tintcli.io import OnDevice
    from tintcli.selection import searched

    pretrained, experts = _random_pool()
    before = {t: {k: v.clone() for k, v in e.items()} for t, e in experts.items()}
    for name, method in registered().items():
        if method.adaptive or name.endswith("_for_test"):
            continue
        params = method.defaults
        point = {**params, **{k: v[0] for k, v in searched(method, params, None).items()}}
        plain = run(name, pretrained, experts, **point)
        viewed = run(name, OnDevice(pretrained, "cpu"),
                     {t: OnDevice(e, "cpu") for t, e in experts.items()}, **point)
        for task in experts:
            ours, theirs = viewed.task_state(task), plain.task_state(task)
            assert ours.keys() == theirs.keys(), name
            for key in theirs:
                assert torch.equal(ours[key], theirs[key]), (name, task, key)
        assert all(torch.equal(before[t][k], experts[t][k]) for t in experts
                   for k in pretrained), f"{name} wrote into an expert"


def test_a_per_task_parameter_is_chosen_by_each_tasks_own_validation_then_the_grid_runs():
    """Consensus TA's protocol: each task's λt by that task's validation accuracy on the
    probe model (here a peaks at 0.2, b at 0.6: an average would pick one value for both),
    then α on the grid with those λt fixed."""
    seen = []

    def probe(pretrained, experts, lam):
        return Merged("probe", {"w": torch.tensor([lam])})

    @register("per_task_for_test", search={"lam": (0.2, 0.4, 0.6), "alpha": (1.0, 2.0)},
              per_task={"lam": probe})
    def method(pretrained, experts, alpha: float = 1.0, lam=0.4):
        seen.append(lam)
        return {"w": torch.tensor([alpha])}

    def score(merged):
        w = float(merged.state["w"][0])
        if merged.method == "probe":  # a likes a small λ, b a large one
            return {"a": 1 - w, "b": min(w, 0.5)}
        return {"a": w, "b": 0.0}  # α: the larger the better

    try:
        merged = choose(MERGE_METHODS["per_task_for_test"], *POOL, {"lam": None, "alpha": None},
                        None, score)
    finally:
        del MERGE_METHODS["per_task_for_test"]
    search = merged.info["search"]
    assert search["per_task"]["lam"]["chosen"] == {"a": 0.2, "b": 0.6}
    assert [t["value"] for t in search["per_task"]["lam"]["trials"]] == [0.2, 0.4, 0.6]
    assert seen == [{"a": 0.2, "b": 0.6}] * 2 and search["chosen"] == {"alpha": 2.0}


def test_only_a_method_that_declares_an_orientation_depends_on_how_a_matrix_is_stored():
    """A checkpoint format may store a matrix transposed (open_clip's ``visual.proj`` is
    timm's ``head.weight``ᵀ). Every data-free method is run on the pool and on the pool with
    every matrix transposed: the results must be each other's transposes (to rounding) for
    every method but those that declare ``orientation`` (ISO-CTS, which removes its common
    space from the left), where they must not. Catches a method that is not
    transpose-equivariant yet follows no source format (the trap ISO-CTS fell into)."""
    from tintcli.selection import searched

    pretrained, experts = _random_pool()
    flip = lambda state: {k: v.T.contiguous() if v.dim() == 2 else v  # noqa: E731
                          for k, v in state.items()}
    for name, method in registered().items():
        if method.adaptive or name.endswith("_for_test"):
            continue
        params = method.defaults
        point = {**params, **{k: v[0] for k, v in searched(method, params, None).items()}}
        if "orientation" in point:
            point["orientation"] = "hf"  # decompose every matrix as given
        plain = run(name, pretrained, experts, **point)
        flipped = run(name, flip(pretrained), {t: flip(e) for t, e in experts.items()},
                      **point)
        same = all(torch.allclose(flip(flipped.task_state(t))[k], plain.task_state(t)[k],
                                  rtol=1e-4, atol=1e-5)
                   for t in experts for k in pretrained)
        assert same == ("orientation" not in params), name


def _monotone_pool():
    """1-D tensors in two blocks: a merged weight that grows with α (TSV-M, ISO: the mean τ)
    and with β (LiNeS: block 1's scale)."""
    pretrained = {"blocks.0.w": torch.zeros(2), "blocks.1.w": torch.zeros(2)}
    experts = {"a": {k: torch.tensor([1.0, 0.0]) for k in pretrained},
               "b": {k: torch.tensor([0.0, 1.0]) for k in pretrained}}
    return pretrained, experts


@pytest.mark.parametrize("name, patience, chosen, scored", [
    ("tsv_m", None, {"alpha": 3.0}, 30),
    ("lines_ta", None, {"beta": 1.0}, 10),
    ("iso_c", 3, {"alpha": 0.4}, 4),
    ("iso_cts", 3, {"alpha": 0.4}, 4),
    ("iso_cts", None, {"alpha": 3.0}, 30),
])
def test_each_method_chooses_as_its_authors_do(name, patience, chosen, scored):
    """TSV-M, ISO and LiNeS choose by average normalised accuracy on validation (each
    repository's ``find_optimal_coef(..., metric="avg_normalized_top1")``), and ISO's sweep
    stops after 3 points that do not raise the plain average (iso-merging's early stopping).
    Here task a falls and task b rises with the merged weight, and b's expert is weak: the
    plain average peaks at the first point, the normalised one at the last, and ISO's early
    stop leaves four points to choose from."""
    method = registered()[name]
    assert method.choose_by == "normalized_average" and method.patience == (
        3 if name.startswith("iso") else None)

    def score(merged):
        m = float(merged.state["blocks.1.w"].sum())
        return {"a": 1 - 0.1 * m, "b": 0.05 * m}

    params = {**method.defaults, **({"orientation": "hf"} if name == "iso_cts" else {})}
    merged = choose(method, *_monotone_pool(), params, None, score,
                    normalize={"a": 1.0, "b": 0.1}, patience=patience)
    search = merged.info["search"]
    assert search["chosen"] == chosen and search["metric"] == "normalized_average"
    assert len(search["trials"]) == scored == search["stopping"]["scored"]


def test_early_stopping_counts_points_in_a_row_not_above_the_best_average(scaled):
    """iso-merging's rule: the best average so far starts at 0, a point strictly above it
    resets the count, any other (equal included) adds one, and the search ends at the third
    in a row; the choice is among the points scored (ties: the first)."""
    method, _ = scaled
    averages = {0.1: 0.5, 0.2: 0.6, 0.3: 0.6, 0.4: 0.55, 0.5: 0.7, 0.6: 0.65, 0.7: 0.7,
                0.8: 0.69, 0.9: 0.99, 1.0: 0.99}
    grid = {"alpha": list(averages)}
    score = lambda merged: {"a": averages[round(float(merged.state["w"][0]), 1)]}  # noqa: E731
    stopped = choose(method, *POOL, {"alpha": None}, grid, score, patience=3).info["search"]
    assert [t["params"]["alpha"] for t in stopped["trials"]] == [0.1, 0.2, 0.3, 0.4, 0.5,
                                                                  0.6, 0.7, 0.8]
    assert stopped["chosen"] == {"alpha": 0.5}
    assert stopped["stopping"]["patience"] == 3 and stopped["stopping"]["of"] == 10
    whole = choose(method, *POOL, {"alpha": None}, grid, score).info["search"]
    assert whole["chosen"] == {"alpha": 0.9} and whole["stopping"]["rule"] == "whole grid"


def test_a_normalised_choice_without_the_experts_accuracies_is_refused():
    """Without each task's expert accuracy the normalised average cannot be computed; it
    fell back to the plain average, which is not the authors' choice."""
    with pytest.raises(TintError, match="TSV-M chooses alpha by normalised accuracy"):
        choose(registered()["tsv_m"], *POOL, {"alpha": None}, None, lambda m: {"a": 1.0})


@pytest.mark.parametrize("preset, adaptive_only", [("all", False), ("learned", True)])
def test_every_registered_method_has_its_row_in_the_whole_table(preset, adaptive_only):
    """method=all holds every registered method's reference row (SyMerge's is Model
    Tinting++'s: the same trainer and numbers), method=learned every adaptive one's: a new
    method left out of the hand-kept lists fails here, naming it."""
    from tintcli.methods import get_method
    from tintcli.recipes.merge import _params

    cfg = compose_config(overrides=[f"method={preset}"]).method
    rows = {get_method(m.name).row(_params(m)) for m in cfg.methods.values()}
    wanted = {name: method.row(method.defaults) for name, method in registered().items()
              if not name.endswith("_for_test") and (method.adaptive or not adaptive_only)}
    missing = sorted(name for name, row in wanted.items() if row not in rows)
    assert not missing, f"method={preset} lacks {missing}: add them to conf/method/{preset}.yaml"


def test_every_registered_methods_function_is_importable_from_the_package():
    """``from tintcli import surgery_merge``: the package exports what the registry holds (it
    exported 2 of the 7 adaptive methods from a hand-kept list), without making a submodule
    import (``from tintcli import errors``) load torch and every method."""
    import subprocess
    import sys

    import tintcli

    for name, method in registered().items():
        if not name.endswith("_for_test"):
            assert getattr(tintcli, method.fn.__name__) is method.fn, name
            assert method.fn.__name__ in dir(tintcli)
    out = subprocess.run([sys.executable, "-c", "import sys; from tintcli import errors; "
                          "print('torch' in sys.modules)"], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "False", out.stderr
