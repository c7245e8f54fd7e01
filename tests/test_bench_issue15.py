"""`python -m ringpipe.tools.bench_issue15`: issue #15's targets checked on the medians of the rounds,
and its tables as Markdown for the README (tools/bench_issue15_report.py)."""
import pytest

from ringpipe.tools.bench_issue15 import main
from ringpipe.tools.bench_issue15_report import format_markdown, targets

K, M = 1 << 10, 1 << 20
BASE = "ringpipe@/src/ringpipe-start"


def rows(impl, times):
    """Collective rows of `impl`: {(op, size): time_us}, busbw as for 2 ranks' all_reduce."""
    return [{"impl": impl, "op": op, "size_bytes": size, "time_us": t, "busbw": size / t / 1e3, "rounds": []}
            for (op, size), t in times.items()]


def a_result(ringpipe_1k=25.0, with_baseline=True):
    sizes = [K, 64 * K, 256 * K, 64 * M]
    ours = {("all_reduce", s): t for s, t in zip(sizes, [ringpipe_1k, 100.0, 300.0, 40_000.0])}
    mpi = {("all_reduce", s): t for s, t in zip(sizes, [5.0, 150.0, 330.0, 70_000.0])}
    gloo = {("all_reduce", s): t for s, t in zip(sizes, [400.0, 900.0, 1_000.0, 80_000.0])}
    base = {k: t * 1.5 for k, t in ours.items()}
    peers = ["mpi", *([BASE] if with_baseline else [])]

    def section(n, libraries, tables):
        return {"world_size": n, "rounds": 5, "libraries": ["ringpipe", *libraries], "unavailable": {},
                "rows": [r for impl, t in tables for r in rows(impl, t)]}

    return {"rounds": 5, "sizes": sizes, "load_average_before": [0.3], "load_average_after": [0.4],
            "seconds": {"collectives2": 10.0},
            "collectives2": section(2, peers, [("ringpipe", ours), ("mpi", mpi)] + ([(BASE, base)] if with_baseline
                                                                                    else [])),
            "collectives4": section(4, ["gloo", "mpi"], [("ringpipe", ours), ("gloo", gloo), ("mpi", mpi)]),
            "p2p": {"rounds": 5, "libraries": ["ringpipe", "mpi"], "unavailable": {},
                    "rows": [{"impl": "ringpipe", "size_bytes": K, "time_us": 18.0},
                             {"impl": "mpi", "size_bytes": K, "time_us": 3.0}]}}


def by_name(checks):
    return {c["target"]: c for c in checks}


def test_each_target_is_checked_on_the_medians_with_its_limit():
    checks = by_name(targets(a_result()))
    assert checks["2 ranks: all_reduce 1 KiB (µs)"]["met"] is True
    assert checks["2 ranks: p2p one-way 1 KiB (µs)"]["value"] == 18.0
    busbw = checks["2 ranks: all_reduce busbw / OpenMPI's, every size from 64 KiB"]
    assert busbw["value"] == pytest.approx(330 / 300) and busbw["met"] is True  # lowest of 1.5, 1.1, 1.75
    assert checks["4 ranks: all_reduce 64 MiB busbw / OpenMPI's"]["value"] == pytest.approx(70 / 40)
    assert checks["4 ranks: all_reduce 64 MiB busbw / gloo's"]["value"] == pytest.approx(2.0)
    assert checks["no regression: baseline's time / ringpipe's, every op and size"]["value"] == pytest.approx(1.5)


def test_a_missed_target_is_not_met_and_an_unmeasured_one_is_not_counted_as_met():
    checks = by_name(targets(a_result(ringpipe_1k=31.0, with_baseline=False)))
    assert checks["2 ranks: all_reduce 1 KiB (µs)"]["met"] is False
    for name in ("pipeline 1F1B p=2 m=8: bubble / no-communication replay (median of rounds)",
                 "data parallel dp=2: weak-scaling efficiency (median of rounds)"):
        assert checks[name]["met"] is None and checks[name]["value"] is None
    assert not any(name.startswith("no regression") for name in checks)  # no baseline, no such target


def test_the_markdown_has_the_targets_and_one_table_per_section_with_the_baseline_named_so():
    text = format_markdown(dict(a_result(ringpipe_1k=31.0), targets=targets(a_result(ringpipe_1k=31.0))))
    assert "| 2 ranks: all_reduce 1 KiB (µs) | 31 | ≤ 30 | **no** |" in text
    assert "baseline µs" in text and "ringpipe@" not in text
    assert "**4 ranks on 2 cores**" in text and "**point-to-point, 2 ranks**" in text


def test_an_unknown_section_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--json", str(tmp_path / "x.json"), "--sections", "collectives2,bogus"])
    assert exited.value.code == 2 and "Error: --sections: 'collectives2,bogus': choose from" in capsys.readouterr().err
