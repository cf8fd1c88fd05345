"""The command table and flag table (docs/usage.md, "Commands") against the real parser
(mvtec_ray.cli.build_parser). The tables were the README's; the file keeps its name."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from mvtec_ray.cli import build_parser

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
#: the page that holds the command and flag tables
USAGE = ROOT / "docs" / "usage.md"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _flags(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in sub._actions for s in a.option_strings if s not in ("-h", "--help")}


def _positionals(sub: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in sub._actions if not a.option_strings]


def _tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of ``text`` as rows of cells (separator rows dropped)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set(":-") for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def parse_readme(text: str) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """(command -> the words of its usage cell, flag -> the commands the flag table lists)."""
    tables = _tables(_section(text, "Commands"))
    commands_table = next((t for t in tables if t[0][:2] == ["command", "what it does"]), None)
    flags_table = next((t for t in tables if t[0][:2] == ["flag", "commands"]), None)
    assert commands_table and flags_table, "docs/usage.md's Commands section needs a command table and a flag table"
    commands = {}
    for row in commands_table[1:]:
        usage = row[0].strip("`").split()
        assert usage[0] == "mvtec-ray", row
        commands[usage[1]] = usage[2:]
    flags = {}
    for row in flags_table[1:]:
        flag = row[0].strip("`").split()[0]
        flags[flag] = {c.strip() for c in row[1].split(",") if c.strip()}
    return commands, flags


def check_readme(text: str, parser: argparse.ArgumentParser) -> list[str]:
    """Every difference between the usage page's tables and the parser, one line each."""
    problems = []
    subs = _subparsers(parser)
    commands, flags = parse_readme(text)
    if set(commands) != set(subs):
        problems.append(f"command table lists {sorted(commands)}, the parser has {sorted(subs)}")
    for name, usage in commands.items():
        if name not in subs:
            continue
        known = _flags(subs[name])
        for word in usage:
            if word.startswith("-") and word not in known:
                problems.append(f"command table: {name} has no flag {word}")
        required = [s for s, a in known.items() if a.required]
        for flag in required:
            if flag not in usage:
                problems.append(f"command table: {name} requires {flag}, the row does not show it")
        positional = [w for w in usage if not w.startswith("-")]
        flag_values = sum(1 for w in usage if w.startswith("-") and known.get(w) is not None
                          and known[w].nargs != 0)
        if len(positional) - flag_values != len(_positionals(subs[name])):
            problems.append(f"command table: {name} shows {len(positional) - flag_values} positional arguments, "
                            f"the parser has {len(_positionals(subs[name]))}")
    actual: dict[str, set[str]] = {}
    for name, sub in subs.items():
        for flag in _flags(sub):
            actual.setdefault(flag, set()).add(name)
    for flag in sorted(set(flags) | set(actual)):
        if flags.get(flag) != actual.get(flag):
            problems.append(f"flag table: {flag} is listed for {sorted(flags.get(flag, []))}, "
                            f"the parser has it on {sorted(actual.get(flag, []))}")
    return problems


def test_usage_tables_match_the_parser():
    problems = check_readme(USAGE.read_text(encoding="utf-8"), build_parser())
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.replace("| `--backbone NAME` | run, extract |", "| `--backbone NAME` | run, extract, fit, score |"),
     "--backbone is listed for ['extract', 'fit', 'run', 'score']"),
    (lambda t: re.sub(r"\| `--rescore` \|.*\n", "", t), "--rescore is listed for []"),
    (lambda t: t.replace("`mvtec-ray report OUT`", "`mvtec-ray report OUT --weights W`"),
     "report has no flag --weights"),
    (lambda t: t.replace("`mvtec-ray fit --features FEATURES --out OUT`", "`mvtec-ray fit --out OUT`"),
     "fit requires --features"),
    (lambda t: re.sub(r"\| `mvtec-ray extract .*\n", "", t), "command table lists"),
], ids=["flag_on_wrong_commands", "flag_missing", "unknown_flag_in_usage", "required_flag_missing",
        "command_missing"])
def test_the_check_catches_drift(edit, expected):
    text = USAGE.read_text(encoding="utf-8")
    edited = edit(text)
    assert edited != text
    problems = check_readme(edited, build_parser())
    assert any(expected in p for p in problems), problems


def test_the_check_catches_a_parser_change():
    parser = build_parser()
    _subparsers(parser)["report"].add_argument("--backbone")
    problems = check_readme(USAGE.read_text(encoding="utf-8"), parser)
    assert any("--backbone is listed for ['extract', 'run']" in p for p in problems), problems
