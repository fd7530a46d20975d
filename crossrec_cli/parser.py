"""The argument parser every crossrec command uses: argparse's, plus "did you mean" on a misspelt option,
subcommand or choice (argparse suggests nothing before Python 3.14)."""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Sequence

__all__ = ["Parser", "suggestion"]


def suggestion(word: str, known: Sequence[str]) -> str:
    """ " (did you mean --epochs?)" for the closest of `known` to `word`, or "" when none is close."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors name the closest valid spelling. Subparsers are built of the same class
    (argparse's default `parser_class`), so the whole `crossrec` tree suggests."""

    _argv: list[str] | None = None

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        import sys

        self._argv = list(sys.argv[1:] if args is None else args)  # for an "unrecognized arguments" error
        return super().parse_known_args(args, namespace)

    def error(self, message: str):  # type: ignore[override]
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            message += suggestion(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
        elif message.startswith("unrecognized arguments: "):
            unknown = next((a for a in message.split(": ", 1)[1].split() if a.startswith("-")), None)
            if unknown:
                message += suggestion(unknown.split("=", 1)[0], self._options_for(self._argv or []))
        super().error(message)

    def _options_for(self, argv: list[str]) -> list[str]:
        """The option strings of this parser and of the subcommands `argv` names (`jobs logs` -> jobs', logs')."""
        parser: argparse.ArgumentParser = self
        options: list[str] = []
        for token in ["", *argv]:
            if token:
                sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
                if sub is None or token not in sub.choices:
                    continue
                parser = sub.choices[token]
            options += [s for a in parser._actions for s in a.option_strings]
        return options
