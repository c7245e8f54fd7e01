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

#define T float
#define SUFFIX f32
#define EXP exp_float
#define SQRT sqrtf
#include "ops_impl.h"
#undef T
#undef SUFFIX
#undef EXP
#undef SQRT

#define T double
#define SUFFIX f64
#define EXP exp_double
#define SQRT sqrt
#include "ops_impl.h"
