"""The README and the docs/ pages stay true: their Python blocks run (or say why not), their command lines use flags
the commands and scripts really have, and their links point at files and headings that exist."""

from __future__ import annotations

import argparse
import importlib.util
import re
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
MARKDOWN = [README, *PAGES]
CLI_MODULES = ("nar_diffusers.commands.cli", "nar_diffusers.cli")
SCRIPT_FOLDERS = ("training", "conversion", "benchmarks", "docs")  # the repository's script entry points

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
MARKER = re.compile(r"<!-- (runnable|not-run: [^>]*\S) -->\n$")


def fenced_blocks(path: Path) -> list[tuple[str, str, str | None]]:
    """(language, code, marker) of every fenced block; the marker is the HTML comment on the line just above."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        marker = MARKER.search(text[: match.start()][-300:])
        blocks.append((match.group(1), match.group(2), marker.group(1) if marker else None))
    return blocks


def python_blocks(path: Path, marker: str) -> list[str]:
    return [code for lang, code, mark in fenced_blocks(path) if lang == "python" and (mark or "").startswith(marker)]


def run_readme_usage(folder: Path) -> None:
    """The README's usage block, which saves `tiny-nar` and `tiny-nar-sample.png` for the pages' examples."""
    for block in python_blocks(README, "runnable"):
        exec(compile(block, str(README), "exec"), {})


@pytest.fixture(scope="module")
def readme_outputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        run_readme_usage(folder)
    return folder


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.name)
def test_every_python_block_runs_or_says_why_not(path):
    """Each python block is marked `<!-- runnable -->` (executed below) or `<!-- not-run: reason -->`, and at
    least compiles."""
    for lang, code, marker in fenced_blocks(path):
        if lang != "python":
            continue
        assert marker, f"{path.name}: a python block without <!-- runnable --> or <!-- not-run: reason -->:\n{code}"
        compile(code, str(path), "exec")


@pytest.mark.parametrize("path", [p for p in PAGES if python_blocks(p, "runnable")], ids=lambda p: p.name)
def test_page_python_blocks_run_as_written(path, readme_outputs, tmp_path, monkeypatch):
    """A page's runnable blocks run in order, in a folder holding what the README's usage block wrote."""
    work = tmp_path / "work"
    shutil.copytree(readme_outputs, work)
    monkeypatch.chdir(work)
    for block in python_blocks(path, "runnable"):
        exec(compile(block, str(path), "exec"), {})


# ---------------------------------------------------------------------------------------------------------------
# Command lines


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser, args: list[str]) -> None:
        self.parser, self.args = parser, args


def _capture(parser, args=None, namespace=None):
    raise _Captured(parser, list(sys.argv[1:] if args is None else args))


def cli_parser() -> argparse.ArgumentParser:
    """The `nar-diffusers` parser."""
    from nar_diffusers.commands.cli import build_parser

    return build_parser()


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def script_parser(script: Path, argv: list[str], monkeypatch) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser a repository script reaches with `argv`, caught when it is about to parse (nothing runs), and the
    arguments it gets: a script that forwards to a `nar-diffusers` sub-command gives that sub-command's parser."""
    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", [str(script), *argv])
        patch.setattr(argparse.ArgumentParser, "parse_args", _capture)
        patch.setattr(argparse.ArgumentParser, "parse_known_args", _capture)
        try:
            runpy.run_path(str(script), run_name="__main__")
        except _Captured as captured:
            parser, args = captured.parser, captured.args
        else:
            raise AssertionError(f"{script} parsed no arguments")
    sub = subcommand_parsers(parser)
    if sub and args and args[0] in sub:
        return sub[args[0]], args[1:]
    return parser, args


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell snippet: continuations joined, comments dropped, split at && ; | ||."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        current: list[str] = []
        for token in [*tokens, "&&"]:
            if token in ("&&", "||", ";", "|"):
                while current and (current[0] == "time" or re.fullmatch(r"\w+=\S*", current[0])):
                    current = current[1:]
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
    return commands


