/* Paged decode attention for the engine: one query token per sequence against that sequence's keys and
 * values, read in place from the KV pool through its block table (no gather), AVX2 + FMA, OpenMP.
 *
 * Q (R, nh, hs) fp32; K, V pools (blocks, bs, nkv, hs) fp32; tables (R, width) block ids; for row r the keys
 * at positions first[r] .. last[r] - 1 are read (the causal prefix, cut to a local window by first). Query
 * head h reads kv head h / (nh / nkv) (grouped-query attention): one task per (row, kv head), so each key
 * and value is read once for all the query heads that share it. Each output is summed in a fixed order by one
 * thread, so results do not depend on the thread count.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

#define MAX_HS 512
#define MAX_GROUP 16

/* One task per (row, kv head): its query heads share every key and value read. Three passes over the keys:
 * scores (and their max), exponentials (and their sum), then the weighted sum of the values. */
void gptlab_paged_decode_f32(const float *Q, const float *K, const float *V, const int64_t *tables,
                             const int64_t *first, const int64_t *last, float *Out, int64_t R, int64_t nh,
                             int64_t nkv, int64_t hs, int64_t bs, int64_t width, float scale) {
    int64_t group = nh / nkv;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < R * nkv; task++) {
        int64_t r = task / nkv, g = task % nkv;
        int64_t j0 = first[r], L = last[r] - first[r];
        const float *q = Q + (r * nh + g * group) * hs;  /* the group's query heads, consecutive */
        float *scores = (float *)malloc(sizeof(float) * (L > 0 ? L : 1) * group);
        float m[MAX_GROUP], l[MAX_GROUP];
        for (int64_t h = 0; h < group; h++) m[h] = -INFINITY, l[h] = 0.0f;
        for (int64_t pos = j0; pos < j0 + L; pos++) {  /* block by block: one table lookup per block */
            int64_t in_block = pos % bs, n = bs - in_block < j0 + L - pos ? bs - in_block : j0 + L - pos;
            const float *k = K + ((tables[r * width + pos / bs] * bs + in_block) * nkv + g) * hs;
            for (int64_t t = 0; t < n; t++, k += nkv * hs) {
                int64_t j = pos - j0 + t;
                for (int64_t h = 0; h < group; h++) {
                    float s = dot(q + h * hs, k, hs) * scale;
                    scores[h * L + j] = s;
                    if (s > m[h]) m[h] = s;
                }
            }
            pos += n - 1;
        }
        for (int64_t h = 0; h < group; h++)
            for (int64_t j = 0; j < L; j++) {
                float p = expf(scores[h * L + j] - m[h]);
                scores[h * L + j] = p;
                l[h] += p;
            }
        float acc[MAX_GROUP * MAX_HS];
        for (int64_t i = 0; i < group * hs; i++) acc[i] = 0.0f;
        for (int64_t pos = j0; pos < j0 + L; pos++) {
            int64_t in_block = pos % bs, n = bs - in_block < j0 + L - pos ? bs - in_block : j0 + L - pos;
            const float *v = V + ((tables[r * width + pos / bs] * bs + in_block) * nkv + g) * hs;
            for (int64_t t = 0; t < n; t++, v += nkv * hs) {
                int64_t j = pos - j0 + t;
                for (int64_t h = 0; h < group; h++) {
                    __m256 pv = _mm256_set1_ps(scores[h * L + j]);
                    float *a = acc + h * hs;
                    int64_t i = 0;
                    for (; i + 8 <= hs; i += 8)
                        _mm256_storeu_ps(a + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(a + i)));
                    for (; i < hs; i++) a[i] += scores[h * L + j] * v[i];
                }
            }
            pos += n - 1;
        }
        for (int64_t h = 0; h < group; h++) {
            float *o = Out + (r * nh + g * group + h) * hs;
            float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
            for (int64_t i = 0; i < hs; i++) o[i] = acc[h * hs + i] * inv;
        }
        free(scores);
    }
}
