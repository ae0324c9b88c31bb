/* INT4 expert kernels for CPUs: compressed-tensors' pack-quantized weights (Kimi K2-Thinking's layout) read as
 * stored, once per token, never unpacked into a float matrix.
 *
 * Weights: W[r, c] = (nibble - 8) * scale[r, c / group], eight nibbles per int32 word, low nibble first, so byte m of
 * a row holds elements 2m (low nibble) and 2m + 1 (high nibble). Scales are bf16 or fp16 (a GGUF's Q4_0), one per
 * group of `group` inputs, a multiple of 32.
 *
 * Activations are quantized to int8 in blocks of 32, as llama.cpp's Q8_0 does: d = absmax / 127, q = round(x / d)
 * (computed as x * (1 / d), rounded half to even, the arithmetic runtime/kernels/cpu.py's reference repeats). They
 * are stored in the order two blocks' 32 weight bytes unpack in (low nibbles: even elements, then high nibbles: odd
 * ones; see `position`), so two blocks' dot products are two multiply-adds of 32 byte pairs. The nibbles are used as
 * unsigned bytes and the offset is taken out once per row: sum (n - 8) q = sum n q - 8 sum q.
 *
 * One variant is compiled per instruction set (runtime/kernels/cpu.py passes the flags): AVX2 (+FMA, F16C), the same
 * with AVX-512 VNNI's one-instruction byte dot product on 256-bit vectors, and plain C that any compiler vectorizes as
 * it can. A row's dot product keeps four accumulators and takes the offsets out in one vector pass. OpenMP threads split output rows, so threads never write
 * the same value; without OpenMP the kernels run on one thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define QK 32 /* activation block: inputs per int8 scale */
#define ROWS_PER_TASK 16

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define K2_ISA "avx512vnni"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define K2_ISA "avx2"
#else
#define K2_ISA "scalar"
#endif

const char *k2_isa(void) { return K2_ISA; }

int k2_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Scales --------------------------------------------------------------------------------------------------------- */

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float fp16_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            exponent = 127 - 15 + 1;
            while (!(mantissa & 0x400)) {
                mantissa <<= 1;
                exponent--;
            }
            bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
        }
    } else if (exponent == 31) {
        bits = sign | 0x7f800000 | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline float scale_at(const uint16_t *scales, int64_t i, int fp16) {
    return fp16 ? fp16_to_float(scales[i]) : bf16_to_float(scales[i]);
}

/* Activations ---------------------------------------------------------------------------------------------------- */

/* Where element i of block b goes among a row's quantized activations: blocks are laid out in pairs, as a pair's 32
 * weight bytes unpack: [b's even elements, b + 1's even elements, b's odd elements, b + 1's odd elements], 16 each; a
 * last, unpaired block as [even, odd]. */
static inline int64_t position(int64_t b, int64_t blocks, int i) {
    const int64_t pair = b & ~(int64_t)1;
    if (pair + 1 < blocks) {
        return pair * QK + (i & 1) * QK + (b - pair) * (QK / 2) + i / 2;
    }
    return b * QK + (i & 1) * (QK / 2) + i / 2;
}

/* x [n] (n a multiple of QK) -> q [n] int8 in pair order, d [n / QK] scales, s [n / QK] sums of q. */
static void quantize_row(const float *x, int64_t n, int8_t *q, float *d, int32_t *s) {
    for (int64_t b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) {
            float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
        }
        float scale = amax / 127.0f, inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
        int32_t sum = 0;
        for (int i = 0; i < QK; i++) {
            int32_t v = (int32_t)nearbyintf(xb[i] * inverse);
            q[position(b, n / QK, i)] = (int8_t)v;
            sum += v;
        }
        d[b] = scale;
        s[b] = sum;
    }
}

/* One row's dot product --------------------------------------------------------------------------------------------- */

