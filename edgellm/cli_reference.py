"""docs/cli.md, written from the argument parser itself so that the reference cannot drift from the code:

    python -m edgellm.cli_reference > docs/cli.md

tests/test_architecture.py checks that the file is what this writes."""

from __future__ import annotations

import argparse

from .cli import build_parser

WIDTH = 116
HEADER = """# Command-line reference

Every command and flag of `edgellm`, written from its argument parser (`python -m edgellm.cli_reference >
docs/cli.md`; a test keeps the two equal). The README explains what the commands are for; docs/convert.md explains
the conversion flags at length.
"""


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest.upper()}`"
    names = ", ".join(f"`{name}`" for name in action.option_strings)
    if action.nargs == 0:
        return names
    if action.choices is not None and action.metavar is None:
        return names + " `" + "\\|".join(str(c) for c in action.choices) + "`"
    metavar = str(action.metavar or action.dest.upper()).replace("|", "\\|")
    return names + f" `{metavar}`" + (" ..." if action.nargs in ("+", "*") or isinstance(
        action, argparse._AppendAction) else "")


def _meaning(action: argparse.Action) -> str:
    text = (action.help or "").replace("|", "\\|").replace("\n", " ")
    shown_default = action.default not in (None, False, [], argparse.SUPPRESS) and action.nargs != 0
    if shown_default and "default" not in text:
        text += f"{'; ' if text else ''}default {action.default}"
    return text


def _command(name: str, parser: argparse.ArgumentParser, summary: str) -> list[str]:
    lines = [f"## `edgellm {name}`", "", summary[:1].upper() + summary[1:] + ".", "", "```text",
             parser.format_usage().strip().replace("usage: ", ""), "```", "", "| argument | meaning |", "|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        lines.append(f"| {_flags(action)} | {_meaning(action)} |")
    return lines + [""]


def _fixed_width(parser: argparse.ArgumentParser) -> None:
    """Usage lines wrapped at one width, whatever the terminal says (argparse reads $COLUMNS)."""
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=WIDTH)


def reference() -> str:
    parser = build_parser()
    _fixed_width(parser)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {choice.dest: choice.help or "" for choice in subparsers._choices_actions}
    lines = [HEADER, "```text", parser.format_usage().strip().replace("usage: ", ""), "```", "",
             "| command | what it does |", "|---|---|"]
    lines += [f"| [`{name}`](#edgellm-{name}) | {summaries.get(name, '')} |" for name in subparsers.choices]
    lines.append("")
    for name, command in subparsers.choices.items():
        _fixed_width(command)
        lines += _command(name, command, summaries.get(name, ""))
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(reference(), end="")
