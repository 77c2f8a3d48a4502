/* The few rows of a decode step (up to 8 prompts), compiled on the machine that runs it (gpt2/native.py) with
   -march=native: the products y = x @ w.T [* scales] + bias, and the whole stack of blocks in one call.

   Decoding reads every weight once per step, so its products are bound by memory: each weight row is widened
   to float32 in registers (bfloat16 by a shift, int8 by a conversion; x stays float32, so the product is exact
   up to float32 sums), used for all of x's rows while it is there, and the rows a few ahead are prefetched:
   without that, the hardware prefetcher restarts at every 4 KB page and a weight streams at half the speed.
   The output rows are split between the threads of torch's own OpenMP pool.

   Around the products a step does little arithmetic (layer norms, a few keys of attention, gelu) but, as
   torch ops, about 200 calls with Python between them: as long as a bfloat16 step's products. decode_step
   runs them all, and the LM head, in one parallel region, each op split between the threads and a barrier
   after it. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && (defined(ROWS_I8) || defined(__AVX512F__) || defined(__FMA__))
#include <immintrin.h> /* a sixth of a second to compile */
#endif

/* x is taken XROWS rows at a time (a decode step of up to 8 prompts reads each weight once), against R weight rows
   at once, in tiles of as many of them as ACC accumulators (half the vector registers) and the registers for a
   line of each weight row (NV vectors) allow. */
#if defined(__AVX512F__)
#define VBYTES 64
#define ACC 16
#else
#define VBYTES 32
#define ACC 8
#endif
#define XROWS 8
#define R 4             /* weight rows per tile */
#define FITS(rows, xrows) ((rows) * (xrows) <= ACC && (NV <= 2 || (rows) * ((xrows) + NV) + 2 <= 2 * ACC))
#define TILE_ROWS(xrows) (FITS(4, xrows) ? 4 : FITS(2, xrows) ? 2 : 1)
#define VL (VBYTES / 4) /* floats per vector */
#define AHEAD 4         /* weight rows prefetched ahead (the tiles) */
#define STREAM_AHEAD 4096 /* bytes prefetched ahead (streamed_dot) */

typedef float vf __attribute__((vector_size(VBYTES), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VBYTES), aligned(4)));
typedef uint32_t vu __attribute__((vector_size(VBYTES), aligned(4)));
typedef uint16_t vbf __attribute__((vector_size(VBYTES / 2), aligned(2)));

static inline float bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float f32(float v) { return v; }
static inline float i8(int8_t v) { return (float)v; }
static inline vf load_f32(const float *p) { return *(const vf *)p; }
static inline void store_f32(float *p, vf v) { *(vf *)p = v; }
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
static inline vf splat(float v) { return (vf){0} + v; }
/* a * b + c rounded once, in every product kernel alike, whatever the compiler would contract (GCC's Zen tuning
   keeps 256-bit reductions as a multiply and an add): a row's sum is then the same bits in a step of any rows,
   through the tiles or streamed_dot. */
static inline vf fma_v(vf a, vf b, vf c) {
#if defined(__x86_64__) && defined(__AVX512F__)
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__x86_64__) && defined(__FMA__) && VBYTES == 32
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    vf r;
    for (int i = 0; i < VL; i++) r[i] = __builtin_fmaf(a[i], b[i], c[i]);
    return r;
#endif
}
static inline vf pick(vi mask, vf yes, vf no) { return (vf)((mask & (vi)yes) | (~mask & (vi)no)); }
/* The sum of v's lanes, in a tree: the attention's dot products, and every product kernel's rows alike (lane by lane,
   the 16 sums that end a tile of 8 rows are 240 dependent adds, against 768 multiply-adds for a 768-long row). */
static inline float tree_sum(vf v) {
#if defined(__x86_64__) && defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#elif defined(__x86_64__) && defined(__FMA__) && VBYTES == 32
    __m128 half = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
#else
    float s = 0;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
#endif
}

/* e**x, within 2 ulp (Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2, a polynomial in r times 2**n); x is
   clamped to [-87, 88], where 2**n is a normal float. */
static inline vf exp_v(vf x) {
    x = pick(x > splat(88.0f), splat(88.0f), x);
    x = pick(x < splat(-87.0f), splat(-87.0f), x);
    vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* rounded to the nearest integer */
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    return p * (vf)((__builtin_convertvector(n, vi) + 127) << 23);
}
static inline float exp_1(float x) { return exp_v(splat(x))[0]; }

/* ---------------------------------------------------------------------------------------------- products */

#if defined(ROWS_F32)
typedef float W;
typedef float BIAS;
#define LOAD load_f32
#define WIDEN f32
#define WIDEN_BIAS f32
#define SCALED 0
#define ROWS rows_f32
#elif defined(ROWS_BF16)
typedef uint16_t W;
typedef uint16_t BIAS;
#define LOAD load_bf16
#define WIDEN bf16
#define WIDEN_BIAS bf16
#define SCALED 0
#define ROWS rows_bf16
#elif defined(ROWS_I8)
typedef int8_t W;
typedef uint16_t BIAS;
#define LOAD load_i8
#define WIDEN i8
#define WIDEN_BIAS bf16
#define SCALED 1
#define ROWS rows_i8
#else
#error "build with one of -DROWS_F32, -DROWS_BF16, -DROWS_I8"
#endif
#define LINE (64 / (int)sizeof(W)) /* weights per cache line, a multiple of VL */
#define NV (LINE / VL)             /* vectors per cache line */

