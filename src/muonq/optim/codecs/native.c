/* The CPU inner loops of the codecs (native.py compiles this file, native_codec.py calls it), and
 * the decomposition's bf16 low-rank product (mq_add_low_rank_bf16, called by optim/subspace.py).
 *
 * 4-bit codes are level + 8, levels in [-7, 7], two per byte (element 2i in the low nibble; an odd
 * count leaves the last high nibble zero); 8-bit linear codes are level + 128, one per byte.
 *
 * Mu-law levels (companded before or after the scale) come from thresholds instead of log1p: the
 * level of |x| is the number of its group's seven thresholds it reaches, threshold k being the
 * magnitude whose companded value lies halfway between levels k - 1 and k (fp64, from the divisor).
 * An element within BAND (relative) of a threshold is too close to call against a rounded log1p:
 * its 64-element chunk is listed, and the caller encodes the listed chunks again with the PyTorch
 * arithmetic (mq_redo_args, torch's log1p, mq_redo_codes). Every other element gets the level the
 * PyTorch encoder gives it.
 *
 * Linear levels are the PyTorch arithmetic itself (divide, clamp, multiply, round half to even),
 * and so is every decoder's: IEEE operations, compiled without contraction into fused
 * multiply-adds. Scales are rounded into their format here by the rules of codecs/scales.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define CHUNK 64
#define LEVELS 7

/* native.py checks its copy of CHUNK against this when it loads the library. */
int64_t mq_chunk(void) { return CHUNK; }

/* Mu-law before the scale (MuonQ's quantizer): level = round(compand(min(|x|, 1)) / d). */
#define COMPAND_FIRST 0
/* Mu-law after the scale: level = round(compand(min(|x| / d, 1)) x 7). */
#define COMPAND_AFTER 1

/* The bits of max |x| over x[0..n): for non-negative floats the order of their bit patterns is
 * their order, so this is an integer max (which vectorises), and inf or NaN gives a result of at
 * least INF_BITS. */
#define INF_BITS 0x7f800000u
static uint32_t absmax_bits(const float *restrict x, int64_t n) {
    const uint32_t *restrict u = (const uint32_t *)x;
    uint32_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t a = u[i] & 0x7fffffffu;
        m = a > m ? a : m;
    }
    return m;
}

static float from_bits(uint32_t bits) {
    union { uint32_t u; float f; } v = {bits};
    return v.f;
}

/* The group's absmax a as written by mq_absmax: a itself, or with mu_first > 0 what the companding
 * of MuonQ's quantizer gives log1p, min(a, 1) x mu_first. */
static inline float absmax_out(uint32_t bits, float mu_first) {
    const float a = from_bits(bits);
    return mu_first > 0.0f ? (a < 1.0f ? a : 1.0f) * mu_first : a;
}

/* max |x| per group of `group` consecutive elements of a rows x cols matrix (group 0: per column)
 * into out (through absmax_out); returns 1 if x holds NaN or inf (then out is not used). */
int mq_absmax(const float *restrict x, int64_t rows, int64_t cols, int64_t group, float mu_first,
              float *restrict out) {
    const int64_t n = rows * cols;
    uint32_t worst = 0;
    if (group > 0) {
        for (int64_t g0 = 0; g0 < n; g0 += group) {
            const uint32_t m = absmax_bits(x + g0, n - g0 < group ? n - g0 : group);
            worst = m > worst ? m : worst;
            out[g0 / group] = absmax_out(m, mu_first);
        }
        return worst >= INF_BITS;
    }
    uint32_t *m = calloc((size_t)cols, sizeof(uint32_t));
    if (!m) return 1;
    const uint32_t *restrict u = (const uint32_t *)x;
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j++) {
            const uint32_t a = u[i * cols + j] & 0x7fffffffu;
            m[j] = a > m[j] ? a : m[j];
        }
    for (int64_t j = 0; j < cols; j++) {
        worst = m[j] > worst ? m[j] : worst;
        out[j] = absmax_out(m[j], mu_first);
    }
    free(m);
    return worst >= INF_BITS;
}

/* Stored scale formats (QuantCodec's scale dtype). */
#define SCALE_F32 0
#define SCALE_F16 1
#define SCALE_BF16 2

static uint32_t to_bits(float f) {
    union { float f; uint32_t u; } v = {f};
    return v.u;
}

/* fp32 -> fp16 bits, rounded to nearest even as IEEE (and torch's .to(float16)) round. */
static uint16_t half_bits(float f) {
    const uint32_t x = to_bits(f), sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u); /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* 65520 and up round to inf */
    if (a < 0x38800000u) /* below 2^-14: a subnormal half, in units of 2^-24 (exact scaling, rint to even) */
        return (uint16_t)(sign | (uint32_t)rintf(from_bits(a) * 16777216.0f));
    /* rebias the exponent (127 - 15 = 112) and round the 13 dropped mantissa bits to even; a carry
     * moves into the exponent as it should */
    return (uint16_t)(sign | ((a - (112u << 23) + 0x0fffu + ((a >> 13) & 1u)) >> 13));
}

static float half_value(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 1023u;
    if (e == 0) {
        const float v = (float)m * 5.9604644775390625e-8f; /* m x 2^-24, exact */
        return sign ? -v : v;
    }
    return from_bits(sign | (e == 31 ? 0x7f800000u : (e + 112u) << 23) | (m << 13));
}

/* fp32 -> bf16 bits, finite values rounded to nearest even as torch's .to(bfloat16) rounds them
 * (beyond bf16's max: to inf); a NaN stays a (quiet) NaN. */