def inline_commands(path: Path) -> list[list[str]]:
    """Command lines quoted inline (`nar-diffusers ...`, `python training/...`) in a page's prose and tables."""
    prose = FENCE.sub("", path.read_text())
    spans = re.findall(r"(?<!`)`([^`]+)`(?!`)", prose)
    starts = ("nar-diffusers ", "accelerate launch ", *(f"python {folder}/" for folder in SCRIPT_FOLDERS))
    return [cmd for span in spans if span.startswith(starts) for cmd in shell_commands(span.replace("\n", " "))]


def resolve(command: list[str]) -> tuple[str, argparse.ArgumentParser | None, list[str]] | None:
    """(what, parser, arguments) of a command line this repository provides, or None for other tools."""
    head, rest = command[0], command[1:]
    if head == "nar-diffusers":
        return ("nar-diffusers", None, rest)
    if head in ("accelerate", "torchrun") or head.startswith("python"):
        if head == "accelerate":
            if not rest or rest[0] != "launch":
                return None
            rest = rest[1:]
        for i, token in enumerate(rest):
            if token == "-m":
                module = rest[i + 1]
                if module.startswith("nar_diffusers"):
                    assert importlib.util.find_spec(module), f"`-m {module}`: no such module"
                return ("nar-diffusers", None, rest[i + 2 :]) if module in CLI_MODULES else None
            if token.endswith(".py"):
                return ("script", REPO / token, rest[i + 1 :])
            if head.startswith("python") and not token.startswith("-"):
                return None
    return None


def check_command(command: list[str], where: str, monkeypatch, full_parse: bool) -> None:
    resolved = resolve(command)
    if resolved is None:
        return
    kind, target, argv = resolved
    if kind == "script":
        script = target
        if not script.is_relative_to(REPO) or script.parts[len(REPO.parts)] not in SCRIPT_FOLDERS:
            return  # another project's script (e.g. guided-diffusion's evaluator)
        assert script.exists(), f"{where}: {' '.join(command)}: no script {script.relative_to(REPO)}"
        parser, argv = script_parser(script, argv, monkeypatch)
    else:
        if not argv or argv[0].startswith(("<", "-")):
            return
        parsers = subcommand_parsers(cli_parser())
        assert argv[0] in parsers, f"{where}: `nar-diffusers {argv[0]}` is not a command ({sorted(parsers)})"
        parser = parsers[argv[0]]
        if full_parse and "..." not in argv:
            try:
                cli_parser().parse_args(argv)
            except SystemExit as error:
                raise AssertionError(f"{where}: `{' '.join(command)}` does not parse") from error
        argv = argv[1:]
    flags = [token.split("=")[0] for token in argv if token.startswith("--") and token != "--"]
    unknown = [flag for flag in flags if flag not in parser._option_string_actions]
    assert not unknown, f"{where}: `{' '.join(command)}`: unknown flags {unknown}"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.name)
def test_command_lines_use_real_commands_and_flags(path, monkeypatch):
    """Every `nar-diffusers ...`, `python training/...`, `accelerate launch ...` line names a real command or
    script, and only flags its parser declares; `nar-diffusers` lines without `...` parse completely."""
    for lang, code, _ in fenced_blocks(path):
        if lang in ("bash", "sh", "shell", ""):
            for command in shell_commands(code):
                check_command(command, path.name, monkeypatch, full_parse=True)
    for command in inline_commands(path):
        check_command(command, f"{path.name} (inline)", monkeypatch, full_parse=False)


# ---------------------------------------------------------------------------------------------------------------
# Links


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", path.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.name)
def test_links_point_at_files_and_headings_that_exist(path):
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", path.read_text())):
        if re.match(r"\w+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name}: link to a missing file: {target}"
        if anchor:
            assert anchor in heading_anchors(linked), f"{path.name}: no heading #{anchor} in {linked.name}"


def test_every_page_is_linked_from_the_readme():
    text = README.read_text()
    missing = [page.name for page in PAGES if f"(docs/{page.name}" not in text]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_editing_example_script_imports():
    """docs/editing_example.py (which draws docs/images/editing_digits.png) still finds what it imports."""
    script = REPO / "docs" / "editing_example.py"
    spec = importlib.util.spec_from_file_location("doc_editing_example", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main)
