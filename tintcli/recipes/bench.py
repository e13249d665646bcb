"""`tint bench`: what tint's machinery costs over the encoder's own compute, side by side.

- Evaluation: scoring every task's test split from the pixel cache (uint8 batches streamed to the
  device, normalised there, AMP, accuracy counted on the device) against the encoder's raw
  forward on random tensors of the same batches on the same device. The ratio is throughput
  over raw throughput; target >= 0.9 (the data path is never the bottleneck).
- Adaptation: for each adaptive method, the same batch goes once through the method's real
  step (merge on the device, forward, backward, optimiser step) and once through a plain
  forward+backward of the encoder as an ordinary module with the same loss; target <= 1.3.
- Memory: the peak (CUDA: allocated per measurement; CPU: the process's peak RSS), and the
  adaptation memory model (``tintcli/memory.py``) for this encoder and the configured others.
- Whole runs (``parts=[run]``, not by default): ``run_methods`` end to end, as ``tint merge``
  runs them on warm caches, in seconds and peak memory.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from tintcli.encoders import build_encoder, resolve_device
from tintcli.errors import TintError
from tintcli.io import StateDict, encoder_entries, on_device, write_json
from tintcli.methods import Method, adapt, check_parameters, get_method, registered
from tintcli.stand_in import stand_in_checkpoints
from tintcli.tracking import versions
from tintcli.workbench import Workbench

TARGET_RATIO = 1.3
TARGET_EVAL_RATIO = 0.9


def operations(fn: Callable[[], object]) -> int:
    """The operations one call of ``fn`` launches, as the torch profiler records them: each
    aten call made outside another (in a compiled graph, inductor's fused kernels stand for
    many). On a GPU each is a kernel launch or more, and a small model's step is bound by
    their count, not by its arithmetic: a figure any CPU gives."""
    profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with _native_stderr_silenced():  # (kineto writes lines of its own as it starts and stops)
        profile.start()
    try:
        fn()
    finally:
        with _native_stderr_silenced():
            profile.stop()
    return sum(1 for event in profile.events() if event.name.startswith("aten::") and (
        event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")))


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null for the block: what C++ writes there directly,
    past Python's sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds per call."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _method_params(method: Method, method_cfg: DictConfig | None,
                   encoder: torch.nn.Module) -> dict:
    """The method's parameters: its declared defaults, as the config (the method's YAML under
    the method's name, where bench.yaml has it) overrides them; checked."""
    params = method.defaults
    if method_cfg is not None:
        params.update(OmegaConf.to_container(method_cfg, resolve=True))
    for key in ("name", "label", "grid"):
        params.pop(key, None)
    check_parameters(method.name, params, encoder)
    return params


def _init_kwargs(method: Method, method_cfg: DictConfig | None,
                 encoder: torch.nn.Module) -> dict:
    """The trainer's arguments, out of the method's checked parameters."""
    accepted = inspect.signature(method.trainer).parameters
    return {k: v for k, v in _method_params(method, method_cfg, encoder).items()
            if k in accepted}


PARTS = ("evaluation", "adaptation", "merges", "run")


def _whole_runs(cfg: DictConfig, encoder: torch.nn.Module) -> dict[str, tuple[Method, dict]]:
    """``parts=[run]``: the adaptive methods of ``run_methods`` with their parameters, checked
    before any work (an unknown or data-free name is refused)."""
    out = {}
    for name in cfg.get("run_methods") or ["tinting"]:
        method = get_method(str(name))
        if not method.adaptive:
            raise TintError(f"run_methods: {name} learns nothing, so it has no run to time\n"
                            "Name adaptive methods (tinting, adamerging, ...); parts=[merges] "
                            "times the data-free ones.")
        out[str(name)] = (method, _method_params(method, cfg.get(str(name)), encoder))
    return out


