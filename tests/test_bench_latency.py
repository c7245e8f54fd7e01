"""tools/bench_latency.py: wall and CPU time per small operation, each variant in a fresh process."""
import pytest

from ringpipe.tools import bench_latency


@pytest.mark.timeout(120)
def test_a_ping_pong_case_reports_wall_and_cpu_time_per_operation_from_a_fresh_process():
    wall, cpu = bench_latency._measure(str(bench_latency.HERE.parent.parent), {}, "ping-pong", 2, 20)
    assert wall > 0 and cpu > 0


def test_a_baseline_that_is_no_checkout_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="not a ringpipe checkout"):
        bench_latency.run(rounds=1, count=1, baseline=str(tmp_path), progress=lambda line: None)
