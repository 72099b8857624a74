/* Causal self-attention for training on the CPU: forward and backward, fp32, AVX-512.
 *
 * Why: at training lengths (a few hundred tokens) PyTorch's CPU flash-attention kernel spends most of its
 * time outside arithmetic (its backward was ~20% of a bf16 training step of a 20M-parameter model while
 * the attention FLOPs are ~5% of the step). Here each (batch, head) pair is one task: its keys and values
 * are transposed once into a small buffer, and query rows are processed four at a time with register
 * tiles of 4 rows x 64 columns, so every loaded vector feeds four FMAs. The forward keeps the log-sum-exp
 * of each row; the backward recomputes the probabilities from it, as flash attention does, so the memory
 * cost is O(T) per row block, not O(T^2).
 *
 * Layout: q, k, v, out and the gradients are [B, H, T, D] addressed with element strides (batch, head,
 * token) and unit stride along D, so the [B, T, H, D] tensors of a projection need no copy. k/v have as
 * many heads as q (grouped-query heads are repeated by the caller). D must be a multiple of 16. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd_math.h"

#define R 4    /* query rows per block */
#define TILE 64 /* columns per register tile: 4 vectors of 16 floats */

typedef struct {
    int64_t sb, sh, st;
} strides_t;

static inline __mmask16 lanes(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

/* The three products below always work on R rows (a constant, so the 16 accumulators stay in registers);
 * a block with fewer rows points the missing ones at a zero row (inputs) or a scratch row (outputs). */

/* out[r][j] = sum_d a[r][d] * bt[d][j] for j < n; bt is [D][ldb]. */
static void rows_dot(const float *const a[R], const float *bt, int64_t ldb, int64_t D, int64_t n, float *const out[R]) {
    for (int64_t j = 0; j < n; j += TILE) {
        __m512 acc[R][4];
        __mmask16 m[4];
        for (int c = 0; c < 4; c++) m[c] = lanes(n - j - 16 * c);
        for (int r = 0; r < R; r++)
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d++) {
            __m512 b[4];
            for (int c = 0; c < 4; c++) b[c] = _mm512_maskz_loadu_ps(m[c], bt + d * ldb + j + 16 * c);
            for (int r = 0; r < R; r++) {
                const __m512 s = _mm512_set1_ps(a[r][d]);
                for (int c = 0; c < 4; c++) acc[r][c] = _mm512_fmadd_ps(s, b[c], acc[r][c]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < 4; c++) _mm512_mask_storeu_ps(out[r] + j + 16 * c, m[c], acc[r][c]);
    }
}

/* out[r][:D] = sum_{j < n} p[r][j] * x[j][:D] (x's rows ldx apart). */
static void rows_combine(const float *const p[R], int64_t n, const float *x, int64_t ldx, int64_t D, float *const out[R]) {
    for (int64_t d = 0; d < D; d += TILE) {
        __m512 acc[R][4];
        __mmask16 m[4];
        for (int c = 0; c < 4; c++) m[c] = lanes(D - d - 16 * c);
        for (int r = 0; r < R; r++)
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            __m512 xv[4];
            for (int c = 0; c < 4; c++) xv[c] = _mm512_maskz_loadu_ps(m[c], x + j * ldx + d + 16 * c);
            for (int r = 0; r < R; r++) {
                const __m512 s = _mm512_set1_ps(p[r][j]);
                for (int c = 0; c < 4; c++) acc[r][c] = _mm512_fmadd_ps(s, xv[c], acc[r][c]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < 4; c++) _mm512_mask_storeu_ps(out[r] + d + 16 * c, m[c], acc[r][c]);
    }
}

/* out[j][:D] += sum_r p[r][j] * x[r][:D] for j < n (the transposed product, accumulated; out rows D apart). */
static void cols_accumulate(const float *const p[R], int64_t n, const float *const x[R], int64_t D, float *out) {
    for (int64_t d = 0; d < D; d += TILE) {
        __m512 xv[R][4];
        __mmask16 m[4];
        for (int c = 0; c < 4; c++) m[c] = lanes(D - d - 16 * c);
        for (int r = 0; r < R; r++)
            for (int c = 0; c < 4; c++) xv[r][c] = _mm512_maskz_loadu_ps(m[c], x[r] + d + 16 * c);
        for (int64_t j = 0; j < n; j++) {
            __m512 acc[4];
            for (int c = 0; c < 4; c++) acc[c] = _mm512_maskz_loadu_ps(m[c], out + j * D + d + 16 * c);
            for (int r = 0; r < R; r++) {
                const __m512 s = _mm512_set1_ps(p[r][j]);
                for (int c = 0; c < 4; c++) acc[c] = _mm512_fmadd_ps(s, xv[r][c], acc[c]);
            }
            for (int c = 0; c < 4; c++) _mm512_mask_storeu_ps(out + j * D + d + 16 * c, m[c], acc[c]);
        }
    }
}

/* Pointers to the block's rows of a [T][ld] matrix; rows past T point at `pad`. */
static void block_rows(const float *base, int64_t ld, int64_t i0, int64_t T, const float *pad, const float *rows[R]) {
    for (int r = 0; r < R; r++) rows[r] = i0 + r < T ? base + (i0 + r) * ld : pad;
}

/* dst[d][t] = src[t][d] for t < T, d < D (src rows st apart). */
static void transpose(const float *src, int64_t st, int64_t T, int64_t D, float *dst) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t d = 0; d < D; d++) dst[d * T + t] = src[t * st + d];
}

/* Row i of a block starting at i0 sees columns 0..i. s ([R][ld]) holds raw scores; on return the
 * probabilities exp(scale * s - lse), zero past the diagonal and in rows past nr. Computes lse when
 * lse_in is NULL (forward). Only the block's first nr entries of lse_in / lse_out are touched. */
static void probabilities(float *s, int64_t ld, int nr, int64_t i0, float scale, const float *lse_in, float *lse_out) {
    for (int r = 0; r < R; r++) {
        float *row = s + r * ld;
        const int64_t n = r < nr ? i0 + r + 1 : 0;
        if (n && lse_in) { /* backward: p = exp(scale * s - lse) */
            const __m512 sc = _mm512_set1_ps(scale), l = _mm512_set1_ps(lse_in[r]);
            for (int64_t j = 0; j < n; j += 16) {
                const __mmask16 k = lanes(n - j);
                _mm512_mask_storeu_ps(row + j, k, exp_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, row + j), sc, l)));
            }
        } else if (n) { /* forward: e = exp(scale * s - max) kept, then scaled by 1 / sum */
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int64_t j = 0; j < n; j += 16)
                mx = _mm512_mask_max_ps(mx, lanes(n - j), mx, _mm512_loadu_ps(row + j));
            const float top = _mm512_reduce_max_ps(mx) * scale;
            const __m512 sc = _mm512_set1_ps(scale), t = _mm512_set1_ps(top);
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < n; j += 16) {
                const __mmask16 k = lanes(n - j);
                const __m512 e = exp_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, row + j), sc, t));
                _mm512_mask_storeu_ps(row + j, k, e);
                sum = _mm512_mask_add_ps(sum, k, sum, e);
            }
            const float total = _mm512_reduce_add_ps(sum);
            lse_out[r] = top + logf(total);
            const __m512 inv = _mm512_set1_ps(1.0f / total);
            for (int64_t j = 0; j < n; j += 16) {
                const __mmask16 k = lanes(n - j);
                _mm512_mask_storeu_ps(row + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + j), inv));
            }
        }
        for (int64_t j = n; j < i0 + R; j++) row[j] = 0.0f; /* past the diagonal, within the block's columns */
    }
}

