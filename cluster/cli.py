"""`ringpipe` command-line entry point: a click group; each subcommand lives in its own module."""
from __future__ import annotations

import click

from runtime.files import FileWriteError


class Commands(click.Group):
    """The `ringpipe` group: a file that cannot be written, here or on a worker, is one error line
    naming the path and the cause, whichever command was writing it."""

    def invoke(self, ctx):
        from runtime import RemoteError

        try:
            return super().invoke(ctx)
        except FileWriteError as exc:
            raise click.ClickException(str(exc)) from None
        except RemoteError as exc:
            if exc.exc_type != FileWriteError.__name__:
                raise
            raise click.ClickException(str(exc).splitlines()[0]) from None


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ringpipe")
def main():
    """ringpipe: distributed GPT training built from primitives."""


@main.group()
def bench():
    """Benchmarks (nccl-tests style tables, --json output)."""


def _register_commands():
    # Subcommands register themselves on import; a missing optional module must not break the CLI.
    from cluster import bench_commands  # noqa: F401
    from cluster import train_cmd  # noqa: F401
    from cluster import trace_cmd  # noqa: F401


_register_commands()

if __name__ == "__main__":  # pragma: no cover - `python -m cluster` is the module entry point
    from cluster.__main__ import run
    run()
