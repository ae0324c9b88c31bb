/* CPU kernels for quantized weights read as stored, once per token, never unpacked into a float matrix: INT4 experts
 * and linears in compressed-tensors' pack-quantized layout (Kimi K2-Thinking's), and int8 linears with a scale per row
 * (`--int8`, runtime/int8.py). For prompts on CPUs with native bf16 matrix multiplies, the weights are also written
 * out as bf16 matrices for torch to multiply (runtime/kernels/cpu.py decides where).
 *
 * Weights: W[r, c] = (nibble - 8) * scale[r, c / group], eight nibbles per int32 word, low nibble first, so byte m of
 * a row holds elements 2m (low nibble) and 2m + 1 (high nibble). Scales are bf16 or fp16 (a GGUF's Q4_0), one per
 * group of `group` inputs, a multiple of 32.
 *
 * Activations are quantized to int16 in blocks of 32 inputs: d = absmax / 32767, q = round(x / d) (computed as
 * x * (1 / d), rounded half to even; runtime/kernels/cpu.py's reference repeats it). That is 2^-16 of a block's
 * largest value, far finer than a bf16 activation's own rounding (2^-9), so the result is the exact path's
 * (dequantize, then multiply) within what fp32 summation order changes, and `k2 check` finds the two alike on any
 * model (llama.cpp's int8 activations, 2^-8, measured a mean KL of 3e-3 against it on SmolLM2). A block's 16 weight
 * bytes unpack into its low nibbles (even elements) then high nibbles (odd elements); its activations are laid out
 * once per token in that order, so a block is one or two multiply-adds of 16-bit pairs into int32, exact. The
 * nibbles' offset comes out once per row: sum (n - 8) q = sum n q - 8 sum q.
 *
 * One variant is compiled per instruction set (runtime/kernels/cpu_build.py passes the flags): AVX2 + FMA + F16C, the
 * same with AVX-512 VNNI's vpdpwssd for a block's multiply-adds, and plain C that any compiler vectorizes as it can.
 * A row's weights are prefetched 2 KiB ahead (past its end, the next row's): with two threads on this machine, the
 * hardware prefetchers alone left the kernels at 55-60% of the copy bandwidth. OpenMP threads take output rows
 * 16 at a time, so no two threads write the same value; without OpenMP the kernels run on one thread.
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

#define QK 32 /* inputs per block: 16 weight bytes */
#define ROWS_PER_TASK 16
#define PREFETCH_BYTES 2048 /* how far ahead weights are asked for: the best of 0.5-4 KiB measured here */
#define MAX_BLOCKS 8192 /* inputs per row up to 262,144: far above any model's */

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define K2_ISA "avx512vnni"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define K2_ISA "avx2"
#else
#define K2_ISA "scalar"
#endif

/* Blocks whose weight words one vector holds: 4 in a 512-bit register, 2 in a 256-bit one. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define GROUP_BLOCKS 4
#elif defined(__AVX2__)
#define GROUP_BLOCKS 2
#else
#define GROUP_BLOCKS 1
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

/* Where element i of block b goes among a row's laid-out activations. The weights are read GROUP_BLOCKS blocks at a
 * time as 16-bit words, each holding 4 consecutive nibbles, and each nibble position k (0-3) is widened by a shift and
 * a mask into lanes of its own: so element 4j + k of a group goes to k * (8 * GROUP_BLOCKS) + j. Blocks after the last
 * whole group are laid out one block at a time the same way. */
static inline int64_t position(int64_t b, int64_t blocks, int i) {
    const int64_t first = b - b % GROUP_BLOCKS;
    if (first + GROUP_BLOCKS <= blocks) {
        const int64_t e = (b - first) * QK + i;
        return first * QK + (e % 4) * (8 * GROUP_BLOCKS) + e / 4;
    }
    return b * QK + (i % 4) * 8 + i / 4;
}

