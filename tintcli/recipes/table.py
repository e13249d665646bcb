"""`tint table`: the paper's tables from any runs' and sweeps' results.json files.

A row is identified by its method and parameters (never by its label), and a row's numbers
are the mean ± sample std over the runs whose resolved configs differ only in the seed. One
table per setting (encoder, task set, checkpoint pool); the papers' reference average sits
beside each row where the setting is one the papers report, and "not comparable" where it
is not. Output as a rich table, Markdown, CSV or LaTeX; a lambda sweep also gives an
accuracy-vs-lambda PNG (test, and validation where the runs scored it).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tintcli.errors import TintError
from tintcli.io import atomic_write, canonical, fingerprint
from tintcli.methods import get_method
from tintcli.report import mean_std

# The papers' reference averages (SyMerge's table, arXiv 2412.19098; FusionBench's re-run):
# (encoder, task set, checkpoint pool kind) -> row -> %.
# task_vectors-style checkpoints: the final-version table; hf: FusionBench's own re-run.
_FINAL = {  # (B/32 8, 14, 20), (L/14 8, 14, 20)
    "zero-shot": ((48.0, 57.1, 56.0), (64.5, 68.1, 65.1)),
    "experts": ((90.5, 89.5, 90.4), (94.2, 93.2, 94.0)),
    "task_arithmetic": ((69.1, 65.4, 60.8), (84.5, 78.4, 73.9)),
    "ties": ((72.9, 65.2, 63.1), (86.0, 80.5, 73.0)),
    "adamerging": ((80.1, 76.7, 69.6), (90.8, 85.2, 82.1)),
    "tinting": ((90.1, 88.7, 88.6), (94.1, 92.8, 93.2)),
    "consensus_ta": ((74.9, 70.3, 65.0), (86.6, 82.3, 78.9)),
    "tsv_m": ((84.0, 80.1, 76.6), (91.5, 88.2, 87.2)),
    "iso_cts": ((84.2, 80.6, 76.9), (93.0, 89.7, 89.2)),
    "emr": ((88.7, 86.1, 86.6), (93.7, 91.4, 92.0)),
    "pcb": ((75.6, 63.8, 52.7), (87.5, 81.3, 73.4)),       # SyMerge's text
    "lines_ta": ((74.1, 68.0, 63.7), (86.9, 80.4, 75.7)),  # SyMerge's text
    "surgery": ((87.5, 84.6, 84.5), (92.3, 90.4, 89.5)),   # SyMerge's re-run (own logs: 86.1)
    "prob_surgery": ((87.4, 84.9, 84.5), (92.7, 90.7, 90.2)),  # SyMerge's text
    "wemoe": ((89.4, 83.0, 78.9), (93.6, 88.4, 78.8)),
    "lot": ((82.7, 77.3, 73.1), (90.5, 86.2, 84.1)),       # SyMerge's text
}  # CART's own numbers (84.7, ...) are on the TALL-masks checkpoints: not comparable here
REFERENCES: dict[tuple[str, str, str], dict[str, float]] = {
    (encoder, tasks, "task_vectors"): {row: values[e][t] for row, values in _FINAL.items()}
    for e, encoder in enumerate(("clip_vit_b32", "clip_vit_l14"))
    for t, tasks in enumerate(("vit8", "vit14", "vit20"))}
REFERENCES[("clip_vit_b32", "vit8", "task_vectors")]["adamerging_pp"] = 81.1  # its own logs
REFERENCES[("clip_vit_b32", "vit8", "hf")] = {
    "zero-shot": 48.2, "experts": 90.3, "weight_averaging": 66.5, "task_arithmetic": 68.0,
    "ties": 72.2, "adamerging_task": 68.7, "adamerging": 82.6}
REFERENCES[("clip_vit_l14", "vit8", "hf")] = {"task_arithmetic": 80.7, "ties": 84.0,
                                              "adamerging": 91.0}
_BOOKKEEPING = ("seed", "overwrite", "save_merged", "tracking", "device", "eval", "method")


@dataclass
class Row:
    label: str
    kind: str
    method: str | None
    params: dict
    runs: list[dict] = field(default_factory=list)  # the row of each seed's run
    seeds: list = field(default_factory=list)

    def add(self, seed: object, row: dict) -> None:
        """One row per seed: the reference rows repeat in every run of a sweep."""
        if seed not in self.seeds:
            self.seeds.append(seed)
            self.runs.append(row)

    def stat(self, pick) -> tuple[float | None, float | None]:
        """Mean and sample std over the seeds' runs that have the value (a lone one: no std)."""
        return mean_std([v for v in (pick(r) for r in self.runs) if v is not None])


