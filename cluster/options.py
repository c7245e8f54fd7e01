"""Click parameter types shared by every command: finite numbers and output paths checked up front.

Their errors are one `Error: Invalid value for '--flag': ...` line, without click's usage block.
"""
from __future__ import annotations

import math

import click

from ringpipe.runtime.files import FileWriteError, check_writable_directory, check_writable_file


class FlagError(click.BadParameter):
    """A bad flag value, shown as one line (click's BadParameter adds the usage block)."""

    def show(self, file=None) -> None:
        click.echo(f"Error: {self.format_message()}", file=file, err=True)


def _fail(param, ctx, message: str):
    raise FlagError(message, ctx=ctx, param=param)


class FiniteFloat(click.FloatRange):
    """A float flag (optionally within a range) that refuses nan and ±inf."""

    name = "float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            _fail(param, ctx, f"{value!r} is not a finite number.")
        try:
            return super().convert(number, param, ctx)
        except click.BadParameter as exc:
            _fail(param, ctx, exc.message)


class _WritablePath(click.Path):
    """A path the command will write, checked with `check` before the work starts (so a long
    benchmark cannot end by losing its results)."""

    check = staticmethod(check_writable_file)

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        try:
            self.check(path)
        except FileWriteError as exc:
            _fail(param, ctx, str(exc))
        return path


class OutputFile(_WritablePath):
    """A file the command will write: its directory must exist and be writable."""

    def __init__(self):
        super().__init__(dir_okay=False)


class OutputDirectory(_WritablePath):
    """A directory the command will create or write into."""

    check = staticmethod(check_writable_directory)

    def __init__(self):
        super().__init__(file_okay=False)


def bad_flag(flag: str, message: str) -> click.ClickException:
    """A flag that conflicts with the run or another flag, found after parsing: one "Error: Invalid
    value for FLAG: ..." line (ClickException, not BadParameter: no usage block)."""
    return click.ClickException(f"Invalid value for {flag}: {message}")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__
