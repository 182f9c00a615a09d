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
 *   lb_linear_q      y = x W^T for 4- or 8-bit codes in groups, read in place; activations int8 per block of
 *                    up to 128 columns (act_block)
 *   lb_gemm_q        Y = X W^T for M rows at once (prefill, evaluation): the same integers as lb_linear_q per row
 *   lb_isa           which instruction set this build's kernels use (0 generic, 1 AVX2, 2 AVX-512 VNNI, 3 AMX)
 *   lb_amx_init      asks Linux for the AMX tile state (0 granted, -1 not: the AMX GEMM stays off)
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

int lb_abi_version(void) { return 8; }

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

/* ---- weight-quantized matrix-vector products and GEMMs ------------------------------------------------------
 * W [N, K] is read where the model keeps it, as lowbit's packed codes u (core/packing.py): 4-bit, two per byte,
 * column 2i in the low nibble and 2i + 1 in the high one; 8-bit, one byte each. Per row n and group g of G
 * columns (the last group may be shorter), w = s[n, g] (u - z[n, g]); sz = s * z is passed instead of z.
 * Several weights that read the same x (q|k|v) are segments of one call: no copy of any weight.
 *
 * Activations: each row of x is quantized to int8 per block of AB (act_block) storage positions (a block never
 * spans two groups; the last one of a group or of the row may be shorter): xq = nearbyint(x * (1 / d)),
 * d = max|x| / 127 over the block. Inside a block, values are
 * stored in sub-blocks of 32: consecutive columns for 8-bit weights; for 4-bit weights the even and the odd
 * columns of each 64 (one 32-byte load of codes is two sub-blocks: low and high nibbles).
 * Then, with the exact integers I[n, a] = sum_{k in block a} c[n, k] xq[k] (c = u for 4-bit, u - 128 for 8-bit;
 * |I| < 2^24) and S[a] = sum_{k in a} xq[k], every output is, in exactly this order (fma: one rounding):
 *     acc = 0; for g: { t = 0; for a in g: t = fma(I[n, a], d[a], t); acc = fma(t, s[n, g], acc) }
 *     A_g = fma chain of S[a] d[a] over a in g;  corr = 0; for g: corr = fma(sz'[n, g], A_g, corr)
 *     y = acc - corr (+ bias)          sz' = s (z - 128) for 8-bit
 * The plain-C build, the AMX GEMM and every GEMM with AB > 32 compute these integers and then these float
 * operations, output by output, so they give the same bits. The SIMD builds' matvec and their GEMM at AB = 32 use
 * the same integers in a lane order of their own (below): bit for bit equal to each other (AVX2 and VNNI alike),
 * and to the order above within float32 rounding.
 * 4-bit needs K % 64 == 0 and G % 64 == 0, 8-bit K % 32 == 0 and G % 32 == 0. Rows are split over OpenMP threads. */

/* AB, the activation block, is the caller's choice (kernels/native.py act_block: 32, llama.cpp's Q8_0): 32, 64 or 128
 * dividing G (plain C for 64 and 128 below the AMX threshold: a measurement setting, not a fast path). One scale per 64 or 128
 * columns runs the AMX GEMM faster but moved SmolLM2's perplexity with int8 activations several times more than
 * one per 32 (docs/results.md §13). */

#ifdef __AVX2__
/* 8 floats of x from column k (float32 or bf16) */
static inline __attribute__((always_inline)) __m256 ld8(const void *x, int bf16, size_t k) {
    if (bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + k))), 16));
    return _mm256_loadu_ps((const float *)x + k);
}

/* 32 int32 (4 vectors, in order) -> 32 int8 in order (the values fit: |q| <= 127) */
static inline __attribute__((always_inline)) __m256i pack32(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
    return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
#endif

#ifdef __AVX2__
/* the 32 values of storage positions p .. p + 31 (p % 32 == 0) in storage order, as 4 vectors of 8 */
static inline __attribute__((always_inline)) void load32(const void *x, int bf16, int interleave, int p, __m256 *v) {
    if (!interleave) {
        for (int h = 0; h < 4; h++) v[h] = ld8(x, bf16, (size_t)p + 8 * h);
        return;
    }
    const size_t c = (size_t)(p / 64) * 64; /* the even (p % 64 == 0) or odd columns of the 64 from c */
    const int odd = (p / 32) & 1;
    for (int h = 0; h < 4; h++) {
        const __m256 u = ld8(x, bf16, c + 16 * h), w = ld8(x, bf16, c + 16 * h + 8);
        const __m256 sel = odd ? _mm256_shuffle_ps(u, w, 0xdd) : _mm256_shuffle_ps(u, w, 0x88);
        v[h] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(sel), 0xd8));
    }
}
#endif

