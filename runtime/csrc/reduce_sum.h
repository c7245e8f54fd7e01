/* The float sums of csrc/reduce_sum.c, for the helpers that sum in C themselves (shm_small.c,
shm_reduce_chunks.c): every path adds with this one code, so ranks on different paths get the same
bits (NaN payloads included). */
#ifndef RINGPIPE_REDUCE_SUM_H
#define RINGPIPE_REDUCE_SUM_H

#include <stdint.h>

void rp_sum_f32(const float *const *in, int count_inputs, int64_t n, float divisor, float *out, float *copy,
                int stream_out);
void rp_sum_f64(const double *const *in, int count_inputs, int64_t n, double divisor, double *out, double *copy,
                int stream_out);

#endif
