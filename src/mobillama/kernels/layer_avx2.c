/* The rest of a decode step for CPUs without AVX-512 (the matmul is gemv_avx2.c): RMS norm, silu(gate) * up
 * and the fused one-token attention, as layer_avx512.c and attention_avx512.c compute them (same layouts,
 * same arithmetic in fp32, 8 lanes instead of 16: sums are added in another order, so results agree to
 * rounding, not bit for bit). With them the one-call decode step (decode_step.c) runs on such CPUs too:
 * through PyTorch's operators a SmolLM2-135M token cost ~20 ms there, ~4 ms of it in the matmuls.
 * Compiled apart, with -mavx2 -mfma -mf16c and no AVX-512 flag. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention_rows.h"

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x on 8 floats, as simd_math.h's exp_ps: 2^n * e^r, |r| <= ln2/2, degree-6 Taylor (rel. err ~1e-7). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.693147180559945f));
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    /* 2^n for n in [-126, 127] (x is clamped), built in the exponent field */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float weight_at(const void *w, int bf16, int64_t d) {
    if (!bf16) return ((const float *)w)[d];
    const uint32_t u = (uint32_t)((const uint16_t *)w)[d] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline __m256 weight8(const void *w, int bf16, int64_t d) {
    if (!bf16) return _mm256_loadu_ps((const float *)w + d);
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + d)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

/* mb_rmsnorm (layer_avx512.c) on AVX2. */
void mb_rmsnorm_avx2(const float *x, int64_t M, int64_t D, const void *w, int w_bf16, float eps, float *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * D;
        __m256 ss = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) ss = _mm256_fmadd_ps(_mm256_loadu_ps(row + d), _mm256_loadu_ps(row + d), ss);
        float sum = hsum8(ss);
        for (; d < D; d++) sum += row[d] * row[d];
        const float r = 1.0f / sqrtf(sum / (float)D + eps);
        for (d = 0; d + 8 <= D; d += 8) {
            const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(row + d), _mm256_set1_ps(r));
            _mm256_storeu_ps(out + m * D + d, _mm256_mul_ps(weight8(w, w_bf16, d), v));
        }
        for (; d < D; d++) out[m * D + d] = weight_at(w, w_bf16, d) * (row[d] * r);
    }
}

/* mb_silu_mul (layer_avx512.c) on AVX2. */
void mb_silu_mul_avx2(const float *gate, const float *up, int64_t stride, int64_t M, int64_t N, float *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *g = gate + m * stride, *u = up + m * stride;
        int64_t n = 0;
        for (; n + 8 <= N; n += 8) {
            const __m256 x = _mm256_loadu_ps(g + n);
            const __m256 s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
            _mm256_storeu_ps(out + m * N + n, _mm256_mul_ps(s, _mm256_loadu_ps(u + n)));
        }
        for (; n < N; n++) out[m * N + n] = g[n] / (1.0f + expf(-g[n])) * u[n];
    }
}

static inline __m256 load_kv(const void *base, int64_t i, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)base + i);
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

/* One query head over L cached rows, as attention_avx512.c's head(): scores four rows at a time, softmax,
 * then the values weighted, up to 128 output floats (16 accumulators) at a time. D is a multiple of 8. */
static inline __attribute__((always_inline)) void head(const float *q, const void *K, const void *V, int bf16,
                                                       const uint8_t *ok, int64_t L, int64_t Lpad, int64_t D,
                                                       float scale, float *sc, float *o) {
    const int64_t ahead = 16 * D, esize = bf16 ? 2 : 4;
    const char *Kb = (const char *)K, *Vb = (const char *)V;
    int64_t l = 0;
    for (; l + 4 <= L; l += 4) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 qd = _mm256_loadu_ps(q + d);
            const int64_t i = l * D + d;
            if (d % 16 == 0)
                for (int j = 0; j < 4; j++) _mm_prefetch(Kb + (i + ahead + j * D) * esize, _MM_HINT_T0);
            a0 = _mm256_fmadd_ps(qd, load_kv(K, i, bf16), a0);
            a1 = _mm256_fmadd_ps(qd, load_kv(K, i + D, bf16), a1);
            a2 = _mm256_fmadd_ps(qd, load_kv(K, i + 2 * D, bf16), a2);
            a3 = _mm256_fmadd_ps(qd, load_kv(K, i + 3 * D, bf16), a3);
        }
        sc[l] = hsum8(a0) * scale;
        sc[l + 1] = hsum8(a1) * scale;
        sc[l + 2] = hsum8(a2) * scale;
        sc[l + 3] = hsum8(a3) * scale;
    }
    for (; l < L; l++) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load_kv(K, l * D + d, bf16), a);
        sc[l] = hsum8(a) * scale;
    }
    float best = -INFINITY;
    for (l = 0; l < L; l++) {
        if (ok && !ok[l]) sc[l] = -INFINITY;
        best = sc[l] > best ? sc[l] : best;
    }
    if (best == -INFINITY) { /* nothing to attend (not reachable for a valid query): zeros */
        memset(o, 0, (size_t)D * sizeof(float));
        return;
    }
    for (l = L; l < Lpad; l++) sc[l] = -INFINITY;
    __m256 total = _mm256_setzero_ps();
    const __m256 vbest = _mm256_set1_ps(best), ninf = _mm256_set1_ps(-INFINITY);
    for (l = 0; l < Lpad; l += 8) {
        const __m256 x = _mm256_loadu_ps(sc + l);
        const __m256 e = _mm256_and_ps(_mm256_cmp_ps(x, ninf, _CMP_NEQ_OQ), exp8(_mm256_sub_ps(x, vbest)));
        _mm256_storeu_ps(sc + l, e);
        total = _mm256_add_ps(total, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum8(total));
    for (int64_t d0 = 0; d0 < D; d0 += 128) {
        const int64_t width = D - d0 < 128 ? D - d0 : 128;
        __m256 acc[16];
        for (int64_t j = 0; j < 16; j++) acc[j] = _mm256_setzero_ps();
        for (l = 0; l < L; l++) {
            const __m256 p = _mm256_set1_ps(sc[l]);
            const int64_t i = l * D + d0;
            for (int64_t j = 0; j < width / 16; j++) _mm_prefetch(Vb + (i + ahead + 16 * j) * esize, _MM_HINT_T0);
            for (int64_t j = 0; j < width / 8; j++) acc[j] = _mm256_fmadd_ps(p, load_kv(V, i + 8 * j, bf16), acc[j]);
        }
        for (int64_t j = 0; j < width / 8; j++) _mm256_storeu_ps(o + d0 + 8 * j, _mm256_mul_ps(acc[j], inv));
    }
}