static inline uint16_t bf16_bits(float f) {
    const uint32_t x = to_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

static float bf16_value(uint16_t b) { return from_bits((uint32_t)b << 16); }

static float scale_value(const void *scale, int kind, int64_t g) {
    if (kind == SCALE_F32) return ((const float *)scale)[g];
    const uint16_t b = ((const uint16_t *)scale)[g];
    return kind == SCALE_F16 ? half_value(b) : bf16_value(b);
}

/* v rounded to nearest into the scale format at scale[g]; returns the stored value. */
static float store_nearest(void *scale, int kind, int64_t g, float v) {
    if (kind == SCALE_F32) return ((float *)scale)[g] = v;
    const uint16_t b = kind == SCALE_F16 ? half_bits(v) : bf16_bits(v);
    ((uint16_t *)scale)[g] = b;
    return scale_value(scale, kind, g);
}

/* muonq.optim.codecs.scales.store_scale of a >= 0 into scale[g]: clamped to the format's max and
 * rounded up; returns the stored value (its divisor: it, or 1 where it is 0, as safe_divisor). */
static float store_up(void *scale, int kind, int64_t g, float a) {
    const float max = kind == SCALE_F16 ? 65504.0f : kind == SCALE_BF16 ? from_bits(0x7f7f0000u) : from_bits(0x7f7fffffu);
    a = a < max ? a : max;
    float stored = store_nearest(scale, kind, g, a);
    if (kind != SCALE_F32 && stored < a) { /* one step up (a > 0, below the format's max) */
        ((uint16_t *)scale)[g]++;
        stored = scale_value(scale, kind, g);
    }
    return stored;
}

/* The stored scale and the fp32 divisor of each of `groups` scale groups, as QuantCodec._scale
 * makes them (muonq.optim.codecs.scales), from v as mq_absmax wrote it:
 * - mu-law before the scale (step_scale): v = torch.log1p(min(absmax, 1) mu); the step
 *   v x inv_ln / 7 is stored rounded to nearest; the divisor is the fp32 step, floored at `floor`;
 * - otherwise (store_scale, safe_divisor): v = absmax, stored by store_up. */
static void group_scales(const float *restrict v, int64_t groups, int mode, float inv_ln, int kind, float floor,
                         void *restrict scale, float *restrict divisor) {
    for (int64_t g = 0; g < groups; g++) {
        if (mode == COMPAND_FIRST) {
            const float step = v[g] * inv_ln / (float)LEVELS;
            store_nearest(scale, kind, g, step);
            divisor[g] = step < floor ? floor : step;
        } else {
            const float stored = store_up(scale, kind, g, v[g]);
            divisor[g] = stored > 0.0f ? stored : 1.0f;
        }
    }
}

/* The grid's absmaxes of a rows x cols matrix: row_absmax[i, t] of row i in tile column t,
 * col_absmax[s, j] of column j in tile row s; returns 1 if x holds NaN or inf. */
int mq_grid_absmax(const float *restrict x, int64_t rows, int64_t cols, int64_t tile, float *restrict row_absmax,
                   float *restrict col_absmax) {
    const int64_t tile_cols = (cols + tile - 1) / tile, tile_rows = (rows + tile - 1) / tile;
    uint32_t *col = calloc((size_t)(tile_rows * cols), sizeof(uint32_t));
    if (!col) return 1;
    const uint32_t *restrict u = (const uint32_t *)x;
    uint32_t worst = 0;
    for (int64_t i = 0; i < rows; i++) {
        uint32_t *cm = col + (i / tile) * cols;
        for (int64_t t = 0; t < tile_cols; t++) {
            const int64_t start = t * tile, end = (t + 1) * tile < cols ? (t + 1) * tile : cols;
            const uint32_t m = absmax_bits(x + i * cols + start, end - start);
            worst = m > worst ? m : worst;
            row_absmax[i * tile_cols + t] = from_bits(m);
        }
        for (int64_t j = 0; j < cols; j++) {
            const uint32_t a = u[i * cols + j] & 0x7fffffffu;
            cm[j] = a > cm[j] ? a : cm[j];
        }
    }
    for (int64_t j = 0; j < tile_rows * cols; j++) col_absmax[j] = from_bits(col[j]);
    free(col);
    return worst >= INF_BITS;
}

/* A call's mu-law: mode, mu, ln(1 + mu), the band, and, after the scale, threshold k + 1 of
 * divisor d as d x frac[k] (the same fractions for every divisor, so computed once per call). */
typedef struct {
    int mode;
    double mu, ln, band, frac[LEVELS];
} Mulaw;

static Mulaw mulaw(int mode, double mu, double band) {
    Mulaw m = {mode, mu, log1p(mu), band, {0}};
    for (int k = 0; k < LEVELS; k++) m.frac[k] = expm1((k + 0.5) / LEVELS * m.ln) / mu;
    return m;
}

/* mid[k]: threshold k + 1 of divisor d in fp32; hi[k], lo[k]: it times (1 + band) and (1 - band)
 * (each may be NULL; hi and lo together). Before the scale, threshold k + 1 is
 * expm1((k + 1/2) d ln(1 + mu)) / mu. */
static void thresholds(const Mulaw *m, double d, float *mid, float *hi, float *lo) {
    for (int k = 0; k < LEVELS; k++) {
        const double t = m->mode == COMPAND_FIRST ? expm1((k + 0.5) * d * m->ln) / m->mu : d * m->frac[k];
        if (mid) mid[k] = (float)t;
        if (hi) {
            hi[k] = (float)(t * (1.0 + m->band));
            lo[k] = (float)(t * (1.0 - m->band));
        }
    }
}

static inline int level_of(float a, const float *hi, const float *lo, int *near) {
    int q = 0, p = 0;
    for (int k = 0; k < LEVELS; k++) {
        q += a >= hi[k];
        p += a >= lo[k];
    }
    *near |= p ^ q;
    return q;
}

static inline uint8_t code_of(float x, int q) { return (uint8_t)(8 + (x < 0.0f ? -q : q)); }

/* Packs m codes (m <= CHUNK) into bytes from element `first` (even). */
static inline void pack_chunk(const uint8_t *q8, int64_t m, uint8_t *codes, int64_t first) {
    uint8_t *out = codes + first / 2;
    const int64_t pairs = m / 2;
    for (int64_t i = 0; i < pairs; i++) out[i] = (uint8_t)(q8[2 * i] | (q8[2 * i + 1] << 4));
    if (m % 2) out[pairs] = q8[m - 1];
}

#ifdef __AVX512F__
/* The level of each of 16 magnitudes a (the number of the seven thresholds, non-decreasing in lanes
 * 0..6 of t, that it reaches, as level_of counts them) by binary search: three comparisons. */
static inline __m512i levels16(__m512 a, __m512 t) {
    const __m512i one = _mm512_set1_epi32(1), two = _mm512_set1_epi32(2);
    __m512i q = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(a, _mm512_permutexvar_ps(_mm512_set1_epi32(3), t),
                                                          _CMP_GE_OQ), _mm512_set1_epi32(4));
    q = _mm512_mask_add_epi32(q, _mm512_cmp_ps_mask(a, _mm512_permutexvar_ps(_mm512_add_epi32(q, one), t), _CMP_GE_OQ),
                              q, two);
    return _mm512_mask_add_epi32(q, _mm512_cmp_ps_mask(a, _mm512_permutexvar_ps(q, t), _CMP_GE_OQ), q, one);
}

/* Lanes 0..6 of a vector from the seven thresholds at t (lanes 7..15: +inf). */
static inline __m512 thresholds16(const float *t) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(INFINITY), (__mmask16)0x7f, t);
}

/* Eight fp64 values rounded to fp32 into lanes 0..6 (lanes 7..15: +inf). */
static inline __m512 threshold_lanes(__m512d t) {
    return _mm512_mask_mov_ps(_mm512_set1_ps(INFINITY), (__mmask16)0x7f, _mm512_castps256_ps512(_mm512_cvtpd_ps(t)));
}

/* thresholds() into vectors, lanes 0..6 (lanes 7..15: +inf), the same fp32 values: mu-law after
 * the scale computes them in registers, because a vector load of the seven floats just stored one
 * by one waits for the stores to complete (what a block of the scale search paid per candidate). */
static void threshold_vectors(const Mulaw *m, double d, __m512 *mid, __m512 *hi, __m512 *lo) {
    if (m->mode == COMPAND_AFTER) {
        const __m512d t = _mm512_mul_pd(_mm512_maskz_loadu_pd((__mmask8)0x7f, m->frac), _mm512_set1_pd(d));
        if (mid) *mid = threshold_lanes(t);
        if (hi) {
            *hi = threshold_lanes(_mm512_mul_pd(t, _mm512_set1_pd(1.0 + m->band)));
            *lo = threshold_lanes(_mm512_mul_pd(t, _mm512_set1_pd(1.0 - m->band)));
        }
        return;
    }
    float tm[LEVELS], th[LEVELS], tl[LEVELS];
    thresholds(m, d, mid ? tm : NULL, hi ? th : NULL, hi ? tl : NULL);
    if (mid) *mid = thresholds16(tm);
    if (hi) {
        *hi = thresholds16(th);
        *lo = thresholds16(tl);
    }
}
#endif

