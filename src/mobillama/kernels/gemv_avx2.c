/* The quantized matrix-vector products of gemv_avx512.c for x86 CPUs with AVX2 but no AVX-512 VNNI (most
 * laptops and desktops before 2023). Without them decode fell back to PyTorch's stock kernels, about 4x
 * slower than llama.cpp on the same CPU.
 *
 * Same packed weights and params, same int8 activations per block (gemv_avx512.c describes both), and the
 * same integer sums and float operations in the same order, so the two kernels return identical bits (the
 * tests compare them). AVX2 has no u8 x s8 -> s32 dot product (`vpdpbusd`), so each 32-byte half of a
 * 64-byte chunk (8 rows) is multiplied with `vpmaddubsw` (u8 x s8 pairs summed to s16, saturating) and
 * widened with `vpmaddwd` against ones, as llama.cpp's AVX2 code does:
 *   int4: codes 0..15 times activations within +-127 never saturate (a pair <= 3810), so the products of a
 *         whole activation block (<= 4 chunks, both nibbles) add up in s16 (<= 30480) before one widening;
 *   int8: the stored code q = w + 128 would saturate (255 * 127 * 2), so the kernel takes w = q ^ 0x80 and
 *         multiplies |w| (u8, 128 included) by x with w's sign (a pair <= 32512), then adds back
 *         128 * (the block's sum of activation codes): the same integer sum of q * x as `vpdpbusd`'s.
 * Compiled apart, with -mavx2 -mfma -mf16c and no AVX-512 flag, so nothing in it needs AVX-512.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static inline int32_t hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* As gemv_avx512.c's quantize_blocks (bit for bit: the same scale, rounding and sums), plus isum[m, b], the
 * integer sum of block b's codes (the int8 path's correction). Blocks are multiples of 4 columns. */
static void quantize_blocks(const float *x, int64_t M, int64_t K, int64_t ab, int64_t group, int8_t *xq,
                            float *xs, float *xsum, int32_t *isum) {
    const int64_t blocks = K / ab, per_group = group / ab;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        for (int64_t b = 0; b < blocks; b++) {
            const float *src = row + b * ab;
            int8_t *dst = xq + m * K + b * ab;
            __m256 vmax = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k + 8 <= ab; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(src + k)));
            float amax = hmax8(vmax);
            for (; k < ab; k++) amax = fmaxf(amax, fabsf(src[k]));
            const float scale = amax > 0.0f ? amax / 127.0f : 1.0f, inv = 1.0f / scale;
            int32_t codes = 0;
            k = 0;
            for (; k + 8 <= ab; k += 8) {
                /* round to nearest even, as the AVX-512 kernel's conversion */
                const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + k), _mm256_set1_ps(inv)));
                const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
                _mm_storel_epi64((__m128i *)(dst + k), _mm_packs_epi16(q16, q16));
                codes += hsum8i(q);
            }
            for (; k < ab; k++) {
                const int32_t q = (int32_t)nearbyintf(src[k] * inv);
                dst[k] = (int8_t)q;
                codes += q;
            }
            xs[m * blocks + b] = scale;
            isum[m * blocks + b] = codes;
            float *sums = xsum + m * (K / group);
            if (b % per_group == 0) sums[b / per_group] = 0.0f;
            sums[b / per_group] += scale * (float)codes;
        }
    }
}

/* 8 half floats / 8 bf16 values / 8 unsigned or signed bytes widened to fp32 (all exact). */
static inline __m256 half8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline __m256 bf16x8(const uint8_t *p) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
static inline __m256 u8x8(const uint8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
static inline __m256 s8x8(const uint8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }

/* Group g of 8 rows (the half at byte `half` of each chunk) of an int4 matrix: sum over its activation
 * blocks b of xs[b] * (the block's integer dot product), as gemv_avx512.c's group_int4. */
static inline __m256 group_int4(const uint8_t *w, int64_t half, const int8_t *xq, const float *xs, int64_t g,
                                int64_t group, int64_t ab) {
    const int64_t per_group = group / ab, chunks = ab / 8;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 gacc = _mm256_setzero_ps();
    for (int64_t b = 0; b < per_group; b++) {
        const int64_t k0 = g * group + b * ab;
        const uint8_t *wb = w + k0 / 8 * 64 + half;
        const int8_t *xb = xq + k0;
        __m256i p = _mm256_setzero_si256();
        for (int64_t c = 0; c < chunks; c++) {
            const __m256i r = _mm256_loadu_si256((const __m256i *)(wb + c * 64));
            const __m256i lo = _mm256_and_si256(r, low), hi = _mm256_and_si256(_mm256_srli_epi16(r, 4), low);
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(lo, bcast4(xb + 8 * c)));
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(hi, bcast4(xb + 8 * c + 4)));
        }
        /* 16 x the sum times xs / 16 in the AVX-512 kernel: the same product, rounded once */
        gacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), _mm256_set1_ps(xs[g * per_group + b]), gacc);
    }
    return gacc;
}

/* 8 rows of an int4 matrix with half-float params (16 scales then 16 offsets per block and group). */
static __m256 rows_int4(const uint8_t *w, const uint16_t *params, int64_t half, const int8_t *xq, const float *xs,
                        const float *xsum, int64_t K, int64_t group, int64_t ab) {
    __m256 acc = _mm256_setzero_ps(), off = acc;
    for (int64_t g = 0; g < K / group; g++) {
        const __m256 gacc = group_int4(w, half, xq, xs, g, group, ab);
        const uint16_t *p = params + g * 32 + half / 4;
        acc = _mm256_fmadd_ps(gacc, half8(p), acc);
        off = _mm256_fmadd_ps(half8(p + 16), _mm256_set1_ps(xsum[g]), off);
    }
    return _mm256_add_ps(acc, off);
}