#if defined(__AVX2__)
static inline float hsum256(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

/* The 16 bytes of a block as 32 nibble values: low nibbles (even elements), then high nibbles (odd elements). */
static inline __m256i unpack_block(const uint8_t *w) {
    __m128i packed = _mm_loadu_si128((const __m128i *)w);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

/* A block's dot product as 8 int32 partial sums: unsigned nibbles times signed bytes. */
static inline __m256i block_dot(const uint8_t *w, const int8_t *q) {
    __m256i wv = unpack_block(w), xv = _mm256_loadu_si256((const __m256i *)q);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, xv);
#else
    /* pairs summed into int16 (at most 2 * 15 * 127, no saturation), then into int32 */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), _mm256_set1_epi16(1));
#endif
}

/* Two blocks' dot products (32 weight bytes, 64 activations in pair order): lanes 0-3 block b, lanes 4-7 block b + 1. */
static inline __m256i pair_dot(const uint8_t *w, const int8_t *q) {
    const __m256i mask = _mm256_set1_epi8(0x0f), v = _mm256_loadu_si256((const __m256i *)w);
    const __m256i low = _mm256_and_si256(v, mask), high = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    const __m256i even = _mm256_loadu_si256((const __m256i *)q), odd = _mm256_loadu_si256((const __m256i *)(q + QK));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), low, even), high, odd);
#else
    /* at most 4 * 15 * 127 per int16: no saturation */
    __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, even), _mm256_maddubs_epi16(high, odd));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
}
#endif

#define MAX_BLOCKS 8192 /* inputs per row up to 262,144: far above any model's */

/* Row `w` (n / 2 bytes) against the quantized activations (q, d, s) of one token. */
static float row_dot(const uint8_t *w, const uint16_t *scales, int fp16, int64_t blocks_per_group, const int8_t *q,
                     const float *d, const int32_t *s, int64_t n) {
    const int64_t blocks = n / QK;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    /* Each block's combined scale (activation times weight), and the offset term they imply: computed 8 blocks at a
     * time, so the loop below carries no scalar work and no chain longer than its four accumulators. */
    float combined[MAX_BLOCKS];
    __m256 offset = _mm256_setzero_ps();
    int64_t b = 0;
    if (blocks_per_group == 1) {
        for (; b + 8 <= blocks; b += 8) {
            __m128i raw = _mm_loadu_si128((const __m128i *)(scales + b));
            __m256 ws = fp16 ? _mm256_cvtph_ps(raw)
                             : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
            __m256 cs = _mm256_mul_ps(_mm256_loadu_ps(d + b), ws);
            _mm256_storeu_ps(combined + b, cs);
            offset = _mm256_fmadd_ps(cs, _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(s + b))), offset);
        }
    }
    float tail = 0.0f;
    for (; b < blocks; b++) {
        combined[b] = d[b] * scale_at(scales, b / blocks_per_group, fp16);
        tail += combined[b] * (float)s[b];
    }
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const __m256i halves = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
    for (b = 0; b + 8 <= blocks; b += 8) {
        for (int i = 0; i < 4; i++) {
            const int64_t at = b + 2 * i; /* a pair's two scales, each over its four lanes */
            __m256 scale = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castpd_ps(
                _mm_load_sd((const double *)(combined + at)))), halves);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair_dot(w + at * 16, q + at * QK)), scale, acc[i]);
        }
    }
    for (; b + 2 <= blocks; b += 2) {
        __m256 scale = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castpd_ps(
            _mm_load_sd((const double *)(combined + b)))), halves);
        acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair_dot(w + b * 16, q + b * QK)), scale, acc[0]);
    }
    if (b < blocks) { /* a last, unpaired block */
        acc[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(w + b * 16, q + b * QK)), _mm256_broadcast_ss(combined + b),
                                 acc[1]);
    }
    __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    return hsum256(sum) - 8.0f * (hsum256(offset) + tail);