/* Forward: out = softmax(scale * q k^T, causal) v, lse[bh][t] the rows' log-sum-exp (scaled scores).
 * Returns 0, or 1 when a buffer could not be allocated. */
int mb_attn_train_fwd(const float *q, strides_t qs, const float *k, strides_t ks, const float *v, strides_t vs,
                      float *out, strides_t os, float *lse, int64_t B, int64_t H, int64_t T, int64_t D, float scale,
                      int threads) {
    int failed = 0;
    const int64_t Tp = T + R; /* score rows hold the block's columns up to i0 + R */
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H;
        float *kt = calloc((size_t)(D * T + R * Tp + 2 * D), sizeof(float));
        if (!kt) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        float *s = kt + D * T, *zero = s + R * Tp, *scratch = zero + D;
        const float *qb = q + b * qs.sb + h * qs.sh, *kb = k + b * ks.sb + h * ks.sh, *vb = v + b * vs.sb + h * vs.sh;
        float *ob = out + b * os.sb + h * os.sh;
        transpose(kb, ks.st, T, D, kt);
        for (int64_t i0 = 0; i0 < T; i0 += R) {
            const int nr = (int)(T - i0 < R ? T - i0 : R);
            const float *qr[R], *pr[R];
            float *sr[R], *orow[R];
            block_rows(qb, qs.st, i0, T, zero, qr);
            for (int r = 0; r < R; r++) {
                sr[r] = s + r * Tp;
                pr[r] = sr[r];
                orow[r] = r < nr ? ob + (i0 + r) * os.st : scratch;
            }
            rows_dot(qr, kt, T, D, i0 + nr, sr);
            probabilities(s, Tp, nr, i0, scale, NULL, lse + bh * T + i0);
            rows_combine(pr, i0 + nr, vb, vs.st, D, orow);
        }
        free(kt);
    }
    return failed;
}

