/* One decode step through all layers of a quantized model in one call.
 *
 * Why: at one token a layer is ~8 kernel calls (norm, q/k/v, attention, o, norm, gate/up, silu*up, down)
 * and twice as many PyTorch operators around them (reshapes, casts, residual adds), each a few
 * microseconds of Python and dispatch. For a small model that is a third of the step: SmolLM2-135M's 30
 * layers spent ~3 ms of a ~7.5 ms token outside the kernels. This file chains the same kernels, in the
 * same order and arithmetic (fp32 activations, fp32 residual adds), so its output equals the Python path's
 * exactly; it only removes the trips back to Python. It applies when every projection runs on the vnni
 * matmul kernel with q/k/v and gate/up joined, and the fused attention and norm kernels run (the decoder
 * checks; otherwise it keeps the Python loop). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int mb_qgemv(const float *x, int64_t M, int64_t K, const uint8_t *w, const uint16_t *params, int64_t N,
             int64_t group, int bits, int64_t ab, float *y, int threads);
void mb_rmsnorm(const float *x, int64_t M, int64_t D, const void *w, int w_bf16, float eps, float *out);
void mb_silu_mul(const float *gate, const float *up, int64_t stride, int64_t M, int64_t N, float *out);
int mb_attn_decode(const float *q, int64_t q_stride, const float *k, const float *v, int64_t kv_stride,
                   const float *cos, const float *sin, void *kcache, void *vcache, int kv_bf16, int64_t S,
                   int64_t slot, const uint8_t *valid, int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale,
                   float *out, int threads);

/* A packed matrix as mb_qgemv takes it. */
typedef struct {
    const uint8_t *w;
    const uint16_t *params; /* half floats */
    int64_t n, group, bits, ab;
} mb_qmat;

/* One layer's weights and cache; the field order is mirrored by the ctypes Structure in bindings.py. */
typedef struct {
    const void *norm1, *norm2;
    int64_t norm_bf16;
    float eps1, eps2;
    mb_qmat qkv, o, gate_up, down;
    void *k_cache, *v_cache;
} mb_layer;

static int gemv(const mb_qmat *m, const float *x, int64_t B, int64_t K, float *y, int threads) {
    return mb_qgemv(x, B, K, m->w, m->params, m->n, m->group, (int)m->bits, m->ab, y, threads);
}

/* x [B, hidden] fp32 is updated in place through the L layers. cos/sin [B, D] are this step's rotary rows,
 * valid [B, S] (or NULL) the slots each row may attend to. Returns 0, or -1 when a buffer cannot be
 * allocated (x is then partly updated: the caller raises). */
int mb_decode_layers(float *x, int64_t B, int64_t hidden, const mb_layer *layers, int64_t L, const float *cos,
                     const float *sin, int64_t S, int64_t slot, const uint8_t *valid, int kv_bf16, int64_t H,
                     int64_t Hkv, int64_t D, int64_t inter, float scale, int threads) {
    const int64_t qkv_n = (H + 2 * Hkv) * D;
    float *h = (float *)malloc((size_t)(B * hidden) * sizeof(float));
    float *qkv = (float *)malloc((size_t)(B * qkv_n) * sizeof(float));
    float *att = (float *)malloc((size_t)(B * H * D) * sizeof(float));
    float *gu = (float *)malloc((size_t)(B * 2 * inter) * sizeof(float));
    float *act = (float *)malloc((size_t)(B * inter) * sizeof(float));
    float *y = (float *)malloc((size_t)(B * hidden) * sizeof(float));
    int rc = (h && qkv && att && gu && act && y) ? 0 : -1;
    for (int64_t i = 0; i < L && rc == 0; i++) {
        const mb_layer *l = layers + i;
        mb_rmsnorm(x, B, hidden, l->norm1, (int)l->norm_bf16, l->eps1, h);
        rc |= gemv(&l->qkv, h, B, hidden, qkv, threads);
        rc |= mb_attn_decode(qkv, qkv_n, qkv + H * D, qkv + (H + Hkv) * D, qkv_n, cos, sin, l->k_cache,
                             l->v_cache, kv_bf16, S, slot, valid, B, H, Hkv, D, scale, att, threads);
        rc |= gemv(&l->o, att, B, H * D, y, threads);
        for (int64_t j = 0; j < B * hidden; j++) x[j] += y[j];
        mb_rmsnorm(x, B, hidden, l->norm2, (int)l->norm_bf16, l->eps2, h);
        rc |= gemv(&l->gate_up, h, B, hidden, gu, threads);
        mb_silu_mul(gu, gu + inter, 2 * inter, B, inter, act);
        rc |= gemv(&l->down, act, B, inter, y, threads);
        for (int64_t j = 0; j < B * hidden; j++) x[j] += y[j];
    }
    free(h); free(qkv); free(att); free(gu); free(act); free(y);
    return rc ? -1 : 0;
}
