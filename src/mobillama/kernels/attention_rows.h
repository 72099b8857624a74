/* Shared by the attention kernels of both builds (AVX-512 and AVX2): the scalar steps around the vector
 * loops - rotary embedding, rounding into a bf16 cache, the decode step's rope-and-write of the new
 * token's q, k, v (layouts in attention_avx512.c) - and a prompt's attention, which differs between the
 * builds only in the per-head function it calls. Static inline: each build compiles its own copy. */
#ifndef MOBILLAMA_ATTENTION_ROWS_H
#define MOBILLAMA_ATTENTION_ROWS_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline uint16_t to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline void store_row(void *cache, int64_t at, const float *x, int64_t D, int bf16) {
    if (!bf16) {
        memcpy((float *)cache + at, x, (size_t)D * sizeof(float));
        return;
    }
    for (int64_t d = 0; d < D; d++) ((uint16_t *)cache)[at + d] = to_bf16(x[d]);
}

static inline void rope(const float *x, const float *cos, const float *sin, int64_t D, float *out) {
    const int64_t half = D / 2;
    for (int64_t d = 0; d < half; d++) {
        out[d] = x[d] * cos[d] - x[d + half] * sin[d];
        out[d + half] = x[d + half] * cos[d + half] + x[d] * sin[d + half];
    }
}

/* Decode: rope each row's q into qr [B, H, D], rope its k and write k, v into the caches at `slot`;
 * kr is a scratch row of D floats. */
static inline void rope_and_cache(const float *q, int64_t q_stride, const float *k, const float *v, int64_t kv_stride,
                                  const float *cos, const float *sin, void *kcache, void *vcache, int kv_bf16,
                                  int64_t S, int64_t slot, int64_t B, int64_t H, int64_t Hkv, int64_t D, float *qr,
                                  float *kr) {
    for (int64_t b = 0; b < B; b++) {
        const float *c = cos + b * D, *s = sin + b * D;
        for (int64_t h = 0; h < H; h++) rope(q + b * q_stride + h * D, c, s, D, qr + (b * H + h) * D);
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t at = ((b * Hkv + h) * S + slot) * D;
            rope(k + b * kv_stride + h * D, c, s, D, kr);
            store_row(kcache, at, kr, D, kv_bf16);
            store_row(vcache, at, v + b * kv_stride + h * D, D, kv_bf16);
        }
    }
}

/* Prefill: the same for T consecutive tokens of one sequence at slots first..first+T-1 (cos, sin [T, D]):
 * every q roped into qr [T, H, D], every k roped and written with its v, before any token attends. */
static inline void rope_and_cache_prompt(const float *q, int64_t q_stride, const float *k, const float *v,
                                         int64_t kv_stride, const float *cos, const float *sin, void *kcache,
                                         void *vcache, int kv_bf16, int64_t S, int64_t first, int64_t T, int64_t H,
                                         int64_t Hkv, int64_t D, float *qr, float *kr) {
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + t * D, *s = sin + t * D;
        for (int64_t h = 0; h < H; h++) rope(q + t * q_stride + h * D, c, s, D, qr + (t * H + h) * D);
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t at = (h * S + first + t) * D;
            rope(k + t * kv_stride + h * D, c, s, D, kr);
            store_row(kcache, at, kr, D, kv_bf16);
            store_row(vcache, at, v + t * kv_stride + h * D, D, kv_bf16);
        }
    }
}

/* A build's attention of one query head over L cached rows of K and V (see head() in either file); sc is
 * scratch for at least L scores rounded up to the build's vector width. */
typedef void (*attend_head_fn)(const float *q, const void *K, const void *V, int bf16, const uint8_t *ok, int64_t L,
                               int64_t D, float scale, float *sc, float *o);

/* A prompt's attention: T consecutive tokens of one sequence (batch 1) at slots first..first+T-1, q [T, H, D]
 * and k, v [T, Hkv, D] at row strides q_stride / kv_stride, cos/sin [T, D]. Every key and value is roped and
 * written first; then each (token, head) pair attends over slots 0..first+t, in parallel over all pairs (one
 * parallel region for the prompt instead of one per token). Equals T decode calls exactly: the same rotary,
 * the same rounding into the cache, the same per-head function. lanes: the build's vector width in floats.
 * Returns 0, or -1 when a buffer cannot be allocated. */
static inline int attend_prompt(const float *q, int64_t q_stride, const float *k, const float *v, int64_t kv_stride,
                                const float *cos, const float *sin, void *kcache, void *vcache, int kv_bf16,
                                int64_t S, int64_t first, int64_t T, int64_t H, int64_t Hkv, int64_t D, float scale,
                                float *out, int threads, int64_t lanes, attend_head_fn attend) {
    const int64_t group = H / Hkv, Lmax = (first + T + lanes - 1) / lanes * lanes;
    float *qr = (float *)malloc((size_t)(T * H * D) * sizeof(float)), *kr = (float *)malloc((size_t)D * sizeof(float));
    if (!qr || !kr) {
        free(qr); free(kr);
        return -1;
    }
    rope_and_cache_prompt(q, q_stride, k, v, kv_stride, cos, sin, kcache, vcache, kv_bf16, S, first, T, H, Hkv, D, qr,
                          kr);
    free(kr);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *sc = (float *)malloc((size_t)Lmax * sizeof(float));
        if (!sc) failed = 1;
#pragma omp for collapse(2) schedule(dynamic, 4)
        for (int64_t t = 0; t < T; t++) {
            for (int64_t h = 0; h < H; h++) {
                if (!sc) continue;
                const int64_t kv = (h / group) * S * D * (kv_bf16 ? 2 : 4); /* bytes */
                attend(qr + (t * H + h) * D, (const char *)kcache + kv, (const char *)vcache + kv, kv_bf16, NULL,
                       first + t + 1, D, scale, sc, out + t * H * D + h * D);
            }
        }
        free(sc);
    }
    free(qr);
    return failed ? -1 : 0;
}
#endif
