/* The elementwise reductions of the same-host collectives, in one place for every C helper that
reduces (reduce_sum.c: the sums of large collectives; shm_small.c: the rounds of small ones).

rp_reduce_pair(out, a, b, count, dtype, op): out[i] = a[i] (op) b[i], dtype codes as
shm_small.DTYPES, op codes RP_OP_*; out may be a or b (element i is read before it is written
there, hence ivdep). A reduction of n inputs is ((in0 op in1) op in2) op ...: the order NumPy's
ufunc applied input by input takes, so every path gets the same bits (no -ffast-math: the compiler
may not reassociate).
- Integer sums wrap (as NumPy's); unsigned arithmetic makes that defined behaviour in C.
- Float max / min propagate NaN as np.maximum / np.minimum do, and on a tie take the second operand
  as they do, so max(+0, -0) is -0 on every path and ranks on different paths agree bitwise. */
#ifndef RINGPIPE_REDUCE_LOOPS_H
#define RINGPIPE_REDUCE_LOOPS_H

#include <stdint.h>

enum { RP_OP_SUM = 0, RP_OP_MAX = 1, RP_OP_MIN = 2 };

#define RP_PAIR(NAME, T, EXPR)                                                                     \
    static inline void NAME(T *o, const T *p, const T *q, int64_t count) {                         \
        _Pragma("GCC ivdep") for (int64_t i = 0; i < count; i++) {                                 \
            T x = p[i], y = q[i];                                                                  \
            o[i] = (EXPR);                                                                         \
        }                                                                                          \
    }
#define RP_INTEGER(SUFFIX, T, U)                                                                   \
    RP_PAIR(rp_add_##SUFFIX, T, (T)((U)x + (U)y))                                                  \
    RP_PAIR(rp_max_##SUFFIX, T, x >= y ? x : y)                                                    \
    RP_PAIR(rp_min_##SUFFIX, T, x <= y ? x : y)
#define RP_FLOAT(SUFFIX, T)                                                                        \
    RP_PAIR(rp_add_##SUFFIX, T, x + y)                                                             \
    RP_PAIR(rp_max_##SUFFIX, T, (x > y || x != x) ? x : y)                                         \
    RP_PAIR(rp_min_##SUFFIX, T, (x < y || x != x) ? x : y)

RP_FLOAT(f32, float)
RP_FLOAT(f64, double)
RP_INTEGER(i8, int8_t, uint8_t)
RP_INTEGER(i16, int16_t, uint16_t)
RP_INTEGER(i32, int32_t, uint32_t)
RP_INTEGER(i64, int64_t, uint64_t)
RP_INTEGER(u8, uint8_t, uint8_t)
RP_INTEGER(u16, uint16_t, uint16_t)
RP_INTEGER(u32, uint32_t, uint32_t)
RP_INTEGER(u64, uint64_t, uint64_t)

#define RP_DISPATCH(SUFFIX, T)                                                                     \
    switch (op) {                                                                                  \
    case RP_OP_SUM: rp_add_##SUFFIX((T *)out, (const T *)a, (const T *)b, count); return 0;        \
    case RP_OP_MAX: rp_max_##SUFFIX((T *)out, (const T *)a, (const T *)b, count); return 0;        \
    case RP_OP_MIN: rp_min_##SUFFIX((T *)out, (const T *)a, (const T *)b, count); return 0;        \
    }                                                                                              \
    return -1;

/* out = a (op) b, elementwise. Returns -1 for a dtype or op it does not take. */
static inline int rp_reduce_pair(void *out, const void *a, const void *b, int64_t count, int dtype, int op) {
    switch (dtype) {
    case 0: RP_DISPATCH(f32, float)
    case 1: RP_DISPATCH(f64, double)
    case 2: RP_DISPATCH(i8, int8_t)
    case 3: RP_DISPATCH(i16, int16_t)
    case 4: RP_DISPATCH(i32, int32_t)
    case 5: RP_DISPATCH(i64, int64_t)
    case 6: RP_DISPATCH(u8, uint8_t)
    case 7: RP_DISPATCH(u16, uint16_t)
    case 8: RP_DISPATCH(u32, uint32_t)
    case 9: RP_DISPATCH(u64, uint64_t)
    }
    return -1;
}

#endif