def time_whole_runs(bench: Workbench, runs: dict[str, tuple[Method, dict]], seed: int,
                    console: Console) -> list[dict]:
    """Each method end to end as ``tint merge`` runs it, on warm caches: the experts' outputs
    on the adaptation images, every step of its schedule, and scoring the result on every
    test split, with the peak memory of the whole (CUDA: allocated; CPU: the process's RSS).
    What a researcher plans a run by; the table's accuracy is not reported (on a stand-in
    pool it means nothing)."""
    out = []
    for name, (method, params) in runs.items():
        context = bench.adaptation_context(seed)  # fresh: the experts' outputs count too
        steps = [0]  # the schedule's, as the run reports it
        _reset_peak(bench.device)
        with console.status(f"running {method.pretty} end to end") as status:
            def on_step(done: int, total: int, loss: float, _lambdas, status=status,
                        steps=steps, pretty=method.pretty) -> None:
                steps[0] = total
                status.update(f"running {pretty} end to end: step {done}/{total}, "
                              f"loss {loss:.4f}")

            context.on_step = on_step
            start = time.perf_counter()
            bench.score_merged(adapt(name, bench.pretrained, bench.experts, context, **params))
            if bench.device.type == "cuda":
                torch.cuda.synchronize(bench.device)
            seconds = time.perf_counter() - start
        out.append({"method": name, "pretty": method.pretty, "steps": steps[0],
                    "seconds": seconds, "peak": _peak(bench.device)})
        console.print(f"  {method.pretty}: {steps[0]} steps, whole run {seconds:.1f} s")
    return out


