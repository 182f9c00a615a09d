/* lowbit: fused per-token ops of the lean decoder's decode step (one sequence, one new position).
 *
 * Built on first use by kernels/native.py with the system C compiler (cc -O3 -march=native -ffast-math -fopenmp),
 * loaded with ctypes; every function has a torch reference in kernels/native.py and an equivalence test.
 * Between the int4 matmuls (bfloat16 in, bfloat16 out) a decoded token otherwise costs ~35 small torch
 * ops per layer, ~5 us each at this size; here they are four calls per layer:
 *
 *   lb_add_rmsnorm   x += y (optional); out = rms_norm(x) * w                   residual + next norm
 *   lb_attn_decode   rope(q, k) at pos; K/V cache[pos] = k, v; out = softmax(q K^T * scale) V
 *   lb_silu_mul      out = silu(g) * u for g|u = one vector [2n]
 *   lb_linear_q      y = x W^T for 4- or 8-bit codes in groups, read in place; activations int8 per 32
 *   lb_gemm_q        Y = X W^T for M rows at once (prefill, evaluation): the same math as lb_linear_q per row
 *   lb_isa           which instruction set this build's kernels use (0 generic, 1 AVX2, 2 AVX-512 VNNI)
 *
 * Matmul inputs and outputs are bfloat16 (torch's int4 kernel's) or float32, chosen by a flag per argument;
 * the residual stream and all math are float32, the K/V cache float16; rounding to bf16 and fp16 is
 * round-to-nearest-even, as torch's .to().
 * Shapes: hidden n; q heads nh, kv heads nkv (nh % nkv == 0), head_dim hd (even);
 * cache [nkv, max_len, hd] float16 for one layer, positions 0..pos valid after the call.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_HEAD_DIM 512 /* one head's accumulator */
/* the matvec and the GEMM without fast-math: their intrinsics are the same in both, and so, without
 * reassociation that differs where the code is inlined, are their float results */
#define EXACT __attribute__((optimize("no-fast-math", "fp-contract=off")))

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float ld(const void *p, int bf16, size_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void st(void *p, int bf16, size_t i, float v) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

int lb_abi_version(void) { return 7; }

typedef _Float16 f16; /* the K/V cache's element (llama.cpp's default cache type): half the bytes of float32 */

/* s[t] = scale * dot(q, K[t]) for t < T; K rows of hd float16. Eight positions at a time with eight
 * independent accumulators (one per position), reduced together: a plain dot loop per position is one
 * dependent FMA chain plus a horizontal sum per position, several times slower. */
static void scores(const float *q, const f16 *K, int T, int hd, float scale, float *s) {
    int t = 0;
#if defined(__AVX2__) && defined(__F16C__)
    if (hd % 8 == 0) {
        for (; t + 8 <= T; t += 8) {
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (int i = 0; i < hd; i += 8) {
                const __m256 qv = _mm256_loadu_ps(q + i);
                for (int j = 0; j < 8; j++)
                    acc[j] = _mm256_fmadd_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(K + (size_t)(t + j) * hd + i))),
                                             acc[j]);
            }
            /* transpose-reduce: lane j of the result = sum of acc[j]'s eight lanes */
            __m256 a01 = _mm256_hadd_ps(acc[0], acc[1]), a23 = _mm256_hadd_ps(acc[2], acc[3]);
            __m256 a45 = _mm256_hadd_ps(acc[4], acc[5]), a67 = _mm256_hadd_ps(acc[6], acc[7]);
            __m256 a0123 = _mm256_hadd_ps(a01, a23), a4567 = _mm256_hadd_ps(a45, a67);
            __m256 lo = _mm256_permute2f128_ps(a0123, a4567, 0x20), hi = _mm256_permute2f128_ps(a0123, a4567, 0x31);
            _mm256_storeu_ps(s + t, _mm256_mul_ps(_mm256_add_ps(lo, hi), _mm256_set1_ps(scale)));
        }
    }
#endif
    for (; t < T; t++) {
        const f16 *kt = K + (size_t)t * hd;
        float d = 0.f;
        for (int i = 0; i < hd; i++) d += q[i] * (float)kt[i];
        s[t] = d * scale;
    }
}

/* x [n] float32, updated in place when y != NULL: x += y (y [n] bf16 or float32 by y_bf16);
 * w [n] float32; out [n] (bf16 or float32 by out_bf16) = x * rsqrt(mean(x^2) + eps) * w. */