/* 1 / d, or 0 where d is 0 or so small that 1 / d overflows (a block of near-zero values quantizes to zeros) */
__attribute__((optimize("no-fast-math"))) static inline float act_inverse(float d) {
    const float id = d > 0.f ? 1.f / d : 0.f;
    return id <= FLT_MAX ? id : 0.f;
}

/* exact IEEE division and rounding here (no fast-math), so that the reference in torch gets the same codes; the
 * AVX2 loop computes the same products and roundings (round to nearest even, as nearbyintf) 8 values at a time.
 * Block a holds storage positions a*AB .. (the columns of those positions: with interleave and AB = 32, the even or
 * the odd columns of a 64). */
__attribute__((optimize("no-fast-math"))) static void quantize_act(const void *x, int x_bf16, int K, int AB,
                                                                   int interleave, int8_t *xq, float *d, int32_t *S) {
    const int nab = (K + AB - 1) / AB;
    for (int a = 0; a < nab; a++) {
        const int k0 = a * AB, len = K - k0 < AB ? K - k0 : AB;
        float amax = 0.f;
        int sum = 0;
#ifdef __AVX2__
        __m256 m8 = _mm256_setzero_ps(), v[4];
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        for (int p = k0; p < k0 + len; p += 32) {
            load32(x, x_bf16, interleave, p, v);
            for (int h = 0; h < 4; h++) m8 = _mm256_max_ps(_mm256_and_ps(v[h], absmask), m8); /* NaN ignored, as below */
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, m8);
        for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
        const float db = amax / 127.f, id = act_inverse(db);
        const __m256 iv = _mm256_set1_ps(id), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
        __m256i sum8 = _mm256_setzero_si256();
        for (int p = k0; p < k0 + len; p += 32) {
            load32(x, x_bf16, interleave, p, v);
            __m256i q[4];
            for (int h = 0; h < 4; h++) {
                const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[h], iv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q[h] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi)); /* NaN -> -127, as below */
                sum8 = _mm256_add_epi32(sum8, q[h]);
            }
            _mm256_storeu_si256((__m256i *)(xq + p), pack32(q[0], q[1], q[2], q[3]));
        }
        int32_t sl[8];
        _mm256_storeu_si256((__m256i *)sl, sum8);
        for (int i = 0; i < 8; i++) sum += sl[i];
#else
        /* storage position p holds column col(p): with interleave, sub-block 2c = the even columns of the 64
         * starting at 64c, sub-block 2c + 1 = the odd ones */
#define LB_COL(p) (interleave ? (size_t)((p) / 64) * 64 + 2 * ((p) % 32) + (((p) / 32) & 1) : (size_t)(p))
        for (int p = k0; p < k0 + len; p++) {
            const float v = fabsf(ld(x, x_bf16, LB_COL(p)));
            amax = v > amax ? v : amax;
        }
        const float db = amax / 127.f, id = act_inverse(db);
        for (int p = k0; p < k0 + len; p++) {
            float r = nearbyintf(ld(x, x_bf16, LB_COL(p)) * id);
            r = r > -127.f ? r : -127.f; /* NaN -> -127 (a non-finite x only) */
            r = r < 127.f ? r : 127.f;
            const int q = (int)r;
            xq[p] = (int8_t)q;
            sum += q;
        }
#undef LB_COL
#endif
        d[a] = db;
        S[a] = sum;
    }
}

/* A_g of one row: the fma chain of S[a] d[a] over each group's blocks */
EXACT static void group_sums(const int32_t *S, const float *d, int nab, int ng, int bpg, float *A) {
    for (int g = 0; g < ng; g++) {
        const int a1 = (g + 1) * bpg < nab ? (g + 1) * bpg : nab;
        float t = 0.f;
        for (int a = g * bpg; a < a1; a++) t = fmaf((float)S[a], d[a], t);
        A[g] = t;
    }
}

/* one output from its integers (the definition above, scalar) */
EXACT static inline float combine(const int32_t *I, const float *d, const float *s, const float *sz, const float *A,
                                  int nab, int ng, int bpg) {
    float acc = 0.f, corr = 0.f;
    for (int g = 0; g < ng; g++) {
        const int a1 = (g + 1) * bpg < nab ? (g + 1) * bpg : nab;
        float t = 0.f;
        for (int a = g * bpg; a < a1; a++) t = fmaf((float)I[a], d[a], t);
        acc = fmaf(t, s[g], acc);
    }
    for (int g = 0; g < ng; g++) corr = fmaf(sz[g], A[g], corr);
    return acc - corr;
}

/* I[n, a] of one weight row and one row of xq, plainly */
/* not vectorized by the compiler: gcc 12 with AVX-512 VNNI turned the 8-bit loop ((u - 128) * x) into a wrong
 * vpdpbusd sum (tests/kernels/test_dispatch.py caught it) */
