/* The common case of same-host point-to-point in one call each way (runtime/shm_p2p_fast.py):
a message that fits in one slot of the pair ring (runtime/shm_p2p.py), written by `send` and
taken by `recv` when it is the next one in the ring and the one the receive wants.

A CPython extension, not a ctypes library: the calls take the array itself (buffer protocol)
and cost well under a microsecond, where a ctypes call with the array's address cost ~15 µs
here (`ndarray.ctypes.data` alone ~11 µs). Everything else (a full ring, a message of another
key or of an earlier call, a payload in arena blocks) returns to the Python path, which reads
the same ring by the same rules.

The ring's layout is shm_p2p.py's: `head` (u64) at 0 and its sleeper count (u32) at 8, `tail` at
64 and its sleepers at 72, SLOTS slots from HEADER_BYTES on; a slot starts with the fixed fields
"<qqqqiiqq" (epoch, call, tag, block, part index, parts, written ns, description length), the
description at DESCRIPTION_AT and the payload at META_BYTES. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "py_extension.h"
#include "stream_store.h"
#include "monotonic_clock.h"
#include "shm_wait.h"

enum { HEAD = 0, TAIL = 64, SLEEPERS = 8, HEADER_BYTES = 4096, SLOTS = 64, DESCRIPTION_AT = 64, META_BYTES = 512 };
/* recv's answers besides "got it": the next message is not this receive's (or no plain one-slot
   message: the Python path reads it), or none arrived within the spin and one sleep. */
enum { OTHER = -1, PENDING = -2 };

/* Payloads from this size on are written with streaming stores (stream_store.h; 0: never): set once
   per process by the caller (runtime/stream_store.stream_min_bytes). */
static int64_t stream_min = 0;

struct slot_header {
    int64_t epoch, call, tag, block;
    int32_t index, parts;
    int64_t written, length;
};

/* send(ring, slot_bytes, epoch, call, tag, description: bytes, array, block, block_address) ->
   bool: the message is in the ring and published (the reader woken if it sleeps), its payload in
   the slot (block -1) or in the arena block `block` the caller took for it (mapped here at
   block_address); False (nothing written) when the ring is full, the array is not C-contiguous
   or does not fit in the slot: the caller's Python path. */
static PyObject *p2p_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long v[5], b[2];
    if (nargs != 9 || rp_take_ints(args, 5, v) < 0 || !PyBytes_Check(args[5]) || rp_take_ints(args + 7, 2, b) < 0)
        return rp_bad_arguments("send(ring, slot_bytes, epoch, call, tag, description, array, block, block_address)");
    char *ring = (char *)(intptr_t)v[0];
    int64_t slot_bytes = v[1];
    Py_ssize_t length = PyBytes_GET_SIZE(args[5]);
    Py_buffer view;
    if (rp_take_buffer(args[6], 0, &view) < 0) Py_RETURN_FALSE;
    int sent = 0;
    uint64_t *head = (uint64_t *)(ring + HEAD), *tail = (uint64_t *)(ring + TAIL);
    uint64_t at = __atomic_load_n(head, __ATOMIC_RELAXED);  /* only this sender (under its lock) raises it */
    if ((b[0] >= 0 || view.len <= slot_bytes - META_BYTES) && length <= META_BYTES - DESCRIPTION_AT &&
        at - __atomic_load_n(tail, __ATOMIC_ACQUIRE) < SLOTS) {
        char *slot = ring + HEADER_BYTES + (int64_t)(at % SLOTS) * slot_bytes;
        struct slot_header header = {v[2], v[3], v[4], b[0] >= 0 ? b[0] : -1, 0, 1, now_ns(), length};
        rp_copy_for_peers(b[0] >= 0 ? (char *)(intptr_t)b[1] : slot + META_BYTES, view.buf, (size_t)view.len, stream_min);
        memcpy(slot, &header, sizeof header);
        memcpy(slot + DESCRIPTION_AT, PyBytes_AS_STRING(args[5]), (size_t)length);
        rp_publish(head, (uint32_t *)(ring + HEAD + SLEEPERS), at + 1);  /* after the stores above */
        sent = 1;
    }
    PyBuffer_Release(&view);
    return PyBool_FromLong(sent);
}