void lb_add_rmsnorm(float *x, const void *y, int y_bf16, const float *w, float eps, int n, void *out, int out_bf16) {
    if (y) {
        for (int i = 0; i < n; i++) x[i] += ld(y, y_bf16, i);
    }
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) st(out, out_bf16, i, x[i] * r * w[i]);
}

/* gu [2n] = gate | up; out [n] = silu(gate) * up (each bf16 or float32 by its flag). */
void lb_silu_mul(const void *gu, int in_bf16, int n, void *out, int out_bf16) {
    for (int i = 0; i < n; i++) {
        const float g = ld(gu, in_bf16, i), u = ld(gu, in_bf16, (size_t)n + i);
        st(out, out_bf16, i, g / (1.0f + expf(-g)) * u);
    }
}

/* qkv [(nh + 2 nkv) hd] (bf16 or float32 by in_bf16): q heads, k heads, v heads (one token).
 * cos, sin [hd] float32: the rotary table's row at pos (rotate_half convention: pairs i, i + hd/2).
 * kc, vc [nkv, max_len, hd] float16: this layer's cache; k, v written at pos (rounded to nearest).
 * out [nh hd] (bf16 or float32 by out_bf16): attention output over positions 0..pos, q heads in order (GQA: head h reads kv head
 * h / (nh / nkv)). scratch: at least nh * (pos + 1) + (nh + nkv) * hd floats. */
void lb_attn_decode(const void *qkv, int in_bf16, const float *cos, const float *sin, f16 *kc, f16 *vc,
                    int pos, int max_len, int nh, int nkv, int hd, float scale, float *scratch, void *out, int out_bf16) {
    const int half = hd / 2, group = nh / nkv, T = pos + 1;
    float *q = scratch + (size_t)nh * T; /* [nh, hd] roped q */
    for (int h = 0; h < nh + nkv; h++) {
        const size_t src = (size_t)h * hd;
        float *dst = q + (size_t)h * hd; /* roped q, then k (nh + nkv rows of scratch) */
        for (int i = 0; i < half; i++) {
            const float a = ld(qkv, in_bf16, src + i), b = ld(qkv, in_bf16, src + i + half);
            dst[i] = a * cos[i] - b * sin[i];
            dst[i + half] = b * cos[i + half] + a * sin[i + half];
        }
        if (h >= nh) {
            f16 *kd = kc + ((size_t)(h - nh) * max_len + pos) * hd;
            for (int i = 0; i < hd; i++) kd[i] = (f16)dst[i];
        }
    }
    for (int g = 0; g < nkv; g++) {
        const size_t src = (size_t)(nh + nkv + g) * hd;
        f16 *dst = vc + ((size_t)g * max_len + pos) * hd;
        for (int i = 0; i < hd; i++) dst[i] = (f16)ld(qkv, in_bf16, src + i);
    }
#pragma omp parallel for schedule(static)
    for (int h = 0; h < nh; h++) {
        const int g = h / group;
        const float *qh = q + (size_t)h * hd;
        const f16 *K = kc + (size_t)g * max_len * hd;
        const f16 *V = vc + (size_t)g * max_len * hd;
        float *s = scratch + (size_t)h * T;
        scores(qh, K, T, hd, scale, s);
        float m = -FLT_MAX;
        for (int t = 0; t < T; t++) m = s[t] > m ? s[t] : m;
        float sum = 0.f;
        for (int t = 0; t < T; t++) {
            s[t] = expf(s[t] - m);
            sum += s[t];
        }
        float acc[MAX_HEAD_DIM];
        for (int i = 0; i < hd; i++) acc[i] = 0.f;
        for (int t = 0; t < T; t++) {
            const f16 *vt = V + (size_t)t * hd;
            const float p = s[t];
            int i = 0;
#if defined(__AVX2__) && defined(__F16C__)
            const __m256 pv = _mm256_set1_ps(p);
            for (; i + 8 <= hd; i += 8)
                _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vt + i))),
                                                          _mm256_loadu_ps(acc + i)));
#endif
            for (; i < hd; i++) acc[i] += p * (float)vt[i];
        }
        const float inv = 1.0f / sum;
        for (int i = 0; i < hd; i++) st(out, out_bf16, (size_t)h * hd + i, acc[i] * inv);
    }
}


/* ---- prefill: the per-token ops for M rows at once (rows split over threads) -------------------------------- */

/* x [M, n] float32 (x += y when y != NULL, y [M, n] bf16 or float32); out [M, n] = rms_norm(x) * w, row by row
 * as lb_add_rmsnorm */
