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
#include "shm_reduce_chunks.h"
#include "stream_choice.h"

enum {
    C_N, C_ME, C_PARITY, C_TARGET, C_SIGNATURE, C_POSITION, C_SPIN_NS, C_YIELD, C_TIMEOUT_NS, C_KIND,
    C_DTYPE, C_OP, C_COUNT, C_PHASE, C_PEER, C_WAITED_NS, C_SLEEPING_ON, C_SCRATCH, C_OFFSET, C_SLEPT,
    C_STREAM_MIN, /* copies into this rank's buffer stream from here (bytes; 0: never): stream_store.h */
    C_CHUNKS, C_PIECE, C_DIVISOR, C_CHUNK, /* KIND_HALVES: the chunk loop's state, the caller's array, a
                                               divisor, the elements of a chunk */
    C_STREAM_REDUCE_MAX = 28, /* KIND_HALVES streams only up to this many bytes (stream_store.reduce_max_bytes) */
    C_SPIN_IN_NS = 29, /* KIND_HALVES: the spin of its waits past the first, where the first may spin */
    C_ARRIVAL_NS = 30, /* KIND_HALVES: of C_WAITED_NS, its first wait's (C_SLEPT: whether that one slept) */
    C_CHOICE = 31, /* the channel's stream_choice.h state (0: none, the size rule) */
    C_MEMBERS = 32, /* then per member: counter, sleepers, ids[2], buffers[2] (addresses) */
    C_PER_MEMBER = 6,
};
enum { DONE = 0, PENDING = 1, LATER_EPOCH = 2, MISMATCH = 3 };
enum { KIND_BARRIER = 0, KIND_REDUCE = 1, KIND_HALVES = 2 };
enum { EPOCH_SHIFT = 40, MAX_SUM_INPUTS = 64 };

#define MEMBER(ctl, i, field) ((ctl)[C_MEMBERS + (i) * C_PER_MEMBER + (field)])
#define MEMBER_STATE(s, i, field) ((s)[R_MEMBERS + (i) * R_PER_MEMBER + (field)])

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

/* Every peer at this round's epoch with this round's signature id and position (else LATER_EPOCH or
   MISMATCH, ctl[C_PEER] that member); once every member published. */
static int check_members(int64_t *ctl) {
    int64_t n = ctl[C_N], me = ctl[C_ME], parity = ctl[C_PARITY];
    uint64_t target = (uint64_t)ctl[C_TARGET];
    for (int64_t peer = 0; peer < n; peer++) {
        if (peer == me) continue;
        ctl[C_PEER] = peer;
        uint64_t value = __atomic_load_n((uint64_t *)MEMBER(ctl, peer, 0), __ATOMIC_ACQUIRE);
        if (value >> EPOCH_SHIFT != target >> EPOCH_SHIFT) return LATER_EPOCH;
        const uint64_t *ids = (const uint64_t *)MEMBER(ctl, peer, 2 + parity);
        if (ids[0] != (uint64_t)ctl[C_SIGNATURE] || ids[1] != (uint64_t)ctl[C_POSITION]) return MISMATCH;
    }
    return DONE;
}

static const int64_t ITEMSIZE[] = {4, 8, 1, 2, 4, 8, 1, 2, 4, 8}; /* by dtype code (reduce_loops.h) */

/* KIND_HALVES: an all-reduce of ctl[C_COUNT] elements at ctl[C_PIECE], in place, as the chunk loop's
   round in chunks of ctl[C_CHUNK] elements (shm_reduce_chunks.c: per chunk, copy in the peers' parts,
   sum this rank's part, copy out the peers' sums; two publishes a chunk), so that a member on the Python path (shm_collectives._reduce_round)
   meets it. The chunk loop's waits spin only; past the spin this sleeps on the member it waits for,
   ctl[C_TIMEOUT_NS] in all per call, then returns PENDING like wait_members (at once after a wake
   without that member). */