@dataclass
class Setting:
    encoder: str
    task_set: str
    pool: str
    tasks: list[str]
    rows: dict[tuple, Row] = field(default_factory=dict)
    seeds: set = field(default_factory=set)

    @property
    def title(self) -> str:
        return f"{self.task_set} · {self.encoder} · pool={self.pool}"

    @property
    def references(self) -> dict[str, float] | None:
        return REFERENCES.get((self.encoder, self.task_set, self.pool))


def find_results(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob("results.json")))
        else:
            raise TintError(f"{path} does not exist\nGive run or sweep folders, or results.json "
                            "files.")
    if not found:
        raise TintError(f"no results.json under {', '.join(paths)}\nGive the folders of "
                        "finished runs or sweeps (runs/merge/..., runs/merge-sweep/...).")
    return found


def _method_key(row: dict) -> str:
    """The paper's reference row a row reproduces, as its method declares it (results
    record it; for older ones the registry says, e.g. AdaMerging++ from its parameters)."""
    if row["kind"] == "reference":
        return row["name"]
    declared = (row.get("reference") or {}).get("row")
    if declared:
        return declared
    method = row.get("method") or row["name"]
    try:
        return get_method(method).row(row.get("params") or {})
    except TintError:
        return method


class Damaged(ValueError):
    """A results.json the table cannot use; the message says why."""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_row(row: object) -> None:
    """A row as the table reads it: a name and kind, per-task accuracies and averages."""
    if not isinstance(row, dict):
        raise Damaged(f"a {type(row).__name__}, not an object")
    for key in ("name", "kind"):
        if not isinstance(row.get(key), str):
            raise Damaged(f"'{key}' is missing or not text")
    if row.get("method") is not None and not isinstance(row["method"], str):
        raise Damaged("'method' is not text")
    if row.get("params") is not None and not isinstance(row["params"], dict):
        raise Damaged("'params' is not an object")
    accuracy = row.get("accuracy")
    if not isinstance(accuracy, dict) or not all(_is_number(v) for v in accuracy.values()):
        raise Damaged("'accuracy' is missing or not numbers per task")
    if not _is_number(row.get("average")):
        raise Damaged("'average' is missing or not a number")
    if row.get("normalized_average") is not None and not _is_number(row["normalized_average"]):
        raise Damaged("'normalized_average' is not a number")
    validation = row.get("validation")
    if validation is not None and not (isinstance(validation, dict) and (
            validation.get("average") is None or _is_number(validation["average"]))):
        raise Damaged("'validation' has no number for its average")


def read_result(path: Path) -> dict:
    """One results.json, its shape checked as far as the table reads it, so that a damaged
    file is skipped whole (never half-counted, nor a crash in the middle of rendering)."""
    try:
        result = json.loads(path.read_text())
    except OSError as err:
        raise Damaged(f"cannot read it ({err.strerror or err})") from err
    except ValueError as err:
        raise Damaged(f"not JSON ({err})") from err
    if not isinstance(result, dict):
        raise Damaged(f"JSON of the wrong shape: a {type(result).__name__}, not a tint "
                      "results object")
    config = result.get("config")
    if not isinstance(config, dict):
        raise Damaged("no 'config' object")
    for key in ("encoder", "tasks"):
        if not isinstance(config.get(key), dict) or not isinstance(config[key].get("name"), str):
            raise Damaged(f"no config.{key}.name")
    pool = config.get("pool")
    if pool is not None and not (isinstance(pool, dict)
                                 and isinstance(pool.get("kind", "synth"), str)):
        raise Damaged("config.pool is not an object with a kind")
    tasks = result.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise Damaged("no 'tasks' list of task names")
    seed = result.get("seed")
    if seed is not None and not isinstance(seed, int | float | str):
        raise Damaged("'seed' is not a number")
    if not isinstance(result.get("rows"), list) or not result["rows"]:
        raise Damaged("no 'rows' list, or it is empty")
    for i, row in enumerate(result["rows"]):
        try:
            _check_row(row)
        except Damaged as err:
            raise Damaged(f"rows[{i}]: {err}") from None
    return result


