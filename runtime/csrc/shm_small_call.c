/* The latency path's round as one CPython call (runtime/shm_small.py): the payload copied into this
rank's buffer, the round of shm_small.c without the GIL, and the result copied out, with the arrays
taken through the buffer protocol.

A ctypes call with array addresses cost ~15 µs here (`ndarray.ctypes.data` alone ~11 µs, see
csrc/shm_p2p.c), and the two NumPy copies around it a few µs more; this call does all of it for
well under a microsecond of argument handling. An array this call cannot take (not C-contiguous,
or a read-only `out`) makes it answer NOT_TAKEN before anything is written: the caller then copies
in Python and runs the same round. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "py_extension.h"
#include "stream_choice.h"
#include "stream_store.h"

int rp_small_round(int64_t *ctl);

/* shm_small.c's control block words used here (its enum). */
enum { C_N = 0, C_ME = 1, C_PARITY = 2, C_KIND = 9, C_COUNT = 12, C_PHASE = 13, C_WAITED_NS = 15, C_SCRATCH = 17,
       C_OFFSET = 18, C_STREAM_MIN = 20, C_PIECE = 22, C_DIVISOR = 23, C_CHUNK = 24, C_STREAM_REDUCE_MAX = 28,
       C_ARRIVAL_NS = 30, C_CHOICE = 31, C_MEMBERS = 32, C_PER_MEMBER = 6 };
enum { DONE = 0, NOT_TAKEN = -1 };
enum { KIND_REDUCE = 1, KIND_HALVES = 2 };
/* Where `out` is copied from once the round is done: the scratch area (a reduction's result),
   every member's buffer in rank order (an all-gather), or one member's buffer (>= 0: a broadcast). */
enum { FROM_SCRATCH = -1, FROM_EVERY_MEMBER = -2 };

#define BUFFER(ctl, member, parity) ((char *)(intptr_t)(ctl)[C_MEMBERS + (member) * C_PER_MEMBER + 4 + (parity)])

/* `own` (NULL: none): this rank's payload, copied in before the round; an all-gather takes its own
   piece from there, in the caches, not from its buffer, which streamed stores left in memory. */
static void copy_out(const int64_t *ctl, char *out, Py_ssize_t length, int64_t source, const char *own) {
    int64_t parity = ctl[C_PARITY];
    if (source == FROM_SCRATCH) {
        memcpy(out, (const char *)(intptr_t)ctl[C_SCRATCH], (size_t)length);
    } else if (source == FROM_EVERY_MEMBER) {
        int64_t n = ctl[C_N];
        size_t piece = (size_t)(length / n);
        for (int64_t member = 0; member < n; member++)
            memcpy(out + member * piece, member == ctl[C_ME] && own ? own : BUFFER(ctl, member, parity), piece);
    } else {
        memcpy(out, BUFFER(ctl, source, parity), (size_t)length);
    }
}

/* Both buffers or neither (NOT_TAKEN: nothing acquired, the error cleared); None: no buffer. */
static int take_buffers(PyObject *payload, PyObject *out, Py_buffer *in_view, Py_buffer *out_view) {
    if (rp_take_optional_buffer(payload, 0, in_view) < 0) return NOT_TAKEN;
    if (rp_take_optional_buffer(out, 1, out_view) < 0) {
        PyBuffer_Release(in_view);
        return NOT_TAKEN;
    }
    return 0;
}

/* round(ctl, payload, out, source, parity, target, signature, position, spin_ns, yield, timeout_ns,
   kind, dtype, op, count, offset) -> status: ctl is the control block's address, the ints after
   `source` go into its words C_PARITY .. C_COUNT and C_OFFSET (C_PHASE = 0); `payload` (None:
   none) is copied into this rank's buffer of `parity` first; once the round is DONE, `out` (None:
   none) gets the result from `source` (FROM_SCRATCH, FROM_EVERY_MEMBER or a member); a reduction
   whose result goes to `out` is summed straight into it (no pass through the scratch: at mid
   sizes that copy is a third of the work). Returns shm_small.c's status (PENDING: the caller
   waits on, then calls `take`, and the reduction goes through the scratch) or NOT_TAKEN. */
/* The body of `round` on C values (v: the ints after `source`), for it and for shm_small_run.c. */
int rp_call_round(int64_t *ctl, PyObject *payload, PyObject *out, long long source, const long long *v) {
    Py_buffer in_view, out_view;
    if (take_buffers(payload, out, &in_view, &out_view) < 0) return NOT_TAKEN;
    for (int i = 0; i < 11; i++) ctl[C_PARITY + i] = v[i];
    ctl[C_PHASE] = 0;
    ctl[C_OFFSET] = v[11];
    ctl[C_WAITED_NS] = 0;
    /* Whether the copy in streams (the peers read it from another core, see stream_store.h): as the
       channel's probes found for this kind and size (stream_choice.h), else the size rule (a reduction
       only up to stream_store.reduce_max_bytes). The op's size on every member alike: the payload, or
       what comes out where there is none (a broadcast's receivers). A broadcast's root cannot see its
       receivers' reads: it follows the all_gathers' verdict. */
    int64_t *choice = (int64_t *)(intptr_t)ctl[C_CHOICE];
    int64_t bytes = payload != Py_None ? in_view.len : out != Py_None ? out_view.len : 0;
    int64_t size_rule = ctl[C_KIND] == KIND_REDUCE && bytes > ctl[C_STREAM_REDUCE_MAX] ? 0 : ctl[C_STREAM_MIN];
    int64_t stream_min = source >= 0 ? rp_stream_follow(choice, SC_KIND_COPY, bytes, ctl[C_STREAM_MIN], size_rule)
                                     : rp_stream_choose(choice, ctl[C_KIND] == KIND_REDUCE ? SC_KIND_REDUCE : SC_KIND_COPY,
                                                        bytes, ctl[C_STREAM_MIN], size_rule);
    if (payload != Py_None)
        rp_copy_for_peers(BUFFER(ctl, ctl[C_ME], ctl[C_PARITY]), in_view.buf, (size_t)in_view.len, stream_min);
    int status;
    int64_t scratch = ctl[C_SCRATCH];
    int direct = out != Py_None && source == FROM_SCRATCH && ctl[C_KIND] == KIND_REDUCE;
    const char *own = payload != Py_None && source == FROM_EVERY_MEMBER ? (const char *)in_view.buf : NULL;
    Py_BEGIN_ALLOW_THREADS
    if (direct) ctl[C_SCRATCH] = (int64_t)(intptr_t)out_view.buf;
    status = rp_small_round(ctl);
    ctl[C_SCRATCH] = scratch;
    if (status == DONE && out != Py_None && !direct) copy_out(ctl, out_view.buf, out_view.len, source, own);
    if (status == DONE) rp_stream_record(choice, ctl[C_WAITED_NS]); /* (waits: the members' arrival) */
    Py_END_ALLOW_THREADS
    if (payload != Py_None) PyBuffer_Release(&in_view);
    if (out != Py_None) PyBuffer_Release(&out_view);
    return status;
}