#else
    float total = 0.0f, offset = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *wb = w + b * 16;
        int32_t dot = 0;
        for (int i = 0; i < 16; i++) {
            dot += (int32_t)(wb[i] & 0x0f) * q[position(b, blocks, 2 * i)] +
                   (int32_t)(wb[i] >> 4) * q[position(b, blocks, 2 * i + 1)];
        }
        float sb = d[b] * scale_at(scales, b / blocks_per_group, fp16);
        total += (float)dot * sb;
        offset += (float)s[b] * sb;
    }
    return total - 8.0f * offset;
#endif
}

/* Quantized activations of several rows, allocated together. */
typedef struct {
    int8_t *q;
    float *d;
    int32_t *s;
} Quantized;

static int quantized_alloc(Quantized *a, int64_t rows, int64_t n) {
    a->q = malloc((size_t)(rows * n));
    a->d = malloc(sizeof(float) * (size_t)(rows * n / QK));
    a->s = malloc(sizeof(int32_t) * (size_t)(rows * n / QK));
    return a->q && a->d && a->s;
}

static void quantized_free(Quantized *a) {
    free(a->q);
    free(a->d);
    free(a->s);
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* A linear layer: x [n_tokens, in] float32 -> y [n_tokens, out] = x W^T. Returns 0, or -1 if out of memory. */
int k2_int4_linear(int64_t n_tokens, int64_t in, int64_t out, const float *x, const uint8_t *w, const uint16_t *scales,
                   int64_t group, int fp16, float *y, int threads) {
    Quantized xq = {0};
    if (!quantized_alloc(&xq, n_tokens, in)) {
        quantized_free(&xq);
        return -1;
    }
    const int64_t blocks = in / QK, bpg = group / QK, groups = in / group, tasks = (out + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tokens; t++) {
            quantize_row(x + t * in, in, xq.q + t * in, xq.d + t * blocks, xq.s + t * blocks);
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            for (int64_t r = task * ROWS_PER_TASK; r < out && r < (task + 1) * ROWS_PER_TASK; r++) {
                for (int64_t t = 0; t < n_tokens; t++) {
                    y[t * out + r] = row_dot(w + r * in / 2, scales + r * groups, fp16, bpg, xq.q + t * in,
                                             xq.d + t * blocks, xq.s + t * blocks, in);
                }
            }
        }
    }
    quantized_free(&xq);
    return 0;
}

/* Routed experts of one MoE layer: y [n_tokens, dim] = sum over each token's k slots of
 * route_w * down_e(silu(gate_e x) * up_e x), e = ids[t, slot] (slots with e < 0 are skipped: placed elsewhere).
 * Expert e's gate/up are [hidden, dim], its down [dim, hidden], `expert_bytes` and `expert_scales` apart.
 * The (token, slot) pairs are grouped by expert, so each weight row is read once per step for all its tokens.
 * Returns 0, or -1 if out of memory. */
