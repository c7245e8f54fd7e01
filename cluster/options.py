"""Click parameter types shared by every command: finite numbers and output paths checked up front.

Their errors are one `Error: Invalid value for '--flag': ...` line, without click's usage block.
"""
from __future__ import annotations

import math
import re

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
    "Error: ..." line, exit status 2. The model configs' field names in it read as the flags that set
    them (`in_flag_words`)."""
    return CommandLineError(in_flag_words(message))


_CONFIG_FIELD = re.compile(r"\b[A-Z]\w*Config\.(\w+)(?:=(\S+))?|\b(n_\w+|block_size|vocab_size)=(\S+)")


def in_flag_words(message: str) -> str:
    """A model config's error as the user typed it: 'GPTConfig.n_embd=128 is not divisible by n_head=3'
    -> '--n-embd 128 is not divisible by --n-head 3' (the flags are the fields' names with dashes)."""
    def flag(match):
        name, value = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        return "--" + name.replace("_", "-") + (f" {value}" if value else "")
    return _CONFIG_FIELD.sub(flag, message)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a MemoryError, raised here or on a worker (a RemoteError naming its type;
    NumPy raises its subclass _ArrayMemoryError)."""
    return isinstance(exc, MemoryError) or getattr(exc, "exc_type", "").endswith("MemoryError")


# Seeds feed numpy.random.default_rng, which takes non-negative integers only.
SEED = click.IntRange(min=0)


class CommaList(click.ParamType):
    """A comma-separated list, each item converted (and checked) by `item` (a click type): '4,8' ->
    [4, 8]. An empty list or a bad item is one line naming the flag, the item and the whole value."""

    name = "list"

    def __init__(self, item: click.ParamType):
        self.item = item

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        parts = [part.strip() for part in str(value).split(",")]
        if not any(parts):
            _fail(param, ctx, f"{value!r} is empty; give a comma-separated list.")
        items = []
        for part in parts:
            if not part:
                _fail(param, ctx, f"{value!r} has an empty item.")
            try:
                if isinstance(self.item, click.IntRange):  # "not a valid integer", not "... integer range"
                    part = click.INT.convert(part, param, ctx)
                items.append(self.item.convert(part, param, ctx))
            except click.BadParameter as exc:
                _fail(param, ctx, exc.message if len(parts) == 1 else f"{part!r} in {value!r}: {exc.message}")
        return items


class ByteSizes(click.ParamType):
    """Byte sizes: a range '1K-64M' (every 4th power of two) or a list '1K,1M'; each at least 1 byte."""

    name = "sizes"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        from ringpipe.tools.bench_collectives import parse_sizes

        try:
            sizes = parse_sizes(value)
        except ValueError as exc:
            _fail(param, ctx, f"{value!r} is not a range of byte sizes like 1K-64M or a list like 1K,1M "
                              f"({one_line(exc)}).")
        if not sizes or min(sizes) < 1:
            _fail(param, ctx, f"{value!r}: sizes must be at least 1 byte (e.g. 1K-64M or 1K,1M).")
        return sizes


def check_device(device: str) -> None:
    """--device gpu where CuPy is not installed: a usage error before any data is read. (Whether a GPU
    is there is found when the model is built: asking CUDA here would initialise it in the driver.)"""
    import importlib.util

    if device == "gpu" and importlib.util.find_spec("cupy") is None:
        raise bad_flag("--device", "gpu needs CuPy, which is not installed: pip install 'ringpipe[gpu]' (CUDA 13; "
                                   "'ringpipe[gpu-cuda12]' for a CUDA 12 driver), or use --device cpu")
