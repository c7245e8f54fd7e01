"""Workers bound to a core of their own where the host's ranks fit (runtime/cpu_binding.py), as
OpenMPI binds the ranks of a job that fits the cores."""
import os

import pytest

from ringpipe.runtime import Cluster, cpu_binding

needs_two_cores = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                                     reason="binding needs at least two cores this process may use")


def test_auto_binds_ranks_that_have_a_core_each_to_equal_blocks_of_the_cores():
    cpus = {3, 5, 7, 9}
    assert [cpu_binding.cores_for("auto", r, 4, cpus) for r in range(4)] == [[3], [5], [7], [9]]
    assert [cpu_binding.cores_for("auto", r, 2, range(16)) for r in range(2)] == [list(range(8)), list(range(8, 16))]
    assert [cpu_binding.cores_for("auto", r, 3, range(8)) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert cpu_binding.cores_for("auto", 0, 1, cpus) is None  # alone: nothing to share a core with
    assert cpu_binding.cores_for("auto", 0, 5, cpus) is None  # more ranks than cores: the scheduler's
    assert cpu_binding.cores_for("auto", 0, 2, {4}) is None  # a launcher bound it already (mpirun, srun)
    assert cpu_binding.cores_for("auto", 0, 2, {4, 5}, machine=16) is None  # (to part of the machine)
    assert [cpu_binding.cores_for("core", r, 5, cpus) for r in range(5)] == [[3], [5], [7], [9], [3]]  # round robin
    assert cpu_binding.cores_for("none", 0, 2, cpus) is None
    assert cpu_binding.cores_for("core", 2, 2, cpus) is None  # not a local rank of the host


def test_a_rank_a_launcher_bound_counts_its_jobs_cores_on_the_host_and_a_shared_cpuset_its_own():
    # mpirun binds each of two ranks to a core: two cores for the job, so no rank thinks it shares one
    assert cpu_binding.launcher_bound_cores({1}, 2, {0, 1}) == 2
    assert cpu_binding.launcher_bound_cores({4, 5}, 3, set(range(16))) == 6  # (srun --cpu-bind=cores -c 2)
    assert cpu_binding.launcher_bound_cores({1}, 4, {0, 1}) == 2  # at most what the cpuset allows
    # a cpuset that confines the whole job (a container's): its ranks share it, as before
    assert cpu_binding.launcher_bound_cores({0, 1}, 4, {0, 1}) is None
    assert cpu_binding.launcher_bound_cores({0, 1}, 2, None) is None  # (nothing known of the cpuset)
    assert cpu_binding.launcher_bound_cores({7}, 2, {0, 1}) is None  # (not within it: nothing to infer)


def test_cpu_lists_read_as_the_kernel_writes_them_and_the_cpuset_holds_this_processes_cpus():
    from ringpipe.runtime import cgroups

    assert cgroups.parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert cgroups.parse_cpu_list("") == set()
    with pytest.raises(ValueError):
        cgroups.parse_cpu_list("0-a")
    if hasattr(os, "sched_getaffinity") and os.path.exists("/proc/self/cgroup"):
        assert os.sched_getaffinity(0) <= cgroups.cpuset_cpus()


def test_the_mode_comes_from_the_option_then_the_environment_and_a_bad_one_names_itself():
    assert cpu_binding.mode_from("none", {"RINGPIPE_CPU_BIND": "core"}) == "none"
    assert cpu_binding.mode_from(None, {"RINGPIPE_CPU_BIND": " Core "}) == "core"
    assert cpu_binding.mode_from(None, {}) == "auto"
    with pytest.raises(ValueError, match=r"RINGPIPE_CPU_BIND='sockets': expected one of auto, core, none"):
        cpu_binding.mode_from(None, {"RINGPIPE_CPU_BIND": "sockets"})
    with pytest.raises(ValueError, match=r"Cluster option cpu_bind='yes' is out of range"):
        Cluster(2, cpu_bind="yes")
    assert cpu_binding.local_position({}, {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == (1, 2)
    assert cpu_binding.local_position({"local_rank": 0, "local_world_size": 3}, {"LOCAL_RANK": "1"}) == (0, 3)
    assert cpu_binding.local_position({}, {}) == (None, None)


def every_threads_cpus(comm):
    """The CPUs each thread of this worker may run on (the engine's and ZeroMQ's included)."""
    comm.barrier()  # (a channel and its thread exist by now)
    return [list(cpus) for cpus in sorted({tuple(sorted(os.sched_getaffinity(int(tid)))) for tid in os.listdir("/proc/self/task")})]


@needs_two_cores
@pytest.mark.timeout(120)
def test_two_ranks_run_on_two_cores_every_thread_included_and_other_layouts_stay_free(monkeypatch):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < (os.cpu_count() or 0):
        pytest.skip("this process may use only part of the machine: 'auto' keeps a launcher's binding")
    with Cluster(2) as cluster:
        assert cluster.run(every_threads_cpus) == [[cpu_binding.cores_for("auto", r, 2, cpus)] for r in range(2)]
    with Cluster(1) as cluster:
        assert cluster.run(every_threads_cpus) == [[cpus]]
    with Cluster(len(cpus) + 1) as cluster:  # more ranks than cores
        assert cluster.run(every_threads_cpus) == [[cpus]] * (len(cpus) + 1)
    with Cluster(2, cpu_bind="none") as cluster:
        assert cluster.run(every_threads_cpus) == [[cpus]] * 2
    with Cluster(2, env={"RINGPIPE_CPU_BIND": "none"}) as cluster:  # (the worker's host's own value)
        assert cluster.run(every_threads_cpus) == [[cpus]] * 2
    monkeypatch.setenv("RINGPIPE_CPU_BIND", "none")
    with Cluster(2) as cluster:
        assert cluster.run(every_threads_cpus) == [[cpus]] * 2
    with Cluster(2, cpu_bind="auto") as cluster:  # the option before the environment
        assert cluster.run(every_threads_cpus) == [[cpu_binding.cores_for("auto", r, 2, cpus)] for r in range(2)]


def test_a_joining_hosts_own_bad_binding_is_one_error_before_it_joins(monkeypatch, tmp_path):
    """A host that joins with `ringpipe worker` binds its workers by its own RINGPIPE_CPU_BIND (the
    driver's Cluster option aside), so it checks it before joining, as its tuning variables."""
    from tests.conftest import one_error_line, run_cli

    monkeypatch.setenv("RINGPIPE_CPU_BIND", "bogus")
    result = run_cli("worker", "--rdzv-endpoint", "127.0.0.1:9", "--nproc-per-node", 1,
                     "--key-file", tmp_path / "missing.key")
    assert "RINGPIPE_CPU_BIND='bogus': expected one of auto, core, none" in one_error_line(result)
