/* One decode step of attention (one new token per row) on the CPU, fused: rotary embedding of q and k,
 * the new k/v written into the cache, then softmax(q k^T * scale) v over the cached slots.
 *
 * Why hand-written: at decode, PyTorch's CPU attention (SDPA) plus the rotary, cache-write and layout
 * ops around it cost ~25 small operator calls per layer, and SDPA reads the fp32 KV cache at ~10 GB/s
 * (a third of this machine's bandwidth). Fused, the step reads each cached key and value once.
 *
 * Layouts: q [B, H, D] and k, v [B, Hkv, D] at the given row strides (floats between batch rows);
 * cos, sin [B, D] for each row's position (rotate-half convention, as Hugging Face Llama);
 * caches [B, Hkv, S, D], fp32 or bf16 (half the bytes to read per step; rounded to nearest even when
 * written, widened exactly when read; all arithmetic in fp32); valid [B, S] (1 = the slot may be
 * attended) or NULL; out [B, H * D].
 * Head h reads kv head h / (H / Hkv) (grouped-query attention). D must be a multiple of 16.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention_rows.h"
#include "simd_math.h"

/* 16 cached values from fp32 or bf16 storage, as fp32. */
static inline __m512 load_kv(const void *base, int64_t i, int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)base + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Attention of one query head over L cached rows of K and V ([L, D] each, contiguous). Rows are read in
 * order, four at a time, with prefetches a few rows ahead: the cache comes from DRAM at every step. */
static inline __attribute__((always_inline)) void head(const float *q, const void *K, const void *V, int bf16,
                                                       const uint8_t *ok, int64_t L, int64_t Lpad, int64_t D,
                                                       float scale, float *sc, float *o) {
    const int64_t ahead = 16 * D, esize = bf16 ? 2 : 4;
    const char *Kb = (const char *)K, *Vb = (const char *)V;
    float best = -INFINITY;
    int64_t l = 0;
    for (; l + 4 <= L; l += 4) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < D; d += 16) {
            const __m512 qd = _mm512_loadu_ps(q + d);
            const int64_t i = l * D + d;
            for (int j = 0; j < 4; j++) _mm_prefetch(Kb + (i + ahead + j * D) * esize, _MM_HINT_T0);
            a0 = _mm512_fmadd_ps(qd, load_kv(K, i, bf16), a0);
            a1 = _mm512_fmadd_ps(qd, load_kv(K, i + D, bf16), a1);
            a2 = _mm512_fmadd_ps(qd, load_kv(K, i + 2 * D, bf16), a2);
            a3 = _mm512_fmadd_ps(qd, load_kv(K, i + 3 * D, bf16), a3);
        }
        sc[l] = _mm512_reduce_add_ps(a0) * scale;
        sc[l + 1] = _mm512_reduce_add_ps(a1) * scale;
        sc[l + 2] = _mm512_reduce_add_ps(a2) * scale;
        sc[l + 3] = _mm512_reduce_add_ps(a3) * scale;
    }
    for (; l < L; l++) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16)
            a = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load_kv(K, l * D + d, bf16), a);
        sc[l] = _mm512_reduce_add_ps(a) * scale;
    }
    for (l = 0; l < L; l++) {
        if (ok && !ok[l]) sc[l] = -INFINITY;
        best = sc[l] > best ? sc[l] : best;
    }
    if (best == -INFINITY) { /* nothing to attend (not reachable for a valid query): zeros */
        memset(o, 0, (size_t)D * sizeof(float));
        return;
    }
    for (l = L; l < Lpad; l++) sc[l] = -INFINITY;
    __m512 total = _mm512_setzero_ps();
    const __m512 vbest = _mm512_set1_ps(best), ninf = _mm512_set1_ps(-INFINITY);
    for (l = 0; l < Lpad; l += 16) {
        const __m512 x = _mm512_loadu_ps(sc + l);
        const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ), exp_ps(_mm512_sub_ps(x, vbest)));
        _mm512_storeu_ps(sc + l, e);
        total = _mm512_add_ps(total, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int64_t d0 = 0; d0 < D; d0 += 128) { /* up to 8 accumulators (one row of 128 floats) at a time */
        const int64_t width = D - d0 < 128 ? D - d0 : 128;
        __m512 acc[8];
        for (int64_t j = 0; j < 8; j++) acc[j] = _mm512_setzero_ps();
        for (l = 0; l < L; l++) {
            const __m512 p = _mm512_set1_ps(sc[l]);
            const int64_t i = l * D + d0;
            for (int64_t j = 0; j < width / 16; j++) _mm_prefetch(Vb + (i + ahead + 16 * j) * esize, _MM_HINT_T0);
            for (int64_t j = 0; j < width / 16; j++) acc[j] = _mm512_fmadd_ps(p, load_kv(V, i + 16 * j, bf16), acc[j]);
        }
        for (int64_t j = 0; j < width / 16; j++) _mm512_storeu_ps(o + d0 + 16 * j, _mm512_mul_ps(acc[j], inv));
    }
}

/* head() for any head size and storage; constant ones for the common sizes let the compiler specialise the
 * inner loops. */
static void attend_head(const float *q, const void *K, const void *V, int bf16, const uint8_t *ok, int64_t L,
                        int64_t D, float scale, float *sc, float *o) {
    const int64_t Lpad = (L + 15) / 16 * 16;
    if (D == 64 && bf16) head(q, K, V, 1, ok, L, Lpad, 64, scale, sc, o);
    else if (D == 64) head(q, K, V, 0, ok, L, Lpad, 64, scale, sc, o);
    else if (D == 128 && bf16) head(q, K, V, 1, ok, L, Lpad, 128, scale, sc, o);
    else if (D == 128) head(q, K, V, 0, ok, L, Lpad, 128, scale, sc, o);
    else head(q, K, V, bf16, ok, L, Lpad, D, scale, sc, o);
}

int mb_attn_decode(const float *q, int64_t q_stride, const float *k, const float *v, int64_t kv_stride,
                   const float *cos, const float *sin, void *kcache, void *vcache, int kv_bf16, int64_t S, int64_t slot,
                   const uint8_t *valid, int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale, float *out,
                   int threads) {
    const int64_t L = slot + 1, group = H / Hkv, Lpad = (L + 15) / 16 * 16;
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

/* A prompt's attention (attend_prompt in attention_rows.h over this build's head). */
int mb_attn_prefill(const float *q, int64_t q_stride, const float *k, const float *v, int64_t kv_stride,
                    const float *cos, const float *sin, void *kcache, void *vcache, int kv_bf16, int64_t S,
                    int64_t first, int64_t T, int64_t H, int64_t Hkv, int64_t D, float scale, float *out, int threads) {
    return attend_prompt(q, q_stride, k, v, kv_stride, cos, sin, kcache, vcache, kv_bf16, S, first, T, H, Hkv, D,
                         scale, out, threads, 16, attend_head);
}
