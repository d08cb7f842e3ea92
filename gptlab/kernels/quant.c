/* Few-row linear with weight-only quantized weights, for CPU decode: Y (M, N) = X (M, K) @ dequant(W)^T + b,
 * OpenMP; AVX2 or AVX-512 (simd.h: the build for this CPU's instruction set). Decode reads every weight once per
 * token, so bytes per weight set its speed:
 *
 *   int8   W (N, K) int8, one fp32 scale per output row:      w[n, k] = scale[n] * q[n, k]
 *   int4   W (N, K / 2) bytes, fp32 scales (N, K / G):          w[n, k] = scale[n, k / G] * (nibble - 8)
 *          in each group of G = 32 weights, byte j holds weight j in its low nibble and weight j + 16 in its
 *          high nibble, so the low nibbles of 16 bytes are weights 0..15 in order and the high ones 16..31.
 *
 * Integers are widened to fp32 in registers (8 at a time) and multiplied into fp32 sums; the row scale
 * (int8) or group scale (int4) is applied once per row or group. Four weight rows are streamed at a time.
 * Each output is summed in a fixed order by one thread, so results do not depend on the thread count.
 * Built and loaded by __init__.py, like gemv.c.
 */
#include <stdlib.h>

#include "simd.h"

/* LANES int8 weights from w + i widened to fp32, the first n of them */
static inline vec widen_q8(const int8_t *w, int64_t i, int64_t n) {
#if defined(__AVX512F__)
    __m128i b = n >= 16 ? _mm_loadu_si128((const __m128i *)(w + i)) : _mm_maskz_loadu_epi8(mask16(n), w + i);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
#else
    (void)n;
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + i))));
#endif
}

/* ---- int8, per-row scales ---- */
static inline void q8_rows(const int8_t *W, const float *scale, const float *b, const float *x, float *y, int64_t r,
                           int64_t n_rows, int64_t K) {
    vec a[4] = {vzero(), vzero(), vzero(), vzero()};
    const int8_t *w[4];
    for (int j = 0; j < 4; j++) w[j] = W + (r + (j < n_rows ? j : 0)) * K;
    int64_t i = 0;
    for (int64_t end = vec_end(K); i < end; i += LANES) {
        vec xv = loadx(x, i, K - i);
        for (int j = 0; j < 4; j++) a[j] = vfma(widen_q8(w[j], i, K - i), xv, a[j]);
    }
    for (int j = 0; j < n_rows; j++) {
        float s = vsum(a[j]);
        for (int64_t t = i; t < K; t++) s += (float)w[j][t] * x[t];
        y[r + j] = s * scale[r + j] + (b ? b[r + j] : 0.0f);
    }
}

#if defined(__AVX512VNNI__)
/* ---- int8 by VNNI's integer dot products (VPDPBUSD: 64 u8 x s8 products per instruction, summed by fours into
 * 16 int32 lanes). The few rows of activations are rounded to int8 too, as llama.cpp does for its Q8 blocks,
 * with one scale per "lane group": element k belongs to group (k mod 64) / 4, the lane that sums it, so a row's
 * integer sums stay in their lanes across the whole row and are scaled once at the end (a group is K / 16
 * elements spread along the row, as a block of 32 or 64 holds that many). The weights are signed and VPDPBUSD
 * wants one unsigned operand: q ^ 0x80 is q + 128 as an unsigned byte, so each lane sums (q + 128) qx, and
 * 128 * (its qx summed) is taken off after. Sums are exact integers: the result does not depend on the
 * thread count or summation order. */
typedef struct {
    int8_t *q;         /* the rounded row, padded with zeros to whole chunks of 64 */
    __m512 scale;      /* each lane group's scale: x[k] ~ scale[(k % 64) / 4] * q[k] */
    __m512i corr;      /* 128 * the sum of each lane group's q */
} qrow;