void lb_add_rmsnorm_rows(float *x, const void *y, int y_bf16, const float *w, float eps, int M, int n, void *out,
                         int out_bf16) {
    const size_t ye = y_bf16 ? 2 : 4, oe = out_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++)
        lb_add_rmsnorm(x + (size_t)m * n, y ? (const char *)y + (size_t)m * n * ye : NULL, y_bf16, w, eps, n,
                       (char *)out + (size_t)m * n * oe, out_bf16);
}

/* gu [M, 2n] (gate | up per row) -> out [M, n] = silu(gate) * up, row by row as lb_silu_mul */
void lb_silu_mul_rows(const void *gu, int in_bf16, int M, int n, void *out, int out_bf16) {
    const size_t ie = in_bf16 ? 2 : 4, oe = out_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++)
        lb_silu_mul((const char *)gu + (size_t)m * 2 * n * ie, in_bf16, n, (char *)out + (size_t)m * n * oe, out_bf16);
}

/* qkv [M, (nh + 2 nkv) hd] (bf16 or float32) at positions p .. p + M - 1; cos, sin [p + M, hd] float32 (the rotary
 * table from position 0); kc, vc [nkv, max_len, hd] float16: k (roped) and v written at p .. p + M - 1.
 * q [nh, M, hd], k [nkv, M, hd], v [nkv, M, hd] float32 (head-major, as attention reads them): roped q and k, v. */
void lb_rope_rows(const void *qkv, int in_bf16, const float *cos, const float *sin, int p, int M, f16 *kc, f16 *vc,
                  int max_len, int nh, int nkv, int hd, float *q, float *k, float *v) {
    const int half = hd / 2, width = (nh + 2 * nkv) * hd;
#pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++) {
        const int pos = p + m;
        const float *c = cos + (size_t)pos * hd, *sn = sin + (size_t)pos * hd;
        const size_t row = (size_t)m * width;
        for (int h = 0; h < nh + nkv; h++) {
            const size_t src = row + (size_t)h * hd;
            float *dst = h < nh ? q + ((size_t)h * M + m) * hd : k + ((size_t)(h - nh) * M + m) * hd;
            for (int i = 0; i < half; i++) {
                const float a = ld(qkv, in_bf16, src + i), b = ld(qkv, in_bf16, src + i + half);
                dst[i] = a * c[i] - b * sn[i];
                dst[i + half] = b * c[i + half] + a * sn[i + half];
            }
            if (h >= nh) {
                f16 *kd = kc + ((size_t)(h - nh) * max_len + pos) * hd;
                for (int i = 0; i < hd; i++) kd[i] = (f16)dst[i];
            }
        }
        for (int g = 0; g < nkv; g++) {
            const size_t src = row + (size_t)(nh + nkv + g) * hd;
            float *vd = v + ((size_t)g * M + m) * hd;
            f16 *cd = vc + ((size_t)g * max_len + pos) * hd;
            for (int i = 0; i < hd; i++) {
                vd[i] = ld(qkv, in_bf16, src + i);
                cd[i] = (f16)vd[i];
            }
        }
    }
}

/* ---- weight-quantized matrix-vector products -------------------------------------------------------------
 * W [N, K] is read where the model keeps it, as lowbit's packed codes u (core/packing.py): 4-bit, two per byte,
 * column 2i in the low nibble and 2i + 1 in the high one; 8-bit, one byte each. Per row n and group g of G
 * columns (the last group may be shorter), w = s[n, g] (u - z[n, g]); sz = s * z is passed instead of z.
 * Several weights that read the same x (q|k|v) are segments of one call: no copy of any weight.
 * The activation x [K] is quantized per block of 32 values to int8 (xq = round(x / d), d = max|x| / 127, as
 * llama.cpp's Q8_0); the blocks are 32 consecutive columns for 8-bit weights, and for 4-bit weights the even
 * and the odd columns of each 64 (so that one 32-byte load of codes is two blocks: low and high nibbles). Then
 *     y[n] = sum_g s[n,g] sum_{b in g} d_b dot(c_b, xq_b)  -  sum_g sz'[n,g] A_g,    A_g = sum_{b in g} d_b sum(xq_b)
 * with exact integer dots per block, c = u (4-bit), c = u - 128 (8-bit, signed; sz' = s (z - 128)).
 * 4-bit needs K % 64 == 0 and G % 64 == 0, 8-bit K % 32 == 0 and G % 32 == 0. Rows are split over OpenMP threads. */