__attribute__((optimize("no-tree-vectorize"))) static int32_t block_dot_plain(const uint8_t *wr, int bits,
                                                                             const int8_t *xq, int p0, int p1) {
    int32_t dot = 0;
    for (int p = p0; p < p1; p++) {
        const int b = p / 32, j = p % 32;
        int c;
        if (bits == 4) {
            const uint8_t byte = wr[(size_t)(b / 2) * 32 + j];
            c = (b & 1) ? byte >> 4 : byte & 15;
        } else {
            c = (int)wr[p] - 128;
        }
        dot += c * xq[p];
    }
    return dot;
}

#ifdef __AVX2__
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI 1
#else
#define VNNI 0
#endif

#endif

/* where weight row n (0 <= n < N) of the segments lies */
static inline const uint8_t *row_ptr(const uint8_t *const *w, const int *seg_rows, int nseg, size_t row_bytes, int n) {
    int sg = 0;
    while (sg < nseg - 1 && n >= seg_rows[sg]) n -= seg_rows[sg++];
    return w[sg] + (size_t)n * row_bytes;
}

/* the pairs of x rows m0 .. m0 + RM and weight rows n0 .. n0 + RN (clipped at M and N) into y, by the definition:
 * the plain-C build's matvec and GEMM, and every build's for activation blocks of 64 or 128 (not the default) */
EXACT static void pairs_q(const int bits, const int RM, const int RN, const uint8_t *const *w, const int *seg_rows,
        int nseg, size_t row_bytes, const float *s, const float *sz, int m0, int M, int n0, int N, const int8_t *xq,
        const float *d, const float *A, int K, int AB, int nab, int ng, int bpg, const float *bias, void *y, int y_bf16) {
    const int rm = M - m0 < RM ? M - m0 : RM, rn = N - n0 < RN ? N - n0 : RN;
    float out[8];
    int32_t I[nab];
    for (int i = 0; i < rm; i++)
        for (int j = 0; j < rn; j++) {
            const uint8_t *wr = row_ptr(w, seg_rows, nseg, row_bytes, n0 + j);
            const int8_t *xr = xq + (size_t)(m0 + i) * K;
            for (int a = 0; a < nab; a++) {
                const int p0 = a * AB, p1 = K - p0 < AB ? K : p0 + AB;
                I[a] = block_dot_plain(wr, bits, xr, p0, p1);
            }
            out[i * RN + j] = combine(I, d + (size_t)(m0 + i) * nab, s + (size_t)(n0 + j) * ng,
                                      sz + (size_t)(n0 + j) * ng, A + (size_t)(m0 + i) * ng, nab, ng, bpg);
        }
    for (int i = 0; i < rm; i++)
        for (int j = 0; j < rn; j++) {
            const int n = n0 + j;
            const float o = out[i * RN + j];
            st(y, y_bf16, (size_t)(m0 + i) * N + n, bias ? o + bias[n] : o);
        }
}

/* quantized activations of M rows: xq [M, K], d [M, nab], A [M, ng]; NULL where they cannot be allocated */
typedef struct { int8_t *xq; float *d, *A; int32_t *S; } qact;

static void free_act(qact *q) { free(q->xq), free(q->d), free(q->A), free(q->S); }

static int quantize_rows(const void *x, int x_bf16, int M, int K, int AB, int G, int interleave, qact *q) {
    const int nab = (K + AB - 1) / AB, ng = (K + G - 1) / G, bpg = G / AB;
    q->xq = calloc((size_t)(M + 32) * K + 64, 1); /* zero rows past M: the AMX tiles read whole blocks of 32 rows */
    q->d = malloc(sizeof(float) * (size_t)M * nab);
    q->A = malloc(sizeof(float) * (size_t)M * ng);
    q->S = malloc(sizeof(int32_t) * (size_t)M * nab);
    if (!q->xq || !q->d || !q->A || !q->S) {
        free_act(q);
        return -1;
    }
    const size_t esize = x_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (M > 1)
    for (int m = 0; m < M; m++) {
        quantize_act((const char *)x + (size_t)m * K * esize, x_bf16, K, AB, interleave, q->xq + (size_t)m * K,
                     q->d + (size_t)m * nab, q->S + (size_t)m * nab);
        group_sums(q->S + (size_t)m * nab, q->d + (size_t)m * nab, nab, ng, bpg, q->A + (size_t)m * ng);
    }
    return 0;
}

static int total_rows(int nseg, const int *seg_rows) {
    int N = 0;
    for (int i = 0; i < nseg; i++) N += seg_rows[i];
    return N;
}