def run(cfg: DictConfig, run_dir: Path, console: Console) -> dict:
    parts = _parts(cfg)
    architecture = build_encoder(cfg.encoder)
    adaptive, trainers = {}, set()  # every adaptive method's step, each trainer once
    for name, method in registered().items():  # (symerge is Model Tinting's trainer)
        if method.adaptive and "adaptation" in parts and method.trainer not in trainers:
            trainers.add(method.trainer)  # checked first
            adaptive[name] = (method, _init_kwargs(method, cfg.get(name), architecture))
    whole = _whole_runs(cfg, architecture) if "run" in parts else {}
    rows, peaks, evaluation, merges, runs = [], {}, None, [], []
    device, precision, tasks, step_path = resolve_device(cfg.device), None, [], None
    if parts & {"evaluation", "adaptation", "run"} or ("merges" in parts
                                                        and not cfg.get("merge_shapes")):
        bench = Workbench.load(cfg, console)
        device, precision, tasks = bench.device, bench.runtime.precision, bench.tasks
        step_path = bench.runtime.step_path  # runtime.compile
        context = bench.adaptation_context(cfg.seed)
        plain = bench.encoder.train(False)
        plain.load_state_dict(encoder_entries(bench.pretrained))
        plain.requires_grad_(True)
        measure = lambda fn: _timed(fn, bench.device, cfg.warmup, cfg.repeats)  # noqa: E731

        if "evaluation" in parts:
            _reset_peak(bench.device)
            with console.status("timing evaluation from the pixel cache"):
                evaluation = eval_throughput(bench, plain, lambda fn: _timed(
                    fn, bench.device, min(cfg.warmup, 1), cfg.eval_repeats))
                peaks["evaluation"] = _peak(bench.device)

        for name, (method, kwargs) in adaptive.items():  # every adaptive method registered
            _reset_peak(bench.device)
            with console.status(f"timing {method.pretty} steps"):
                trainer = method.trainer(bench.pretrained, bench.experts, context, **kwargs)
                step, size, ours, base = trainer.benchmark(plain)
                rows.append((step, size, measure(ours), measure(base), operations(ours),
                             operations(base)))
                peaks[name] = _peak(bench.device)
                del trainer

        if whole:
            runs = time_whole_runs(bench, whole, cfg.seed, console)

        if "merges" in parts:
            merges = merge_costs(*on_device(bench.pretrained, bench.experts, bench.device),
                                 f"{cfg.encoder.name} × {len(bench.tasks)}", console,
                                 cfg.get("merge_methods"))
    for shape in cfg.get("merge_shapes") or [] if "merges" in parts else []:
        from hydra import compose  # real shapes, random weights: no download

        encoder_cfg = compose(config_name=f"encoder/{shape.encoder}").encoder
        dtype = torch.bfloat16 if shape.get("dtype", "bf16") == "bf16" else torch.float32
        with console.status(f"making random {shape.encoder} × {shape.tasks} checkpoints "
                            f"on {device}"):
            pretrained, experts = stand_in_checkpoints(encoder_cfg, int(shape.tasks), dtype,
                                                       device=device)
        merges += merge_costs(pretrained, experts, f"{shape.encoder} × {shape.tasks} "
                              f"({shape.get('dtype', 'bf16')}, random)", console,
                              cfg.get("merge_methods"))
        del pretrained, experts

    results = [{"step": name, "batch": size, "adaptive_s": ours, "plain_s": base,
                "ratio": ours / base, "steps_per_s": 1 / ours, "adaptive_ops": ours_ops,
                "plain_ops": base_ops} for name, size, ours, base, ours_ops, base_ops in rows]
    models, learned = [], []  # (printed with the evaluation and adaptation parts)
    if parts & {"evaluation", "adaptation"}:
        pixels = sum(s.images.numel() for s in bench.test_data.values())
        models = memory_models(cfg, len(tasks), adaptive["tinting"][1].get("batch_size", 32)
                               if "tinting" in adaptive else 32, pixels)
        learned = learned_memory_models(cfg, len(tasks))
    payload = {"command": "bench", "parts": sorted(parts), "device": str(device),
               "device_name": device_name(device), "encoder": cfg.encoder.name,
               "precision": precision, "tasks": tasks, "step_path": step_path,
               "threads": torch.get_num_threads(), "evaluation": evaluation,
               "target_eval_ratio": TARGET_EVAL_RATIO, "target_ratio": TARGET_RATIO,
               "results": results, "merges": merges, "runs": runs, "peak_memory": peaks,
               "memory_models": models, "learned_memory_models": learned,
               "versions": versions(), "config": OmegaConf.to_container(cfg, resolve=True)}
    write_json(run_dir / "bench.json", payload)
    where = f"{cfg.encoder.name} · {device_name(device)} · {precision}"
    if evaluation is not None:
        console.print(eval_table(evaluation, f"evaluation vs raw forward · {where}"))
    if results:
        console.print(bench_table(results, f"adaptation step vs plain forward+backward · {where}"
                                           f" · {step_path} steps"))
    if runs:
        console.print(runs_table(runs, f"whole runs · {where} · {step_path} steps"))
    if merges:
        console.print(merge_table(merges, f"data-free merges · {device_name(device)}"))
    if parts & {"evaluation", "adaptation"}:
        console.print(memory_table(peaks, models, device))
        console.print(learned_memory_table(learned))
    console.print(f"results: {run_dir / 'bench.json'}")
    return payload


def _parts(cfg: DictConfig) -> set[str]:
    """The parts to measure (``parts=[merges]`` times only the data-free merges)."""
    parts = set(cfg.get("parts") or PARTS[:3])  # (a whole run only when asked for)
    unknown = sorted(parts - set(PARTS))
    if unknown:
        raise TintError(f"parts={unknown[0]} is not a part tint bench measures\n"
                        f"Use a list of: {', '.join(PARTS)}.")
    return parts