/* Levels by cells, for mu-law after the scale: with the divisor d, cell j of the magnitudes is
 * [j d / CELLS, (j + 1) d / CELLS) (the last one open above). Where each of the seven thresholds
 * d frac[k], and its band's ends d frac[k] (1 +- band), lie in a cell of their own, at least
 * CELL_MARGIN (in cell widths) from the cell's ends, an element's level is the count of thresholds
 * below its cell plus one comparison with its cell's threshold, whatever the roundings of
 * a x CELLS / d and of the thresholds (each 2^-24 relative) do near the cells' ends. The same for
 * every d: computed once per call. */
#define CELLS 16
#define CELL_MARGIN 1e-3
typedef struct {
    int usable;
    int32_t index[CELLS];  /* the threshold in cell j, or LEVELS where there is none */
    int32_t below[CELLS];  /* the thresholds below cell j */
} Cells;

static Cells cells_of(const Mulaw *m) {
    Cells c = {m->mode == COMPAND_AFTER, {0}, {0}};
    for (int j = 0; j < CELLS; j++) c.index[j] = LEVELS;
    for (int k = 0; k < LEVELS; k++) {
        const double u = m->frac[k] * CELLS, low = u * (1.0 - m->band), high = u * (1.0 + m->band);
        const int j = (int)floor(u);
        if (j < 0 || j >= CELLS || low - j < CELL_MARGIN || j + 1 - high < CELL_MARGIN || c.index[j] != LEVELS) {
            c.usable = 0;
            continue;
        }
        c.index[j] = k;
        for (int i = j + 1; i < CELLS; i++) c.below[i]++;
    }
    return c;
}

/* Whether cells give the levels at divisor d (which keeps CELLS / d and the thresholds normal). */
static inline int cells_apply(const Cells *cells, float d) {
    return cells && cells->usable && d >= 1e-30f && d <= 1e30f;
}

#ifdef __AVX512F__
/* The cell of each of 16 magnitudes at inv = CELLS / d; NaN (min keeps it) converts to lane 0's. */
static inline __m512i cells16(__m512 a, __m512 inv) {
    return _mm512_cvttps_epi32(_mm512_min_ps(_mm512_set1_ps((float)(CELLS - 1)), _mm512_mul_ps(a, inv)));
}

/* Seven thresholds t (lanes 0..6, lane 7 +inf) as the threshold of each cell (+inf in a cell without one). */
static inline __m512 cell_thresholds(const Cells *cells, __m512 t) {
    return _mm512_permutexvar_ps(_mm512_loadu_si512(cells->index), t);
}

/* One run's thresholds as encode16 reads them: by cells (h, l: each cell's threshold; below: the
 * thresholds below each cell), or for the binary search (h, l: lanes 0..6). */
typedef struct {
    int clamp_one;
    __m512 h, l, inv;
    __m512i below;
} Run;

/* The codes of the elements of x in lanes `in` into the low bytes of ...codes[0..7] (two per byte;
 * lanes past `in` give code 0); returns the lanes whose element is near a threshold. */
static inline __attribute__((always_inline)) __mmask16 encode16(const float *x, __mmask16 in, __mmask8 bytes,
                                                                const Run *run, int by_cells, uint8_t *codes) {
    const __m512 v = _mm512_maskz_loadu_ps(in, x);
    __m512 a = _mm512_abs_ps(v);
    if (run->clamp_one) a = _mm512_min_ps(_mm512_set1_ps(1.0f), a); /* min(1, NaN) stays NaN, as in level_of's caller */
    __m512i up;
    __mmask16 near;
    if (by_cells) {
        const __m512i cell = cells16(a, run->inv);
        const __mmask16 above = _mm512_cmp_ps_mask(a, _mm512_permutexvar_ps(cell, run->h), _CMP_GE_OQ);
        near = in & (above ^ _mm512_cmp_ps_mask(a, _mm512_permutexvar_ps(cell, run->l), _CMP_GE_OQ));
        up = _mm512_permutexvar_epi32(cell, run->below);
        up = _mm512_mask_add_epi32(up, above, up, _mm512_set1_epi32(1));
    } else {
        up = levels16(a, run->h);
        near = _mm512_mask_cmpneq_epi32_mask(in, up, levels16(a, run->l));
    }
    const __m512i eight = _mm512_set1_epi32(8);
    const __mmask16 negative = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512i code = _mm512_maskz_mov_epi32(in, _mm512_mask_sub_epi32(_mm512_add_epi32(eight, up), negative,
                                                                           eight, up));
    _mm512_mask_cvtepi64_storeu_epi8(codes, bytes, _mm512_or_si512(code, _mm512_srli_epi64(code, 28)));
    return near;
}

/* encode_run's chunks, with `by_cells` a constant where it is inlined. */
static inline __attribute__((always_inline)) int64_t encode_chunks(const float *restrict x, int64_t first,
                                                                   int64_t end, const Run *run, int by_cells,
                                                                   uint8_t *restrict codes, int64_t *restrict listed,
                                                                   int64_t count) {
    int64_t c0 = first;
    for (; c0 + CHUNK <= end; c0 += CHUNK) { /* whole chunks: every lane in */
        __mmask16 near = 0;
        for (int i = 0; i < CHUNK; i += 16)
            near |= encode16(x + c0 + i, 0xffff, 0xff, run, by_cells, codes + (c0 + i) / 2);
        if (near) listed[count++] = c0 / CHUNK;
    }
    if (c0 < end) { /* the last, shorter chunk: lanes past the end masked */
        __mmask16 near = 0;
        for (int64_t i = 0; c0 + i < end; i += 16) {
            const int64_t left = end - c0 - i;
            near |= encode16(x + c0 + i, left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u),
                             (__mmask8)((1u << ((left + 1) / 2 < 8 ? (left + 1) / 2 : 8)) - 1u), run, by_cells,
                             codes + (c0 + i) / 2);
        }
        if (near) listed[count++] = c0 / CHUNK;
    }
    return count;
}
#endif

/* Encodes elements [first, end) of x (first a multiple of CHUNK) with one set of thresholds, those of
 * divisor d (by cells where `cells` apply; may be NULL), and lists in listed[count..] each of their
 * CHUNK-element chunks with an element near a threshold; returns the new count. */
static int64_t encode_run(const float *restrict x, int64_t first, int64_t end, const Mulaw *m, float d,
                          const Cells *cells, uint8_t *restrict codes, int64_t *restrict listed, int64_t count) {
    const int clamp_one = m->mode == COMPAND_FIRST;
#ifdef __AVX512F__
    const int by_cells = cells_apply(cells, d);
    Run run = {clamp_one, _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_si512()};
    threshold_vectors(m, d, NULL, &run.h, &run.l);
    if (by_cells) {
        run.h = cell_thresholds(cells, run.h);
        run.l = cell_thresholds(cells, run.l);
        run.inv = _mm512_set1_ps((float)CELLS / d);
        run.below = _mm512_loadu_si512(cells->below);
        return encode_chunks(x, first, end, &run, 1, codes, listed, count);
    }
    return encode_chunks(x, first, end, &run, 0, codes, listed, count);
#else
    (void)cells;
    float hi[LEVELS], lo[LEVELS];
    thresholds(m, d, NULL, hi, lo);
    uint8_t q8[CHUNK];
    for (int64_t c0 = first; c0 < end; c0 += CHUNK) {
        const int64_t m = end - c0 < CHUNK ? end - c0 : CHUNK;
        int near = 0;
        for (int64_t i = 0; i < m; i++) {
            const float v = x[c0 + i];
            float a = fabsf(v);
            if (clamp_one) a = a > 1.0f ? 1.0f : a;
            q8[i] = code_of(v, level_of(a, hi, lo, &near));
        }
        pack_chunk(q8, m, codes, c0);
        if (near) listed[count++] = c0 / CHUNK;
    }
    return count;
#endif
}

