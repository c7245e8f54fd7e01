"""The calling contract of the CPython extensions among the C helpers (runtime/csrc/py_extension.h:
shm_p2p.c's send/recv, shm_small_call.c's round/take): arguments that do not fit are a TypeError
naming the call's signature (or the conversion's own error), and an array the call cannot use is
answered "not taken" before anything is written, so that the caller's Python path does the work."""
import numpy as np
import pytest

from ringpipe.runtime import shm_p2p_fast, shm_small

SLOT_BYTES = 1024  # a slot: 512 bytes of header and description, then the payload
RING_WORDS = (4096 + shm_p2p_fast.SLOTS * SLOT_BYTES) // 8


def _built(extension):
    module = extension()
    if module is None:
        pytest.skip("the C extensions cannot be built here (no compiler or no Python headers)")
    return module


def test_a_call_with_arguments_that_do_not_fit_names_its_signature():
    p2p, small = _built(shm_p2p_fast.extension), _built(shm_small.extension)
    for call, name in ((p2p.send, "send"), (p2p.recv, "recv"), (small.round, "round"), (small.take, "take")):
        with pytest.raises(TypeError, match=rf"^{name}\(ctl|^{name}\(ring"):
            call(1, 2)
    with pytest.raises(TypeError, match="integer"):  # the conversion's own error, not the signature
        p2p.send("ring", SLOT_BYTES, 0, 1, 2, b"d", np.zeros(2), -1, 0)


def test_an_array_the_call_cannot_take_is_answered_not_taken_and_nothing_is_written():
    p2p, small = _built(shm_p2p_fast.extension), _built(shm_small.extension)
    ring = np.zeros(RING_WORDS, np.uint64)
    address, strided = int(ring.ctypes.data), np.arange(10.0)[::2]
    read_only = np.zeros(5)
    read_only.flags.writeable = False
    assert p2p.send(address, SLOT_BYTES, 0, 1, 2, b"d", strided, -1, 0) is False
    assert p2p.recv(address, SLOT_BYTES, 0, 1, 2, b"d", read_only, 0, 0, 0, 0, 0) == shm_p2p_fast.OTHER
    assert not ring.any()
    # The small round checks both arrays before it touches its control block (address 0 here).
    assert small.round(0, strided, None, -1, *[0] * 12) == shm_small.NOT_TAKEN
    assert small.round(0, None, read_only, -1, *[0] * 12) == shm_small.NOT_TAKEN
    assert small.take(0, read_only, -1) is False


def test_a_one_slot_message_goes_through_a_private_ring_and_a_peek_leaves_it_there():
    p2p = _built(shm_p2p_fast.extension)
    ring = np.zeros(RING_WORDS, np.uint64)
    address, x, out = int(ring.ctypes.data), np.arange(5.0), np.empty(5)
    assert p2p.recv(address, SLOT_BYTES, 0, 1, 2, b"d", out, 0, 0, 0, 0, 0) == shm_p2p_fast.PENDING
    assert p2p.send(address, SLOT_BYTES, 0, 1, 2, b"d", x, -1, 0) is True
    assert p2p.recv(address, SLOT_BYTES, 0, 1, 2, b"", None, 0, 0, 0, 0, 0) == (0, b"d")
    assert p2p.recv(address, SLOT_BYTES, 0, 1, 2, b"d", out, 0, 0, 0, 0, 0) == 0
    assert np.array_equal(out, x)
