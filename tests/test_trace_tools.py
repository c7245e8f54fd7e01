"""Trace tools: loading onto one clock, the Chrome/Perfetto export, the summary, the viewer, the CLI."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from ringpipe.cluster.cli import main
from ringpipe.tools.trace_export import assign_lanes, to_chrome_trace
from ringpipe.tools.trace_io import Event, clock_correction, load_trace
from ringpipe.tools.trace_summary import clip, format_summary, intersect, schedule_bubble, subtract, summarize, union
from ringpipe.tools.trace_view import FORMAT_SCRIPT, render_html, view_data

US = 1000  # ns per microsecond


def span(name, start_us, end_us, thread="compute", **args):
    category = "comm" if thread == "comm" else "compute"
    return ["X", name, category, thread, start_us * US, (end_us - start_us) * US, args]


# Two ranks, 300 us. The numbers in the tests below are worked out by hand from these spans.
# A comm span's first wait_us is blocked-on-peer time (idle), the rest is transfer (communication).
RANK0 = [
    span("forward", 0, 100, microbatch=0, stage=0, step=0),
    span("send", 100, 120, "comm", bytes=1000, peer=1, group=0, tag=0, wait_us=0.0, flow="0:0:1:0:0"),
    span("forward", 120, 220, microbatch=1, stage=0, step=0),
    span("send", 150, 170, "comm", bytes=1000, peer=1, group=0, tag=0, wait_us=0.0, flow="0:0:1:0:1"),
    span("all_reduce", 220, 300, "comm", bytes=400, group=0, seq=0, ranks=[0, 1], wait_us=30.0, flow="0#0@0"),
    ["C", "comm ops in flight", "counter", "comm", 100 * US, 0, {"comm ops in flight": 1}],
]
RANK1 = [
    span("recv", 50, 130, "comm", bytes=1000, peer=0, group=0, tag=0, wait_us=60.0, flow="0:0:1:0:0"),
    span("forward", 130, 230, microbatch=0, stage=1, step=0),
    span("recv", 140, 180, "comm", bytes=1000, peer=0, group=0, tag=0, wait_us=10.0, flow="0:0:1:0:1"),
    span("all_reduce", 230, 300, "comm", bytes=400, group=0, seq=0, ranks=[0, 1], wait_us=0.0, flow="0#0@0"),
]


def write_trace(directory, ranks, offsets_ns=None, schedule=None, metrics=None):
    """Write trace-rank{r}.json (events shifted by the rank's clock offset) and clocks.json."""
    os.makedirs(directory, exist_ok=True)
    offsets_ns = offsets_ns or {}
    for rank, events in enumerate(ranks):
        shift = offsets_ns.get(rank, 0)
        shifted = [[e[0], e[1], e[2], e[3], e[4] + shift, e[5], e[6]] for e in events]
        with open(os.path.join(directory, f"trace-rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "pid": 1000 + rank, "clock": "monotonic_ns", "events": shifted}, f)
    sample = {str(r): {"offset_ns": offsets_ns.get(r, 0), "rtt_ns": 1000} for r in range(len(ranks))}
    with open(os.path.join(directory, "clocks.json"), "w") as f:
        json.dump({"world_size": len(ranks), "offsets": {"start": sample, "end": sample}}, f)
    if schedule:
        with open(os.path.join(directory, "schedule.json"), "w") as f:
            json.dump(schedule, f)
    if metrics:
        with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in metrics)
    return str(directory)


@pytest.fixture
def synthetic(tmp_path):
    return write_trace(tmp_path / "run", [RANK0, RANK1], offsets_ns={1: 1_000_000},
                       schedule={"schedule": "gpipe", "pp": 2, "microbatches": 2, "virtual_stages": 1},
                       metrics=[{"step": 0, "loss": 4.0}, {"step": 1, "loss": 3.0, "val_loss": 3.2}])


# ---- loading and clocks -------------------------------------------------------------------------------
def test_clock_offsets_are_removed_and_the_earliest_event_is_zero(synthetic):
    trace = load_trace(synthetic)
    assert trace.start_ns == 0 and trace.end_ns == 300 * US
    recv = trace.spans(1, "comm")[0]
    assert (recv.start_ns, recv.end_ns) == (50 * US, 130 * US)


def test_clock_offset_is_interpolated_between_start_and_end_samples():
    to_driver = clock_correction(0, 10_000, {"offset_ns": 0}, {"offset_ns": 1000})
    assert [to_driver(t) for t in (0, 5_000, 10_000)] == [0, 4_500, 9_000]
    stamped = clock_correction(0, 10_000, {"offset_ns": 0, "rank_ns": 2_000}, {"offset_ns": 800, "rank_ns": 6_000})
    assert stamped(4_000) == 4_000 - 400


def test_causality_check_flags_receives_that_end_before_their_send(tmp_path):
    # Rank 1's clock runs 1 ms behind but clocks.json does not say so: its receives end "before" the sends.
    directory = write_trace(tmp_path / "bad", [RANK0, RANK1], offsets_ns={1: -1_000_000})
    os.remove(os.path.join(directory, "clocks.json"))
    report = load_trace(directory).causality
    assert report.pairs_checked == 2 and report.violations == 2
    assert report.worst[0]["recv_rank"] == 1 and report.worst[0]["by_us"] == pytest.approx(1000 - 30)  # recv ends 30 us after its send starts
    fixed = write_trace(tmp_path / "good", [RANK0, RANK1], offsets_ns={1: -1_000_000})
    assert load_trace(fixed).causality.violations == 0


# ---- summary (hand-computed) ----------------------------------------------------------------------
def test_summary_percentages_match_hand_computed_values(synthetic):
    ranks = summarize(load_trace(synthetic))["ranks"]
    # rank 0: compute [0,100]+[120,220]; transfer [100,120]+[150,170]+[250,300]; blocked [220,250]
    assert ranks[0]["compute_pct"] == pytest.approx(200 / 3, abs=1e-3)
    assert ranks[0]["comm_pct"] == pytest.approx(30.0)
    assert ranks[0]["exposed_comm_pct"] == pytest.approx(70 / 3, abs=1e-3)
    assert ranks[0]["idle_pct"] == pytest.approx(10.0)
    assert ranks[0]["overlap_pct"] == pytest.approx(200 / 9, abs=1e-3)
    assert ranks[0]["blocked_ms"] == pytest.approx(0.03)
    # rank 1: compute [130,230]; transfer [110,130]+[150,180]+[230,300]; blocked [50,110] (+[140,150] under compute)
    assert ranks[1]["compute_pct"] == pytest.approx(100 / 3, abs=1e-3)
    assert ranks[1]["comm_pct"] == pytest.approx(40.0)
    assert ranks[1]["exposed_comm_pct"] == pytest.approx(30.0)
    assert ranks[1]["idle_pct"] == pytest.approx(110 / 3, abs=1e-3)
    assert ranks[1]["overlap_pct"] == pytest.approx(25.0)
    assert ranks[1]["blocked_ms"] == pytest.approx(0.06)
    for r in ranks:
        assert r["compute_pct"] + r["exposed_comm_pct"] + r["idle_pct"] == pytest.approx(100.0, abs=0.01)


def test_bubble_is_idle_time_within_the_step_window_next_to_the_theoretical_one(synthetic):
    summary = summarize(load_trace(synthetic))
    # step index 0 (step 1) spans [0, 230]: rank 0 idle 10 us, rank 1 idle 110 us (incl. 60 us blocked on rank 0)
    assert [r["bubble_pct"] for r in summary["ranks"]] == pytest.approx([100 / 23, 1100 / 23], abs=1e-3)
    assert summary["bubble"]["measured_pct"] == pytest.approx(600 / 23, abs=1e-3)
    assert summary["bubble"]["window"] == "steps"
    assert summary["bubble"]["theoretical_pct"] == pytest.approx(100 / 3, abs=1e-3)  # (p-1)/(m+p-1), p=m=2
    assert summary["steps"][0]["step"] == 1 and summary["steps"][0]["wall_ms"] == pytest.approx(0.23)


def test_slowest_rank_is_the_one_with_most_compute(synthetic):
    summary = summarize(load_trace(synthetic))
    assert summary["slowest_rank"] == 0
    assert [r["slowest"] for r in summary["ranks"]] == [True, False]


def test_operations_table_totals_time_blocked_time_and_bytes_per_span_name(synthetic):
    ops = {op["name"]: op for op in summarize(load_trace(synthetic))["operations"]}
    assert ops["forward"]["count"] == 3 and ops["forward"]["total_ms"] == pytest.approx(0.3)
    assert ops["recv"]["blocked_ms"] == pytest.approx(0.07) and ops["recv"]["bytes"] == 2000
    assert ops["all_reduce"]["mean_us"] == pytest.approx(75.0)


def test_the_schedule_bubble_is_the_simulators_fraction_of_total_time():
    assert schedule_bubble(None) is None
    assert schedule_bubble({"schedule": "1f1b", "pp": 4, "microbatches": 8}) == pytest.approx(3 / 11)


intervals = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 15)).map(lambda t: (t[0], t[0] + t[1])), max_size=8)