/* acc + x . w over one cache line of a weight row (its NV vectors, widened, in wv; x's in xv), as every product
   kernel sums a row's lines: a line of up to 2 vectors in fused multiply-adds into acc, in turn; a longer one (int8,
   and bfloat16 with AVX2) summed on its own and then added, so that a row's sum waits on one add per line instead of
   a chain of NV multiply-adds (an int8 row, hot in the core's cache, read at 38 GB/s with its 4 in a chain, 56
   without). Lines of 2 keep the chain: the line's own sum took a third more arithmetic, and a bfloat16 step of
   8 rows, bound by it, read at 17 GB/s instead of 24. */
static inline vf line_fma(const vf *wv, const vf *xv, vf acc) {
    if (NV <= 2) {
        for (int v = 0; v < NV; v++) acc = fma_v(wv[v], xv[v], acc);
        return acc;
    }
    vf part = wv[0] * xv[0];
    for (int v = 1; v < NV; v++) part = fma_v(wv[v], xv[v], part);
    return acc + part;
}

/* v, kept in a register where `pin`: left to itself, GCC folds the load of each vector of x into every
   multiply-add that uses it, once per weight row of a tile, and the loads, not the arithmetic, bound the tile
   (float32 steps of 8 rows ran 1.09x as fast, bfloat16 1.17x, on a Zen 4 EPYC). Only with AVX-512's 32
   registers, where the tile's accumulators and the vectors it holds leave a few free (PINNED): with AVX2's
   16, pinned x vectors spilled the others (tiles of 4 rows ran at 0.7-0.9x). */
#define PINNED(rows, xrows) (ACC == 16 && (rows) * (xrows) + ((rows) + 1) * NV <= 2 * ACC - 4)
static inline vf pinned(vf v, const int pin) {
#if defined(__x86_64__)
    if (pin) __asm__("" : "+v"(v));
#endif
    return v;
}

/* One weight (N, K) and what its product adds: int8's bfloat16 row scales, the bias (NULL: none), and int8's
   outlier input dimensions (gpt2.quantize), whose weight columns (N, n_outliers) stay float32. */
struct product {
    const W *weight;
    const uint16_t *scales;
    const BIAS *bias;
    const int64_t *outliers;
    const float *columns;
    int64_t n_outliers;
    int64_t stream; /* one x row: weight rows in turn (streamed_dot), else R at a time (the tiles) */
};

/* out[j * R + r] = x[m + j] . w[n + r] for r < rows, j < xrows. A weight row is prefetched once per cache line, AHEAD
   rows ahead, into L2 only (on a Zen 4 EPYC, float32 steps of 4 and 8 rows ran 1.5x and 1.3x as fast as with
   prefetches into L1). A function of its own per shape, with its accumulators an array of that size: only so does
   GCC 12 keep them, the rows' pointers and the weights in registers (inlined into `product`, or with the shape as
   arguments, it reloaded pointers or accumulators from the stack in the loop; a function per shape ran steps of 8
   rows 1.06-1.10x as fast). */
#define DEFINE_TILE(name, ROWS_, XROWS_)                                                                            \
    static __attribute__((noinline)) void name(const float *x, const W *w, float *out, int64_t K, int64_t n,      \
                                               int64_t m) {                                                       \
        enum { rows = ROWS_, xrows = XROWS_ };                                                                     \
        vf acc[rows][xrows] = {0};                                                                                 \
        const W *wr = w + n * K;                                                                                   \
        const float *xr = x + m * K;                                                                               \
        int64_t k = 0;                                                                                             \
        for (; k + LINE <= K; k += LINE) {                                                                         \
            for (int r = 0; r < rows; r++) __builtin_prefetch(wr + (r + AHEAD) * K + k, 0, 2);                     \
            if (NV <= 2 && !PINNED(rows, xrows)) { /* line_fma's chain a vector at a time: fewer registers */   \
                for (int v = 0; v < NV; v++) {                                                                     \
                    vf wv[rows];                                                                                   \
                    for (int r = 0; r < rows; r++) wv[r] = LOAD(wr + r * K + k + v * VL);                          \
                    for (int j = 0; j < xrows; j++) {                                                              \
                        vf xv = load_f32(xr + j * K + k + v * VL);                                                 \
                        for (int r = 0; r < rows; r++) acc[r][j] = fma_v(wv[r], xv, acc[r][j]);                    \
                    }                                                                                              \
                }                                                                                                  \
                continue;                                                                                          \
            }                                                                                                      \
            vf wv[rows][NV];                                                                                       \
            for (int r = 0; r < rows; r++)                                                                         \
                for (int v = 0; v < NV; v++) wv[r][v] = LOAD(wr + r * K + k + v * VL);                             \
            for (int j = 0; j < xrows; j++) {                                                                      \
                vf xv[NV];                                                                                         \
                for (int v = 0; v < NV; v++)                                                                       \
                    xv[v] = pinned(load_f32(xr + j * K + k + v * VL), PINNED(rows, xrows));                        \
                for (int r = 0; r < rows; r++) acc[r][j] = line_fma(wv[r], xv, acc[r][j]);                        \
            }                                                                                                      \
        }                                                                                                          \
        for (int r = 0; r < rows; r++)                                                                             \
            for (int j = 0; j < xrows; j++) {                                                                      \
                float s = tree_sum(acc[r][j]);                                                                     \
                for (int64_t t = k; t < K; t++) s = __builtin_fmaf(xr[j * K + t], WIDEN(wr[r * K + t]), s);       \
                out[j * R + r] = s;                                                                                \
            }                                                                                                      \
    }
