"""The README stays a short guide whose commands run as written, and docs/ stays navigable.

- README.md is at most 15,000 bytes;
- every relative link in README.md and docs/ points at a file or folder that exists;
- every `recsys ...` command in the README's code blocks parses: its subcommand exists, its
  flags and arguments are accepted by the real CLI (click parses them without running the
  command), each flag appears in that subcommand's `--help`, and a `--recipe` file exists;
- the README keeps the exact install + demo and test commands, and `.ci/run` runs that test
  command;
- docs/README.md links every file under docs/.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from recsys_cli.main import app

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
INSTALL = (
    "python3.11 -m venv .venv && . .venv/bin/activate && bash requirements/install.sh"
    " && recsys demo"
)
TEST_COMMAND = "python -m pytest -q"

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _code_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def _commands(block: str) -> list[str]:
    """Shell commands of a code block: continuations joined, comments and chains split."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        commands.extend(part.strip() for part in re.split(r"&&|\|\||;|\|", line))
    return [c for c in commands if c]


def _recsys_commands() -> list[str]:
    text = README.read_text()
    found = [
        c for block in _code_blocks(text) for c in _commands(block) if c.split()[0] == "recsys"
    ]
    assert found, "the README shows no recsys command"
    return found


def test_readme_is_at_most_15_kb() -> None:
    size = len(README.read_bytes())
    assert size <= 15_000, f"README.md is {size:,} bytes; move detail into docs/"


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s), mailto, in-page anchors
        file_part = target.split("#", 1)[0]
        if not (path.parent / file_part).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"


def test_readme_keeps_the_two_commands_and_ci_runs_the_test_command() -> None:
    blocks = "\n".join(_code_blocks(README.read_text()))
    assert INSTALL in blocks
    assert TEST_COMMAND in blocks
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert TEST_COMMAND in [line.strip() for line in ci], ".ci/run must run the README's tests"


def _resolve(argv: list[str]) -> tuple[Any, list[str], list[str]]:
    """The (click) command an argv names, the words naming it, and the rest of the argv."""
    command: Any = typer.main.get_command(app)  # typer vendors click: no isinstance checks
    path: list[str] = []
    rest = list(argv)
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        sub = command.commands.get(rest[0])
        assert sub is not None, f"no subcommand {' '.join([*path, rest[0]])!r}"
        command, path = sub, [*path, rest.pop(0)]
    return command, path, rest


@pytest.mark.parametrize("line", _recsys_commands())
def test_recsys_command_parses(line: str) -> None:
    argv = shlex.split(line)[1:]
    command, path, rest = _resolve(argv)
    assert path, f"{line!r}: names no subcommand"
    # The real CLI parses the arguments (flags, values, types) without running anything.
    command.make_context(" ".join(["recsys", *path]), list(rest))

    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for flag in (word.split("=", 1)[0] for word in rest if word.startswith("--")):
        assert flag in result.output, f"{line!r}: {flag} not in `recsys {' '.join(path)} --help`"

    if "--recipe" in rest:
        recipe = rest[rest.index("--recipe") + 1]
        assert (ROOT / recipe).is_file(), f"{line!r}: recipe {recipe} does not exist"


def test_docs_index_lists_every_page() -> None:
    index = DOCS / "README.md"
    linked = {
        (DOCS / target.split("#", 1)[0]).resolve() for target in LINK.findall(index.read_text())
    }
    files = [p for p in DOCS.rglob("*") if p.is_file() and p != index]
    missing = [str(p.relative_to(DOCS)) for p in files if p.resolve() not in linked]
    assert not missing, f"docs/README.md does not link {missing}"