/* exact IEEE division and rounding here (no fast-math), so that the reference in torch gets the same codes */
__attribute__((optimize("no-fast-math"))) static void quantize_act(const void *x, int x_bf16, int K, int interleave,
                                                                   int8_t *xq, float *d, float *dsum) {
    for (int b = 0; b < K / 32; b++) {
        float v[32], amax = 0.f;
        for (int j = 0; j < 32; j++) {
            /* interleave: block 2c = even columns of the 64 starting at 64c, block 2c + 1 = odd ones */
            const size_t col = interleave ? (size_t)(b / 2) * 64 + 2 * j + (b & 1) : (size_t)b * 32 + j;
            v[j] = ld(x, x_bf16, col);
            const float a = fabsf(v[j]);
            amax = a > amax ? a : amax;
        }
        const float db = amax / 127.f, id = db > 0.f ? 1.f / db : 0.f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            const int q = (int)nearbyintf(v[j] * id);
            xq[b * 32 + j] = (int8_t)q;
            sum += q;
        }
        d[b] = db;
        dsum[b] = db * (float)sum;
    }
}

#ifdef __AVX2__
/* the sum of the 8 lanes, in one fixed order: horizontal adds are builtins that -ffast-math does not reassociate
 * (the generic vector '+' behind _mm_add_ps would be, differently where it is inlined), so the matvec and the
 * GEMM that both end with this sum give equal results */
EXACT static inline float hsum8(__m256 v) {
    __m128 s = _mm_hadd_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}
#endif

/* sum_g sz[g] A[g]: one copy of this code for the matvec and the GEMM (no contraction or reordering that
 * differs between them), so that both give the same float result */
EXACT static inline __attribute__((always_inline, unused)) float zero_term(const float *sz, const float *A, int ng) {
    float corr = 0.f;
    for (int g = 0; g < ng; g++) corr += sz[g] * A[g];
    return corr;
}

#ifdef __AVX2__
/* the 32 codes of block b of a row, as bytes (4-bit: 0..15, low nibbles = block 2c, high = 2c + 1;
 * 8-bit: u - 128 as int8) */
EXACT static inline __attribute__((always_inline)) __m256i block_codes(const uint8_t *wr, int bits, int b) {
    if (bits == 4) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(wr + (size_t)(b / 2) * 32));
        return _mm256_and_si256((b & 1) ? _mm256_srli_epi16(raw, 4) : raw, _mm256_set1_epi8(0x0f));
    }
    return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wr + (size_t)b * 32)), _mm256_set1_epi8((char)0x80));
}

/* lane i = sum of the products 4i .. 4i+3 of unsigned a and signed b bytes, exact where a pair's sum fits int16
 * (always, for the operands below): AVX-512 VNNI's vpdpbusd in one instruction, AVX2's maddubs + madd in two;
 * the same integers either way */
EXACT static inline __attribute__((always_inline)) __m256i dot4(__m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

/* int32 lanes of dot(c, xv) (pairs summed): 4-bit codes are unsigned (0..15, no saturation); 8-bit codes are
 * signed: |c| * sign(x, c) = c * x with |c| <= 128, |x| <= 127, so pair sums fit in int16 */
EXACT static inline __attribute__((always_inline)) __m256 block_dot(__m256i c, __m256i xv, int bits) {
    return _mm256_cvtepi32_ps(dot4(bits == 4 ? c : _mm256_sign_epi8(c, c), bits == 4 ? xv : _mm256_sign_epi8(xv, c)));
}
#endif

#define ROWS 4 /* rows per step: the activation blocks are loaded once for all of them */

/* out[r] for rows n0 .. n0 + R, R = ROWS or 1 (compile-time constants after inlining, so the accumulators stay
 * in registers), bits 4 or 8 likewise */
EXACT static inline __attribute__((always_inline)) void rows_q(const uint8_t *w, size_t row_bytes, const int bits,
        const float *s, const float *sz, const int R, int nb, int ng, int bpg, const int8_t *xq,
        const float *d, const float *A, float *out) {
    /* w, s, sz: the first of the R rows */
#ifdef __AVX2__
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    const uint8_t *w0 = w, *w1 = w0 + row_bytes, *w2 = w1 + row_bytes, *w3 = w2 + row_bytes;
    for (int g = 0; g < ng; g++) {
        const int b0 = g * bpg, b1 = b0 + bpg < nb ? b0 + bpg : nb;
        __m256 v0 = _mm256_setzero_ps(), v1 = v0, v2 = v0, v3 = v0;
        for (int b = b0; b < b1; b++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (size_t)b * 32));
            const __m256 db = _mm256_set1_ps(d[b]);
            v0 = _mm256_fmadd_ps(block_dot(block_codes(w0, bits, b), xv, bits), db, v0);
            if (R == ROWS) {
                v1 = _mm256_fmadd_ps(block_dot(block_codes(w1, bits, b), xv, bits), db, v1);
                v2 = _mm256_fmadd_ps(block_dot(block_codes(w2, bits, b), xv, bits), db, v2);
                v3 = _mm256_fmadd_ps(block_dot(block_codes(w3, bits, b), xv, bits), db, v3);
            }
        }
        acc0 = _mm256_fmadd_ps(v0, _mm256_set1_ps(s[(size_t)g]), acc0);
        if (R == ROWS) {
            acc1 = _mm256_fmadd_ps(v1, _mm256_set1_ps(s[(size_t)ng + g]), acc1);
            acc2 = _mm256_fmadd_ps(v2, _mm256_set1_ps(s[(size_t)2 * ng + g]), acc2);
            acc3 = _mm256_fmadd_ps(v3, _mm256_set1_ps(s[(size_t)3 * ng + g]), acc3);
        }
    }
    const __m256 accs[4] = {acc0, acc1, acc2, acc3};
    for (int r = 0; r < R; r++) out[r] = hsum8(accs[r]) - zero_term(sz + (size_t)r * ng, A, ng);
