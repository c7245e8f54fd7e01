/* The latency path's bookkeeping around a round, in C (runtime/shm_small.py's SmallRounds._run): the
common case of a waited-for small or mid-size collective in one call, the round included.

In Python the bookkeeping cost ~6 us of interpreter per operation (2 ranks, a 1 KiB all_reduce took
~11 us of which the round ~4), as much as a 64 KiB round itself. This does the same steps on the same
objects through the C API: the channel's busy check and lock, the operation's number in the group
(comm._sequence.next's common case), the round and publish counts, the round (shm_small_call.c),
the spin's adaptation, the bytes sent (engine.count_sent's update, under its lock). It takes only the case with nothing to look at: no trace, no abort, the
channel at the engine's epoch, the spin's look at the machine still fresh (SmallRounds._run does all of those, and then this case
too); else it answers NOT_HANDLED having changed nothing. Once the operation has its number, a round
that did not end DONE (a wait past the spin, a mismatch, an array the call cannot take) goes on in
Python (SmallRounds._after_round), under the lock this call holds; an error there or here marks the
engine for a fence and releases the lock, as _run does. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <time.h>

#include "py_extension.h"

int rp_call_round(int64_t *ctl, PyObject *payload, PyObject *out, long long source, const long long *v);
int rp_call_halves(int64_t *ctl, PyObject *x, const long long *v);

/* shm_small.c's words used here (its enum), and this module's three constants (set by shm_small.py). */
enum { C_SLEPT = 19, C_WAITED_NS = 15, C_CHUNKS = 21, C_SLICE_NS = 25, C_SPARE_CHECK_NS = 26, C_SPARE_RECHECK_NS = 27,
       C_ARRIVAL_NS = 30 };
enum { DONE = 0, NOT_TAKEN = -1, KIND_HALVES = 2, R_COUNT = 10, EPOCH_SHIFT = 40 };
/* SmallRounds._run's answers. */
enum { NOT_RUN = 0, FILLED = 1, UNFILLED = 2, NOT_HANDLED = -3 };

static PyObject *names[40];
enum {
    N_CHANNEL, N_ENGINE, N_EPOCH, N_CALL, N_TRACER, N_ENABLED, N_ABORTED_CALL, N_ABORTED, N_ROUNDS, N_COUNT,
    N_WRITTEN, N_SPIN, N_NS, N_SPARE, N_CHECKED, N_MAX_NS, N_QUEUE, N_RUNNING, N_LOCK, N_ACQUIRE, N_RELEASE,
    N_SEQUENCE, N_NEXT, N_CONFIG, N_TIMEOUT, N_ANSWERED, N_COUNT_SENT, N_GROUP, N_GID, N_ADDRESS, N_YIELDS,
    N_AFTER_ROUND, N_NEEDS_FENCE, N_SIZE, N_NUMBERS, N_SEND_LOCK, N_BYTES_SENT, N_FIXED, N_COUNT_NAMES
};
static const char *const NAME_TEXT[] = {
    "channel", "engine", "epoch", "call", "tracer", "enabled", "aborted_call", "aborted", "rounds", "count",
    "_written", "spin", "_ns", "_spare", "_checked", "max_ns", "_queue", "_running", "lock", "acquire", "release",
    "_sequence", "next", "config", "timeout", "answered", "count_sent", "group", "gid", "address", "yields",
    "_after_round", "needs_fence", "size", "_numbers", "send_lock", "bytes_sent", "fixed"};

static int intern_names(void) {
    if (names[0]) return 0;
    for (int i = 0; i < N_COUNT_NAMES; i++)
        if (!(names[i] = PyUnicode_InternFromString(NAME_TEXT[i]))) return -1;
    return 0;
}

