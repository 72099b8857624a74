/* One decode step through all layers of a quantized model in one call.
 *
 * Why: at one token a layer is ~8 kernel calls (norm, q/k/v, attention, o, norm, gate/up, silu*up, down)
 * and twice as many PyTorch operators around them (reshapes, casts, residual adds), each a few
 * microseconds of Python and dispatch. For a small model that is a third of the step: SmolLM2-135M's 30
 * layers spent ~3 ms of a ~7.5 ms token outside the kernels. This file chains the same kernels, in the
 * same order and arithmetic (fp32 activations, fp32 residual adds), so its output equals the Python path's
 * exactly; it only removes the trips back to Python. It applies when every projection runs on the vnni
 * matmul kernel with q/k/v and gate/up joined, and the fused attention and norm kernels run (the decoder
 * checks; otherwise it keeps the Python loop). The lean runtime (infer/lean.py, no PyTorch in the process)
 * calls the same step, and mb_prefill_layers for a prompt: the same layers over T tokens of one sequence.
 * mb_decode_layers_avx2 and mb_prefill_layers_avx2 are the same on the AVX2 kernels (gemv_avx2.c,
 * layer_avx2.c) for CPUs without AVX-512. This file is compiled with the AVX2 flags (no AVX-512), so it runs
 * on both. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int mb_qgemv(const float *x, int64_t M, int64_t K, const uint8_t *w, const void *params, int64_t N,
             int64_t group, int64_t per, int bits, int64_t ab, float *y, int threads);
void mb_rmsnorm(const float *x, int64_t M, int64_t D, const void *w, int w_bf16, float eps, float *out);
void mb_silu_mul(const float *gate, const float *up, int64_t stride, int64_t M, int64_t N, float *out);
int mb_attn_decode(const float *q, int64_t q_stride, const float *k, const float *v, int64_t kv_stride,
                   const float *cos, const float *sin, void *kcache, void *vcache, int kv_bf16, int64_t S,
                   int64_t slot, const uint8_t *valid, int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale,
                   float *out, int threads);
int mb_attn_prefill(const float *q, int64_t q_stride, const float *k, const float *v, int64_t kv_stride,
                    const float *cos, const float *sin, void *kcache, void *vcache, int kv_bf16, int64_t S,
                    int64_t first, int64_t T, int64_t H, int64_t Hkv, int64_t D, float scale, float *out, int threads);

int mb_qgemv_avx2(const float *x, int64_t M, int64_t K, const uint8_t *w, const void *params, int64_t N,
                  int64_t group, int64_t per, int bits, int64_t ab, float *y, int threads);
void mb_rmsnorm_avx2(const float *x, int64_t M, int64_t D, const void *w, int w_bf16, float eps, float *out);
void mb_silu_mul_avx2(const float *gate, const float *up, int64_t stride, int64_t M, int64_t N, float *out);
int mb_attn_decode_avx2(const float *q, int64_t q_stride, const float *k, const float *v, int64_t kv_stride,
                        const float *cos, const float *sin, void *kcache, void *vcache, int kv_bf16, int64_t S,
                        int64_t slot, const uint8_t *valid, int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale,
                        float *out, int threads);
int mb_attn_prefill_avx2(const float *q, int64_t q_stride, const float *k, const float *v, int64_t kv_stride,
                         const float *cos, const float *sin, void *kcache, void *vcache, int kv_bf16, int64_t S,
                         int64_t first, int64_t T, int64_t H, int64_t Hkv, int64_t D, float scale, float *out,
                         int threads);

/* The kernels of one build, as the step calls them. */
typedef struct {
    int (*qgemv)(const float *, int64_t, int64_t, const uint8_t *, const void *, int64_t, int64_t, int64_t, int,
                 int64_t, float *, int);
    void (*rmsnorm)(const float *, int64_t, int64_t, const void *, int, float, float *);
    void (*silu_mul)(const float *, const float *, int64_t, int64_t, int64_t, float *);
    int (*attn_decode)(const float *, int64_t, const float *, const float *, int64_t, const float *, const float *,
                       void *, void *, int, int64_t, int64_t, const uint8_t *, int64_t, int64_t, int64_t, int64_t,
                       float, float *, int);
    int (*attn_prefill)(const float *, int64_t, const float *, const float *, int64_t, const float *, const float *,
                        void *, void *, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, float *, int);
} mb_kernels;