#else
    for (int r = 0; r < R; r++) {
        const uint8_t *wr = w + (size_t)r * row_bytes;
        float acc = 0.f;
        for (int g = 0; g < ng; g++) {
            const int b0 = g * bpg, b1 = b0 + bpg < nb ? b0 + bpg : nb;
            float vg = 0.f;
            for (int b = b0; b < b1; b++) {
                int dot = 0;
                for (int j = 0; j < 32; j++) {
                    int c;
                    if (bits == 4) {
                        const uint8_t byte = wr[(size_t)(b / 2) * 32 + j];
                        c = (b & 1) ? byte >> 4 : byte & 15;
                    } else {
                        c = (int)wr[(size_t)b * 32 + j] - 128;
                    }
                    dot += c * xq[b * 32 + j];
                }
                vg += d[b] * (float)dot;
            }
            acc += s[(size_t)r * ng + g] * vg - sz[(size_t)r * ng + g] * A[g];
        }
        out[r] = acc;
    }
#endif
}

/* segments: nseg weights w[i] of rows seg_rows[i] each (stacked: y rows in this order), one s, sz, bias for all */
EXACT static void linear_q(int bits, int nseg, const uint8_t *const *w, const int *seg_rows, const float *s, const float *sz,
                     int K, int G, const void *x, int x_bf16, const float *bias, void *y, int y_bf16) {
    const int nb = K / 32, ng = (K + G - 1) / G, bpg = G / 32;
    int8_t xq[K];
    float d[nb], dsum[nb], A[ng];
    quantize_act(x, x_bf16, K, bits == 4, xq, d, dsum);
    for (int g = 0; g < ng; g++) {
        A[g] = 0.f;
        for (int b = g * bpg; b < (g + 1) * bpg && b < nb; b++) A[g] += dsum[b];
    }
    const size_t row_bytes = bits == 4 ? (size_t)K / 2 : (size_t)K;
    int seg_step[nseg + 1], seg_row0[nseg + 1]; /* first step and first output row of each segment */
    seg_step[0] = seg_row0[0] = 0;
    for (int i = 0; i < nseg; i++) {
        seg_step[i + 1] = seg_step[i] + (seg_rows[i] + ROWS - 1) / ROWS;
        seg_row0[i + 1] = seg_row0[i] + seg_rows[i];
    }
    /* two threads even for the smallest matrices here: in a decode step every weight comes from memory, and one
     * core streams far less of it than two (a hot-cache microbenchmark says otherwise) */
#pragma omp parallel for schedule(static)
    for (int i = 0; i < seg_step[nseg]; i++) {
        int sg = 0;
        while (i >= seg_step[sg + 1]) sg++;
        const int local = (i - seg_step[sg]) * ROWS, R = seg_rows[sg] - local < ROWS ? seg_rows[sg] - local : ROWS;
        const int n0 = seg_row0[sg] + local;
        const uint8_t *wr = w[sg] + (size_t)local * row_bytes;
        const float *sr = s + (size_t)n0 * ng, *szr = sz + (size_t)n0 * ng;
        float out[ROWS];
        if (bits == 4 && R == ROWS)
            rows_q(wr, row_bytes, 4, sr, szr, ROWS, nb, ng, bpg, xq, d, A, out);
        else if (bits == 4)
            for (int r = 0; r < R; r++)
                rows_q(wr + r * row_bytes, row_bytes, 4, sr + r * ng, szr + r * ng, 1, nb, ng, bpg, xq, d, A, out + r);
        else /* 8-bit: one row at a time, faster than four (register pressure of the sign trick) */
            for (int r = 0; r < R; r++)
                rows_q(wr + r * row_bytes, row_bytes, 8, sr + r * ng, szr + r * ng, 1, nb, ng, bpg, xq, d, A, out + r);
        for (int r = 0; r < R; r++) st(y, y_bf16, (size_t)n0 + r, bias ? out[r] + bias[n0 + r] : out[r]);
    }
}

