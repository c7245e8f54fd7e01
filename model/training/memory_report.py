"""What one rank of a parallel run holds, by kind, next to what the kernel says it holds.

    memory_report(trainer) -> {"rank", "weights", "gradients", "optimizer", "activations",
                               "activations_peak", "communication", "peak_rss", "rss", "traced"}   (bytes)

weights / gradients: this rank's flat parameter and gradient buffers (its tp shards of its pipeline
stages; a mixed run adds the float32 master copies); optimizer: AdamW moments of what this rank
updates (none for a tied weight on the last pipeline stage; ZeRO-1: this rank's 1/dp, and the
weight-decay rates of that shard); activations: bytes cached for backward now, and their peak since the rank started (the stages'
`ActivationMemory`); communication: the private buffers of this process's same-host group channels
(their scratch and state, up to ~1 MiB a group, as allocated: the scratch becomes resident as large
collectives use it; the shared arena is not counted). peak_rss / rss: the process's VmHWM / VmRSS, which include Python, NumPy and
temporaries: the accounting above must stay below them, and near them for a large model. traced:
tracemalloc's (current, peak) when the worker traces (tests), else None.
"""
from __future__ import annotations

from ringpipe.runtime.process_memory import peak_rss_bytes, rss_bytes, traced_bytes, transport_bytes


def memory_report(trainer) -> dict:
    gradients = trainer.gradients
    weights, grads = gradients.flat_params.nbytes, gradients.flat_grads.nbytes
    if trainer.master is not None:
        weights += trainer._master_flat.nbytes
        grads += trainer._master_grads_flat.nbytes
    optimizer = trainer.optimizer_state_bytes()
    if trainer.layout.zero:  # this rank's 1/dp of the flat buffers, twice more:
        # the averaged gradient shards the reduce-scatter returns (kept until the next step)
        grads += sum(s.stop - s.start for s in trainer.optimizer.shards) * gradients.flat_grads.itemsize
        optimizer += sum(rates.nbytes for rates in trainer.optimizer.decay)  # AdamW's per-element weight decay
    stages = trainer.stages.values()
    return {"rank": trainer.mesh.rank, "coordinates": dict(trainer.mesh.indices), "weights": int(weights),
            "gradients": int(grads), "optimizer": int(optimizer),
            "activations": int(sum(s.memory.live_bytes for s in stages)),
            "activations_peak": int(sum(s.memory.peak_bytes for s in stages)),
            "communication": transport_bytes(trainer.mesh.world),
            "peak_rss": peak_rss_bytes(), "rss": rss_bytes(), "traced": traced_bytes()}
