/* Quantized matrix-vector products for decode on x86 CPUs with AVX-512 VNNI.
 *
 * Why hand-written: PyTorch's stock CPU kernels for one-token decode are compute-bound on this class of
 * machine (int4 `_weight_int4pack_mm_for_cpu` runs at about half of the memory roofline, fbgemm's dynamic
 * int8 packs for large GEMMs), and llama.cpp, which has fast kernels, cannot share one FFN between
 * layers. These kernels stream each weight byte once per call with `vpdpbusd` (u8 x s8 -> s32 dot
 * products), so decode becomes memory-bound, and a shared FFN that fits in L3 is read from cache.
 *
 * Weights are stored as unsigned codes q (int8: q = int8 value + 128; int4: q in 0..15) with, per output
 * row and per group of `group` input columns, a scale s and an offset m: w = q * s + m.
 * Layout: rows in blocks of 16; within a block, chunks of 64 bytes along K. For int8 a chunk holds
 * 4 columns: byte 4r+i = q[row r][k0+i]. For int4 it holds 8 columns: byte 4r+i has q[r][k0+i] in the
 * low nibble and q[r][k0+4+i] in the high nibble. One 32-bit lane is one row, so `vpdpbusd` with the
 * 4 activation bytes broadcast accumulates 16 rows at once with no horizontal sums.
 * Params: per block and group, 16 scales then 16 offsets as IEEE half floats (one 64-byte line), as
 * llama.cpp's Q4_1/Q8_0 blocks store theirs: fp32 params cost int4 g32 two bits a weight (6 in all, not 5),
 * enough that a shared FFN at group 32 no longer stayed in cache. They widen exactly with `vcvtph2ps`.
 * Compact int4 params (`per` > 0, super-blocks of `per` groups, as llama.cpp's K-quants): per block and
 * super-block, 16 bf16 scale steps and 16 bf16 offset steps (64 bytes), then per group 16 unsigned 8-bit
 * scale codes and 16 signed 8-bit offset codes (32 bytes): s = step_s * code_s, m = step_m * code_m. Half
 * the bytes of half-float params: int4 g32 at 4.625 bits a weight instead of 5 (Q4_0 has 4.5).
 *
 * Activations are quantized to int8 in blocks of `ab` columns along K (32 where the group allows it), one
 * symmetric scale per block, as llama.cpp quantizes activations for its Q4/Q8 dot products. One scale per
 * token (fbgemm's dynamic int8) cost SmolLM2-135M 3-4% perplexity at int4 g32 and int8: a few outlier
 * channels set the scale of the whole row. With xs[b] the scale of block b and ab dividing the group:
 * y[n] = sum_g (s[g,n] * sum_{b in g} xs[b] * sum_{k in b} q[n,k] xq[k] + m[g,n] * sum_{b in g} xs[b] * sum_{k in b} xq[k]).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Quantize each row of x [M, K] to int8 in blocks of ab columns: xs[m, b] = the scale of block b, and
 * xsum[m, g] = sum over the blocks b of weight group g of xs[b] * (sum of b's codes), the offset term. */
static void quantize_blocks(const float *x, int64_t M, int64_t K, int64_t ab, int64_t group, int8_t *xq,
                            float *xs, float *xsum) {
    const int64_t blocks = K / ab, per_group = group / ab;
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        int8_t *out = xq + m * K;
        float *scales = xs + m * blocks, *sums = xsum + m * (K / group);
        for (int64_t b = 0; b < blocks; b++) {
            const float *src = row + b * ab;
            int8_t *dst = out + b * ab;
            __m512 vmax = _mm512_setzero_ps();
            for (int64_t k = 0; k < ab; k += 16) {
                const __mmask16 t = ab - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (ab - k)) - 1u);
                vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(t, src + k)));
            }
            const float amax = _mm512_reduce_max_ps(vmax);
            const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
            const __m512 inv = _mm512_set1_ps(1.0f / scale);
            __m512i codes = _mm512_setzero_si512();
            for (int64_t k = 0; k < ab; k += 16) {
                const __mmask16 t = ab - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (ab - k)) - 1u);
                /* round to nearest even; |x / scale| <= 127 so no saturation is needed beyond the pack */
                const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(t, src + k), inv));
                _mm_mask_storeu_epi8(dst + k, t, _mm512_cvtsepi32_epi8(q));
                codes = _mm512_add_epi32(codes, q);
            }
            scales[b] = scale;
            if (b % per_group == 0) sums[b / per_group] = 0.0f;
            sums[b / per_group] += scale * (float)_mm512_reduce_add_epi32(codes);
        }
    }
}