EXACT void lb_linear_q(int bits, int nseg, const uint8_t *const *w, const int *seg_rows, const float *s, const float *sz,
                 int K, int G, const void *x, int x_bf16, const float *bias, void *y, int y_bf16) {
    linear_q(bits, nseg, w, seg_rows, s, sz, K, G, x, x_bf16, bias, y, y_bf16);
}


/* ---- weight-quantized GEMM for many rows (prefill, evaluation windows) --------------------------------------
 * Y [M, N] = X [M, K] W^T: every row of X quantized per block of 32 exactly as lb_linear_q does, then tiles of
 * GM rows of X by GN rows of W whose block dots stay in registers: each block's codes are loaded and unpacked
 * once per tile and used for GM rows of X, each activation block once per tile for GN weight rows. Per (row,
 * weight row) the float combination is the matvec's, in the same order (block dots * d into a group sum, group
 * sums * s into the accumulator, lanes summed, minus the zero term), so a row of Y equals lb_linear_q's result
 * for that row of X. The weight rows are split over OpenMP threads (tiles of GN rows); a tile's codes
 * (GN * K/2 or K bytes) stay in L1 while the quantized activations (M * K bytes) stream from L2. */

#ifndef GM
#define GM 4 /* rows of X per tile */
#endif
#ifndef GN
#define GN 2 /* rows of W per tile */
#endif

static int64_t isa_id(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

int lb_isa(void) { return (int)isa_id(); }

#ifdef __AVX2__
/* a tile: RM rows of X (xq rows K bytes apart, d rows nb apart) by RN rows of W (row_bytes apart, s rows ng
 * apart); out[i * RN + j] = the lanes' sum before the zero term */
EXACT static inline __attribute__((always_inline)) void tile_q(const int bits, const int RM, const int RN, const uint8_t *w,
        size_t row_bytes, const float *s, int ng, int nb, int bpg, const int8_t *xq, size_t K, const float *d,
        float *out) {
    __m256 acc[GM][GN], v[GM][GN];
#pragma GCC unroll 4
    for (int i = 0; i < RM; i++)
#pragma GCC unroll 2
        for (int j = 0; j < RN; j++) acc[i][j] = _mm256_setzero_ps();
    for (int g = 0; g < ng; g++) {
        const int b0 = g * bpg, b1 = b0 + bpg < nb ? b0 + bpg : nb;
#pragma GCC unroll 4
        for (int i = 0; i < RM; i++)
#pragma GCC unroll 2
            for (int j = 0; j < RN; j++) v[i][j] = _mm256_setzero_ps();
        for (int b = b0; b < b1; b++) {
            __m256i c[GN], ca[GN];
#pragma GCC unroll 2
            for (int j = 0; j < RN; j++) {
                c[j] = block_codes(w + (size_t)j * row_bytes, bits, b);
                if (bits == 8) ca[j] = _mm256_sign_epi8(c[j], c[j]);
            }
#pragma GCC unroll 4
            for (int i = 0; i < RM; i++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (size_t)i * K + (size_t)b * 32));
                const __m256 db = _mm256_set1_ps(d[(size_t)i * nb + b]);
#pragma GCC unroll 2
                for (int j = 0; j < RN; j++) {
                    const __m256i p32 = bits == 4 ? dot4(c[j], xv) : dot4(ca[j], _mm256_sign_epi8(xv, c[j]));
                    v[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), db, v[i][j]);
                }
            }
        }
#pragma GCC unroll 4
        for (int i = 0; i < RM; i++)