DEFINE_TILE(tile_1, TILE_ROWS(1), 1)
DEFINE_TILE(tile_2, TILE_ROWS(2), 2)
DEFINE_TILE(tile_3, TILE_ROWS(3), 3)
DEFINE_TILE(tile_4, TILE_ROWS(4), 4)
DEFINE_TILE(tile_5, TILE_ROWS(5), 5)
DEFINE_TILE(tile_6, TILE_ROWS(6), 6)
DEFINE_TILE(tile_7, TILE_ROWS(7), 7)
DEFINE_TILE(tile_8, TILE_ROWS(8), 8)
DEFINE_TILE(tile_row, 1, 1) /* a weight row and an x row: the last tile's rows, where N is not a multiple of R */
#undef DEFINE_TILE

/* x . w over K, summed as the tiles sum a row (one accumulator, line_fma a cache line at a time, then the tail), so
   that a row's result is the same bits whatever the rows of its step; but one weight row after another, the line
   STREAM_AHEAD bytes ahead prefetched into L2, so that a thread whose weight rows follow each other in memory reads
   one linear stream (the rows' sums overlap out of order; on a Zen 4 EPYC, 2 KB ahead into L1 ran whole steps at
   0.8-0.9x).
   Which of this and the tiles streams faster from memory depends on the CPU's prefetchers (gpt2.kernels has a
   candidate of each). */
static inline float streamed_dot(const float *x, const W *w, int64_t K) {
    vf acc = {0};
    int64_t k = 0;
    for (; k + LINE <= K; k += LINE) {
        __builtin_prefetch((const char *)(w + k) + STREAM_AHEAD, 0, 2);
        vf wv[NV], xv[NV];
        for (int v = 0; v < NV; v++) wv[v] = LOAD(w + k + v * VL), xv[v] = load_f32(x + k + v * VL);
        acc = line_fma(wv, xv, acc);
    }
    float s = tree_sum(acc);
    for (; k < K; k++) s = __builtin_fmaf(x[k], WIDEN(w[k]), s);
    return s;
}

/* y (M, N) = x (M, K) @ w.T [* scales] + bias [+ the outliers' product], or y += that where `add` (the residual
   stream). The tiles of R weight rows are split between the threads of the enclosing parallel region. */
static void product(const struct product *p, const float *x, float *y, int64_t M, int64_t K, int64_t N, int add) {
    const W *w = p->weight;
    int64_t tiles = (N + R - 1) / R;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        int64_t n0 = t * R;
        int rows = N - n0 < R ? (int)(N - n0) : R;
        for (int64_t m0 = 0; m0 < M; m0 += XROWS) {
            int64_t end = m0 + XROWS < M ? m0 + XROWS : M, m;
            float out[XROWS * R];
            if (p->stream && end - m0 == 1) {
                for (int r = 0; r < rows; r++) out[r] = streamed_dot(x + m0 * K, w + (n0 + r) * K, K);
            } else if (rows == R) {
                switch (end - m0) { /* a tile shape per row count, whose loops the compiler unrolls */
#define TILES(xrows)                                                                                               \
    case xrows:                                                                                                    \
        for (int r = 0; r < R; r += TILE_ROWS(xrows)) tile_##xrows(x, w, out + r, K, n0 + r, m0);                 \
        break;
                    TILES(1) TILES(2) TILES(3) TILES(4) TILES(5) TILES(6) TILES(7) TILES(8)
#undef TILES
                }
            } else {
                for (int r = 0; r < rows; r++)
                    for (m = m0; m < end; m++) tile_row(x, w, out + (m - m0) * R + r, K, n0 + r, m);
            }
            for (m = m0; m < end; m++)
                for (int r = 0; r < rows; r++) {
                    int64_t n = n0 + r;
                    float v = out[(m - m0) * R + r];
                    if (SCALED) v *= bf16(p->scales[n]);
                    if (p->bias) v += WIDEN_BIAS(p->bias[n]);
                    for (int64_t j = 0; j < p->n_outliers; j++)
                        v += x[m * K + p->outliers[j]] * p->columns[n * p->n_outliers + j];
                    if (add)
                        y[m * N + n] += v;
                    else
                        y[m * N + n] = v;
                }
        }
    }
}