/* Software prefetch distance along the int4 weight stream (measured best of 0/1/2/4 KB on a 2-core EPYC:
 * +5-18% from DRAM; the int4 loop consumes bytes at half int8's rate, so the hardware prefetcher alone
 * keeps too few misses in flight). The int8 loop was fastest without software prefetch. */
#define INT4_PREFETCH_BYTES 4096

static inline __m512i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* One block of 16 rows for one activation row: returns the 16 outputs. Per activation block, the int32
 * dot products are scaled by the block's activation scale into a float sum for the weight group, which
 * the group's weight scales then multiply. */
/* The group's 16 scales and 16 offsets, widened from half floats. */
static inline __m512 half16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

static inline __m512 block_int8(const uint8_t *w, const uint16_t *params, const int8_t *xq, const float *xs,
                                const float *xsum, int64_t K, int64_t group, int64_t ab) {
    const int64_t groups = K / group, per_group = group / ab, chunks = ab / 4;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 gacc = _mm512_setzero_ps();
        for (int64_t b = 0; b < per_group; b++) {
            const int64_t k0 = g * group + b * ab;
            const uint8_t *wb = w + k0 / 4 * 64;
            const int8_t *xb = xq + k0;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            int64_t c = 0;
            for (; c + 4 <= chunks; c += 4) {
                a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(wb + (c + 0) * 64), bcast4(xb + 4 * (c + 0)));
                a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(wb + (c + 1) * 64), bcast4(xb + 4 * (c + 1)));
                a2 = _mm512_dpbusd_epi32(a2, _mm512_loadu_si512(wb + (c + 2) * 64), bcast4(xb + 4 * (c + 2)));
                a3 = _mm512_dpbusd_epi32(a3, _mm512_loadu_si512(wb + (c + 3) * 64), bcast4(xb + 4 * (c + 3)));
            }
            for (; c < chunks; c++)
                a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(wb + c * 64), bcast4(xb + 4 * c));
            const __m512i a = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
            gacc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(xs[g * per_group + b]), gacc);
        }
        const uint16_t *p = params + g * 32;
        acc = _mm512_fmadd_ps(gacc, half16(p), acc);
        acc = _mm512_fmadd_ps(half16(p + 16), _mm512_set1_ps(xsum[g]), acc);
    }
    return acc;
}

/* int4: the high nibble is used in place, as 16 * q (mask 0xF0, no shift): one vector op fewer per chunk,
 * which matters because the loop is bound by vector ops when the shared FFN is read from cache. A block's
 * sum is then (16 * lo + hi16) / 16: the division is one multiply per group (not folded into the stored
 * scales, which would push small half-float scales into subnormals).
 * One group g of 16 rows: sum over its activation blocks b of xs[b] * (the int32 dot product of b). */