static const mb_kernels AVX512 = {mb_qgemv, mb_rmsnorm, mb_silu_mul, mb_attn_decode, mb_attn_prefill};
static const mb_kernels AVX2 = {mb_qgemv_avx2, mb_rmsnorm_avx2, mb_silu_mul_avx2, mb_attn_decode_avx2,
                                mb_attn_prefill_avx2};

/* A packed matrix as mb_qgemv takes it. */
typedef struct {
    const uint8_t *w;
    const void *params; /* half floats, or compact int4 params when per > 0 (see gemv_avx512.c) */
    int64_t n, group, per, bits, ab;
} mb_qmat;

/* One layer's weights and cache; the field order is mirrored by the ctypes Structure in bindings.py. */
typedef struct {
    const void *norm1, *norm2;
    int64_t norm_bf16;
    float eps1, eps2;
    mb_qmat qkv, o, gate_up, down;
    void *k_cache, *v_cache;
} mb_layer;

static int gemv(const mb_kernels *k, const mb_qmat *m, const float *x, int64_t B, int64_t K, float *y, int threads) {
    return k->qgemv(x, B, K, m->w, m->params, m->n, m->group, m->per, (int)m->bits, m->ab, y, threads);
}

/* y [B, N] = x [B, K] @ W^T for a packed matrix as the decode step holds it (the lean runtime's LM head). */
int mb_qmat_gemv(const mb_qmat *m, const float *x, int64_t B, int64_t K, float *y, int threads) {
    return gemv(&AVX512, m, x, B, K, y, threads);
}

int mb_qmat_gemv_avx2(const mb_qmat *m, const float *x, int64_t B, int64_t K, float *y, int threads) {
    return gemv(&AVX2, m, x, B, K, y, threads);
}

/* The layers over R rows of x [R, hidden] (fp32, updated in place). Decode (T = 1): R = B rows, one new
 * token each, all at cache slot `slot`, cos/sin [B, D], valid [B, S] or NULL. Prefill (B = 1): R = T
 * consecutive tokens of one sequence at slots slot..slot+T-1, cos/sin [T, D]; the projections read each
 * weight once for all T rows, and token t attends over slots 0..slot+t (causal; mb_attn_prefill, equal to
 * feeding the tokens one at a time).
 * Returns 0, or -1 when a buffer cannot be allocated (x is then partly updated: the caller raises). */
static int run_layers(const mb_kernels *k, float *x, int64_t B, int64_t T, int64_t hidden, const mb_layer *layers, int64_t L,
                      const float *cos, const float *sin, int64_t S, int64_t slot, const uint8_t *valid,
                      int kv_bf16, int64_t H, int64_t Hkv, int64_t D, int64_t inter, float scale, int threads) {
    const int64_t qkv_n = (H + 2 * Hkv) * D, R = B * T;
    float *h = (float *)malloc((size_t)(R * hidden) * sizeof(float));
    float *qkv = (float *)malloc((size_t)(R * qkv_n) * sizeof(float));
    float *att = (float *)malloc((size_t)(R * H * D) * sizeof(float));
    float *gu = (float *)malloc((size_t)(R * 2 * inter) * sizeof(float));
    float *act = (float *)malloc((size_t)(R * inter) * sizeof(float));
    float *y = (float *)malloc((size_t)(R * hidden) * sizeof(float));
    int rc = (h && qkv && att && gu && act && y) ? 0 : -1;
    for (int64_t i = 0; i < L && rc == 0; i++) {
        const mb_layer *l = layers + i;
        k->rmsnorm(x, R, hidden, l->norm1, (int)l->norm_bf16, l->eps1, h);
        rc |= gemv(k, &l->qkv, h, R, hidden, qkv, threads);
        if (T == 1)
            rc |= k->attn_decode(qkv, qkv_n, qkv + H * D, qkv + (H + Hkv) * D, qkv_n, cos, sin, l->k_cache,
                                 l->v_cache, kv_bf16, S, slot, valid, B, H, Hkv, D, scale, att, threads);
        else
            rc |= k->attn_prefill(qkv, qkv_n, qkv + H * D, qkv + (H + Hkv) * D, qkv_n, cos, sin, l->k_cache,
                                l->v_cache, kv_bf16, S, slot, T, H, Hkv, D, scale, att, threads);
        rc |= gemv(k, &l->o, att, R, H * D, y, threads);
        for (int64_t j = 0; j < R * hidden; j++) x[j] += y[j];
        k->rmsnorm(x, R, hidden, l->norm2, (int)l->norm_bf16, l->eps2, h);
        rc |= gemv(k, &l->gate_up, h, R, hidden, gu, threads);
        k->silu_mul(gu, gu + inter, 2 * inter, R, inter, act);
        rc |= gemv(k, &l->down, act, R, inter, y, threads);
        for (int64_t j = 0; j < R * hidden; j++) x[j] += y[j];
    }
    free(h); free(qkv); free(att); free(gu); free(act); free(y);
    return rc ? -1 : 0;
}