/* 8 rows of an int4 matrix with compact params (8-bit codes times bf16 steps per super-block). */
static __m256 rows_int4_compact(const uint8_t *w, const uint8_t *params, int64_t half, const int8_t *xq,
                                const float *xs, const float *xsum, int64_t K, int64_t group, int64_t ab,
                                int64_t per) {
    const int64_t h = half / 4; /* the half's first row within the block of 16 */
    __m256 acc = _mm256_setzero_ps(), off = acc;
    for (int64_t sb = 0; sb < K / group / per; sb++) {
        const uint8_t *p = params + sb * (64 + 32 * per);
        __m256 sacc = _mm256_setzero_ps(), soff = sacc;
        for (int64_t j = 0; j < per; j++) {
            const int64_t g = sb * per + j;
            const __m256 gacc = group_int4(w, half, xq, xs, g, group, ab);
            sacc = _mm256_fmadd_ps(gacc, u8x8(p + 64 + 32 * j + h), sacc);
            soff = _mm256_fmadd_ps(s8x8(p + 64 + 32 * j + 16 + h), _mm256_set1_ps(xsum[g]), soff);
        }
        acc = _mm256_fmadd_ps(sacc, bf16x8(p + 2 * h), acc);
        off = _mm256_fmadd_ps(soff, bf16x8(p + 32 + 2 * h), off);
    }
    return _mm256_add_ps(acc, off);
}

/* 8 rows of an int8 matrix (stored codes q = w + 128; see the head of this file). */
static __m256 rows_int8(const uint8_t *w, const uint16_t *params, int64_t half, const int8_t *xq, const float *xs,
                        const float *xsum, const int32_t *isum, int64_t K, int64_t group, int64_t ab) {
    const int64_t groups = K / group, per_group = group / ab, chunks = ab / 4;
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256 gacc = _mm256_setzero_ps();
        for (int64_t b = 0; b < per_group; b++) {
            const int64_t k0 = g * group + b * ab;
            const uint8_t *wb = w + k0 / 4 * 64 + half;
            const int8_t *xb = xq + k0;
            __m256i a = _mm256_setzero_si256();
            for (int64_t c = 0; c < chunks; c++) {
                const __m256i wq = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb + c * 64)), flip);
                const __m256i prod = _mm256_maddubs_epi16(_mm256_abs_epi8(wq), _mm256_sign_epi8(bcast4(xb + 4 * c), wq));
                a = _mm256_add_epi32(a, _mm256_madd_epi16(prod, ones));
            }
            a = _mm256_add_epi32(a, _mm256_set1_epi32(128 * isum[g * per_group + b]));
            gacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(xs[g * per_group + b]), gacc);
        }
        const uint16_t *p = params + g * 32 + half / 4;
        acc = _mm256_fmadd_ps(gacc, half8(p), acc);
        acc = _mm256_fmadd_ps(half8(p + 16), _mm256_set1_ps(xsum[g]), acc);
    }
    return acc;
}

/* mb_qgemv's contract (see gemv_avx512.c) on AVX2. Returns 0, or -1 when a buffer cannot be allocated. */
int mb_qgemv_avx2(const float *x, int64_t M, int64_t K, const uint8_t *w, const void *params, int64_t N,
                  int64_t group, int64_t per, int bits, int64_t ab, float *y, int threads) {
    const int64_t groups = K / group, blocks = (N + 15) / 16;
    const int64_t block_bytes = bits == 8 ? K * 16 : K * 8;
    const int64_t block_params = per ? groups / per * (64 + 32 * per) : groups * 64; /* bytes */
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *xs = (float *)malloc((size_t)(M * (K / ab)) * sizeof(float));
    float *xsum = (float *)malloc((size_t)(M * groups) * sizeof(float));
    int32_t *isum = (int32_t *)malloc((size_t)(M * (K / ab)) * sizeof(int32_t));
    if (!xq || !xs || !xsum || !isum) {
        free(xq); free(xs); free(xsum); free(isum);
        return -1;
    }
    quantize_blocks(x, M, K, ab, group, xq, xs, xsum, isum);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *wb = w + b * block_bytes;
        const uint8_t *pb = (const uint8_t *)params + b * block_params;
        const int64_t rows = N - b * 16 < 16 ? N - b * 16 : 16;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = xq + m * K;
            const float *sm = xs + m * (K / ab), *um = xsum + m * groups;
            float out[16];
            for (int64_t half = 0; half < 64; half += 32) {
                __m256 acc;
                if (bits == 8)
                    acc = rows_int8(wb, (const uint16_t *)pb, half, xm, sm, um, isum + m * (K / ab), K, group, ab);
                else if (per)
                    acc = rows_int4_compact(wb, pb, half, xm, sm, um, K, group, ab, per);
                else
                    acc = rows_int4(wb, (const uint16_t *)pb, half, xm, sm, um, K, group, ab);
                _mm256_storeu_ps(out + half / 4, acc);
            }
            memcpy(y + m * N + b * 16, out, (size_t)rows * sizeof(float));
        }
    }
    free(xq); free(xs); free(xsum); free(isum);
    return 0;
}
