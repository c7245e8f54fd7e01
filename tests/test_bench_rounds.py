"""The comparative benchmarks' protocol: libraries take turns round by round, each figure is the
median of the rounds, and every round is kept."""
import pytest

from ringpipe.tools.bench_libraries import LibraryUnavailable
from ringpipe.tools.bench_rounds import interleaved_rounds, median_of_rounds


def rows(*times, wrong=0):
    return [{"op": "all_reduce", "size_bytes": 1024 << i, "time_us": t, "wrong": wrong} for i, t in enumerate(times)]


def test_each_figure_is_the_median_of_the_rounds_with_every_round_kept():
    merged = median_of_rounds([rows(50.0, 7.0), rows(10.0, 9.0), rows(30.0, 8.0, wrong=2)], ("op", "size_bytes"))
    assert [row["time_us"] for row in merged] == [30.0, 8.0]  # not the best (10, 7), nor the mean
    assert [r["time_us"] for r in merged[0]["rounds"]] == [50.0, 10.0, 30.0]
    assert [r["wrong"] for r in merged[1]["rounds"]] == [0, 0, 2]
    assert [row["wrong"] for row in merged] == [2, 2]  # summed over the rounds
    assert merged[0]["size_bytes"] == 1024 and merged[1]["size_bytes"] == 2048


def test_the_median_of_an_even_number_of_rounds_is_the_mean_of_the_middle_two():
    merged = median_of_rounds([rows(40.0), rows(10.0), rows(20.0), rows(1000.0)], ("op", "size_bytes"))
    assert merged[0]["time_us"] == 30.0


def test_rounds_that_measured_different_sizes_are_refused():
    with pytest.raises(ValueError, match="round 2 measured"):
        median_of_rounds([rows(1.0, 2.0), rows(1.0)], ("op", "size_bytes"))


def test_libraries_take_turns_one_repetition_each_round():
    calls = []
    runners = {name: (lambda name=name: calls.append(name) or rows(float(len(calls)))) for name in ("ringpipe", "mpi")}
    results, unavailable = interleaved_rounds(runners, 3)
    assert calls == ["ringpipe", "mpi"] * 3 and unavailable == {}
    assert [r[0]["time_us"] for r in results["ringpipe"]] == [1.0, 3.0, 5.0]
    assert [r[0]["time_us"] for r in results["mpi"]] == [2.0, 4.0, 6.0]


def test_a_library_that_cannot_run_is_left_out_with_its_reason_and_the_others_go_on():
    calls = []

    def mpi():
        calls.append("mpi")
        if calls.count("mpi") == 2:
            raise LibraryUnavailable("mpi failed (exit code 1): boom")
        return rows(1.0)

    results, unavailable = interleaved_rounds({"ringpipe": lambda: calls.append("ringpipe") or rows(2.0),
                                               "mpi": mpi}, 3)
    assert calls == ["ringpipe", "mpi", "ringpipe", "mpi", "ringpipe"]
    assert unavailable == {"mpi": "round 2 of 3: mpi failed (exit code 1): boom"}
    assert list(results) == ["ringpipe"] and len(results["ringpipe"]) == 3


def test_an_error_of_ringpipe_itself_is_not_swallowed():
    def broken():
        raise RuntimeError("rank 1 died")

    with pytest.raises(RuntimeError, match="rank 1 died"):
        interleaved_rounds({"ringpipe": broken}, 2)
