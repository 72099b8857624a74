/* The small per-layer steps around the matmuls at decode, each one call instead of several PyTorch
 * operators (each operator call costs a few microseconds at one token; a layer had ~20 of them):
 * RMS norm, and SwiGLU's silu(gate) * up. fp32 activations; the norm weight may be fp32 or bf16. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "simd_math.h"

static inline __m512 load_weight(const void *w, int bf16, int64_t d, __mmask16 m) {
    if (!bf16) return _mm512_maskz_loadu_ps(m, (const float *)w + d);
    const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)w + d);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __mmask16 tail(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u); }

/* out[m] = w * (x[m] / sqrt(mean(x[m]^2) + eps)), as Hugging Face Llama's RMSNorm in fp32. */
void mb_rmsnorm(const float *x, int64_t M, int64_t D, const void *w, int w_bf16, float eps, float *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * D;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            const __m512 v = _mm512_maskz_loadu_ps(tail(D - d), row + d);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)D + eps));
        for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 k = tail(D - d);
            const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + d), r);
            _mm512_mask_storeu_ps(out + m * D + d, k, _mm512_mul_ps(load_weight(w, w_bf16, d, k), v));
        }
    }
}

/* out[m, n] = silu(gate[m, n]) * up[m, n]; gate and up rows are `stride` floats apart. */
void mb_silu_mul(const float *gate, const float *up, int64_t stride, int64_t M, int64_t N, float *out) {
    for (int64_t m = 0; m < M; m++) {
        for (int64_t n = 0; n < N; n += 16) {
            const __mmask16 k = tail(N - n);
            const __m512 g = _mm512_maskz_loadu_ps(k, gate + m * stride + n);
            const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            _mm512_mask_storeu_ps(out + m * N + n, k, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, up + m * stride + n)));
        }
    }
}
