/* Kernels over element type T (float or double); included by kernels.c once per type, which
 * defines T, SUFFIX (f32 / f64), ITYPE (the integer of T's width), EXP8 (e^x on 8-lane
 * vectors) and SQRT. Every array is C-contiguous; shapes are passed as int64. Forward and
 * backward of each op sit side by side, as in model/nn/ops.py. */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define NAME(op) CAT(op, SUFFIX)
#define VEC CAT(vec8, SUFFIX)
#define IVEC CAT(ivec8, SUFFIX)

ALWAYS_INLINE VEC NAME(load8)(const T *p) {
    VEC v;
    memcpy(&v, p, sizeof v);
    return v;
}

ALWAYS_INLINE void NAME(store8)(T *p, VEC v) { memcpy(p, &v, sizeof v); }

/* The first n < 8 lanes, for the ragged end of a row (the other lanes read as 0). */
ALWAYS_INLINE VEC NAME(load_first)(const T *p, int64_t n) {
    VEC v = {0};
    memcpy(&v, p, (size_t)n * sizeof(T));
    return v;
}

ALWAYS_INLINE void NAME(store_first)(T *p, VEC v, int64_t n) {
    memcpy(p, &v, (size_t)n * sizeof(T));
}

static const IVEC NAME(lanes) = {0, 1, 2, 3, 4, 5, 6, 7};

/* Lane-wise mask ? a : b (C has no vector ?:). */
ALWAYS_INLINE VEC NAME(select8)(IVEC mask, VEC a, VEC b) {
    return (VEC)(((IVEC)a & mask) | ((IVEC)b & ~mask));
}

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
ALWAYS_INLINE void NAME(gelu8)(VEC x, T *out, T *sig, int64_t n, T scale, T cubic) {
    const VEC z = scale * (x + cubic * x * x * x);
    const VEC t = EXP8((T)-2 * NAME(select8)(z > 0, z, -z));
    const VEC inv = (T)1 / ((T)1 + t);
    const VEC s = NAME(select8)(z >= 0, inv, t * inv);
    if (n == 8) {
        NAME(store8)(sig, s);
        NAME(store8)(out, x * s);
    } else {
        NAME(store_first)(sig, s, n);
        NAME(store_first)(out, x * s, n);
    }
}

void NAME(gelu_forward)(const T *x, T *out, T *sig, int64_t n, double scale, double cubic) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) NAME(gelu8)(NAME(load8)(x + i), out + i, sig + i, 8, (T)scale, (T)cubic);
    if (i < n) NAME(gelu8)(NAME(load_first)(x + i, n - i), out + i, sig + i, n - i, (T)scale, (T)cubic);
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

/* One row in place: softmax(scale * row) over keys [0, last], 0 for keys after it up to
 * row_length (Tk for a full row; the packed rows of the attention kernels end at the span).
 * Explicit vectors with the masked keys selected away: rows this short lose more to a compiler's
 * alignment peeling and remainder loops than to arithmetic. Only a row ending at Tk, when Tk is
 * not a multiple of 8, has a partial last vector. */
ALWAYS_INLINE void NAME(causal_softmax_row)(T *row, int64_t last, int64_t Tk, int64_t row_length,
                                            T scale) {
    const int64_t span = NAME(visible_span)(last + 1, Tk);
    VEC top8 = (VEC){0} + row[0];
    for (int64_t j0 = 0; j0 < span; j0 += 8) {
        const VEC x = j0 + 8 <= span ? NAME(load8)(row + j0) : NAME(load_first)(row + j0, span - j0);
        top8 = NAME(select8)((NAME(lanes) + (ITYPE)j0 <= (ITYPE)last) & (x > top8), x, top8);
    }
    T top = top8[0];
    for (int c = 1; c < 8; c++) top = top8[c] > top ? top8[c] : top;
    VEC sum8 = {0};
    for (int64_t j0 = 0; j0 < span; j0 += 8) {
        const int64_t n = span - j0 < 8 ? span - j0 : 8;
        const VEC x = n == 8 ? NAME(load8)(row + j0) : NAME(load_first)(row + j0, n);
        const VEC e = NAME(select8)(NAME(lanes) + (ITYPE)j0 <= (ITYPE)last, EXP8((x - top) * scale),
                                    (VEC){0});
        if (n == 8) NAME(store8)(row + j0, e); else NAME(store_first)(row + j0, e, n);
        sum8 += e;
    }
    T sum = 0;
    for (int c = 0; c < 8; c++) sum += sum8[c];
    const T inv = (T)1 / sum;
    for (int64_t j = 0; j < span; j++) row[j] *= inv;
    if (span < row_length) memset(row + span, 0, (size_t)(row_length - span) * sizeof(T));
}