def device_name(device: torch.device) -> str:
    """``cuda (NVIDIA H100 80GB HBM3)``, ``cpu (2 threads)``: which card gave a figure."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def merge_costs(pretrained: StateDict, experts: dict[str, StateDict], where: str,
                console: Console, only: list[str] | None = None) -> list[dict]:
    """Every registered data-free method's merge, timed once on these checkpoints, where they
    are (merges are deterministic and some take long), with the memory it held beyond the
    checkpoints. A method that chooses a parameter on validation is timed at its grid's first
    point: its Δ where it declares one (the grid then reuses it), else one merge per point."""
    from tintcli.methods import registered, run
    from tintcli.selection import searched

    device = next(iter(pretrained.values())).device  # merges compute where their inputs are
    out = []
    for name, method in registered().items():
        if method.adaptive or (only and name not in only):
            continue
        params = method.defaults
        grids = searched(method, params, None)
        point = {**params, **{k: v[0] for k, v in grids.items()}}
        with console.status(f"timing {method.pretty} on {where}"), PeakMemory(device) as peak:
            start = time.perf_counter()
            try:
                merged = run(name, pretrained, experts, **point)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except TintError as err:  # one that cannot run here (EMR on one task): say why
                out.append({"method": name, "pretty": method.pretty, "where": where,
                            "error": str(err)})
                continue
            seconds = time.perf_counter() - start
            del merged
        points = 1  # per-task parameters' points add (one probe each), the others' multiply
        for key, grid in grids.items():
            points *= 1 if key in method.per_task else len(grid)
        points += sum(len(grid) for key, grid in grids.items() if key in method.per_task)
        out.append({"method": name, "pretty": method.pretty, "where": where,
                    "merge_s": seconds, "grid_points": points,
                    "grid_merges": 1 if method.delta is not None and grids else points,
                    "peak_extra": peak.extra, "peak_kind": peak.kind})
        console.print(f"  {method.pretty} on {where}: {seconds:.2f} s, "
                      f"+{peak.extra / 2**30:.2f} GiB {peak.kind}")
    return out


class PeakMemory:
    """Memory held during a block beyond what was held before it: CUDA's peak allocated, or
    on the CPU the process's resident set sampled every 10 ms (getrusage's peak never comes
    down, so it cannot tell one merge from the one before)."""

    def __init__(self, device: torch.device):
        self.device, self.extra = device, 0
        self.kind = "CUDA allocated" if device.type == "cuda" else "RSS"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        import threading

        self.base = self.peak = _rss()
        self.done = threading.Event()

        def sample() -> None:
            while not self.done.wait(0.01):
                self.peak = max(self.peak, _rss())

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.base
            return
        self.done.set()
        self.thread.join()
        self.extra = max(self.peak, _rss()) - self.base


def _rss() -> int:
    """This process's resident set, in bytes (Linux)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def merge_table(costs: list[dict], title: str) -> Table:
    table = Table(title=title, title_justify="left",
                  caption="one merge, timed once; a validation grid costs grid merges (one Δ "
                          "where the method declares it) plus one validation pass per point; "
                          "extra memory: held beyond the checkpoints (CUDA: peak allocated, "
                          "CPU: resident set)")
    for column in ("method", "checkpoints", "merge s", "grid points", "grid merges",
                   "extra memory GiB"):
        table.add_column(column, justify="left" if column in ("method", "checkpoints")
                         else "right")
    for c in costs:
        if "error" in c:
            table.add_row(c["pretty"], "", "-", "-", "-", c["error"].splitlines()[0])
            continue
        table.add_row(c["pretty"], c["where"], f"{c['merge_s']:.2f}", str(c["grid_points"]),
                      str(c["grid_merges"]), f"{c['peak_extra'] / 2**30:.2f}")
    return table


