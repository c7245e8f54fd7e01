"""The mesh: named axes, tp innermost, then dp, then pp; one communicator per axis per rank."""
import numpy as np
import pytest

from ringpipe.model.parallel.mesh import Mesh, coordinates, format_groups, mesh_groups, parallel_axes


def groups_of(world, dp, tp, pp):
    return mesh_groups(world, parallel_axes(dp=dp, tp=tp, pp=pp))


def test_groups_of_dp2_tp2_pp2_on_8_ranks():
    assert groups_of(8, dp=2, tp=2, pp=2) == {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
        "tie": [[0, 4], [1, 5], [2, 6], [3, 7]],
    }


def test_groups_of_tp2_pp4_put_the_tie_group_on_first_and_last_stage():
    groups = groups_of(8, dp=1, tp=2, pp=4)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[r] for r in range(8)]
    assert groups["pp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert groups["tie"] == [[0, 6], [1, 7]]


def test_groups_without_pipeline_have_no_tie_group():
    groups = groups_of(6, dp=3, tp=2, pp=1)
    assert groups["dp"] == [[0, 2, 4], [1, 3, 5]]
    assert groups["tie"] == []


def test_every_dimension_partitions_the_world():
    for dp, tp, pp in [(2, 3, 2), (1, 1, 5), (4, 1, 3)]:
        world = dp * tp * pp
        for kind in ("tp", "dp", "pp"):
            members = sorted(r for group in groups_of(world, dp, tp, pp)[kind] for r in group)
            assert members == list(range(world))


def test_coordinates_invert_the_rank_formula():
    dp, tp, pp = 3, 2, 2
    axes = parallel_axes(dp=dp, tp=tp, pp=pp)
    for rank in range(dp * tp * pp):
        s, d, t = coordinates(rank, axes).values()
        assert rank == (s * dp + d) * tp + t
    assert coordinates(7, axes) == {"pp": 1, "dp": 0, "tp": 1}


def test_bad_product_names_the_values():
    with pytest.raises(ValueError, match=r"pp=3 × dp=2 × tp=2 = 12 does not match the world size 8"):
        groups_of(8, dp=2, tp=2, pp=3)
    with pytest.raises(ValueError, match=r"tp must be an integer ≥ 1, got 0"):
        groups_of(8, dp=8, tp=0, pp=1)


def test_format_groups_prints_one_line_per_group_kind():
    assert format_groups(4, parallel_axes(dp=1, tp=2, pp=2)).splitlines() == [
        "world 4 = tp 2 × dp 1 × pp 2",
        "       tp: [0,1] [2,3]",
        "       dp: [0] [1] [2] [3]",
        "       pp: [0,2] [1,3]",
        "      tie: [0,2] [1,3]",
    ]


def test_a_new_axis_is_one_entry_and_keeps_the_others_in_rank_order():
    axes = (("pp", 2), ("dp", 1), ("cp", 2), ("tp", 2))  # a context-parallel axis between dp and tp
    groups = mesh_groups(8, axes)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert coordinates(7, axes) == {"pp": 1, "dp": 0, "cp": 1, "tp": 1}


# ---- with processes ----------------------------------------------------------------------------------

def members_of_each_group(comm, dp, tp, pp):
    """Build the mesh, then find each group's world ranks by all-reducing one-hot vectors in it."""
    mesh = Mesh(comm, dp=dp, tp=tp, pp=pp)
    found = {}
    for kind in ("tp", "dp", "pp", "tie"):
        group = getattr(mesh, kind)
        if group is None:
            found[kind] = None
            continue
        one_hot = np.zeros(comm.size, np.int64)
        one_hot[comm.rank] = 1
        group.all_reduce(one_hot)
        found[kind] = np.flatnonzero(one_hot).tolist()
    found["questions"] = [mesh.pp_rank, mesh.is_first_stage, mesh.is_last_stage, mesh.prev_pp_rank,
                          mesh.next_pp_rank, list(mesh.coordinates().values()), mesh.pp.rank]
    return found


@pytest.mark.parametrize("dp, tp, pp", [(1, 2, 2), (2, 1, 2)])
def test_mesh_communicators_contain_the_group_ranks(local_cluster, dp, tp, pp):
    results = local_cluster(4).run(members_of_each_group, dp, tp, pp)
    groups = groups_of(4, dp, tp, pp)
    for rank, found in enumerate(results):
        for kind in ("tp", "dp", "pp"):
            assert found[kind] == next(g for g in groups[kind] if rank in g)
        assert found["tie"] == next(g for g in groups["tie"] if rank in g)
        stage, first, last, prev, following, coords, pp_rank = found["questions"]
        assert coords == list(coordinates(rank, parallel_axes(dp, tp, pp)).values()) and coords[0] == stage == pp_rank
        assert (first, last) == (stage == 0, stage == pp - 1)
        pipeline = next(g for g in groups["pp"] if rank in g)
        assert (prev, following) == (pipeline[stage - 1], pipeline[(stage + 1) % pp])


def middle_stage_tie(comm):
    mesh = Mesh(comm, dp=1, tp=1, pp=3)
    return [mesh.tie is None, mesh.is_first_stage, mesh.is_last_stage]


def test_middle_stages_have_no_tie_group(local_cluster):
    assert local_cluster(3).run(middle_stage_tie) == [[False, True, False], [True, False, False],
                                                            [False, False, True]]


def mesh_with_bad_shape(comm):
    try:
        Mesh(comm, dp=2, tp=2, pp=2)
    except ValueError as error:
        return str(error)


def test_mesh_rejects_a_shape_that_does_not_match_the_world(local_cluster):
    messages = local_cluster(4).run(mesh_with_bad_shape)
    assert messages == ["mesh: pp=2 × dp=2 × tp=2 = 8 does not match the world size 4"] * 4
