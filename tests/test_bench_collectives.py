"""`ringpipe bench collectives` and `bench p2p` against OpenMPI (mpi4py): the same run, the rounds
interleaved, every round of both libraries in the JSON, the peer's results checked as ours; and
what happens where MPI is missing or a peer hangs."""
import importlib.util
import json
import os
import shutil
import sys
import uuid

import pytest
from click.testing import CliRunner

from ringpipe.cluster.cli import main
from ringpipe.tools.bench_libraries import LibraryUnavailable, run_processes

OPS = ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "sendrecv"]


def mpi_missing() -> str | None:
    if shutil.which("mpirun") is None:
        return "mpirun is not on PATH (.ci/install_mpi.sh installs OpenMPI)"
    if importlib.util.find_spec("mpi4py") is None:
        return f"mpi4py is not installed for {sys.executable} (.ci/install_mpi.sh installs it)"
    return None


needs_mpi = pytest.mark.skipif(mpi_missing() is not None, reason=str(mpi_missing()))


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_every_round_of(result, libraries, rounds, keys):
    assert result["rounds"] == rounds and result["unavailable"] == {}
    for library in libraries:
        rows = [row for row in result["rows"] if row["impl"] == library]
        assert sorted(tuple(row[k] for k in keys) for row in rows) == sorted(set(tuple(row[k] for k in keys)
                                                                                  for row in result["rows"]))
        for row in rows:
            assert len(row["rounds"]) == rounds and all(r["time_us"] > 0 for r in row["rounds"]), row
            assert row["wrong"] == 0 and row["time_us"] > 0, row


@needs_mpi
@pytest.mark.timeout(120)
def test_bench_collectives_compare_mpi_lists_every_round_of_both_libraries(tmp_path):
    path = tmp_path / "collectives.json"
    result = run_cli("bench", "collectives", "--world-size", 2, "--sizes", "1K,4K", "--iters", 3, "--rounds", 2,
                     "--compare", "mpi", "--json", path)
    assert result.exit_code == 0, result.output
    table = result.stdout.splitlines()  # the rounds' progress goes to stderr
    assert "median of 2 interleaved rounds" in table[0] and "mpi(us)" in result.output
    assert sum(line.split()[0] in OPS for line in table) == len(OPS) * 2
    saved = json.loads(path.read_text())
    assert saved["libraries"] == ["ringpipe", "mpi"] and saved["world_size"] == 2
    assert {(row["impl"], row["op"]) for row in saved["rows"]} == {(impl, op) for impl in ("ringpipe", "mpi")
                                                                   for op in OPS}
    assert_every_round_of(saved, ["ringpipe", "mpi"], 2, ("op", "size_bytes"))


@needs_mpi
@pytest.mark.timeout(120)
def test_bench_p2p_compare_mpi_lists_every_round_of_both_libraries(tmp_path):
    path = tmp_path / "p2p.json"
    result = run_cli("bench", "p2p", "--sizes", "1K,64K", "--pingpongs", 20, "--rounds", 2, "--compare", "mpi",
                     "--json", path)
    assert result.exit_code == 0, result.output
    assert "one-way" in result.output and "mpi(us)" in result.output
    saved = json.loads(path.read_text())
    assert saved["libraries"] == ["ringpipe", "mpi"]
    assert {(row["impl"], row["size_bytes"], row["pingpongs"]) for row in saved["rows"]} == {
        (impl, size, 20) for impl in ("ringpipe", "mpi") for size in (1024, 65536)}
    assert_every_round_of(saved, ["ringpipe", "mpi"], 2, ("size_bytes",))


@pytest.mark.timeout(60)
def test_compare_mpi_without_mpirun_says_why_in_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no mpirun on it; the workers are started by full path
    path = tmp_path / "p2p.json"
    result = run_cli("bench", "p2p", "--sizes", "1K", "--pingpongs", 5, "--rounds", 1, "--compare", "mpi",
                     "--json", path)
    assert result.exit_code == 0, result.output
    assert "# mpi: not run: mpirun is not on PATH" in result.output and "Traceback" not in result.output
    assert "mpi(us)" not in result.output
    saved = json.loads(path.read_text())
    assert saved["unavailable"] == {"mpi": result.output.split("# mpi: not run: ")[1].splitlines()[0]}
    assert {row["impl"] for row in saved["rows"]} == {"ringpipe"}


def test_an_unknown_library_to_compare_is_a_one_line_error():
    result = run_cli("bench", "collectives", "--compare", "nccl2")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == ["Error: --compare: unknown library 'nccl2'; choose from none, "
                                                  "gloo, mpi, ringpipe@PATH"]


def test_a_checkout_to_compare_with_must_hold_ringpipe(tmp_path):
    result = run_cli("bench", "collectives", "--compare", f"ringpipe@{tmp_path}")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"Error: ringpipe@{tmp_path}: not a ringpipe checkout (no "
                                                  f"runtime/__init__.py there)"]


@needs_mpi
@pytest.mark.timeout(60)
def test_a_peer_that_hangs_is_stopped_with_all_its_ranks(tmp_path):
    marker = f"hang-{uuid.uuid4().hex}"
    command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-c",
               f"import time; time.sleep(600)  # {marker}"]
    with pytest.raises(LibraryUnavailable, match="mpi did not finish within 2 s; stopped it"):
        run_processes("mpi", [command], str(tmp_path), timeout=2)
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and marker in _cmdline(pid)]
    assert left == []


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.timeout(60)
def test_a_failing_peer_rank_stops_the_others_and_is_named_in_one_line(tmp_path):
    marker = f"wait-{uuid.uuid4().hex}"
    fail = [sys.executable, "-c", "raise ValueError('rank 0 cannot start')"]
    wait = [sys.executable, "-c", f"import time; time.sleep(600)  # {marker}"]
    with pytest.raises(LibraryUnavailable, match=r"^gloo failed \(exit code 1\): ValueError: rank 0 cannot start$"):
        run_processes("gloo", [wait, fail], str(tmp_path), timeout=300)
    assert [pid for pid in os.listdir("/proc") if pid.isdigit() and marker in _cmdline(pid)] == []


@pytest.mark.timeout(120)
def test_another_checkout_runs_as_a_peer_in_fresh_processes():
    import ringpipe.runtime
    from ringpipe.tools.bench_libraries import run_ringpipe_at

    checkout = os.path.dirname(os.path.dirname(os.path.abspath(ringpipe.runtime.__file__)))
    ranks = run_ringpipe_at(checkout, 2, "ringpipe.tools.bench_p2p:measure", {"sizes": [64], "pingpongs": 3})
    assert [row["wrong"] for rank in ranks for row in rank] == [0, 0]
    assert ranks[0][0]["round_trip_us"] > 0 and ranks[1][0]["round_trip_us"] is None
