/* The futex waits of csrc/shm_wait.c, for the helpers that wait on a shared counter themselves
(shm_small.c, shm_reduce_chunks.c, shm_p2p.c): one declaration, checked against the definition. */
#ifndef RINGPIPE_SHM_WAIT_H
#define RINGPIPE_SHM_WAIT_H

#include <stdint.h>

/* The counter at `word` once >= target, else its value after spinning `spin_ns` (yielding between
   looks with `yield`) and then sleeping at most `timeout_ns` on it. */
uint64_t rp_wait_at_least(uint64_t *word, uint32_t *sleepers, uint64_t target, int64_t spin_ns, int yield,
                          int64_t timeout_ns);
/* Store `value` and wake the word's sleepers, if any. */
void rp_publish(uint64_t *word, uint32_t *sleepers, uint64_t value);
/* Wake the word's sleepers without a change (an abort). */
void rp_wake(uint64_t *word);

#endif
