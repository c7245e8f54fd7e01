/* Kernels over element type T (float or double); included by kernels.c once per type, which
 * defines T, SUFFIX (f32 / f64), EXP and SQRT. Every array is C-contiguous; shapes are passed as
 * int64. Forward and backward of each op sit side by side, as in model/ops.py. */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define NAME(op) CAT(op, SUFFIX)

/* ------------------------------------------------------------------ layernorm (rows of C) */

void NAME(layernorm_forward)(const T *x, const T *weight, const T *bias, T *out, T *xhat,
                             T *rstd, int64_t N, int64_t C, double eps) {
    for (int64_t i = 0; i < N; i++) {
        const T *xi = x + i * C;
        T *hi = xhat + i * C, *oi = out + i * C;
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < C; j++) sum += xi[j];
        const T mean = sum / (T)C;
        T var = 0;
#pragma omp simd reduction(+ : var)
        for (int64_t j = 0; j < C; j++) {
            const T d = xi[j] - mean;
            var += d * d;
        }
        const T r = (T)1 / SQRT(var / (T)C + (T)eps);
#pragma omp simd
        for (int64_t j = 0; j < C; j++) {
            const T h = (xi[j] - mean) * r;
            hi[j] = h;
            oi[j] = h * weight[j] + bias[j];
        }
        rstd[i] = r;
    }
}

/* dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dout * weight; dweight, dbias are written. */
void NAME(layernorm_backward)(const T *dout, const T *xhat, const T *rstd, const T *weight,
                              T *dx, T *dweight, T *dbias, int64_t N, int64_t C) {
    memset(dweight, 0, (size_t)C * sizeof(T));
    memset(dbias, 0, (size_t)C * sizeof(T));
    for (int64_t i = 0; i < N; i++) {
        const T *di = dout + i * C, *hi = xhat + i * C;
        T *dxi = dx + i * C;
        T mean_g = 0, mean_gh = 0;
#pragma omp simd reduction(+ : mean_g, mean_gh)
        for (int64_t j = 0; j < C; j++) {
            const T g = di[j] * weight[j];
            mean_g += g;
            mean_gh += g * hi[j];
            dweight[j] += di[j] * hi[j];
            dbias[j] += di[j];
        }
        mean_g /= (T)C;
        mean_gh /= (T)C;
        const T r = rstd[i];
#pragma omp simd
        for (int64_t j = 0; j < C; j++)
            dxi[j] = r * (di[j] * weight[j] - mean_g - hi[j] * mean_gh);
    }
}

/* ------------------------------------------------------------------ GELU, tanh approximation */

/* out = x sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3), the same as 0.5 x (1 + tanh z);
 * sigmoid is taken from e^{-2|z|} <= 1, so nothing overflows. sig is kept for the backward. */
void NAME(gelu_forward)(const T *x, T *out, T *sig, int64_t n, double scale, double cubic) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        const T xi = x[i];
        const T z = (T)scale * (xi + (T)cubic * xi * xi * xi);
        const T t = EXP((T)-2 * (z > 0 ? z : -z));
        const T inv = (T)1 / ((T)1 + t);
        const T s = z >= 0 ? inv : t * inv;
        sig[i] = s;
        out[i] = xi * s;
    }
}

/* dx = dout (s + x 2 s (1 - s) dz/dx), dz/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2). */
void NAME(gelu_backward)(const T *dout, const T *x, const T *sig, T *dx, int64_t n,
                         double scale, double cubic) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        const T xi = x[i], s = sig[i];
        const T dz = (T)scale * ((T)1 + (T)(3 * cubic) * xi * xi);
        dx[i] = dout[i] * (s + (T)2 * xi * s * ((T)1 - s) * dz);
    }
}

/* ------------------------------------------------------------------ causal softmax (attention) */

/* Rows are processed over the visible keys rounded up to a multiple of 8 (one AVX vector of
 * floats), the extra keys masked by a select: short variable-length loops would otherwise spend
 * most of their time in scalar remainder iterations. */
static inline int64_t NAME(visible_span)(int64_t visible, int64_t Tk) {
    const int64_t rounded = (visible + 7) & ~(int64_t)7;
    return rounded < Tk ? rounded : Tk;
}

/* scores (G, Tq, Tk), G = batch x heads: row r of a group is query q0 + r and sees keys
 * [0, q0 + r]. In place: probs = softmax(scale * scores) over the visible keys, 0 beyond. */
