/* Waiting on a counter in shared memory between processes of one host (runtime/shm_wait.py).

A counter is a 64-bit word; a waiter spins briefly, then sleeps in the kernel with FUTEX_WAIT on
the word's low 32 bits (which change on every increment), so ranks that outnumber the cores do
not take CPU from the rank they wait for. `sleepers` counts the processes asleep on the word: a
publisher makes the wake-up system call only when there is one. Every wait has a timeout, so the
caller can look at aborts and deadlines between waits. */
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "monotonic_clock.h"
#include "shm_wait.h"

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* The counter's value once it is >= target; else its value after spinning for spin_ns (calling
   sched_yield between looks when `yield` is set: more ranks than cores) and then one sleep of at
   most timeout_ns, which a publish or a wake ends early. */
uint64_t rp_wait_at_least(uint64_t *word, uint32_t *sleepers, uint64_t target, int64_t spin_ns, int yield,
                          int64_t timeout_ns) {
    uint64_t value;
    if (spin_ns > 0) {
        int64_t spin_end = now_ns() + spin_ns;
        for (int64_t i = 1;; i++) {
            value = __atomic_load_n(word, __ATOMIC_ACQUIRE);
            if (value >= target) return value;
            if (yield) sched_yield(); else cpu_relax();
            if ((i & 31) == 0 && now_ns() >= spin_end) break;
        }
    }
    /* One sleep at most: a wake without a change (an abort) returns too, for the caller to look. */
    value = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    if (value >= target || timeout_ns <= 0) return value;
    __atomic_fetch_add(sleepers, 1, __ATOMIC_SEQ_CST);
    value = __atomic_load_n(word, __ATOMIC_SEQ_CST);
    if (value < target) {
        struct timespec ts = {(time_t)(timeout_ns / 1000000000LL), (long)(timeout_ns % 1000000000LL)};
        /* Shared (not PRIVATE) futex: the word lives in a file mapping of several processes. */
        syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, (uint32_t)value, &ts, NULL, 0);
        value = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    }
    __atomic_fetch_sub(sleepers, 1, __ATOMIC_SEQ_CST);
    return value;
}

/* Store `value` (after every earlier store of this thread: the payload) and wake the sleepers. */
void rp_publish(uint64_t *word, uint32_t *sleepers, uint64_t value) {
    __atomic_store_n(word, value, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(sleepers, __ATOMIC_SEQ_CST) > 0)
        syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Wake whoever sleeps on the word without changing it (an abort: sleepers look at it again). */
void rp_wake(uint64_t *word) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}