def bench_table(results: list[dict], title: str) -> Table:
    table = Table(title=title, title_justify="left",
                  caption=f"median of timed steps; target ratio ≤ {TARGET_RATIO}; operations: "
                  "aten calls one step launches (the torch profiler's count)")
    for column in ("step", "images", "adaptive ms", "plain ms", "ratio", "steps/s",
                   "operations (plain)"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for r in results:
        ok = "[green]✓[/]" if r["ratio"] <= TARGET_RATIO else "[red]✗[/]"
        table.add_row(r["step"], str(r["batch"]), f"{1000 * r['adaptive_s']:.1f}",
                      f"{1000 * r['plain_s']:.1f}", f"{r['ratio']:.2f} {ok}",
                      f"{r['steps_per_s']:.1f}", f"{r['adaptive_ops']} ({r['plain_ops']})")
    return table


def runs_table(runs: list[dict], title: str) -> Table:
    table = Table(title=title, title_justify="left", caption="experts' outputs, every step, "
                  "and scoring every test split; caches warm")
    for column in ("method", "steps", "whole run s", "ms/step (all in)", "peak GiB"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in runs:
        table.add_row(r["pretty"], str(r["steps"]), f"{r['seconds']:.1f}",
                      f"{1000 * r['seconds'] / max(r['steps'], 1):.1f}",
                      f"{r['peak'] / 2**30:.2f}")
    return table


def eval_throughput(bench: Workbench, encoder: torch.nn.Module,
                    measure: Callable[[Callable[[], object]], float]) -> dict:
    """Scoring every task's test split from the pixel cache, as a run does, against the
    encoder's forward on random inputs already on the device, batch for batch (same sizes,
    same precision)."""
    from tintcli.evaluation import accuracy

    runtime, splits = bench.runtime, bench.test_data
    heads = {t: bench.heads[t].to(bench.device) for t in bench.tasks}
    sizes = [min(runtime.batch_size, len(s) - i) for s in splits.values()
             for i in range(0, len(s), runtime.batch_size)]
    size = next(iter(splits.values())).images.shape[1]
    x = torch.randn(max(sizes), 3, size, size, device=bench.device)

    @torch.inference_mode()
    def raw() -> None:
        for n in sizes:
            with runtime.autocast():
                encoder(x[:n])

    def scored() -> None:
        for t, split in splits.items():
            accuracy(encoder, heads[t], split.images, split.labels, runtime)

    images = sum(len(s) for s in splits.values())
    eval_s, raw_s = measure(scored), measure(raw)
    return {"tasks": len(splits), "images": images, "batch": runtime.batch_size,
            "eval_s": eval_s, "raw_s": raw_s, "eval_images_per_s": images / eval_s,
            "raw_images_per_s": images / raw_s, "ratio": raw_s / eval_s}


def _reset_peak(device: torch.device) -> None:
    """Each part's peak is its own (its method's step and the plain step), on CUDA."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    """Peak bytes: CUDA memory allocated since the last reset, or the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def memory_models(cfg: DictConfig, tasks: int, batch_size: int, pixels: int = 0
                  ) -> list[dict]:
    """The adaptation memory model for this encoder and task count (``pixels``: the bytes of
    this run's test pixels), and for each ``memory_model`` entry of the config (e.g.
    ViT-L/14 × vit20), in both vector dtypes; the pixels counted as if kept on the device."""
    from tintcli.memory import adaptation_memory

    out = []
    for encoder_cfg, count, images in _memory_shapes(cfg, tasks, pixels):
        for dtype in ("fp32", "bf16"):
            model = adaptation_memory(encoder_cfg, count, batch_size, dtype, pixels=images)
            out.append({"encoder": model.encoder, "tasks": count, "batch": batch_size,
                        "vectors_dtype": dtype, "terms": model.terms, "total": model.total})
    return out


def _memory_shapes(cfg: DictConfig, tasks: int, pixels: int = 0
                   ) -> list[tuple[DictConfig, int, int]]:
    """(encoder config, tasks, bytes of test pixels): this run's, then each ``memory_model``
    entry's. An entry's ``tasks`` is a count, or a task set (vit8: its tasks and their real
    test-set sizes, as ``pool=stand_in`` makes them)."""
    from hydra import compose

    from tintcli.memory import pixel_bytes
    from tintcli.stand_in import test_image_counts

    out = [(cfg.encoder, tasks, pixels)]
    for item in cfg.get("memory_model") or []:
        encoder_cfg = compose(config_name=f"encoder/{item.encoder}").encoder
        if isinstance(item.tasks, int):
            out.append((encoder_cfg, int(item.tasks), 0))
            continue
        tasks_cfg = compose(config_name=f"tasks/{item.tasks}").tasks
        counts = test_image_counts(tasks_cfg, [str(t) for t in tasks_cfg.names])
        out.append((encoder_cfg, len(counts), pixel_bytes(encoder_cfg, sum(counts.values()))))
    return out


def learned_memory_models(cfg: DictConfig, tasks: int) -> list[dict]:
    """Each method's own memory model (``register(memory=...)``: WEMoE's routed model, its
    parameters beside the encoder's; Surgery's features and adapters) at its defaults, for
    this encoder and task count and each ``memory_model`` entry."""
    out = []
    for encoder_cfg, count, _ in _memory_shapes(cfg, tasks):
        for dtype in ("fp32", "bf16"):
            for name, method in registered().items():
                if method.memory is None:
                    continue
                model = method.memory(encoder_cfg, count, method.defaults, dtype)
                out.append({"method": name, "encoder": model.encoder, "tasks": count,
                            "vectors_dtype": dtype, "terms": model.terms,
                            "total": model.total, "parameters": model.parameters})
    return out


def learned_memory_table(models: list[dict]) -> Table:
    from tintcli.memory import GiB

    table = Table(title="each method's own memory model, GiB (register(memory=...))",
                  title_justify="left",
                  caption="WEMoE: one task's batch of 16 at a time; Surgery, ProbSurgery: "
                          "10,000 test images per task, after their λ are learned")
    for column in ("method", "encoder × tasks", "vectors", "parameters (M)", "largest terms",
                   "total"):
        table.add_column(column, justify="right" if column == "total" else "left")
    for m in models:
        largest = sorted(m["terms"].items(), key=lambda kv: -kv[1])[:2]
        params = m["parameters"]
        table.add_row(m["method"], f"{m['encoder']} × {m['tasks']}", m["vectors_dtype"],
                      f"{params['routed model'] / 1e6:.1f} (encoder {params['encoder'] / 1e6:.1f})"
                      if params else "—",
                      "; ".join(f"{k.split(' (')[0]} {v / GiB:.2f}" for k, v in largest),
                      f"{m['total'] / GiB:.1f}")
    return table


def eval_table(r: dict, title: str) -> Table:
    ok = "[green]✓[/]" if r["ratio"] >= TARGET_EVAL_RATIO else "[red]✗[/]"
    table = Table(title=title, title_justify="left",
                  caption=f"median of timed passes; target ratio ≥ {TARGET_EVAL_RATIO}")
    for column in ("what", "images", "eval img/s", "raw img/s", "ratio"):
        table.add_column(column, justify="left" if column == "what" else "right")
    table.add_row(f"score {r['tasks']} tasks' test splits (batch {r['batch']})", str(r["images"]),
                  f"{r['eval_images_per_s']:.0f}", f"{r['raw_images_per_s']:.0f}",
                  f"{r['ratio']:.2f} {ok}")
    return table


def memory_table(peaks: dict[str, int], models: list[dict], device: torch.device) -> Table:
    from tintcli.memory import GiB

    kind = "CUDA peak allocated" if device.type == "cuda" else "process peak RSS"
    measured = ", ".join(f"after {name} {peak / GiB:.2f}" for name, peak in peaks.items())
    table = Table(title="adaptation memory model, GiB (tintcli/memory.py)", title_justify="left",
                  caption=f"measured here ({kind}, GiB): {measured}\nactivations: one batch, "
                          "fp32 (an upper bound under AMP); test pixels: as if kept on the "
                          "device (runtime.resident_pixels)")
    table.add_column("encoder × tasks")
    table.add_column("vectors")
    names = list(models[0]["terms"]) if models else []
    for name in names:
        table.add_column(name.split(" (")[0], justify="right")
    table.add_column("total", justify="right", style="bold")
    for m in models:
        table.add_row(f"{m['encoder']} × {m['tasks']}", m["vectors_dtype"],
                      *[f"{v / GiB:.2f}" for v in m["terms"].values()], f"{m['total'] / GiB:.1f}")
    return table