/* Mu-law 4-bit codes of a rows x cols matrix with one scale per group of `group` consecutive
 * elements (a multiple of CHUNK, or rows x cols for one per tensor), or per column when group is 0:
 * the scales and divisors from v (group_scales), then the codes. Writes the indices of the chunks
 * that need the PyTorch arithmetic to `listed` (room for one per chunk) and returns their count
 * (-1: out of memory, nothing written). */
int64_t mq_encode4_mulaw(const float *restrict x, int64_t rows, int64_t cols, int64_t group,
                         const float *restrict v, float inv_ln, int kind, float floor, void *restrict scale,
                         float *restrict divisor, int mode, double mu, double band,
                         uint8_t *restrict codes, int64_t *restrict listed) {
    const int64_t n = rows * cols, chunks = (n + CHUNK - 1) / CHUNK;
    const int clamp_one = mode == COMPAND_FIRST;
    group_scales(v, group > 0 ? (n + group - 1) / group : cols, mode, inv_ln, kind, floor, scale, divisor);
    const Mulaw m = mulaw(mode, mu, band);
    int64_t count = 0;
    if (group > 0) {
        const Cells cells = cells_of(&m);
        for (int64_t g0 = 0; g0 < n; g0 += group)
            count = encode_run(x, g0, g0 + group < n ? g0 + group : n, &m, divisor[g0 / group], &cells, codes, listed,
                               count);
        return count;
    }
    /* Per column: thresholds laid out [level][column], so a row's levels vectorise over columns. */
    float *hi = malloc(sizeof(float) * LEVELS * cols), *lo = malloc(sizeof(float) * LEVELS * cols);
    uint8_t *q = malloc((size_t)n), *near = calloc((size_t)chunks, 1);
    if (!hi || !lo || !q || !near) {
        free(hi);
        free(lo);
        free(q);
        free(near);
        return -1;
    }
    float h[LEVELS], l[LEVELS];
    for (int64_t j = 0; j < cols; j++) {
        thresholds(&m, divisor[j], NULL, h, l);
        for (int k = 0; k < LEVELS; k++) {
            hi[k * cols + j] = h[k];
            lo[k * cols + j] = l[k];
        }
    }
    for (int64_t i = 0; i < rows; i++) {
        const float *xr = x + i * cols;
        uint8_t *qr = q + i * cols;
        int row_near = 0;
        int64_t j = 0;
#ifdef __AVX512F__
        /* 16 columns at a time, the last ones masked (the compiler's own vectors take 64 bytes of
         * codes per step, which leaves rows of fewer than 32 columns scalar) */
        const __m512i one = _mm512_set1_epi32(1), eight = _mm512_set1_epi32(8);
        for (; j < cols; j += 16) {
            const __mmask16 in = cols - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (cols - j)) - 1u);
            const __m512 v = _mm512_maskz_loadu_ps(in, xr + j);
            __m512 a = _mm512_abs_ps(v);
            if (clamp_one) a = _mm512_min_ps(a, _mm512_set1_ps(1.0f));
            __m512i up = _mm512_setzero_si512(), down = _mm512_setzero_si512();
            for (int k = 0; k < LEVELS; k++) {
                const __m512 h = _mm512_maskz_loadu_ps(in, hi + k * cols + j);
                const __m512 l = _mm512_maskz_loadu_ps(in, lo + k * cols + j);
                up = _mm512_mask_add_epi32(up, _mm512_cmp_ps_mask(a, h, _CMP_GE_OQ), up, one);
                down = _mm512_mask_add_epi32(down, _mm512_cmp_ps_mask(a, l, _CMP_GE_OQ), down, one);
            }
            row_near |= _mm512_mask_cmpneq_epi32_mask(in, up, down) != 0;
            const __mmask16 negative = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
            const __m512i code = _mm512_mask_sub_epi32(_mm512_add_epi32(eight, up), negative, eight, up);
            _mm512_mask_cvtepi32_storeu_epi8(qr + j, in, code);
        }
#endif
        for (; j < cols; j++) {
            float a = fabsf(xr[j]);
            if (clamp_one) a = a > 1.0f ? 1.0f : a;
            int up = 0, down = 0;
            for (int k = 0; k < LEVELS; k++) {
                up += a >= hi[k * cols + j];
                down += a >= lo[k * cols + j];
            }
            row_near |= up ^ down;
            qr[j] = code_of(xr[j], up);
        }
        if (row_near) /* list every chunk of the row: a few extra elements go the PyTorch way */
            for (int64_t c = i * cols / CHUNK; c <= ((i + 1) * cols - 1) / CHUNK; c++) near[c] = 1;
    }
    for (int64_t c = 0; c < chunks; c++) {
        pack_chunk(q + c * CHUNK, n - c * CHUNK < CHUNK ? n - c * CHUNK : CHUNK, codes, c * CHUNK);
        if (near[c]) listed[count++] = c;
    }
    free(hi);
    free(lo);
    free(q);
    free(near);
    return count;
}

/* The listed chunks again, element by element, in the PyTorch encoder's arithmetic, around
 * torch's own log1p: mq_redo_args writes the argument it gives log1p (zero past the end), the
 * caller applies torch.log1p to those (whole chunks: its vector loop), and mq_redo_codes finishes
 * the codes from the results. Element i's divisor is divisor[i / group], or divisor[i % cols]
 * when group is 0. */
static inline float divisor_at(const float *divisor, int64_t i, int64_t cols, int64_t group) {
    return group > 0 ? divisor[i / group] : divisor[i % cols];
}

void mq_redo_args(const float *restrict x, int64_t n, int64_t cols, int64_t group, const float *restrict divisor,
                  int mode, float mu, const int64_t *restrict listed, int64_t count, float *restrict args) {
    for (int64_t c = 0; c < count; c++)
        for (int64_t e = 0; e < CHUNK; e++) {
            const int64_t i = listed[c] * CHUNK + e;
            float a = 0.0f;
            if (i < n && mode == COMPAND_FIRST) { /* |x| mu clamped to mu: compand of x clamped to [-1, 1] */
                a = fabsf(x[i]) * mu;
                a = a > mu ? mu : a;
            } else if (i < n) { /* |x / d| clamped to 1, times mu */
                float y = fabsf(x[i] / divisor_at(divisor, i, cols, group));
                a = (y > 1.0f ? 1.0f : y) * mu;
            }
            args[c * CHUNK + e] = a;
        }
}

void mq_redo_codes(const float *restrict x, int64_t n, int64_t cols, int64_t group, const float *restrict divisor,
                   int mode, float inv_ln, const int64_t *restrict listed, int64_t count, const float *restrict logs,
                   uint8_t *restrict codes) {
    for (int64_t c = 0; c < count; c++)
        for (int64_t e = 0; e < CHUNK; e++) {
            const int64_t i = listed[c] * CHUNK + e;
            if (i >= n) break;
            const float z = logs[c * CHUNK + e] * inv_ln;
            float q;
            if (mode == COMPAND_FIRST) { /* round(companded / step): at most the levels, no clamp */
                q = rintf(z / divisor_at(divisor, i, cols, group));
            } else { /* linear codes of the companded value: round(z x 7), clamped to the levels */
                q = rintf(z * (float)LEVELS);
                q = q > (float)LEVELS ? (float)LEVELS : q;
            }
            const uint8_t code = code_of(x[i], (int)q);
            uint8_t *byte = codes + i / 2;
            *byte = i % 2 ? (uint8_t)((*byte & 0x0f) | (code << 4)) : (uint8_t)((*byte & 0xf0) | code);
        }
}

