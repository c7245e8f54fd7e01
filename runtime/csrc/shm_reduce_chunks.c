/* One buffer-sized round of a large same-host all_reduce in C (runtime/shm_reduce_chunks.py): the
chunk loop of shm_collectives._reduce_round, step for step, so that a member in this loop and one in
the Python loop meet (the same publishes, the same sums in the same order, the same bits).

Per chunk (its bounds split it into n parts, part i summed by member i):
  copy in   this rank copies the parts its peers sum into its buffer, publishes;
  reduce    once every member published that, it sums its own part in rank order, from the caller's
            array (its own input) and the peers' buffers, into its buffer and the caller's array,
            publishes;
  copy out  once every member published its sum, it copies the peers' sums into the caller's array.
The copy in of chunk i + 1 goes between the sum of chunk i and the wait for the peers' sums.
Chunks take turns in SLOTS chunk-sized slots at the start of each member's buffer (at() below), as
shm_collectives._reduce_round's do: a round keeps two chunks of buffer in the caches, not the piece.

A wait here only spins (the spin the caller gives, GIL released by ctypes); when a member is not
there by then, the call returns WAIT with that member and the counter value it needs, and the
caller waits in Python (GroupChannel._wait: the sleeps, aborts, deadline and epoch checks), then
calls again, which resumes where it stopped. It also returns once, SIGNATURES, after the first
wait of a round that carries the signature, for the caller to check every member's.

The state is an array of 64-bit words (the layout below, mirrored in shm_reduce_chunks.py). */
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "reduce_loops.h"
#include "monotonic_clock.h"
#include "shm_wait.h"
#include "reduce_sum.h"
#include "stream_store.h"
#include "shm_reduce_chunks.h"

enum { STEP_START, STEP_WAIT_COPIES, STEP_REDUCE, STEP_WAIT_SUMS, STEP_DONE };
enum { EPOCH_SHIFT = 40, MAX_MEMBERS = 64 };

#define MEMBER(s, i, field) ((s)[R_MEMBERS + (i) * R_PER_MEMBER + (field)])
#define BUFFER(s, i) ((char *)(intptr_t)MEMBER(s, i, 2))
enum { SLOTS = 2 }; /* shm_collectives.CHUNK_SLOTS */

/* Element `e` of the chunk that starts at element `lo`, in member `i`'s buffer: a whole chunk k sits
   in slot k % SLOTS, a short last one at its own place (shm_collectives.chunk_start says why). */
static char *at(const int64_t *s, int64_t i, int64_t lo, int64_t e) {
    int64_t chunk = s[R_CHUNK];
    int64_t start = lo + chunk <= s[R_SIZE] ? (lo / chunk) % SLOTS * chunk : lo;
    return BUFFER(s, i) + (start + e - lo) * s[R_ITEMSIZE];
}

/* Part `i`'s first element of chunk [lo, hi): as _reduce_round's spans. */
static int64_t bound(int64_t lo, int64_t hi, int64_t i, int64_t n) { return lo + (hi - lo) * i / n; }

static void publish(int64_t *s) {
    int64_t me = s[R_ME];
    s[R_COUNT] += 1;
    rp_publish((uint64_t *)MEMBER(s, me, 0), (uint32_t *)MEMBER(s, me, 1), (uint64_t)(s[R_EPOCH] | s[R_COUNT]));
}

/* Every member at R_TARGET (spinning at most R_SPIN_NS in all, over the members); else R_PEER is the
   first that is not (or is at another epoch: the caller's wait raises for that) and this returns 0.
   Past the collective's first wait every member is in it, moving chunks: a wait there spins at least
   R_SPIN_IN_NS (the longest spin), since a peer that sleeps at each chunk must be woken at each chunk,
   and the caller's adaptive spin, shortened by one long arrival, kept them so (a 64 MiB all_reduce at
   2 ranks took 50-80 ms instead of 6-7 in whole runs). */
int rp_chunks_arriving(const int64_t *s) { return s[R_FIRST] && s[R_INDEX] == 0 && s[R_STEP] == STEP_WAIT_COPIES; }

static int arrived(int64_t *s) {
    uint64_t target = (uint64_t)s[R_TARGET];
    int arrival = rp_chunks_arriving(s);
    int64_t spin = !arrival && s[R_SPIN_IN_NS] > s[R_SPIN_NS] ? s[R_SPIN_IN_NS] : s[R_SPIN_NS];
    for (int64_t peer = 0; peer < s[R_N]; peer++) {
        if (peer == s[R_ME]) continue;
        uint64_t *word = (uint64_t *)MEMBER(s, peer, 0);
        uint64_t value = __atomic_load_n(word, __ATOMIC_ACQUIRE);
        if (value < target && spin > 0) { /* the spin counts as waiting on the peer in the trace, as sleeps do */
            int64_t started = now_ns();
            value = rp_wait_at_least(word, (uint32_t *)MEMBER(s, peer, 1), target, spin, (int)s[R_YIELD], 0);
            int64_t spun = now_ns() - started;
            s[R_WAITED_NS] += spun;
            if (arrival) s[R_ARRIVAL_NS] += spun;
            spin -= spun;
        }
        if (value < target || value >> EPOCH_SHIFT != target >> EPOCH_SHIFT) {
            s[R_PEER] = peer;
            return 0;
        }
    }
    return 1;
}

