"""FusionBench's own TSV-M, ISO-C, ISO-CTS and EMR beside tint's, on tint's synth8 zoo.

Runs the merging functions of the installed FusionBench package (not a copy of them):

- TSV-M: ``fusion_bench.method.task_singular_vector.utils.TSVM_utils.
  compute_and_sum_svd_mem_reduction``
- ISO-C, ISO-CTS: ``fusion_bench.method.isotropic_merging.iso_utils.iso_c`` / ``iso_cts``
  (common_space_fraction 0.8)
- EMR: ``fusion_bench.method.emr_merging.utils.emr_merge``

on tint's task vectors τt = expert − θ0 (float32, in the open_clip / Hugging Face layout
FusionBench sees, as tests/test_reference_svd.py feeds its transcribed oracles: timm's
(1, N, D) ``pos_embed`` as an (N, D) matrix, the (1, 1, D) ``cls_token`` as a vector), and
builds θ = θ0 + α·Δ with FusionBench's ``state_dict_add`` / ``state_dict_mul``, as its
``run`` methods do; EMR's task t runs θ0 + rescaler_t · τuni ⊙ mask_t (its
``EMRTaskModulator.apply``). tint's side is ``tintcli.selection.choose`` and
``tintcli.methods.run``. Both are scored by ``Workbench.score_merged``.

Protocol: for TSV-M, ISO-C and ISO-CTS, α is chosen on the validation split from the
authors' grid {0.1, ..., 3.0} (``tintcli.merging.tsv.ALPHAS``) by the method's own metric
(average normalised accuracy, as tint merge chooses; ties: the smallest α), scoring the
whole grid on both sides (ISO's early stopping left out, so that every α is compared), then
test accuracy is reported; FusionBench's fixed α = 1.0 is reported too. FusionBench's
functions see Hugging Face's orientation of the image projection (``visual_projection``,
stored as tint stores ``head.weight``), so tint's ISO-CTS runs with ``orientation="hf"``.
EMR has no parameters. The weight column is max|θ_tint − θ_FB| / max|θ_tint| over every
entry, at tint's chosen α (EMR: over the eight per-task models).

Cost: one Δ per method and implementation (about a second), then one validation pass per
grid point (2-3.5 s on one CPU thread). FusionBench's validation grid is only scored
where its merged weights differ from tint's by more than ``--tolerance`` (relative, as in
the weight column; elsewhere tint's accuracy at that α is reused and the count is printed):
4 to 5.5 minutes on one busy CPU thread. ``--full-grid`` scores every point of both grids
(about 8 minutes) and says at how many α any task's validation accuracy differs.

Installing FusionBench (a heavy install: it is not a tint dependency and this script is not
run in CI). Either ``pip install fusion-bench`` into tint's venv (pulls lightning,
transformers, datasets, peft, ... and may move versions tint pins), or, leaving tint's venv
untouched, into a folder of its own:

    .venv/bin/pip install --target /tmp/fb --no-deps fusion-bench bidict lightning \\
        lightning-utilities torchmetrics accelerate peft

(the rest of what the three modules import — torch, transformers, hydra-core, rich, scipy,
... — already comes with tint's venv; never install torch there). The script imports
``fusion_bench`` from the venv if it can, else from ``--fusion-bench-path`` (default
``$FUSION_BENCH_PATH`` or /tmp/fb), appended to ``sys.path`` so the venv's packages win.

    .venv/bin/python scripts/fusionbench_side_by_side.py --device cpu --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.metadata
import io
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace

import torch

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

FB_MODULES = {
    "tsvm": "fusion_bench.method.task_singular_vector.utils.TSVM_utils",
    "iso": "fusion_bench.method.isotropic_merging.iso_utils",
    "emr": "fusion_bench.method.emr_merging.utils",
    "arith": "fusion_bench.utils.state_dict_arithmetic",
}
INSTALL_HINT = ("pip install --target /tmp/fb --no-deps fusion-bench bidict lightning "
                "lightning-utilities torchmetrics accelerate peft")
COMMON_FRACTION = 0.8  # ISO-CTS's common space (tint's default, FusionBench's config)


# --------------------------------------------------------------------------------------
# FusionBench, imported from the venv or from its own folder
# --------------------------------------------------------------------------------------


def fusion_bench_importable(path: str) -> None:
    """``fusion_bench`` from the venv, else from ``path`` (a ``pip install --target``)."""
    try:
        importlib.import_module("fusion_bench")
    except ImportError:
        if not os.path.isdir(path):
            sys.exit(f"fusion_bench is not importable and {path} does not exist: {INSTALL_HINT}")
        sys.path.append(path)  # after the venv's site-packages: tint's versions win


def fusion_bench_modules(path: str, modules: Mapping[str, str]
                         ) -> tuple[dict[str, ModuleType], dict[str, str]]:
    """``modules`` (name -> FusionBench module) imported from the installed package (a
    missing one ends the script in one line saying what to install), and that package's
    version and location."""
    fusion_bench_importable(path)
    imported = {}
    for name, module in modules.items():
        try:
            imported[name] = importlib.import_module(module)
        except ImportError as err:
            sys.exit(f"cannot import {module} ({err}); install what it needs, e.g. "
                     f"{INSTALL_HINT}")
    fb = importlib.import_module("fusion_bench")
    return imported, {"version": importlib.metadata.version("fusion-bench"),
                      "location": os.path.dirname(fb.__file__ or "")}


def import_fusion_bench(path: str) -> SimpleNamespace:
    """FusionBench's merging functions and its version, from its installed package."""
    modules, installed = fusion_bench_modules(path, FB_MODULES)
    return SimpleNamespace(
        **installed,
        compute_and_sum_svd_mem_reduction=modules["tsvm"].compute_and_sum_svd_mem_reduction,
        iso_c=modules["iso"].iso_c,
        iso_cts=modules["iso"].iso_cts,
        emr_merge=modules["emr"].emr_merge,
        state_dict_sub=modules["arith"].state_dict_sub,
        state_dict_add=modules["arith"].state_dict_add,
        state_dict_mul=modules["arith"].state_dict_mul,
    )