/* Backward: dq, dk, dv (written, not accumulated) from dout, with out and lse from the forward. */
int mb_attn_train_bwd(const float *q, strides_t qs, const float *k, strides_t ks, const float *v, strides_t vs,
                      const float *out, strides_t os, const float *dout, strides_t dos, const float *lse,
                      float *dq, strides_t dqs, float *dk, strides_t dks, float *dv, strides_t dvs, int64_t B, int64_t H,
                      int64_t T, int64_t D, float scale, int threads) {
    int failed = 0;
    const int64_t Tp = T + R;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H;
        float *kt = calloc((size_t)(2 * D * T + 2 * R * Tp + 2 * T * D + T + 2 * D), sizeof(float));
        if (!kt) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        float *vt = kt + D * T, *p = vt + D * T, *dp = p + R * Tp, *dkb = dp + R * Tp, *dvb = dkb + T * D;
        float *delta = dvb + T * D, *zero = delta + T, *scratch = zero + D;
        const float *qb = q + b * qs.sb + h * qs.sh, *kb = k + b * ks.sb + h * ks.sh, *vb = v + b * vs.sb + h * vs.sh;
        const float *ob = out + b * os.sb + h * os.sh, *gb = dout + b * dos.sb + h * dos.sh;
        float *dqb = dq + b * dqs.sb + h * dqs.sh;
        transpose(kb, ks.st, T, D, kt);
        transpose(vb, vs.st, T, D, vt);
        for (int64_t t = 0; t < T; t++) { /* delta_i = dout_i . out_i */
            __m512 acc = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 16)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(gb + t * dos.st + d), _mm512_loadu_ps(ob + t * os.st + d), acc);
            delta[t] = _mm512_reduce_add_ps(acc);
        }
        for (int64_t i0 = 0; i0 < T; i0 += R) {
            const int nr = (int)(T - i0 < R ? T - i0 : R);
            const int64_t n = i0 + nr;
            const float *qr[R], *gr[R], *pr[R], *dsr[R];
            float *prow[R], *dprow[R], *dqrow[R];
            block_rows(qb, qs.st, i0, T, zero, qr);
            block_rows(gb, dos.st, i0, T, zero, gr);
            for (int r = 0; r < R; r++) {
                prow[r] = p + r * Tp;
                dprow[r] = dp + r * Tp;
                pr[r] = prow[r];
                dsr[r] = dprow[r];
                dqrow[r] = r < nr ? dqb + (i0 + r) * dqs.st : scratch;
            }
            rows_dot(qr, kt, T, D, n, prow);
            probabilities(p, Tp, nr, i0, scale, lse + bh * T + i0, NULL);
            rows_dot(gr, vt, T, D, n, dprow);
            for (int r = 0; r < R; r++) { /* ds = p * (dp - delta) * scale, kept in dp (zero where p is) */
                const __m512 dl = _mm512_set1_ps(r < nr ? delta[i0 + r] : 0.0f), sc = _mm512_set1_ps(scale);
                for (int64_t j = 0; j < n; j += 16) {
                    const __mmask16 m = lanes(n - j);
                    const __m512 ds = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, prow[r] + j),
                                                    _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dprow[r] + j), dl));
                    _mm512_mask_storeu_ps(dprow[r] + j, m, _mm512_mul_ps(ds, sc));
                }
            }
            rows_combine(dsr, n, kb, ks.st, D, dqrow);
            cols_accumulate(pr, n, gr, D, dvb);
            cols_accumulate(dsr, n, qr, D, dkb);
        }
        float *dkh = dk + b * dks.sb + h * dks.sh, *dvh = dv + b * dvs.sb + h * dvs.sh;
        for (int64_t t = 0; t < T; t++) {
            memcpy(dkh + t * dks.st, dkb + t * D, sizeof(float) * (size_t)D);
            memcpy(dvh + t * dvs.st, dvb + t * D, sizeof(float) * (size_t)D);
        }
        free(kt);
    }
    return failed;
}