/* x [n] (n a multiple of QK) -> q [n] int16 laid out as `position` says (for INT4 weights) or in order (for int8
 * weights: `in_order`); d [n / QK] the blocks' scales; s [n / QK] the sums of their q. */
static void quantize_row(const float *x, int64_t n, int16_t *q, float *d, int32_t *s, int in_order) {
    for (int64_t b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) {
            const float v = fabsf(xb[i]);
            amax = v > amax ? v : amax;
        }
        const float scale = amax / 32767.0f, inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
        int32_t sum = 0;
        for (int i = 0; i < QK; i++) {
            const int32_t v = (int32_t)nearbyintf(xb[i] * inverse);
            q[in_order ? b * QK + i : position(b, n / QK, i)] = (int16_t)v;
            sum += v;
        }
        d[b] = scale;
        s[b] = sum;
    }
}

/* One row's dot product ------------------------------------------------------------------------------------------ */

#if defined(__AVX2__)
static inline float hsum256(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}
#endif

/* A group of blocks' dot products as int32 lanes, 4 per block: its weight words' four nibbles, each widened into
 * 16-bit lanes by a shift and a mask, times the laid-out activations, pairs summed into int32. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
static inline __m512i group_dot(const uint8_t *w, const int16_t *q) {
    const __m512i v = _mm512_loadu_si512((const void *)w), mask = _mm512_set1_epi16(0x0f);
    __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, mask), _mm512_loadu_si512(q));
    dot = _mm512_dpwssd_epi32(dot, _mm512_and_si512(_mm512_srli_epi16(v, 4), mask), _mm512_loadu_si512(q + 32));
    dot = _mm512_dpwssd_epi32(dot, _mm512_and_si512(_mm512_srli_epi16(v, 8), mask), _mm512_loadu_si512(q + 64));
    return _mm512_dpwssd_epi32(dot, _mm512_srli_epi16(v, 12), _mm512_loadu_si512(q + 96));
}
#elif defined(__AVX2__)
static inline __m256i group_dot(const uint8_t *w, const int16_t *q) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)w), mask = _mm256_set1_epi16(0x0f);
    const __m256i d0 = _mm256_madd_epi16(_mm256_and_si256(v, mask), _mm256_loadu_si256((const __m256i *)q));
    const __m256i d1 = _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), mask),
                                         _mm256_loadu_si256((const __m256i *)(q + 16)));
    const __m256i d2 = _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 8), mask),
                                         _mm256_loadu_si256((const __m256i *)(q + 32)));
    const __m256i d3 = _mm256_madd_epi16(_mm256_srli_epi16(v, 12), _mm256_loadu_si256((const __m256i *)(q + 48)));
    return _mm256_add_epi32(_mm256_add_epi32(d0, d1), _mm256_add_epi32(d2, d3));
}
#endif

/* Blocks [from, to) of a row in plain C: the portable variant, and the blocks after the last whole group. Each is
 * laid out on its own: element 4j + k, nibble k of the block's word j, at k * 8 + j. */
static float blocks_dot(const uint8_t *w, const int16_t *q, const float *combined, int64_t from, int64_t to) {
    float total = 0.0f;
    for (int64_t b = from; b < to; b++) {
        const uint8_t *wb = w + b * 16;
        const int16_t *qb = q + b * QK;
        int32_t dot = 0;
        for (int k = 0; k < 4; k++) { /* nibble k of every word: activations k * 8 .. k * 8 + 7, in order */
            for (int j = 0; j < 8; j++) {
                dot += (int32_t)((((uint32_t)wb[2 * j] | (uint32_t)wb[2 * j + 1] << 8) >> (4 * k)) & 0x0f) *
                       qb[k * 8 + j];
            }
        }
        total += (float)dot * combined[b];
    }
    return total;
}