#ifdef __AVX2__
/* ---- the decode matvec's own float order (one x row, activation blocks of 32) ----------------------------------
 * A decode step reads every weight from memory once; the exact per-block integers of the definition above need a
 * horizontal sum per block and row, which made decode measurably slower than this order (docs §13), so here (AVX2/VNNI/AMX
 * builds, AB = 32) each block's 8 int32 lanes are converted and scaled by d lane by lane, the group sums scaled by
 * s, the lanes summed at the end: the same integers, another (fixed) float order, equal to the GEMM within float32
 * rounding (tested), and equal across the AVX2, VNNI and AMX builds bit for bit. */

/* the sum of the 8 lanes, in one fixed order (hadd builtins, not reassociated) */
EXACT static inline float hsum8(__m256 v) {
    __m128 t = _mm_hadd_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t = _mm_hadd_ps(t, t);
    t = _mm_hadd_ps(t, t);
    return _mm_cvtss_f32(t);
}

/* the 32 codes of sub-block b of a row, as bytes (4-bit: 0..15; 8-bit: u - 128 as int8) */
EXACT static inline __attribute__((always_inline)) __m256i block_codes(const uint8_t *wr, int bits, int b) {
    if (bits == 4) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(wr + (size_t)(b / 2) * 32));
        return _mm256_and_si256((b & 1) ? _mm256_srli_epi16(raw, 4) : raw, _mm256_set1_epi8(0x0f));
    }
    return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wr + (size_t)b * 32)), _mm256_set1_epi8((char)0x80));
}

/* int32 lanes of dot(c, xv) as floats: 4-bit codes unsigned; 8-bit signed through |c| x sign(x, c) */
EXACT static inline __attribute__((always_inline)) __m256 block_dot(__m256i c, __m256i xv, int bits) {
    const __m256i a = bits == 4 ? c : _mm256_sign_epi8(c, c), b = bits == 4 ? xv : _mm256_sign_epi8(xv, c);
#if VNNI
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b));
#else
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}

#define ROWS 4 /* rows per step: the activation blocks are loaded once for all of them */

/* out[r] for rows w .. w + R (R = ROWS or 1, row_bytes apart; s, sz rows ng apart) */
EXACT static inline __attribute__((always_inline)) void rows_lanes(const uint8_t *w, size_t row_bytes, const int bits,
        const float *s, const float *sz, const int R, int nb, int ng, int bpg, const int8_t *xq, const float *d,
        const float *A, float *out) {
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
    for (int r = 0; r < R; r++) {
        float corr = 0.f;
        for (int g = 0; g < ng; g++) corr = fmaf(sz[(size_t)r * ng + g], A[g], corr);
        out[r] = hsum8(accs[r]) - corr;
    }
}

EXACT static void linear_lanes(int bits, int nseg, const uint8_t *const *w, const int *seg_rows, const float *s,
                               const float *sz, int K, int G, const int8_t *xq, const float *d, const float *A,
                               const float *bias, void *y, int y_bf16) {
    const int nb = K / 32, ng = (K + G - 1) / G, bpg = G / 32;
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
            rows_lanes(wr, row_bytes, 4, sr, szr, ROWS, nb, ng, bpg, xq, d, A, out);
        else if (bits == 4)
            for (int r = 0; r < R; r++)
                rows_lanes(wr + r * row_bytes, row_bytes, 4, sr + r * ng, szr + r * ng, 1, nb, ng, bpg, xq, d, A, out + r);
        else /* 8-bit: one row at a time, faster than four (register pressure of the sign trick) */
            for (int r = 0; r < R; r++)
                rows_lanes(wr + r * row_bytes, row_bytes, 8, sr + r * ng, szr + r * ng, 1, nb, ng, bpg, xq, d, A, out + r);
        for (int r = 0; r < R; r++) st(y, y_bf16, (size_t)n0 + r, bias ? out[r] + bias[n0 + r] : out[r]);
    }
}

/* int32 lanes of |c| . sign(x, c) (8-bit codes, ca = |c|) as floats: the same integers as block_dot's */
EXACT static inline __attribute__((always_inline)) __m256 block_dot_signed(__m256i ca, __m256i c, __m256i xv) {
    const __m256i b = _mm256_sign_epi8(xv, c);
#if VNNI
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ca, b));
#else
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(ca, b), _mm256_set1_epi16(1)));
#endif
}

#define GM 4 /* rows of X per GEMM tile */
#define GN 2 /* rows of W per GEMM tile */

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
                    v[i][j] = _mm256_fmadd_ps(bits == 4 ? block_dot(c[j], xv, 4) : block_dot_signed(ca[j], c[j], xv), db,
                                              v[i][j]);
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