/* The product alone (gpt2.native.rows_product): bias and scales may be NULL, outliers as in struct product. */
void ROWS(const float *x, const W *w, const uint16_t *scales, const BIAS *bias, const int64_t *outliers,
          const float *columns, int64_t n_outliers, int64_t stream, float *y, int64_t M, int64_t K, int64_t N,
          int threads) {
    struct product p = {w, scales, bias, outliers, columns, n_outliers, stream};
#pragma omp parallel num_threads(threads)
    product(&p, x, y, M, K, N, 0);
}

/* ------------------------------------------------------------------------------------------ the blocks */

/* One block's parameters (the layer norms' float32) and its KV cache (M, n_head, slots, head_dim) float32. */
struct block {
    const float *ln_1_weight, *ln_1_bias, *ln_2_weight, *ln_2_bias;
    struct product c_attn, attn_proj, c_fc, mlp_proj;
    float *k, *v;
};

/* The shapes of a step, and for each of its M rows the cache slot its token goes to and the slots it attends
   to (keys[m * slots ...], n_keys[m] of them). */
struct step {
    int64_t M, C, n_head, slots;
    float eps;
    const int64_t *slot;
    const int32_t *keys, *n_keys;
};

static void layer_norm(const struct step *s, const float *x, const float *weight, const float *bias, float *y) {
    int64_t C = s->C;
#pragma omp for schedule(static)
    for (int64_t m = 0; m < s->M; m++) {
        const float *row = x + m * C;
        float mean = 0, var = 0;
        for (int64_t c = 0; c < C; c++) mean += row[c];
        mean /= C;
        for (int64_t c = 0; c < C; c++) var += (row[c] - mean) * (row[c] - mean);
        float rstd = 1.0f / sqrtf(var / C + s->eps);
        for (int64_t c = 0; c < C; c++) y[m * C + c] = (row[c] - mean) * rstd * weight[c] + bias[c];
    }
}

/* gelu with tanh, 0.5 x (1 + tanh(u)), as x - x / (e**2u + 1). */
static void gelu(float *x, int64_t n) {
    const float a = 2 * 0.7978845608028654f, b = 2 * 0.7978845608028654f * 0.044715f;
    int64_t vectors = n / VL;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < vectors; i++) {
        vf v = load_f32(x + i * VL);
        store_f32(x + i * VL, v - v / (exp_v(v * (a + b * v * v)) + 1.0f));
    }
#pragma omp single
    for (int64_t i = vectors * VL; i < n; i++) x[i] -= x[i] / (exp_1(x[i] * (a + b * x[i] * x[i])) + 1.0f);
}

