"""Members that call new_group with different lists get a timeout that names both lists."""
import numpy as np
import pytest

from ringpipe.runtime import Cluster, RemoteError


def groups_whose_members_disagree(comm):
    group = comm.new_group([0, 1] if comm.rank < 2 else [0, 2])
    if group is not None:
        group.all_reduce(np.ones(10, np.float32), timeout=2)
    return group is None


@pytest.mark.timeout(60)
def test_a_group_whose_members_disagree_times_out_naming_both_member_lists():
    # A cluster of its own: afterwards its ranks number their next groups of [0, 2] differently
    # (rank 0 never made one), which would fail a pooled cluster's later tests.
    with Cluster(4) as cluster, pytest.raises(RemoteError) as raised:
        cluster.run(groups_whose_members_disagree)
    assert ("the members disagree: rank 2 made this group with new_group over world ranks [0, 2] of group w, "
            "rank 0 over [0, 1]") in str(raised.value)