/* head() for any head size and storage (a constant 64, the common size, specialises the inner loops). */
static void attend_head(const float *q, const void *K, const void *V, int bf16, const uint8_t *ok, int64_t L,
                        int64_t D, float scale, float *sc, float *o) {
    const int64_t Lpad = (L + 7) / 8 * 8;
    if (D == 64 && bf16) head(q, K, V, 1, ok, L, Lpad, 64, scale, sc, o);
    else if (D == 64) head(q, K, V, 0, ok, L, Lpad, 64, scale, sc, o);
    else head(q, K, V, bf16, ok, L, Lpad, D, scale, sc, o);
}

/* mb_attn_decode (attention_avx512.c) on AVX2; D must be a multiple of 8. */
int mb_attn_decode_avx2(const float *q, int64_t q_stride, const float *k, const float *v, int64_t kv_stride,
                        const float *cos, const float *sin, void *kcache, void *vcache, int kv_bf16, int64_t S,
                        int64_t slot, const uint8_t *valid, int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale,
                        float *out, int threads) {
    const int64_t L = slot + 1, group = H / Hkv, Lpad = (L + 7) / 8 * 8;
    float *qr = (float *)malloc((size_t)(B * H * D) * sizeof(float)), *kr = (float *)malloc((size_t)D * sizeof(float));
    float *scores = (float *)malloc((size_t)(B * H * Lpad) * sizeof(float));
    if (!qr || !kr || !scores) {
        free(qr); free(kr); free(scores);
        return -1;
    }
    rope_and_cache(q, q_stride, k, v, kv_stride, cos, sin, kcache, vcache, kv_bf16, S, slot, B, H, Hkv, D, qr, kr);
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            const int64_t kv = (b * Hkv + h / group) * S * D * (kv_bf16 ? 2 : 4); /* bytes */
            const void *K = (const char *)kcache + kv, *V = (const char *)vcache + kv;
            const uint8_t *ok = valid ? valid + b * S : NULL;
            const float *qh = qr + (b * H + h) * D;
            float *o = out + b * H * D + h * D;
            float *sc = scores + (b * H + h) * Lpad;
            attend_head(qh, K, V, kv_bf16, ok, L, D, scale, sc, o);
        }
    }
    free(qr); free(kr); free(scores);
    return 0;
}

/* mb_attn_prefill (attention_avx512.c) on AVX2: a prompt of T tokens of one sequence; equals T calls of
 * mb_attn_decode_avx2 exactly (the same rotary, cache rounding and per-head function). */
int mb_attn_prefill_avx2(const float *q, int64_t q_stride, const float *k, const float *v, int64_t kv_stride,
                         const float *cos, const float *sin, void *kcache, void *vcache, int kv_bf16, int64_t S,
                         int64_t first, int64_t T, int64_t H, int64_t Hkv, int64_t D, float scale, float *out,
                         int threads) {
    return attend_prompt(q, q_stride, k, v, kv_stride, cos, sin, kcache, vcache, kv_bf16, S, first, T, H, Hkv, D,
                         scale, out, threads, 8, attend_head);
}

/* mb_bf16_gemv (gemv_avx512.c) on AVX2: y [M, N] = x [M, K] @ W^T for a bf16 W [N, K] (a float LM head tied to
 * a bf16 embedding table), each weight widened exactly and multiplied in fp32; rows split across threads. */
void mb_bf16_gemv_avx2(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *row = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;
            int64_t k = 0;
            for (; k + 16 <= K; k += 16) {
                a0 = _mm256_fmadd_ps(weight8(row, 1, k), _mm256_loadu_ps(xm + k), a0);
                a1 = _mm256_fmadd_ps(weight8(row, 1, k + 8), _mm256_loadu_ps(xm + k + 8), a1);
            }
            float total = hsum8(_mm256_add_ps(a0, a1));
            for (; k < K; k++) total += weight_at(row, 1, k) * xm[k];
            y[m * N + n] = total;
        }
    }
}
