/* Paged decode attention for the engine: one query token per sequence against that sequence's keys and
 * values, read in place from the KV pool through its block table (no gather), OpenMP; AVX2 or AVX-512
 * (simd.h).
 *
 * Q (R, nh, hs) fp32. The pools are fp32 or bf16 (widened to fp32 in registers: a bf16 cache is half the
 * bytes to read, which is what decode over a long context costs):
 *   K (blocks, nkv, ceil(hs / 2), bs, 2): each block holds its keys in pairs of dimensions, key after key (see
 *     "scores" below), so a block's scores are multiply-adds of whole vectors of keys by a query pair;
 *   V (blocks, bs, nkv, hs): a key's value is one row, added into the output with the key's weight.
 * tables (R, width) block ids; row r reads the keys at positions first[r] .. last[r] - 1 (the causal prefix,
 * cut to a local window by first). Query head h reads kv head h / (nh / nkv) (grouped-query attention).
 *
 * Work is split into tasks of (row, span of keys): a span reads its blocks whole and in order, and the query
 * heads of a kv head share every key and value read; a long context is cut into spans so that every thread has
 * work even for one sequence (flash-decoding, Dao et al. 2023). Each span keeps its own maximum, sum of
 * exponentials and weighted sum of values per head; the spans are then merged in order. Span sizes follow
 * from the work alone, so each output is computed in a fixed order whatever the thread count.
 */
#include <math.h>
#include <stdlib.h>

#include "simd.h"

#define MIN_SPAN 32   /* keys per task, at least (a task's fixed cost: a few merges) */
#define MAX_SPAN 256  /* and at most: long contexts are cut into many tasks */
#define HEADS 4    /* query heads whose scores are summed together (their accumulators stay in registers) */

/* exp(x) for x <= 0, to about 2 ulp (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n);
 * below -87 (where the float result would be denormal) it returns 0. */
static inline vec vexp(vec x) {
#if defined(__AVX512F__)
    __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    vec n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    vec r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
#else
    vec tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    vec n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    vec r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
#endif
    vec p = vset1(1.9875691500e-4f);
    p = vfma(p, r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
#if defined(__AVX512F__)
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(p, n));
#else
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
#endif
}

static inline const void *at(const void *pool, int64_t element, int bf16) {
    return bf16 ? (const void *)((const uint16_t *)pool + element) : (const void *)((const float *)pool + element);
}

/* ---- scores: q . k for the keys of one block of one kv head ----
 * The K pool holds each block's keys in pairs of dimensions: kt[d / 2][j][d % 2] for key j of the block (bs keys,
 * hp = ceil(hs / 2) pairs, a zero in the last pair of an odd head size). A vector of the pool is then a run of
 * keys with both dimensions of a pair: VDPBF16PS multiplies 16 keys' pairs by the query's pair and adds both
 * products into each key's lane (bf16 pools where the CPU has it); elsewhere the pairs are widened to fp32,
 * multiplied by the query's pair repeated, and each key's two lanes added at the end. q here is padded the same
 * way: qp[h][2 * hp] fp32 and, for VDPBF16PS, qb[h][hp] bf16 pairs. */

#if defined(__AVX512BF16__)
/* 16 keys from key c of the block: their scores for NQ heads (native bf16 pairs) */
INLINE void score16_bf16(const uint32_t *qb, int NQ, int64_t hp, const uint16_t *kt, int64_t bs, int64_t c, int64_t n,
                         __m512 *out) {
    __m512 a[HEADS];
    for (int h = 0; h < NQ; h++) a[h] = _mm512_setzero_ps();
    __mmask32 mask = n >= 16 ? 0xFFFFFFFFu : (__mmask32)((1u << (2 * n)) - 1u);
    for (int64_t d2 = 0; d2 < hp; d2++) {
        __m512i k = _mm512_maskz_loadu_epi16(mask, kt + (d2 * bs + c) * 2);
        for (int h = 0; h < NQ; h++)
            a[h] = _mm512_dpbf16_ps(a[h], (__m512bh)k, (__m512bh)_mm512_set1_epi32((int)qb[h * hp + d2]));
    }
    for (int h = 0; h < NQ; h++) out[h] = a[h];
}
#endif