static int halves_round(int64_t *ctl) {
    int64_t *s = (int64_t *)(intptr_t)ctl[C_CHUNKS];
    int64_t n = ctl[C_N], parity = ctl[C_PARITY];
    if (ctl[C_PHASE] == 0) {
        uint64_t target = (uint64_t)ctl[C_TARGET];
        uint64_t *ids = (uint64_t *)MEMBER(ctl, ctl[C_ME], 2 + parity);
        ids[0] = (uint64_t)ctl[C_SIGNATURE];
        ids[1] = (uint64_t)ctl[C_POSITION];
        int64_t count = ctl[C_COUNT];
        s[R_N] = n, s[R_ME] = ctl[C_ME], s[R_PIECE] = ctl[C_PIECE], s[R_SIZE] = count;
        s[R_ITEMSIZE] = ITEMSIZE[ctl[C_DTYPE]], s[R_DTYPE] = ctl[C_DTYPE], s[R_OP] = ctl[C_OP];
        s[R_DIVISOR] = ctl[C_DIVISOR], s[R_CHUNK] = ctl[C_CHUNK] > 0 ? ctl[C_CHUNK] : 1;
        /* ctl[C_TARGET] is the first publish's value; the chunk loop counts from the one before */
        s[R_EPOCH] = (int64_t)(target >> EPOCH_SHIFT << EPOCH_SHIFT);
        s[R_COUNT] = (int64_t)(target & ((1ULL << EPOCH_SHIFT) - 1)) - 1;
        s[R_STEP] = 0, s[R_INDEX] = 0, s[R_YIELD] = ctl[C_YIELD], s[R_FIRST] = 1;
        int64_t bytes = count * s[R_ITEMSIZE];
        int64_t size_rule = bytes <= ctl[C_STREAM_REDUCE_MAX] ? ctl[C_STREAM_MIN] : 0;
        s[R_STREAM_MIN] = rp_stream_choose((int64_t *)(intptr_t)ctl[C_CHOICE], SC_KIND_HALVES, bytes, ctl[C_STREAM_MIN],
                                           size_rule); /* (rp_call_halves records its time) */
        s[R_SPIN_IN_NS] = ctl[C_SPIN_NS] > 0 ? ctl[C_SPIN_IN_NS] : 0; /* (no spin: no core spare) */
        for (int64_t member = 0; member < n; member++) {
            MEMBER_STATE(s, member, 0) = MEMBER(ctl, member, 0);
            MEMBER_STATE(s, member, 1) = MEMBER(ctl, member, 1);
            MEMBER_STATE(s, member, 2) = MEMBER(ctl, member, 4 + parity);
        }
        s[R_ARRIVAL_NS] = 0;
        ctl[C_PHASE] = 1;
        ctl[C_WAITED_NS] = 0;
        ctl[C_ARRIVAL_NS] = 0;
        ctl[C_SLEPT] = 0;
    }
    s[R_SPIN_NS] = ctl[C_SPIN_NS]; /* (0 once the caller sleeps in slices) */
    int64_t timeout_ns = ctl[C_TIMEOUT_NS], sleep_end = 0;
    for (;;) {
        s[R_WAITED_NS] = 0, s[R_ARRIVAL_NS] = 0;
        int status = rp_reduce_chunks(s);
        ctl[C_WAITED_NS] += s[R_WAITED_NS];
        ctl[C_ARRIVAL_NS] += s[R_ARRIVAL_NS];
        if (status == CHUNKS_DONE) break;
        if (status == CHUNKS_SIGNATURES) {
            int checked = check_members(ctl);
            if (checked != DONE) return checked;
            continue;
        }
        if (status != CHUNKS_WAIT) return MISMATCH; /* (never: n is at most MAX_SUM_INPUTS) */
        int64_t peer = s[R_PEER];
        uint64_t want = (uint64_t)s[R_TARGET];
        uint64_t *word = (uint64_t *)MEMBER(ctl, peer, 0);
        uint64_t value = __atomic_load_n(word, __ATOMIC_ACQUIRE);
        ctl[C_PEER] = peer;
        if (value >> EPOCH_SHIFT != want >> EPOCH_SHIFT && value >= want) return LATER_EPOCH;
        if (!sleep_end) sleep_end = now_ns() + timeout_ns;
        int64_t left = sleep_end - now_ns();
        if (timeout_ns <= 0 || left <= 0) return PENDING;
        int64_t slept_from = now_ns();
        int arriving = rp_chunks_arriving(s);
        if (arriving) ctl[C_SLEPT] = 1;
        __atomic_store_n(&ctl[C_SLEEPING_ON], (int64_t)(intptr_t)word, __ATOMIC_SEQ_CST);
        uint64_t reached = rp_wait_at_least(word, (uint32_t *)MEMBER(ctl, peer, 1), want, 0, 0, left);
        __atomic_store_n(&ctl[C_SLEEPING_ON], 0, __ATOMIC_SEQ_CST);
        int64_t slept = now_ns() - slept_from;
        ctl[C_WAITED_NS] += slept;
        if (arriving) ctl[C_ARRIVAL_NS] += slept;
        /* A wake without the member there (an abort's or a destroyed group's: GroupChannel._wake_sleeper)
           returns at once for the caller to look, as wait_members does; sleeping on, the caller saw an
           abort only at the slice's end. */
        if (reached < want) return PENDING;
    }
    return DONE;
}

/* One round (see the top). Returns DONE, PENDING (ctl[C_PEER] has not published yet: the caller
   looks at aborts and deadlines, then calls again, which resumes the wait), LATER_EPOCH or
   MISMATCH (ctl[C_PEER] is that member; the caller builds the error). */
int rp_small_round(int64_t *ctl) {
    if (ctl[C_KIND] == KIND_HALVES) return halves_round(ctl);
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
    int checked = check_members(ctl);
    if (checked != DONE) return checked;
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
            if (dtype == 0) rp_sum_f32((const float *const *)inputs, (int)n, count, 0.0f, (float *)out, 0, 0);
            else rp_sum_f64((const double *const *)inputs, (int)n, count, 0.0, (double *)out, 0, 0);
            return DONE;
        }
        rp_reduce_pair(out, (const char *)MEMBER(ctl, 0, 4 + parity) + offset,
                       (const char *)MEMBER(ctl, 1, 4 + parity) + offset, count, dtype, op);
        for (int64_t peer = 2; peer < n; peer++)
            rp_reduce_pair(out, out, (const char *)MEMBER(ctl, peer, 4 + parity) + offset, count, dtype, op);
    }
    return DONE;
}
