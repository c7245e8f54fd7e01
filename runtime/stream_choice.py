"""Whether a channel's copies for peers stream, chosen per size class by timing both ways: the state
of csrc/stream_choice.h (the why and the rule are there) for one channel.

RINGPIPE_SHM_STREAM_PROBE: calls of a size class from one round of probes to the next (default
DEFAULT_PERIOD; at least MIN_PERIOD), or "off": the size rule of runtime/stream_store.py
(RINGPIPE_SHM_STREAM_MIN, RINGPIPE_SHM_STREAM_REDUCE_MAX) for every call, as before probes. Nothing
streams below stream_store's threshold (RINGPIPE_SHM_STREAM_MIN) either way.

Measured (2 ranks, `ringpipe bench collectives --world-size 2`, Intel Xeon VM, 2026-12-01): a 64 KiB
all_reduce 25.5 us with the size rule (streamed) against 14.5 plain; broadcast 1 MiB 122 against 80.
On the AMD EPYC VM of 2026-12-01 streaming won at 64-256 KiB (14 against 22 us) and lost from 384 KiB,
except in its slow phases, where plain stores cost 5-15x.
"""
from __future__ import annotations

import ctypes

import numpy as np

from ringpipe.runtime import env_setting

# csrc/stream_choice.h's layout and kinds.
SC_PERIOD, SC_CLASS, SC_SLOT, SC_STARTED, SC_CLASSES_AT = 0, 1, 2, 3, 8
SC_SIZES, SC_KINDS, SC_SAMPLES = 48, 3, 5
SC_CALLS, SC_VERDICT, SC_PLAIN, SC_STREAMED, SC_PER_CLASS = 0, 1, 2, 2 + SC_SAMPLES, 2 + 2 * SC_SAMPLES
SC_WORDS = SC_CLASSES_AT + SC_KINDS * SC_SIZES * SC_PER_CLASS
KIND_REDUCE, KIND_HALVES, KIND_COPY = 0, 1, 2
UNDECIDED, PLAIN_WINS, STREAM_WINS = 0, 1, 2
PROBE_CALLS = 2 * SC_SAMPLES
# A round of probes every 1,024 calls of a class: at worst (the other way twice as slow) 5 calls in
# 1,024 cost double, 0.5 %; a 1 MiB gradient bucket at ~10 a step comes back to it every ~2 s.
DEFAULT_PERIOD = 1024
MIN_PERIOD = 2 * PROBE_CALLS


def period() -> int:
    """RINGPIPE_SHM_STREAM_PROBE as calls (0: "off"). Raises ValueError naming it for a bad value."""
    value = env_setting.setting("RINGPIPE_SHM_STREAM_PROBE")
    if value == env_setting.OFF:
        return 0
    return DEFAULT_PERIOD if value is None else value


def new_state() -> np.ndarray:
    """A channel's state (int64 words), probes every `period()` calls of a class."""
    state = np.zeros(SC_WORDS, np.int64)
    state[SC_PERIOD], state[SC_CLASS] = period(), -1
    return state


def verdicts(state: np.ndarray) -> dict:
    """{(kind, floor(log2(bytes))): "plain" | "streamed"} for every class that has a verdict (for
    tests and for looking at a run)."""
    classes = state[SC_CLASSES_AT:].reshape(SC_KINDS, SC_SIZES, SC_PER_CLASS)
    names = {PLAIN_WINS: "plain", STREAM_WINS: "streamed"}
    return {(kind, size): names[int(classes[kind, size, SC_VERDICT])]
            for kind in range(SC_KINDS) for size in range(SC_SIZES) if classes[kind, size, SC_VERDICT] in names}


def declare(lib) -> None:
    """Argument types of the functions in `lib` (a ctypes library built with csrc/stream_choice.c)."""
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.rp_stream_choose.argtypes, lib.rp_stream_choose.restype = [p, i64, i64, i64, i64], i64
    lib.rp_stream_follow.argtypes, lib.rp_stream_follow.restype = [p, i64, i64, i64, i64], i64
    lib.rp_stream_record.argtypes, lib.rp_stream_record.restype = [p, i64], None


__all__ = ["new_state", "period", "verdicts", "declare", "DEFAULT_PERIOD", "MIN_PERIOD", "KIND_REDUCE",
           "KIND_HALVES", "KIND_COPY"]
