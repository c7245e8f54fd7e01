"""The pipeline executor: interprets one rank's action list (see schedules.py) for one step.

It knows nothing about which schedule it runs: forward, backward (full, input-only, weight-only),
sends and receives are done exactly in list order. Sends are asynchronous and waited for before
the step ends; receives block. Activations are freed as soon as their backward has run, and the
number of micro-batches in flight (forwards whose input-backward has not run) is measured.

Each stage's last backward_input and last backward_weight of the step get `last=True`, so the
stage can report gradients that are final (data-parallel buckets start reducing them at once).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ringpipe.model.parallel.pipeline_parallel.schedules import Kind, message_tag


@dataclass
class PipelineStepResult:
    losses: dict = field(default_factory=dict)  # microbatch -> loss (last stage only)
    peak_in_flight: dict = field(default_factory=dict)  # stage -> peak micro-batches in flight
    peak_activation_bytes: int = 0


def run_pipeline_step(actions, stages: dict, pp_comm, num_microbatches: int, num_stages: int, inputs=None,
                      targets=None, dloss: float = 1.0, dropout_seeds=None, tracer=None, step: int = 0,
                      forward_only: bool = False):
    """Run one rank's `actions`.

    stages: stage index -> stage object (see stage.py) for the stages on this rank.
    inputs / targets: microbatch -> token ids, needed on the ranks holding the first / last stage.
    dloss: d(total loss)/d(microbatch loss), e.g. 1/(microbatches × data-parallel size).
    forward_only: evaluation (`build_forward_schedule`'s actions): no activations are kept, the
    last stage's losses are the result.
    """
    result = PipelineStepResult()
    outputs, caches, deferred, received, input_grads = {}, {}, {}, {}, {}
    in_flight = {s: 0 for s in stages}
    result.peak_in_flight = dict(in_flight)
    sends = []
    last = num_stages - 1
    last_input, last_weight = _last_backward_indices(actions)

    def span(name, action):
        if tracer is None or not tracer.enabled:
            return _NULL
        # An evaluation's spans name its batch, not a training step: the trace summary measures steps
        # (and their bubble) from the spans that carry "step".
        where = {"eval_batch": step} if forward_only else {"step": step}
        return tracer.span(name, microbatch=action.microbatch, stage=action.stage, **where)

    # Every receive is posted up front (tags are unique within a step): a message that arrives
    # before its RECV action is then already in place, with no round trip to the engine thread.
    # Posted receives may wait through much of the step, so they get a longer deadline than one
    # blocking call: still an error, not a hang, if a peer never sends.
    patience = pp_comm.timeout * 10
    posted = {action: pp_comm.irecv(action.peer, tag=message_tag(action, num_microbatches), timeout=patience)
              for action in actions if action.kind in (Kind.RECV_ACTIVATION, Kind.RECV_GRAD)}
    for index, action in enumerate(actions):
        kind, mb, s = action.kind, action.microbatch, action.stage
        if kind == Kind.FORWARD:
            if s == 0:
                x = inputs[mb]
            elif (mb, s) in received:
                x = received.pop((mb, s))
            else:
                x = outputs.pop((mb, s - 1))  # the previous stage is on this rank
            seed = dropout_seeds[mb] if dropout_seeds is not None else None
            with span("forward", action):
                if forward_only:
                    out = stages[s].forward_only(x, targets[mb] if s == last else None)
                else:
                    out, caches[(mb, s)] = stages[s].forward(x, targets[mb] if s == last else None, seed)
            if not forward_only:
                in_flight[s] += 1
                _count_activations(tracer, stages)
                result.peak_in_flight[s] = max(result.peak_in_flight[s], in_flight[s])
            if s == last:
                result.losses[mb] = out
            else:
                outputs[(mb, s)] = out
        elif kind in (Kind.BACKWARD, Kind.BACKWARD_INPUT):
            if s == last:
                dout = dloss
            elif (mb, s) in received:
                dout = received.pop((mb, s))
            else:
                dout = input_grads.pop((mb, s + 1))
            with span("backward" if kind == Kind.BACKWARD else "backward_input", action):
                dx, weight_work = stages[s].backward_input(caches.pop((mb, s)), dout, last=index == last_input[s])
                if kind == Kind.BACKWARD:
                    stages[s].backward_weight(weight_work, last=index == last_weight[s])
            if kind == Kind.BACKWARD_INPUT:
                deferred[(mb, s)] = weight_work
            in_flight[s] -= 1
            _count_activations(tracer, stages)
            if s > 0:
                input_grads[(mb, s)] = dx
        elif kind == Kind.BACKWARD_WEIGHT:
            with span("backward_weight", action):
                stages[s].backward_weight(deferred.pop((mb, s)), last=index == last_weight[s])
            _count_activations(tracer, stages)
        elif kind == Kind.SEND_ACTIVATION:
            sends.append(pp_comm.isend(outputs.pop((mb, s)), action.peer, tag=message_tag(action, num_microbatches)))
        elif kind == Kind.SEND_GRAD:
            sends.append(pp_comm.isend(input_grads.pop((mb, s)), action.peer,
                                       tag=message_tag(action, num_microbatches)))
        elif kind in (Kind.RECV_ACTIVATION, Kind.RECV_GRAD):
            received[(mb, s)] = posted.pop(action).wait()
        elif kind == Kind.OPTIMIZER_STEP:
            for handle in sends:
                handle.wait()
            sends.clear()
        else:
            raise ValueError(f"pipeline executor: unknown action {action}")
    for handle in sends:
        handle.wait()
    if caches or deferred or received:
        raise RuntimeError(f"pipeline step left work behind: {len(caches)} activations, {len(deferred)} weight "
                           f"gradients, {len(received)} received tensors — the schedule is inconsistent")
    result.peak_activation_bytes = max((st.memory.peak_bytes for st in stages.values()), default=0)
    return result


def _last_backward_indices(actions) -> tuple[dict, dict]:
    """stage -> index in `actions` of its last input-gradient and of its last weight-gradient action."""
    last_input, last_weight = {}, {}
    for index, action in enumerate(actions):
        if action.kind in (Kind.BACKWARD, Kind.BACKWARD_INPUT):
            last_input[action.stage] = index
        if action.kind in (Kind.BACKWARD, Kind.BACKWARD_WEIGHT):
            last_weight[action.stage] = index
    return last_input, last_weight


def _count_activations(tracer, stages):
    """Trace counter: the activation bytes this rank holds for later backward passes."""
    if tracer is not None and tracer.enabled:
        tracer.counter("activation bytes", sum(stage.memory.live_bytes for stage in stages.values()))


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL = _Null()
