"""Which host runs which rank, and how hostfiles and Slurm node lists are read."""
import pytest

from ringpipe.cluster.hostfile import HostfileError, expand_nodelist, parse_hostfile
from ringpipe.cluster.launchers import rank_from_environment, spmd_endpoint
from ringpipe.runtime.placement import PlacementError, describe_placement, place_ranks
from tests.conftest import one_error_line, run_cli


def test_tensor_parallel_groups_stay_inside_a_host_when_the_slots_allow():
    # 3 slots, then 4, then 2: a group of 2 never straddles the first host's odd slot.
    hosts = place_ranks([3, 4, 2], world_size=8, tp=2)
    groups = [set(hosts[g * 2:(g + 1) * 2]) for g in range(4)]
    assert all(len(group) == 1 for group in groups) and hosts.count(0) == 2


def test_ranks_fill_hosts_in_order_without_tensor_parallelism():
    assert place_ranks([2, 2, 2], world_size=5) == [0, 0, 1, 1, 2]


def test_a_group_spans_hosts_only_when_no_host_has_room_for_it_whole():
    hosts = place_ranks([3, 3], world_size=6, tp=2)
    assert sorted(hosts) == [0, 0, 0, 1, 1, 1]
    assert "1 span hosts" in describe_placement(hosts, ["a", "b"], tp=2)[-1]


def test_too_few_slots_is_an_error_naming_both_counts():
    with pytest.raises(PlacementError, match="3 slots.*4 workers"):
        place_ranks([1, 2], world_size=4)


def test_the_placement_names_each_hosts_ranks():
    assert describe_placement([1, 1, 0, 0], ["b", "a"], tp=2) == [
        "  a: ranks 0-1", "  b: ranks 2-3", "  tensor-parallel groups of 2: all inside one host"]


def test_a_hostfile_has_hosts_slots_and_comments():
    text = "# cluster\nnode1 slots=4\n\nnode2   slots = 2  # the small one\nnode3\nnode1 slots=1\n"
    assert parse_hostfile(text) == [("node1", 5), ("node2", 2), ("node3", 1)]


@pytest.mark.parametrize("text", ["node1 slots=0", "node1 cpus=2", "# nothing\n"])
def test_a_bad_hostfile_line_is_named(text):
    with pytest.raises(HostfileError, match="hosts.txt"):
        parse_hostfile(text, "hosts.txt")


@pytest.mark.parametrize("text,named", [("node1 slots=2\nnode2 cpus=2\n", ":2: 'node2 cpus=2'"),
                                        ("node1 slots=1\n", "1 slots on 1 hosts, too few for dp × tp × pp = 2")])
def test_a_hostfile_that_cannot_hold_the_run_is_the_only_output_before_anything_is_tokenized(corpus, tmp_path,
                                                                                            text, named):
    hosts = tmp_path / "hosts"
    hosts.write_text(text)
    result = run_cli("train", "--data", corpus, "--out", tmp_path / "run", "--dp", "2", "--hostfile", hosts)
    assert named in one_error_line(result) and "--hostfile" in one_error_line(result)
    assert "tokenizing" not in result.output and not (tmp_path / "run").exists()


def test_a_malformed_rendezvous_endpoint_is_the_only_output(corpus, tmp_path):
    result = run_cli("train", "--data", corpus, "--out", tmp_path / "run", "--dp", "2",
                     "--rdzv-endpoint", "[::1]:99999")
    assert "--rdzv-endpoint" in one_error_line(result) and "1..65535" in one_error_line(result)
    assert "tokenizing" not in result.output


def test_slurm_node_lists_expand_with_their_padding():
    assert expand_nodelist("node[01-04,07],gpu1") == ["node01", "node02", "node03", "node04", "node07", "gpu1"]
    assert expand_nodelist("r[1-2]n[08-10]") == ["r1n08", "r1n09", "r1n10", "r2n08", "r2n09", "r2n10"]
    assert expand_nodelist("a,b[9-11]-ib") == ["a", "b9-ib", "b10-ib", "b11-ib"]


@pytest.mark.parametrize("nodelist", ["node[01-", "node]1", "node[3-1]", "node[a]", "a,,b", ""])
def test_a_malformed_slurm_node_list_is_named(nodelist):
    with pytest.raises(HostfileError, match="bad Slurm node list"):
        expand_nodelist(nodelist)


@pytest.mark.parametrize("environ,expected", [
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, (3, 4, 1, "mpi")),
    ({"PMI_RANK": "2", "PMI_SIZE": "4"}, (2, 4, 0, "mpi")),
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1"}, (5, 8, 1, "slurm")),
    ({}, None)])
def test_ranks_come_from_mpirun_or_srun(environ, expected):
    assert rank_from_environment(environ) == expected


def test_under_srun_rank_0_listens_on_the_steps_first_node():
    assert spmd_endpoint("slurm", None, {"SLURM_STEP_NODELIST": "node[07-09]"}) == "node07:29500"
    assert spmd_endpoint("mpi", None, {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}) == "10.0.0.1:1234"