/* Row `w` (n / 2 bytes) against one token's quantized activations (q, d, s). */
static float row_dot(const uint8_t *w, const uint16_t *scales, int fp16, int64_t blocks_per_group, const int16_t *q,
                     const float *d, const int32_t *s, int64_t n) {
    const int64_t blocks = n / QK;
    /* Each block's scale (the weight's times the activations'), 8 at a time where a group is one block; the offset
     * term is their dot product with the blocks' sums. */
    float combined[MAX_BLOCKS], offset = 0.0f;
    int64_t b = 0;
#if defined(__AVX2__)
    __m256 offsets = _mm256_setzero_ps();
    if (blocks_per_group == 1) {
        for (; b + 8 <= blocks; b += 8) {
            const __m128i raw = _mm_loadu_si128((const __m128i *)(scales + b));
            const __m256 widened = fp16 ? _mm256_cvtph_ps(raw)
                                        : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
            const __m256 both = _mm256_mul_ps(widened, _mm256_loadu_ps(d + b));
            _mm256_storeu_ps(combined + b, both);
            offsets = _mm256_fmadd_ps(both, _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(s + b))), offsets);
        }
    }
    offset = hsum256(offsets);
#endif
    for (; b < blocks; b++) {
        combined[b] = d[b] * scale_at(scales, b / blocks_per_group, fp16);
        offset += combined[b] * (float)s[b];
    }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const int64_t whole = blocks - blocks % GROUP_BLOCKS;
    /* lanes 0-3 block b, 4-7 block b + 1, ...: each lane's scale from a 4-float load */
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (b = 0; b < whole; b += GROUP_BLOCKS) {
        _mm_prefetch((const char *)(w + b * 16 + PREFETCH_BYTES), _MM_HINT_T0);
        const __m512 scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(combined + b)));
        acc[(b / GROUP_BLOCKS) & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(group_dot(w + b * 16, q + b * QK)), scale,
                                                      acc[(b / GROUP_BLOCKS) & 1]);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + blocks_dot(w, q, combined, whole, blocks) -
           8.0f * offset;
#elif defined(__AVX2__)
    const int64_t whole = blocks - blocks % GROUP_BLOCKS;
    const __m256i spread = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (b = 0; b < whole; b += GROUP_BLOCKS) {
        if (b % 4 == 0) _mm_prefetch((const char *)(w + b * 16 + PREFETCH_BYTES), _MM_HINT_T0);
        const __m256 scale = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castpd_ps(
            _mm_load_sd((const double *)(combined + b)))), spread);
        acc[(b / GROUP_BLOCKS) & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(group_dot(w + b * 16, q + b * QK)), scale,
                                                      acc[(b / GROUP_BLOCKS) & 1]);
    }
    return hsum256(_mm256_add_ps(acc[0], acc[1])) + blocks_dot(w, q, combined, whole, blocks) - 8.0f * offset;
#else
    return blocks_dot(w, q, combined, 0, blocks) - 8.0f * offset;
#endif
}

/* Quantized activations of several rows, allocated together. */
typedef struct {
    int16_t *q;
    float *d;
    int32_t *s;
} Quantized;

static int quantized_alloc(Quantized *x, int64_t rows, int64_t n) {
    x->q = malloc(sizeof(int16_t) * (size_t)(rows * n));
    x->d = malloc(sizeof(float) * (size_t)(rows * n / QK));
    x->s = malloc(sizeof(int32_t) * (size_t)(rows * n / QK));
    return x->q && x->d && x->s;
}

static void quantized_free(Quantized *x) {
    free(x->q);
    free(x->d);
    free(x->s);
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* int8 weights -------------------------------------------------------------------------------------------------- */

/* Row `w` (n int8 weights, in order) against one token's activations quantized in order (q, d): the sum over blocks of
 * d[b] times the block's exact integer dot product. The row's own scale is the caller's to apply. */
static float row_dot_int8(const int8_t *w, const int16_t *q, const float *d, int64_t n) {
    const int64_t blocks = n / QK;
    int64_t b = 0;
    float total = 0.0f;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; b < blocks; b++) {
        if (b % 2 == 0) _mm_prefetch((const char *)(w + b * QK + PREFETCH_BYTES), _MM_HINT_T0);
        const __m512i wide = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + b * QK)));
        const __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wide, _mm512_loadu_si512(q + b * QK));
        acc[b & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(d[b]), acc[b & 1]);
    }
    total = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
