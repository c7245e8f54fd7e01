/* One round of a small collective on a same-host group channel, in one call (runtime/shm_small.py).

The caller has already copied its payload into its own buffer of the round's parity. This call
writes the round's signature id and position, publishes this rank's counter, waits (spin, then
at most one futex sleep) until every member has published, checks every member's signature and
epoch, and for an all-reduce sums (or takes max / min of) every member's buffer in rank order into
the scratch area: the same order as the Python path, so every rank gets the same bits.

Everything goes through one control block of 64-bit words (the layout below, mirrored in
shm_small.py), so that a call from Python passes one pointer. The GIL is released during the call
(ctypes), so the engine thread can run meanwhile (an abort wakes the sleeper through
ctl[C_SLEEPING_ON]). */
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "reduce_loops.h" /* rp_reduce_pair: the loops shared with reduce_sum.c */
#include "monotonic_clock.h"
#include "shm_wait.h"
#include "reduce_sum.h"

enum {
    C_N, C_ME, C_PARITY, C_TARGET, C_SIGNATURE, C_POSITION, C_SPIN_NS, C_YIELD, C_TIMEOUT_NS, C_KIND,
    C_DTYPE, C_OP, C_COUNT, C_PHASE, C_PEER, C_WAITED_NS, C_SLEEPING_ON, C_SCRATCH, C_OFFSET, C_SLEPT,
    C_MEMBERS = 24, /* then per member: counter, sleepers, ids[2], buffers[2] (addresses) */
    C_PER_MEMBER = 6,
};
enum { DONE = 0, PENDING = 1, LATER_EPOCH = 2, MISMATCH = 3 };
enum { KIND_BARRIER = 0, KIND_REDUCE = 1 };
enum { EPOCH_SHIFT = 40, MAX_SUM_INPUTS = 64 };

#define MEMBER(ctl, i, field) ((ctl)[C_MEMBERS + (i) * C_PER_MEMBER + (field)])

/* Wait until every member's counter reaches ctl[C_TARGET]: spin for ctl[C_SPIN_NS] in all, then
   sleep on each member not there in turn, for ctl[C_TIMEOUT_NS] in all (one return to Python per
   slice, not per member: at 4 ranks a round's waiters would otherwise come back up to 3 times).
   A wake without the member there (an abort's, or the slice's end) returns at once. Returns the
   first member still behind (-1: none). */
static int64_t wait_members(int64_t *ctl) {
    int64_t n = ctl[C_N], me = ctl[C_ME];
    uint64_t target = (uint64_t)ctl[C_TARGET];
    int64_t spin_ns = ctl[C_SPIN_NS], timeout_ns = ctl[C_TIMEOUT_NS];
    int yield = (int)ctl[C_YIELD];
    int64_t spin_end = spin_ns > 0 ? now_ns() + spin_ns : 0;
    int64_t sleep_end = 0;
    for (int64_t peer = 0; peer < n; peer++) {
        if (peer == me) continue;
        uint64_t *word = (uint64_t *)MEMBER(ctl, peer, 0);
        uint32_t *sleepers = (uint32_t *)MEMBER(ctl, peer, 1);
        if (__atomic_load_n(word, __ATOMIC_ACQUIRE) >= target) continue;
        int64_t left = spin_end ? spin_end - now_ns() : 0;
        if (left > 0 && rp_wait_at_least(word, sleepers, target, left, yield, 0) >= target) continue;
        if (timeout_ns <= 0) return peer;
        if (!sleep_end) sleep_end = now_ns() + timeout_ns;
        left = sleep_end - now_ns();
        if (left <= 0) return peer;
        ctl[C_SLEPT] = 1;
        __atomic_store_n(&ctl[C_SLEEPING_ON], (int64_t)(intptr_t)word, __ATOMIC_SEQ_CST);
        uint64_t value = rp_wait_at_least(word, sleepers, target, 0, 0, left);
        __atomic_store_n(&ctl[C_SLEEPING_ON], 0, __ATOMIC_SEQ_CST);
        if (value < target) return peer;
    }
    return -1;
}

