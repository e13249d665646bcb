"""The README and docs/ as a manual that cannot drift from the code: the README's methods
table is the registry's, every Python block runs, every documented `tint` command composes."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BEGIN, END = "<!-- methods:begin -->", "<!-- methods:end -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SHELL = {"bash", "sh", "shell"}
# the subcommands whose documented lines must compose (`tint table`, `tint cache verify`
# read runs and caches that a manual's reader has and a test has not)
COMPOSED = (("merge",), ("bench",), ("convert",), ("zoo", "build"))
PLACEHOLDERS = ("<", "...", "…")
# documented lines that cannot compose here, each with its reason
SKIP = {"+launcher=slurm": "submits to a SLURM cluster"}


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _blocks(page: Path, languages: set[str]) -> list[str]:
    return [body for language, body in FENCE.findall(page.read_text()) if language in languages]


def _link(url: str | None) -> str:
    """A markdown link named by the URL's path: arXiv's id, GitHub's owner/name."""
    if not url:
        return "—"
    tail = url.split("://", 1)[-1].split("/", 1)[-1]
    return f"[{tail.removeprefix('abs/')}]({url})"


def _chosen(method) -> str:
    if not method.search:
        return "—"
    def grid(param: str) -> str:
        points = method.search[param]
        return f"{param} ∈ {{{points[0]}{'' if len(points) == 1 else f' … {points[-1]}'}}}"

    # parameters chosen per task come first (each on its own task's validation split)
    per_task = ", ".join(f"{grid(p)} per task" for p in method.search if p in method.per_task)
    rest = ", ".join(grid(p) for p in method.search if p not in method.per_task)
    if rest and method.choose_by == "normalized_average":
        rest += " by normalised accuracy"
    if rest and method.patience is not None:
        rest += ", early stopping"
    return "; then ".join(part for part in (per_task, rest) if part)


def methods_table() -> str:
    """The README's methods table, rendered from the registry (``tintcli.methods``)."""
    from tintcli.methods import registered

    rows = ["| `method=` | row | kind | chosen on validation | paper | code |",
            "|---|---|---|---|---|---|"]
    for name, method in registered().items():
        if name.endswith("_for_test"):
            continue
        kind = "adaptive" if method.adaptive else "data-free"
        rows.append(f"| `{name}` | {method.pretty} | {kind} | {_chosen(method)} | "
                    f"{_link(method.paper)} | {_link(method.code)} |")
    return "\n".join(rows)


def test_the_readmes_methods_table_is_the_registrys():
    text = README.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"README.md needs {BEGIN} ... {END}"
    shown = text.split(BEGIN)[1].split(END)[0].strip("\n")
    expected = methods_table()
    if shown != expected:
        print(expected)  # pytest's "Captured stdout call": the table as it is, to paste
    assert shown == expected, ("README.md's methods table is not the registry's; paste this "
                               f"between {BEGIN} and {END}:\n\n{expected}\n")


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to -."""
    text = FENCE.sub("", page.read_text())
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, re.M)}


def test_the_links_between_pages_resolve():
    """Every relative link of the README, docs/ and results/ names a file that exists and,
    with #anchor, a heading of it."""
    broken = []
    for page in [*PAGES, *sorted((ROOT / "results").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", page.read_text())):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists() or (anchor and file.is_file() and anchor not in _anchors(file)):
                broken.append(f"{_name(page)}: {target}")
    assert not broken, "links to nothing:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p, {"python"})], ids=_name)
def test_the_python_blocks_run(page, tmp_path):
    """A page's ```python blocks, in order, in one fresh interpreter from the repository."""
    script = tmp_path / f"{page.stem}.py"
    script.write_text("\n\n".join(_blocks(page, {"python"})))
    env = {**os.environ, "TINT_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"{_name(page)}'s Python blocks failed:\n{out.stderr[-3000:]}"


def _commands() -> list[tuple[str, list[str]]]:
    """(where, the arguments after `tint`) of every documented line that must compose."""
    found = []
    for page in PAGES:
        for block in _blocks(page, SHELL):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                while words:  # each command of `a && b`
                    end = words.index("&&") if "&&" in words else len(words)
                    command, words = words[:end], words[end + 1:]
                    if not command or Path(command[0]).name != "tint":
                        continue
                    args = command[1:]
                    if not any(tuple(args[:len(c)]) == c for c in COMPOSED):
                        continue
                    if any(p in word for word in args for p in PLACEHOLDERS):
                        continue
                    if any(s in word for word in args for s in SKIP):
                        continue
                    found.append((f"{_name(page)}: tint {' '.join(args)}", args))
    return found


def _one_job(args: list[str]) -> list[str]:
    """A `-m` sweep's first job (`--cfg` composes one job, not a sweep): the first value of
    every swept setting."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not {"-m", "--multirun"} & set(args):
        return args
    args = [a for a in args if a not in ("-m", "--multirun")]
    parser = OverridesParser.create()
    out = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            out.append(arg)
            continue
        override = parser.parse_override(arg)
        if override.is_sweep_override():
            arg = f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"
        out.append(arg)
    return out


COMMANDS = _commands()


def test_the_documented_commands_are_found():
    """The parsing above finds what the manual documents (a broken parser passes nothing)."""
    assert len(COMMANDS) >= 25
    assert any("+tasks=vit8" in " ".join(args) for _, args in COMMANDS)
    assert any(args[:1] == ["-m"] or "-m" in args for _, args in COMMANDS)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """`--cfg job` reads no cache: tint_here gets an empty one, not the tiny zoo (~40 s)."""
    cache = tmp_path_factory.mktemp("empty-tint-cache")
    previous = os.environ.get("TINT_CACHE")
    os.environ["TINT_CACHE"] = str(cache)
    yield cache
    assert not any(cache.iterdir()), "composing a config wrote to the cache"
    if previous is None:
        os.environ.pop("TINT_CACHE", None)
    else:
        os.environ["TINT_CACHE"] = previous


@pytest.mark.parametrize("args", [args for _, args in COMMANDS],
                         ids=[where for where, _ in COMMANDS])
def test_the_documented_commands_compose(tint_here, args):
    args = _one_job(args)
    out = tint_here(*args, *([] if "--cfg" in args else ["--cfg", "job"]))
    assert out.returncode == 0, out.stderr[-3000:] or out.stdout[-3000:]