static void copy_in(int64_t *s, int64_t lo, int64_t hi) {
    int64_t n = s[R_N], me = s[R_ME], size = s[R_ITEMSIZE];
    const char *piece = (const char *)(intptr_t)s[R_PIECE];
    int64_t first = bound(lo, hi, 0, n), own_lo = bound(lo, hi, me, n), own_hi = bound(lo, hi, me + 1, n);
    int64_t last = bound(lo, hi, n, n);
    int64_t stream = s[R_STREAM_MIN];
    if (own_lo > first)
        rp_copy_for_peers(at(s, me, lo, first), piece + first * size, (size_t)((own_lo - first) * size), stream);
    if (last > own_hi)
        rp_copy_for_peers(at(s, me, lo, own_hi), piece + own_hi * size, (size_t)((last - own_hi) * size), stream);
}

/* This rank's part of the chunk, in rank order, into its buffer and the caller's array. */
static void reduce_own(int64_t *s, int64_t lo, int64_t hi) {
    int64_t n = s[R_N], me = s[R_ME], size = s[R_ITEMSIZE];
    int64_t a = bound(lo, hi, me, n), b = bound(lo, hi, me + 1, n), count = b - a;
    char *piece = (char *)(intptr_t)s[R_PIECE] + a * size;
    char *mine = at(s, me, lo, a);
    const void *inputs[MAX_MEMBERS];
    for (int64_t peer = 0; peer < n; peer++) inputs[peer] = peer == me ? piece : at(s, peer, lo, a);
    int dtype = (int)s[R_DTYPE], op = (int)s[R_OP];
    int stream = s[R_STREAM_MIN] > 0 && count * size >= s[R_STREAM_MIN];
    if (op == RP_OP_SUM && dtype == 0) {
        rp_sum_f32((const float *const *)inputs, (int)n, count, (float)s[R_DIVISOR], (float *)mine, (float *)piece,
                   stream);
    } else if (op == RP_OP_SUM && dtype == 1) {
        rp_sum_f64((const double *const *)inputs, (int)n, count, (double)s[R_DIVISOR], (double *)mine,
                   (double *)piece, stream);
    } else { /* ((in0 op in1) op in2) ...: as reduce_into; no divisor (averages are floats) */
        rp_reduce_pair(mine, inputs[0], inputs[1], count, dtype, op);
        for (int64_t peer = 2; peer < n; peer++) rp_reduce_pair(mine, mine, inputs[peer], count, dtype, op);
        memcpy(piece, mine, (size_t)(count * size));
    }
}

static void copy_out(int64_t *s, int64_t lo, int64_t hi) {
    int64_t n = s[R_N], me = s[R_ME], size = s[R_ITEMSIZE];
    char *piece = (char *)(intptr_t)s[R_PIECE];
    for (int64_t peer = 0; peer < n; peer++) {
        if (peer == me) continue;
        int64_t a = bound(lo, hi, peer, n), b = bound(lo, hi, peer + 1, n);
        memcpy(piece + a * size, at(s, peer, lo, a), (size_t)((b - a) * size));
    }
}

/* (shm_reduce_chunks.h) */
int rp_reduce_chunks(int64_t *s) {
    if (s[R_N] > MAX_MEMBERS) return CHUNKS_UNSUPPORTED;
    int64_t chunk = s[R_CHUNK], size = s[R_SIZE];
    for (;;) {
        int64_t lo = s[R_INDEX] * chunk, hi = lo + chunk < size ? lo + chunk : size;
        switch (s[R_STEP]) {
        case STEP_START:
            copy_in(s, lo, hi);
            publish(s);
            s[R_TARGET] = s[R_EPOCH] | s[R_COUNT];
            s[R_STEP] = STEP_WAIT_COPIES;
            break;
        case STEP_WAIT_COPIES:
            if (!arrived(s)) return CHUNKS_WAIT;
            s[R_STEP] = STEP_REDUCE;
            if (s[R_FIRST] && s[R_INDEX] == 0) return CHUNKS_SIGNATURES;
            break;
        case STEP_REDUCE:
            reduce_own(s, lo, hi);
            publish(s);
            if (hi < size) { /* the next chunk's copy in, while the peers sum this one */
                int64_t next_hi = hi + chunk < size ? hi + chunk : size;
                copy_in(s, hi, next_hi);
                publish(s);
                s[R_TARGET] = s[R_EPOCH] | (s[R_COUNT] - 1);
            } else {
                s[R_TARGET] = s[R_EPOCH] | s[R_COUNT];
            }
            s[R_STEP] = STEP_WAIT_SUMS;
            break;
        case STEP_WAIT_SUMS:
            if (!arrived(s)) return CHUNKS_WAIT;
            copy_out(s, lo, hi);
            if (hi >= size) {
                s[R_STEP] = STEP_DONE;
                return CHUNKS_DONE;
            }
            s[R_INDEX] += 1;
            s[R_TARGET] = s[R_EPOCH] | s[R_COUNT];
            s[R_STEP] = STEP_WAIT_COPIES;
            break;
        default:
            return CHUNKS_DONE;
        }
    }
}