static float dot(const float *a, const float *b, int64_t n) {
    vf acc = {0};
    int64_t i = 0;
    for (; i + VL <= n; i += VL) acc += load_f32(a + i) * load_f32(b + i);
    float s = tree_sum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* For each row and head: its new key and value into the cache, then softmax(q . keys / sqrt(head_dim)) over the
   row's slots times their values, into y (M, C). scores: M * n_head * slots floats. */
static void attention(const struct step *s, const float *qkv, float *kc, float *vc, float *y, float *scores) {
    int64_t C = s->C, D = C / s->n_head, S = s->slots;
    float scale = 1.0f / sqrtf((float)D);
#pragma omp for schedule(static)
    for (int64_t mh = 0; mh < s->M * s->n_head; mh++) {
        int64_t m = mh / s->n_head, h = mh % s->n_head, n = s->n_keys[m];
        const float *q = qkv + m * 3 * C + h * D;
        float *k = kc + mh * S * D, *v = vc + mh * S * D, *score = scores + mh * S, *out = y + m * C + h * D;
        const int32_t *keys = s->keys + m * S;
        memcpy(k + s->slot[m] * D, q + C, D * sizeof(float));
        memcpy(v + s->slot[m] * D, q + 2 * C, D * sizeof(float));
        float top = -INFINITY, total = 0;
        for (int64_t i = 0; i < n; i++) {
            score[i] = dot(q, k + keys[i] * D, D) * scale;
            top = score[i] > top ? score[i] : top;
        }
        int64_t i = 0;
        for (; i + VL <= n; i += VL) store_f32(score + i, exp_v(load_f32(score + i) - top));
        for (; i < n; i++) score[i] = exp_1(score[i] - top);
        for (i = 0; i < n; i++) total += score[i];
        if (D % VL == 0 && D <= 8 * VL) { /* the output in registers */
            vf o[8] = {0};
            for (i = 0; i < n; i++) {
                const float *value = v + keys[i] * D, p = score[i] / total;
                for (int64_t c = 0; c < D / VL; c++) o[c] += p * load_f32(value + c * VL);
            }
            for (int64_t c = 0; c < D / VL; c++) store_f32(out + c * VL, o[c]);
            continue;
        }
        for (int64_t d = 0; d < D; d++) out[d] = 0;
        for (i = 0; i < n; i++) {
            const float *value = v + keys[i] * D, p = score[i] / total;
            for (int64_t d = 0; d < D; d++) out[d] += p * value[d];
        }
    }
}

/* The tables a step's input comes from: x[m] = wte[idx[m]] + wpe[position[m]], a bfloat16 token row widened to
   float32 as torch adds it to a float32 position row. */
struct embeddings {
    const void *wte; /* (n_tokens, C), float32 or bfloat16 (wte_bf16) */
    int64_t wte_bf16, n_tokens;
    const float *wpe; /* (n_positions, C) */
    int64_t n_positions;
};

/* ------------------------------------------------------------------------------------------------ the draw */

/* gpt2.sample's draw after a step, in two passes where torch takes a dozen ops: before its softmax, the logits
   over the temperature with all but each row's top k set to -inf; after it, torch.multinomial(probs, 1) from
   torch's CPU generator, the same token and the same generator state as torch's (the caller checks that once
   per process against torch itself). decode_step draws with the same code between the steps it runs ahead,
   from weights of its own in place of torch's softmax (draw_step). */

static inline int any(vi mask) {
    int32_t lanes[VL];
    memcpy(lanes, &mask, sizeof lanes);
    int32_t set = 0;
    for (int i = 0; i < VL; i++) set |= lanes[i];
    return set != 0;
}

static void sift_down(float *heap, int64_t k, int64_t i) {
    for (;;) {
        int64_t least = i, left = 2 * i + 1, right = left + 1;
        if (left < k && heap[left] < heap[least]) least = left;
        if (right < k && heap[right] < heap[least]) least = right;
        if (least == i) return;
        float t = heap[i];
        heap[i] = heap[least], heap[least] = t, i = least;
    }
}

/* y (V,) = logits / temperature, with the entries below the k-th largest set to -inf (k < 1 or k >= V: none), as
   torch computes `masked_fill(scaled < topk(scaled, k).values[..., -1:], -inf)`; heap: k floats; the largest
   into *top_out where it is not NULL. Returns 0, or 1 where the largest is not finite (NaN or inf: the caller takes
   the greedy choice). */
static int filter_row(const float *in, int64_t V, float temperature, int64_t k, float *heap, float *out,
                      float *top_out) {
    vf top = splat(-INFINITY);
    vi nan = {0};
    int64_t i = 0;
    for (; i + VL <= V; i += VL) {
        vf v = load_f32(in + i) / temperature;
        store_f32(out + i, v);
        nan |= v != v;
        top = pick(v > top, v, top);
    }
    float largest = -INFINITY;
    for (int l = 0; l < VL; l++) largest = top[l] > largest ? top[l] : largest;
    for (; i < V; i++) {
        out[i] = in[i] / temperature;
        nan[0] |= out[i] != out[i];
        largest = out[i] > largest ? out[i] : largest;
    }
    if (any(nan) || !isfinite(largest)) return 1;
    if (top_out) *top_out = largest;
    if (k < 1 || k >= V) return 0;
    /* the k largest in a min-heap, whose root is then the k-th largest */
    memcpy(heap, out, k * sizeof(float));
    for (i = k / 2; i-- > 0;) sift_down(heap, k, i);
    for (i = k; i < V && i % VL; i++)
        if (out[i] > heap[0]) heap[0] = out[i], sift_down(heap, k, 0);
    for (; i + VL <= V; i += VL)
        if (any(load_f32(out + i) > heap[0]))
            for (int l = 0; l < VL; l++)
                if (out[i + l] > heap[0]) heap[0] = out[i + l], sift_down(heap, k, 0);
    for (; i < V; i++)
        if (out[i] > heap[0]) heap[0] = out[i], sift_down(heap, k, 0);
    vf kth = splat(heap[0]), none = splat(-INFINITY);
    for (i = 0; i + VL <= V; i += VL) {
        vf v = load_f32(out + i);
        store_f32(out + i, pick(v < kth, none, v));
    }
    for (; i < V; i++) out[i] = out[i] < heap[0] ? -INFINITY : out[i];
    return 0;
}

/* filter_row for each row of logits (B, V) into y (B, V). Returns 0; 1 where a row's largest is not finite; -1
   where memory runs out. */
int top_k_filter(const float *logits, int64_t B, int64_t V, float temperature, int64_t k, float *y) {
    float *heap = k > 0 && k < V ? malloc(k * sizeof(float)) : NULL;
    if (k > 0 && k < V && !heap) return -1;
    int status = 0;
    for (int64_t b = 0; b < B && status == 0; b++) status = filter_row(logits + b * V, V, temperature, k, heap, y + b * V, NULL);
    free(heap);
    return status;
}

/* torch's mt19937 (ATen/core/MT19937RNGEngine.h) and the layout of its CPU generator's get_state(): `left` (int32)
   at byte 8, `next` (uint64) at 16, the 624 state words (as uint64) from 24, 5056 bytes in all. */
#define MT_N 624
#define MT_M 397
#define STATE_BYTES 5056

static inline uint32_t mt_twist(uint32_t u, uint32_t v) {
    return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ (v & 1 ? 0x9908b0dfu : 0);
}

static void mt_next_state(uint32_t *s) {
    int i = 0;
    for (; i < MT_N - MT_M; i++) s[i] = s[i + MT_M] ^ mt_twist(s[i], s[i + 1]);
    for (; i < MT_N - 1; i++) s[i] = s[i + MT_M - MT_N] ^ mt_twist(s[i], s[i + 1]);
    s[MT_N - 1] = s[MT_M - 1] ^ mt_twist(s[MT_N - 1], s[0]);
}

static inline uint32_t mt_temper(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

/* Entry e of probs (B, V) as a candidate: its ratio p / q, where q = -log1p(-u) rounded to float and u = the low 53
   bits of (hi << 32 | lo) / 2**53 (torch's exponential_, two words of the generator for every entry), and the
   row's token where the ratio is its first maximum (torch's argmax of probs / q); second[row]: the row's next
   largest ratio. Returns 0, or 1 where p is not a probability torch accepts. */
static int candidate(const float *probs, int64_t e, int64_t V, uint32_t hi, uint32_t lo, float *best, float *second,
                     int64_t *tokens) {
    float p = probs[e];
    if (!(p > 0) || isinf(p)) return 1;
    int64_t row = e / V;
    uint64_t bits = (uint64_t)(mt_temper(hi) & 0x1fffffu) << 32 | mt_temper(lo);
    float q = (float)-log1p(-(double)bits * 0x1p-53);
    float ratio = p / q;
    if (ratio > best[row]) second[row] = best[row], best[row] = ratio, tokens[row] = e % V;
    else if (ratio > second[row]) second[row] = ratio;
    return 0;
}

/* tokens (B,) = torch.multinomial(probs (B, V), 1) from the generator whose get_state() bytes `state` holds,
   advanced in place as torch advances it. Only the nonzero entries can win, so the generator's words are
   tempered there only. With margin > 0, probs are weights within a relative `margin` of torch's probabilities
   times a factor per row, and each row's best ratio must beat its runner-up by more than they can move. Returns
   0; or 1, `state` untouched, where torch must draw instead: another state layout, a row without a candidate, a
   probability torch refuses, a zero word (which could make u 0), a row too close to a tie; -1 where memory runs
   out. */
static int draw_walk(const float *probs, int64_t B, int64_t V, uint8_t *state, int64_t state_bytes, int64_t *tokens,
                     float margin) {
    int32_t left;
    uint64_t next;
    uint32_t s[MT_N], pending_hi = 0;
    if (state_bytes != STATE_BYTES) return 1;
    memcpy(&left, state + 8, 4), memcpy(&next, state + 16, 8);
    if (left < 1 || left > MT_N || next + left - 1 > MT_N) return 1;
    for (int i = 0; i < MT_N; i++) {
        uint64_t word;
        memcpy(&word, state + 24 + 8 * i, 8);
        s[i] = (uint32_t)word;
    }
    float *best = malloc(2 * B * sizeof(float)), *second = best + B;
    if (!best) return -1;
    int status = 0;
    int64_t n = B * V, pos = (int64_t)next, avail = left - 1, word = 0, pending = -1;
    for (int64_t b = 0; b < B; b++) tokens[b] = -1, best[b] = second[b] = -1;
    /* Entry e takes words 2e (hi) and 2e + 1 (lo) of the stream, which s[pos...] holds for a run of `avail`. */
    while (word < 2 * n && status == 0) {
        if (avail == 0) mt_next_state(s), pos = 0, avail = MT_N;
        int64_t run = avail < 2 * n - word ? avail : 2 * n - word, zero = 0;
        for (int64_t i = pos; i < pos + run; i++) zero |= s[i] == 0;
        if (zero) {
            status = 1;
            break;
        }
#define WORD(o) s[pos + (o) - word] /* word o of the stream, within this run */
        if (pending >= 0) status = candidate(probs, pending, V, pending_hi, WORD(word), best, second, tokens);
        pending = -1;
        int64_t e = (word + 1) / 2, end = (word + run) / 2; /* the entries with both words in this run */
        for (; e < end && status == 0; e++) {
            if (e + VL <= end && !any(load_f32(probs + e) != splat(0))) { /* VL entries without a candidate */
                e += VL - 1;
                continue;
            }
            if (probs[e] != 0) status = candidate(probs, e, V, WORD(2 * e), WORD(2 * e + 1), best, second, tokens);
        }
        if ((word + run) % 2 && probs[end] != 0) pending = end, pending_hi = WORD(2 * end); /* lo: the next run's */
#undef WORD
        word += run, pos += run, avail -= run;
    }
    for (int64_t b = 0; b < B && status == 0; b++)
        if (tokens[b] < 0 || (margin > 0 && !(best[b] * (1 - margin) > second[b] * (1 + margin)))) status = 1;
    free(best);
    if (status) return status;
    int32_t new_left = (int32_t)avail + 1;
    uint64_t new_next = (uint64_t)pos;
    memcpy(state + 8, &new_left, 4), memcpy(state + 16, &new_next, 8);
    for (int i = 0; i < MT_N; i++) {
        uint64_t word64 = s[i];
        memcpy(state + 24 + 8 * i, &word64, 8);
    }
    return 0;
}

/* draw_walk's exact draw: the same token and state as torch.multinomial(probs, 1) or 1 (see draw_walk). */
int draw_rows(const float *probs, int64_t B, int64_t V, uint8_t *state, int64_t state_bytes, int64_t *tokens) {
    return draw_walk(probs, B, V, state, state_bytes, tokens, 0);
}

/* ------------------------------------------------------------------------------------------ the decode step */

/* How decode_step draws each step's tokens, as gpt2.sample.next_token does (top-p 1; temperature 0: greedy): from
   the generator whose get_state() bytes states[0] holds, the state after step j's draw into states[j + 1]; a row that
   has drawn `eot` (>= 0) keeps drawing it. `margin`: the relative distance within which the weights drawn from
   (weights_row) and torch's probabilities agree beyond a common factor (draw_walk). The caller reads `computed`
   (steps whose logits were computed) and `drawn` (steps whose tokens were drawn). */
struct sampling {
    float temperature, margin;
    int64_t top_k, eot;
    uint8_t *finished; /* (M,) */
    uint8_t *states;   /* (n_steps + 1, STATE_BYTES) */
    int64_t *tokens;   /* (n_steps, M) */
    int64_t computed, drawn;
};

/* y (V,) filtered (filter_row, which found its `largest`) -> exp(y - largest), 0 where y is -inf: torch's softmax
   times the sum of these. */
static void weights_row(float *y, int64_t V, float largest) {
    vf top = splat(largest), none = splat(-INFINITY), zero = splat(0);
    int64_t i = 0;
    for (; i + VL <= V; i += VL) {
        vf v = load_f32(y + i);
        store_f32(y + i, pick(v == none, zero, exp_v(v - top)));
    }
    for (; i < V; i++) y[i] = y[i] == -INFINITY ? 0 : exp_1(y[i] - largest);
}

/* tokens (M,) = argmax of each row of logits (M, V), torch's first largest; 1 where a row has a NaN (torch's). */
static int greedy_rows(const float *logits, int64_t M, int64_t V, int64_t *tokens) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = logits + m * V;
        float best = -INFINITY;
        tokens[m] = 0;
        for (int64_t i = 0; i < V; i++) {
            if (row[i] != row[i]) return 1;
            if (row[i] > best) best = row[i], tokens[m] = i;
        }
    }
    return 0;
}

