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


class CommandLineError(click.UsageError):
    """A usage error found after parsing: one "Error: ..." line (no usage block) and exit status 2,
    as click's own flag errors and argparse-based launchers (torchrun) give. Every ringpipe command
    keeps the two apart: 2 when the command line cannot work whatever the files hold (a bad flag
    value, flags that conflict, a layout that does not fit the model, a path of the wrong kind, an
    --out that must not be touched, a flag --resume cannot change); 1 when the work failed (data or
    a checkpoint that is unusable, a worker that died, a file that could not be written)."""

    def show(self, file=None) -> None:
        click.echo(f"Error: {self.format_message()}", file=file, err=True)


def bad_flag(flag: str, message: str) -> CommandLineError:
    """A flag that conflicts with the run or another flag, found after parsing: one "Error: Invalid
    value for FLAG: ..." line, exit status 2."""
    return CommandLineError(f"Invalid value for {flag}: {message}")


def usage_error(message: str) -> CommandLineError:
    """A usage error that names no single flag (a layout, a setting the flags combine into): one
    "Error: ..." line, exit status 2."""
    return CommandLineError(message)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a MemoryError, raised here or on a worker (a RemoteError naming its type;
    NumPy raises its subclass _ArrayMemoryError)."""
    return isinstance(exc, MemoryError) or getattr(exc, "exc_type", "").endswith("MemoryError")