/* The scale search sums squared errors in sixteen running sums, one per vector lane, then adds
 * them as a tree (lane l with l + 8, then l + 4, l + 2, l + 1): the same order in every build. */
static float lane_sum(const float *restrict lanes) {
    float s8[8], s4[4];
    for (int l = 0; l < 8; l++) s8[l] = lanes[l] + lanes[l + 8];
    for (int l = 0; l < 4; l++) s4[l] = s8[l] + s8[l + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

#ifdef __AVX512F__
/* One candidate's tables for the squared errors by cells: CELLS / d, each cell's threshold, and the
 * decoded magnitude below and above it. */
typedef struct {
    __m512 inv, thr, low, high;
} CellErrors;

static CellErrors cell_errors(const Mulaw *m, const Cells *cells, float d, const float *restrict magnitude,
                              float scale) {
    __m512 mid;
    threshold_vectors(m, d, &mid, NULL, NULL);
    const __m512 table = _mm512_mul_ps(_mm512_maskz_loadu_ps((__mmask16)0xff, magnitude), _mm512_set1_ps(scale));
    const __m512i index = _mm512_loadu_si512(cells->index), below = _mm512_loadu_si512(cells->below);
    /* a cell without a threshold compares with +inf and decodes to `low` either way */
    const __m512i above = _mm512_mask_add_epi32(below, _mm512_cmpneq_epi32_mask(index, _mm512_set1_epi32(LEVELS)),
                                                below, _mm512_set1_epi32(1));
    return (CellErrors){_mm512_set1_ps((float)CELLS / d), cell_thresholds(cells, mid),
                        _mm512_permutexvar_ps(below, table), _mm512_permutexvar_ps(above, table)};
}

/* The squared errors of m (a multiple of 16) elements for `count` <= 3 candidates (a constant where
 * this is inlined) in one pass: each candidate sums into its own sixteen lanes acc[r] in element order,
 * so the sums are those of a pass per candidate, and the candidates' chains of additions overlap. */
static inline __attribute__((always_inline)) void cell_lanes(const float *restrict x, int64_t m,
                                                             const CellErrors *tab, int count,
                                                             float (*restrict acc)[16]) {
    __m512 sum[3];
    for (int r = 0; r < count; r++) sum[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < m; i += 16) {
        const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
        for (int r = 0; r < count; r++) {
            const __m512i cell = cells16(a, tab[r].inv);
            const __m512 v = _mm512_mask_permutexvar_ps(
                _mm512_permutexvar_ps(cell, tab[r].low),
                _mm512_cmp_ps_mask(a, _mm512_permutexvar_ps(cell, tab[r].thr), _CMP_GE_OQ), cell, tab[r].high);
            const __m512 e = _mm512_sub_ps(v, a);
            sum[r] = _mm512_add_ps(sum[r], _mm512_mul_ps(e, e));
        }
    }
    for (int r = 0; r < count; r++) _mm512_storeu_ps(acc[r], sum[r]);
}

/* cell_lanes for any number of candidates, three at a time. */
static void cell_lanes_all(const float *restrict x, int64_t m, const CellErrors *tab, int count,
                           float (*restrict acc)[16]) {
    int r = 0;
    for (; r + 3 <= count; r += 3) cell_lanes(x, m, tab + r, 3, acc + r);
    if (count - r == 2) cell_lanes(x, m, tab + r, 2, acc + r);
    else if (count - r == 1) cell_lanes(x, m, tab + r, 1, acc + r);
}
#endif

/* The squared errors (dec[level] - |x|)^2 of m (a multiple of 16) elements at the thresholds mid, by
 * binary search, summed into sixteen lanes acc. */
static void block_lanes(const float *restrict x, int64_t m, const float *restrict mid, const float *restrict dec,
                        float *restrict acc) {
#ifdef __AVX512F__
    const __m512 table = _mm512_maskz_loadu_ps((__mmask16)0xff, dec);
    const __m512 t = thresholds16(mid);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < m; i += 16) {
        const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
        const __m512 e = _mm512_sub_ps(_mm512_permutexvar_ps(levels16(a, t), table), a);
        sum = _mm512_add_ps(sum, _mm512_mul_ps(e, e));
    }
    _mm512_storeu_ps(acc, sum);
#else
    for (int l = 0; l < 16; l++) acc[l] = 0.0f;
    const float h0 = mid[0], h1 = mid[1], h2 = mid[2], h3 = mid[3], h4 = mid[4], h5 = mid[5], h6 = mid[6];
    const float d0 = dec[0], d1 = dec[1], d2 = dec[2], d3 = dec[3], d4 = dec[4], d5 = dec[5], d6 = dec[6], d7 = dec[7];
    for (int64_t i = 0; i < m; i += 16) {
        for (int l = 0; l < 16; l++) {
            const float a = fabsf(x[i + l]);
            float v = a >= h0 ? d1 : d0;
            v = a >= h1 ? d2 : v;
            v = a >= h2 ? d3 : v;
            v = a >= h3 ? d4 : v;
            v = a >= h4 ? d5 : v;
            v = a >= h5 ? d6 : v;
            v = a >= h6 ? d7 : v;
            const float e = v - a;
            acc[l] += e * e;
        }
    }
#endif
}

/* store_up of absmax x ratio[r] (fp32 product) for the `count` <= 16 candidates r: their bits in
 * `candidate`, their values in stored. With F16C, fp16 scales round eight at a time in hardware (to
 * nearest even, subnormal halves included, as half_bits rounds), then step up where below. */
static void store_candidates(void *candidate, int kind, float absmax, const float *ratio, int count, float *stored) {
#if defined(__F16C__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    if (kind == SCALE_F16) {
        for (int r0 = 0; r0 < count; r0 += 8) {
            const __mmask8 in = count - r0 >= 8 ? (__mmask8)0xff : (__mmask8)((1u << (count - r0)) - 1u);
            const __m256 a = _mm256_min_ps(_mm256_mul_ps(_mm256_set1_ps(absmax), _mm256_maskz_loadu_ps(in, ratio + r0)),
                                           _mm256_set1_ps(65504.0f));
            __m128i h = _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            h = _mm_mask_add_epi16(h, _mm256_cmp_ps_mask(_mm256_cvtph_ps(h), a, _CMP_LT_OQ), h, _mm_set1_epi16(1));
            /* whole-vector stores (the arrays have room for 16): the scalar loads that follow can take
             * their values from the store buffer, which they cannot from a masked store */
            _mm_storeu_si128((__m128i *)((uint16_t *)candidate + r0), h);
            _mm256_storeu_ps(stored + r0, _mm256_cvtph_ps(h));
        }
        return;
    }
#endif
    for (int r = 0; r < count; r++) stored[r] = store_up(candidate, kind, r, absmax * ratio[r]);
}

/* The divisor of a searched scale s (s itself, or 1 where it rounded to zero). */
static inline float search_divisor(float s) { return s > 0.0f ? s : 1.0f; }

/* One block's candidates in the scale search: their scales (bits in format `kind`, and values) and,
 * with AVX-512, their tables for the errors by cells where cells apply to every candidate (else
 * every candidate takes the binary search: the same levels). */
typedef struct {
    uint32_t candidate[16]; /* room for fp32 */
    float stored[16];
#ifdef __AVX512F__
    int by_cells;
    CellErrors tab[16];
#endif
} Candidates;