#elif defined(__AVX2__)
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; b < blocks; b++) {
        if (b % 2 == 0) _mm_prefetch((const char *)(w + b * QK + PREFETCH_BYTES), _MM_HINT_T0);
        const __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + b * QK)));
        const __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + b * QK + 16)));
        const __m256i *qb = (const __m256i *)(q + b * QK);
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256(qb)),
                                             _mm256_madd_epi16(hi, _mm256_loadu_si256(qb + 1)));
        acc[b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d[b]), acc[b & 1]);
    }
    total = hsum256(_mm256_add_ps(acc[0], acc[1]));
#endif
    for (; b < blocks; b++) {
        int32_t dot = 0;
        for (int i = 0; i < QK; i++) dot += (int32_t)w[b * QK + i] * q[b * QK + i];
        total += (float)dot * d[b];
    }
    return total;
}

/* Linear layers ------------------------------------------------------------------------------------------------- */

/* A linear layer's weights as the kernels read them: INT4 (packed, a scale per group) or int8 (a scale per row). */
typedef struct {
    int int8;
    const uint8_t *packed; /* INT4: out rows of in / 2 bytes */
    const uint16_t *group_scales; /* INT4: bf16 or fp16 (`fp16`), in / group per row */
    int64_t group;
    int fp16;
    const int8_t *bytes; /* int8: out rows of in */
    const float *row_scales; /* int8 */
} Weights;

/* Row r of `m` against one token's quantized activations. */
static float weights_row_dot(const Weights *m, int64_t r, int64_t in, const int16_t *q, const float *d,
                             const int32_t *s) {
    if (m->int8) return m->row_scales[r] * row_dot_int8(m->bytes + r * in, q, d, in);
    return row_dot(m->packed + r * in / 2, m->group_scales + r * (in / m->group), m->fp16, m->group / QK, q, d, s,
                   in);
}

/* x [n_tokens, in] float32 -> y [n_tokens, out] = x W^T, W as `m` holds it. Returns 0, or -1 if out of memory. */
static int linear(int64_t n_tokens, int64_t in, int64_t out, const float *x, const Weights *m, float *y,
                  int threads) {
    Quantized xa = {0};
    if (!quantized_alloc(&xa, n_tokens, in)) {
        quantized_free(&xa);
        return -1;
    }
    const int64_t blocks = in / QK, tasks = (out + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tokens; t++) {
            quantize_row(x + t * in, in, xa.q + t * in, xa.d + t * blocks, xa.s + t * blocks, m->int8);
        }
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < tasks; task++) {
            for (int64_t r = task * ROWS_PER_TASK; r < out && r < (task + 1) * ROWS_PER_TASK; r++) {
                for (int64_t t = 0; t < n_tokens; t++) {
                    y[t * out + r] = weights_row_dot(m, r, in, xa.q + t * in, xa.d + t * blocks, xa.s + t * blocks);
                }
            }
        }
    }
    quantized_free(&xa);
    return 0;
}

/* An INT4 linear layer (packed as the experts are). Returns 0, or -1 if out of memory. */
int k2_int4_linear(int64_t n_tokens, int64_t in, int64_t out, const float *x, const uint8_t *w, const uint16_t *scales,
                   int64_t group, int fp16, float *y, int threads) {
    const Weights m = {.packed = w, .group_scales = scales, .group = group, .fp16 = fp16};
    return linear(n_tokens, in, out, x, &m, y, threads);
}

