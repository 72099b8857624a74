/* Shared by the attention kernels of both builds (AVX-512 and AVX2): the scalar steps around the vector
 * loops - rotary embedding, rounding into a bf16 cache, and the decode step's rope-and-write of the new
 * token's q, k, v (layouts in attention_avx512.c). Static inline: each build compiles its own copy. */
#ifndef MOBILLAMA_ATTENTION_ROWS_H
#define MOBILLAMA_ATTENTION_ROWS_H
#include <stdint.h>
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
#endif