/* LANES / 2 keys from key c of the block (widened pairs): their scores for NQ heads, in out[h][0 .. n) */
INLINE void score_pairs(const float *qp, int NQ, int64_t hp, const void *kt, int64_t bs, int64_t c, int64_t n, int bf16,
                        float out[HEADS][LANES]) {
    vec a[2][HEADS];  /* two partial sums per head: half the chain of dependent multiply-adds */
    for (int h = 0; h < NQ; h++) a[0][h] = a[1][h] = vzero();
    for (int64_t d2 = 0; d2 < hp; d2++) {
        vec k;
        if (HAS_MASKED_TAIL || 2 * n >= LANES) {
            k = loadw(kt, (d2 * bs + c) * 2, bf16, 2 * n);
        } else {  /* AVX2, the last keys of a block size that is not a multiple of 4 (tests use such sizes) */
            float tmp[LANES] = {0};
            for (int64_t t = 0; t < 2 * n; t++) tmp[t] = load1(kt, (d2 * bs + c) * 2 + t, bf16);
            k = loadx(tmp, 0, LANES);
        }
        for (int h = 0; h < NQ; h++) {
            double pair;  /* (q[2 d2], q[2 d2 + 1]) repeated across the vector */
            memcpy(&pair, qp + h * 2 * hp + 2 * d2, sizeof pair);
#if defined(__AVX512F__)
            vec qv = _mm512_castpd_ps(_mm512_set1_pd(pair));
#else
            vec qv = _mm256_castpd_ps(_mm256_set1_pd(pair));
#endif
            a[d2 & 1][h] = vfma(qv, k, a[d2 & 1][h]);
        }
    }
    for (int h = 0; h < NQ; h++) {
        float lanes[LANES];
        storex(lanes, 0, LANES, a[0][h] + a[1][h]);
        for (int64_t t = 0; t < n; t++) out[h][t] = lanes[2 * t] + lanes[2 * t + 1];
    }
}

/* scores (pre-scaled) of block b's keys within [j0, j1), for query heads 0..nq (nq <= HEADS) of one kv head whose
 * key pairs are at kt, into s[h * stride + j - j0] */
static void score_block(const float *qp, const uint32_t *qb, int nq, int64_t hp, const void *kt, int64_t b,
                        int64_t j0, int64_t j1, int64_t bs, float scale, int bf16, float *s, int64_t stride) {
    int64_t step = LANES / 2;
#if defined(__AVX512BF16__)
    if (bf16) step = 16;
#else
    (void)qb;
#endif
    for (int64_t c = 0; c < bs; c += step) {
        int64_t first = b * bs + c, n = bs - c < step ? bs - c : step;
        if (first + n <= j0 || first >= j1) continue;
        float out[HEADS][LANES];
#if defined(__AVX512BF16__)
        if (bf16) {
            __m512 v[HEADS];
            switch (nq) {  /* the head count as a constant: the accumulators stay in registers */
                case 1: score16_bf16(qb, 1, hp, (const uint16_t *)kt, bs, c, n, v); break;
                case 2: score16_bf16(qb, 2, hp, (const uint16_t *)kt, bs, c, n, v); break;
                case 3: score16_bf16(qb, 3, hp, (const uint16_t *)kt, bs, c, n, v); break;
                default: score16_bf16(qb, 4, hp, (const uint16_t *)kt, bs, c, n, v);
            }
            for (int h = 0; h < nq; h++) _mm512_storeu_ps(out[h], v[h]);
        } else
#endif
        switch (nq) {
            case 1: score_pairs(qp, 1, hp, kt, bs, c, n, bf16, out); break;
            case 2: score_pairs(qp, 2, hp, kt, bs, c, n, bf16, out); break;
            case 3: score_pairs(qp, 3, hp, kt, bs, c, n, bf16, out); break;
            default: score_pairs(qp, 4, hp, kt, bs, c, n, bf16, out);
        }
        for (int h = 0; h < nq; h++)
            for (int64_t t = 0; t < n; t++)
                if (first + t >= j0 && first + t < j1) s[h * stride + first + t - j0] = out[h][t] * scale;
    }
}

