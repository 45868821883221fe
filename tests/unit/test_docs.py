"""The documentation: built strictly by Sphinx, its references generated from the code and current, every
link alive, every `closedloop …` it shows a command and options that exist, every command with help and an
example that parses."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from closedloop.cli.commands import EXAMPLES, commands, parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))
import generate  # noqa: E402  (docs/generate.py)

HAND_WRITTEN = [ROOT / "README.md", *sorted(p for p in DOCS.glob("*.md"))]


def sphinx(source: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sphinx", "-W", "-n", "--keep-going", "-q", "-b", "html",
                           str(source), str(out)], capture_output=True, text=True, timeout=300)


def test_the_generated_references_are_what_the_code_gives():
    for name, make in generate.PAGES.items():
        assert (DOCS / "reference" / name).read_text() == make(), f"docs/reference/{name} is stale: run `make docs`"


def test_the_docs_build_strictly_and_a_dead_link_fails_the_build(tmp_path):
    built = sphinx(DOCS, tmp_path / "html")
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "html" / "reference" / "cli.html").exists()
    # the same docs with a dead page link and a dead anchor: the build fails naming both
    broken = tmp_path / "broken"
    shutil.copytree(DOCS, broken, ignore=shutil.ignore_patterns("_build"))
    with (broken / "lineage.md").open("a") as f:
        f.write("\nSee [the old page](retired.md) and [a gone heading](reference/steps.md#no-such-heading).\n")
    failed = sphinx(broken, tmp_path / "broken_html")
    assert failed.returncode != 0
    assert "retired.md" in failed.stderr and "no-such-heading" in failed.stderr


def test_the_readme_onboards_in_two_screens_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert len(links) >= 10
    for link in links:
        if not link.startswith(("http://", "https://")):
            assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def _mentions(text: str) -> list[str]:
    """Every `closedloop …` the text shows: in code spans and in shell blocks (continuations joined)."""
    found = [m for m in re.findall(r"`([^`\n]*\bclosedloop [^`\n]*)`", text)]
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if re.search(r"(^|[/\s])closedloop ", line.split("#")[0]):
                found.append(line.split("  #")[0])
    return found


def _words(mention: str) -> list[str]:
    """The words after `closedloop`, placeholders kept: `[--json]` → `--json`, `a|b` stays."""
    after = re.split(r"(?:^|[/\s])closedloop ", mention, maxsplit=1)[1]
    try:
        words = shlex.split(after.replace("…", "X"))
    except ValueError:
        words = after.split()
    return [w.strip("[]") for w in words]


def _check(words: list[str]) -> list[str]:
    """Problems with a documented command line: an unknown command or an option the command lacks."""
    p, path, problems = parser(), [], []
    table = {w: sp for w, sp, _ in commands(p)}
    while words and any(tuple([*path, alt]) in table for alt in words[0].split("|")):
        alts = [a for a in words[0].split("|") if tuple([*path, a]) in table]
        if len(alts) != len(words[0].split("|")):
            problems.append(f"no command `closedloop {' '.join(path)} {words[0]}`")
        path.append(alts[0])
        words = words[1:]
    if not path and words and re.fullmatch(r"[A-Z_]+", words[0]):  # a placeholder (`closedloop COMMAND --help`)
        return []
    if not path and words and not words[0].startswith("-"):
        return [f"no command `closedloop {words[0]}`"]
    targets = [table[tuple(path[:-1] + [a])] for a in ([path[-1]] if path else [])] or [p]
    for w in words:
        if w.startswith("--"):
            option = w.split("=")[0]
            for sp in targets:
                if option not in sp._option_string_actions:
                    problems.append(f"`closedloop {' '.join(path)}` has no option {option}")
    return problems


def test_every_closedloop_command_the_docs_show_exists_with_its_options():
    mentions = [(path, m) for path in HAND_WRITTEN for m in _mentions(path.read_text())]
    assert len(mentions) > 40
    problems = [f"{path.relative_to(ROOT)}: {m!r}: {p}" for path, m in mentions for p in _check(_words(m))]
    assert not problems, "\n".join(problems)


def test_the_check_finds_a_renamed_option_and_a_removed_command():
    assert _check(_words("closedloop trace REF --jsn")) == ["`closedloop trace` has no option --jsn"]
    assert _check(_words("closedloop recall open --source X --reason R")) == []
    assert _check(_words("closedloop recall list|nosuch")) == ["no command `closedloop recall list|nosuch`"]
    assert _check(_words("closedloop retrace X")) == ["no command `closedloop retrace`"]


def test_every_command_has_help_for_itself_and_each_argument_and_an_example_that_parses(capsys):
    p = parser()
    leaves = [(w, sp) for w, sp, has_sub in commands(p) if not has_sub]
    assert {" ".join(w) for w, _ in leaves} == set(EXAMPLES), "EXAMPLES must name every command exactly once"
    for words, sp in leaves:
        for action in sp._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                assert action.help, f"closedloop {' '.join(words)}: {action.dest} has no help"
        with pytest.raises(SystemExit) as done:
            parser().parse_args([*words, "--help"])
        assert done.value.code == 0
        shown = capsys.readouterr().out
        assert shown.startswith(f"usage: closedloop {' '.join(words)}") and f"example: {EXAMPLES[' '.join(words)]}" in shown
        example = shlex.split(EXAMPLES[" ".join(words)].replace('eval "$(closedloop env)"', "closedloop env"))
        assert example[0] == "closedloop"
        args = parser().parse_args(example[1:])  # exits 2 on an argument the command does not take
        assert args.func is not None


def test_every_template_field_is_described_in_the_reference():
    fields = generate.template_fields()
    assert len(fields) > 100
    bare = [path for path, field, nested in fields if not (field.description or (nested and generate._doc(nested)))]
    assert not bare, f"template fields without a description: {bare}"
    page = (DOCS / "reference" / "template.md").read_text()
    assert all(f"| `{path}` |" in page for path, _, _ in fields)


def test_the_crash_point_table_is_the_matrix_the_tests_strike():
    from closedloop.runtime.faults import matrix

    text = (DOCS / "reference" / "steps.md").read_text().split("## The crash-point matrix", 1)[1]
    rows = [line.split("`") for line in text.splitlines() if line.startswith("| `")]
    assert [(r[1], r[3]) for r in rows] == [(step, point) for step, points in matrix().items() for point, _ in points]


ACTIONS_WITHOUT_OUTPUT = {"demo", "serve", "prodlike", "env", "settings apply", "request", "approve", "reject",
                          "hil report", "promote", "rollback", "incident report", "kpi report", "dossier verify"}
"""Commands that act (or print shell lines) and read nothing back: every other command reads, and takes --json."""


def test_every_read_command_takes_json():
    lacking = [" ".join(w) for w, sp, has_sub in commands(parser()) if not has_sub
               and " ".join(w) not in ACTIONS_WITHOUT_OUTPUT and "--json" not in sp._option_string_actions]
    assert not lacking, f"read commands without --json: {lacking}"
