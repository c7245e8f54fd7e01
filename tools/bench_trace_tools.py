"""How long the trace tools take on a run directory, as a user meets them.

Each tool runs as a fresh process, imports included, the way a user types it:
  summary  `ringpipe trace summary RUN_DIR`
  view     `ringpipe trace view RUN_DIR -o ...`
  export   `ringpipe trace export RUN_DIR -o ...`
  report   what `ringpipe train --trace` does after "saved model" once the traces are collected:
           the summary and the viewer page (`cluster.progress.report_trace`).
The run's trace files are copied into a temporary directory first, so the run is left as it was.
Each tool runs `repeats` times; the best wall time is the result (CPU time, user + system, is given
too: on a shared machine the wall time includes waiting for a core). Targets (issue 13, the
README's 500-step trace): summary 3 s, view 5 s.

    ringpipe bench trace-tools RUN_DIR [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import glob
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from ringpipe.model.training.run_dir import METRICS_FILE, TRACE_EXPORT_FILE, TRACE_RANK_GLOB, TRACE_FILES as RUN_TRACE_FILES

TARGETS_S = {"summary": 3.0, "view": 5.0}
TRACE_FILES = (*RUN_TRACE_FILES, METRICS_FILE)


def _commands(run_dir: str, scratch: str) -> dict:
    cli = [sys.executable, "-m", "ringpipe.cluster", "trace"]
    report = f"from ringpipe.cluster.progress import report_trace; report_trace({run_dir!r})"
    return {"summary": cli + ["summary", run_dir],
            "view": cli + ["view", run_dir, "-o", os.path.join(scratch, "view.html")],
            "export": cli + ["export", run_dir, "-o", os.path.join(scratch, TRACE_EXPORT_FILE)],
            "report": [sys.executable, "-c", report]}


def _timed(command: list, cwd: str) -> tuple:
    """(wall seconds, CPU seconds of the child) of one run; RuntimeError naming the command if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run(run_dir: str, repeats: int = 3) -> dict:
    """{"run_dir", "trace_mb", "spans", "events", "load_average", "tools": [{"name", "wall_s", "cpu_s",
    "walls_s", "target_s"}]}; ValueError if `run_dir` holds no trace."""
    from ringpipe.tools.trace_io import TraceError, load_trace

    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    try:
        trace = load_trace(run_dir)
    except TraceError as exc:
        raise ValueError(str(exc)) from None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the CLI of this checkout
    with tempfile.TemporaryDirectory(prefix="bench-trace-tools-") as scratch:
        copy = os.path.join(scratch, "run")
        os.makedirs(copy)
        for pattern in TRACE_FILES:
            for path in glob.glob(os.path.join(run_dir, pattern)):
                shutil.copy(path, copy)
        tools = []
        for name, command in _commands(copy, scratch).items():
            times = [_timed(command, root) for _ in range(repeats)]
            tools.append({"name": name, "wall_s": round(min(w for w, _ in times), 3),
                          "cpu_s": round(min(c for _, c in times), 3),
                          "walls_s": [round(w, 3) for w, _ in times], "target_s": TARGETS_S.get(name)})
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(run_dir, TRACE_RANK_GLOB)))
    return {"run_dir": os.path.abspath(run_dir), "trace_mb": round(size / 1e6, 1), "ranks": len(trace.ranks),
            "events": len(trace.events), "spans": sum(1 for e in trace.events if e.phase == "X"),
            "steps": len({e.args.get("step") for e in trace.events if e.args.get("step") is not None}),
            "load_average": list(os.getloadavg()), "repeats": repeats, "tools": tools}


def format_table(result: dict) -> str:
    lines = [f"{result['run_dir']}: {result['trace_mb']} MB of traces, {result['ranks']} ranks, "
             f"{result['events']:,} events ({result['spans']:,} spans), {result['steps']} steps; "
             f"best of {result['repeats']}, load average {result['load_average'][0]:.2f}",
             f"{'tool':<8} {'wall s':>8} {'cpu s':>8} {'target s':>9}  each run (wall s)"]
    for tool in result["tools"]:
        target = "-" if tool["target_s"] is None else f"{tool['target_s']:.1f}"
        lines.append(f"{tool['name']:<8} {tool['wall_s']:>8.2f} {tool['cpu_s']:>8.2f} {target:>9}  "
                     + " ".join(f"{w:.2f}" for w in tool["walls_s"]))
    return "\n".join(lines)