static inline void prefetch(const void *p, int64_t bytes) {
    for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch((const char *)p + line, _MM_HINT_T0);
}

/* ---- values: out[h] = sum over keys of p[h][j] * v[j], for NG heads of one kv head, HV vectors each ---- */
INLINE void weigh_values(const float *p, int64_t stride, int NG, const void *V, const int64_t *table, int64_t j0,
                         int64_t j1, int64_t nkv, int64_t g, int64_t hs, int64_t bs, int bf16, int HV, float *out) {
    vec a[4][16];  /* NG x HV <= 24 accumulators, kept in registers: each value row is read once for NG heads */
    for (int h = 0; h < NG; h++)
        for (int c = 0; c < HV; c++) a[h][c] = vzero();
    for (int64_t b = j0 / bs; b * bs < j1; b++) {  /* block by block: one table lookup per block */
        int64_t lo = b * bs > j0 ? b * bs : j0, hi = (b + 1) * bs < j1 ? (b + 1) * bs : j1;
        int64_t row = ((table[b] * bs + lo - b * bs) * nkv + g) * hs;  /* key lo's value */
        for (int64_t pos = lo; pos < hi; pos++, row += nkv * hs) {
            const void *v = at(V, row, bf16);
            for (int c = 0; c < HV; c++) {
                vec x = loadw(v, c * LANES, bf16, LANES);
                for (int h = 0; h < NG; h++) a[h][c] = vfma(vset1(p[h * stride + pos - j0]), x, a[h][c]);
            }
        }
    }
    for (int h = 0; h < NG; h++)
        for (int c = 0; c < HV; c++) storex(out + h * hs, c * LANES, LANES, a[h][c]);
}

/* weigh_values for heads h0 .. h0 + ng - 1 with constants: NG up to 24 / HV (at most 4) per call */
static void weigh_heads(const float *p, int64_t stride, int64_t ng, const void *V, const int64_t *table, int64_t j0,
                        int64_t j1, int64_t nkv, int64_t g, int64_t hs, int64_t bs, int bf16, float *out) {
    int64_t hv = hs % LANES ? 0 : hs / LANES;
    int64_t most = hv == 16 ? 1 : hv == 8 || hv == 7 ? 3 : hv >= 1 && hv <= 6 ? 4 : 0;
    if (!most) {  /* any other head size, element by element */
        for (int64_t h = 0; h < ng; h++) {
            float *o = out + h * hs;
            for (int64_t t = 0; t < hs; t++) o[t] = 0.0f;
            for (int64_t b = j0 / bs; b * bs < j1; b++) {
                int64_t lo = b * bs > j0 ? b * bs : j0, hi = (b + 1) * bs < j1 ? (b + 1) * bs : j1;
                for (int64_t pos = lo; pos < hi; pos++) {
                    int64_t row = ((table[b] * bs + pos - b * bs) * nkv + g) * hs;
                    for (int64_t t = 0; t < hs; t++) o[t] += p[h * stride + pos - j0] * load1(V, row + t, bf16);
                }
            }
        }
        return;
    }
    for (int64_t h = 0; h < ng; h += most) {
        int k = (int)(ng - h < most ? ng - h : most);
        const float *ph = p + h * stride;
        float *o = out + h * hs;
#define W(NG, HV) weigh_values(ph, stride, NG, V, table, j0, j1, nkv, g, hs, bs, bf16, HV, o)
#define BY_NG(HV) switch (k) { case 1: W(1, HV); break; case 2: W(2, HV); break; case 3: W(3, HV); break; \
                               default: W(4, HV); }
        switch (hv) {
            case 1: BY_NG(1) break;
            case 2: BY_NG(2) break;
            case 3: BY_NG(3) break;
            case 4: BY_NG(4) break;
            case 5: BY_NG(5) break;
            case 6: BY_NG(6) break;
            case 7: switch (k) { case 1: W(1, 7); break; case 2: W(2, 7); break; default: W(3, 7); } break;
            case 8: switch (k) { case 1: W(1, 8); break; case 2: W(2, 8); break; default: W(3, 8); } break;
            default: W(1, 16);
        }
#undef BY_NG
#undef W
    }
}