/* x (K fp32) -> q (Kp = ceil(K / 64) * 64 int8), round to nearest even */
static void quantize_row(const float *x, int64_t K, qrow *out) {
    int64_t chunks = (K + 63) / 64;
    __m512 mx[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = 0; c < chunks; c++)
        for (int j = 0; j < 4; j++)
            mx[j] = _mm512_max_ps(mx[j], _mm512_abs_ps(loadx(x, 64 * c + 16 * j, K - 64 * c - 16 * j)));
    float m[64], scale[16], inv[64];
    for (int j = 0; j < 4; j++) _mm512_storeu_ps(m + 16 * j, mx[j]);
    for (int g = 0; g < 16; g++) {  /* group g: lanes 4g..4g+3 of the chunk */
        float a = m[4 * g];
        for (int e = 1; e < 4; e++) a = m[4 * g + e] > a ? m[4 * g + e] : a;
        scale[g] = a / 127.0f;
        for (int e = 0; e < 4; e++) inv[4 * g + e] = a > 0.0f ? 127.0f / a : 0.0f;
    }
    __m512 iv[4];
    for (int j = 0; j < 4; j++) iv[j] = _mm512_loadu_ps(inv + 16 * j);
    __m512i sum[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t c = 0; c < chunks; c++)
        for (int j = 0; j < 4; j++) {
            int64_t i = 64 * c + 16 * j;
            __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(loadx(x, i, K - i), iv[j]));  /* to nearest even */
            qi = _mm512_max_epi32(_mm512_min_epi32(qi, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
            sum[j] = _mm512_add_epi32(sum[j], qi);
            _mm_storeu_si128((__m128i *)(out->q + i), _mm512_cvtepi32_epi8(qi));
        }
    int32_t s[64], corr[16];
    for (int j = 0; j < 4; j++) _mm512_storeu_si512(s + 16 * j, sum[j]);
    for (int g = 0; g < 16; g++) corr[g] = 128 * (s[4 * g] + s[4 * g + 1] + s[4 * g + 2] + s[4 * g + 3]);
    out->scale = _mm512_loadu_ps(scale);
    out->corr = _mm512_loadu_si512(corr);
}

/* Every row of X (M x K, M >= 1) rounded once, before the threads share out the weight rows. */
static qrow *quantize_rows(const float *X, int64_t M, int64_t K) {
    int64_t Kp = (K + 63) / 64 * 64;
    qrow *xs = (qrow *)aligned_alloc(64, sizeof(qrow) * M);
    int8_t *q = (int8_t *)aligned_alloc(64, (size_t)(M * Kp));
    for (int64_t m = 0; m < M; m++) {
        xs[m].q = q + m * Kp;
        quantize_row(X + m * K, K, xs + m);
    }
    return xs;
}

static void free_rows(qrow *xs) {
    free(xs[0].q);  /* the one buffer every row points into */
    free(xs);
}

static inline void q8_rows_vnni(const int8_t *W, const float *scale, const float *b, const qrow *x, float *y,
                                int64_t r, int64_t n_rows, int64_t K, const int8_t *next) {
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    const int8_t *w[4];
    for (int j = 0; j < 4; j++) w[j] = W + (r + (j < n_rows ? j : 0)) * K;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    int64_t line = 0, lines = next ? 4 * K / 64 : 0, per = lines / ((K + 63) / 64) + 1;
    for (int64_t i = 0; i < K; i += 64) {
        for (int64_t p = 0; p < per && line < lines; p++) _mm_prefetch((const char *)next + 64 * line++, _MM_HINT_T0);
        int64_t n = K - i;
        __mmask64 mask = n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
        __m512i xq = _mm512_loadu_si512(x->q + i);
        for (int j = 0; j < 4; j++) {
            __m512i wq = n >= 64 ? _mm512_loadu_si512(w[j] + i) : _mm512_maskz_loadu_epi8(mask, w[j] + i);
            acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_xor_si512(wq, flip), xq);
        }
    }
    for (int j = 0; j < n_rows; j++) {
        __m512 lanes = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[j], x->corr)), x->scale);
        y[r + j] = _mm512_reduce_add_ps(lanes) * scale[r + j] + (b ? b[r + j] : 0.0f);
    }
}