void NAME(causal_softmax_forward)(T *scores, int64_t G, int64_t Tq, int64_t Tk, int64_t q0,
                                  double scale) {
    const T s = (T)scale;
    for (int64_t g = 0; g < G; g++) {
        for (int64_t r = 0; r < Tq; r++) {
            T *row = scores + (g * Tq + r) * Tk;
            const int64_t last = q0 + r, span = NAME(visible_span)(last + 1, Tk);
            T top = row[0];
#pragma omp simd reduction(max : top)
            for (int64_t j = 0; j < span; j++) top = (j <= last && row[j] > top) ? row[j] : top;
            T sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < span; j++) {
                const T e = j <= last ? EXP((row[j] - top) * s) : (T)0;
                row[j] = e;
                sum += e;
            }
            const T inv = (T)1 / sum;
#pragma omp simd
            for (int64_t j = 0; j < span; j++) row[j] *= inv;
            if (span < Tk) memset(row + span, 0, (size_t)(Tk - span) * sizeof(T));
        }
    }
}

/* In place on dprobs: dscores = scale * probs * (dprobs - sum(dprobs * probs)); probs is 0 at
 * masked keys, so they come out 0 too. */
void NAME(causal_softmax_backward)(T *dprobs, const T *probs, int64_t G, int64_t Tq,
                                   int64_t Tk, int64_t q0, double scale) {
    const T s = (T)scale;
    for (int64_t g = 0; g < G; g++) {
        for (int64_t r = 0; r < Tq; r++) {
            T *drow = dprobs + (g * Tq + r) * Tk;
            const T *prow = probs + (g * Tq + r) * Tk;
            const int64_t span = NAME(visible_span)(q0 + r + 1, Tk);
            T dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < span; j++) dot += drow[j] * prow[j];
#pragma omp simd
            for (int64_t j = 0; j < span; j++) drow[j] = s * prow[j] * (drow[j] - dot);
            if (span < Tk) memset(drow + span, 0, (size_t)(Tk - span) * sizeof(T));
        }
    }
}

/* ------------------------------------------------------------------ cross-entropy */

/* logits (N, V) become probs in place; nll[i] = log(sum exp) - shifted target logit, or 0 where
 * targets[i] == ignore_index. Returns the index of the first row whose target is out of range,
 * or -1 (then the caller raises; nothing is read out of bounds). */
int64_t NAME(cross_entropy_forward)(T *logits, const int64_t *targets, T *nll, int64_t N,
                                    int64_t V, int64_t ignore_index) {
    for (int64_t i = 0; i < N; i++)
        if (targets[i] != ignore_index && (targets[i] < 0 || targets[i] >= V)) return i;
    for (int64_t i = 0; i < N; i++) {
        T *row = logits + i * V;
        T top = row[0];
#pragma omp simd reduction(max : top)
        for (int64_t j = 0; j < V; j++) top = row[j] > top ? row[j] : top;
        const T target_logit = targets[i] == ignore_index ? 0 : row[targets[i]] - top;
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < V; j++) {
            const T e = EXP(row[j] - top);
            row[j] = e;
            sum += e;
        }
        const T inv = (T)1 / sum;
#pragma omp simd
        for (int64_t j = 0; j < V; j++) row[j] *= inv;
        nll[i] = targets[i] == ignore_index ? 0 : (T)log((double)sum) - target_logit;
    }
    return -1;
}

/* ------------------------------------------------------------------ AdamW */

/* One AdamW step over n elements, in place on param, m, v. step_size = lr / (1 - beta1^t) *
 * sqrt(1 - beta2^t) and eps_scaled = eps * sqrt(1 - beta2^t): the bias corrections folded into
 * scalars exactly as model/optim.py's adamw_update does. */
void NAME(adamw_update)(T *param, const T *grad, T *m, T *v, int64_t n, double decay_factor,
                        double beta1, double beta2, double step_size, double eps_scaled) {
    const T keep = (T)decay_factor, b1 = (T)beta1, b2 = (T)beta2, c1 = (T)(1 - beta1),
            c2 = (T)(1 - beta2), lr_t = (T)step_size, eps_t = (T)eps_scaled;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        const T g = grad[i];
        const T mi = b1 * m[i] + c1 * g;
        const T vi = b2 * v[i] + c2 * (g * g);
        m[i] = mi;
        v[i] = vi;
        param[i] = param[i] * keep - lr_t * (mi / (SQRT(vi) + eps_t));
    }
}

#undef CAT_
#undef CAT
#undef NAME