/* One decode step: x [B, hidden], one token per row at cache slot `slot` (see run_layers). */
int mb_decode_layers(float *x, int64_t B, int64_t hidden, const mb_layer *layers, int64_t L, const float *cos,
                     const float *sin, int64_t S, int64_t slot, const uint8_t *valid, int kv_bf16, int64_t H,
                     int64_t Hkv, int64_t D, int64_t inter, float scale, int threads) {
    return run_layers(&AVX512, x, B, 1, hidden, layers, L, cos, sin, S, slot, valid, kv_bf16, H, Hkv, D, inter,
                      scale, threads);
}

/* mb_decode_layers on the AVX2 kernels. */
int mb_decode_layers_avx2(float *x, int64_t B, int64_t hidden, const mb_layer *layers, int64_t L, const float *cos,
                          const float *sin, int64_t S, int64_t slot, const uint8_t *valid, int kv_bf16, int64_t H,
                          int64_t Hkv, int64_t D, int64_t inter, float scale, int threads) {
    return run_layers(&AVX2, x, B, 1, hidden, layers, L, cos, sin, S, slot, valid, kv_bf16, H, Hkv, D, inter, scale,
                      threads);
}

/* A prompt of T tokens of one sequence into slots first..first+T-1: x [T, hidden] (see run_layers). */
int mb_prefill_layers(float *x, int64_t T, int64_t hidden, const mb_layer *layers, int64_t L, const float *cos,
                      const float *sin, int64_t S, int64_t first, int kv_bf16, int64_t H, int64_t Hkv, int64_t D,
                      int64_t inter, float scale, int threads) {
    return run_layers(&AVX512, x, 1, T, hidden, layers, L, cos, sin, S, first, NULL, kv_bf16, H, Hkv, D, inter,
                      scale, threads);
}

/* mb_prefill_layers on the AVX2 kernels. */
int mb_prefill_layers_avx2(float *x, int64_t T, int64_t hidden, const mb_layer *layers, int64_t L, const float *cos,
                           const float *sin, int64_t S, int64_t first, int kv_bf16, int64_t H, int64_t Hkv, int64_t D,
                           int64_t inter, float scale, int threads) {
    return run_layers(&AVX2, x, 1, T, hidden, layers, L, cos, sin, S, first, NULL, kv_bf16, H, Hkv, D, inter, scale,
                      threads);
}

/* For the lean runtime, which has no array library: bf16 values widened to fp32 (exact), the index of the
 * largest of n floats (the first one on a tie, as numpy's and PyTorch's argmax; NaN never wins), and a
 * sampled token (mb_sample, below). Here, compiled without AVX-512, so both builds' runtimes can call them. */
void mb_bf16_to_f32(const uint16_t *x, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) {
        const uint32_t u = (uint32_t)x[i] << 16;
        memcpy(out + i, &u, 4);
    }
}

int64_t mb_argmax(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best] || (x[best] != x[best] && x[i] == x[i])) best = i;
    return best;
}

/* The k-th largest of a[0..n-1] (k in 1..n), reordering a: quickselect, so top-k costs O(n) and not a sort
 * of the vocabulary. */
static float kth_largest(float *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    const int64_t want = k - 1;
    while (lo < hi) {
        const float pivot = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                const float t = a[i];
                a[i] = a[j], a[j] = t, i++, j--;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break;
    }
    return a[want];
}

typedef struct {
    float p;
    int32_t id;
} candidate;

/* Probabilities p in (0, 1] by binary exponent: bucket 0 holds [0.5, 1], bucket b [2^-(b+1), 2^-b); the
 * last one everything smaller, zero included. */
