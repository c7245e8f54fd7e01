import os
import sys
import time

# Tests spawn small worker groups on a 2-core machine: keep BLAS single-threaded in the driver too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# The suite starts hundreds of Python processes (workers, CLI runs), each importing ringpipe.
# With PYTHONDONTWRITEBYTECODE set (as some shells and containers do), no bytecode cache is ever
# written, so each of them compiled ringpipe (and the test modules it runs) from source again: a
# fifth of the CPU time of the cluster tests (62 -> 50 s for four such files). The suite writes the
# usual (git-ignored) __pycache__.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


import pytest  # noqa: E402

# A small corpus every training test can share: 52 distinct characters, ~12 k of text.
TEXT = "".join(f"{i} little pigs went to market, {i * 7 % 13} came home.\n" for i in range(300))


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """`bench quality` and `bench model` call torch.set_num_threads, which lasts for the process: put
    it back after each test, or every later torch test in the session runs more OpenMP threads
    than the 2 shared cores can serve."""
    yield
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != int(os.environ["OMP_NUM_THREADS"]):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(params=["c", "numpy"])
def kernel_path(request):
    """Runs the test through the C kernels and through NumPy (model/nn/kernels.py); "c" skips with
    the reason where the kernels cannot be built."""
    from ringpipe.model.nn import kernels

    if request.param == "c" and kernels.library() is None:
        pytest.skip(kernels.status())
    previous = kernels.use_kernels(request.param == "c")
    yield request.param
    kernels.use_kernels(previous)


@pytest.fixture
def corpus(tmp_path) -> str:
    """Path of a file holding TEXT."""
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def shared_folder(tmp_path_factory):
    """A folder every test process of this run sees (pytest-xdist gives each its own base folder
    under a common one; without it, the run's base folder)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def train_run_from_an_empty_kernel_cache(tmp_path_factory):
    """`ringpipe train` of 2 steps on 2 workers in a fresh process whose RINGPIPE_CACHE holds no C
    kernels yet -> (its subprocess.CompletedProcess, that cache folder). The build is the slow part:
    test_train_interrupt reads the run's status lines, test_kernels what the build left in the cache.
    Run once for all test processes: the first to ask runs it under a lock, the others read its result."""
    import fcntl
    import json
    import shutil
    import subprocess

    directory = shared_folder(tmp_path_factory) / "empty_kernel_cache"
    with open(f"{directory}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = directory / "result.json"
        if not saved.exists():
            shutil.rmtree(directory, ignore_errors=True)  # what a failed first try left: empty again
            directory.mkdir()
            (directory / "corpus.txt").write_text(TEXT)
            args = ["train", "--data", directory / "corpus.txt", "--n-layer", 1, "--n-head", 2, "--n-embd", 16,
                    "--block-size", 16, "--batch-size", 4, "--warmup", 1, "--eval-every", 0, "--eval-iters", 1,
                    "--steps", 2, "--nproc", 2, "--dp", 2, "--out", directory / "run"]
            command = [sys.executable, "-m", "ringpipe.cluster", *[str(a) for a in args]]
            result = subprocess.run(command, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    env=dict(os.environ, RINGPIPE_CACHE=str(directory / "cache"), RINGPIPE_KERNELS="c"),
                                    capture_output=True, text=True, timeout=110)
            assert result.returncode == 0, result.stderr
            saved.write_text(json.dumps([command, result.returncode, result.stdout, result.stderr]))
        result = subprocess.CompletedProcess(*json.loads(saved.read_text()))
    return result, directory / "cache"


def run_cli(*args):
    """The `ringpipe` command in this process (click's runner); arguments may be paths or numbers."""
    from click.testing import CliRunner

    from ringpipe.cluster.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result) -> str:
    """The one "Error: ..." line of a failed command, asserting there is no other error, traceback
    or usage block."""
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code != 0 and len(errors) == 1, result.output
    assert "Traceback" not in result.output and "Usage:" not in result.output, result.output
    return errors[0]


def process_alive(pid) -> bool:
    """Whether `pid` is a process that has not exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def processes_tagged(tag: str) -> list[int]:
    """Pids of live processes whose environment holds RINGPIPE_TEST_TAG=`tag` (a test sets it on
    what it starts; launchers pass the environment on to agents and workers)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                tagged = f"RINGPIPE_TEST_TAG={tag}".encode() in f.read().split(b"\0")
        except OSError:  # not a process, gone, or a zombie's
            continue
        if tagged and entry.isdigit() and process_alive(int(entry)):
            found.append(int(entry))
    return sorted(found)


def processes_left(pids, seconds: float) -> list[int]:
    """The `pids` still running once none is or `seconds` have passed, whichever is first."""
    deadline = time.monotonic() + seconds
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if process_alive(pid)]


def tagged_processes_left(tag: str, seconds: float) -> list[int]:
    """`processes_tagged(tag)` once they are all gone or `seconds` have passed, whichever is first."""
    deadline = time.monotonic() + seconds
    while processes_tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    return processes_tagged(tag)


def arena_blocks_in_use(comm) -> int:
    """Run on every rank: how many shared-memory arena blocks this rank still holds, once every
    rank has reached this point (a barrier lets the engine finish what earlier calls left)."""
    comm.barrier()
    if comm.engine.rings is not None:  # ring blocks come back lazily, when the sender next looks
        comm.engine.rings.reclaim()
    return len(comm.engine.arena._used)


# Made once per session for every multi-host test file (namespace hosts, a reference run).
from tests.multihost_fixtures import namespace_hosts, one_process_losses, ssh_to  # noqa: E402,F401