/* The candidates of the `len` elements at xb into *c: 0, or -2 where they hold NaN or inf. */
static int block_candidates(const float *restrict xb, int64_t len, int ratios, const float *restrict ratio,
                            int kind, const Mulaw *m, const Cells *cells, const float *restrict magnitude,
                            Candidates *c) {
    const uint32_t absmax = absmax_bits(xb, len);
    if (absmax >= INF_BITS) return -2;
    store_candidates(c->candidate, kind, from_bits(absmax), ratio, ratios, c->stored);
#ifdef __AVX512F__
    c->by_cells = 1;
    for (int r = 0; r < ratios; r++) c->by_cells &= cells_apply(cells, search_divisor(c->stored[r]));
    if (c->by_cells)
        for (int r = 0; r < ratios; r++)
            c->tab[r] = cell_errors(m, cells, search_divisor(c->stored[r]), magnitude, c->stored[r]);
#else
    (void)m;
    (void)cells;
    (void)magnitude;
#endif
    return 0;
}

/* The scale search of mu-law-after-the-scale blocks of `block` elements (a multiple of CHUNK; a
 * shorter last block is zero-padded, and zeros add no error). Per block b, with a its max |x|,
 * candidate r's scale is store_up(a x ratio[r]) (fp32 product); the first candidate with the least
 * squared error between |x| and its decoded magnitude magnitude[level] x scale is kept: its scale
 * (format `kind`) goes to scale[b] and its divisor to divisor[b], and the block is encoded with it
 * (at most 16 candidates). The errors take levels from the thresholds themselves, so only an element within
 * fp32 rounding of one can count at another level than PyTorch's. Chunks to redo: as
 * mq_encode4_mulaw; -2 where x holds NaN or inf (the outputs are then not to be used). Where
 * `errors` is not NULL, the candidates' errors go there too (blocks x ratios): what tests compare
 * between the vector loops and the plain ones. */
int64_t mq_search4_blocks(const float *restrict x, int64_t n, int64_t block, int64_t ratios,
                          const float *restrict ratio, int kind,
                          void *restrict scale, float *restrict divisor, const float *restrict magnitude,
                          double mu, double band, uint8_t *restrict codes, int64_t *restrict listed,
                          float *restrict errors) {
    float tail[CHUNK], mid[LEVELS], dec[LEVELS + 1];
    float lanes[16][16], tail_lanes[16][16], err[16];
    Candidates pair[2]; /* this block's and the next one's */
    const Mulaw m = mulaw(COMPAND_AFTER, mu, band);
    const Cells cells = cells_of(&m);
    int64_t count = 0;
    if (n > 0 && block_candidates(x, n < block ? n : block, (int)ratios, ratio, kind, &m, &cells, magnitude, pair))
        return -2;
    for (int64_t b0 = 0, b = 0; b0 < n; b0 += block, b++) {
        const int64_t len = n - b0 < block ? n - b0 : block, next = b0 + block;
        const float *xb = x + b0;
        const Candidates *c = &pair[b % 2];
        /* the next block's candidates first: their chain of dependent steps (absmax, rounding,
         * division) then runs beside this block's loops instead of before the next one's */
        if (next < n && block_candidates(x + next, n - next < block ? n - next : block, (int)ratios, ratio, kind, &m,
                                         &cells, magnitude, &pair[(b + 1) % 2]))
            return -2;
        const int64_t whole = len / CHUNK * CHUNK;
        if (whole < len)
            for (int64_t i = 0; i < CHUNK; i++) tail[i] = whole + i < len ? xb[whole + i] : 0.0f;
#ifdef __AVX512F__
        if (c->by_cells) {
            cell_lanes_all(xb, whole, c->tab, (int)ratios, lanes);
            if (whole < len) cell_lanes_all(tail, CHUNK, c->tab, (int)ratios, tail_lanes);
        } else
#endif
            for (int r = 0; r < ratios; r++) {
                thresholds(&m, search_divisor(c->stored[r]), mid, NULL, NULL);
                for (int k = 0; k <= LEVELS; k++) dec[k] = magnitude[k] * c->stored[r];
                block_lanes(xb, whole, mid, dec, lanes[r]);
                if (whole < len) block_lanes(tail, CHUNK, mid, dec, tail_lanes[r]);
            }
        for (int r = 0; r < ratios; r++) err[r] = lane_sum(lanes[r]) + (whole < len ? lane_sum(tail_lanes[r]) : 0.0f);
        if (errors)
            for (int r = 0; r < ratios; r++) errors[b * ratios + r] = err[r];
        int best = 0;
        for (int r = 1; r < ratios; r++)
            if (err[r] < err[best]) best = r;
        if (kind == SCALE_F32) ((float *)scale)[b] = c->stored[best];
        else ((uint16_t *)scale)[b] = ((const uint16_t *)c->candidate)[best];
        const float d = divisor[b] = search_divisor(c->stored[best]);
        count = encode_run(x, b0, b0 + len, &m, d, &cells, codes, listed, count);
    }
    return count;
}

/* Linear 4-bit codes of a rows x cols matrix (cols even) on grid scales: element (i, j) divided by
 * min(row_div[i, j / tile], col_div[i / tile, j]), clamped to [-1, 1] when `clamp`, times 7, rounded
 * half to even. `row`: scratch for one row's codes (cols bytes). */
void mq_encode4_grid(const float *restrict x, int64_t rows, int64_t cols, int64_t tile,
                     const float *restrict row_div, const float *restrict col_div, int clamp,
                     uint8_t *restrict row, uint8_t *restrict codes) {
    const int64_t tile_cols = (cols + tile - 1) / tile;
    for (int64_t i = 0; i < rows; i++) {
        const float *xr = x + i * cols, *cd = col_div + (i / tile) * cols;
        for (int64_t t = 0; t < tile_cols; t++) {
            const float r = row_div[i * tile_cols + t];
            const int64_t end = (t + 1) * tile < cols ? (t + 1) * tile : cols;
            for (int64_t j = t * tile; j < end; j++) {
                float y = xr[j] / (r < cd[j] ? r : cd[j]);
                if (clamp) y = y < -1.0f ? -1.0f : (y > 1.0f ? 1.0f : y);
                row[j] = (uint8_t)(8 + (int)rintf(y * 7.0f));
            }
        }
        uint8_t *out = codes + i * cols / 2;
        for (int64_t j = 0; j < cols / 2; j++) out[j] = (uint8_t)(row[2 * j] | (row[2 * j + 1] << 4));
    }
}

/* Linear 4-bit codes of a rows x cols matrix (cols and tile even) on grid scales: out =
 * (code - 8) / 7 x min(row_scale[i, j / tile], col_scale[i / tile, j]), the PyTorch decoder's
 * arithmetic. */
void mq_decode4_grid(const uint8_t *restrict codes, int64_t rows, int64_t cols, int64_t tile,
                     const float *restrict row_scale, const float *restrict col_scale, float *restrict out) {
    const int64_t tile_cols = (cols + tile - 1) / tile;
    for (int64_t i = 0; i < rows; i++) {
        const uint8_t *cr = codes + i * cols / 2;
        const float *cs = col_scale + (i / tile) * cols;
        float *o = out + i * cols;
        for (int64_t t = 0; t < tile_cols; t++) {
            const float r = row_scale[i * tile_cols + t];
            const int64_t end = (t + 1) * tile < cols ? (t + 1) * tile : cols;
            for (int64_t p = t * tile / 2; p < end / 2; p++) {
                const int c = cr[p];
                const float s0 = r < cs[2 * p] ? r : cs[2 * p], s1 = r < cs[2 * p + 1] ? r : cs[2 * p + 1];
                o[2 * p] = ((float)((c & 15) - 8) / 7.0f) * s0;
                o[2 * p + 1] = ((float)((c >> 4) - 8) / 7.0f) * s1;
            }
        }
    }
}