@given(intervals, intervals, st.integers(0, 70), st.integers(0, 20))
@settings(max_examples=200, deadline=None)
def test_interval_set_operations_agree_with_counting_points(a, b, start, length):
    points = lambda spans: {t for s, e in spans for t in range(s, e)}  # noqa: E731
    ua, ub = union(a), union(b)
    assert points(ua) == points(a) and all(x[1] < y[0] for x, y in zip(ua, ua[1:]))
    assert points(intersect(ua, ub)) == points(a) & points(b)
    assert points(subtract(ua, ub)) == points(a) - points(b)
    assert points(clip(ua, start, start + length)) == points(a) & set(range(start, start + length))


# ---- Chrome trace export --------------------------------------------------------------------------
def check_chrome_trace_rules(data):
    """The rules Perfetto / chrome://tracing rely on; returns the X events per (pid, tid)."""
    events = data["traceEvents"]
    named_processes = {e["pid"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    named_threads = {(e["pid"], e["tid"]) for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    lanes = {}
    for e in events:
        assert e["pid"] in named_processes
        if e["ph"] in "XCisf":
            assert (e["pid"], e["tid"]) in named_threads and isinstance(e["ts"], (int, float))
        if e["ph"] == "X":
            assert e["dur"] >= 0
            lanes.setdefault((e["pid"], e["tid"]), []).append(e)
    for spans in lanes.values():  # spans on one lane nest: each starts after, or ends within, the open one
        stack = []
        for e in sorted(spans, key=lambda e: (e["ts"], -e["dur"])):
            while stack and stack[-1] <= e["ts"]:
                stack.pop()
            assert not stack or e["ts"] + e["dur"] <= stack[-1], f"{e['name']} overlaps on {e['pid']}/{e['tid']}"
            stack.append(e["ts"] + e["dur"])
    flows = {}
    for e in events:
        if e["ph"] in "sf":
            flows.setdefault(e["id"], []).append(e)
            enclosing = [x for x in lanes.get((e["pid"], e["tid"]), []) if x["ts"] <= e["ts"] <= x["ts"] + x["dur"]]
            assert enclosing, f"flow {e['id']} binds to no slice"
    for flow_id, ends in flows.items():
        assert sorted(e["ph"] for e in ends) == ["f", "s"], f"flow {flow_id} lacks an end"
        assert len({(e["cat"], e["name"]) for e in ends}) == 1
        assert [e.get("bp") for e in ends if e["ph"] == "f"] == ["e"]
    return lanes, flows


def test_export_follows_the_trace_event_format_rules(synthetic):
    data = to_chrome_trace(load_trace(synthetic))
    json.dumps(data)
    lanes, flows = check_chrome_trace_rules(data)
    names = {e["args"]["name"] for e in data["traceEvents"] if e["name"] == "process_name"}
    assert names == {"rank 0", "rank 1"}
    assert sum(len(spans) for spans in lanes.values()) == 9
    assert len(flows) == 3  # two send->recv pairs and one all_reduce link
    forward = next(e for e in data["traceEvents"] if e["ph"] == "X" and e["pid"] == 1 and e["name"] == "forward")
    assert (forward["ts"], forward["dur"]) == (130.0, 100.0)
    assert any(e["ph"] == "C" and e["args"] == {"comm ops in flight": 1} for e in data["traceEvents"])


def test_overlapping_comm_spans_get_extra_lanes_so_every_lane_nests(tmp_path):
    overlapping = [span("recv", 0, 50, "comm", flow="a"), span("recv", 10, 60, "comm", flow="b"),
                   span("send", 40, 70, "comm", flow="c")]
    data = to_chrome_trace(load_trace(write_trace(tmp_path / "run", [overlapping])))
    check_chrome_trace_rules(data)
    threads = {e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}
    assert {"compute", "comm", "comm 2"} <= threads


def test_assign_lanes_keeps_properly_nested_spans_on_one_lane():
    spans = [Event("X", 0, n, "compute", "compute", s, d, {}) for n, s, d in
             [("step", 0, 100), ("forward", 10, 30), ("backward", 50, 40), ("stray", 80, 40)]]
    assert assign_lanes(spans) == [0, 0, 0, 1]


# ---- viewer and CLI -------------------------------------------------------------------------------
def test_view_embeds_the_data_and_the_same_summary_numbers(synthetic):
    trace = load_trace(synthetic)
    page = render_html(trace)
    summary = summarize(trace)
    assert "<script src" not in page and "http://" not in page and "https://" not in page
    assert 'id="loss-curve"' in page and 'class="val-loss"' in page
    for r in summary["ranks"]:
        assert f'data-key="idle_pct" data-value="{r["idle_pct"]!r}"' in page


def test_cli_summary_export_view(synthetic, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["trace", "summary", synthetic, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["slowest_rank"] == 0
    text = runner.invoke(main, ["trace", "summary", synthetic])
    assert "<- slowest" in text.output and "theoretical 33.33%" in text.output
    out = tmp_path / "t.json"
    assert runner.invoke(main, ["trace", "export", synthetic, "-o", str(out)]).exit_code == 0
    check_chrome_trace_rules(json.load(open(out)))
    assert runner.invoke(main, ["trace", "view", synthetic]).exit_code == 0
    assert os.path.exists(os.path.join(synthetic, "trace.html"))


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no such directory"),
    (lambda d: os.makedirs(d), "no trace-rank"),
    (lambda d: os.makedirs(d), "ringpipe train --trace"),  # the way a user records one
    (lambda d: (os.makedirs(d), open(os.path.join(d, "trace-rank0.json"), "w").write("{")), "corrupt JSON"),
])
def test_cli_errors_are_one_line(tmp_path, setup, message):
    directory = str(tmp_path / "run")
    setup(directory)
    result = CliRunner().invoke(main, ["trace", "summary", directory])
    assert result.exit_code != 0 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


# ---- end to end on the runtime ----------------------------------------------------------------------
def two_stage_pipeline(comm, microbatches=3):
    x = np.ones((64, 64), dtype=np.float32)
    for mb in range(microbatches):
        if comm.rank == 1:
            x = comm.recv(0, tag=0)
        with comm.tracer.span("forward", microbatch=mb, stage=comm.rank, step=0):
            y = x @ x
        if comm.rank == 0:
            comm.send(y, 1, tag=0)
    comm.all_reduce(y)


def test_a_traced_runtime_run_exports_summarizes_and_views(local_cluster, tmp_path):
    cluster = local_cluster(2)
    cluster.start_trace()
    cluster.run(two_stage_pipeline)
    cluster.stop_trace(str(tmp_path))
    trace = load_trace(str(tmp_path))
    assert trace.ranks == [0, 1] and trace.causality.pairs_checked == 3
    assert trace.causality.violations == 0
    lanes, flows = check_chrome_trace_rules(to_chrome_trace(trace))
    names = sorted(events[0]["name"].split()[0] for events in flows.values()
                   if "opening the same-host channel" not in events[0]["name"])  # its own exchange, when it opens
    assert names == ["all_reduce", "send", "send", "send"]  # 3 send->recv + the all_reduce
    summary = summarize(trace)
    assert [r["rank"] for r in summary["ranks"]] == [0, 1]
    for r in summary["ranks"]:
        assert r["compute_pct"] > 0 and r["compute_pct"] + r["exposed_comm_pct"] + r["idle_pct"] == pytest.approx(100, abs=0.01)
    assert CliRunner().invoke(main, ["trace", "view", str(tmp_path)]).exit_code == 0


# ---- what the viewer shows -----------------------------------------------------------------------------
def four_ranks_with_a_subgroup_send(tmp_path):
    """Ranks 1 and 3 form the group "w/1,3#0"; rank 1 sends to its peer index 1, which is rank 3."""
    idle = [span("forward", 0, 10, microbatch=0, stage=0, step=0)]
    rank1 = idle + [span("send", 10, 20, "comm", bytes=8, peer=1, group="w/1,3#0", tag=0, wait_us=0.0, flow="f")]
    rank3 = idle + [span("recv", 5, 20, "comm", bytes=8, peer=0, group="w/1,3#0", tag=0, wait_us=5.0, flow="f")]
    return load_trace(write_trace(tmp_path / "run", [idle, rank1, idle, rank3]))


def test_viewer_and_export_name_a_peer_by_its_global_rank(tmp_path):
    trace = four_ranks_with_a_subgroup_send(tmp_path)
    shown = {(row[0], row[5]): row[10] for row in view_data(trace)["spans"] if row[5] in ("send", "recv")}
    assert shown == {(1, "send"): 3, (3, "recv"): 1}
    exported = [e["args"] for e in to_chrome_trace(trace)["traceEvents"] if e.get("name") in ("send", "recv")]
    assert sorted(a["peer_rank"] for a in exported) == [1, 3]


NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed: the page's formatting functions are not run")
def test_tooltip_uses_one_time_unit_chosen_by_the_visible_range():
    def tooltip(row, visible_us):
        script = FORMAT_SCRIPT + f"process.stdout.write(describe({json.dumps(row)}, unitFor({visible_us})));"
        return subprocess.run([NODE, "-e", script], capture_output=True, text=True, check=True).stdout

    send = [1, "comm", 0, 1528835.0, 282196.3, "send", None, 3, 131072, 1500.0, 3, None]
    assert tooltip(send, 2_000_000).splitlines()[1:] == [  # a 2 s view: milliseconds throughout
        "start 1528.835 ms, duration 282.196 ms", "step 3", "bytes 131,072", "blocked on a peer 1.500 ms",
        "peer rank 3"]
    assert tooltip(send, 20_000_000).splitlines()[1] == "start 1.529 s, duration 0.282 s"
    assert tooltip(send, 500).splitlines()[1] == "start 1528835.000 us, duration 282196.300 us"


def test_the_page_has_a_colour_legend_built_from_the_canvas_colours(synthetic):
    page = render_html(load_trace(synthetic))
    assert '<div id="legend"></div>' in page
    script = page.split("<script>")[-1]
    assert "COLORS[s[5]] || OTHER[s[1]]" in script and "Object.entries(COLORS)" in script


def test_steps_are_numbered_from_1_in_summary_viewer_and_loss_curve(synthetic):
    # The rank files carry the trainer's step index 0; metrics.jsonl here is an old, 0-based file.
    trace = load_trace(synthetic)
    assert [step["step"] for step in summarize(trace)["steps"]] == [1]
    assert [row["step"] for row in trace.metrics] == [1, 2]
    page = render_html(trace)
    assert '<option value="1">step 1</option>' in page and "step 0" not in page
    assert "step 2 val_loss 3.2000" in page


def test_metrics_written_with_1_based_steps_are_read_as_they_are(tmp_path):
    run = write_trace(tmp_path / "run", [RANK0], metrics=[{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}])
    assert [row["step"] for row in load_trace(run).metrics] == [1, 2]


def test_view_open_without_a_browser_says_so_with_the_path(synthetic):
    env = {**os.environ, "BROWSER": shutil.which("false"), "PATH": "/nonexistent"}  # no other browser found
    env.pop("DISPLAY", None), env.pop("WAYLAND_DISPLAY", None)
    result = subprocess.run([sys.executable, "-m", "ringpipe.cluster", "trace", "view", synthetic, "--open"], env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    page = os.path.join(synthetic, "trace.html")
    assert result.stderr.strip().splitlines() == [
        f"no browser found to open it: open {page} in one (it works offline)"]


def test_bench_trace_tools_times_each_tool_on_a_copy_of_the_run(synthetic, tmp_path):
    before = sorted(os.listdir(synthetic))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "trace-tools", synthetic, "--repeats", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["tools"]
    assert [row["name"] for row in rows] == ["summary", "view", "export", "report"]
    assert all(row["wall_s"] > 0 and row["cpu_s"] > 0 for row in rows)
    assert {row["name"]: row["target_s"] for row in rows if row["target_s"]} == {"summary": 3.0, "view": 5.0}
    assert sorted(os.listdir(synthetic)) == before  # the run itself is left as it was


def test_summary_of_a_trace_with_a_rank_file_deleted_names_the_missing_rank(synthetic):
    os.remove(os.path.join(synthetic, "trace-rank1.json"))
    summary = summarize(load_trace(synthetic))
    assert summary["missing_ranks"] == [1] and [r["rank"] for r in summary["ranks"]] == [0]
    assert ("warning: no trace file for rank 1 (trace-rankN.json): this summarises 1 of 2 ranks"
            in format_summary(summary).splitlines())
