/* Fused CPU kernels for the element-wise parts of a GPT-2 training step.
 *
 * NumPy spends several passes over memory (and as many Python calls) on each of LayerNorm, GELU,
 * the attention softmax, cross-entropy and AdamW; here each is one pass per row or element, and a
 * call from ctypes releases the GIL for all of it. model/nn/ops.py keeps the NumPy versions: they are
 * the reference these are tested against and the code path for CuPy and for machines without a C
 * compiler. model/nn/kernels.py compiles this file on first use.
 *
 * ops_impl.h holds the kernels once, written over a type T; it is included here for float and
 * double. Long loops are plain loops with `omp simd` (compiled with -fopenmp-simd, no OpenMP
 * runtime); short rows and everything with e^x use explicit 8-lane vectors. Neither needs
 * -ffast-math, which for a shared library may switch the whole process to flush-to-zero.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Vectors of 8 elements (GCC/Clang vector extensions: one AVX register of floats, two of
 * doubles) and integer vectors of the same lane width, for masks (comparisons give -1 / 0). */
typedef float vec8_f32 __attribute__((vector_size(32)));
typedef int32_t ivec8_f32 __attribute__((vector_size(32)));
typedef double vec8_f64 __attribute__((vector_size(64)));
typedef int64_t ivec8_f64 __attribute__((vector_size(64)));

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* e^x on 8 floats at once, in vector arithmetic only (libm's expf is a call that gcc cannot
 * vectorize without -ffast-math). x = n ln2 + r with |r| <= ln2/2: n is rounded to nearest by
 * adding and subtracting 1.5 * 2^23 (exact for |x log2 e| < 2^22), ln2 is split into an exact
 * high part and a low remainder (Cody-Waite); e^r = 1 + r + r^2 P(r) with Cephes' degree-5
 * minimax P (about 1 ulp), evaluated in Estrin's form for a short dependency chain; 2^n is
 * built in the exponent bits. x is clamped to [-87, 88] so 2^n stays a normal float: below -87
 * the result is ~1.6e-38 instead of 0, which no caller can tell from 0 at float precision.
 * NaN stays NaN, so a diverged step shows in the loss as it does on the NumPy path. */
ALWAYS_INLINE vec8_f32 exp8_f32(vec8_f32 x) {
    const vec8_f32 lo = (vec8_f32){0} - 87.0f, hi = (vec8_f32){0} + 88.0f;
    /* Clamp by replacing what compares beyond a bound: a NaN compares false and stays NaN. */
    ivec8_f32 m = x < lo;
    x = (vec8_f32)(((ivec8_f32)lo & m) | ((ivec8_f32)x & ~m));
    m = x > hi;
    x = (vec8_f32)(((ivec8_f32)hi & m) | ((ivec8_f32)x & ~m));
    const vec8_f32 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    vec8_f32 r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    const vec8_f32 r2 = r * r, r4 = r2 * r2;
    const vec8_f32 p = (5.0000001201e-1f + 1.6666665459e-1f * r)
                     + r2 * (4.1665795894e-2f + 8.3334519073e-3f * r)
                     + r4 * (1.3981999507e-3f + 1.9875691500e-4f * r);
    const ivec8_f32 bits = (__builtin_convertvector(n, ivec8_f32) + 127) << 23;
    return (1.0f + r + r2 * p) * (vec8_f32)bits;
}

/* double is for gradient checks and float64 equivalence tests, where libm's accuracy matters
 * more than speed. */
ALWAYS_INLINE vec8_f64 exp8_f64(vec8_f64 x) {
    for (int c = 0; c < 8; c++) x[c] = exp(x[c]);
    return x;
}

#define T float
#define SUFFIX f32
#define EXP8 exp8_f32
#define ITYPE int32_t
#define SQRT sqrtf
#include "ops_impl.h"
#undef T
#undef SUFFIX
#undef EXP8
#undef ITYPE
#undef SQRT

#define T double
#define SUFFIX f64
#define EXP8 exp8_f64
#define ITYPE int64_t
#define SQRT sqrt
#include "ops_impl.h"
