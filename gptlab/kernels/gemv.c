/* Few-row linear for CPU decode: Y (M, N) = X (M, K) @ W (N, K)^T + b, AVX2 + FMA, OpenMP.
 *
 * Batch-1 decode reads every weight once per token, so its speed is memory bandwidth. This kernel
 * streams four weight rows at a time (four independent memory streams keep more loads in flight than
 * one) and reuses each row chunk for all M inputs while it is in L1, three inputs at a time (dot4x3), so
 * that a few rows (an engine step's decode tokens) cost little more than one. W is fp32 or bf16; X, b and Y are
 * fp32 (the caller converts the few rows of activations). bf16 is the upper half of an fp32, so widening
 * it is a 16-bit shift: bf16 weights halve the bytes per token on CPUs without bf16 arithmetic too.
 * Each output is summed in a fixed order by one thread, so results do not depend on the thread count.
 * Built and loaded by __init__.py; the OpenMP runtime it links is the libgomp torch has already loaded,
 * so both share one thread pool.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 weights from element i of row w, widened to fp32 */
static inline __m256 load8(const void *w, int64_t i, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float load1(const void *w, int64_t i, int bf16) {
    if (!bf16) return ((const float *)w)[i];
    uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline const void *row(const void *W, int64_t r, int64_t K, int bf16) {
    return bf16 ? (const void *)((const uint16_t *)W + r * K) : (const void *)((const float *)W + r * K);
}

/* one output: w . x over K (any K; the tail past a multiple of 8 is summed last) */
static inline float dot1(const void *w, const float *x, int64_t K, int bf16) {
    __m256 a = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= K; i += 8) a = _mm256_fmadd_ps(load8(w, i, bf16), _mm256_loadu_ps(x + i), a);
    float s = hsum(a);
    for (; i < K; i++) s += load1(w, i, bf16) * x[i];
    return s;
}

/* four outputs, rows r..r+3 of W, against one input x */
static inline void dot4(const void *W, int64_t r, const float *x, int64_t K, int bf16, float out[4]) {
    const void *w0 = row(W, r, K, bf16), *w1 = row(W, r + 1, K, bf16);
    const void *w2 = row(W, r + 2, K, bf16), *w3 = row(W, r + 3, K, bf16);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= K; i += 8) {
        __m256 xv = _mm256_loadu_ps(x + i);
        a0 = _mm256_fmadd_ps(load8(w0, i, bf16), xv, a0);
        a1 = _mm256_fmadd_ps(load8(w1, i, bf16), xv, a1);
        a2 = _mm256_fmadd_ps(load8(w2, i, bf16), xv, a2);
        a3 = _mm256_fmadd_ps(load8(w3, i, bf16), xv, a3);
    }
    out[0] = hsum(a0), out[1] = hsum(a1), out[2] = hsum(a2), out[3] = hsum(a3);
    for (; i < K; i++) {
        out[0] += load1(w0, i, bf16) * x[i], out[1] += load1(w1, i, bf16) * x[i];
        out[2] += load1(w2, i, bf16) * x[i], out[3] += load1(w3, i, bf16) * x[i];
    }
}

/* four outputs of W rows r..r+3 against each of three inputs: a 4 x 3 tile of 12 accumulators, so each loaded
 * weight vector feeds three FMAs (the one-input loop is bound by loads, this one by FMAs). Every output is
 * summed exactly as dot4 sums it, so a row's result does not depend on the rows beside it. */
static inline void dot4x3(const void *W, int64_t r, const float *x0, const float *x1, const float *x2, int64_t K,
                          int bf16, float out[3][4], const char *next) {
    const void *w[4] = {row(W, r, K, bf16), row(W, r + 1, K, bf16), row(W, r + 2, K, bf16), row(W, r + 3, K, bf16)};
    __m256 a[3][4];
    for (int m = 0; m < 3; m++)
        for (int j = 0; j < 4; j++) a[m][j] = _mm256_setzero_ps();
    int64_t i = 0, line = 0, lines = next ? 4 * K * (bf16 ? 2 : 4) / 64 : 0;
    for (; i + 8 <= K; i += 8) {
        for (int p = 0; p < 2 && line < lines; p++)  /* the next block's rows, while this one computes */
            _mm_prefetch(next + 64 * line++, _MM_HINT_T0);
        __m256 v0 = _mm256_loadu_ps(x0 + i), v1 = _mm256_loadu_ps(x1 + i), v2 = _mm256_loadu_ps(x2 + i);
        for (int j = 0; j < 4; j++) {
            __m256 wv = load8(w[j], i, bf16);
            a[0][j] = _mm256_fmadd_ps(wv, v0, a[0][j]);
            a[1][j] = _mm256_fmadd_ps(wv, v1, a[1][j]);
            a[2][j] = _mm256_fmadd_ps(wv, v2, a[2][j]);
        }
    }
    const float *xs[3] = {x0, x1, x2};
    for (int m = 0; m < 3; m++)
        for (int j = 0; j < 4; j++) {
            float s = hsum(a[m][j]);
            for (int64_t t = i; t < K; t++) s += load1(w[j], t, bf16) * xs[m][t];
            out[m][j] = s;
        }
}

