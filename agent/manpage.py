"""``python -m agent.manpage``: the evcp(1) man page (roff), generated from the CLI's parser.

The package build runs it (debian/rules), so the man page lists exactly the commands and
options ``evcp --help`` shows, with their defaults and the exit statuses.
"""

from __future__ import annotations

import argparse
import sys

from agent import __version__


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, and a leading dot or quote on a line."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines()
    )


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            names = ", ".join(action.option_strings)
            if action.nargs != 0:
                metavar = action.metavar or action.dest.upper()
                names += " " + (metavar if isinstance(metavar, str) else " ".join(metavar))
        else:
            names = str(action.metavar or action.dest)
        text = action.help or ""
        if action.choices is not None and not action.option_strings:
            text += f" ({', '.join(map(str, action.choices))})"
        if "%(default)s" in text:
            text = text.replace("%(default)s", str(action.default))
        out += [".TP", f"\\fB{_roff(names)}\\fR", _roff(text)]
    return out


def _commands(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
    """A section per subcommand (``evcp config get`` under ``evcp config``, and so on)."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None:
        return []
    lines = []
    helps = {c.dest: c.help or "" for c in sub._choices_actions}
    for name, command in sub.choices.items():
        lines += [".SS " + _roff(f"{prefix} {name}"), _roff(helps.get(name, ""))]
        if command.description and command.description != helps.get(name):
            lines += [".PP", _roff(command.description)]
        lines += _options(command)
        lines += _commands(command, f"{prefix} {name}")
    return lines


def render(parser: argparse.ArgumentParser, date: str) -> str:
    lines = [
        f'.TH EVCP 1 "{date}" "evcp {__version__}" "User Commands"',
        ".SH NAME",
        "evcp \\- " + _roff(parser.description or ""),
        ".SH SYNOPSIS",
        "\\fBevcp\\fR [\\fB\\-\\-version\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".SH OPTIONS",
        *_options(parser),
        ".SH COMMANDS",
    ]
    lines += _commands(parser, "evcp")
    if parser.epilog:
        lines += [".SH EXIT STATUS", ".nf", _roff(parser.epilog), ".fi"]
    lines += [".SH FILES", ".TP", "/etc/evcp/evcp.toml", "the configuration (a conffile)",
              ".TP", "/var/lib/evcp", "the agent's state (0750, user evcp)"]  # fmt: skip
    lines += [".SH SEE ALSO", "/usr/share/doc/evcp/README.md, systemctl(1), journalctl(1)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from agent.cli import _parser

    options = argparse.ArgumentParser(prog="python -m agent.manpage")
    options.add_argument("--date", default="", help="the page's date (YYYY-MM-DD)")
    parsed = options.parse_args(argv)
    sys.stdout.write(render(_parser(), parsed.date))
    return 0


if __name__ == "__main__":
    sys.exit(main())
