/* The monotonic clock in nanoseconds, for the C helpers' spins, sleeps and wait accounting (one
definition for every helper: shm_wait.c, shm_small.c, shm_reduce_chunks.c, shm_p2p.c). */
#ifndef RINGPIPE_MONOTONIC_CLOCK_H
#define RINGPIPE_MONOTONIC_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#endif
