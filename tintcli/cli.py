"""The ``tint`` command. Each subcommand that runs experiments is a Hydra app over ``conf/``,
so overrides, ``--cfg job``, ``--help``, ``-m`` and run directories behave as Hydra users
expect; this module only picks the app and turns TintErrors into one clear message."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tintcli.errors import (
    Interrupted,
    TintError,
    fail,
    install_stop_handlers,
    stop_requested,
    stops_deferred,
)
from tintcli.paths import CONF_DIR, CONF_MODULE

if TYPE_CHECKING:  # the rest is imported when used: Ctrl-C is tint's from its first moment
    from omegaconf import DictConfig
    from rich.console import Console


def _merge(cfg: DictConfig, console: Console) -> float | None:
    """One run; returns the config's ``objective`` (what a search sweeper maximises)."""
    from hydra.core.hydra_config import HydraConfig

    from tintcli.objective import objective
    from tintcli.recipes import merge

    hydra_cfg = HydraConfig.get()  # (a search's objective is checked before its first trial)
    payload = merge.run(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task),
                        console, resume=_multirun())
    return objective(payload, cfg)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _bench(cfg: DictConfig, console: Console) -> None:
    from hydra.core.hydra_config import HydraConfig

    from tintcli.recipes import bench

    bench.run(cfg, Path(HydraConfig.get().runtime.output_dir), console)


def _zoo_build(cfg: DictConfig, console: Console) -> None:
    from tintcli.recipes import zoo

    zoo.build(cfg, console)


def _convert(cfg: DictConfig, console: Console) -> None:
    from tintcli.recipes import convert

    convert.convert(cfg, console)


# subcommand words -> (primary config in conf/, one-line help, recipe)
SUBCOMMANDS: dict[str, tuple[str, str, Callable[[DictConfig, Console], object]]] = {
    "merge": ("merge", "merge the experts and score the merged encoder on every task", _merge),
    "bench": ("bench", "time evaluation, adaptation steps and data-free merges", _bench),
    "zoo build": ("zoo", "build (or find cached) the benchmark zoo and check its realism",
                  _zoo_build),
    "convert": ("convert", "write a checkpoint pool as a local safetensors pool", _convert),
}


def stopped(err: Interrupted) -> None:
    """End a job that Ctrl-C or SIGTERM stopped. A parallel launcher's worker process (one
    that never ran ``main``) leaves the message to the process the user started, which was
    stopped too and says where every job's rows are."""
    if IN_MAIN:
        fail(err)
    sys.exit(err.exit_code)


IN_MAIN = False  # this process runs `tint` (not a launcher's worker that runs its jobs)


def _hydra_app(config_name: str, recipe: Callable[[DictConfig, Console], object]):
    import hydra

    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        fail(TintError(f"tint's configs are missing: no {config_name}.yaml in {CONF_DIR}\n"
                       "Reinstall tint: pip install -e ."))

    from tintcli.tracking import register_resolvers

    register_resolvers()  # (importing pkg://tintcli.conf registers the methods' parameters)

    @hydra.main(version_base="1.3", config_path=f"pkg://{CONF_MODULE}", config_name=config_name)
    def app(cfg: DictConfig) -> object:
        """A job never exits the process: its failure is recorded in its run directory
        (error.json) and reported when Hydra is done, so a sweep's other jobs go on. It returns
        what its recipe returns (a search sweeper's objective). Ctrl-C and SIGTERM are no
        failed job: they stop the sweep too."""
        from hydra.core.hydra_config import HydraConfig

        RUN_DIRS.append(Path(HydraConfig.get().runtime.output_dir))
        from rich.console import Console

        try:
            check_settings_set(cfg)
            return recipe(cfg, Console())
        except KeyboardInterrupt as stop:  # before the recipe could say where its rows are
            stopped(Interrupted.by(stop, rows_kept()))
        except Exception as err:  # noqa: BLE001 - recorded, then reported (or re-raised)
            stop = stop_requested()
            if stop is not None and not isinstance(err, Interrupted):  # swallowed Ctrl-C
                stopped(Interrupted.by(stop, rows_kept()))
            if not isinstance(err, TintError) and not _multirun():
                raise  # a bug in a single run: its traceback, as usual
            from tintcli.tracking import record_failure

            FAILED.append(record_failure(err, multirun=_multirun()))
            if isinstance(err, Interrupted):
                stopped(err)  # Ctrl-C stops a sweep too: its other jobs do not start
            return None

    return app


