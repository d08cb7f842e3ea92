/* Few-row linear with weight-only quantized weights, for CPU decode: Y (M, N) = X (M, K) @ dequant(W)^T + b,
 * AVX2 + FMA, OpenMP. Decode reads every weight once per token, so bytes per weight set its speed:
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
#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 int8 weights widened to fp32 */
static inline __m256 widen8(const int8_t *w) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w)));
}

/* ---- int8, per-row scales ---- */
static inline void q8_rows(const int8_t *W, const float *scale, const float *b, const float *x, float *y, int64_t r,
                           int64_t n_rows, int64_t K) {
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const int8_t *w[4];
    for (int j = 0; j < 4; j++) w[j] = W + (r + (j < n_rows ? j : 0)) * K;
    int64_t i = 0;
    for (; i + 8 <= K; i += 8) {
        __m256 xv = _mm256_loadu_ps(x + i);
        for (int j = 0; j < 4; j++) a[j] = _mm256_fmadd_ps(widen8(w[j] + i), xv, a[j]);
    }
    for (int j = 0; j < n_rows; j++) {
        float s = hsum(a[j]);
        for (int64_t t = i; t < K; t++) s += (float)w[j][t] * x[t];
        y[r + j] = s * scale[r + j] + (b ? b[r + j] : 0.0f);
    }
}

void gptlab_linear_q8(const float *X, const int8_t *W, const float *scale, const float *b, float *Y, int64_t M,
                      int64_t N, int64_t K) {
    int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t r = blk * 4, n_rows = N - r < 4 ? N - r : 4;
        for (int64_t m = 0; m < M; m++) q8_rows(W, scale, b, X + m * K, Y + m * N, r, n_rows, K);
    }
}

/* ---- int4, group-wise scales (G = 32) ---- */
#define G 32

/* the 16 low (or high) nibbles of 16 bytes, minus the zero point 8, as two vectors of 8 fp32 */
static inline void nibbles(__m128i bytes, int high, __m256 *lo8, __m256 *hi8) {
    __m128i v = high ? _mm_srli_epi16(bytes, 4) : bytes;
    v = _mm_sub_epi8(_mm_and_si128(v, _mm_set1_epi8(0x0F)), _mm_set1_epi8(8));
    *lo8 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    *hi8 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
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
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g = 0; g < groups; g++) {
        const float *xg = x + g * G;
        __m256 x0 = _mm256_loadu_ps(xg), x1 = _mm256_loadu_ps(xg + 8);
        __m256 x2 = _mm256_loadu_ps(xg + 16), x3 = _mm256_loadu_ps(xg + 24);
        for (int j = 0; j < 4; j++) {
            __m128i bytes = _mm_loadu_si128((const __m128i *)(w[j] + g * (G / 2)));
            __m256 a, c;
            nibbles(bytes, 0, &a, &c);
            __m256 part = _mm256_fmadd_ps(c, x1, _mm256_mul_ps(a, x0));
            nibbles(bytes, 1, &a, &c);
            part = _mm256_fmadd_ps(a, x2, part);
            part = _mm256_fmadd_ps(c, x3, part);
            acc[j] = _mm256_fmadd_ps(part, _mm256_set1_ps(s[j][g]), acc[j]);
        }
    }
    for (int j = 0; j < n_rows; j++) y[r + j] = hsum(acc[j]) + (b ? b[r + j] : 0.0f);
}

void gptlab_linear_q4(const float *X, const uint8_t *W, const float *scale, const float *b, float *Y, int64_t M,
                      int64_t N, int64_t K) {
    int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t r = blk * 4, n_rows = N - r < 4 ? N - r : 4;
        for (int64_t m = 0; m < M; m++) q4_rows(W, scale, b, X + m * K, Y + m * N, r, n_rows, K);
    }
}