/* Where mq_decode4_groups finds group g's 16 decoded values (one per code 0..15). */
#define TABLE_GIVEN 0    /* table + 16 g: computed by the caller */
#define TABLE_EXPANDED 1 /* table + 16 x (the bits of scale[g], a 16-bit format): one row per pattern */
#define TABLE_SCALED 2   /* table[c] x scale[g]: the value map's level of code c times the group's scale */

static inline const float *group_table(int source, const float *table, const void *scale, int kind, int64_t g,
                                       float *own) {
    if (source == TABLE_GIVEN) return table + 16 * g;
    if (source == TABLE_EXPANDED) return table + 16 * (int64_t)((const uint16_t *)scale)[g];
    const float s = scale_value(scale, kind, g);
    for (int c = 0; c < 16; c++) own[c] = table[c] * s;
    return own;
}

/* Elements [e, end) of a run that reads one table t. */
static void decode_run(const uint8_t *restrict codes, int64_t e, int64_t end, const float *restrict t,
                       float *restrict out) {
    if (e % 2 && e < end) { /* a run that starts in a byte's high nibble */
        out[e] = t[codes[e / 2] >> 4];
        e++;
    }
#ifdef __AVX512F__
    /* 16 elements from 8 bytes: each byte to two lanes, the odd lane's shifted right by 4;
     * vpermps reads the low 4 bits of each lane as the table index */
    const __m512 tab = _mm512_loadu_ps(t);
    const __m512i dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i shift = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
    for (; e + 16 <= end; e += 16) {
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + e / 2)));
        b = _mm512_srlv_epi32(_mm512_permutexvar_epi32(dup, b), shift);
        _mm512_storeu_ps(out + e, _mm512_permutexvar_ps(b, tab));
    }
#endif
    for (; e + 1 < end; e += 2) {
        const uint8_t b = codes[e / 2];
        out[e] = t[b & 15];
        out[e + 1] = t[b >> 4];
    }
    if (e < end) out[e] = t[codes[e / 2] & 15];
}

/* A rows x cols matrix with one table per column (tabs: cols x 16). */
static void decode_columns(const uint8_t *restrict codes, int64_t n, int64_t cols, const float *restrict tabs,
                           float *restrict out) {
    int64_t e = 0, j = 0;
#ifdef __AVX512F__
    if (cols >= 16) { /* gathers; lane i's column is (e + i) mod cols, advanced by 16 with one wrap */
        const __m512i dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
        const __m512i shift = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
        const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        const __m512i width = _mm512_set1_epi32((int)cols), sixteen = _mm512_set1_epi32(16);
        const __m512i low4 = _mm512_set1_epi32(15);
        __m512i col = lane; /* columns of elements 0..15 (cols >= 16) */
        for (; e + 16 <= n; e += 16) {
            __m512i b = _mm512_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + e / 2)));
            b = _mm512_and_epi32(_mm512_srlv_epi32(_mm512_permutexvar_epi32(dup, b), shift), low4);
            const __m512i index = _mm512_add_epi32(_mm512_slli_epi32(col, 4), b);
            _mm512_storeu_ps(out + e, _mm512_i32gather_ps(index, tabs, 4));
            col = _mm512_add_epi32(col, sixteen);
            col = _mm512_mask_sub_epi32(col, _mm512_cmpge_epi32_mask(col, width), col, width);
        }
        j = e % cols;
    }
#endif
    for (; e < n; e++) {
        out[e] = tabs[16 * j + (e % 2 ? codes[e / 2] >> 4 : codes[e / 2] & 15)];
        if (++j == cols) j = 0;
    }
}

/* 4-bit codes of a rows x cols matrix with one scale per group of `group` consecutive elements
 * (group 0: per column) decoded by lookup in each group's 16 decoded values (group_table; `scale`
 * in format `kind` is read by TABLE_EXPANDED and TABLE_SCALED). Returns -1 if out of memory
 * (nothing written), else 0. */
int mq_decode4_groups(const uint8_t *restrict codes, int64_t rows, int64_t cols, int64_t group,
                      const void *restrict scale, int kind, int source, const float *restrict table,
                      float *restrict out) {
    const int64_t n = rows * cols;
    float own[16];
    if (group > 0) {
        for (int64_t g0 = 0; g0 < n; g0 += group)
            decode_run(codes, g0, g0 + group < n ? g0 + group : n,
                       group_table(source, table, scale, kind, g0 / group, own), out);
        return 0;
    }
    float *tabs = malloc(sizeof(float) * 16 * (size_t)cols);
    if (!tabs) return -1;
    for (int64_t j = 0; j < cols; j++) {
        const float *t = group_table(source, table, scale, kind, j, own);
        for (int c = 0; c < 16; c++) tabs[16 * j + c] = t[c];
    }
    decode_columns(codes, n, cols, tabs, out);
    free(tabs);
    return 0;
}

/* Linear codes (no companding) of a rows x cols matrix with one scale per group of `group`
 * consecutive elements (group 0: per column), as QuantCodec's PyTorch encoder makes them: the
 * scales from each group's absmax (group_scales: rounded up into the format, divisor the stored
 * value or 1), then per element code = rint(clamp(x / d, -1, 1) x levels) + levels + 1, one byte
 * each (bits 8) or two per byte (bits 4). Returns -1 if out of memory, else 0. */
int mq_encode_linear(const float *restrict x, int64_t rows, int64_t cols, int64_t group,
                      const float *restrict absmax, int kind, void *restrict scale, float *restrict divisor,
                      int bits, uint8_t *restrict codes) {
    const int64_t n = rows * cols;
    const float levels = bits == 8 ? 127.0f : (float)LEVELS, offset = levels + 1.0f;
    group_scales(absmax, group > 0 ? (n + group - 1) / group : cols, COMPAND_AFTER, 0.0f, kind, 0.0f, scale, divisor);
    uint8_t *q = bits == 8 ? codes : malloc((size_t)n);
    if (!q) return -1;
    if (group > 0) {
        for (int64_t g0 = 0; g0 < n; g0 += group) {
            const float d = divisor[g0 / group];
            const int64_t end = g0 + group < n ? g0 + group : n;
            for (int64_t e = g0; e < end; e++) {
                float y = x[e] / d;
                y = y < -1.0f ? -1.0f : y > 1.0f ? 1.0f : y;
                q[e] = (uint8_t)(rintf(y * levels) + offset);
            }
        }
    } else {
        for (int64_t i = 0; i < rows; i++)
            for (int64_t j = 0; j < cols; j++) {
                float y = x[i * cols + j] / divisor[j];
                y = y < -1.0f ? -1.0f : y > 1.0f ? 1.0f : y;
                q[i * cols + j] = (uint8_t)(rintf(y * levels) + offset);
            }
    }
    if (bits == 4) {
        for (int64_t c = 0; c < n; c += CHUNK) pack_chunk(q + c, n - c < CHUNK ? n - c : CHUNK, codes, c);
        free(q);
    }
    return 0;
}

/* 8-bit linear codes decoded as QuantCodec's PyTorch decoder does it: (code - 128) / 127 x the
 * group's scale (group as in mq_encode_linear). Returns -1 if out of memory, else 0. */