/* bits 4 or 8 as a compile-time constant: one specialized copy of the row loop each */
EXACT static inline __attribute__((always_inline)) void gemm_rows_lanes(const int bits, const uint8_t *w, size_t row_bytes,
        const float *s, const float *sz, int n0, int R, int ng, int nb, int bpg, int M, const int8_t *xq, size_t K,
        const float *d, const float *A, const float *bias, void *y, int y_bf16, int N) {
    /* weight rows n0 .. n0 + R (R <= GN) of a segment whose first row is w; output columns n0.. of y */
    for (int m0 = 0; m0 < M; m0 += GM) {
        const int RM = M - m0 < GM ? M - m0 : GM;
        float out[GM * GN];
        const int8_t *xr = xq + (size_t)m0 * K;
        const float *dr = d + (size_t)m0 * nb;
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
                float corr = 0.f;
                for (int g = 0; g < ng; g++) corr = fmaf(sz[(size_t)j * ng + g], A[(size_t)(m0 + i) * ng + g], corr);
                out[i * R + j] -= corr;
            }

        for (int i = 0; i < RM; i++)
            for (int j = 0; j < R; j++) {
                const float o = out[i * R + j];
                st(y, y_bf16, (size_t)(m0 + i) * N + n0 + j, bias ? o + bias[n0 + j] : o);
            }
    }
}


/* the GEMM in the matvec's lane order (AVX2/VNNI builds, AB = 32): each row of Y equals lb_linear_q's bit for bit */
EXACT static void gemm_lanes(int bits, int nseg, const uint8_t *const *w, const int *seg_rows, const float *s,
                             const float *sz, int K, int G, int M, const qact *q, const float *bias, void *y, int y_bf16) {
    const int nb = K / 32, ng = (K + G - 1) / G, bpg = G / 32;
    const size_t row_bytes = bits == 4 ? (size_t)K / 2 : (size_t)K;
    const int N = total_rows(nseg, seg_rows);
    int seg_step[nseg + 1], seg_row0[nseg + 1];
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
            gemm_rows_lanes(4, wr, row_bytes, s + (size_t)n0 * ng, sz + (size_t)n0 * ng, n0, R, ng, nb, bpg, M, q->xq,
                            K, q->d, q->A, bias, y, y_bf16, N);
        else
            gemm_rows_lanes(8, wr, row_bytes, s + (size_t)n0 * ng, sz + (size_t)n0 * ng, n0, R, ng, nb, bpg, M, q->xq,
                            K, q->d, q->A, bias, y, y_bf16, N);
    }
}
#endif

/* x [K] -> y [N]: the lane order above where it applies (AVX2 builds, AB = 32), else eight weight rows per step by
 * the definition (one x row, one code load per row and block) */
EXACT void lb_linear_q(int bits, int nseg, const uint8_t *const *w, const int *seg_rows, const float *s, const float *sz,
                 int K, int G, int AB, const void *x, int x_bf16, const float *bias, void *y, int y_bf16) {
    const int nab = (K + AB - 1) / AB, ng = (K + G - 1) / G, bpg = G / AB;
    int8_t xq[K];
    float d[nab], A[ng];
    int32_t S[nab];
    quantize_act(x, x_bf16, K, AB, bits == 4, xq, d, S);
    group_sums(S, d, nab, ng, bpg, A);
#ifdef __AVX2__
    if (AB == 32) {
        linear_lanes(bits, nseg, w, seg_rows, s, sz, K, G, xq, d, A, bias, y, y_bf16);
        return;
    }
#endif
    const size_t row_bytes = bits == 4 ? (size_t)K / 2 : (size_t)K;
    const int N = total_rows(nseg, seg_rows);
#pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < N; n0 += 8)
        pairs_q(bits, 1, 8, w, seg_rows, nseg, row_bytes, s, sz, 0, 1, n0, N, xq, d, A, K, AB, nab, ng, bpg, bias,
                y, y_bf16);
}

/* ---- GEMM on AMX tiles (the "avx512-amx" build; lb_amx_init must have been granted the tile state) ----------
 * C tiles [16 rows of x, 16 weight rows] of int32 = I[m, n, a] after the 64-column chunks of block a: A tiles are
 * the quantized rows of x as they lie (16 rows x cw = 32 or 64 columns, signed), B tiles a panel's codes packed per
 * call as cw / 4 rows of 4 consecutive columns per weight row (unsigned 4-bit codes: vpdpbsud; signed 8-bit:
 * vpdpbssd), zero past K. Then the float operations of the definition above, vectorized over 16 weight rows (the
 * scales transposed once per call). */
#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
static int amx_granted = 0;

int lb_amx_init(void) {
    /* ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18): Linux hands out the tile state on request only */
    if (!amx_granted && syscall(SYS_arch_prctl, 0x1023, 18) == 0) amx_granted = 1;
    return amx_granted ? 0 : -1;
}

typedef struct {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* tiles 0-3: C [16 x 16 int32]; 4-5: A, 16 rows of x by cw (64 or 32) columns; 6-7: B, cw / 4 rows of 16 x 4 codes */
static void amx_configure(int cw) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.rows[i] = i >= 6 ? cw / 4 : 16;
        c.colsb[i] = i == 4 || i == 5 ? cw : 64;
    }
    _tile_loadconfig(&c);
}