/* One span of keys [j0, j1) of one row, every head: for each query head (of nh, kv head h / group) the span's
 * maximum score m, sum of exp(score - m) l, and the weighted sum of its values acc (nh x hs), unnormalised.
 * Blocks are read whole and in order (all kv heads' keys and values, fetched ahead while the block before is
 * scored), so memory streams instead of jumping between heads. s: nh x stride scratch floats; qp, qb: q padded
 * to pairs (see above). */
static void span(const float *qp, const uint32_t *qb, const void *K, const void *V, const int64_t *table,
                 int64_t j0, int64_t j1, int64_t nh, int64_t nkv, int64_t hs, int64_t bs, float scale, int bf16,
                 float *m, float *l, float *acc, float *s, int64_t stride) {
    int64_t L = j1 - j0, group = nh / nkv, hp = (hs + 1) / 2, width = bf16 ? 2 : 4;
    int64_t kblock = nkv * hp * bs * 2, vblock = bs * nkv * hs;  /* elements of one block of each pool */
    for (int64_t b = j0 / bs; b * bs < j1; b++) {
        if ((b + 1) * bs < j1) {
            prefetch(at(K, table[b + 1] * kblock, bf16), kblock * width);
            prefetch(at(V, table[b + 1] * vblock, bf16), vblock * width);
        }
        for (int64_t g = 0; g < nkv; g++) {
            const void *kt = at(K, table[b] * kblock + g * hp * bs * 2, bf16);  /* kv head g's key pairs */
            for (int64_t h = g * group; h < (g + 1) * group; h += HEADS) {
                int nq = (g + 1) * group - h < HEADS ? (int)((g + 1) * group - h) : HEADS;
                score_block(qp + h * 2 * hp, qb + h * hp, nq, hp, kt, b, j0, j1, bs, scale, bf16, s + h * stride,
                            stride);
            }
        }
    }
    for (int64_t h = 0; h < nh; h++) {  /* softmax pieces: exp(score - the span's max), their sum */
        float *sh = s + h * stride;
        float mx = -INFINITY;
        for (int64_t j = 0; j < L; j++) mx = sh[j] > mx ? sh[j] : mx;
        vec sum = vzero(), shift = vset1(mx);
        int64_t j = 0;
        for (int64_t end = vec_end(L); j < end; j += LANES) {
            vec p = vexp(loadx(sh, j, L - j) - shift);
            storex(sh, j, L - j, p);
            sum = vadd_first(sum, p, L - j);
        }
        float total = vsum(sum);
        for (; j < L; j++) {  /* AVX2's tail */
            sh[j] = expf(sh[j] - mx);
            total += sh[j];
        }
        m[h] = mx, l[h] = total;
    }
    for (int64_t g = 0; g < nkv; g++)
        weigh_heads(s + g * group * stride, stride, group, V, table, j0, j1, nkv, g, hs, bs, bf16,
                    acc + g * group * hs);
}

