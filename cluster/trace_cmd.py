"""`ringpipe trace export|view|summary RUN_DIR`: Perfetto JSON, the offline HTML viewer, the summary table."""
from __future__ import annotations

import json
import os
import webbrowser

import click

from ringpipe.cluster.options import OutputFile, usage_error
from ringpipe.model.training.run_dir import TRACE_EXPORT_FILE, TRACE_VIEW_FILE
from ringpipe.runtime.files import FileWriteError, check_writable_file
from ringpipe.tools.trace_io import TraceError, TraceNotFound, bulk_allocation, load_trace


@click.group(short_help="Summarise, view or export a run's trace.")
def trace():
    """Inspect the traces of a run directory (record them with `ringpipe train --trace`, or
    cluster.start_trace()/stop_trace(DIR) from Python)."""


def _load(run_dir: str, counters: bool = True):
    try:
        return load_trace(run_dir, counters=counters)
    except TraceNotFound as exc:  # RUN_DIR names no trace: a usage error (exit 2); a damaged one exits 1
        raise usage_error(str(exc)) from None
    except TraceError as exc:
        raise click.ClickException(str(exc)) from None


def _default_output(run_dir: str, name: str) -> str:
    """RUN_DIR/name, checked before the trace is read (a missing RUN_DIR is _load's error)."""
    path = os.path.join(run_dir, name)
    if os.path.isdir(run_dir):
        try:
            check_writable_file(path)
        except FileWriteError as exc:
            raise click.ClickException(str(exc)) from None
    return path


@trace.command("export", short_help="Chrome/Perfetto trace JSON.")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", type=OutputFile(), default=None,
              help="Output file (default RUN_DIR/trace.json).")
def export(run_dir, output):
    """Chrome Trace Event JSON for https://ui.perfetto.dev or chrome://tracing."""
    from ringpipe.tools.trace_export import write_chrome_trace

    output = output or _default_output(run_dir, TRACE_EXPORT_FILE)
    with bulk_allocation():
        loaded = _load(run_dir)
        count = write_chrome_trace(loaded, output)
    click.echo(f"wrote {output} ({count} events, {len(loaded.ranks)} ranks); open it in https://ui.perfetto.dev")
    _warn_causality(loaded)


@trace.command("view", short_help="Offline HTML page: swimlanes, summary, loss.")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", type=OutputFile(), default=None,
              help="Output file (default RUN_DIR/trace.html).")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
def view(run_dir, output, open_browser):
    """One self-contained HTML page: pipeline swimlanes, summary table, loss curve (works offline)."""
    from ringpipe.tools.trace_view import write_view

    output = output or _default_output(run_dir, TRACE_VIEW_FILE)
    with bulk_allocation():
        loaded = _load(run_dir, counters=False)
        write_view(loaded, output)
    click.echo(f"wrote {output}")
    _warn_causality(loaded)
    if open_browser and not webbrowser.open("file://" + os.path.abspath(output)):
        click.echo(f"no browser found to open it: open {os.path.abspath(output)} in one (it works offline)",
                   err=True)


@trace.command("summary", short_help="Per-rank compute/comm/idle time and bubble.")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--all-steps", is_flag=True, help="One line per step (default: the 8 slowest).")
def summary(run_dir, as_json, all_steps):
    """Per-rank compute / communication / exposed communication / idle time, bubble, slowest rank."""
    from ringpipe.tools.trace_summary import format_summary, summarize

    with bulk_allocation():
        result = summarize(_load(run_dir, counters=False))
    click.echo(json.dumps(result, indent=1) if as_json else format_summary(result, None if all_steps else 8))


def _warn_causality(loaded):
    report = loaded.causality
    if report.violations:
        click.echo(f"warning: {report.violations} of {report.pairs_checked} receives end before their send "
                   f"starts: clock correction is off (see `ringpipe trace summary`)", err=True)
