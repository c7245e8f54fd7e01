"""The DP×TP×PP device mesh: which world ranks form each tensor-, data- and pipeline-parallel group.

World ranks are laid out with tensor parallelism innermost (its peers are neighbouring ranks, the
ones that talk most), then data parallelism, then pipeline parallelism outermost:

    rank = (pp_index · dp + dp_index) · tp + tp_index

`layout(world, dp, tp, pp)` is the pure table of groups (testable and printable without
processes); `Mesh(world_comm, dp, tp, pp)` builds this rank's communicators from it. A mesh is made
once per process and passed explicitly to whatever needs it; there is no global one.
"""
from __future__ import annotations

from typing import NamedTuple


class Coordinates(NamedTuple):
    pp: int
    dp: int
    tp: int


def _check_shape(world: int, dp: int, tp: int, pp: int) -> None:
    for name, size in (("dp", dp), ("tp", tp), ("pp", pp)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh: {name} must be an integer ≥ 1, got {size!r}")
    if dp * tp * pp != world:
        raise ValueError(f"mesh: dp={dp} × tp={tp} × pp={pp} = {dp * tp * pp} does not match the world size {world}")


def world_rank(pp_index: int, dp_index: int, tp_index: int, dp: int, tp: int) -> int:
    """The world rank at mesh coordinates (pp_index, dp_index, tp_index)."""
    return (pp_index * dp + dp_index) * tp + tp_index


def coordinates(rank: int, dp: int, tp: int) -> Coordinates:
    """The (pp, dp, tp) indices of world rank `rank`."""
    outer, tp_index = divmod(rank, tp)
    pp_index, dp_index = divmod(outer, dp)
    return Coordinates(pp_index, dp_index, tp_index)


def layout(world: int, dp: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """Every group of the mesh as lists of world ranks, in a fixed order:

    "tp": one group per (pp, dp) — the tp neighbouring ranks sharing a layer's shards;
    "dp": one group per (pp, tp) — replicas of the same shard that average gradients;
    "pp": one group per (dp, tp) — the stages of one pipeline, in stage order;
    "embedding": per (dp, tp), [first stage, last stage] — they hold the tied token embedding and
                 all-reduce its gradient; empty when pp == 1 (the tie is then local).
    """
    _check_shape(world, dp, tp, pp)
    at = lambda s, d, t: world_rank(s, d, t, dp, tp)  # noqa: E731
    groups = {
        "tp": [[at(s, d, t) for t in range(tp)] for s in range(pp) for d in range(dp)],
        "dp": [[at(s, d, t) for d in range(dp)] for s in range(pp) for t in range(tp)],
        "pp": [[at(s, d, t) for s in range(pp)] for d in range(dp) for t in range(tp)],
    }
    groups["embedding"] = [[group[0], group[-1]] for group in groups["pp"]] if pp > 1 else []
    return groups


def format_layout(world: int, dp: int, tp: int, pp: int) -> str:
    """`layout` as text for users, one line per kind of group."""
    groups = layout(world, dp, tp, pp)
    lines = [f"world {world} = dp {dp} × tp {tp} × pp {pp}"]
    for kind, members in groups.items():
        text = " ".join("[" + ",".join(map(str, group)) + "]" for group in members)
        lines.append(f"{kind:>9}: {text or '(none)'}")
    return "\n".join(lines)


class Mesh:
    """This rank's place in the mesh and one communicator per dimension.

    mesh.tp, mesh.dp, mesh.pp    Communicators over this rank's groups (group-local ranks: in mesh.pp
                                 the rank is the pipeline stage index).
    mesh.embedding               Communicator over [first, last] stage of this (dp, tp) pipeline,
                                 on those two stages only; None on middle stages and when pp == 1.
    Every rank of `world_comm` must build the Mesh with the same shape (groups are created
    collectively, in the same order everywhere).
    """

    def __init__(self, world_comm, dp: int, tp: int, pp: int):
        _check_shape(world_comm.size, dp, tp, pp)
        self.world = world_comm
        self.dp_size, self.tp_size, self.pp_size = dp, tp, pp
        self.rank = world_comm.rank
        self.pp_rank, self.dp_rank, self.tp_rank = coordinates(self.rank, dp, tp)
        self.groups = layout(world_comm.size, dp, tp, pp)
        self.tp = self._member_of(self.groups["tp"])
        self.dp = self._member_of(self.groups["dp"])
        self.pp = self._member_of(self.groups["pp"])
        self.embedding = self._member_of(self.groups["embedding"])

    def _member_of(self, groups):
        # Every rank calls new_group for every group, in the same order; only members get a communicator.
        mine = None
        for ranks in groups:
            comm = self.world.new_group(ranks)
            if comm is not None:
                mine = comm
        return mine

    def __repr__(self):
        return (f"Mesh(rank={self.rank}, dp={self.dp_rank}/{self.dp_size}, tp={self.tp_rank}/{self.tp_size}, "
                f"pp={self.pp_rank}/{self.pp_size})")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_world_rank(self, pp_index: int) -> int:
        """World rank of pipeline stage `pp_index` in this rank's (dp, tp) pipeline."""
        return world_rank(pp_index % self.pp_size, self.dp_rank, self.tp_rank, self.dp_size, self.tp_size)

    @property
    def next_pp_rank(self) -> int:
        """World rank of the next pipeline stage; the last stage's next is the first (interleaving wraps)."""
        return self.stage_world_rank(self.pp_rank + 1)

    @property
    def prev_pp_rank(self) -> int:
        """World rank of the previous pipeline stage; the first stage's previous is the last."""
        return self.stage_world_rank(self.pp_rank - 1)

    def coordinates(self, rank: int | None = None) -> Coordinates:
        """(pp, dp, tp) indices of world rank `rank` (this rank by default)."""
        rank = self.rank if rank is None else rank
        if not 0 <= rank < self.world.size:
            raise ValueError(f"mesh: rank {rank} is outside the world of {self.world.size} ranks")
        return coordinates(rank, self.dp_size, self.tp_size)
