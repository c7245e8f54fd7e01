"""`ringpipe` command-line entry point: a click group; each subcommand lives in its own module.

The subcommand modules define plain click commands and never import this module, so imports go one
way: cli.py -> train_cmd.py, generate_cmd.py, trace_cmd.py, bench_commands.py -> model/, tools/.
"""
from __future__ import annotations

import contextlib
import importlib

import click

from ringpipe.cluster.options import CommandLineError, one_line, out_of_memory
from ringpipe.runtime.files import FileWriteError
from ringpipe.runtime.version import __version__


class Commands(click.Group):
    """The `ringpipe` group. Ctrl-C ends any command with exit status 130 (128 + SIGINT), as shells
    and PyTorch's launchers report it, and a line of its own instead of click's "Aborted!"; commands
    with more to say (`train`: can it resume?) catch KeyboardInterrupt themselves. A file that
    cannot be written, here or on a worker, is one error line naming the path and the cause,
    whichever command was writing it. Every usage error, click's own (a value out of range, an
    unknown option or choice) included, is one "Error: ..." line and exit status 2.

    `lazy` maps command names to "module:attribute" of the click command; the module is imported
    when the command is used or listed, so `ringpipe trace summary` does not load the model code
    (~0.5 s of imports)."""

    lazy: dict = {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        if name not in self.commands and name in self.lazy:
            module, _, attribute = self.lazy[name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_usage_errors():  # the group's own options: `ringpipe --bogus`
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx):
        from ringpipe.runtime import RemoteError

        try:
            with _one_line_usage_errors():  # every subcommand's (and sub-group's) parsing and checks
                return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            raise click.exceptions.Exit(130) from None
        except FileWriteError as exc:
            raise click.ClickException(str(exc)) from None
        except MemoryError as exc:  # past the commands' memory checks (or with --no-memory-check)
            raise click.ClickException(f"out of memory: {one_line(exc)}") from None
        except RemoteError as exc:
            if out_of_memory(exc):
                raise click.ClickException(f"out of memory on rank {exc.rank}: {str(exc).splitlines()[0]}") from None
            if exc.exc_type != FileWriteError.__name__:
                raise
            raise click.ClickException(str(exc).splitlines()[0]) from None


@contextlib.contextmanager
def _one_line_usage_errors():
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:  # a bare group: its help is the answer
        raise
    except click.UsageError as exc:
        if isinstance(exc, CommandLineError):
            raise
        raise CommandLineError(exc.format_message(), ctx=exc.ctx) from None


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(version=__version__, package_name="ringpipe")
def main():
    """ringpipe: distributed GPT training built from primitives."""


main.lazy = {"train": "ringpipe.cluster.train_cmd:train", "generate": "ringpipe.cluster.generate_cmd:generate",
             "trace": "ringpipe.cluster.trace_cmd:trace", "bench": "ringpipe.cluster.bench_commands:bench",
             "fill-mask": "ringpipe.cluster.fill_mask_cmd:fill_mask",
             "plan": "ringpipe.cluster.plan_cmd:plan",
             "worker": "ringpipe.cluster.worker_cmd:worker",
             "export": "ringpipe.cluster.export_cmd:export",
             "quantize": "ringpipe.cluster.quantize_cmd:quantize"}