def gather(files: list[Path], console: Console | None = None,
           skipped: list[tuple[Path, str]] | None = None) -> list[Setting]:
    """The settings and rows of every usable file. A damaged one (cut short by a killed
    job, edited by hand) is skipped with a warning naming it, and added to ``skipped``: one
    bad file in a sweep of a hundred must not cost the table. None usable is an error."""
    settings: dict[tuple, Setting] = {}
    skipped = [] if skipped is None else skipped
    warn = console or Console(stderr=True)
    for path in files:
        try:
            result = read_result(path)
        except Damaged as why:
            skipped.append((path, str(why)))
            warn.print(f"[yellow]warning:[/] skipped {escape(str(path))}: {escape(str(why))}",
                       soft_wrap=True, highlight=False)
            continue
        config = result["config"]
        pool = (config.get("pool") or {}).get("kind", "synth")
        key = (config["encoder"]["name"], config["tasks"]["name"], pool, tuple(result["tasks"]))
        setting = settings.setdefault(key, Setting(*key[:3], list(result["tasks"])))
        setting.seeds.add(result.get("seed"))
        # runs that differ in anything but the seed (and the method) are other rows
        rest = fingerprint({k: v for k, v in config.items() if k not in _BOOKKEEPING})
        for row in result["rows"]:
            params = canonical(row.get("params") or {})
            row_id = (row["kind"], row.get("method") or row["name"], fingerprint(params),
                      rest if row["kind"] != "reference" else "")
            entry = setting.rows.setdefault(row_id, Row(row["name"], row["kind"],
                                                        row.get("method"), params))
            entry.add(result.get("seed"), row)
    if not settings and skipped:
        path, why = skipped[0]
        more = f" (and {len(skipped) - 1} more damaged)" if len(skipped) > 1 else ""
        raise TintError(f"{path} is not a tint results.json ({why}){more}\nNo usable "
                        "results are left: give the folders of finished runs or sweeps, or "
                        "run the damaged ones again.")
    return list(settings.values())


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _cell(mean: float | None, std: float | None) -> str:
    return _pct(mean) + (f" ± {100 * std:.1f}" if std is not None else "")


def records(setting: Setting) -> list[dict[str, Any]]:
    """One plain record per row: label, per-task means, average, normalised, seeds, paper."""
    out = []
    refs = setting.references
    for row in setting.rows.values():
        sample = row.runs[0]
        method = _method_key(sample)
        reference: float | str | None = "not comparable"
        if refs is not None:
            reference = refs.get(method)
        record = {"row": row.label, "method": row.method or row.label, "params": row.params,
                  "seeds": len(row.runs)}
        for task in setting.tasks:
            record[task] = row.stat(lambda r, t=task: r["accuracy"].get(t))
        record["average"] = row.stat(lambda r: r["average"])
        record["normalized"] = row.stat(lambda r: r.get("normalized_average"))
        record["validation"] = row.stat(lambda r: (r.get("validation") or {}).get("average"))
        record["paper"] = reference
        out.append(record)
    return out


def _paper(value: float | str | None) -> str:
    return value if isinstance(value, str) else ("-" if value is None else f"{value:.1f}")


def render(setting: Setting, fmt: str, per_task: bool = True) -> str | Table:
    rows = records(setting)
    tasks = setting.tasks if per_task else []
    validation = any(r["validation"][0] is not None for r in rows)
    header = ["method", *tasks, *(["val"] if validation else []), "avg", "norm", "seeds",
              "paper avg"]
    body = [[r["row"], *[_pct(r[t][0]) for t in tasks],
             *([_pct(r["validation"][0])] if validation else []), _cell(*r["average"]),
             _pct(r["normalized"][0]), str(r["seeds"]), _paper(r["paper"])] for r in rows]
    if fmt == "rich":
        table = Table(title=setting.title, title_justify="left",
                      caption="top-1 accuracy % (test; val: validation), mean ± std over seeds;"
                              " paper avg: SyMerge's table (arXiv 2412.19098)")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for line in body:
            table.add_row(*line)
        return table
    if fmt == "md":
        lines = [f"**{setting.title}**", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body]) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["setting", *header])
        for line in body:
            writer.writerow([setting.title, *line])
        return buffer.getvalue()
    if fmt == "latex":
        escape = lambda text: text.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$")  # noqa: E731
        lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
                 " & ".join(escape(h) for h in header) + r" \\", r"\midrule"]
        lines += [" & ".join(escape(c) for c in line) + r" \\" for line in body]
        lines += [r"\bottomrule", r"\end{tabular}", f"% {setting.title}"]
        return "\n".join(lines) + "\n"
    raise TintError(f"--format {fmt} is not one tint writes; use rich, md, csv or latex")