#pragma GCC unroll 2
            for (int j = 0; j < RN; j++)
                acc[i][j] = _mm256_fmadd_ps(v[i][j], _mm256_set1_ps(s[(size_t)j * ng + g]), acc[i][j]);
    }
    if (RM * RN == 8) { /* the 8 lane sums at once (transposed), in hsum8's order: ((x0+x1)+(x2+x3))+((x4+x5)+(x6+x7)) */
        const __m256 *a = &acc[0][0];
        const __m256 a01 = _mm256_hadd_ps(a[0], a[1]), a23 = _mm256_hadd_ps(a[2], a[3]);
        const __m256 a45 = _mm256_hadd_ps(a[4], a[5]), a67 = _mm256_hadd_ps(a[6], a[7]);
        const __m256 a0123 = _mm256_hadd_ps(a01, a23), a4567 = _mm256_hadd_ps(a45, a67);
        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(a0123, a4567, 0x20),
                                            _mm256_permute2f128_ps(a0123, a4567, 0x31)));
        return;
    }
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) out[i * RN + j] = hsum8(acc[i][j]);
}
#endif

/* bits 4 or 8 as a compile-time constant: one specialized copy of the row loop each */
EXACT static inline __attribute__((always_inline)) void gemm_rows(const int bits, const uint8_t *w, size_t row_bytes,
        const float *s, const float *sz, int n0, int R, int ng, int nb, int bpg, int M, const int8_t *xq, size_t K,
        const float *d, const float *A, const float *bias, void *y, int y_bf16, int N) {
    /* weight rows n0 .. n0 + R (R <= GN) of a segment whose first row is w; output columns n0.. of y */
    for (int m0 = 0; m0 < M; m0 += GM) {
        const int RM = M - m0 < GM ? M - m0 : GM;
        float out[GM * GN];
        const int8_t *xr = xq + (size_t)m0 * K;
        const float *dr = d + (size_t)m0 * nb;
#ifdef __AVX2__
        if (RM == GM && R == GN)
            tile_q(bits, GM, GN, w, row_bytes, s, ng, nb, bpg, xr, K, dr, out);
        else if (RM == GM)
            tile_q(bits, GM, 1, w, row_bytes, s, ng, nb, bpg, xr, K, dr, out);
        else if (R == GN)
            for (int i = 0; i < RM; i++) tile_q(bits, 1, GN, w, row_bytes, s, ng, nb, bpg, xr + i * K, K, dr + i * nb, out + i * R);
        else
            for (int i = 0; i < RM; i++) tile_q(bits, 1, 1, w, row_bytes, s, ng, nb, bpg, xr + i * K, K, dr + i * nb, out + i * R);
        for (int i = 0; i < RM; i++)
            for (int j = 0; j < R; j++) {
                out[i * R + j] -= zero_term(sz + (size_t)j * ng, A + (size_t)(m0 + i) * ng, ng);
            }
#else
        for (int i = 0; i < RM; i++)
            for (int j = 0; j < R; j++)
                rows_q(w + (size_t)j * row_bytes, row_bytes, bits, s + (size_t)j * ng, sz + (size_t)j * ng, 1, nb, ng,
                       bpg, xr + i * K, dr + i * nb, A + (size_t)(m0 + i) * ng, out + i * R + j);
#endif
        for (int i = 0; i < RM; i++)
            for (int j = 0; j < R; j++) {
                const float o = out[i * R + j];
                st(y, y_bf16, (size_t)(m0 + i) * N + n0 + j, bias ? o + bias[n0 + j] : o);
            }
    }
}

/* x [M, K] (bf16 or float32), y [M, N]; weights as lb_linear_q's. Returns 0, or -1 where the scratch (M * K
 * bytes of int8 activations and M * (2 K/32 + ng) floats) cannot be allocated. */
EXACT int lb_gemm_q(int bits, int nseg, const uint8_t *const *w, const int *seg_rows, const float *s, const float *sz,
              int K, int G, int M, const void *x, int x_bf16, const float *bias, void *y, int y_bf16) {
    const int nb = K / 32, ng = (K + G - 1) / G, bpg = G / 32;
    int8_t *xq = malloc((size_t)M * K);
    float *d = malloc(sizeof(float) * (size_t)M * nb), *dsum = malloc(sizeof(float) * (size_t)M * nb);
    float *A = malloc(sizeof(float) * (size_t)M * ng);
    if (!xq || !d || !dsum || !A) {
        free(xq), free(d), free(dsum), free(A);
        return -1;
    }
    const size_t esize = x_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++) {
        quantize_act((const char *)x + (size_t)m * K * esize, x_bf16, K, bits == 4, xq + (size_t)m * K,
                     d + (size_t)m * nb, dsum + (size_t)m * nb);
        float *Am = A + (size_t)m * ng;
        const float *ds = dsum + (size_t)m * nb;
        for (int g = 0; g < ng; g++) {
            Am[g] = 0.f;
            for (int b = g * bpg; b < (g + 1) * bpg && b < nb; b++) Am[g] += ds[b];
        }
    }
    const size_t row_bytes = bits == 4 ? (size_t)K / 2 : (size_t)K;
    int N = 0;
    for (int i = 0; i < nseg; i++) N += seg_rows[i];
    int *seg_step = malloc(sizeof(int) * (nseg + 1)), *seg_row0 = malloc(sizeof(int) * (nseg + 1));
    if (!seg_step || !seg_row0) {
        free(seg_step), free(seg_row0), free(xq), free(d), free(dsum), free(A);
        return -1;
    }
    seg_step[0] = seg_row0[0] = 0;
    for (int i = 0; i < nseg; i++) {
        seg_step[i + 1] = seg_step[i] + (seg_rows[i] + GN - 1) / GN;
        seg_row0[i + 1] = seg_row0[i] + seg_rows[i];
    }