/* A linear layer with int8 weights and one scale per output row: y = x (scale * W)^T. Returns 0, or -1 if out of
 * memory. */
int k2_int8_linear(int64_t n_tokens, int64_t in, int64_t out, const float *x, const int8_t *w, const float *scales,
                   float *y, int threads) {
    const Weights m = {.int8 = 1, .bytes = w, .row_scales = scales};
    return linear(n_tokens, in, out, x, &m, y, threads);
}

/* Weights as a matrix, for prompts --------------------------------------------------------------------------------- */

/* Where a prompt gives a weight many tokens, a CPU with native bf16 matrix multiplies (AMX, AVX-512 BF16) multiplies by
 * the weight as a bf16 matrix faster than any number of row dot products: these write that matrix, rounded to nearest
 * even (runtime/kernels/cpu.py decides where). */

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* int8 rows times their scales -> out [rows, cols] bf16. */
void k2_int8_dense(int64_t rows, int64_t cols, const int8_t *w, const float *scales, uint16_t *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < cols; c++) out[r * cols + c] = float_to_bf16((float)w[r * cols + c] * scales[r]);
    }
}

/* One packed INT4 row of n inputs times its group scales -> out bf16. With AVX-512, a block's 16 possible values,
 * (nibble - 8) * scale, are rounded once into a table, and its 32 nibbles, widened to 16-bit indices, look them up in
 * one permute: a sixth of the time of the plain loop, which the compiler vectorizes elsewhere. */
static void int4_dense_row(int64_t n, const uint8_t *w, const uint16_t *scales, int64_t group, int fp16,
                           uint16_t *out) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const __m512 levels = _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8);
    const __m128i nibble = _mm_set1_epi8(0x0f);
    for (int64_t b = 0; b < n / QK; b++) {
        const __m512 values = _mm512_mul_ps(levels, _mm512_set1_ps(scale_at(scales, b * QK / group, fp16)));
        __m512i bits = _mm512_castps_si512(values);
        bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(
                                                           _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1))));
        const __m512i table = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
        const __m128i bytes = _mm_loadu_si128((const __m128i *)(w + b * QK / 2));
        const __m128i lo = _mm_and_si128(bytes, nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
        const __m512i index = _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(lo, hi),
                                                                    _mm_unpacklo_epi8(lo, hi)));
        _mm512_storeu_si512((void *)(out + b * QK), _mm512_permutexvar_epi16(index, table));
    }
#else
    for (int64_t b = 0; b < n / QK; b++) {
        const float scale = scale_at(scales, b * QK / group, fp16);
        for (int m = 0; m < QK / 2; m++) {
            out[b * QK + 2 * m] = float_to_bf16((float)((int)(w[b * QK / 2 + m] & 15) - 8) * scale);
            out[b * QK + 2 * m + 1] = float_to_bf16((float)((int)(w[b * QK / 2 + m] >> 4) - 8) * scale);
        }
    }
#endif
}

/* Packed INT4 rows (n / 2 bytes each, as the kernels read them) times their group scales -> out [rows, n] bf16. */
void k2_int4_dense(int64_t rows, int64_t n, const uint8_t *w, const uint16_t *scales, int64_t group, int fp16,
                   uint16_t *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) int4_dense_row(n, w + r * n / 2, scales + r * (n / group), group, fp16,
                                                      out + r * n);
}

/* Routed experts --------------------------------------------------------------------------------------------------- */

/* Routed experts of one MoE layer: y [n_tokens, dim] = sum over each token's k slots of
 * route_w * down_e(silu(gate_e x) * up_e x), e = ids[t, slot] (slots with e < 0 are skipped: placed elsewhere).
 * Expert e's gate and up are [hidden, dim], its down [dim, hidden], stacked by expert.
 * The (token, slot) pairs are grouped by expert, so each weight row is read once per call for all its tokens.
 * Returns 0, or -1 if out of memory. */