#define PANEL 32 /* weight rows per panel: two B tiles */

/* the codes of weight rows n0 .. n0 + 32 (zero rows past N) as B tiles: tile (h, c) at P + (c * 2 + h) * 1024,
 * row kq = for each of its 16 weight rows the 4 codes of columns 64c + 4kq .. + 3 (in the activations' order) */
static void pack_panel(int bits, const uint8_t *const *w, const int *seg_rows, int nseg, size_t row_bytes, int K,
                       int nch, int n0, int N, uint8_t *P, uint8_t *row) {
    memset(P, 0, (size_t)nch * 2048);
    for (int r = 0; r < PANEL && n0 + r < N; r++) {
        const uint8_t *src = row_ptr(w, seg_rows, nseg, row_bytes, n0 + r);
        memset(row, 0, (size_t)nch * 64);
        if (bits == 4) {
            for (int c = 0; c < K / 64; c++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(src + (size_t)c * 32));
                _mm256_storeu_si256((__m256i *)(row + (size_t)c * 64), _mm256_and_si256(raw, _mm256_set1_epi8(0x0f)));
                _mm256_storeu_si256((__m256i *)(row + (size_t)c * 64 + 32),
                                    _mm256_and_si256(_mm256_srli_epi16(raw, 4), _mm256_set1_epi8(0x0f)));
            }
        } else {
            for (int k = 0; k < K; k += 32)
                _mm256_storeu_si256((__m256i *)(row + k), _mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(src + k)), _mm256_set1_epi8((char)0x80))); /* u - 128 */
        }
        const int h = r / 16, rr = r % 16;
        for (int c = 0; c < nch; c++) {
            uint32_t *t = (uint32_t *)(P + ((size_t)c * 2 + h) * 1024);
            const uint32_t *q = (const uint32_t *)(row + (size_t)c * 64);
            for (int kq = 0; kq < 16; kq++) t[kq * 16 + rr] = q[kq];
        }
    }
}

