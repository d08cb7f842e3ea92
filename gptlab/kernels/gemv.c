/* Few-row linear for CPU decode: Y (M, N) = X (M, K) @ W (N, K)^T + b, OpenMP.
 *
 * Batch-1 decode reads every weight once per token, so its speed is memory bandwidth. This kernel
 * streams four weight rows at a time (four independent memory streams keep more loads in flight than
 * one) and reuses each row chunk for all M inputs while it is in L1, up to three inputs at a time (a 4 x 3
 * tile of accumulators: each loaded weight vector feeds three multiply-adds), so that a few rows (an engine
 * step's decode tokens) cost little more than one. X, W, b and Y are all fp32 or all bf16 (the model's
 * dtype: no conversions around the call); sums are fp32, and a bf16 output is rounded once, as torch's own
 * bf16 matmul does. Each output is summed in a fixed order by one thread, so results do not depend on the
 * thread count, nor on the rows beside it.
 *
 * One source, built once per instruction set (build.py picks the best this CPU runs, from its flags):
 *   avx2          8 lanes; bf16 widened to fp32 in registers (bf16 is the upper half of an fp32: a 16-bit
 *                 shift), so bf16 weights halve the bytes per token on CPUs without bf16 arithmetic too.
 *   avx512        16 lanes; tails read with masked loads; bf16 widened as above.
 *   avx512_bf16   as avx512, and bf16 weights multiplied by bf16 inputs with the native dot product
 *                 (VDPBF16PS: 32 bf16 pairs per instruction into 16 fp32 sums).
 * The OpenMP runtime it links is the libgomp torch has already loaded, so both share one thread pool.
 */
#include <stdlib.h>

#include "simd.h"

#define TILE_ROWS 4  /* weight rows streamed together */
#define MC 32        /* rows of X per pass: the chunk reused against every weight row stays in L2 */

static inline const void *row(const void *W, int64_t r, int64_t K, int bf16) {
    return bf16 ? (const void *)((const uint16_t *)W + r * K) : (const void *)((const float *)W + r * K);
}

/* Weight rows r..r+nr-1 (nr <= 4) against MT (1..3) inputs: out[m][j] = w_{r+j} . x_m. The full vectors are
 * summed in lanes, then across lanes; AVX2 adds the elements past the last multiple of 8 one by one, AVX-512
 * reads them as one masked vector. `next`: the next tile's rows, prefetched while this one computes. */
INLINE void tile(const void *W, int64_t r, int nr, const float *const *x, int MT, int64_t K, int bf16,
                 float out[3][TILE_ROWS], const char *next) {
    const void *w[TILE_ROWS];
    for (int j = 0; j < TILE_ROWS; j++) w[j] = row(W, r + (j < nr ? j : 0), K, bf16);
    vec a[3][TILE_ROWS];
    for (int m = 0; m < 3; m++)
        for (int j = 0; j < TILE_ROWS; j++) a[m][j] = vzero();
    int64_t i = 0, line = 0, lines = next ? (int64_t)nr * K * (bf16 ? 2 : 4) / 64 : 0;
    int64_t per = lines / (K / LANES + 1) + 1;  /* lines to prefetch per step: the whole next tile in this one */
    for (int64_t end = vec_end(K); i < end; i += LANES) {
        for (int64_t p = 0; p < per && line < lines; p++) _mm_prefetch(next + 64 * line++, _MM_HINT_T0);
        int64_t n = K - i;
        vec xv[3];
        for (int m = 0; m < MT; m++) xv[m] = loadx(x[m], i, n);
        for (int j = 0; j < TILE_ROWS; j++) {
            if (j >= nr) break;
            vec wv = loadw(w[j], i, bf16, n);
            for (int m = 0; m < MT; m++) a[m][j] = vfma(wv, xv[m], a[m][j]);
        }
    }
    for (int m = 0; m < MT; m++)
        for (int j = 0; j < nr; j++) {
            float s = vsum(a[m][j]);
            for (int64_t t = i; t < K; t++) s += load1(w[j], t, bf16) * x[m][t];
            out[m][j] = s;
        }
}

#if defined(__AVX512BF16__)
/* ---------------------------------------------------------------- native bf16 dot products */
/* The same tile for bf16 weights and bf16 inputs: each VDPBF16PS multiplies 32 weights by 32 inputs in pairs
 * and adds them into 16 fp32 sums (a tail shorter than 32 is read masked: the missing pairs are zeros). */
INLINE void tile_dpbf16(const uint16_t *W, int64_t r, int nr, const uint16_t *const *x, int MT, int64_t K,
                        float out[3][TILE_ROWS], const char *next) {
    const uint16_t *w[TILE_ROWS];
    for (int j = 0; j < TILE_ROWS; j++) w[j] = W + (r + (j < nr ? j : 0)) * K;
    __m512 a[3][TILE_ROWS];
    for (int m = 0; m < 3; m++)
        for (int j = 0; j < TILE_ROWS; j++) a[m][j] = _mm512_setzero_ps();
    int64_t line = 0, lines = next ? (int64_t)nr * K * 2 / 64 : 0;
    int64_t per = lines / (K / 32 + 1) + 1;
    for (int64_t i = 0; i < K; i += 32) {
        for (int64_t p = 0; p < per && line < lines; p++) _mm_prefetch(next + 64 * line++, _MM_HINT_T0);
        int64_t n = K - i;
        __mmask32 mask = n >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << n) - 1u);
        __m512i xv[3];
        for (int m = 0; m < MT; m++) xv[m] = _mm512_maskz_loadu_epi16(mask, x[m] + i);
        for (int j = 0; j < TILE_ROWS; j++) {
            if (j >= nr) break;
            __m512i wv = n >= 32 ? _mm512_loadu_si512(w[j] + i) : _mm512_maskz_loadu_epi16(mask, w[j] + i);
            for (int m = 0; m < MT; m++) a[m][j] = _mm512_dpbf16_ps(a[m][j], (__m512bh)wv, (__m512bh)xv[m]);
        }
    }
    for (int m = 0; m < MT; m++)
        for (int j = 0; j < nr; j++) out[m][j] = _mm512_reduce_add_ps(a[m][j]);
}

