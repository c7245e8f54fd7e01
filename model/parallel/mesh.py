"""The device mesh: named parallel axes, and which world ranks form each axis's groups.

A mesh is a list of named axes ordered outermost to innermost, e.g.

    parallel_axes(dp=2, tp=2, pp=2) == (("pp", 2), ("dp", 2), ("tp", 2))

World ranks count through the axes like digits of a number, the innermost fastest: tensor
parallelism (whose peers are neighbouring ranks, the ones that talk most), then data parallelism,
then the pipeline outermost:

    rank = (pp_index · dp + dp_index) · tp + tp_index

A new axis (context parallel, expert parallel) is one more entry. `mesh_groups(world, axes)` is the
pure table of groups (testable and printable without processes); `Mesh(world_comm, axes)` builds
this rank's communicators from it. A mesh is made once per process and passed explicitly to
whatever needs it; there is no global one.

Besides one group per axis, a mesh with a pipeline axis "pp" of size > 1 has a "tie" group per
pipeline: its first and last stage, which hold the parameters a model family ties between its
embedding and its head (its plan's `tied_params`) and sum their gradients.
"""
from __future__ import annotations

import math

PIPELINE = "pp"  # the axis whose groups are pipelines, in stage order
TIE = "tie"


def parallel_axes(dp: int = 1, tp: int = 1, pp: int = 1) -> tuple:
    """The DP × TP × PP mesh's axes, outermost first: (("pp", pp), ("dp", dp), ("tp", tp))."""
    return (("pp", pp), ("dp", dp), ("tp", tp))


def _check_axes(world: int, axes) -> None:
    names = [name for name, _ in axes]
    if len(set(names)) != len(names) or TIE in names:
        raise ValueError(f"mesh: axis names must be distinct and not {TIE!r}, got {names}")
    for name, size in axes:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh: {name} must be an integer ≥ 1, got {size!r}")
    total = math.prod(size for _, size in axes)
    if total != world:
        product = " × ".join(f"{name}={size}" for name, size in axes)
        raise ValueError(f"mesh: {product} = {total} does not match the world size {world}")


def world_rank(indices: dict, axes) -> int:
    """The world rank at `indices` ({axis name: index}) of the mesh `axes`."""
    rank = 0
    for name, size in axes:
        rank = rank * size + indices[name]
    return rank


def coordinates(rank: int, axes) -> dict:
    """{axis name: index} of world rank `rank`, outermost axis first."""
    indices = {}
    for name, size in reversed(axes):
        rank, indices[name] = divmod(rank, size)
    return {name: indices[name] for name, _ in axes}


def mesh_groups(world: int, axes, ties: bool = True) -> dict[str, list[list[int]]]:
    """Every group of the mesh as lists of world ranks: per axis, innermost axis first, one group for
    each combination of the other axes' indices (in rank order), its members in the axis's index
    order; then, with `ties` and a pipeline axis longer than 1, "tie": [first stage, last stage] of
    every pipeline (empty otherwise)."""
    _check_axes(world, axes)
    groups = {}
    for name, size in reversed(axes):
        others = [(other, other_size) for other, other_size in axes if other != name]
        groups[name] = []
        for position in range(world // size):
            where = coordinates(position, others)
            groups[name].append([world_rank({**where, name: i}, axes) for i in range(size)])
    pipelines = groups.get(PIPELINE, [])
    groups[TIE] = [[group[0], group[-1]] for group in pipelines] if ties and pipelines and len(pipelines[0]) > 1 else []
    return groups


def format_groups(world: int, axes, ties: bool = True) -> str:
    """`mesh_groups` as text for users, one line per kind of group."""
    groups = mesh_groups(world, axes, ties)
    lines = [f"world {world} = " + " × ".join(f"{name} {size}" for name, size in reversed(axes))]
    for kind, members in groups.items():
        text = " ".join("[" + ",".join(map(str, group)) + "]" for group in members)
        lines.append(f"{kind:>9}: {text or '(none)'}")
    return "\n".join(lines)


class Mesh:
    """This rank's place in the mesh and one communicator per axis.

    mesh.axes                   (name, size) pairs, outermost first
    mesh.<axis>                 the communicator over this rank's group of that axis (group-local
                                ranks: in mesh.pp the rank is the pipeline stage index), e.g. mesh.tp
    mesh.<axis>_rank, _size     this rank's index along the axis, and its length (mesh.dp_rank, ...)
    mesh.tie                    communicator over [first, last] stage of this pipeline, on those two
                                stages only; None on middle stages, when pp == 1, and without `ties`
    Every rank of `world_comm` must build the Mesh with the same axes (groups are created
    collectively, in the same order everywhere). `Mesh(world_comm, dp=2, tp=2)` is short for
    `Mesh(world_comm, parallel_axes(dp=2, tp=2))`.
    """

    def __init__(self, world_comm, axes=None, *, dp: int = 1, tp: int = 1, pp: int = 1, ties: bool = True):
        axes = tuple(parallel_axes(dp, tp, pp) if axes is None else axes)
        _check_axes(world_comm.size, axes)
        for name, _ in axes:
            if not name.isidentifier() or hasattr(type(self), name):
                raise ValueError(f"mesh: {name!r} cannot name an axis")
        self.world, self.axes, self.rank = world_comm, axes, world_comm.rank
        self.indices = coordinates(self.rank, axes)
        self.groups = mesh_groups(world_comm.size, axes, ties)
        self.communicators = {}
        for name, size in reversed(axes):  # innermost first, as the groups
            self.communicators[name] = self._member_of(self.groups[name])
            setattr(self, name, self.communicators[name])
            setattr(self, f"{name}_rank", self.indices[name])
            setattr(self, f"{name}_size", size)
        self.tie = self._member_of(self.groups[TIE])

    def _member_of(self, groups):
        # Every rank calls new_group for every group, in the same order; only members get a communicator.
        mine = None
        for ranks in groups:
            comm = self.world.new_group(ranks)
            if comm is not None:
                mine = comm
        return mine

    def __repr__(self):
        where = ", ".join(f"{name}={self.indices[name]}/{size}" for name, size in self.axes)
        return f"Mesh(rank={self.rank}, {where})"

    # ---- pipeline questions (the "pp" axis; a single stage without one) -----------------------------
    @property
    def _stages(self) -> int:
        return dict(self.axes).get(PIPELINE, 1)

    @property
    def _stage(self) -> int:
        return self.indices.get(PIPELINE, 0)

    @property
    def is_first_stage(self) -> bool:
        return self._stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self._stage == self._stages - 1

    def stage_world_rank(self, pp_index: int) -> int:
        """World rank of pipeline stage `pp_index` in this rank's pipeline."""
        if PIPELINE not in self.indices:
            return self.rank
        return world_rank({**self.indices, PIPELINE: pp_index % self._stages}, self.axes)

    @property
    def next_pp_rank(self) -> int:
        """World rank of the next pipeline stage; the last stage's next is the first (interleaving wraps)."""
        return self.stage_world_rank(self._stage + 1)

    @property
    def prev_pp_rank(self) -> int:
        """World rank of the previous pipeline stage; the first stage's previous is the last."""
        return self.stage_world_rank(self._stage - 1)

    def coordinates(self, rank: int | None = None) -> dict:
        """{axis name: index} of world rank `rank` (this rank by default), outermost axis first."""
        rank = self.rank if rank is None else rank
        if not 0 <= rank < self.world.size:
            raise ValueError(f"mesh: rank {rank} is outside the world of {self.world.size} ranks")
        return coordinates(rank, self.axes)
