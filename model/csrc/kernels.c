/* Fused CPU kernels for the element-wise parts of a GPT-2 training step.
 *
 * NumPy spends several passes over memory (and as many Python calls) on each of LayerNorm, GELU,
 * the attention softmax, cross-entropy and AdamW; here each is one pass per row or element, and a
 * call from ctypes releases the GIL for all of it. model/ops.py keeps the NumPy versions: they are
 * the reference these are tested against and the code path for CuPy and for machines without a C
 * compiler. model/kernels.py compiles this file on first use.
 *
 * ops_impl.h holds the kernels once, written over a type T; it is included here for float and
 * double. Plain loops with `omp simd` (compiled with -fopenmp-simd, no OpenMP runtime) vectorize
 * without -ffast-math, which for a shared library may switch the whole process to
 * flush-to-zero.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* e^x in float, vectorizable (libm's expf is a call gcc cannot vectorize without -ffast-math).
 * x = n ln2 + r with |r| <= ln2/2 (Cody-Waite: ln2 split in an exact high part and a low
 * remainder); e^r = 1 + r + r^2 P(r) with Cephes' degree-5 minimax P (about 1 ulp), evaluated in
 * Estrin's form for a short dependency chain; 2^n is built in the exponent bits. x is clamped to
 * [-87, 88] (max/min, which compile to single instructions) so 2^n stays a normal float; below
 * -87 the result is ~1.6e-38 instead of 0, which no caller can tell from 0 at float precision. */
static inline float exp_float(float x) {
    x = x > -87.0f ? x : -87.0f;
    x = x < 88.0f ? x : 88.0f;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    const float r2 = r * r, r4 = r2 * r2;
    const float p = (5.0000001201e-1f + 1.6666665459e-1f * r)
                  + r2 * (4.1665795894e-2f + 8.3334519073e-3f * r)
                  + r4 * (1.3981999507e-3f + 1.9875691500e-4f * r);
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return (1.0f + r + r2 * p) * scale;
}

/* double is for gradient checks and float64 equivalence tests, where libm's accuracy matters
 * more than speed. */
static inline double exp_double(double x) { return exp(x); }

/* Vectors of 8 elements (GCC/Clang vector extensions: one AVX register of floats, two of
 * doubles) and integer vectors of the same lane width, for masks (comparisons give -1 / 0). */
typedef float vec8_f32 __attribute__((vector_size(32)));
typedef int32_t ivec8_f32 __attribute__((vector_size(32)));
typedef double vec8_f64 __attribute__((vector_size(64)));
typedef int64_t ivec8_f64 __attribute__((vector_size(64)));

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* exp_float on 8 lanes at once. Rounding to the nearest integer by adding and subtracting
 * 1.5 * 2^23 (exact for |x log2 e| < 2^22) stands in for floorf(. + 0.5). */
ALWAYS_INLINE vec8_f32 exp8_f32(vec8_f32 x) {
    const vec8_f32 lo = (vec8_f32){0} - 87.0f, hi = (vec8_f32){0} + 88.0f;
    ivec8_f32 m = x > lo;
    x = (vec8_f32)(((ivec8_f32)x & m) | ((ivec8_f32)lo & ~m));
    m = x < hi;
    x = (vec8_f32)(((ivec8_f32)x & m) | ((ivec8_f32)hi & ~m));
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

ALWAYS_INLINE vec8_f64 exp8_f64(vec8_f64 x) {
    for (int c = 0; c < 8; c++) x[c] = exp(x[c]);
    return x;
}

#define T float
#define SUFFIX f32
#define EXP exp_float
#define EXP8 exp8_f32
#define ITYPE int32_t
#define SQRT sqrtf
#include "ops_impl.h"
#undef T
#undef SUFFIX
#undef EXP
#undef EXP8
#undef ITYPE
#undef SQRT

#define T double
#define SUFFIX f64
#define EXP exp_double
#define EXP8 exp8_f64
#define ITYPE int64_t
#define SQRT sqrt
#include "ops_impl.h"