def lambda_sweeps(setting: Setting) -> dict[str, list[tuple[float, float, float | None]]]:
    """Per method and its other parameters (one curve each: TIES at top-k 10 and at 20 are
    two): (lambda, test average, validation average) when there are at least three."""
    curves: dict[str, list[tuple[float, float, float | None]]] = {}
    for row in setting.rows.values():
        if row.kind != "merged" or "lam" not in row.params:
            continue
        rest = " ".join(f"{k}={v}" for k, v in row.params.items() if k != "lam")
        test = row.stat(lambda r: r["average"])[0]
        val = row.stat(lambda r: (r.get("validation") or {}).get("average"))[0]
        curves.setdefault(f"{row.method} {rest}".strip(), []).append(
            (float(row.params["lam"]), test, val))
    return {name: sorted(points) for name, points in curves.items() if len(points) >= 3}


def lambda_plot(setting: Setting, path: Path) -> bool:
    """Accuracy against lambda (test, and validation with its best marked); False if the
    setting holds no lambda sweep."""
    sweeps = lambda_sweeps(setting)
    if not sweeps:
        return False
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in sweeps.items():
        lams = [p[0] for p in points]
        ax.plot(lams, [100 * p[1] for p in points], marker="o", label=f"{method} (test)")
        if all(p[2] is not None for p in points):
            ax.plot(lams, [100 * p[2] for p in points], marker="s", linestyle="--",
                    label=f"{method} (validation)")
            best = max(points, key=lambda p: p[2])
            ax.axvline(best[0], color="grey", linestyle=":", label=f"best on validation: "
                                                                   f"λ={best[0]:g}")
    ax.set_xlabel("λ")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(setting.title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tint table", description="The paper's tables from runs' and sweeps' "
                                       "results.json files.")
    parser.add_argument("paths", nargs="+", help="run or sweep folders, or results.json files")
    parser.add_argument("--format", default="rich", choices=["rich", "md", "csv", "latex"])
    parser.add_argument("--out", help="write the table to this file (default: print it)")
    parser.add_argument("--plot", help="write the accuracy-vs-λ PNG of a λ sweep here "
                                       "(default: lambda.png beside --out, or in the first "
                                       "folder given)")
    parser.add_argument("--no-tasks", action="store_true", help="averages only")
    args = parser.parse_args(argv)
    files = find_results(args.paths)
    skipped: list[tuple[Path, str]] = []
    settings = gather(files, skipped=skipped)
    console = Console()
    chunks = []
    for setting in settings:
        fits = 40 + 7 * len(setting.tasks) + max(len(r.label) for r in setting.rows.values())
        per_task = not args.no_tasks and (args.format != "rich" or fits <= console.width)
        rendered = render(setting, args.format, per_task=per_task)
        if isinstance(rendered, Table):
            console.print(rendered)
        else:
            chunks.append(rendered)
    text = "\n".join(chunks)
    if args.out:
        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(text))
        console.print(f"table: {args.out}")
    elif text:
        print(text, end="")
    first = Path(args.paths[0])
    default = (Path(args.out).parent if args.out else first if first.is_dir()
               else first.parent) / "lambda.png"
    for i, setting in enumerate(settings):
        plot = Path(args.plot) if args.plot else default
        if i:
            plot = plot.with_name(f"{plot.stem}-{i}{plot.suffix}")
        if lambda_plot(setting, plot):
            console.print(f"λ plot: {plot}")
    damaged = f" ({len(skipped)} skipped)" if skipped else ""
    console.print(f"[dim]{len(files) - len(skipped)} results.json file(s){damaged}, "
                  f"{len(settings)} setting(s)[/]")
    return 0