/* scores (G, Tq, Tk), G = batch x heads: row r of a group is query q0 + r and sees keys
 * [0, q0 + r]. In place: probs = softmax(scale * scores) over the visible keys, 0 beyond. */
void NAME(causal_softmax_forward)(T *scores, int64_t G, int64_t Tq, int64_t Tk, int64_t q0,
                                  double scale) {
    for (int64_t g = 0; g < G; g++)
        for (int64_t r = 0; r < Tq; r++)
            NAME(causal_softmax_row)(scores + (g * Tq + r) * Tk, q0 + r, Tk, Tk, (T)scale);
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

/* ------------------------------------------------------------------ causal self-attention */

/* Three causal products of one head, for T x T weights and (T, hs) row matrices whose rows lie
 * `stride` elements apart (inside qkv, y or dy). They skip the masked upper triangle, which
 * batched matmuls cannot. The head size is a multiple of 8 (the caller checks), handled as
 * vectors of 8 elements (GCC/Clang vector extensions: one AVX register of floats, two of
 * doubles); the dispatch below instantiates hs = 32 and 64 as constants so that the
 * accumulators stay in registers. */
/* out[i][j] = sum_d a_i[d] bt[d][j] for the keys row i can see (rounded up to whole vectors);
 * bt is the (hs, T) transpose of the other operand. Tiles of 4 rows x 8 keys share loads; a row
 * keeps only the columns of its span. */
ALWAYS_INLINE void NAME(causal_scores)(const T *a, int64_t stride, const T *bt, T *out,
                                       const int64_t *rows, int64_t Tn, const int64_t hs) {
    for (int64_t i0 = 0; i0 < Tn; i0 += 4) {
        const int64_t nrows = Tn - i0 < 4 ? Tn - i0 : 4;
        const int64_t span = rows[i0 + nrows] - rows[i0 + nrows - 1];  /* the tile's last row */
        for (int64_t j0 = 0; j0 < span; j0 += 8) {
            if (nrows == 4 && span - j0 >= 8) {
                const T *a0 = a + i0 * stride, *a1 = a0 + stride, *a2 = a1 + stride,
                        *a3 = a2 + stride;
                VEC acc0 = {0}, acc1 = {0}, acc2 = {0}, acc3 = {0};
                for (int64_t d = 0; d < hs; d++) {
                    const VEC b = NAME(load8)(bt + d * Tn + j0);
                    acc0 += a0[d] * b;
                    acc1 += a1[d] * b;
                    acc2 += a2[d] * b;
                    acc3 += a3[d] * b;
                }
                /* spans below the tile's are whole vectors: a row takes all 8 columns or none */
                if (j0 < rows[i0 + 1] - rows[i0]) NAME(store8)(out + rows[i0] + j0, acc0);
                if (j0 < rows[i0 + 2] - rows[i0 + 1]) NAME(store8)(out + rows[i0 + 1] + j0, acc1);
                if (j0 < rows[i0 + 3] - rows[i0 + 2]) NAME(store8)(out + rows[i0 + 2] + j0, acc2);
                NAME(store8)(out + rows[i0 + 3] + j0, acc3);
            } else {  /* the ragged edge: last rows or last keys */
                for (int64_t r = i0; r < i0 + nrows; r++) {
                    const int64_t row_span = rows[r + 1] - rows[r];
                    for (int64_t c = j0; c < j0 + 8 && c < row_span; c++) {
                        T sum = 0;
                        for (int64_t d = 0; d < hs; d++) sum += a[r * stride + d] * bt[d * Tn + c];
                        out[rows[r] + c] = sum;
                    }
                }
            }
        }
    }
}

/* acc_a += a x and acc_b += b x for one row x of hs = 8 nv elements: two weighted sums that
 * share every load of x. */
ALWAYS_INLINE void NAME(accumulate_pair)(VEC *acc_a, VEC *acc_b, T a, T b, const T *x,
                                         const int64_t nv) {
    for (int64_t v = 0; v < nv; v++) {
        const VEC xv = NAME(load8)(x + 8 * v);
        acc_a[v] += a * xv;
        acc_b[v] += b * xv;
    }
}

/* out_i = sum_{j <= i} w[i][j] m_j (the rows of m mixed by the lower triangle of w, whose row i
 * starts at w + rows[i]). Two output rows at a time share every load of m_j. */
ALWAYS_INLINE void NAME(causal_mix_rows)(const T *w, const int64_t *rows, const T *m,
                                         int64_t mstride, T *out, int64_t ostride, int64_t Tn,
                                         const int64_t hs) {
    const int64_t nv = hs / 8;
    for (int64_t i = 0; i < Tn; i += 2) {
        const int pair = i + 1 < Tn;
        const T *wa = w + rows[i], *wb = w + rows[pair ? i + 1 : i];
        VEC acc_a[32], acc_b[32];
        for (int64_t v = 0; v < nv; v++) acc_a[v] = acc_b[v] = (VEC){0};
        for (int64_t j = 0; j <= i; j++)  /* keys both rows see */
            NAME(accumulate_pair)(acc_a, acc_b, wa[j], wb[j], m + j * mstride, nv);
        for (int64_t v = 0; v < nv; v++) NAME(store8)(out + i * ostride + 8 * v, acc_a[v]);
        if (pair) {  /* row i + 1 also sees key i + 1 */
            const T *mj = m + (i + 1) * mstride;
            for (int64_t v = 0; v < nv; v++)
                NAME(store8)(out + (i + 1) * ostride + 8 * v,
                             acc_b[v] + wb[i + 1] * NAME(load8)(mj + 8 * v));
        }
    }
}

/* out_j = sum_{i >= j} w[i][j] m_i (the transpose of the lower triangle of w). Two output rows
 * at a time share every load of m_i. */
ALWAYS_INLINE void NAME(causal_mix_columns)(const T *w, const int64_t *rows, const T *m,
                                            int64_t mstride, T *out, int64_t ostride, int64_t Tn,
                                            const int64_t hs) {
    const int64_t nv = hs / 8;
    for (int64_t j = 0; j < Tn; j += 2) {
        const int pair = j + 1 < Tn;
        VEC acc_a[32], acc_b[32];
        for (int64_t v = 0; v < nv; v++) {  /* query j is seen by key j only */
            const VEC x = NAME(load8)(m + j * mstride + 8 * v);
            acc_a[v] = w[rows[j] + j] * x;
            acc_b[v] = (VEC){0};
        }
        for (int64_t i = j + 1; i < Tn; i++)  /* queries both keys are seen by */
            NAME(accumulate_pair)(acc_a, acc_b, w[rows[i] + j], w[rows[i] + j + 1],
                                  m + i * mstride, nv);
        for (int64_t v = 0; v < nv; v++) {
            NAME(store8)(out + j * ostride + 8 * v, acc_a[v]);
            if (pair) NAME(store8)(out + (j + 1) * ostride + 8 * v, acc_b[v]);
        }
    }
}

ALWAYS_INLINE void NAME(transpose_rows)(const T *m, int64_t stride, T *out, int64_t Tn,
                                        const int64_t hs) {
    for (int64_t j = 0; j < Tn; j++)
        for (int64_t d = 0; d < hs; d++) out[d * Tn + j] = m[j * stride + d];
}

/* One head: q, k, v rows inside qkv (stride 3C), y rows inside y (stride C); probs and the
 * backward's dS are lower triangles packed row by row (row i at rows[i], see attention_forward). */
ALWAYS_INLINE void NAME(attention_head_forward)(const T *q, const T *k, const T *v, int64_t stride,
                                                T *y, int64_t ystride, T *probs, const int64_t *rows,
                                                T *kt, int64_t Tn, T scale, const int64_t hs) {
    NAME(transpose_rows)(k, stride, kt, Tn, hs);
    NAME(causal_scores)(q, stride, kt, probs, rows, Tn, hs);
    for (int64_t i = 0; i < Tn; i++)
        NAME(causal_softmax_row)(probs + rows[i], i, Tn, rows[i + 1] - rows[i], scale);
    NAME(causal_mix_rows)(probs, rows, v, stride, y, ystride, Tn, hs);
}

ALWAYS_INLINE void NAME(attention_head_backward)(const T *q, const T *k, const T *v,
                                                 int64_t stride, const T *dy, int64_t ystride,
                                                 const T *probs, const int64_t *rows, T *dq, T *dk,
                                                 T *dv, T *vt, T *ds, int64_t Tn, T scale,
                                                 const int64_t hs) {
    NAME(transpose_rows)(v, stride, vt, Tn, hs);
    NAME(causal_scores)(dy, ystride, vt, ds, rows, Tn, hs);  /* dP = dy V^T */
    for (int64_t i = 0; i < Tn; i++) {  /* dS = scale P (dP - <dP, P>), 0 where masked */
        T *drow = ds + rows[i];
        const T *prow = probs + rows[i];
        const int64_t span = rows[i + 1] - rows[i];
        if (span % 8 == 0) {  /* whole vectors, as in causal_softmax_row */
            VEC dot8 = {0};
            for (int64_t j0 = 0; j0 < span; j0 += 8)
                dot8 += NAME(load8)(drow + j0) * NAME(load8)(prow + j0);
            T dot = 0;
            for (int c = 0; c < 8; c++) dot += dot8[c];
            for (int64_t j0 = 0; j0 < span; j0 += 8) {
                const VEC p = NAME(load8)(prow + j0);
                NAME(store8)(drow + j0, scale * p * (NAME(load8)(drow + j0) - dot));
            }
        } else {
            T dot = 0;
            for (int64_t j = 0; j < span; j++) dot += drow[j] * prow[j];
            for (int64_t j = 0; j < span; j++) drow[j] = scale * prow[j] * (drow[j] - dot);
        }
    }
    NAME(causal_mix_rows)(ds, rows, k, stride, dq, stride, Tn, hs);              /* dq = dS K */
    NAME(causal_mix_columns)(ds, rows, q, stride, dk, stride, Tn, hs);           /* dk = dS^T Q */
    NAME(causal_mix_columns)(probs, rows, dy, ystride, dv, stride, Tn, hs);      /* dv = P^T dy */
}

/* The causal self-attention of one layer, head by head, reading q, k, v where they lie in
 * qkv (B, T, 3C) and writing y (B, T, C) as the heads' concatenation. probs (B, H, P) keeps the
 * softmax output for the backward as packed lower triangles: row i of a head holds the keys it
 * sees rounded up to whole vectors of 8 (0 past the diagonal), starting at rows[i]; rows has
 * T + 1 entries, P = rows[T], about half of T * T. work: T * hs elements. hs: a multiple of 8,
 * at most 256. Without dropout only (the NumPy path does dropout). */
#define DISPATCH_HEAD_SIZE(call_with_hs)                                                            \
    do {                                                                                            \
        if (hs == 32) call_with_hs(32);                                                             \
        else if (hs == 64) call_with_hs(64);                                                        \
        else call_with_hs(hs);                                                                      \
    } while (0)

void NAME(attention_forward)(const T *qkv, T *y, T *probs, const int64_t *rows, T *work,
                             int64_t B, int64_t Tn, int64_t C, int64_t H, double scale) {
    const int64_t hs = C / H, stride = 3 * C, P = rows[Tn];
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const T *q = qkv + b * Tn * stride + h * hs;
            T *yh = y + b * Tn * C + h * hs, *p = probs + (b * H + h) * P;
#define FORWARD(size) NAME(attention_head_forward)(q, q + C, q + 2 * C, stride, yh, C, p, rows, \
                                                   work, Tn, (T)scale, size)
            DISPATCH_HEAD_SIZE(FORWARD);
#undef FORWARD
        }
}