int k2_int4_moe(int64_t n_tokens, int64_t dim, int64_t hidden, int64_t k, int64_t n_experts, const float *x,
                const int64_t *ids, const float *route_w, const uint8_t *gate, const uint16_t *gate_s,
                const uint8_t *up, const uint16_t *up_s, const uint8_t *down, const uint16_t *down_s, int64_t group,
                int fp16, float *y, int threads) {
    const int64_t pairs_max = n_tokens * k, rows = pairs_max ? pairs_max : 1;
    int64_t *start = calloc((size_t)n_experts + 1, sizeof(int64_t)), *next = malloc(sizeof(int64_t) * (size_t)n_experts);
    int64_t *active = malloc(sizeof(int64_t) * (size_t)n_experts), *order = malloc(sizeof(int64_t) * (size_t)rows);
    float *h = malloc(sizeof(float) * (size_t)(rows * hidden));
    Quantized xq = {0}, hq = {0};
    int status = -1;
    if (!start || !next || !active || !order || !h || !quantized_alloc(&xq, n_tokens, dim) ||
        !quantized_alloc(&hq, rows, hidden)) {
        goto done;
    }
    /* Counting sort of the (token, slot) pairs by expert: order[start[e] .. start[e + 1]) are expert e's pairs. */
    for (int64_t p = 0; p < pairs_max; p++) {
        if (ids[p] >= 0 && ids[p] < n_experts) start[ids[p] + 1]++;
    }
    for (int64_t e = 0; e < n_experts; e++) start[e + 1] += start[e];
    memcpy(next, start, sizeof(int64_t) * (size_t)n_experts);
    for (int64_t p = 0; p < pairs_max; p++) {
        if (ids[p] >= 0 && ids[p] < n_experts) order[next[ids[p]]++] = p;
    }
    int64_t n_active = 0;
    for (int64_t e = 0; e < n_experts; e++) {
        if (start[e + 1] > start[e]) active[n_active++] = e;
    }
    const int64_t pairs = start[n_experts];
    const int64_t dim_blocks = dim / QK, hidden_blocks = hidden / QK, bpg = group / QK;
    const int64_t up_bytes = hidden * dim / 2, up_scales = hidden * (dim / group);
    const int64_t down_bytes = dim * hidden / 2, down_scales = dim * (hidden / group);
    const int64_t hidden_tasks = (hidden + ROWS_PER_TASK - 1) / ROWS_PER_TASK, dim_tasks = (dim + ROWS_PER_TASK - 1) / ROWS_PER_TASK;

#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tokens; t++) {
            quantize_row(x + t * dim, dim, xq.q + t * dim, xq.d + t * dim_blocks, xq.s + t * dim_blocks);
        }
        /* gate and up: each thread a range of hidden rows, for every active expert and its tokens */
#pragma omp for schedule(static)
        for (int64_t task = 0; task < hidden_tasks; task++) {
            for (int64_t i = 0; i < n_active; i++) {
                const int64_t e = active[i];
                for (int64_t r = task * ROWS_PER_TASK; r < hidden && r < (task + 1) * ROWS_PER_TASK; r++) {
                    const uint8_t *gr = gate + e * up_bytes + r * dim / 2, *ur = up + e * up_bytes + r * dim / 2;
                    const uint16_t *gs = gate_s + e * up_scales + r * (dim / group), *us = up_s + e * up_scales + r * (dim / group);
                    for (int64_t j = start[e]; j < start[e + 1]; j++) {
                        const int64_t p = order[j], t = p / k;
                        const int8_t *q = xq.q + t * dim;
                        const float *d = xq.d + t * dim_blocks;
                        const int32_t *s = xq.s + t * dim_blocks;
                        float g = row_dot(gr, gs, fp16, bpg, q, d, s, dim), u = row_dot(ur, us, fp16, bpg, q, d, s, dim);
                        h[j * hidden + r] = silu(g) * u;
                    }
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < pairs; j++) {
            quantize_row(h + j * hidden, hidden, hq.q + j * hidden, hq.d + j * hidden_blocks, hq.s + j * hidden_blocks);
        }
        /* down: each thread a range of output rows, summing every active expert's share into its own rows of y */
#pragma omp for schedule(static)
        for (int64_t task = 0; task < dim_tasks; task++) {
            for (int64_t r = task * ROWS_PER_TASK; r < dim && r < (task + 1) * ROWS_PER_TASK; r++) {
                for (int64_t t = 0; t < n_tokens; t++) y[t * dim + r] = 0.0f;
                for (int64_t i = 0; i < n_active; i++) {
                    const int64_t e = active[i];
                    const uint8_t *dr = down + e * down_bytes + r * hidden / 2;
                    const uint16_t *ds = down_s + e * down_scales + r * (hidden / group);
                    for (int64_t j = start[e]; j < start[e + 1]; j++) {
                        const int64_t p = order[j], t = p / k;
                        y[t * dim + r] += route_w[p] * row_dot(dr, ds, fp16, bpg, hq.q + j * hidden,
                                                                hq.d + j * hidden_blocks, hq.s + j * hidden_blocks, hidden);
                    }
                }
            }
        }
    }
    status = 0;
done:
    free(start);
    free(next);
    free(active);
    free(order);
    free(h);
    quantized_free(&xq);
    quantized_free(&hq);
    return status;
}