/* tokens (M,) drawn from logits (M, V) (filter_row, weights_row, draw_walk with d->margin) from `state`; 1 where
   gpt2.sample must draw them itself. heaps: M * max(top_k, 1) floats. */
static int sampled_rows(const float *logits, int64_t M, int64_t V, struct sampling *d, uint8_t *state,
                        int64_t *tokens, float *scratch, float *heaps, int threads) {
    int64_t k = d->top_k > 0 ? d->top_k : 1, unfit = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : unfit) if (M > 1)
    for (int64_t m = 0; m < M; m++) { /* the rows' own passes; the draw itself is one stream of the generator */
        float largest = 0;
        unfit |= filter_row(logits + m * V, V, d->temperature, d->top_k, heaps + m * k, scratch + m * V, &largest);
        if (!unfit) weights_row(scratch + m * V, V, largest);
    }
    return unfit || draw_walk(scratch, M, V, state, STATE_BYTES, tokens, d->margin);
}

/* The next tokens (M,) from logits (M, V), greedy where d->temperature is 0, into `tokens`, the state into `state`,
   the finished rows updated: 0, or 1 (nothing changed) where gpt2.sample must draw them itself (a NaN, a row whose
   largest scaled logit is not finite, or one of draw_walk's cases, a near-tie among them). */