static inline __m512 group_int4(const uint8_t *w, const int8_t *xq, const float *xs, int64_t g, int64_t group,
                                int64_t ab) {
    const int64_t per_group = group / ab, chunks = ab / 8;
    const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8((char)0xF0);
    __m512 gacc = _mm512_setzero_ps();
    for (int64_t b = 0; b < per_group; b++) {
        const int64_t k0 = g * group + b * ab;
        const uint8_t *wb = w + k0 / 8 * 64;
        const int8_t *xb = xq + k0;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        int64_t c = 0;
        for (; c + 2 <= chunks; c += 2) {
            _mm_prefetch((const char *)(wb + c * 64 + INT4_PREFETCH_BYTES), _MM_HINT_T0);
            _mm_prefetch((const char *)(wb + c * 64 + INT4_PREFETCH_BYTES + 64), _MM_HINT_T0);
            __m512i r0 = _mm512_loadu_si512(wb + c * 64), r1 = _mm512_loadu_si512(wb + (c + 1) * 64);
            a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(r0, low), bcast4(xb + 8 * c));
            a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(r0, high), bcast4(xb + 8 * c + 4));
            a2 = _mm512_dpbusd_epi32(a2, _mm512_and_si512(r1, low), bcast4(xb + 8 * c + 8));
            a3 = _mm512_dpbusd_epi32(a3, _mm512_and_si512(r1, high), bcast4(xb + 8 * c + 12));
        }
        for (; c < chunks; c++) {
            __m512i r0 = _mm512_loadu_si512(wb + c * 64);
            a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(r0, low), bcast4(xb + 8 * c));
            a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(r0, high), bcast4(xb + 8 * c + 4));
        }
        const __m512i lo = _mm512_add_epi32(a0, a2), hi16 = _mm512_add_epi32(a1, a3);
        const __m512i a = _mm512_add_epi32(_mm512_slli_epi32(lo, 4), hi16); /* 16 x the block's sum */
        gacc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(xs[g * per_group + b] * (1.0f / 16.0f)), gacc);
    }
    return gacc;
}

/* One block of 16 rows of an int4 matrix with half-float params. */
static inline __m512 block_int4(const uint8_t *w, const uint16_t *params, const int8_t *xq, const float *xs,
                                const float *xsum, int64_t K, int64_t group, int64_t ab) {
    __m512 acc = _mm512_setzero_ps(), off = acc;
    for (int64_t g = 0; g < K / group; g++) {
        const __m512 gacc = group_int4(w, xq, xs, g, group, ab);
        const uint16_t *p = params + g * 32;
        /* two independent chains (codes, offsets): at group 32 one chain of two FMAs per group was the
         * longest dependency in the loop */
        acc = _mm512_fmadd_ps(gacc, half16(p), acc);
        off = _mm512_fmadd_ps(half16(p + 16), _mm512_set1_ps(xsum[g]), off);
    }
    return _mm512_add_ps(acc, off);
}

/* 16 bf16 values widened exactly (a 16-bit shift). */
static inline __m512 bf16x16(const uint8_t *p) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

/* One block of 16 rows of an int4 matrix with compact params: per super-block, the groups' sums times
 * their 8-bit codes, then once times the super-block's steps. */
static inline __m512 block_int4_compact(const uint8_t *w, const uint8_t *params, const int8_t *xq, const float *xs,
                                        const float *xsum, int64_t K, int64_t group, int64_t ab, int64_t per) {
    __m512 acc = _mm512_setzero_ps(), off = acc;
    for (int64_t sb = 0; sb < K / group / per; sb++) {
        const uint8_t *p = params + sb * (64 + 32 * per);
        __m512 sacc = _mm512_setzero_ps(), soff = sacc;
        for (int64_t j = 0; j < per; j++) {
            const int64_t g = sb * per + j;
            const __m512 gacc = group_int4(w, xq, xs, g, group, ab);
            const __m128i codes_s = _mm_loadu_si128((const __m128i *)(p + 64 + 32 * j));
            const __m128i codes_m = _mm_loadu_si128((const __m128i *)(p + 64 + 32 * j + 16));
            sacc = _mm512_fmadd_ps(gacc, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes_s)), sacc);
            soff = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes_m)), _mm512_set1_ps(xsum[g]), soff);
        }
        acc = _mm512_fmadd_ps(sacc, bf16x16(p), acc);
        off = _mm512_fmadd_ps(soff, bf16x16(p + 32), off);
    }
    return _mm512_add_ps(acc, off);
}

