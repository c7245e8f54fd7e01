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
 * x = n ln2 + r, |r| <= ln2/2; e^r by its Taylor series to r^7 (error < 1e-8 relative), 2^n built
 * in the exponent bits. Inputs are clamped to [-87, 88] so 2^n stays a normal float; below -87 the
 * result is ~1.6e-38 instead of 0, which no caller can tell from 0 at float precision. */
static inline float exp_float(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;          /* ln 2 split into an exact high part ... */
    r = r + n * 2.12194440e-4f;              /* ... and the low remainder (Cody-Waite) */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
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