int mq_decode8_linear(const uint8_t *restrict codes, int64_t rows, int64_t cols, int64_t group,
                       const void *restrict scale, int kind, float *restrict out) {
    const int64_t n = rows * cols;
    if (group > 0) {
        for (int64_t g0 = 0; g0 < n; g0 += group) {
            const float s = scale_value(scale, kind, g0 / group);
            const int64_t end = g0 + group < n ? g0 + group : n;
            for (int64_t e = g0; e < end; e++) out[e] = ((float)codes[e] - 128.0f) / 127.0f * s;
        }
        return 0;
    }
    float *s = malloc(sizeof(float) * (size_t)cols);
    if (!s) return -1;
    for (int64_t j = 0; j < cols; j++) s[j] = scale_value(scale, kind, j);
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j++) out[i * cols + j] = ((float)codes[i * cols + j] - 128.0f) / 127.0f * s[j];
    free(s);
    return 0;
}

/* Whether this build has mq_add_low_rank_bf16 (the compiler targeted AVX512-BF16). */
int mq_has_bf16_dot(void) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define LR_ROWS 4 /* output rows per register block */
#define LR_VECS 4 /* 16-column vectors per register block: LR_ROWS x LR_VECS accumulators */

/* One block of nrows <= LR_ROWS rows from row0 x up to 16 LR_VECS columns from col0 (masks of the
 * vectors in mask). Always inlined with a constant nrows, so that the accumulators stay in
 * registers. */
static inline __attribute__((always_inline)) void low_rank_block(
        const float *base, float *out, const uint32_t *restrict p, const uint32_t *restrict r, int64_t n,
        int64_t pairs, int64_t row0, int nrows, int64_t col0, const __mmask16 *mask, __m512 alpha,
        const float *grad, __m512 beta, int divide, __m512 divisor) {
    __m512 acc[LR_ROWS][LR_VECS];
    for (int a = 0; a < LR_ROWS; a++)
        for (int v = 0; v < LR_VECS; v++) acc[a][v] = _mm512_setzero_ps();
    for (int64_t t = 0; t < pairs; t++) {
        __m512i rv[LR_VECS];
        for (int v = 0; v < LR_VECS; v++) rv[v] = _mm512_maskz_loadu_epi32(mask[v], r + t * n + col0 + 16 * v);
        for (int a = 0; a < nrows; a++) {
            const __m512i pa = _mm512_set1_epi32((int)p[(row0 + a) * pairs + t]);
            for (int v = 0; v < LR_VECS; v++) acc[a][v] = _mm512_dpbf16_ps(acc[a][v], (__m512bh)pa, (__m512bh)rv[v]);
        }
    }
    for (int a = 0; a < nrows; a++)
        for (int v = 0; v < LR_VECS; v++) {
            const int64_t e = (row0 + a) * n + col0 + 16 * v;
            __m512 y = _mm512_add_ps(_mm512_maskz_loadu_ps(mask[v], base + e), _mm512_mul_ps(alpha, acc[a][v]));
            if (grad) {
                __m512 g = _mm512_maskz_loadu_ps(mask[v], grad + e);
                if (divide) g = _mm512_div_ps(g, divisor);
                y = _mm512_add_ps(_mm512_mul_ps(y, beta), g);
            }
            _mm512_mask_storeu_ps(out + e, mask[v], y);
        }
}

/* mq_add_low_rank_bf16's blocks, rows outer: the matrices stream through memory row by row, which
 * the prefetchers follow. */
static inline __attribute__((always_inline)) void low_rank_rows(
        const float *base, float *out, const uint32_t *restrict p, const uint32_t *restrict r, int64_t m, int64_t n,
        int64_t pairs, __m512 alpha, const float *grad, __m512 beta, int divide, __m512 divisor) {
    for (int64_t i = 0; i < m; i += LR_ROWS) {
        for (int64_t j = 0; j < n; j += 16 * LR_VECS) {
            __mmask16 mask[LR_VECS];
            for (int v = 0; v < LR_VECS; v++) {
                const int64_t left = n - j - 16 * v;
                mask[v] = left >= 16 ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1u);
            }
            if (i + LR_ROWS <= m)
                low_rank_block(base, out, p, r, n, pairs, i, LR_ROWS, j, mask, alpha, grad, beta, divide, divisor);
            else
                for (int64_t row = i; row < m; row++)
                    low_rank_block(base, out, p, r, n, pairs, row, 1, j, mask, alpha, grad, beta, divide, divisor);
        }
    }
}
#endif

/* Two fp32 values as one word of two bf16 (lo in the low half), as VDPBF16PS reads pairs. */
static inline uint32_t bf16_pair(float lo, float hi) {
    return (uint32_t)bf16_bits(lo) | ((uint32_t)bf16_bits(hi) << 16);
}

/* out = base + alpha x P R^T for an m x n matrix (out may be base), P (m x k) and R (n x k) fp32 with
 * any strides (element (i, c) of P at p[i * p_row + c * p_col]). The factors are rounded to bf16
 * and packed in pairs along k (an odd k padded with a zero); each pair's two products are exact in
 * fp32 and summed into an fp32 accumulator (VDPBF16PS), then scaled by alpha and added to base: no
 * rounding to bf16 on the way out. With `grad` (m x n, may be NULL) the momentum update follows in
 * the same pass: out = (base + alpha x P R^T) x beta + grad / grad_divisor (no division where the
 * divisor is 1, which changes nothing), rounded after each operation as the
 * separate PyTorch operations round. Returns -2 if this build lacks AVX512-BF16 (nothing written;
 * see mq_has_bf16_dot), -1 if out of memory, else 0. */
int mq_add_low_rank_bf16(const float *base, float *out, const float *restrict p, int64_t p_row, int64_t p_col,
                         const float *restrict r, int64_t r_row, int64_t r_col, int64_t m, int64_t n, int64_t k,
                         float alpha, const float *grad, float beta, float grad_divisor) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    const int64_t pairs = (k + 1) / 2;
    uint32_t *pp = malloc(sizeof(uint32_t) * (size_t)(m * pairs)), *rp = malloc(sizeof(uint32_t) * (size_t)(n * pairs));
    if (!pp || !rp) {
        free(pp);
        free(rp);
        return -1;
    }
    for (int64_t i = 0; i < m; i++)
        for (int64_t t = 0; t < pairs; t++)
            pp[i * pairs + t] = bf16_pair(p[i * p_row + 2 * t * p_col],
                                          2 * t + 1 < k ? p[i * p_row + (2 * t + 1) * p_col] : 0.0f);
    for (int64_t t = 0; t < pairs; t++) /* R^T: word (t, j) holds R[j, 2t..2t+1] */
        for (int64_t j = 0; j < n; j++)
            rp[t * n + j] = bf16_pair(r[j * r_row + 2 * t * r_col], 2 * t + 1 < k ? r[j * r_row + (2 * t + 1) * r_col] : 0.0f);
    const __m512 a = _mm512_set1_ps(alpha), b = _mm512_set1_ps(beta), dv = _mm512_set1_ps(grad_divisor);
    /* each case with its constants, so that nothing of the update weighs on the product's registers */
    if (!grad) low_rank_rows(base, out, pp, rp, m, n, pairs, a, NULL, b, 0, dv);
    else if (grad_divisor == 1.0f) low_rank_rows(base, out, pp, rp, m, n, pairs, a, grad, b, 0, dv);
    else low_rank_rows(base, out, pp, rp, m, n, pairs, a, grad, b, 1, dv);
    free(pp);
    free(rp);
    return 0;
#else
    (void)base; (void)out; (void)p; (void)p_row; (void)p_col; (void)r; (void)r_row; (void)r_col; (void)m; (void)n;
    (void)k; (void)alpha; (void)grad; (void)beta; (void)grad_divisor;
    return -2;
#endif
}