int k2_int4_moe(int64_t n_tokens, int64_t dim, int64_t hidden, int64_t k, int64_t n_experts, const float *x,
                const int64_t *ids, const float *route_w, const uint8_t *gate, const uint16_t *gate_s,
                const uint8_t *up, const uint16_t *up_s, const uint8_t *down, const uint16_t *down_s, int64_t group,
                int fp16, float *y, int threads) {
    const int64_t pairs_max = n_tokens * k, rows = pairs_max ? pairs_max : 1;
    int64_t *start = calloc((size_t)n_experts + 1, sizeof(int64_t));
    int64_t *next = malloc(sizeof(int64_t) * (size_t)n_experts);
    int64_t *active = malloc(sizeof(int64_t) * (size_t)n_experts), *order = malloc(sizeof(int64_t) * (size_t)rows);
    float *h = malloc(sizeof(float) * (size_t)(rows * hidden));
    Quantized xa = {0}, ha = {0};
    int status = -1;
    if (!start || !next || !active || !order || !h || !quantized_alloc(&xa, n_tokens, dim) ||
        !quantized_alloc(&ha, rows, hidden)) {
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
    const int64_t hidden_tasks = (hidden + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    const int64_t dim_tasks = (dim + ROWS_PER_TASK - 1) / ROWS_PER_TASK;

#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tokens; t++) {
            quantize_row(x + t * dim, dim, xa.q + t * dim, xa.d + t * dim_blocks, xa.s + t * dim_blocks, 0);
        }
        /* gate and up: each task a range of hidden rows, for every active expert and its tokens */
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < hidden_tasks; task++) {
            for (int64_t i = 0; i < n_active; i++) {
                const int64_t e = active[i];
                for (int64_t r = task * ROWS_PER_TASK; r < hidden && r < (task + 1) * ROWS_PER_TASK; r++) {
                    const uint8_t *gr = gate + e * up_bytes + r * dim / 2, *ur = up + e * up_bytes + r * dim / 2;
                    const uint16_t *gs = gate_s + e * up_scales + r * (dim / group);
                    const uint16_t *us = up_s + e * up_scales + r * (dim / group);
                    for (int64_t j = start[e]; j < start[e + 1]; j++) {
                        const int64_t t = order[j] / k;
                        const int16_t *q = xa.q + t * dim;
                        const float *d = xa.d + t * dim_blocks;
                        const int32_t *sums = xa.s + t * dim_blocks;
                        h[j * hidden + r] = silu(row_dot(gr, gs, fp16, bpg, q, d, sums, dim)) *
                                            row_dot(ur, us, fp16, bpg, q, d, sums, dim);
                    }
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < pairs; j++) {
            quantize_row(h + j * hidden, hidden, ha.q + j * hidden, ha.d + j * hidden_blocks, ha.s + j * hidden_blocks,
                         0);
        }
        /* down: each task a range of output rows, summing every active expert's share into its own rows of y */
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < dim_tasks; task++) {
            for (int64_t r = task * ROWS_PER_TASK; r < dim && r < (task + 1) * ROWS_PER_TASK; r++) {
                for (int64_t t = 0; t < n_tokens; t++) y[t * dim + r] = 0.0f;
                for (int64_t i = 0; i < n_active; i++) {
                    const int64_t e = active[i];
                    const uint8_t *dr = down + e * down_bytes + r * hidden / 2;
                    const uint16_t *ds = down_s + e * down_scales + r * (hidden / group);
                    for (int64_t j = start[e]; j < start[e + 1]; j++) {
                        const int64_t p = order[j], t = p / k;
                        y[t * dim + r] += route_w[p] * row_dot(dr, ds, fp16, bpg, ha.q + j * hidden,
                                                                ha.d + j * hidden_blocks, ha.s + j * hidden_blocks,
                                                                hidden);
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
    quantized_free(&xa);
    quantized_free(&ha);
    return status;
}