/* y [M, N] = x [M, K] @ W^T. bits is 8 or 4; W has ceil(N / 16) blocks (padding rows are zero); ab, the
 * activation block, divides group and is a multiple of 4 (int8) or 8 (int4); per is 0 (half-float params)
 * or, for int4, the groups per super-block of compact params.
 * Returns 0, or -1 when a temporary buffer cannot be allocated. */
int mb_qgemv(const float *x, int64_t M, int64_t K, const uint8_t *w, const void *params, int64_t N,
             int64_t group, int64_t per, int bits, int64_t ab, float *y, int threads) {
    const int64_t groups = K / group, blocks = (N + 15) / 16;
    const int64_t block_bytes = bits == 8 ? K * 16 : K * 8;
    const int64_t block_params = per ? groups / per * (64 + 32 * per) : groups * 64; /* bytes */
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *xs = (float *)malloc((size_t)(M * (K / ab)) * sizeof(float));
    float *xsum = (float *)malloc((size_t)(M * groups) * sizeof(float));
    if (!xq || !xs || !xsum) {
        free(xq); free(xs); free(xsum);
        return -1;
    }
    quantize_blocks(x, M, K, ab, group, xq, xs, xsum);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *wb = w + b * block_bytes;
        const uint8_t *pb = (const uint8_t *)params + b * block_params;
        const uint16_t *hb = (const uint16_t *)pb;
        const int64_t rows = N - b * 16 < 16 ? N - b * 16 : 16;
        const __mmask16 mask = (__mmask16)((1u << rows) - 1u);
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = xq + m * K;
            const float *sm = xs + m * (K / ab), *um = xsum + m * groups;
            /* the common shapes get constants (ab 32, group 32, 8 groups a super-block), so the compiler
             * unrolls the block loops */
            __m512 acc;
            if (bits == 8)
                acc = ab == 32 ? block_int8(wb, hb, xm, sm, um, K, group, 32) : block_int8(wb, hb, xm, sm, um, K, group, ab);
            else if (per)
                acc = ab == 32 && group == 32 && per == 8 ? block_int4_compact(wb, pb, xm, sm, um, K, 32, 32, 8)
                                                          : block_int4_compact(wb, pb, xm, sm, um, K, group, ab, per);
            else
                acc = ab == 32 ? (group == 32 ? block_int4(wb, hb, xm, sm, um, K, 32, 32)
                                              : block_int4(wb, hb, xm, sm, um, K, group, 32))
                               : block_int4(wb, hb, xm, sm, um, K, group, ab);
            _mm512_mask_storeu_ps(y + m * N + b * 16, mask, acc);
        }
    }
    free(xq); free(xs); free(xsum);
    return 0;
}

/* y [M, N] = x [M, K] @ W^T for a bf16 W [N, K] (row-major, as PyTorch stores it) and fp32 x: a float LM head
 * tied to a bf16 embedding table. Each bf16 weight is widened exactly (a 16-bit shift) and multiplied in
 * fp32, so the result is the fp32 product of the stored weights; PyTorch's CPU path for this shape ran
 * its AVX2 bf16 dot on one thread at about half this kernel's speed. Rows are split across threads. */
void mb_bf16_gemv(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *row = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * K;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0;
            int64_t k = 0;
            for (; k + 32 <= K; k += 32) {
                const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + k)));
                const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + k + 16)));
                a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)), _mm512_loadu_ps(xm + k), a0);
                a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)), _mm512_loadu_ps(xm + k + 16), a1);
            }
            for (; k < K; k += 16) {
                const __mmask16 t = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
                const __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(t, row + k));
                a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_maskz_loadu_ps(t, xm + k), a0);
            }
            y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        }
    }
}