def check_settings_set(cfg: DictConfig) -> None:
    """Every mandatory setting (``???`` in its YAML) the user left unset is one line naming
    it and what to put there (the YAML's comment on it), before any work; OmegaConf would
    otherwise raise deep inside the run."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        hints = [f"Pass {key}=... on the command line" + (f" ({hint})." if (hint := _hint(key))
                                                           else ".") for key in missing]
        raise TintError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set\n"
                        + "\n".join(hints))


def _hint(key: str) -> str | None:
    """The comment on ``key: ???`` in the YAML that Hydra took it from (the config group's
    chosen option, or the primary config)."""
    import re

    from hydra.core.hydra_config import HydraConfig

    group, _, leaf = key.rpartition(".")
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    name = HydraConfig.get().job.config_name if HydraConfig.initialized() else None
    candidates = [CONF_DIR / group.replace(".", "/") / f"{choices.get(group)}.yaml"] \
        if group else [CONF_DIR / f"{name}.yaml"]
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        found = re.search(rf"^\s*{re.escape(leaf)}:\s*['\"]?\?\?\?['\"]?\s*#\s*(.+)$", text,
                          re.MULTILINE)
        if found:
            return found.group(1).strip()
    return None


def rows_kept() -> str:
    """Where a stopped process's finished rows are: in the run directories its jobs started
    and, in a sweep, every job folder (a parallel launcher's jobs ran in other processes),
    a run's results or its partial rows; or that there are none yet."""
    from tintcli.paths import PARTIAL, RESULTS

    if COMMAND[-1:] == ["bench"]:  # a benchmark keeps no rows: it writes bench.json when done
        return "tint bench writes its figures only when it is done: nothing was kept."
    tracking = sys.modules.get("tintcli.tracking")  # not imported here: torch may be half-loaded
    sweep_dir = tracking.SWEEP.get("dir") if tracking is not None else None
    dirs = list(RUN_DIRS)
    if sweep_dir and Path(sweep_dir).is_dir():
        dirs += sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and p not in dirs)
    found = []
    for run_dir in dirs:
        for name in (RESULTS, PARTIAL):
            try:
                rows = json.loads((run_dir / name).read_text())["rows"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            merged = sum(isinstance(r, dict) and r.get("kind") == "merged" for r in rows)
            if merged:
                found.append(f"{run_dir / name} ({merged} method row(s))")
            break
    if not found:
        return "No method row was finished yet" + (f" (the sweep: {sweep_dir})." if sweep_dir
                                                    else ".")
    if len(found) > 3:
        return f"Rows finished before this: {len(found)} runs under {sweep_dir}"
    return "Rows finished before this: " + ", ".join(found)


COMMAND: list[str] = []  # the recipe this process runs (merge, bench, zoo ...)
RUN_DIRS: list[Path] = []  # the run directories this process's jobs started, in order
FAILED: list[TintError] = []  # this process's failed jobs, reported once Hydra returns


def usage() -> str:
    lines = ["usage: tint <command> [hydra overrides and flags]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_, _) in SUBCOMMANDS.items()]
    lines += [f"  {'table':<10} the paper's tables from results.json files (tint table --help)"]
    lines += [f"  {'cache':<10} re-hash the cache's entries; --fix removes damaged ones "
              "(tint cache verify --help)"]
    lines += ["", "Each command is a Hydra app: `tint merge --help` lists its config groups;",
              "`tint merge +tasks=vit8` and `tint merge tasks=vit8` both pick a task set;",
              "`tint merge method=ties method.lam=0.5`, `tint merge -m method.lam=0.1,0.3`,",
              "`tint merge --cfg job` prints the composed config."]
    return "\n".join(lines)


def default_groups(config_name: str) -> set[str]:
    """The config groups the primary config's defaults list already picks (``tasks``, ...)."""
    import yaml

    spec = yaml.safe_load((CONF_DIR / f"{config_name}.yaml").read_text()) or {}
    groups = set()
    for item in spec.get("defaults") or []:
        if isinstance(item, dict):
            for key in item:
                groups.add(str(key).removeprefix("override ").split("@")[0].lstrip("/"))
    return groups


def normalize_overrides(args: list[str], config_name: str) -> list[str]:
    """``+tasks=vit8`` is how the papers' users type it, but Hydra refuses ``+group=`` for a
    group the defaults list already holds ("Multiple values for tasks"). For such a group,
    ``+group=option`` means what ``group=option`` means, so tint passes it on that way;
    ``+group=`` for any other group, and ``+key=value``, reach Hydra unchanged."""
    groups = default_groups(config_name)
    out = []
    for arg in args:
        name = arg[1:].split("=", 1)[0] if arg.startswith("+") and "=" in arg else None
        if name is not None and not arg.startswith("++") and name in groups:
            arg = arg[1:]
        out.append(arg)
    return out


def check_method_overrides(args: list[str], config_name: str) -> None:
    """``method.<key>=value`` for a key the chosen method does not have is one ``error:``
    line naming what it does have, before any work (Hydra's own message is "Could not
    override", exit 1). The method's config is composed as the run will compose it (each
    choice of a ``method=a,b`` sweep; other sweeps at their first value)."""
    if "method" not in default_groups(config_name):
        return
    from hydra import compose, initialize_config_module
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    try:
        overrides = OverridesParser.create().parse_overrides(
            get_args_parser().parse_known_args(args)[0].overrides)
    except (HydraException, SystemExit):
        return  # Hydra says what is wrong with it
    asked = [o for o in overrides if o.type == OverrideType.CHANGE and o.package is None
             and o.key_or_group.startswith("method.")]
    if not asked:
        return
    choices, others = [None], []
    for o in overrides:
        if o in asked or o.key_or_group.startswith("hydra."):
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else None
        if o.key_or_group == "method" and o.package is None and values:
            choices = values
        elif values:
            others.append(f"{o.get_key_element()}={values[0]}")
        else:
            others.append(o.input_line)
    for choice in choices:
        try:
            with initialize_config_module(CONF_MODULE, version_base="1.3"):
                cfg = compose(config_name, return_hydra_config=True, overrides=others + (
                    [f"method={choice}"] if choice is not None else []))
        except Exception:  # noqa: BLE001 - any other composition error is Hydra's to report
            return
        for o in asked:
            path = o.key_or_group.removeprefix("method.").split(".")
            node = cfg.method
            for depth, part in enumerate(path):
                if not OmegaConf.is_dict(node) or part not in node:
                    where = ".".join(["method", *path[:depth]])
                    has = (f"{where} has: {', '.join(str(k) for k in node)}"
                           if OmegaConf.is_dict(node) else f"{where} is a value, not a group")
                    name = cfg.hydra.runtime.choices.get("method", cfg.method.name)
                    raise TintError(f"method={name} has no setting '{o.key_or_group}'\n{has}\n"
                                    f"See them with: tint {config_name} method={name} "
                                    "--cfg job")
                node = node[part]


def main(argv: list[str] | None = None) -> int:
    global IN_MAIN
    IN_MAIN = True
    install_stop_handlers()
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt as stop:  # imports, composing, between jobs, a parallel sweep
        fail(Interrupted.by(stop, rows_kept()))
    return 130


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "table":  # reads results, runs nothing: plain arguments, not a Hydra app
        from tintcli.recipes import table

        try:
            return table.main(argv[1:])
        except TintError as err:
            fail(err)
    if argv[0] == "cache":  # checks the cache, runs nothing: plain arguments, not a Hydra app
        from tintcli.recipes import cache

        try:
            return cache.main(argv[1:])
        except TintError as err:
            fail(err)
    for name, (config_name, _, recipe) in SUBCOMMANDS.items():
        words = name.split()
        if argv[: len(words)] == words:
            COMMAND.append(config_name)
            with stops_deferred():  # a Ctrl-C inside torch's C++ import would abort the process
                importlib.import_module(f"tintcli.recipes.{config_name}")
            overrides = normalize_overrides(argv[len(words):], config_name)
            try:
                check_method_overrides(overrides, config_name)
            except TintError as err:
                fail(err)
            sys.argv = [f"tint {name}", *overrides]
            _hydra_app(config_name, recipe)()
            from tintcli.tracking import sweep_failure

            failure = sweep_failure() or (FAILED[0] if FAILED else None)
            if failure is not None:
                fail(failure)
            return 0
    known = ", ".join([*SUBCOMMANDS, "table", "cache verify"])
    fail(TintError(f"unknown command '{' '.join(argv[:2]) if argv[0] == 'zoo' else argv[0]}'; "
                   f"tint has: {known}\nRun `tint --help` for usage."))
    return 2


if __name__ == "__main__":
    sys.exit(main())