#define SAMPLE_BUCKETS 160
static inline int bucket(float p) {
    if (!(p > 0.0f)) return SAMPLE_BUCKETS - 1;
    uint32_t u;
    memcpy(&u, &p, 4);
    const int b = 126 - (int)(u >> 23); /* p = 1.f * 2^(E - 127), E the exponent field (p > 0: no sign bit) */
    return b < 0 ? 0 : b < SAMPLE_BUCKETS - 1 ? b : SAMPLE_BUCKETS - 1;
}

static inline void swap_candidates(candidate *c, int64_t i, int64_t j) {
    const candidate t = c[i];
    c[i] = c[j], c[j] = t;
}

static int by_probability(const void *a, const void *b) { /* descending; equal ones by id */
    const candidate *x = (const candidate *)a, *y = (const candidate *)b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return (x->id > y->id) - (x->id < y->id);
}

/* One token id drawn from logits x [n] as the default runtime's sample_next draws it, for the lean runtime
 * (no torch there; it applies any repetition penalty first): division by the temperature (> 0), top-k
 * (0 = off; ties with the k-th are kept), top-p (1 = off; a token is dropped when the more probable ones
 * already hold top_p), then the id at which the kept probabilities' running sum passes u times their
 * total (u uniform in [0, 1): the caller's seeded generator). x is overwritten.
 * Only the nucleus's last few tokens need an order: the tokens are bucketed by the binary exponent of
 * their probability, the buckets above the one where top_p is reached are all in, and only that bucket is
 * sorted (not the vocabulary). Returns the id, -1 for a bad argument, -2 when out of memory. */
int64_t mb_sample(float *x, int64_t n, float temperature, int64_t top_k, float top_p, double u) {
    if (n < 1 || n > INT32_MAX || !(temperature > 0.0f) || top_k < 0 || !(top_p > 0.0f && top_p <= 1.0f) ||
        !(u >= 0.0 && u < 1.0))
        return -1;
    float best = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        x[i] /= temperature;
        if (x[i] > best) best = x[i];
    }
    if (!(best > -INFINITY)) return mb_argmax(x, n); /* nothing finite to draw from */
    candidate *c = (candidate *)malloc((size_t)n * sizeof(candidate));
    if (!c) return -2;
    float kth = -INFINITY;
    if (top_k > 0 && top_k < n) {
        float *values = (float *)c; /* the candidates' buffer, for now: n floats fit in it */
        for (int64_t i = 0; i < n; i++) values[i] = x[i] == x[i] ? x[i] : -INFINITY;
        kth = kth_largest(values, n, top_k);
    }
    int64_t kept = 0;
    double total = 0.0;
    for (int64_t i = 0; i < n; i++) {
        if (!(x[i] >= kth) || x[i] == -INFINITY) continue; /* also drops NaN */
        const float p = expf(x[i] - best);
        c[kept].p = p, c[kept].id = (int32_t)i, kept++;
        total += p;
    }
    if (top_p < 1.0f) { /* the nucleus: bucket the kept tokens by the binary exponent of p (<= 1) */
        double mass[SAMPLE_BUCKETS] = {0.0}, above = 0.0;
        for (int64_t j = 0; j < kept; j++) mass[bucket(c[j].p)] += c[j].p;
        int B = 0; /* every token of the buckets before B is in; the first tokens of bucket B complete it */
        while (B < SAMPLE_BUCKETS - 1 && above + mass[B] < top_p * total) above += mass[B++];
        int64_t m = 0, r;
        for (int64_t j = 0; j < kept; j++) /* buckets before B first, then bucket B (the rest is out) */
            if (bucket(c[j].p) < B) swap_candidates(c, m++, j);
        r = m;
        for (int64_t j = m; j < kept; j++)
            if (bucket(c[j].p) == B) swap_candidates(c, r++, j);
        qsort(c + m, (size_t)(r - m), sizeof(candidate), by_probability);
        double before = 0.0;
        for (int64_t j = 0; j < m; j++) before += c[j].p;
        kept = m;
        while (kept < r && !(before >= top_p * total)) before += c[kept++].p;
        total = before;
    }
    const double target = u * total;
    double sum = 0.0;
    int64_t pick = c[kept - 1].id;
    for (int64_t j = 0; j < kept; j++) {
        sum += c[j].p;
        if (sum > target) {
            pick = c[j].id;
            break;
        }
    }
    free(c);
    return pick;
}