#endif

/* a tile's sums plus the bias into Y, fp32 or rounded once to bf16 (bf16: Y and b are bf16, like W) */
static inline void store(void *Y, int64_t N, int64_t m0, int MT, int64_t r, int nr, float out[3][TILE_ROWS],
                         const void *b, int bf16) {
    for (int m = 0; m < MT; m++)
        for (int j = 0; j < nr; j++) {
            float v = out[m][j] + (b ? load1(b, r + j, bf16) : 0.0f);
            if (bf16) ((uint16_t *)Y)[(m0 + m) * N + r + j] = f32_to_bf16(v);
            else ((float *)Y)[(m0 + m) * N + r + j] = v;
        }
}

/* one tile, with the weight dtype, a full tile and the input count as constants (one inner loop each) */
static void run_tile(const void *W, int64_t r, int nr, const float *const *x, int MT, int64_t K, int bf16,
                     float out[3][TILE_ROWS], const char *next) {
#define TILE(BF, NR) \
    switch (MT) { \
        case 1: tile(W, r, NR, x, 1, K, BF, out, next); break; \
        case 2: tile(W, r, NR, x, 2, K, BF, out, next); break; \
        default: tile(W, r, NR, x, 3, K, BF, out, next); \
    }
    if (nr == TILE_ROWS) {
        if (bf16) TILE(1, TILE_ROWS) else TILE(0, TILE_ROWS)
    } else if (bf16) TILE(1, nr) else TILE(0, nr)
#undef TILE
}

/* X (M, K), b, Y in W's dtype. bf16 without native dot products: X is widened to fp32 once, here. */
static void linear(const void *X, const void *W, const void *b, void *Y, int64_t M, int64_t N, int64_t K, int bf16) {
    int64_t tiles = (N + TILE_ROWS - 1) / TILE_ROWS;
    int native = 0;
#if defined(__AVX512BF16__)
    native = bf16;  /* bf16 rows of X feed VDPBF16PS as they are */
#endif
    float *xf = 0;
    if (bf16 && !native) {
        xf = (float *)malloc(sizeof(float) * M * K);
        if (!xf) return;
        for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_f32(((const uint16_t *)X)[i]);
    }
    const float *X32 = bf16 ? xf : (const float *)X;
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
        int64_t m1 = m0 + MC < M ? m0 + MC : M;
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            int64_t r = t * TILE_ROWS;
            int nr = N - r < TILE_ROWS ? (int)(N - r) : TILE_ROWS;
            for (int64_t m = m0; m < m1; m += 3) {
                int MT = m1 - m < 3 ? (int)(m1 - m) : 3;
                float out[3][TILE_ROWS];
                const char *next = m == m0 && r + TILE_ROWS < N ? (const char *)row(W, r + TILE_ROWS, K, bf16) : 0;
#if defined(__AVX512BF16__)
                if (native) {
                    const uint16_t *xb = (const uint16_t *)X;
                    const uint16_t *xs[3] = {xb + m * K, xb + (m + (MT > 1)) * K, xb + (m + (MT > 2) * 2) * K};
                    switch (MT) {
                        case 1: tile_dpbf16((const uint16_t *)W, r, nr, xs, 1, K, out, next); break;
                        case 2: tile_dpbf16((const uint16_t *)W, r, nr, xs, 2, K, out, next); break;
                        default: tile_dpbf16((const uint16_t *)W, r, nr, xs, 3, K, out, next);
                    }
                    store(Y, N, m, MT, r, nr, out, b, 1);
                    continue;
                }
#endif
                const float *xs[3] = {X32 + m * K, X32 + (m + (MT > 1)) * K, X32 + (m + (MT > 2) * 2) * K};
                run_tile(W, r, nr, xs, MT, K, bf16, out, next);
                store(Y, N, m, MT, r, nr, out, b, bf16);
            }
        }
    }
    free(xf);
}

const char *gptlab_isa(void) { return isa_name(); }

/* the two entry points: X, W, b and Y all fp32, or all bf16 (the sums are fp32 in both) */
void gptlab_linear_f32(const float *X, const float *W, const float *b, float *Y, int64_t M, int64_t N, int64_t K) {
    linear(X, W, b, Y, M, N, K, 0);
}

void gptlab_linear_bf16(const uint16_t *X, const uint16_t *W, const uint16_t *b, uint16_t *Y, int64_t M, int64_t N,
                        int64_t K) {
    linear(X, W, b, Y, M, N, K, 1);
}