static int draw_step(const float *logits, int64_t M, int64_t V, struct sampling *d, uint8_t *state, int64_t *tokens,
                     float *scratch, float *heaps, int threads) {
    if (d->temperature == 0 ? greedy_rows(logits, M, V, tokens)
                            : sampled_rows(logits, M, V, d, state, tokens, scratch, heaps, threads))
        return 1;
    for (int64_t m = 0; m < M; m++) {
        if (d->eot >= 0 && d->finished[m]) tokens[m] = d->eot;
        if (tokens[m] == d->eot) d->finished[m] = 1;
    }
    return 0;
}

/* The tokens idx (M,) at their slots (slot[m], or first_slot for every row where slot is NULL) and positions
   (position[m], or the slot where position is NULL), embedded, through every block, then the final layer norm
   and the LM head (N_vocab, C) into logits (M, N_vocab): the blocks' KV caches get each token's keys and values
   at its slot. A row attends to the slots valid[m * valid_stride + slot] marks up to its own (valid NULL: every
   one), and always to its own. Returns 0; -1 where memory runs out, -2 where a token, position or slot is out of
   range (nothing written either way: the caller's torch path says what is wrong).

   With `d`, up to n_steps steps (logits (n_steps, M, N_vocab)): each step's tokens drawn (struct sampling) and
   fed to the next one at the next slot and position (the last position held), until a draw is left to the
   caller, every row has drawn eot, or a step cannot run (its slot out of range: d->computed tells). */
