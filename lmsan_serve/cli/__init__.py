"""`lmsan`: the command line. Every subcommand has --help; bad input gives one line and exit 2.

One module per command family, each adding its subparsers (`register`). Commands from other
installed packages (the lab's `attack`, `eval`, `demo`) come through the `lmsan_serve.commands`
entry point group: each entry names a `register(sub)` function, so this package imports none of
them by name.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..errors import LmsanError
from . import mine, prompts, serve, signatures
from .common import EXIT_USAGE, quiet_libraries

__all__ = ["EXIT_USAGE", "build_parser", "main", "subcommands"]

PLUGIN_GROUP = "lmsan_serve.commands"


def _plugins() -> list[Callable[[argparse._SubParsersAction], None]]:
    """The `register` functions of installed command plugins, by entry-point name. A plugin that
    fails to import is reported on stderr and skipped: the product's commands still work."""
    from importlib.metadata import entry_points

    found = []
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            found.append(ep.load())
        except Exception as exc:  # noqa: BLE001  (any import failure of a plugin)
            print(f"lmsan: commands from {ep.value} not available: {exc}", file=sys.stderr)
    return found


def _parser_and_commands() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The `lmsan` parser and its subcommands action (whose `choices` map names to parsers)."""
    parser = argparse.ArgumentParser(
        prog="lmsan",
        description="Guard prompt-tuned language models against task-agnostic backdoors "
        "(LMSanitator, arXiv 2308.13904).",
    )
    parser.add_argument("--version", action="version", version=f"lmsan {__import__('lmsan_serve').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for family in (prompts, mine, signatures, serve):
        family.register(sub)
    for register in _plugins():
        register(sub)
    return parser, sub


def build_parser() -> argparse.ArgumentParser:
    return _parser_and_commands()[0]


def subcommands() -> list[str]:
    """The `lmsan` subcommand names, in the order `lmsan --help` lists them: what deployment files
    and scripts that run `lmsan X` can be checked against."""
    return list(_parser_and_commands()[1].choices or ())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        quiet_libraries()
        return func(args)
    except LmsanError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # always one line
        print(f"lmsan {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"lmsan {args.command}: interrupted", file=sys.stderr)
        return 130