static void paged_decode(const float *Q, const void *K, const void *V, const int64_t *tables, const int64_t *first,
                         const int64_t *last, float *Out, int64_t R, int64_t nh, int64_t nkv, int64_t hs, int64_t bs,
                         int64_t width, float scale, int bf16) {
    /* keys per task: about an eighth of all the keys to read (so a few rows still make enough tasks for the
     * threads), in whole blocks, at most MAX_SPAN; set by the work alone, so results do not depend on threads */
    int64_t total = 0;
    for (int64_t r = 0; r < R; r++) total += last[r] > first[r] ? last[r] - first[r] : 0;
    int64_t span_keys = (total / 8 + bs - 1) / bs * bs;
    span_keys = span_keys < MIN_SPAN ? MIN_SPAN : span_keys > MAX_SPAN ? MAX_SPAN : span_keys;
    /* tasks: ceil(L / span_keys) per row; offsets[r] = the first task of row r */
    int64_t *offsets = (int64_t *)malloc(sizeof(int64_t) * (R + 1));
    offsets[0] = 0;
    for (int64_t r = 0; r < R; r++) {
        int64_t L = last[r] - first[r];
        offsets[r + 1] = offsets[r] + (L > 0 ? (L + span_keys - 1) / span_keys : 1);
    }
    int64_t tasks = offsets[R];
    /* the queries in pairs of dimensions, as the K pool holds them: fp32 (a zero after an odd head size), and bf16
     * pairs packed in 32 bits (for VDPBF16PS) */
    int64_t hp = (hs + 1) / 2;
    float *qp = (float *)malloc(sizeof(float) * R * nh * 2 * hp);
    uint32_t *qb = (uint32_t *)malloc(sizeof(uint32_t) * R * nh * hp);
    for (int64_t rh = 0; rh < R * nh; rh++)
        for (int64_t d = 0; d < 2 * hp; d++) qp[rh * 2 * hp + d] = d < hs ? Q[rh * hs + d] : 0.0f;
    for (int64_t i = 0; i < R * nh * hp; i++)
        qb[i] = (uint32_t)f32_to_bf16(qp[2 * i]) | (uint32_t)f32_to_bf16(qp[2 * i + 1]) << 16;
    float *part_m = (float *)malloc(sizeof(float) * tasks * nh);
    float *part_l = (float *)malloc(sizeof(float) * tasks * nh);
    float *part_acc = (float *)malloc(sizeof(float) * tasks * nh * hs);
#pragma omp parallel
    {
        float *s = (float *)malloc(sizeof(float) * span_keys * nh);
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            int64_t r = 0;
            while (offsets[r + 1] <= t) r++;
            int64_t j0 = first[r] + (t - offsets[r]) * span_keys;
            int64_t j1 = j0 + span_keys < last[r] ? j0 + span_keys : last[r];
            span(qp + r * nh * 2 * hp, qb + r * nh * hp, K, V, tables + r * width, j0, j1 > j0 ? j1 : j0, nh, nkv, hs,
                 bs, scale, bf16, part_m + t * nh, part_l + t * nh, part_acc + t * nh * hs, s, span_keys);
        }
        free(s);
#pragma omp for schedule(static)
        for (int64_t rh = 0; rh < R * nh; rh++) {  /* merge each (row, head)'s spans, in order */
            int64_t r = rh / nh, h = rh % nh;
            float mx = -INFINITY, sum = 0.0f;
            for (int64_t t = offsets[r]; t < offsets[r + 1]; t++)
                mx = part_m[t * nh + h] > mx ? part_m[t * nh + h] : mx;
            float *o = Out + rh * hs;
            for (int64_t i = 0; i < hs; i++) o[i] = 0.0f;
            for (int64_t t = offsets[r]; t < offsets[r + 1]; t++) {
                float ms = part_m[t * nh + h];
                if (ms == -INFINITY) continue;  /* an empty span */
                float w = expf(ms - mx);
                sum += part_l[t * nh + h] * w;
                const float *a = part_acc + (t * nh + h) * hs;
                for (int64_t i = 0; i < hs; i++) o[i] += w * a[i];
            }
            float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
            for (int64_t i = 0; i < hs; i++) o[i] *= inv;
        }
    }
    free(offsets), free(part_m), free(part_l), free(part_acc), free(qp), free(qb);
}

