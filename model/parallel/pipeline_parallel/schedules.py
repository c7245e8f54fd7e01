"""Pipeline schedules as data: pure functions from (name, p, m, v) to per-rank lists of actions.

`build_schedule(name, num_ranks, num_microbatches, virtual_stages)` returns `schedule`, a list
with one entry per pipeline rank; `schedule[r]` is the ordered list of `Action`s rank `r` performs
in ONE training step. Nothing here runs a model or talks to a network: an executor interprets the
lists, and `model.parallel.pipeline_parallel.simulator` checks and times them without a model.

Stages and ranks
    There are `num_stages = p * v` model stages 0..p·v−1 (stage 0 consumes the micro-batch input,
    stage p·v−1 computes the loss). Stage `s` lives on pipeline rank `s % p` (Megatron interleaving:
    rank r holds chunks r, r+p, r+2p, …; chunk index on the rank is `s // p`). With v = 1 stage s is
    simply rank s. Layers are split over stages with `split_layers`.

Action fields (`Action(kind, microbatch, stage, peer)`)
    kind        one of `Kind` (below).
    microbatch  0..m−1 for everything except OPTIMIZER_STEP (None).
    stage       the model stage ON THIS RANK the action is about (None for OPTIMIZER_STEP):
                  FORWARD / BACKWARD / BACKWARD_INPUT / BACKWARD_WEIGHT: the stage computed;
                  SEND_ACTIVATION: stage s sends its output to stage s+1;
                  RECV_ACTIVATION: stage s receives its input from stage s−1;
                  SEND_GRAD: stage s sends the gradient of its input to stage s−1;
                  RECV_GRAD: stage s receives the gradient of its output from stage s+1.
    peer        pipeline rank (index in the pipeline communicator, not a world rank) on the other
                end of a send/receive; None for compute actions.

Kinds
    FORWARD          forward of (microbatch, stage); keeps its activations until its backward.
    BACKWARD         full backward (input and weight gradients at once).
    BACKWARD_INPUT   "B" of zero-bubble schedules: input gradient only; frees what only it needs.
    BACKWARD_WEIGHT  "W": weight gradient of a stage whose BACKWARD_INPUT already ran.
    SEND_*/RECV_*    point-to-point transfers, see the contract below.
    OPTIMIZER_STEP   the last action of every rank, after all its weight gradients.

Send/receive contract (what the executor may rely on, and what `simulator` proves)
    * Sends are asynchronous: start an `isend` and keep going; wait for all outstanding send
      handles at the latest before OPTIMIZER_STEP returns. Never block on a send in list order.
    * Receives block: at a RECV_* action the executor must have the payload before the next action.
      It may post the `irecv` earlier (prefetch) but must wait in list order.
    * Every send has exactly one matching receive on the peer: SEND_ACTIVATION(mb, s) matches
      RECV_ACTIVATION(mb, s+1); SEND_GRAD(mb, s) matches RECV_GRAD(mb, s−1). Both ends compute the
      same `message_tag(action, m)`, unique within a step, so messages never need to arrive in order.
      Tags repeat from step to step; the runtime queues messages per (source, tag) in FIFO order, so
      a step's message is never taken for the previous step's.
    * A receive is placed immediately before the compute that consumes it, a send immediately after
      the compute that produces it. With asynchronous sends no list can then deadlock as long as
      the compute order respects the data flow — the simulator checks exactly that.
    * When two consecutive stages live on the same rank (only with p = 1) no send/receive is
      emitted: the executor hands the tensor over locally.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")


class Kind(str, Enum):
    FORWARD = "F"
    BACKWARD = "B"  # full backward
    BACKWARD_INPUT = "I"  # zero-bubble "B": input gradient only
    BACKWARD_WEIGHT = "W"
    SEND_ACTIVATION = "send_act"
    RECV_ACTIVATION = "recv_act"
    SEND_GRAD = "send_grad"
    RECV_GRAD = "recv_grad"
    OPTIMIZER_STEP = "step"

    def __str__(self):
        return self.value


COMPUTE = frozenset({Kind.FORWARD, Kind.BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT})
SENDS = frozenset({Kind.SEND_ACTIVATION, Kind.SEND_GRAD})
RECEIVES = frozenset({Kind.RECV_ACTIVATION, Kind.RECV_GRAD})


@dataclass(frozen=True)
class Action:
    """One step of one rank; see the module docstring for what each field means per kind."""

    kind: Kind
    microbatch: int | None = None
    stage: int | None = None
    peer: int | None = None

    def __str__(self):
        if self.kind is Kind.OPTIMIZER_STEP:
            return "step"
        where = f"{self.kind}{self.microbatch}@s{self.stage}"
        if self.peer is None:
            return where
        return f"{where}->r{self.peer}" if self.kind in SENDS else f"{where}<-r{self.peer}"

    @property
    def channel(self) -> tuple[str, int, int]:
        """(direction, microbatch, boundary) shared by a send and its receive; boundary b is the
        edge between stages b and b+1. Only for SEND_*/RECV_* actions."""
        if self.kind is Kind.SEND_ACTIVATION:
            return ("activation", self.microbatch, self.stage)
        if self.kind is Kind.RECV_ACTIVATION:
            return ("activation", self.microbatch, self.stage - 1)
        if self.kind is Kind.SEND_GRAD:
            return ("grad", self.microbatch, self.stage - 1)
        if self.kind is Kind.RECV_GRAD:
            return ("grad", self.microbatch, self.stage)
        raise ValueError(f"channel: {self.kind.name} is not a send or receive")


def message_tag(action: Action, num_microbatches: int) -> int:
    """A tag for a send/receive, equal on both ends and unique among the messages of one step."""
    direction, microbatch, boundary = action.channel
    return 2 * (boundary * num_microbatches + microbatch) + (direction == "grad")


def stage_rank(stage: int, num_ranks: int) -> int:
    """The pipeline rank holding `stage` (Megatron interleaving: stage s on rank s % p)."""
    return stage % num_ranks


def split_layers(n_layer: int, num_stages: int, explicit=None, layer_sizes=None, first_size: int = 0,
                 last_size: int = 0) -> list[range]:
    """Transformer blocks per stage as ranges of block indices, covering 0..n_layer−1 in order.

    `explicit` is a list of block counts, one per stage, each ≥ 1, summing to n_layer. Otherwise,
    with `layer_sizes` (one integer per block, e.g. its parameter bytes): balanced by size, the
    contiguous split whose largest stage — its blocks, plus `first_size` on the first stage (the
    embedding) and `last_size` on the last (the head) — is smallest; among those the most even
    (least sum of squared stage sizes), then the one with more blocks early. Without sizes: balanced by count, every stage gets
    n_layer // num_stages blocks and the first n_layer % num_stages stages one more.
    """
    if num_stages < 1:
        raise ValueError(f"pipeline split: num_stages must be ≥ 1, got {num_stages}")
    if n_layer < num_stages:
        raise ValueError(f"pipeline split: {n_layer} layers cannot fill {num_stages} stages "
                         f"(every stage needs at least one layer)")
    if explicit is not None:
        counts = [int(c) for c in explicit]
        if len(counts) != num_stages or sum(counts) != n_layer or min(counts) < 1:
            raise ValueError(f"pipeline split: explicit split {list(explicit)} must have {num_stages} entries, "
                             f"each ≥ 1, summing to n_layer={n_layer}")
    elif layer_sizes is not None:
        if len(layer_sizes) != n_layer:
            raise ValueError(f"pipeline split: {len(layer_sizes)} layer sizes for {n_layer} layers")
        counts = _balanced_by_size([int(size) for size in layer_sizes], num_stages, int(first_size), int(last_size))
    else:
        base, extra = divmod(n_layer, num_stages)
        counts = [base + (stage < extra) for stage in range(num_stages)]
    starts = [sum(counts[:i]) for i in range(num_stages)]
    return [range(start, start + count) for start, count in zip(starts, counts)]


def _balanced_by_size(sizes: list[int], num_stages: int, first: int, last: int) -> list[int]:
    """Block counts minimising the largest stage size (see `split_layers`); exact on integers."""
    n, S = len(sizes), num_stages
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)

    def cost(stage, i, j):  # stage `stage` holding blocks i..j−1
        return prefix[j] - prefix[i] + (first if stage == 0 else 0) + (last if stage == S - 1 else 0)

    def ends(stage, i):  # where a stage starting at block i may end, leaving a block for each later stage
        return range(i + 1, n - (S - 1 - stage) + 1)

    # best[stage][i]: the smallest largest-stage size of blocks i.. on stages stage..S−1
    best = [[None] * (n + 1) for _ in range(S + 1)]
    best[S][n] = 0
    for stage in range(S - 1, -1, -1):
        for i in range(stage, n - (S - 1 - stage)):
            best[stage][i] = min(max(cost(stage, i, j), best[stage + 1][j]) for j in ends(stage, i)
                                 if best[stage + 1][j] is not None)
    # Among the splits reaching that size, the most even one (least sum of squared stage sizes).
    target = best[0][0]
    even = [[None] * (n + 1) for _ in range(S + 1)]
    even[S][n] = 0
    for stage in range(S - 1, -1, -1):
        for i in range(stage, n - (S - 1 - stage)):
            options = [cost(stage, i, j) ** 2 + even[stage + 1][j] for j in ends(stage, i)
                       if even[stage + 1][j] is not None and cost(stage, i, j) <= target]
            even[stage][i] = min(options, default=None)
    counts, i = [], 0
    for stage in range(S):
        j = max(j for j in ends(stage, i) if even[stage + 1][j] is not None and cost(stage, i, j) <= target
                and cost(stage, i, j) ** 2 + even[stage + 1][j] == even[stage][i])
        counts.append(j - i)
        i = j
    return counts


# ---- compute orders: (kind, microbatch, stage) per rank, no communication yet --------------------

def _gpipe(p, m, rank):
    return [(Kind.FORWARD, mb, rank) for mb in range(m)] + [(Kind.BACKWARD, mb, rank) for mb in range(m)]


def _one_f_one_b(p, m, rank):
    warmup = min(p - rank - 1, m)
    order = [(Kind.FORWARD, mb, rank) for mb in range(warmup)]
    for i in range(m - warmup):  # steady state: the backward of the oldest in-flight micro-batch
        order += [(Kind.FORWARD, warmup + i, rank), (Kind.BACKWARD, i, rank)]
    return order + [(Kind.BACKWARD, mb, rank) for mb in range(m - warmup, m)]


def _interleaved(p, m, v, rank):
    # Megatron's order over the m·v "virtual micro-batches" of a rank: groups of p micro-batches go
    # through chunk 0, then the same p through chunk 1, …; backwards walk the chunks in reverse.
    total = m * v

    def microbatch(k):
        return (k // (p * v)) * p + k % p

    def chunk(k, forward):
        c = (k % (p * v)) // p
        return c if forward else v - 1 - c

    def item(kind, k):
        return (kind, microbatch(k), chunk(k, kind is Kind.FORWARD) * p + rank)

    warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
    order = [item(Kind.FORWARD, k) for k in range(warmup)]
    for i in range(total - warmup):
        order += [item(Kind.FORWARD, warmup + i), item(Kind.BACKWARD, i)]
    return order + [item(Kind.BACKWARD, k) for k in range(total - warmup, total)]


def _zero_bubble_h1(p, m, rank):
    # 1F1B with the backward split into B (input grad, on the critical path) and W (weight grad).
    # Same F/B order as 1F1B, so the same activations in flight. Deferring W lets B race upstream,
    # which shortens the first rank's wait for its first gradient. Rank r holds back r W passes (the
    # last rank, with the fewest activations in flight, holds back the most); the backlog then
    # fills the cool-down, where 1F1B waits for gradients from downstream.
    warmup = min(p - rank - 1, m)
    delay = rank
    order = [(Kind.FORWARD, mb, rank) for mb in range(warmup)]
    weights = []  # micro-batches whose W is still owed
    for i in range(m):
        if warmup + i < m:
            order.append((Kind.FORWARD, warmup + i, rank))
        order.append((Kind.BACKWARD_INPUT, i, rank))
        weights.append(i)
        if len(weights) > delay:
            order.append((Kind.BACKWARD_WEIGHT, weights.pop(0), rank))
    return order + [(Kind.BACKWARD_WEIGHT, mb, rank) for mb in weights]


# ---- communication ---------------------------------------------------------------------------------

def _with_communication(compute_order, rank, p, num_stages):
    """Wrap each compute with the receive it consumes and the send it produces, then step."""
    actions = []
    for kind, mb, stage in compute_order:
        before, after = [], []
        if kind is Kind.FORWARD:
            if stage > 0 and stage_rank(stage - 1, p) != rank:
                before.append(Action(Kind.RECV_ACTIVATION, mb, stage, stage_rank(stage - 1, p)))
            if stage < num_stages - 1 and stage_rank(stage + 1, p) != rank:
                after.append(Action(Kind.SEND_ACTIVATION, mb, stage, stage_rank(stage + 1, p)))
        elif kind in (Kind.BACKWARD, Kind.BACKWARD_INPUT):
            if stage < num_stages - 1 and stage_rank(stage + 1, p) != rank:
                before.append(Action(Kind.RECV_GRAD, mb, stage, stage_rank(stage + 1, p)))
            if stage > 0 and stage_rank(stage - 1, p) != rank:
                after.append(Action(Kind.SEND_GRAD, mb, stage, stage_rank(stage - 1, p)))
        actions += before + [Action(kind, mb, stage)] + after
    return actions + [Action(Kind.OPTIMIZER_STEP)]


def build_schedule(name: str, num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> list[list[Action]]:
    """Per pipeline rank, the ordered actions of one training step (see the module docstring).

    name: "gpipe" (all forwards, then all backwards), "1f1b" (PipeDream-flush / Megatron
    non-interleaved), "interleaved" (Megatron interleaved 1F1B with `virtual_stages` chunks per
    rank; needs num_microbatches % num_ranks == 0 when virtual_stages > 1, as Megatron's
    interleaved schedule does; with virtual_stages == 1 it is 1F1B), "zb-h1" (zero-bubble H1).
    """
    p, m, v = num_ranks, num_microbatches, virtual_stages
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    for label, value in (("num_ranks", p), ("num_microbatches", m), ("virtual_stages", v)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {label} must be an integer ≥ 1, got {value!r}")
    if v > 1 and name != "interleaved":
        raise ValueError(f"{name}: virtual_stages={v} needs the 'interleaved' schedule (only it runs >1 stage per rank)")
    if name == "interleaved" and v > 1 and m % p:
        raise ValueError(f"interleaved: num_microbatches={m} must be a multiple of num_ranks={p} "
                         f"with virtual_stages={v} (micro-batches go through each chunk in groups of {p})")
    schedule = []
    for rank in range(p):
        if name == "gpipe":
            order = _gpipe(p, m, rank)
        elif name == "1f1b" or (name == "interleaved" and v == 1):
            order = _one_f_one_b(p, m, rank)
        elif name == "interleaved":
            order = _interleaved(p, m, v, rank)
        else:
            order = _zero_bubble_h1(p, m, rank)
        schedule.append(_with_communication(order, rank, p, p * v))
    return schedule


def build_forward_schedule(num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> list[list[Action]]:
    """Per pipeline rank, the actions of one forward-only pass (evaluation): FORWARD with its
    receive and send, no backward and no OPTIMIZER_STEP. Every micro-batch goes through a rank's
    first chunk, then all through its next one (as GPipe's forward half), so a rank never waits on
    a micro-batch it could have started; nothing is kept for a backward that never comes."""
    p, m, v = num_ranks, num_microbatches, virtual_stages
    for label, value in (("num_ranks", p), ("num_microbatches", m), ("virtual_stages", v)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"forward schedule: {label} must be an integer ≥ 1, got {value!r}")
    return [_with_communication([(Kind.FORWARD, mb, chunk * p + rank) for chunk in range(v) for mb in range(m)],
                                rank, p, p * v)[:-1] for rank in range(p)]