/* the same for two inputs (the rows left over after the threes) */
static inline void dot4x2(const void *W, int64_t r, const float *x0, const float *x1, int64_t K, int bf16,
                          float out[2][4]) {
    const void *w[4] = {row(W, r, K, bf16), row(W, r + 1, K, bf16), row(W, r + 2, K, bf16), row(W, r + 3, K, bf16)};
    __m256 a[2][4];
    for (int m = 0; m < 2; m++)
        for (int j = 0; j < 4; j++) a[m][j] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= K; i += 8) {
        __m256 v0 = _mm256_loadu_ps(x0 + i), v1 = _mm256_loadu_ps(x1 + i);
        for (int j = 0; j < 4; j++) {
            __m256 wv = load8(w[j], i, bf16);
            a[0][j] = _mm256_fmadd_ps(wv, v0, a[0][j]);
            a[1][j] = _mm256_fmadd_ps(wv, v1, a[1][j]);
        }
    }
    const float *xs[2] = {x0, x1};
    for (int m = 0; m < 2; m++)
        for (int j = 0; j < 4; j++) {
            float s = hsum(a[m][j]);
            for (int64_t t = i; t < K; t++) s += load1(w[j], t, bf16) * xs[m][t];
            out[m][j] = s;
        }
}

/* Rows of X are taken MC at a time, so that the chunk being reused against every weight row stays in L2
 * (32 rows x 3072 x 4 bytes = 384 KiB); each chunk reads the weights once more. */
#define MC 32

static inline void linear(const float *X, const void *W, const float *b, float *Y, int64_t M, int64_t N, int64_t K,
                          int bf16) {
    int64_t blocks = (N + 3) / 4;
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
        int64_t m1 = m0 + MC < M ? m0 + MC : M;
#pragma omp parallel for schedule(static)
        for (int64_t blk = 0; blk < blocks; blk++) {
            int64_t r = blk * 4;
            int64_t m = m0;
            if (r + 4 <= N) {
                for (; m + 3 <= m1; m += 3) {
                    float out[3][4];
                    const char *next = m == m0 && r + 8 <= N ? (const char *)row(W, r + 4, K, bf16) : 0;
                    dot4x3(W, r, X + m * K, X + (m + 1) * K, X + (m + 2) * K, K, bf16, out, next);
                    for (int q = 0; q < 3; q++)
                        for (int j = 0; j < 4; j++) Y[(m + q) * N + r + j] = out[q][j] + (b ? b[r + j] : 0.0f);
                }
                if (m + 2 <= m1) {
                    float out[2][4];
                    dot4x2(W, r, X + m * K, X + (m + 1) * K, K, bf16, out);
                    for (int q = 0; q < 2; q++)
                        for (int j = 0; j < 4; j++) Y[(m + q) * N + r + j] = out[q][j] + (b ? b[r + j] : 0.0f);
                    m += 2;
                }
            }
            for (; m < m1; m++) {
                const float *x = X + m * K;
                float *y = Y + m * N;
                if (r + 4 <= N) {
                    float out[4];
                    dot4(W, r, x, K, bf16, out);
                    for (int j = 0; j < 4; j++) y[r + j] = out[j] + (b ? b[r + j] : 0.0f);
                } else {
                    for (int64_t q = r; q < N; q++) y[q] = dot1(row(W, q, K, bf16), x, K, bf16) + (b ? b[q] : 0.0f);
                }
            }
        }
    }
}

/* the two entry points: the weight's dtype is a constant in each, so the compiler keeps one inner loop */
void gptlab_linear_f32(const float *X, const float *W, const float *b, float *Y, int64_t M, int64_t N, int64_t K) {
    linear(X, W, b, Y, M, N, K, 0);
}

void gptlab_linear_bf16(const float *X, const uint16_t *W, const float *b, float *Y, int64_t M, int64_t N, int64_t K) {
    linear(X, W, b, Y, M, N, K, 1);
}
