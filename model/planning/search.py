"""Every layout of a model on `nproc` ranks, predicted, refused with a reason, and ranked.

    report = plan_layouts(inventory, nproc, batch_size, machine)
    report.ranked        [(Candidate, [RankMemory per pp rank], StepTiming)], fastest first
    report.refused       [(Candidate or sizes, reason)], reasons starting "does not divide" or "does not fit"

A layout is refused with the model code's own message where a rule of the model, the schedule or
the data decides it, so the planner and `ringpipe train` refuse the same layouts for the same reason.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ringpipe.model.parallel.pipeline_parallel.schedules import split_layers
from ringpipe.model.planning.memory import Candidate, layout_memory, schedule_of
from ringpipe.model.planning.step_time import predict_step

DOES_NOT_DIVIDE, DOES_NOT_FIT = "does not divide", "does not fit"


@dataclass
class PlanReport:
    ranked: list = field(default_factory=list)
    refused: list = field(default_factory=list)
    memory_limit: float = 0.0  # bytes one rank may hold
    needs: list = field(default_factory=list)  # (bytes the most-loaded rank needs, candidate) of each too big

    def refusal_counts(self) -> Counter:
        return Counter(reason.split(":")[0] for _, reason in self.refused)

    def smallest_need(self):
        """(bytes, candidate) of the refused-for-memory layout that needs the least per rank."""
        return min(self.needs, key=lambda item: item[0]) if self.needs else None


def factorizations(nproc: int) -> list[tuple[int, int, int]]:
    """(dp, tp, pp) with dp · tp · pp = nproc."""
    return [(nproc // (tp * pp), tp, pp) for tp in range(1, nproc + 1) if nproc % tp == 0
            for pp in range(1, nproc // tp + 1) if (nproc // tp) % pp == 0]


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidates(inventory, nproc: int, batch_size: int, max_microbatches: int = 64, mixed: bool = False):
    """Yield (Candidate, None) for each layout to weigh, or (Candidate-like, reason) for one refused
    because a size does not divide."""
    config = inventory.config
    for dp, tp, pp in factorizations(nproc):
        sizes = Candidate(dp, tp, pp, microbatches=0)  # refused on its sizes alone
        if batch_size % dp:
            yield sizes, f"{DOES_NOT_DIVIDE}: global batch {batch_size} is not divisible by dp {dp}"
            continue
        try:
            if tp > 1:
                inventory.plan.check_tensor_parallel(tp, 0, False)
            split_layers(config.n_layer, pp)
        except ValueError as exc:
            yield sizes, f"{DOES_NOT_DIVIDE}: {exc}"
            continue
        # pp = 1: one micro-batch (more only trade time for memory; recompute is that knob here);
        # pp > 1: pp, 2·pp or 4·pp micro-batches (fewer leave stages idle; beyond 4·pp the bubble
        # is under a fifth and each micro-batch only gets thinner)
        rows = batch_size // dp
        microbatches = [1] if pp == 1 else [m for m in (pp, 2 * pp, 4 * pp) if m <= min(rows, max_microbatches)
                                            and rows % m == 0]
        schedules = [("1f1b", 1)] if pp == 1 else [("1f1b", 1), ("gpipe", 1), ("zb-h1", 1)] + [
            ("interleaved", v) for v in (2, 4) if config.n_layer >= pp * v]
        for schedule, v in schedules:
            for m in microbatches:
                try:
                    schedule_of(schedule, pp, m, v)
                except ValueError as exc:
                    yield Candidate(dp, tp, pp, schedule, v, m), f"{DOES_NOT_DIVIDE}: {exc}"
                    continue
                for zero in ((0, 1) if dp > 1 and not mixed else (0,)):
                    for sp in ((False, True) if tp > 1 else (False,)):
                        if sp:
                            try:  # the family's own rule (GPT-2: block_size divisible by tp; T5: none)
                                inventory.plan.check_tensor_parallel(tp, 0, True)
                            except ValueError as exc:
                                yield Candidate(dp, tp, pp, schedule, v, m, zero, sp), f"{DOES_NOT_DIVIDE}: {exc}"
                                continue
                        for recompute in (False, True) if getattr(inventory, "recompute", True) else (False,):
                            yield Candidate(dp, tp, pp, schedule, v, m, zero, sp, recompute), None


def plan_layouts(inventory, nproc: int, batch_size: int, machine, hosts: int = 1,
                 max_microbatches: int = 64) -> PlanReport:
    """Predict every layout of `nproc` ranks on `hosts` hosts of `machine`; keep those whose
    most-loaded rank fits, fastest first (ties: less memory). ValueError when the ranks cannot be
    placed (more per host than a GPU machine has devices)."""
    ranks_per_host = -(-nproc // hosts)
    if machine.kind == "gpu" and ranks_per_host > machine.devices_per_host:
        raise ValueError(f"--nproc {nproc} on {hosts} host(s) puts {ranks_per_host} ranks on a host of "
                         f"{machine.devices_per_host} devices ({machine.name}); add --hosts")
    limit = machine.memory_bytes / ranks_per_host if machine.kind == "cpu" else machine.memory_bytes
    report = PlanReport(memory_limit=limit)
    mixed = inventory.config.dtype == "float16"
    for candidate, reason in candidates(inventory, nproc, batch_size, max_microbatches, mixed):
        if reason is not None:
            report.refused.append((candidate, reason))
            continue
        memory = layout_memory(inventory, candidate, batch_size, shared_memory_arena=machine.kind == "cpu")
        # a GPU holds what training needs; a CPU rank's process also the trainer's building
        need = (lambda m: m.peak) if machine.kind == "cpu" else (lambda m: m.total)
        worst = max(memory, key=need)
        if need(worst) > limit:
            report.needs.append((need(worst), candidate))
            report.refused.append((candidate, f"{DOES_NOT_FIT}: pp rank {worst.pp_rank} needs {need(worst)} bytes "
                                              f"> {int(limit)} per rank"))
            continue
        timing = predict_step(inventory, candidate, batch_size, machine, ranks_per_host)
        report.ranked.append((candidate, memory, timing))
    report.ranked.sort(key=lambda item: (item[2].seconds, max(m.total for m in item[1])))
    return report