void gptlab_paged_decode_f32(const float *Q, const float *K, const float *V, const int64_t *tables,
                             const int64_t *first, const int64_t *last, float *Out, int64_t R, int64_t nh,
                             int64_t nkv, int64_t hs, int64_t bs, int64_t width, float scale) {
    paged_decode(Q, K, V, tables, first, last, Out, R, nh, nkv, hs, bs, width, scale, 0);
}

void gptlab_paged_decode_bf16(const float *Q, const uint16_t *K, const uint16_t *V, const int64_t *tables,
                              const int64_t *first, const int64_t *last, float *Out, int64_t R, int64_t nh,
                              int64_t nkv, int64_t hs, int64_t bs, int64_t width, float scale) {
    paged_decode(Q, K, V, tables, first, last, Out, R, nh, nkv, hs, bs, width, scale, 1);
}

/* The step's new keys and values into their slots, then decode attention, in one call (the engine's decode-only
 * steps: one new token per row, in row order). q, k, v: row r, head h, element d at base + r * row + h * head + d,
 * all fp32 or all bf16 (new_bf16); the pools fp32 or bf16 (pool_bf16); slots (R) each row's slot; Out (R, nh, hs)
 * in q's dtype. */
void gptlab_paged_store_decode(const void *Qn, const void *Kn, const void *Vn, int64_t q_row, int64_t q_head,
                               int64_t k_row, int64_t k_head, int64_t v_row, int64_t v_head, int64_t new_bf16,
                               const int64_t *slots, void *K, void *V, int64_t pool_bf16, const int64_t *tables,
                               const int64_t *first, const int64_t *last, void *Out, int64_t R, int64_t nh,
                               int64_t nkv, int64_t hs, int64_t bs, int64_t width, float scale) {
    int64_t hp = (hs + 1) / 2;
    for (int64_t r = 0; r < R; r++) {
        int64_t block = slots[r] / bs, off = slots[r] % bs;
        for (int64_t g = 0; g < nkv; g++)
            for (int64_t d = 0; d < hs; d++) {
                float kv = load1(Kn, r * k_row + g * k_head + d, (int)new_bf16);
                float vv = load1(Vn, r * v_row + g * v_head + d, (int)new_bf16);
                int64_t ke = (((block * nkv + g) * hp + d / 2) * bs + off) * 2 + d % 2;
                int64_t ve = ((block * bs + off) * nkv + g) * hs + d;
                if (pool_bf16) {
                    ((uint16_t *)K)[ke] = f32_to_bf16(kv);
                    ((uint16_t *)V)[ve] = f32_to_bf16(vv);
                } else {
                    ((float *)K)[ke] = kv;
                    ((float *)V)[ve] = vv;
                }
            }
    }
    float *q = (float *)malloc(sizeof(float) * R * nh * hs * 2), *o = q + R * nh * hs;
    for (int64_t r = 0; r < R; r++)
        for (int64_t h = 0; h < nh; h++)
            for (int64_t d = 0; d < hs; d++)
                q[(r * nh + h) * hs + d] = load1(Qn, r * q_row + h * q_head + d, (int)new_bf16);
    paged_decode(q, K, V, tables, first, last, o, R, nh, nkv, hs, bs, width, scale, (int)pool_bf16);
    for (int64_t i = 0; i < R * nh * hs; i++) {
        if (new_bf16) ((uint16_t *)Out)[i] = f32_to_bf16(o[i]);
        else ((float *)Out)[i] = o[i];
    }
    free(q);
}