/* dy (B, T, C) -> dqkv (B, T, 3C), every element written. work: T * hs + P elements. */
void NAME(attention_backward)(const T *dy, const T *qkv, const T *probs, const int64_t *rows,
                              T *dqkv, T *work, int64_t B, int64_t Tn, int64_t C, int64_t H,
                              double scale) {
    const int64_t hs = C / H, stride = 3 * C, P = rows[Tn];
    T *vt = work, *ds = work + Tn * hs;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const T *q = qkv + b * Tn * stride + h * hs, *dyh = dy + b * Tn * C + h * hs;
            const T *p = probs + (b * H + h) * P;
            T *dq = dqkv + b * Tn * stride + h * hs;
#define BACKWARD(size) NAME(attention_head_backward)(q, q + C, q + 2 * C, stride, dyh, C, p, rows, \
                                                     dq, dq + C, dq + 2 * C, vt, ds, Tn, (T)scale, size)
            DISPATCH_HEAD_SIZE(BACKWARD);
#undef BACKWARD
        }
}

#undef DISPATCH_HEAD_SIZE

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
        for (int64_t j = 1; j < V; j++) top = row[j] > top ? row[j] : top;
        const T target_logit = targets[i] == ignore_index ? 0 : row[targets[i]] - top;
        VEC sum8 = {0};
        for (int64_t j0 = 0; j0 < V; j0 += 8) {
            const int64_t n = V - j0 < 8 ? V - j0 : 8;
            const VEC x = n == 8 ? NAME(load8)(row + j0) : NAME(load_first)(row + j0, n);
            const VEC e = NAME(select8)(NAME(lanes) < (ITYPE)n, EXP8(x - top), (VEC){0});
            if (n == 8) NAME(store8)(row + j0, e); else NAME(store_first)(row + j0, e, n);
            sum8 += e;
        }
        T sum = 0;
        for (int c = 0; c < 8; c++) sum += sum8[c];
        const T inv = (T)1 / sum;