/* recv(ring, slot_bytes, epoch, call, tag, description: bytes, out, spin_ns, yields, timeout_ns,
   arena, arena_bytes) -> int: waits (spin, then at most one futex sleep of timeout_ns, without the
   GIL) for the next message; when it is a one-part message of this epoch, call, tag and
   description (group, dtype, shape), copies its payload (in the slot, or in a block of the
   sender's arena, mapped here at `arena`) into `out` (C-contiguous, writable, of that size) and
   gives the slot back (the sender frees the block once it sees that). Returns the ns it slept first (0: the spin caught it), OTHER (the slot is left for
   the Python path) or PENDING (nothing yet: the caller looks at aborts and deadlines).
   With `out` None, `description` is a prefix (the group's) and a match is only looked at: the
   answer is (ns slept, the message's description) and the slot stays, for a second call with an
   `out` of the message's shape and dtype. */
static PyObject *p2p_recv(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long v[5], w[5];
    if (nargs != 12 || rp_take_ints(args, 5, v) < 0 || !PyBytes_Check(args[5]) || rp_take_ints(args + 7, 5, w) < 0)
        return rp_bad_arguments("recv(ring, slot_bytes, epoch, call, tag, description, out, spin_ns, yields, "
                                "timeout_ns, arena, arena_bytes)");
    char *ring = (char *)(intptr_t)v[0];
    int64_t slot_bytes = v[1];
    Py_buffer view;
    int peek = args[6] == Py_None;
    if (rp_take_optional_buffer(args[6], 1, &view) < 0) return PyLong_FromLong(OTHER);
    const char *found = NULL;
    int64_t found_length = 0;
    const char *description = PyBytes_AS_STRING(args[5]);
    Py_ssize_t length = PyBytes_GET_SIZE(args[5]);
    int64_t result;
    Py_BEGIN_ALLOW_THREADS
    uint64_t *head = (uint64_t *)(ring + HEAD), *tail = (uint64_t *)(ring + TAIL);
    uint64_t at = __atomic_load_n(tail, __ATOMIC_RELAXED);  /* only this receiver (under its lock) raises it */
    int64_t started = now_ns();
    uint64_t written = rp_wait_at_least(head, (uint32_t *)(ring + HEAD + SLEEPERS), at + 1, w[0], (int)w[1], 0);
    int64_t slept = 0;
    if (written <= at && w[2] > 0) {
        written = rp_wait_at_least(head, (uint32_t *)(ring + HEAD + SLEEPERS), at + 1, 0, 0, w[2]);
        slept = now_ns() - started;
    }
    if (written <= at) {
        result = PENDING;
    } else {
        const char *slot = ring + HEADER_BYTES + (int64_t)(at % SLOTS) * slot_bytes;
        struct slot_header header;
        memcpy(&header, slot, sizeof header);
        int plain = header.epoch == v[2] && header.call == v[3] && header.tag == v[4] && header.block >= -1 &&
                    header.index == 0 && header.parts == 1 && header.length <= META_BYTES - DESCRIPTION_AT;
        const char *payload = header.block == -1 ? slot + META_BYTES : (const char *)(intptr_t)w[3] + header.block;
        int64_t room = header.block == -1 ? slot_bytes - META_BYTES : w[4] - header.block;
        result = slept > 0 ? slept : 0;
        if (plain && peek && header.length >= length && memcmp(slot + DESCRIPTION_AT, description, (size_t)length) == 0) {
            found = slot + DESCRIPTION_AT;
            found_length = header.length;
        } else if (plain && !peek && header.length == length && view.len <= room &&
                   memcmp(slot + DESCRIPTION_AT, description, (size_t)length) == 0) {
            memcpy(view.buf, payload, (size_t)view.len);
            rp_publish(tail, (uint32_t *)(ring + TAIL + SLEEPERS), at + 1);
        } else {
            result = OTHER;
        }
    }
    Py_END_ALLOW_THREADS
    if (peek)
        return found ? Py_BuildValue("(Ly#)", (long long)result, found, (Py_ssize_t)found_length)
                     : PyLong_FromLongLong(result);
    PyBuffer_Release(&view);
    return PyLong_FromLongLong(result);
}

/* set_stream_min(bytes) -> None: payloads of `bytes` or more stream from now on (0: none do). */
static PyObject *p2p_set_stream_min(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long value;
    if (nargs != 1 || rp_take_ints(args, 1, &value) < 0) return rp_bad_arguments("set_stream_min(bytes)");
    stream_min = value;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    RP_FASTCALL("set_stream_min", p2p_set_stream_min, "Stream payloads of this many bytes or more."),
    RP_FASTCALL("send", p2p_send, "Write a one-slot message into a pair ring."),
    RP_FASTCALL("recv", p2p_recv, "Take the next message of a pair ring if wanted."),
    {NULL, NULL, 0, NULL},
};

RP_MODULE(_ringpipe_shm_p2p, methods)
