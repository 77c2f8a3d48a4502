/* y (M, N) = x (M, K) @ w (N, K).T [* scales] + bias for the few rows of a decode step (M <= 8), compiled on the
   machine that runs it (gpt2/native.py) with -march=native.

   Decoding reads every weight once per step, so its products are bound by memory: each weight row is widened
   to float32 in registers (bfloat16 by a shift, int8 by a conversion; x stays float32, so the product is exact
   up to float32 sums), used for all of x's rows while it is there, and the rows a few ahead are prefetched:
   without that, the hardware prefetcher restarts at every 4 KB page and a weight streams at half the speed.
   The output rows are split between the threads of torch's own OpenMP pool. */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && defined(ROWS_I8)
#include <immintrin.h> /* a sixth of a second to compile */
#endif

/* A tile is R weight rows by XROWS rows of x, or WIDE_ROWS by WIDE_XROWS where x has that many rows (a decode
   step of 8 prompts reads each weight once): their accumulators must fit the registers (32 with AVX-512). */
#if defined(__AVX512F__)
#define VBYTES 64
#define XROWS 4
#define WIDE_ROWS 2
#define WIDE_XROWS 8
#else
#define VBYTES 32
#define XROWS 2
#define WIDE_ROWS 1
#define WIDE_XROWS 8
#endif
#define VL (VBYTES / 4) /* floats per vector */
#define R 4             /* weight rows per tile */
#define AHEAD 4         /* weight rows prefetched ahead */

typedef float vf __attribute__((vector_size(VBYTES), aligned(4)));
typedef uint32_t vu __attribute__((vector_size(VBYTES), aligned(4)));
typedef uint16_t vbf __attribute__((vector_size(VBYTES / 2), aligned(2)));

static inline float bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float f32(float v) { return v; }
static inline float i8(int8_t v) { return (float)v; }
static inline vf load_f32(const float *p) { return *(const vf *)p; }
static inline vf load_bf16(const uint16_t *p) { return (vf)(__builtin_convertvector(*(const vbf *)p, vu) << 16); }
/* GCC 12 does not vectorise an int8 -> float convertvector. */
#if defined(__AVX512F__) && defined(ROWS_I8)
static inline vf load_i8(const int8_t *p) {
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__) && defined(ROWS_I8)
static inline vf load_i8(const int8_t *p) {
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#else
static inline vf load_i8(const int8_t *p) { vf v; for (int i = 0; i < VL; i++) v[i] = p[i]; return v; }
#endif
static inline float sum(vf v) { float s = 0; for (int i = 0; i < VL; i++) s += v[i]; return s; }

/* y[m + j, n + r] for r < rows, j < xrows (constants where inlined, so the accumulators stay in registers). A
   weight row is prefetched once per cache line, AHEAD rows ahead. */
#define TILE(NAME, W, LOAD, WIDEN)                                                                                \
    static inline __attribute__((always_inline)) void NAME(const float *x, const W *w, float *y, int64_t K,        \
                                                           int64_t N, int64_t n, int64_t m, const int rows,        \
                                                           const int xrows) {                                      \
        enum { LINE = 64 / sizeof(W) }; /* weights per cache line, a multiple of VL */                             \
        vf acc[R][WIDE_XROWS] = {0};                                                                               \
        int64_t k = 0;                                                                                             \
        for (; k + LINE <= K; k += LINE) {                                                                         \
            for (int r = 0; r < rows; r++) __builtin_prefetch(w + (n + r + AHEAD) * K + k, 0, 3);                  \
            for (int v = 0; v < LINE; v += VL) {                                                                   \
                vf wv[R];                                                                                          \
                for (int r = 0; r < rows; r++) wv[r] = LOAD(w + (n + r) * K + k + v);                              \
                for (int j = 0; j < xrows; j++) {                                                                  \
                    vf xv = load_f32(x + (m + j) * K + k + v);                                                     \
                    for (int r = 0; r < rows; r++) acc[r][j] += wv[r] * xv;                                        \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
        for (int r = 0; r < rows; r++)                                                                             \
            for (int j = 0; j < xrows; j++) {                                                                      \
                float s = sum(acc[r][j]);                                                                          \
                for (int64_t t = k; t < K; t++) s += x[(m + j) * K + t] * WIDEN(w[(n + r) * K + t]);               \
                y[(m + j) * N + n + r] = s;                                                                        \
            }                                                                                                      \
    }


/* The product of a weight of type W, its bias of type B (NULL: none) and, for int8, bfloat16 row scales. */
#define ROWS(NAME, TILE_FN, W, B, WIDEN_BIAS, SCALED)                                                              \
    void NAME(const float *x, const W *w, const uint16_t *scales, const B *bias, float *y, int64_t M, int64_t K,   \
              int64_t N, int threads) {                                                                            \
        int64_t tiles = (N + R - 1) / R;                                                                           \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                         \
        for (int64_t t = 0; t < tiles; t++) {                                                                      \
            int64_t n = t * R, m = 0;                                                                              \
            if (n + R <= N) {                                                                                      \
                for (; m + WIDE_XROWS <= M; m += WIDE_XROWS)                                                       \
                    for (int r = 0; r < R; r += WIDE_ROWS) TILE_FN(x, w, y, K, N, n + r, m, WIDE_ROWS, WIDE_XROWS);\
                for (; m + XROWS <= M; m += XROWS) TILE_FN(x, w, y, K, N, n, m, R, XROWS);                         \
                for (; m + 2 <= M; m += 2) TILE_FN(x, w, y, K, N, n, m, R, 2);                                     \
                for (; m < M; m++) TILE_FN(x, w, y, K, N, n, m, R, 1);                                             \
            } else {                                                                                               \
                for (; n < N; n++)                                                                                 \
                    for (m = 0; m < M; m++) TILE_FN(x, w, y, K, N, n, m, 1, 1);                                    \
            }                                                                                                      \
            for (n = t * R; n < t * R + R && n < N; n++)                                                           \
                for (m = 0; m < M; m++) {                                                                          \
                    float *out = y + m * N + n;                                                                    \
                    if (SCALED) *out *= bf16(scales[n]);                                                           \
                    if (bias) *out += WIDEN_BIAS(bias[n]);                                                         \
                }                                                                                                  \
        }                                                                                                          \
    }

/* One weight type per build (-DROWS_F32, -DROWS_BF16 or -DROWS_I8): a build takes a third of the time of all. */
#if defined(ROWS_F32)
TILE(tile_f32, float, load_f32, f32)
ROWS(rows_f32, tile_f32, float, float, f32, 0)
#elif defined(ROWS_BF16)
TILE(tile_bf16, uint16_t, load_bf16, bf16)
ROWS(rows_bf16, tile_bf16, uint16_t, uint16_t, bf16, 0)
#elif defined(ROWS_I8)
TILE(tile_i8, int8_t, load_i8, i8)
ROWS(rows_i8, tile_i8, int8_t, uint16_t, bf16, 1)
#endif