/* One round (see the top). Returns DONE, PENDING (ctl[C_PEER] has not published yet: the caller
   looks at aborts and deadlines, then calls again, which resumes the wait), LATER_EPOCH or
   MISMATCH (ctl[C_PEER] is that member; the caller builds the error). */
int rp_small_round(int64_t *ctl) {
    int64_t n = ctl[C_N], me = ctl[C_ME], parity = ctl[C_PARITY];
    uint64_t target = (uint64_t)ctl[C_TARGET];
    int64_t started = now_ns();
    if (ctl[C_PHASE] == 0) {
        uint64_t *ids = (uint64_t *)MEMBER(ctl, me, 2 + parity);
        ids[0] = (uint64_t)ctl[C_SIGNATURE];
        ids[1] = (uint64_t)ctl[C_POSITION];
        rp_publish((uint64_t *)MEMBER(ctl, me, 0), (uint32_t *)MEMBER(ctl, me, 1), target);
        ctl[C_PHASE] = 1;
        ctl[C_WAITED_NS] = 0;
        ctl[C_SLEPT] = 0;
    }
    int64_t behind = wait_members(ctl);
    ctl[C_WAITED_NS] += now_ns() - started;
    if (behind >= 0) {
        ctl[C_PEER] = behind;
        return PENDING;
    }
    for (int64_t peer = 0; peer < n; peer++) {
        if (peer == me) continue;
        ctl[C_PEER] = peer;
        uint64_t value = __atomic_load_n((uint64_t *)MEMBER(ctl, peer, 0), __ATOMIC_ACQUIRE);
        if (value >> EPOCH_SHIFT != target >> EPOCH_SHIFT) return LATER_EPOCH;
        const uint64_t *ids = (const uint64_t *)MEMBER(ctl, peer, 2 + parity);
        if (ids[0] != (uint64_t)ctl[C_SIGNATURE] || ids[1] != (uint64_t)ctl[C_POSITION]) return MISMATCH;
    }
    if (ctl[C_KIND] == KIND_REDUCE) {
        /* ((b0 op b1) op b2) op ...: as shm_collectives' all_reduce and reduce_scatter, so the bits
           match; each buffer read from byte C_OFFSET on (a reduce-scatter's row of this rank). */
        void *out = (void *)ctl[C_SCRATCH];
        int64_t count = ctl[C_COUNT], offset = ctl[C_OFFSET];
        int dtype = (int)ctl[C_DTYPE], op = (int)ctl[C_OP];
        if (n == 1) return DONE; /* never: one-rank groups do not open channels */
        if (op == RP_OP_SUM && dtype <= 1 && n <= MAX_SUM_INPUTS) {
            /* Float sums in reduce_sum.c's code, which the Python round calls too: the compiler may
               order x + y's operands differently in two copies of a loop, and where two ranks add
               NaNs of different signs or payloads, ranks on different paths then got different bits. */
            const void *inputs[MAX_SUM_INPUTS];
            for (int64_t peer = 0; peer < n; peer++) inputs[peer] = (const char *)MEMBER(ctl, peer, 4 + parity) + offset;
            if (dtype == 0) rp_sum_f32((const float *const *)inputs, (int)n, count, 0.0f, (float *)out, 0);
            else rp_sum_f64((const double *const *)inputs, (int)n, count, 0.0, (double *)out, 0);
            return DONE;
        }
        rp_reduce_pair(out, (const char *)MEMBER(ctl, 0, 4 + parity) + offset,
                       (const char *)MEMBER(ctl, 1, 4 + parity) + offset, count, dtype, op);
        for (int64_t peer = 2; peer < n; peer++)
            rp_reduce_pair(out, out, (const char *)MEMBER(ctl, peer, 4 + parity) + offset, count, dtype, op);
    }
    return DONE;
}