EXACT static int gemm_amx(int bits, int nseg, const uint8_t *const *w, const int *seg_rows, const float *s,
                          const float *sz, int K, int G, int AB, int M, const qact *q, const float *bias, void *y,
                          int y_bf16) {
    const int nab = (K + AB - 1) / AB, ng = (K + G - 1) / G, bpg = G / AB;
    const int nch = (K + 63) / 64;
    const int N = total_rows(nseg, seg_rows), Np = (N + PANEL - 1) / PANEL * PANEL;
    const size_t row_bytes = bits == 4 ? (size_t)K / 2 : (size_t)K;
    /* s, sz' and the bias transposed: [ng][Np], zero past N */
    float *sT = aligned_alloc(64, sizeof(float) * (size_t)ng * Np), *szT = aligned_alloc(64, sizeof(float) * (size_t)ng * Np);
    float *bT = aligned_alloc(64, sizeof(float) * (size_t)Np);
    if (!sT || !szT || !bT) {
        free(sT), free(szT), free(bT);
        return -1;
    }
    for (int n = 0; n < Np; n++) {
        for (int g = 0; g < ng; g++) {
            sT[(size_t)g * Np + n] = n < N ? s[(size_t)n * ng + g] : 0.f;
            szT[(size_t)g * Np + n] = n < N ? sz[(size_t)n * ng + g] : 0.f;
        }
        bT[n] = n < N && bias ? bias[n] : 0.f;
    }
    const int npanel = Np / PANEL, nmb = (M + 31) / 32;
    const int cw = AB >= 64 ? 64 : 32; /* columns per tile op: a block is whole tile ops */
    int failed = 0;
#pragma omp parallel
    {
        uint8_t *P = aligned_alloc(64, (size_t)nch * 2048), *row = aligned_alloc(64, (size_t)nch * 64);
        int32_t *C = aligned_alloc(64, sizeof(int32_t) * 4 * 256);
        float *T = aligned_alloc(64, sizeof(float) * 32 * PANEL), *Acc = aligned_alloc(64, sizeof(float) * 32 * PANEL);
        const int ok = P && row && C && T && Acc;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        } else {
            amx_configure(cw);
        }
#pragma omp for schedule(static)
        for (int pn = 0; pn < npanel; pn++) {
            if (!ok) continue;
            const int n0 = pn * PANEL;
            pack_panel(bits, w, seg_rows, nseg, row_bytes, K, nch, n0, N, P, row);
            for (int mb = 0; mb < nmb; mb++) {
                const int m0 = mb * 32, mv = M - m0 < 32 ? M - m0 : 32; /* rows of x in this block */
                memset(Acc, 0, sizeof(float) * 32 * PANEL);
                for (int g = 0; g < ng; g++) {
                    const int a1 = (g + 1) * bpg < nab ? (g + 1) * bpg : nab;
                    memset(T, 0, sizeof(float) * 32 * PANEL);
                    for (int a = g * bpg; a < a1; a++) {
                        const int p0 = a * AB, p1 = K - p0 < AB ? K : p0 + AB;
                        _tile_zero(0);
                        _tile_zero(1);
                        _tile_zero(2);
                        _tile_zero(3);
                        for (int k = p0; k < p1; k += cw) {
                            /* x rows m0 .. m0 + 15 and m0 + 16 .. (the scratch has 32 rows past M, zero); the
                             * panel's B tiles of columns k .. k + cw: rows (k % 64) / 4 .. of chunk k / 64 */
                            const uint8_t *pb = P + (size_t)(k / 64) * 2048 + (size_t)(k % 64) * 16;
                            _tile_loadd(4, q->xq + (size_t)m0 * K + k, K);
                            _tile_loadd(5, q->xq + (size_t)(m0 + 16) * K + k, K);
                            _tile_loadd(6, pb, 64);
                            _tile_loadd(7, pb + 1024, 64);
                            if (bits == 4) {
                                _tile_dpbsud(0, 4, 6);
                                _tile_dpbsud(1, 4, 7);
                                _tile_dpbsud(2, 5, 6);
                                _tile_dpbsud(3, 5, 7);
                            } else {
                                _tile_dpbssd(0, 4, 6);
                                _tile_dpbssd(1, 4, 7);
                                _tile_dpbssd(2, 5, 6);
                                _tile_dpbssd(3, 5, 7);
                            }
                        }
                        _tile_stored(0, C, 64);       /* x rows m0 .., weight rows n0 .. n0 + 15 */
                        _tile_stored(1, C + 256, 64); /* x rows m0 .., weight rows n0 + 16 .. */
                        _tile_stored(2, C + 512, 64); /* x rows m0 + 16 .., weight rows n0 .. */
                        _tile_stored(3, C + 768, 64);
                        for (int i = 0; i < mv; i++) {
                            const __m512 dv = _mm512_set1_ps(q->d[(size_t)(m0 + i) * nab + a]);
                            for (int h = 0; h < 2; h++) {
                                const int32_t *ci = C + ((i / 16) * 2 + h) * 256 + (i % 16) * 16;
                                float *tr = T + i * PANEL + h * 16;
                                _mm512_storeu_ps(tr, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(ci)), dv,
                                                                     _mm512_loadu_ps(tr)));
                            }
                        }
                    }
                    for (int i = 0; i < mv; i++)
                        for (int h = 0; h < 2; h++) {
                            float *ar = Acc + i * PANEL + h * 16;
                            _mm512_storeu_ps(ar, _mm512_fmadd_ps(_mm512_loadu_ps(T + i * PANEL + h * 16),
                                                                 _mm512_loadu_ps(sT + (size_t)g * Np + n0 + h * 16),
                                                                 _mm512_loadu_ps(ar)));
                        }
                }
                for (int i = 0; i < mv; i++) {
                    const int m = m0 + i;
                    for (int h = 0; h < 2; h++) {
                        __m512 corr = _mm512_setzero_ps();
                        for (int g = 0; g < ng; g++)
                            corr = _mm512_fmadd_ps(_mm512_loadu_ps(szT + (size_t)g * Np + n0 + h * 16),
                                                   _mm512_set1_ps(q->A[(size_t)m * ng + g]), corr);
                        __m512 o = _mm512_sub_ps(_mm512_loadu_ps(Acc + i * PANEL + h * 16), corr);
                        if (bias) o = _mm512_add_ps(o, _mm512_loadu_ps(bT + n0 + h * 16));
                        const int nb0 = n0 + h * 16, nv = N - nb0 < 16 ? N - nb0 : 16;
                        if (nv <= 0) continue;
                        if (!y_bf16 && nv == 16) {
                            _mm512_storeu_ps((float *)y + (size_t)m * N + nb0, o);
                        } else {
                            float ob[16];
                            _mm512_storeu_ps(ob, o);
                            for (int j = 0; j < nv; j++) st(y, y_bf16, (size_t)m * N + nb0 + j, ob[j]);
                        }
                    }
                }
            }
        }
        if (ok) _tile_release();
        free(P), free(row), free(C), free(T), free(Acc);
    }
    free(sT), free(szT), free(bT);
    return failed ? -1 : 0;
}
#else
int lb_amx_init(void) { return -1; }
#endif

/* ---- weight-quantized GEMM for many rows (prefill, evaluation windows) --------------------------------------
 * Y [M, N] = X [M, K] W^T: every row of X quantized as lb_linear_q does, then tiles of 4 rows of X by 2 rows of W
 * (their 8 block dots in registers, each code chunk unpacked once for 4 rows of X), or the AMX tiles above; every
 * output by the definition above; or, in the SIMD builds at AB = 32 below the AMX threshold, the matvec's lane
 * order (gemm_lanes), whose rows equal lb_linear_q's bit for bit. */

