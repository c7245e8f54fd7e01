/* Sums for the same-host collectives (runtime/reduce_kernels.py): one pass over the inputs instead
of NumPy's pass per input plus a copy, with the GIL released (ctypes).

out[i] = ((in[0][i] + in[1][i]) + in[2][i]) + ...: the same order, and so the same bits, as NumPy's
np.add applied input by input (the loops of reduce_loops.h, shared with shm_small.c). With a
non-zero `divisor`, out[i] is then divided by it (an average, as np.divide would). With `copy`, the
result goes there too (a collective's shared buffer and the caller's array in one pass). `out` may
be in[0] or in[1] (it holds partial sums before in[2] onwards are added), `copy` any input (it is
written last); element i is read before it is written there, hence ivdep. Elements go in blocks
that stay in the L1 cache while every input is added. With `stream_out`, `out` (a shared buffer that
peers read next) gets streaming stores (stream_store.h): each block is summed in a staging block,
then streamed, so `out` may still alias in[0] or in[1] (a block is written after it is read). */
#include <stdint.h>
#include <string.h>

#include "reduce_loops.h"
#include "reduce_sum.h"
#include "stream_store.h"

#define BLOCK 2048

/* The two-input sum with a copy, its output streamed, in one pass (a 2-rank round's own part): the
staged path below made three passes and took twice as long (256 KiB: 70 against 32 us unstreamed, one
process). Each element of a collective is summed by one rank only on every path that streams (the
rounds that reduce-scatter), so the vector add here need not match the scalar loops' NaN operand order. */
#if defined(__SSE2__)
#include <emmintrin.h>
#define SUM2_STREAM(NAME, T, VEC, LOAD, ADD, STREAM, STORE, WIDTH)                                  \
    static int64_t NAME(const T *a, const T *b, T *o, T *d, int64_t m) {                           \
        int64_t j = 0;                                                                             \
        for (; j < m && ((uintptr_t)(o + j) & 15); j++) d[j] = o[j] = a[j] + b[j];                 \
        for (; j + 2 * WIDTH <= m; j += 2 * WIDTH) {                                               \
            VEC s = ADD(LOAD(a + j), LOAD(b + j)), t = ADD(LOAD(a + j + WIDTH), LOAD(b + j + WIDTH)); \
            STREAM(o + j, s);                                                                      \
            STREAM(o + j + WIDTH, t);                                                              \
            STORE(d + j, s);                                                                       \
            STORE(d + j + WIDTH, t);                                                               \
        }                                                                                          \
        for (; j < m; j++) d[j] = o[j] = a[j] + b[j];                                              \
        return m;                                                                                  \
    }
SUM2_STREAM(sum2_stream_f32, float, __m128, _mm_loadu_ps, _mm_add_ps, _mm_stream_ps, _mm_storeu_ps, 4)
SUM2_STREAM(sum2_stream_f64, double, __m128d, _mm_loadu_pd, _mm_add_pd, _mm_stream_pd, _mm_storeu_pd, 2)
#else
static int64_t sum2_stream_f32(const float *a, const float *b, float *o, float *d, int64_t m) { return 0; }
static int64_t sum2_stream_f64(const double *a, const double *b, double *o, double *d, int64_t m) { return 0; }
#endif

#define DEFINE_SUM(NAME, T, ADD, SUM2)                                                              \
    void NAME(const T *const *in, int count_inputs, int64_t n, T divisor, T *out, T *copy, int stream_out) {   \
        T staged[BLOCK] __attribute__((aligned(64)));                                              \
        for (int64_t lo = 0; lo < n; lo += BLOCK) {                                                \
            int64_t m = n - lo < BLOCK ? n - lo : BLOCK;                                           \
            const T *a = in[0] + lo, *b = in[1] + lo;                                              \
            /* streamed: the block is summed in `staged` (in L1) and then streamed to out */       \
            T *o = stream_out ? staged : out + lo, *d = copy ? copy + lo : 0;                      \
            if (d && count_inputs == 2 && divisor == 0 && stream_out && SUM2(a, b, out + lo, d, m)) continue; \
            if (d && count_inputs == 2 && divisor == 0 && !stream_out) { /* the common case, one pass */ \
                _Pragma("GCC ivdep") for (int64_t j = 0; j < m; j++) {                             \
                    T s = a[j] + b[j];                                                             \
                    o[j] = s;                                                                      \
                    d[j] = s;                                                                      \
                }                                                                                  \
                continue;                                                                          \
            }                                                                                      \
            ADD(o, a, b, m);                                                                       \
            for (int k = 2; k < count_inputs; k++) ADD(o, o, in[k] + lo, m);                       \
            if (divisor != 0) {                                                                    \
                _Pragma("GCC ivdep") for (int64_t j = 0; j < m; j++) o[j] /= divisor;              \
            }                                                                                      \
            if (stream_out) rp_stream_copy_unfenced(out + lo, o, (size_t)m * sizeof(T));           \
            if (d) {                                                                               \
                _Pragma("GCC ivdep") for (int64_t j = 0; j < m; j++) d[j] = o[j];                  \
            }                                                                                      \
        }                                                                                          \
        if (stream_out) rp_stream_fence();                                                         \
    }

DEFINE_SUM(rp_sum_f32, float, rp_add_f32, sum2_stream_f32)
DEFINE_SUM(rp_sum_f64, double, rp_add_f64, sum2_stream_f64)