void gptlab_linear_q8(const float *X, const int8_t *W, const float *scale, const float *b, float *Y, int64_t M,
                      int64_t N, int64_t K) {
    int64_t blocks = (N + 3) / 4;
    qrow *xs = quantize_rows(X, M, K);
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t r = blk * 4, n_rows = N - r < 4 ? N - r : 4;
        const int8_t *next = r + 8 <= N ? W + (r + 4) * K : 0;
        for (int64_t m = 0; m < M; m++) q8_rows_vnni(W, scale, b, xs + m, Y + m * N, r, n_rows, K, m ? 0 : next);
    }
    free_rows(xs);
}
#else
void gptlab_linear_q8(const float *X, const int8_t *W, const float *scale, const float *b, float *Y, int64_t M,
                      int64_t N, int64_t K) {
    int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t r = blk * 4, n_rows = N - r < 4 ? N - r : 4;
        for (int64_t m = 0; m < M; m++) q8_rows(W, scale, b, X + m * K, Y + m * N, r, n_rows, K);
    }
}
#endif

/* whether gptlab_linear_q8 and _q4 round the activations to int8 (the VNNI build) */
int gptlab_quant_rounds_activations(void) {
#if defined(__AVX512VNNI__)
    return 1;
#else
    return 0;
#endif
}

/* ---- int4, group-wise scales (G = 32) ---- */
#define G 32

#if defined(__AVX512F__)
/* the 16 low (or high) nibbles of 16 bytes, minus the zero point 8, as 16 fp32 */
static inline __m512 nibbles16(__m128i bytes, int high) {
    __m128i v = high ? _mm_srli_epi16(bytes, 4) : bytes;
    v = _mm_sub_epi8(_mm_and_si128(v, _mm_set1_epi8(0x0F)), _mm_set1_epi8(8));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
}
#else
/* the 16 low (or high) nibbles of 16 bytes, minus the zero point 8, as two vectors of 8 fp32 */
static inline void nibbles(__m128i bytes, int high, __m256 *lo8, __m256 *hi8) {
    __m128i v = high ? _mm_srli_epi16(bytes, 4) : bytes;
    v = _mm_sub_epi8(_mm_and_si128(v, _mm_set1_epi8(0x0F)), _mm_set1_epi8(8));
    *lo8 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    *hi8 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
}
#endif

/* one group of 32 weights of one row (16 bytes) against x's 32 inputs: their dot product, unscaled */
static inline vec q4_group(const uint8_t *w, const float *xg) {
    __m128i bytes = _mm_loadu_si128((const __m128i *)w);
#if defined(__AVX512F__)
    vec part = _mm512_mul_ps(nibbles16(bytes, 0), _mm512_loadu_ps(xg));
    return vfma(nibbles16(bytes, 1), _mm512_loadu_ps(xg + 16), part);
#else
    __m256 a, c;
    nibbles(bytes, 0, &a, &c);
    __m256 part = _mm256_fmadd_ps(c, _mm256_loadu_ps(xg + 8), _mm256_mul_ps(a, _mm256_loadu_ps(xg)));
    nibbles(bytes, 1, &a, &c);
    part = _mm256_fmadd_ps(a, _mm256_loadu_ps(xg + 16), part);
    return _mm256_fmadd_ps(c, _mm256_loadu_ps(xg + 24), part);
#endif
}

static inline void q4_rows(const uint8_t *W, const float *scale, const float *b, const float *x, float *y, int64_t r,
                           int64_t n_rows, int64_t K) {
    int64_t groups = K / G;
    const uint8_t *w[4];
    const float *s[4];
    for (int j = 0; j < 4; j++) {
        int64_t q = r + (j < n_rows ? j : 0);
        w[j] = W + q * (K / 2), s[j] = scale + q * groups;
    }
    vec acc[4] = {vzero(), vzero(), vzero(), vzero()};
    for (int64_t g = 0; g < groups; g++)
        for (int j = 0; j < 4; j++) acc[j] = vfma(q4_group(w[j] + g * (G / 2), x + g * G), vset1(s[j][g]), acc[j]);
    for (int j = 0; j < n_rows; j++) y[r + j] = vsum(acc[j]) + (b ? b[r + j] : 0.0f);
}

