/* The vector vocabulary the kernels share, for the instruction set they are built for (build.py):
 * `vec` is 16 fp32 lanes under AVX-512, 8 under AVX2. Loads take a count n of elements still left in the row:
 * AVX-512 reads a tail shorter than a vector with a masked load (the missing lanes are zero), AVX2 callers
 * stop at the last whole vector and add the rest one element at a time (HAS_MASKED_TAIL says which). */
#ifndef GPTLAB_SIMD_H
#define GPTLAB_SIMD_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* a bf16 (the upper half of an fp32) as the fp32 it stands for */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* for the small functions of the hot loops: inlined where their constant arguments (counts, dtypes) are known */
#define INLINE static inline __attribute__((always_inline))

/* an fp32 rounded to the nearest bf16, ties to even (as torch's .bfloat16()); NaN stays NaN */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* element i of a row of fp32 (bf16 = 0) or bf16 (bf16 = 1) values */
static inline float load1(const void *w, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

#if defined(__AVX512F__)
#define LANES 16
#define HAS_MASKED_TAIL 1
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vset1(float a) { return _mm512_set1_ps(a); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
static inline __mmask16 mask16(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}
/* 16 fp32 from x + i, the first n of them */
static inline vec loadx(const float *x, int64_t i, int64_t n) {
    return n >= LANES ? _mm512_loadu_ps(x + i) : _mm512_maskz_loadu_ps(mask16(n), x + i);
}
static inline void storex(float *x, int64_t i, int64_t n, vec v) {
    if (n >= LANES) _mm512_storeu_ps(x + i, v);
    else _mm512_mask_storeu_ps(x + i, mask16(n), v);
}
/* 16 weights from element i of row w (fp32, or bf16 widened to fp32), the first n of them */
static inline vec loadw(const void *w, int64_t i, int bf16, int64_t n) {
    if (!bf16) return loadx((const float *)w, i, n);
    __m256i h = n >= LANES ? _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i))
                           : _mm256_maskz_loadu_epi16(mask16(n), (const uint16_t *)w + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#else
#define LANES 8
#define HAS_MASKED_TAIL 0
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vset1(float a) { return _mm256_set1_ps(a); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vec loadx(const float *x, int64_t i, int64_t n) { (void)n; return _mm256_loadu_ps(x + i); }
static inline void storex(float *x, int64_t i, int64_t n, vec v) { (void)n; _mm256_storeu_ps(x + i, v); }
static inline vec loadw(const void *w, int64_t i, int bf16, int64_t n) {
    (void)n;
    if (!bf16) return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

/* sum + the first n lanes of p (all of them when n >= LANES) */
static inline vec vadd_first(vec sum, vec p, int64_t n) {
#if defined(__AVX512F__)
    return _mm512_mask_add_ps(sum, mask16(n), sum, p);
#else
    (void)n;
    return _mm256_add_ps(sum, p);
#endif
}

/* where a vector loop over n elements stops: n itself with masked tails, else the last whole vector */
static inline int64_t vec_end(int64_t n) { return HAS_MASKED_TAIL ? n : n - n % LANES; }

/* which build this is (build.py's level; the tests check the loaded library is the one dispatch chose) */
static inline const char *isa_name(void) {
#if defined(__AVX512BF16__)
    return "avx512_bf16";
#elif defined(__AVX512VNNI__)
    return "avx512_vnni";
#elif defined(__AVX512F__)
    return "avx512";
#else
    return "avx2";
#endif
}

#endif
