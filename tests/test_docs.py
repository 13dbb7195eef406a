"""The README and the docs site say only what is true of this checkout (issue 24).

The README is the front page: short, the quick start near the top, the generated headline block intact, no
pasted output. Every `invgan` command the README or a docs page shows exists with the options it uses; every
`make` target exists; every repository path named exists; the site's nav holds every page. (`make lint` builds
the site with `mkdocs build --strict`, which checks the links between pages.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main
import yaml

from invgan.cli import app
from jobs.paper_report import HEADLINE_END, HEADLINE_START

PROJECT = Path(__file__).resolve().parent.parent
README = PROJECT / "README.md"
DOCS = PROJECT / "docs"
GENERATED = {DOCS / "results.md"}  # written by `invgan report`: not checked here
HAND_WRITTEN = [README, *sorted(p for p in DOCS.glob("*.md") if p not in GENERATED)]
TOP_DIRS = ("invgan", "invgan_core", "jobs", "tuning", "cluster", "configs", "benchmarks", "weights", "tests", "docs")
NOT_COMMITTED = {"benchmarks/results.json"}  # outputs the docs name, written by a run


def _outside_headline(text: str) -> str:
    start, end = text.find(HEADLINE_START), text.find(HEADLINE_END)
    return text[:start] + text[end + len(HEADLINE_END) :] if 0 <= start < end else text


def _text(path: Path) -> str:
    return _outside_headline(path.read_text()) if path == README else path.read_text()


def _code(text: str) -> list[str]:
    """Lines of fenced code blocks and inline code spans."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            lines.append(line)
    spans = re.findall(r"`([^`]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
    return lines + [" ".join(span.split()) for span in spans]


# ---------------------------------------------------------------- the front page


def test_the_readme_is_a_front_page_with_the_quick_start_first():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move reference material to docs/"
    quick = next(i for i, line in enumerate(lines) if line.startswith("## Quick start"))
    assert quick < 30, f"the quick start begins on line {quick + 1}, after the first 30"
    section = "\n".join(lines[quick : quick + 20])
    assert "make eval" in section and "make test" in section and "CI" in section


def test_the_generated_headline_block_is_there_once_and_the_rest_pastes_no_output():
    text = README.read_text()
    assert text.count(HEADLINE_START) == 1 and text.count(HEADLINE_END) == 1
    assert text.index(HEADLINE_START) < text.index(HEADLINE_END)
    rows = [line for line in _outside_headline(text).splitlines() if line.lstrip().startswith("|")]
    assert not rows, f"tables outside the generated headline block (link docs/results.md instead): {rows[:3]}"


# ---------------------------------------------------------------- what the pages show exists


def _invgan_commands(path: Path) -> list[list[str]]:
    """The argument lists of every `invgan ...` command in a page's code (env assignments and comments dropped)."""
    out = []
    for line in _code(_text(path)):
        line = line.split("  #")[0].strip()
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words = words[1:]
        if words[:1] == ["invgan"] and "|" not in words:
            out.append(words[1:])
    return out


def _check_command(root, args: list[str], where: str) -> None:
    """`args` name a command of the `invgan` tree (groups by their `commands`) and only options it has."""
    command, path = root, ["invgan"]
    while hasattr(command, "commands") and args and not args[0].startswith("-"):
        assert args[0] in command.commands, f"{where}: `{' '.join(path)} {args[0]}` is not a command"
        command, path, args = command.commands[args[0]], path + [args[0]], args[1:]
    options = {name for p in command.params for name in p.opts + p.secondary_opts} | {"--help"}
    for i, word in enumerate(args):
        if word == "--":  # invgan submit -- <an invgan command>
            _check_command(root, args[i + 1 :], where)
            return
        if word.startswith("-") and word != "-" and "..." not in word:
            option = word.split("=")[0]
            assert option in options, f"{where}: `{' '.join(path)}` has no option {option}"


@pytest.mark.parametrize("page", HAND_WRITTEN, ids=lambda p: p.name)
def test_every_invgan_command_shown_exists_with_its_options(page):
    root = typer.main.get_command(app)
    commands = _invgan_commands(page)
    for args in commands:
        _check_command(root, args, page.name)


def test_the_pages_show_commands_at_all():
    assert sum(len(_invgan_commands(p)) for p in HAND_WRITTEN) > 30  # the parser above finds them


@pytest.mark.parametrize("page", HAND_WRITTEN, ids=lambda p: p.name)
def test_every_make_target_and_repository_path_named_exists(page):
    makefile = (PROJECT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    code = "\n".join(_code(_text(page)))
    for target in re.findall(r"(?<![\w-])make ([a-z][\w-]*)", code):
        assert target in targets, f"{page.name}: `make {target}` is not a Makefile target"
    text = _text(page)
    pattern = rf"(?<![\w./-])((?:{'|'.join(TOP_DIRS)})/[\w./-]*\w)"
    for found in re.findall(pattern, text):
        assert found in NOT_COMMITTED or (PROJECT / found).exists(), f"{page.name} names {found}, which does not exist"


@pytest.mark.parametrize("page", HAND_WRITTEN, ids=lambda p: p.name)
def test_no_page_uses_the_old_module_names(page):
    text = _text(page)
    for old in ("jobs.runner", "jobs/runner", "jobs.report", "jobs/report.", "jobs.results", "jobs/results"):
        assert old not in text, f"{page.name} still names {old} (see the architecture page for the new names)"


def test_the_site_nav_holds_every_page_and_results():
    config = yaml.safe_load((PROJECT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs"

    def pages(nav) -> list[str]:
        out = []
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            out += pages(value) if isinstance(value, list) else [value]
        return out

    listed = pages(config["nav"])
    assert sorted(listed) == sorted(p.name for p in DOCS.glob("*.md"))
    assert "results.md" in listed
