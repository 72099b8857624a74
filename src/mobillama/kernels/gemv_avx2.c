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

/* A block's 16 rows as two vectors of 8: rows 0-7 come from the first 32 bytes of every 64-byte chunk,
 * rows 8-15 from the last 32. Both halves go through one pass, sharing the activation broadcasts. */
typedef struct {
    __m256 lo, hi;
} rows16;

static inline rows16 fma16(rows16 a, rows16 b, rows16 c) {
    return (rows16){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline rows16 add16(rows16 a, rows16 b) { return (rows16){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
static inline rows16 splat16(float v) { return (rows16){_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
static inline rows16 half16(const uint16_t *p) { return (rows16){half8(p), half8(p + 8)}; }
static inline rows16 zero16(void) { return (rows16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }

/* The block's int32 dot products for one activation block, widened and scaled by its activation scale. */
static inline rows16 scaled16(__m256i lo, __m256i hi, float scale, rows16 acc) {
    const __m256 s = _mm256_set1_ps(scale);
    return (rows16){_mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), s, acc.lo), _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), s, acc.hi)};
}

/* Group g of an int4 block: sum over its activation blocks b of xs[b] * (the block's integer dot
 * product), as gemv_avx512.c's group_int4. */
static inline rows16 group_int4(const uint8_t *w, const int8_t *xq, const float *xs, int64_t g, int64_t group,
                                int64_t ab) {
    const int64_t per_group = group / ab, chunks = ab / 8;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    rows16 gacc = zero16();
    for (int64_t b = 0; b < per_group; b++) {
        const int64_t k0 = g * group + b * ab;
        const uint8_t *wb = w + k0 / 8 * 64;
        const int8_t *xb = xq + k0;
        __m256i p0 = _mm256_setzero_si256(), p1 = p0;
        for (int64_t c = 0; c < chunks; c++) {
            const __m256i xl = bcast4(xb + 8 * c), xh = bcast4(xb + 8 * c + 4);
            const __m256i r0 = _mm256_loadu_si256((const __m256i *)(wb + c * 64));
            const __m256i r1 = _mm256_loadu_si256((const __m256i *)(wb + c * 64 + 32));
            p0 = _mm256_add_epi16(p0, _mm256_maddubs_epi16(_mm256_and_si256(r0, low), xl));
            p0 = _mm256_add_epi16(p0, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(r0, 4), low), xh));
            p1 = _mm256_add_epi16(p1, _mm256_maddubs_epi16(_mm256_and_si256(r1, low), xl));
            p1 = _mm256_add_epi16(p1, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(r1, 4), low), xh));
        }
        /* 16 x the sum times xs / 16 in the AVX-512 kernel: the same product, rounded once */
        gacc = scaled16(_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones), xs[g * per_group + b], gacc);
    }
    return gacc;
}

/* An int4 block with half-float params (16 scales then 16 offsets per block and group). */
static inline rows16 block_int4(const uint8_t *w, const uint16_t *params, const int8_t *xq, const float *xs,
                                const float *xsum, int64_t K, int64_t group, int64_t ab) {
    rows16 acc = zero16(), off = acc;
    for (int64_t g = 0; g < K / group; g++) {
        const uint16_t *p = params + g * 32;
        acc = fma16(group_int4(w, xq, xs, g, group, ab), half16(p), acc);
        off = fma16(half16(p + 16), splat16(xsum[g]), off);
    }
    return add16(acc, off);
}

/* An int4 block with compact params (8-bit codes times bf16 steps per super-block). */
static inline rows16 block_int4_compact(const uint8_t *w, const uint8_t *params, const int8_t *xq, const float *xs,
                                        const float *xsum, int64_t K, int64_t group, int64_t ab, int64_t per) {
    rows16 acc = zero16(), off = acc;
    for (int64_t sb = 0; sb < K / group / per; sb++) {
        const uint8_t *p = params + sb * (64 + 32 * per);
        rows16 sacc = zero16(), soff = sacc;
        for (int64_t j = 0; j < per; j++) {
            const int64_t g = sb * per + j;
            const uint8_t *codes = p + 64 + 32 * j;
            sacc = fma16(group_int4(w, xq, xs, g, group, ab), (rows16){u8x8(codes), u8x8(codes + 8)}, sacc);
            soff = fma16((rows16){s8x8(codes + 16), s8x8(codes + 24)}, splat16(xsum[g]), soff);
        }
        acc = fma16(sacc, (rows16){bf16x8(p), bf16x8(p + 16)}, acc);
        off = fma16(soff, (rows16){bf16x8(p + 32), bf16x8(p + 48)}, off);
    }
    return add16(acc, off);
}

/* An int8 block (stored codes q = w + 128; see the head of this file). */
static inline rows16 block_int8(const uint8_t *w, const uint16_t *params, const int8_t *xq, const float *xs,
                                const float *xsum, const int32_t *isum, int64_t K, int64_t group, int64_t ab) {
    const int64_t groups = K / group, per_group = group / ab, chunks = ab / 4;
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    rows16 acc = zero16();
    for (int64_t g = 0; g < groups; g++) {
        rows16 gacc = zero16();
        for (int64_t b = 0; b < per_group; b++) {
            const int64_t k0 = g * group + b * ab;
            const uint8_t *wb = w + k0 / 4 * 64;
            const int8_t *xb = xq + k0;
            __m256i a0 = _mm256_setzero_si256(), a1 = a0;
            for (int64_t c = 0; c < chunks; c++) {
                const __m256i x = bcast4(xb + 4 * c);
                const __m256i w0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb + c * 64)), flip);
                const __m256i w1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb + c * 64 + 32)), flip);
                a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w0), _mm256_sign_epi8(x, w0)), ones));
                a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w1), _mm256_sign_epi8(x, w1)), ones));
            }
            const __m256i corr = _mm256_set1_epi32(128 * isum[g * per_group + b]);
            gacc = scaled16(_mm256_add_epi32(a0, corr), _mm256_add_epi32(a1, corr), xs[g * per_group + b], gacc);
        }
        const uint16_t *p = params + g * 32;
        acc = fma16(gacc, half16(p), acc);
        acc = fma16(half16(p + 16), splat16(xsum[g]), acc);
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
            /* the common shapes get constants (activation block and group 32, 8 groups a super-block), so
             * the compiler unrolls the block loops */
            rows16 acc;
            if (bits == 8)
                acc = block_int8(wb, (const uint16_t *)pb, xm, sm, um, isum + m * (K / ab), K, group, ab);
            else if (per)
                acc = ab == 32 && group == 32 && per == 8 ? block_int4_compact(wb, pb, xm, sm, um, K, 32, 32, 8)
                                                          : block_int4_compact(wb, pb, xm, sm, um, K, group, ab, per);
            else
                acc = ab == 32 && group == 32 ? block_int4(wb, (const uint16_t *)pb, xm, sm, um, K, 32, 32)
                                              : block_int4(wb, (const uint16_t *)pb, xm, sm, um, K, group, ab);
            _mm256_storeu_ps(out, acc.lo);
            _mm256_storeu_ps(out + 8, acc.hi);
            memcpy(y + m * N + b * 16, out, (size_t)rows * sizeof(float));
        }
    }
    free(xq); free(xs); free(xsum); free(isum);
    return 0;
}