#if defined(__AVX512VNNI__)
/* int4 by VPDPBUSD too, against the same rounded activations as int8: a chunk of 64 weights (two groups, 32
 * bytes) is unpacked to 64 unsigned nibbles (q + 8) in order, so lane l again sums elements 4l..4l+3 of the
 * chunk; 8 * (those qx) is taken off, and each lane is scaled by its group's weight scale times its lane
 * group's activation scale, chunk by chunk. */
static inline void q4_rows_vnni(const uint8_t *W, const float *scale, const float *b, const qrow *x, float *y,
                                int64_t r, int64_t n_rows, int64_t K, const uint8_t *next) {
    int64_t groups = K / G;
    const uint8_t *w[4];
    const float *s[4];
    for (int j = 0; j < 4; j++) {
        int64_t q = r + (j < n_rows ? j : 0);
        w[j] = W + q * (K / 2), s[j] = scale + q * groups;
    }
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m512i eight = _mm512_set1_epi8(8);
    int64_t line = 0, lines = next ? 4 * K / 2 / 64 : 0, per = lines / ((K + 63) / 64) + 1;
    for (int64_t i = 0; i < K; i += 64) {
        for (int64_t p = 0; p < per && line < lines; p++) _mm_prefetch((const char *)next + 64 * line++, _MM_HINT_T0);
        int two = i + 64 <= K;  /* both groups of the chunk exist (K is a multiple of 32) */
        __m512i xq = _mm512_loadu_si512(x->q + i);
        __m512i corr = _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, xq);  /* 8 * each lane's qx */
        for (int j = 0; j < 4; j++) {
            const uint8_t *wp = w[j] + i / 2;
            __m256i bytes = two ? _mm256_loadu_si256((const __m256i *)wp) : _mm256_maskz_loadu_epi8(0xFFFF, wp);
            __m256i lo = _mm256_and_si256(bytes, low), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
            __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);  /* g0 lo, g1 lo, g0 hi, g1 hi */
            z = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));          /* g0 lo, g0 hi, g1 lo, g1 hi */
            __m512i sums = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), z, xq), corr);
            float s0 = s[j][i / G], s1 = two ? s[j][i / G + 1] : 0.0f;
            __m512 ws = _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(s1), 1);  /* lanes 0-7, 8-15 */
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(ws, x->scale), acc[j]);
        }
    }
    for (int j = 0; j < n_rows; j++) y[r + j] = _mm512_reduce_add_ps(acc[j]) + (b ? b[r + j] : 0.0f);
}

void gptlab_linear_q4(const float *X, const uint8_t *W, const float *scale, const float *b, float *Y, int64_t M,
                      int64_t N, int64_t K) {
    int64_t blocks = (N + 3) / 4;
    qrow *xs = quantize_rows(X, M, K);
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t r = blk * 4, n_rows = N - r < 4 ? N - r : 4;
        const uint8_t *next = r + 8 <= N ? W + (r + 4) * (K / 2) : 0;
        for (int64_t m = 0; m < M; m++) q4_rows_vnni(W, scale, b, xs + m, Y + m * N, r, n_rows, K, m ? 0 : next);
    }
    free_rows(xs);
}
#else
void gptlab_linear_q4(const float *X, const uint8_t *W, const float *scale, const float *b, float *Y, int64_t M,
                      int64_t N, int64_t K) {
    int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t r = blk * 4, n_rows = N - r < 4 ? N - r : 4;
        for (int64_t m = 0; m < M; m++) q4_rows(W, scale, b, X + m * K, Y + m * N, r, n_rows, K);
    }
}
#endif