int decode_step(const struct block *blocks, int64_t n_layer, const struct embeddings *e, const float *ln_f_weight,
                const float *ln_f_bias, const struct product *head, int64_t n_vocab, const int64_t *idx,
                const int64_t *slot, int64_t first_slot, const int64_t *position, float *logits, int64_t M, int64_t C,
                int64_t inner, int64_t n_head, int64_t slots, const uint8_t *valid, int64_t valid_stride,
                int64_t valid_width, float eps, int threads, int64_t n_steps, struct sampling *d) {
    float *x = malloc(M * C * sizeof(float)), *h = malloc(M * C * sizeof(float)),
          *qkv = malloc(M * 3 * C * sizeof(float)), *f = malloc(M * inner * sizeof(float)),
          *scores = malloc(M * n_head * slots * sizeof(float));
    float *scratch = d ? malloc(M * n_vocab * sizeof(float)) : NULL,
          *heaps = d ? malloc(M * (d->top_k > 0 ? d->top_k : 1) * sizeof(float)) : NULL;
    int64_t *at = malloc(M * sizeof(int64_t)), *where = malloc(M * sizeof(int64_t)), *input = malloc(M * sizeof(int64_t));
    int32_t *keys = malloc(M * slots * sizeof(int32_t)), *n_keys = malloc(M * sizeof(int32_t));
    int status = x && h && qkv && f && scores && at && where && input && keys && n_keys && (!d || (scratch && heaps))
                     ? 0 : -1;
    if (!d) n_steps = 1;
    else d->computed = d->drawn = 0;
    if (status == 0) memcpy(input, idx, M * sizeof(int64_t));
    for (int64_t j = 0; j < n_steps && status == 0; j++) {
        for (int64_t m = 0; m < M; m++) {
            at[m] = (slot ? slot[m] : first_slot) + j;
            int64_t p = position ? position[m] + j : at[m];
            if (position && j > 0 && p >= e->n_positions) p = e->n_positions - 1;
            where[m] = p;
            if (input[m] < 0 || input[m] >= e->n_tokens || p < 0 || p >= e->n_positions || at[m] < 0
                || at[m] >= slots || (valid && at[m] >= valid_width))
                status = -2;
        }
        if (status) {
            if (j > 0) status = 0; /* the steps so far stand */
            break;
        }
        for (int64_t m = 0; m < M; m++) {
            const float *wpe = e->wpe + where[m] * C;
            for (int64_t c = 0; c < C; c++)
                x[m * C + c] = (e->wte_bf16 ? bf16(((const uint16_t *)e->wte)[input[m] * C + c])
                                            : ((const float *)e->wte)[input[m] * C + c]) + wpe[c];
            n_keys[m] = 0;
            for (int64_t key = 0; key <= at[m]; key++)
                if (!valid || valid[m * valid_stride + key] || key == at[m]) keys[m * slots + n_keys[m]++] = key;
        }
        struct step s = {M, C, n_head, slots, eps, at, keys, n_keys};
        float *out = logits + j * M * n_vocab;
#pragma omp parallel num_threads(threads)
        {
            for (int64_t l = 0; l < n_layer; l++) {
                const struct block *b = blocks + l;
                layer_norm(&s, x, b->ln_1_weight, b->ln_1_bias, h);
                product(&b->c_attn, h, qkv, M, C, 3 * C, 0);
                attention(&s, qkv, b->k, b->v, h, scores);
                product(&b->attn_proj, h, x, M, C, C, 1);
                layer_norm(&s, x, b->ln_2_weight, b->ln_2_bias, h);
                product(&b->c_fc, h, f, M, C, inner, 0);
                gelu(f, M * inner);
                product(&b->mlp_proj, f, x, M, inner, C, 1);
            }
            layer_norm(&s, x, ln_f_weight, ln_f_bias, h);
            product(head, h, out, M, C, n_vocab, 0);
        }
        if (!d) break;
        d->computed = j + 1;
        uint8_t *state = d->states + (j + 1) * STATE_BYTES;
        memcpy(state, state - STATE_BYTES, STATE_BYTES);
        if (draw_step(out, M, n_vocab, d, state, d->tokens + j * M, scratch, heaps, threads)) break;
        d->drawn = j + 1;
        memcpy(input, d->tokens + j * M, M * sizeof(int64_t));
        int64_t open = 0;
        for (int64_t m = 0; m < M; m++) open |= !d->finished[m];
        if (d->eot >= 0 && !open) break;
    }
    free(x), free(h), free(qkv), free(f), free(scores), free(scratch), free(heaps), free(at), free(where), free(input);
    free(keys), free(n_keys);
    return status;
}