def quiet(fn: Callable[[], object]) -> object:
    """FusionBench prints a line per tensor; keep them out of the table."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn()


# --------------------------------------------------------------------------------------
# tint's state dicts in the layout FusionBench sees, and back
# --------------------------------------------------------------------------------------


def reference_layout(state: Mapping[str, Tensor]) -> StateDict:
    """open_clip / Hugging Face shapes (pos_embed (N, D), cls_token (D,)), floats, in fp32."""
    out: StateDict = {}
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if key == "pos_embed":
            value = value.squeeze(0)
        elif key == "cls_token":
            value = value.reshape(-1)
        out[key] = value.float()
    return out


def back_to(state: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> StateDict:
    """Every entry of ``like``: ``state``'s reshaped and in ``like``'s dtype, else ``like``'s."""
    return {key: state[key].reshape(value.shape).to(value.dtype) if key in state
            else value.clone() for key, value in like.items()}


def differences(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> tuple[float, float]:
    """(max |a − b|, max |a|) over every floating-point entry of ``a``."""
    keys = [k for k, v in a.items() if v.is_floating_point()]
    scale = max(a[k].abs().max().item() for k in keys)
    diff = max((a[k].double() - b[k].reshape(a[k].shape).double()).abs().max().item()
               for k in keys)
    return diff, scale


def relative_difference(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """max |a − b| / max |a| over every floating-point entry."""
    diff, scale = differences(a, b)
    return diff / scale if scale > 0 else diff


# --------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------


@dataclass
class Side:
    """One implementation's outcome for one method."""

    alpha: float | None = None  # chosen on validation (None: nothing to choose)
    test: dict[str, float] = field(default_factory=dict)  # at the chosen α
    test_at_one: dict[str, float] = field(default_factory=dict)  # at α = 1.0
    val: dict[float, dict[str, float]] = field(default_factory=dict)  # α -> val accuracy
    scored: list[float] = field(default_factory=list)  # α scored on val (FusionBench: the
    # rest reuse tint's accuracy, the weights being equal to within --tolerance)
    delta_s: float = 0.0  # time to compute Δ (EMR: the merge)
    grid_s: float = 0.0  # time for the validation grid


@dataclass
class Row:
    method: str
    tint: Side
    fb: Side
    weights: float  # relative weight difference at tint's chosen α
    delta: float | None = None  # relative difference of the unscaled Δ


def average(accuracy: Mapping[str, float]) -> float:
    return sum(accuracy.values()) / len(accuracy)


def compare_alpha_method(bench, fb: SimpleNamespace, name: str, pretty: str,
                         fb_delta: Callable[[list[StateDict]], StateDict],
                         fixed: dict[str, float], args: argparse.Namespace,
                         log: Callable[[str], None]) -> Row:
    """A θ0 + α·Δ method, α chosen on validation, tint's and FusionBench's."""
    from tintcli.merged import Merged
    from tintcli.merging.task_vectors import add_task_vector
    from tintcli.merging.tsv import ALPHAS
    from tintcli.methods import get_method, run
    from tintcli.selection import choose, metric

    pretrained, experts = bench.pretrained, bench.experts
    method = get_method(name)
    val = lambda merged: bench.score_merged(merged, "val")  # noqa: E731
    normalize = bench.expert_accuracy_on("val")
    value = lambda accuracy: metric(accuracy, method.choose_by, normalize)  # noqa: E731

    # tint: its own protocol (tintcli.selection.choose), one Δ for the grid
    tint = Side()
    start = time.perf_counter()
    tint_delta = method.delta(pretrained, experts, **fixed)
    tint.delta_s = time.perf_counter() - start
    start = time.perf_counter()
    chosen = choose(method, pretrained, experts, {"alpha": None, **fixed}, None, val,
                    normalize, on_point=lambda i, n: log(f"{pretty} tint val {i}/{n}")
                    if i % 10 == 0 else None, patience=None)
    tint.grid_s = time.perf_counter() - start
    search = chosen.info["search"]
    tint.alpha = float(search["chosen"]["alpha"])
    tint.val = {float(t["params"]["alpha"]): t["accuracy"] for t in search["trials"]}
    tint.scored = list(tint.val)
    tint.test = bench.score_merged(chosen, "test")
    tint.test_at_one = (tint.test if tint.alpha == 1.0 else
                        bench.score_merged(run(name, pretrained, experts, alpha=1.0, **fixed),
                                           "test"))

    # FusionBench: its function on the task vectors, θ = θ0 + α·Δ with its arithmetic
    side = Side()
    floats = reference_layout(pretrained)
    start = time.perf_counter()
    vectors = [fb.state_dict_sub(reference_layout(e), floats) for e in experts.values()]
    delta = quiet(lambda: fb_delta(vectors))
    side.delta_s = time.perf_counter() - start

    def fb_state(alpha: float) -> StateDict:
        return back_to(fb.state_dict_add(floats, fb.state_dict_mul(delta, alpha)), pretrained)

    start = time.perf_counter()
    best: float | None = None
    for i, alpha in enumerate(ALPHAS):
        state = fb_state(alpha)
        same = relative_difference(add_task_vector(pretrained, tint_delta, alpha), state)
        if args.full_grid or same > args.tolerance:
            accuracy = val(Merged(f"{name}-fusion_bench", state))
            side.scored.append(alpha)
        else:  # the weights agree to within the tolerance: tint's score at this α
            accuracy = tint.val[alpha]
        side.val[alpha] = accuracy
        if best is None or value(accuracy) > best:  # ties: the first, as tint's choose
            side.alpha, best = alpha, value(accuracy)
        if (i + 1) % 10 == 0:
            log(f"{pretty} FusionBench val {i + 1}/{len(ALPHAS)} ({len(side.scored)} scored)")
    side.grid_s = time.perf_counter() - start
    assert side.alpha is not None
    side.test = bench.score_merged(Merged(name, fb_state(side.alpha)), "test")
    side.test_at_one = (side.test if side.alpha == 1.0 else
                        bench.score_merged(Merged(name, fb_state(1.0)), "test"))

    tint_state = add_task_vector(pretrained, tint_delta, tint.alpha)
    return Row(pretty, tint, side, relative_difference(tint_state, fb_state(tint.alpha)),
               relative_difference(tint_delta, back_to(delta, tint_delta)))


def compare_emr(bench, fb: SimpleNamespace) -> Row:
    """EMR: one model per task, no parameters."""
    from tintcli.merged import Merged
    from tintcli.methods import run

    pretrained, experts = bench.pretrained, bench.experts
    tint = Side()
    start = time.perf_counter()
    merged = run("emr", pretrained, experts)
    tint.delta_s = time.perf_counter() - start
    tint.test = bench.score_merged(merged, "test")

    side = Side()
    floats = reference_layout(pretrained)
    start = time.perf_counter()
    vectors = [fb.state_dict_sub(reference_layout(e), floats) for e in experts.values()]
    unified, masks, rescalers = quiet(lambda: fb.emr_merge(vectors))
    states = {}
    for t, task in enumerate(experts):  # EMRTaskModulator.apply: θ0 + τuni ⊙ mask · rescaler
        delta = {k: unified[k] * masks[k][t] * rescalers[t] for k in unified}
        states[task] = back_to(fb.state_dict_add(floats, delta), pretrained)
    side.delta_s = time.perf_counter() - start
    side.test = bench.score_merged(Merged("emr-fusion_bench", dict(pretrained),
                                          overrides=states.__getitem__), "test")

    pairs = [differences(merged.task_state(task), states[task]) for task in experts]
    return Row("EMR", tint, side, max(d for d, _ in pairs) / max(s for _, s in pairs))


# --------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def with_alpha(side: Side) -> str:
    return pct(average(side.test)) + (f" (α={side.alpha:g})" if side.alpha is not None else "")


def at_one(side: Side) -> str:
    return pct(average(side.test_at_one)) if side.test_at_one else "–"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def print_side_by_side(title: str, tasks: list[str], rows: list[tuple[str, Mapping]],
                       tint: Mapping[str, float], fb: Mapping[str, float],
                       after: list[tuple[str, Mapping]] = ()) -> None:
    """A learning method's comparison: ``rows`` (name, accuracy per task), the tint −
    FusionBench row of ``tint`` and ``fb``, the ``after`` rows, and the issue's bounds."""
    def line(name: str, accuracy: Mapping[str, float]) -> list[str]:
        return [name, *(pct(accuracy[t]) for t in tasks), pct(average(accuracy))]

    diff = {t: tint[t] - fb[t] for t in tasks}
    table = [line(name, acc) for name, acc in rows]
    table.append(["tint − FusionBench", *(f"{100 * diff[t]:+.2f}" for t in tasks),
                  f"{100 * (average(tint) - average(fb)):+.2f}"])
    table += [line(name, acc) for name, acc in after]
    print(f"{title}\n")
    print(markdown(["", *tasks, "avg"], table))
    print(f"\n|Δ avg| {100 * abs(average(tint) - average(fb)):.2f} points (target ≤ 0.5), "
          f"max |Δ task| {100 * max(abs(v) for v in diff.values()):.2f} (target ≤ 1)")


def print_versions(fb: SimpleNamespace, bench, settings: str, total: float) -> None:
    """The last line of every comparison: versions, device, threads, ``settings``, time."""
    print(f"\nfusion_bench {fb.version}, torch {torch.__version__}, tintcli "
          f"{importlib.metadata.version('tintcli')}, Python {platform.python_version()}; "
          f"device {bench.device}, {torch.get_num_threads()} CPU thread(s); "
          f"{settings + '; ' if settings else ''}wall time {total:.0f} s")


def report(rows: list[Row], tasks: list[str]) -> str:
    main = markdown(
        ["method", "tint test avg (α)", "FusionBench test avg (α)", "tint @ α=1",
         "FusionBench @ α=1", "weights: max abs diff / max abs (tint's α)"],
        [[r.method, with_alpha(r.tint), with_alpha(r.fb), at_one(r.tint), at_one(r.fb),
          f"{r.weights:.1e}"] for r in rows])
    per_task = []
    for r in rows:
        for impl, side in (("tint", r.tint), ("FusionBench", r.fb)):
            alpha = f", α={side.alpha:g}" if side.alpha is not None else ""
            per_task.append([f"{r.method} ({impl}{alpha})",
                             *(pct(side.test[t]) for t in tasks), pct(average(side.test))])
    tasks_table = markdown(["test accuracy (%)", *tasks, "avg"], per_task)
    return f"{main}\n\n{tasks_table}"


def details(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        line = (f"{r.method}: Δ / merge time tint {r.tint.delta_s:.2f} s, FusionBench "
                f"{r.fb.delta_s:.2f} s")
        if r.delta is not None:
            scored = len(r.fb.scored)
            differ = [a for a in r.fb.scored if r.tint.val[a] != r.fb.val[a]]
            where = f" ({', '.join(f'{a:g}' for a in differ)})" if differ else ""
            agreement = (f"a task's val accuracy differs at {len(differ)} of the {scored} "
                         f"scored α{where}" if scored else
                         "weights within --tolerance at every α")
            best = {impl: max(average(a) for a in side.val.values())
                    for impl, side in (("tint", r.tint), ("fb", r.fb))}
            line += (f"; unscaled Δ differ by {r.delta:.1e} (relative); val grid "
                     f"tint {len(r.tint.scored)} points in {r.tint.grid_s:.0f} s, FusionBench "
                     f"{scored} scored + {len(r.fb.val) - scored} reused in "
                     f"{r.fb.grid_s:.0f} s; {agreement}; best val avg tint "
                     f"{pct(best['tint'])}, FusionBench {pct(best['fb'])}")
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------


def load_bench(device: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from rich.console import Console

    from tintcli.methods import register_configs
    from tintcli.paths import CONF_DIR
    from tintcli.workbench import Workbench

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("merge", overrides=[f"device={device}", *overrides])
    return Workbench.load(cfg, Console(stderr=True)), cfg


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every FusionBench-beside-tint script takes (this one, Surgery's, WEMoE's)."""
    parser.add_argument("--device", default="cpu", help="tint's device (default: cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--fusion-bench-path",
                        default=os.environ.get("FUSION_BENCH_PATH", "/tmp/fb"),
                        help="where FusionBench was pip-installed with --target")
    parser.add_argument("overrides", nargs="*",
                        help="extra Hydra overrides (default: synth8, synth_vit, pool synth)")


def shuffled_test_loaders(bench, fb: SimpleNamespace, batch_size: int,
                          streams: Mapping[str, Iterator] | None = None,
                          generator: torch.Generator | None = None
                          ) -> Callable[[str], Iterator]:
    """FusionBench's ``get_shuffled_test_loader_iter`` on tint's test pixels: per task, made
    on first use, an endless shuffled loader of (inputs, labels) (``generator``: its
    shuffling's; None: torch's global one). ``streams`` (--paired): tint's batch indices per
    task instead, so that both sides see the same batches."""
    @functools.cache
    def loader_of(task: str) -> Iterator:
        images = bench.test_data[task].images
        inputs = torch.cat([bench.runtime.inputs(images[i:i + 512])
                            for i in range(0, len(images), 512)])
        dataset = torch.utils.data.TensorDataset(inputs, bench.test_data[task].labels)
        if streams is not None:
            return (dataset[index] for index in streams[task])
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                             generator=generator)
        return iter(fb.InfiniteDataLoader(loader))

    return loader_of


def learning_arguments(parser: argparse.ArgumentParser, steps: int, steps_help: str,
                       learned: str) -> None:
    """The options of a learning method's comparison: the seed, the steps, and ``--paired``
    (FusionBench's ``learned`` parts start as tint's and see tint's batches)."""
    parser.add_argument("--seed", type=int, default=0, help="both sides' seed (default 0)")
    parser.add_argument("--steps", type=int, default=steps,
                        help=f"{steps_help} (default {steps})")
    parser.add_argument("--paired", action="store_true",
                        help=f"diagnostic: FusionBench's {learned} start from tint's initial "
                             "ones and see tint's batches (no seed noise between the sides)")


def begin_comparison(args: argparse.Namespace, import_fb: Callable[[str], SimpleNamespace],
                     begin: float):
    """(log, FusionBench's pieces, the Workbench, its config): a logger timed from ``begin``,
    then FusionBench imported (``import_fb``: the script's own pieces), the threads set and
    tint's benchmark loaded."""

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - begin:6.0f} s] {msg}", file=sys.stderr, flush=True)

    fb = import_fb(args.fusion_bench_path)
    if args.threads:
        torch.set_num_threads(args.threads)
    log(f"fusion_bench {fb.version} from {fb.location}")
    bench, cfg = load_bench(args.device, args.overrides)
    log(f"loaded {cfg.tasks.name} / {cfg.encoder.name}: {len(bench.tasks)} tasks")
    return log, fb, bench, cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_arguments(parser)
    parser.add_argument("--full-grid", action="store_true",
                        help="score FusionBench's every validation point, even where its "
                             "weights match tint's to within --tolerance")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="relative weight difference under which FusionBench's "
                             "validation point reuses tint's accuracy (default 1e-5)")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    log, fb, bench, cfg = begin_comparison(args, import_fusion_bench, begin)
    log(f"loaded {cfg.tasks.name} / {cfg.encoder.name}: {len(bench.tasks)} tasks")

    accelerator = str(bench.device)
    rows = [
        compare_alpha_method(
            bench, fb, "tsv_m", "TSV-M",
            lambda tvs: fb.compute_and_sum_svd_mem_reduction(tvs, exclude_keys=[],
                                                             accelerator=accelerator),
            {}, args, log),
        compare_alpha_method(
            bench, fb, "iso_c", "ISO-C",
            lambda tvs: fb.iso_c(tvs, accelerator=accelerator, exclude_keys=[]),
            {}, args, log),
        compare_alpha_method(
            bench, fb, "iso_cts", "ISO-CTS",
            lambda tvs: fb.iso_cts(tvs, COMMON_FRACTION, accelerator=accelerator,
                                   exclude_keys=[]),
            {"common_fraction": COMMON_FRACTION, "orientation": "hf"}, args, log),
    ]
    log("EMR")
    rows.append(compare_emr(bench, fb))
    total = time.perf_counter() - begin

    print(f"tint vs FusionBench on {cfg.tasks.name} ({cfg.encoder.name}, {len(bench.tasks)} "
          f"tasks; α chosen on val from 0.1..3.0, test accuracy in %)\n")
    print(report(rows, bench.tasks))
    print()
    print(details(rows))
    print_versions(fb, bench, "full grids" if args.full_grid else
                   f"tolerance {args.tolerance:g}", total)


if __name__ == "__main__":
    main()