#pragma omp simd
        for (int64_t j = 0; j < V; j++) row[j] *= inv;
        nll[i] = targets[i] == ignore_index ? 0 : (T)log((double)sum) - target_logit;
    }
    return -1;
}

/* ------------------------------------------------------------------ AdamW */

/* One element of AdamW: m, v updated, param shrunk by `keep` (1 - lr * decay rate), then moved. */
ALWAYS_INLINE T NAME(adamw_element)(T param, T g, T *m, T *v, T keep, T b1, T b2, T c1, T c2, T lr_t,
                                    T eps_t) {
    const T mi = b1 * *m + c1 * g;
    const T vi = b2 * *v + c2 * (g * g);
    *m = mi;
    *v = vi;
    return param * keep - lr_t * (mi / (SQRT(vi) + eps_t));
}

/* One AdamW step over n elements, in place on param, m, v. step_size = lr / (1 - beta1^t) *
 * sqrt(1 - beta2^t) and eps_scaled = eps * sqrt(1 - beta2^t): the bias corrections folded into
 * scalars exactly as model/nn/optim.py's adamw_update does. Weight decay: `rates` per element (a
 * ZeRO-1 shard mixes decaying and non-decaying parameters), or where rates is NULL one `rate`. */
void NAME(adamw_update)(T *param, const T *grad, T *m, T *v, const T *rates, int64_t n, double lr,
                        double rate, double beta1, double beta2, double step_size, double eps_scaled) {
    const T b1 = (T)beta1, b2 = (T)beta2, c1 = (T)(1 - beta1), c2 = (T)(1 - beta2),
            lr_t = (T)step_size, eps_t = (T)eps_scaled;
    if (rates == NULL) {
        const T keep = (T)(1 - lr * rate);
#pragma omp simd
        for (int64_t i = 0; i < n; i++)
            param[i] = NAME(adamw_element)(param[i], grad[i], m + i, v + i, keep, b1, b2, c1, c2,
                                           lr_t, eps_t);
    } else {
        const T lr_decay = (T)lr;
#pragma omp simd
        for (int64_t i = 0; i < n; i++)
            param[i] = NAME(adamw_element)(param[i], grad[i], m + i, v + i, 1 - lr_decay * rates[i],
                                           b1, b2, c1, c2, lr_t, eps_t);
    }
}

#undef VEC
#undef IVEC
#undef CAT_
#undef CAT
#undef NAME
