"""tools/bench_collective_cpu.py's arguments: a wrong one is a one-line error naming it, before anything runs."""
import pytest

from ringpipe.tools import bench_collective_cpu


@pytest.mark.parametrize("flag, value", [("--sizes", "1Q"), ("--ranks", "1"), ("--sizes", "2")])
def test_a_wrong_size_or_rank_count_is_a_one_line_error_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as raised:
        bench_collective_cpu.main(["--baseline", str(bench_collective_cpu.HERE.parent.parent), flag, value])
    assert raised.value.code != 0
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and flag in error and repr(value) in error