#pragma omp parallel for schedule(static)
    for (int t = 0; t < seg_step[nseg]; t++) {
        int sg = 0;
        while (t >= seg_step[sg + 1]) sg++;
        const int local = (t - seg_step[sg]) * GN, R = seg_rows[sg] - local < GN ? seg_rows[sg] - local : GN;
        const int n0 = seg_row0[sg] + local;
        const uint8_t *wr = w[sg] + (size_t)local * row_bytes;
        if (bits == 4)
            gemm_rows(4, wr, row_bytes, s + (size_t)n0 * ng, sz + (size_t)n0 * ng, n0, R, ng, nb, bpg, M, xq, K, d, A,
                      bias, y, y_bf16, N);
        else
            gemm_rows(8, wr, row_bytes, s + (size_t)n0 * ng, sz + (size_t)n0 * ng, n0, R, ng, nb, bpg, M, xq, K, d, A,
                      bias, y, y_bf16, N);
    }
    free(seg_step), free(seg_row0), free(xq), free(d), free(dsum), free(A);
    return 0;
}

/* ---- W8A8 prefill with 8-bit activations on u8 x s8 GEMMs that are exact for 7-bit ones only ----------------
 * (AVX2 without VNNI adds pairs of u8 x s8 products in saturating int16: exact while u <= 127.)
 * The activation codes q = u - zp[r] are split into c = clamp(q, -64, 63), whose 7-bit code uc = c + 64 goes
 * through the GEMM, and the rest e = q - c, nonzero only where |q| is large: a few entries per row (a row's
 * largest values), kept as CSR and added with the transposed weight codes. Every partial sum is an integer
 * below the caller's bound (255 * max_n Σ_k |Qw[n, k]| < 2^24), so the float32 sums are exact. */

int64_t lb_i8_split(const uint8_t *u, int M, int K, const int32_t *zp, uint8_t *uc, int64_t *rowptr,
                    int32_t *cols, float *vals) {
    rowptr[0] = 0;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < M; r++) { /* 7-bit codes, and how many entries each row leaves over */
        const uint8_t *ur = u + (size_t)r * K;
        uint8_t *ucr = uc + (size_t)r * K;
        const int z = zp[r];
        int64_t n = 0;
        for (int k = 0; k < K; k++) {
            const int q = (int)ur[k] - z;
            const int c = q < -64 ? -64 : (q > 63 ? 63 : q);
            ucr[k] = (uint8_t)(c + 64);
            n += q != c;
        }
        rowptr[r + 1] = n;
    }
    for (int r = 0; r < M; r++) rowptr[r + 1] += rowptr[r];
#pragma omp parallel for schedule(static)
    for (int r = 0; r < M; r++) { /* the leftovers, in column order */
        const uint8_t *ur = u + (size_t)r * K;
        const int z = zp[r];
        int64_t j = rowptr[r];
        for (int k = 0; k < K; k++) {
            const int q = (int)ur[k] - z;
            const int c = q < -64 ? -64 : (q > 63 ? 63 : q);
            if (q != c) {
                cols[j] = k;
                vals[j] = (float)(q - c);
                j++;
            }
        }
    }
    return rowptr[M];
}

/* out[r, :] += Σ_j vals[j] · wT[cols[j], :] over row r's entries; wT the int8 codes transposed, [K, N]. */
void lb_i8_sparse_add(int M, int N, const int64_t *rowptr, const int32_t *cols, const float *vals,
                      const int8_t *wT, float *out) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < M; r++) {
        float *o = out + (size_t)r * N;
        for (int64_t j = rowptr[r]; j < rowptr[r + 1]; j++) {
            const int8_t *w = wT + (size_t)cols[j] * N;
            const float v = vals[j];
            for (int n = 0; n < N; n++) o[n] += v * (float)w[n];
        }
    }
}