static int64_t isa_id(void) {
#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512VNNI__)
    return 3;
#elif defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

int lb_isa(void) { return (int)isa_id(); }

/* x [M, K] (bf16 or float32), y [M, N]; weights as lb_linear_q's. Returns 0, or -1 where the scratch (M * K
 * bytes of int8 activations and their scales; the AMX build also the packed tiles) cannot be allocated. */
EXACT int lb_gemm_q(int bits, int nseg, const uint8_t *const *w, const int *seg_rows, const float *s, const float *sz,
              int K, int G, int AB, int M, const void *x, int x_bf16, const float *bias, void *y, int y_bf16) {
    const int nab = (K + AB - 1) / AB, ng = (K + G - 1) / G, bpg = G / AB;
    qact q;
    if (quantize_rows(x, x_bf16, M, K, AB, G, bits == 4, &q)) return -1;
    int rc = 0;
#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
    if (amx_granted && M >= 16) {
        rc = gemm_amx(bits, nseg, w, seg_rows, s, sz, K, G, AB, M, &q, bias, y, y_bf16);
        free_act(&q);
        return rc;
    }
#endif
#ifdef __AVX2__
    if (AB == 32) { /* the matvec's lane order: rows equal to lb_linear_q's */
        gemm_lanes(bits, nseg, w, seg_rows, s, sz, K, G, M, &q, bias, y, y_bf16);
        free_act(&q);
        return rc;
    }
#endif
    const size_t row_bytes = bits == 4 ? (size_t)K / 2 : (size_t)K;
    const int N = total_rows(nseg, seg_rows), nt = (N + 1) / 2;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < nt; t++)
        for (int m0 = 0; m0 < M; m0 += 4)
            pairs_q(bits, 4, 2, w, seg_rows, nseg, row_bytes, s, sz, m0, M, 2 * t, N, q.xq, q.d, q.A, K, AB, nab, ng,
                    bpg, bias, y, y_bf16);
    free_act(&q);
    return rc;
}

/* ---- GPTQ's column sweep inside one lazy block (core/gptq.gptq_rows) ----------------------------------------
 * W1 [b, rows]: the block's columns (transposed: one contiguous row per weight column), updated in place; H1 the
 * block's part of the inverse Hessian's upper factor (element i, j at H1 + i * hs0 + j * hs1);
 * columns c0 .. c1 - 1 are quantized in turn with their group's per-row scale sT + grp[i] * rows (and zero zT + ...,
 * NULL when symmetric), codes to Q + i * rows (int8 or uint8), scaled errors (w - dq) / d to E + i * rows, and every
 * later column of the block updated: W1[j] = W1[j] - H1[i, j] * e (two roundings). The same operations in the same
 * order as the torch loop it replaces (true division, round half to even, clamp, then the outer product and the
 * difference), so the codes are the same bits. Rows never interact: split over threads. */
EXACT void lb_gptq_cols(float *W1, int b, int rows, const float *H1, int hs0, int hs1, int c0, int c1, const int32_t *grp,
                        const float *sT, const float *zT, float qmin, float qmax, void *Q, int q_signed, float *E) {
    const int chunk = 256; /* rows per task: the block's columns of them stay in cache */
    const int ntask = (rows + chunk - 1) / chunk;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < ntask; t++) {
        const int r0 = t * chunk, r1 = rows - r0 < chunk ? rows : r0 + chunk;
        for (int i = c0; i < c1; i++) {
            float *w = W1 + (size_t)i * rows, *e = E + (size_t)i * rows;
            const float *sc = sT + (size_t)grp[i] * rows, *z = zT ? zT + (size_t)grp[i] * rows : NULL;
            const float d = H1[(size_t)i * hs0 + (size_t)i * hs1];
            for (int r = r0; r < r1; r++) {
                float q = nearbyintf(w[r] / sc[r]);
                if (z) q = q + z[r];
                q = q < qmin ? qmin : q; /* clamp_(qmin, qmax) */
                q = q > qmax ? qmax : q;
                const float dq = z ? (q - z[r]) * sc[r] : q * sc[r];
                if (q_signed)
                    ((int8_t *)Q)[(size_t)i * rows + r] = (int8_t)q;
                else
                    ((uint8_t *)Q)[(size_t)i * rows + r] = (uint8_t)q;
                e[r] = (w[r] - dq) / d;
            }
            for (int j = i + 1; j < b; j++) {
                const float h = H1[(size_t)i * hs0 + (size_t)j * hs1];
                float *wj = W1 + (size_t)j * rows;
                for (int r = r0; r < r1; r++) wj[r] = wj[r] - h * e[r];
            }
        }
    }
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