static PyObject *small_round(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long v[12], ctl_address, source;
    if (nargs != 16 || rp_take_ints(args, 1, &ctl_address) < 0 || rp_take_ints(args + 3, 1, &source) < 0 ||
        rp_take_ints(args + 4, 12, v) < 0)
        return rp_bad_arguments("round(ctl, payload, out, source, parity, target, signature, position, spin_ns, "
                                "yield, timeout_ns, kind, dtype, op, count, offset)");
    return PyLong_FromLong(rp_call_round((int64_t *)(intptr_t)ctl_address, args[1], args[2], source, v));
}

/* take(ctl, out, source) -> bool: a done round's result into `out` (as `round` does), after the
   caller waited for it in slices; False (nothing copied) when `out` cannot be taken. */
static PyObject *small_take(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long ctl_address, source;
    if (nargs != 3 || rp_take_ints(args, 1, &ctl_address) < 0 || rp_take_ints(args + 2, 1, &source) < 0)
        return rp_bad_arguments("take(ctl, out, source)");
    Py_buffer in_view, out_view;
    if (take_buffers(Py_None, args[1], &in_view, &out_view) < 0) Py_RETURN_FALSE;
    copy_out((const int64_t *)(intptr_t)ctl_address, out_view.buf, out_view.len, source, NULL);
    PyBuffer_Release(&out_view);
    Py_RETURN_TRUE;
}

/* halves(ctl, x, parity, target, signature, position, spin_ns, yield, timeout_ns, dtype, op, count,
   divisor, chunk) -> status: the all-reduce of `x` (writable, C-contiguous, `count` elements) in place
   as shm_small.c's KIND_HALVES round (reduce-scatter + all-gather through the buffers in chunks of
   `chunk` elements, no copy of the whole array in or out); the ints go into words C_PARITY .. C_COUNT,
   C_DIVISOR and C_CHUNK. Returns
   shm_small.c's status (PENDING: the caller waits on with rp_small_round, which resumes the round
   on `x`: the caller keeps it alive) or NOT_TAKEN (nothing done: `x` cannot be taken). */
/* The body of `halves` on C values (v: the ints after `x`), for it and for shm_small_run.c. */
int rp_call_halves(int64_t *ctl, PyObject *x, const long long *v) {
    Py_buffer view;
    if (rp_take_buffer(x, 1, &view) < 0) return NOT_TAKEN;
    for (int i = 0; i < 7; i++) ctl[C_PARITY + i] = v[i];
    ctl[C_KIND] = KIND_HALVES;
    ctl[C_KIND + 1] = v[7], ctl[C_KIND + 2] = v[8], ctl[C_COUNT] = v[9];
    ctl[C_DIVISOR] = v[10], ctl[C_CHUNK] = v[11];
    ctl[C_PIECE] = (int64_t)(intptr_t)view.buf;
    ctl[C_PHASE] = 0;
    ctl[C_WAITED_NS] = 0;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = rp_small_round(ctl);
    /* (its first call chose; one that waited past the spin ends in Python, unrecorded) */
    if (status == DONE) rp_stream_record((int64_t *)(intptr_t)ctl[C_CHOICE], ctl[C_ARRIVAL_NS]);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return status;
}

static PyObject *small_halves(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    long long v[12], ctl_address;
    if (nargs != 14 || rp_take_ints(args, 1, &ctl_address) < 0 || rp_take_ints(args + 2, 12, v) < 0)
        return rp_bad_arguments("halves(ctl, x, parity, target, signature, position, spin_ns, yield, timeout_ns, "
                                "dtype, op, count, divisor, chunk)");
    return PyLong_FromLong(rp_call_halves((int64_t *)(intptr_t)ctl_address, args[1], v));
}

PyObject *rp_small_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs); /* shm_small_run.c */

static PyMethodDef methods[] = {
    RP_FASTCALL("run", rp_small_run, "A waited-for collective's bookkeeping and round (SmallRounds._run's case)."),
    RP_FASTCALL("halves", small_halves, "An all-reduce in place as a reduce-scatter + all-gather round."),
    RP_FASTCALL("round", small_round, "One small round, copies included."),
    RP_FASTCALL("take", small_take, "A done round's result into an array."),
    {NULL, NULL, 0, NULL},
};

RP_MODULE(_ringpipe_shm_small, methods)
