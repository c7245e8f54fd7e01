"""The command line of the `python -m ringpipe.tools.<script>` entry points: argparse whose every bad
value is one line `Error: --flag: why, naming the value` and exit status 2, as `ringpipe bench`
gives, never a traceback or a usage block. Values are checked while parsing (the types below), so
a benchmark never starts on a value it would fail on minutes later.
"""
from __future__ import annotations

import argparse


class ScriptParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"Error: {message.removeprefix('argument ')}\n")


def at_least(low: int):
    """An int flag's type: `low` or more."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value

    parse.__name__ = f"at least {low}"
    return parse


def checked(check):
    """A flag's type from `check(text)`, which returns the value or raises (ValueError, OSError, a
    check's own error type) with a message that says why."""
    def parse(text: str):
        try:
            return check(text)
        except Exception as exc:  # noqa: BLE001 - any check's error is the value's
            message = str(exc)
            raise argparse.ArgumentTypeError(message if text in message else f"{text!r}: {message}") from None

    parse.__name__ = getattr(check, "__name__", "value")
    return parse


def comma_list(choices):
    """A flag's type: a comma list of some of `choices` (a list)."""
    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return items

    return parse


def size_list(text: str) -> str:
    """A flag's type: sizes as bench_collectives.parse_sizes reads them ("1K,64K" or "1K-64M"), at
    least one, none zero; the text itself."""
    from ringpipe.tools.bench_collectives import parse_sizes

    def check(value):
        sizes = parse_sizes(value)
        if not sizes or min(sizes) < 1:
            raise ValueError("give one or more sizes of at least 1 byte")
        return value

    return checked(check)(text)


def writable_file(path: str) -> str:
    """A flag's type: a file that can be written (checked before the run, whose results it keeps)."""
    from ringpipe.runtime.files import check_writable_file

    return checked(lambda text: check_writable_file(text) or text)(path)


__all__ = ["ScriptParser", "at_least", "checked", "comma_list", "size_list", "writable_file"]