static int64_t monotonic_ns(void) { /* time.monotonic_ns's clock */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* getattr(object, names[i]) as a long long; -1 with an error set on failure (check PyErr_Occurred). */
static long long attr_int(PyObject *object, int i) {
    PyObject *value = PyObject_GetAttr(object, names[i]);
    if (!value) return -1;
    long long result = PyLong_AsLongLong(value);
    Py_DECREF(value);
    return result;
}

static int set_attr_int(PyObject *object, int i, long long value) {
    PyObject *number = PyLong_FromLongLong(value);
    if (!number) return -1;
    int failed = PyObject_SetAttr(object, names[i], number);
    Py_DECREF(number);
    return failed;
}

/* 1 when getattr(object, names[i]) is truthy, 0 when not, -1 on error. */
static int attr_true(PyObject *object, int i) {
    PyObject *value = PyObject_GetAttr(object, names[i]);
    if (!value) return -1;
    int result = PyObject_IsTrue(value);
    Py_DECREF(value);
    return result;
}

/* run(small, comm, name, signature, kind, dtype, op, x, out, source, nbytes, timeout, sent, count,
   offset) -> FILLED, UNFILLED, NOT_RUN or NOT_HANDLED: SmallRounds._run's arguments and answers. */
PyObject *rp_small_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 15) return rp_bad_arguments("run(small, comm, name, signature, kind, dtype, op, x, out, source, "
                                             "nbytes, timeout, sent, count, offset)");
    if (intern_names() < 0) return NULL;
    PyObject *small = args[0], *comm = args[1], *signature = args[3], *x = args[7], *out = args[8];
    long long kind = PyLong_AsLongLong(args[4]), dtype = PyLong_AsLongLong(args[5]), op = PyLong_AsLongLong(args[6]);
    long long source = PyLong_AsLongLong(args[9]), sent = PyLong_AsLongLong(args[12]);
    long long offset = PyLong_AsLongLong(args[14]);
    if (PyErr_Occurred()) return NULL;
    if (!PyTuple_Check(signature) || PyTuple_GET_SIZE(signature) != 3) {
        PyErr_SetString(PyExc_TypeError, "run: signature must be the triple (described, packed, id)");
        return NULL;
    }
    PyObject *answer = NULL, *fixed = NULL, *channel = NULL, *engine = NULL, *lock = NULL, *spin = NULL, *written = NULL;
    PyObject *epoch_object = NULL, *channel_epoch = NULL, *seq_object = NULL, *key = NULL;
    int locked = 0, numbered = 0;
    long long handled = NOT_HANDLED;

    /* What stays the same for the channel's life, in one tuple (SmallRounds.fixed): the channel, its
       engine, lock, spin, the engine's tracer, the channel's list of written signatures, the group's
       id, the engine's send lock and byte counts, the control block's address, whether to yield. Held
       to the end (its items are borrowed): the Python code this calls may drop SmallRounds.fixed. */
    if (!(fixed = PyObject_GetAttr(small, names[N_FIXED]))) goto fail;
    if (!PyTuple_Check(fixed) || PyTuple_GET_SIZE(fixed) != 11) {
        PyErr_SetString(PyExc_TypeError, "SmallRounds.fixed: expected an 11-tuple");
        goto fail;
    }
    channel = PyTuple_GET_ITEM(fixed, 0), engine = PyTuple_GET_ITEM(fixed, 1), lock = PyTuple_GET_ITEM(fixed, 2);
    spin = PyTuple_GET_ITEM(fixed, 3), written = PyTuple_GET_ITEM(fixed, 5);
    PyObject *tracer = PyTuple_GET_ITEM(fixed, 4), *gid = PyTuple_GET_ITEM(fixed, 6);
    PyObject *send_lock = PyTuple_GET_ITEM(fixed, 7), *totals = PyTuple_GET_ITEM(fixed, 8);
    long long ctl_address = PyLong_AsLongLong(PyTuple_GET_ITEM(fixed, 9));
    long long yields = PyLong_AsLongLong(PyTuple_GET_ITEM(fixed, 10));
    if (PyErr_Occurred() || !PyList_Check(written) || PyList_GET_SIZE(written) != 2) goto fail_or_not_handled;
    /* Busy (asynchronous operations queued or running, another thread in the channel): NOT_RUN, as _run. */
    int busy = attr_true(channel, N_QUEUE);
    if (busy < 0) goto fail;
    if (!busy) {
        PyObject *running = PyObject_GetAttr(channel, names[N_RUNNING]);
        if (!running) goto fail;
        busy = running != Py_None;
        Py_DECREF(running);
    }
    if (busy) {
        handled = NOT_RUN;
        goto done;
    }
    PyObject *got = PyObject_CallMethodObjArgs(lock, names[N_ACQUIRE], Py_False, NULL);
    if (!got) goto fail;
    locked = got == Py_True;
    Py_DECREF(got);
    if (!locked) {
        handled = NOT_RUN;
        goto done;
    }
    /* Nothing to look at (else NOT_HANDLED, nothing changed): no trace, no abort, the same epoch. */
    int tracing = attr_true(tracer, N_ENABLED);
    if (tracing != 0) goto not_handled_or_fail;
    PyObject *aborted_call = PyObject_GetAttr(engine, names[N_ABORTED_CALL]);
    if (!aborted_call) goto fail;
    int quiet = aborted_call == Py_None;
    Py_DECREF(aborted_call);
    if (!quiet) goto not_handled;
    int aborted = attr_true(engine, N_ABORTED);
    if (aborted != 0) goto not_handled_or_fail;
    if (!(epoch_object = PyObject_GetAttr(engine, names[N_EPOCH])) ||
        !(channel_epoch = PyObject_GetAttr(channel, names[N_EPOCH])))
        goto fail;
    int same = PyObject_RichCompareBool(epoch_object, channel_epoch, Py_EQ);
    if (same != 1) goto not_handled_or_fail_same;
    long long epoch = PyLong_AsLongLong(epoch_object), call = attr_int(engine, N_CALL);
    long long rounds = attr_int(channel, N_ROUNDS), count = attr_int(channel, N_COUNT);
    if (PyErr_Occurred()) goto fail;
    long long parity = rounds & 1;
    /* The spin's look at the machine still fresh (else Spin.ns looks again). */
    int spare = attr_true(spin, N_SPARE);
    long long checked = attr_int(spin, N_CHECKED), spin_ns = attr_int(spin, N_NS), max_ns = attr_int(spin, N_MAX_NS);
    if (spare < 0 || PyErr_Occurred()) goto fail;
    int64_t *ctl = (int64_t *)(intptr_t)ctl_address;
    if (monotonic_ns() - checked >= (spare ? ctl[C_SPARE_CHECK_NS] : ctl[C_SPARE_RECHECK_NS])) goto not_handled;
    double patience;
    if (args[11] == Py_None) {
        PyObject *config = PyObject_GetAttr(comm, names[N_CONFIG]);
        if (!config) goto fail;
        PyObject *value = PyObject_GetAttr(config, names[N_TIMEOUT]);
        Py_DECREF(config);
        if (!value) goto fail;
        patience = PyFloat_AsDouble(value);
        Py_DECREF(value);
    } else {
        patience = PyFloat_AsDouble(args[11]);
    }
    if (PyErr_Occurred()) goto fail;

    /* The operation's number: from here on it counts in the group, and errors mark a fence. */
    PyObject *sequence = PyObject_GetAttr(comm, names[N_SEQUENCE]);
    if (!sequence) goto fail;
    if (!(key = Py_BuildValue("(LL)", epoch, call))) {
        Py_DECREF(sequence);
        goto fail;
    }
    /* GroupState.next's common case in C: the numbers of this (epoch, call) already counting. */
    PyObject *numbers = PyObject_GetAttr(sequence, names[N_NUMBERS]);
    if (numbers && PyTuple_Check(numbers) && PyTuple_GET_SIZE(numbers) == 2 &&
        PyObject_RichCompareBool(PyTuple_GET_ITEM(numbers, 0), key, Py_EQ) == 1)
        seq_object = PyIter_Next(PyTuple_GET_ITEM(numbers, 1));
    else if (!PyErr_Occurred())
        seq_object = PyObject_CallMethodObjArgs(sequence, names[N_NEXT], key, NULL);
    Py_XDECREF(numbers);
    Py_DECREF(sequence);
    if (!seq_object) goto fail;
    numbered = 1;
    long long seq = PyLong_AsLongLong(seq_object);
    if (PyErr_Occurred() || set_attr_int(channel, N_ROUNDS, rounds + 1) < 0 || set_attr_int(channel, N_COUNT, count + 1) < 0)
        goto fail;
    /* The signature's bytes in this rank's buffer of the parity, unless they are there already. */
    int signed_here = PyObject_RichCompareBool(PyList_GET_ITEM(written, parity), PyTuple_GET_ITEM(signature, 2), Py_EQ);
    if (signed_here < 0) goto fail;
    if (!signed_here) {
        PyObject *result = PyObject_CallMethod(channel, "write_signature_bytes", "LOO", parity,
                                               PyTuple_GET_ITEM(signature, 1), PyTuple_GET_ITEM(signature, 2));
        if (!result) goto fail;
        Py_DECREF(result);
    }
    long long signature_id = PyLong_AsLongLong(PyTuple_GET_ITEM(signature, 2));
    long long target = (epoch << EPOCH_SHIFT) | (count + 1), position = (call << 32) | seq;
    long long slice_ns = patience >= (double)ctl[C_SLICE_NS] / 1e9 ? ctl[C_SLICE_NS] : (long long)(patience * 1e9);
    long long spin_now = spare ? spin_ns : 0;
    long long elements = 0;
    if (args[13] != Py_None) {
        elements = PyLong_AsLongLong(args[13]);
    } else if (x != Py_None) {
        elements = attr_int(x, N_SIZE);
    }
    if (PyErr_Occurred()) goto fail;
    int status;
    if (kind == KIND_HALVES) {
        const long long v[12] = {parity, target, signature_id, position, spin_now, yields, slice_ns, dtype, op,
                                 elements, source, offset};
        status = rp_call_halves(ctl, x, v);
    } else {
        const long long v[12] = {parity, target, signature_id, position, spin_now, yields, slice_ns, kind, dtype, op,
                                 elements, offset};
        status = rp_call_round(ctl, x, out, source, v);
    }
    if (status != DONE) { /* waits past the spin, errors, arrays the call cannot take: Python's */
        answer = PyObject_CallMethod(small, "_after_round", "OOOiLLOLLLdOOOOOOLOOOL", comm, args[2], seq_object,
                                     status, parity, target, signature, position, spin_now, slice_ns, patience,
                                     args[4], args[5], args[6], x, out, args[9], elements, args[14], args[12],
                                     epoch_object, call);
        if (!answer) goto fail;
        goto release;
    }
    if (kind == KIND_HALVES) { /* the publishes it made */
        const int64_t *chunks = (const int64_t *)(intptr_t)ctl[C_CHUNKS];
        if (set_attr_int(channel, N_COUNT, chunks[R_COUNT]) < 0) goto fail;
    }
    if (ctl[C_SLEPT] || spin_ns < max_ns) { /* (a spin at its longest that answered stays so) */
        PyObject *result = PyObject_CallMethod(spin, "answered", "OL", ctl[C_SLEPT] ? Py_False : Py_True,
                                               (long long)ctl[kind == KIND_HALVES ? C_ARRIVAL_NS : C_WAITED_NS]);
        if (!result) goto fail;
        Py_DECREF(result);
    }
    if (sent) {
        /* engine.count_sent's work, under its lock: bytes_sent[gid] += sent */
        PyObject *held = PyObject_CallMethodObjArgs(send_lock, names[N_ACQUIRE], NULL);
        int counted = -1;
        if (held) {
            PyObject *before = PyObject_GetItem(totals, gid); /* (a defaultdict: 0 for a new group) */
            PyObject *amount = before ? PyLong_FromLongLong(sent) : NULL;
            PyObject *after = amount ? PyNumber_Add(before, amount) : NULL;
            counted = after ? PyObject_SetItem(totals, gid, after) : -1;
            Py_XDECREF(before);
            Py_XDECREF(amount);
            Py_XDECREF(after);
            PyObject *type, *value, *traceback;
            PyErr_Fetch(&type, &value, &traceback);
            PyObject *released = PyObject_CallMethodObjArgs(send_lock, names[N_RELEASE], NULL);
            Py_XDECREF(released);
            if (type) PyErr_Restore(type, value, traceback);
            else if (!released) counted = -1;
        }
        Py_XDECREF(held);
        if (counted < 0) goto fail;
    }
    handled = out != Py_None ? FILLED : UNFILLED;
    goto release;

not_handled_or_fail_same:
not_handled_or_fail:
    if (PyErr_Occurred()) goto fail;
not_handled:
    handled = NOT_HANDLED;
    goto release;
fail_or_not_handled:
    if (!PyErr_Occurred()) goto not_handled;
fail:
    if (numbered) { /* as _run: the group's later operations go after a fence */
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        PyObject_SetAttr(engine, names[N_NEEDS_FENCE], Py_True);
        PyErr_Restore(type, value, traceback);
    }
    Py_CLEAR(answer);
release:
    if (locked) {
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        PyObject *result = PyObject_CallMethodObjArgs(lock, names[N_RELEASE], NULL);
        Py_XDECREF(result);
        if (type) PyErr_Restore(type, value, traceback);
        else if (!result) Py_CLEAR(answer); /* (the release's own error stands) */
    }
done:
    Py_XDECREF(fixed);
    Py_XDECREF(epoch_object);
    Py_XDECREF(channel_epoch);
    Py_XDECREF(seq_object);
    Py_XDECREF(key);
    if (PyErr_Occurred()) {
        Py_XDECREF(answer);
        return NULL;
    }
    return answer ? answer : PyLong_FromLongLong(handled);
}
