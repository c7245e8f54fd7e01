"""`ringpipe` command-line entry point: a click group; each subcommand lives in its own module."""
from __future__ import annotations

import sys

import click


class _Group(click.Group):
    """A command group where Ctrl-C ends any command with exit status 130 (128 + SIGINT), as
    shells and PyTorch's launchers report it, and a line of its own instead of click's "Aborted!".
    Commands with more to say (`train`: can it resume?) catch KeyboardInterrupt themselves."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            raise click.exceptions.Exit(130) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ringpipe")
def main():
    """ringpipe: distributed GPT training built from primitives."""


@main.group(short_help="Benchmarks: tables on the terminal, --json for the details.")
def bench():
    """Benchmarks (nccl-tests style tables, --json output)."""


def _register_commands():
    # Subcommands register themselves on import; a missing optional module must not break the CLI.
    try:
        from cluster import bench_commands  # noqa: F401
        from cluster import train_cmd  # noqa: F401
        from cluster import trace_cmd  # noqa: F401
    except KeyboardInterrupt:  # Ctrl-C while NumPy & co. load: the same exit as inside a command
        click.echo("\ninterrupted", err=True)
        sys.exit(130)


_register_commands()

if __name__ == "__main__":  # pragma: no cover - `python -m cluster` is the module entry point
    from cluster.__main__ import run
    run()
