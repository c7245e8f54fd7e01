/* The chunk loop of a large same-host all_reduce round (csrc/shm_reduce_chunks.c): its state words
and its entry, for shm_reduce_chunks.c itself and for the latency path's reduce-scatter + all-gather
round (csrc/shm_small.c), which runs this loop on one chunk. */
#ifndef RINGPIPE_SHM_REDUCE_CHUNKS_H
#define RINGPIPE_SHM_REDUCE_CHUNKS_H

#include <stdint.h>

enum {
    R_N, R_ME, R_PIECE, R_SIZE, R_ITEMSIZE, R_DTYPE, R_OP, R_DIVISOR, R_CHUNK, R_EPOCH, R_COUNT, R_STEP,
    R_INDEX, R_PEER, R_TARGET, R_SPIN_NS, R_YIELD, R_FIRST, R_WAITED_NS,
    R_STREAM_MIN, /* what this rank writes for its peers streams from here (bytes; 0: never): stream_store.h */
    R_SPIN_IN_NS, /* the spin of every wait but the collective's first (every member is in it then) */
    R_ARRIVAL_NS, /* of R_WAITED_NS, the spin of that first wait (what the caller's adaptive spin learns from) */
    R_MEMBERS = 24, /* then per member: counter, sleepers, buffer (addresses, this round's parity) */
    R_PER_MEMBER = 3,
};
enum { CHUNKS_DONE = 0, CHUNKS_WAIT = 1, CHUNKS_SIGNATURES = 2, CHUNKS_UNSUPPORTED = 3 };

/* Runs (or resumes) the round; returns CHUNKS_DONE, CHUNKS_WAIT (R_PEER not at R_TARGET yet),
   CHUNKS_SIGNATURES (check them, then call again) or CHUNKS_UNSUPPORTED (a group too large for the inputs array: nothing done). */
int rp_reduce_chunks(int64_t *s);
/* 1 while the round waits for the members to arrive in the collective (its first wait), else 0. */
int rp_chunks_arriving(const int64_t *s);

#endif
