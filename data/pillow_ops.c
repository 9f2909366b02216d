/* Pillow's exact arithmetic for the input pipeline's costliest Pillow calls: RandAugment's ops on
 * RGBX pixels (4 bytes each, as Pillow stores RGB; the fourth byte is ignored on input and
 * undefined on output), and Pillow's resize computed for a window of its output (at the end).
 *
 * - rotate, shear, translate: Image.transform(AFFINE, BILINEAR or BICUBIC), Pillow's generic
 *   per-pixel engine (Geometry.c: affine_transform, BILINEAR/BICUBIC_HEAD and _BODY, the clamp and
 *   the cast). affine_rgbx is the full 2-D form (rotate). Shear and translate move pixels along one
 *   axis only, so the other source coordinate lands on a pixel centre, where Pillow's second pass
 *   returns its centre value exactly (d = 0 in its polynomial): shift_rows_rgbx evaluates the one
 *   1-D pass that remains.
 * - the SMOOTH 3x3 filter of ImageEnhance.Sharpness (Filter.c: ImagingFilter3x3, float kernel
 *   k / 13, offset 0.5, rows y+1, y, y-1 in that order, borders copied).
 *
 * Every value is computed with Pillow's expressions in Pillow's order, one channel per vector
 * lane where vectors are used (the same IEEE operations per lane, so the same bytes). Built with
 * -ffp-contract=off (data/native.py): no fused multiply-adds. On x86-64 CPUs with AVX2 the affine
 * ops use four-lane double vectors; elsewhere shear and translate take a scalar form (still faster
 * than Pillow's 2-D engine) and rotate is left to Pillow.
 */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
#define AVX2 __attribute__((target("avx2")))
#endif

typedef int v4i __attribute__((vector_size(16)));
typedef float v4f __attribute__((vector_size(16)));

/* Pillow's FLOOR: a cast for non-negative values, floor() below zero. */
static int pillow_floor(double x) { return x < 0.0 ? (int)floor(x) : (int)x; }

/* Pillow's XCLIP / YCLIP; its bicubic body's "repeat the last row read" past an edge is the same. */
static int clip(int i, int n) { return i < 0 ? 0 : (i < n ? i : n - 1); }

static unsigned char clamp8(double v) { return v <= 0.0 ? 0 : (v >= 255.0 ? 255 : (unsigned char)v); }

/* Pillow's bicubic (a = -1) through four samples at d in [0, 1): p2..p4 formed from the UINT8
 * samples in int (exact small integers), then converted, as its macro does. */
static double cubic_u8(int v1, int v2, int v3, int v4, double d) {
    double p2 = -v1 + v3;
    double p3 = 2 * (v1 - v2) + v3 - v4;
    double p4 = -v1 + v2 - v3 + v4;
    return v2 + d * (p2 + d * (p3 + d * p4));
}

static int use_avx2(int portable) {
#ifdef HAVE_AVX2_PATH
    return !portable && __builtin_cpu_supports("avx2");
#else
    (void)portable;
    return 0;
#endif
}

/* Where output pixel (x, y) of a map that moves along `axis` only reads, as Pillow computes it:
 * the line it moves along (*line: its first pixel; neighbours `step` bytes apart), the pixel
 * before the source position (*base) and the fraction past it (*d). Returns 0, or -1 where the
 * source lies outside the image (Pillow leaves the fill colour there). */
static inline int shift_source(const unsigned char *in, int width, int height, int axis, const double *a, int x, int y,
                               const unsigned char **line, int *base, double *d) {
    double xin = x + 0.5, yin = y + 0.5;
    double src = axis == 1 ? a[0] * xin + a[1] * yin + a[2] : a[3] * xin + a[4] * yin + a[5];
    if (src < 0.0 || src >= (axis == 1 ? width : height)) return -1;
    src -= 0.5;
    *base = pillow_floor(src);
    *d = src - *base;
    *line = axis == 1 ? in + (size_t)y * width * 4 : in + (size_t)x * 4;
    return 0;
}

/* One output pixel of a one-axis map: from the line, its pixel before the source position and the
 * fraction past it; `extent` pixels along the line, `step` bytes apart. */
typedef void (*ShiftPixel)(unsigned char *o, const unsigned char *line, int base, double d, int extent, size_t step,
                           int bicubic);

/* The loop over the output of a one-axis map, with `pixel` (a constant, inlined) for each. */
static inline __attribute__((always_inline)) void shift_loop(const unsigned char *in, unsigned char *out, int height,
                                                             int width, int axis, const double *a, int bicubic,
                                                             const unsigned char *fill, ShiftPixel pixel) {
    int extent = axis == 1 ? width : height;
    size_t step = axis == 1 ? 4 : (size_t)width * 4;
    for (int y = 0; y < height; y++) {
        for (int x = 0; x < width; x++) {
            unsigned char *o = out + ((size_t)y * width + x) * 4;
            const unsigned char *line;
            int base;
            double d;
            if (shift_source(in, width, height, axis, a, x, y, &line, &base, &d))
                memcpy(o, fill, 4);
            else
                pixel(o, line, base, d, extent, step, bicubic);
        }
    }
}

static void shift_pixel_scalar(unsigned char *o, const unsigned char *line, int base, double d, int extent, size_t step,
                               int bicubic) {
    const unsigned char *t[4];
    for (int k = 0; k < 4; k++) t[k] = line + clip(base - 1 + k, extent) * step;
    for (int c = 0; c < 3; c++)
        o[c] = bicubic ? clamp8(cubic_u8(t[0][c], t[1][c], t[2][c], t[3][c], d))
                       : (unsigned char)(t[1][c] + (t[2][c] - t[1][c]) * d);
}

#ifdef HAVE_AVX2_PATH
/* One RGBX pixel as four int32 lanes. */
AVX2 static inline __m128i pixel4(const unsigned char *p) {
    int v;
    memcpy(&v, p, 4);
    return _mm_cvtepu8_epi32(_mm_cvtsi32_si128(v));
}

/* cubic_u8 on the four channels of the pixels at p + offsets[0..3]. */
AVX2 static inline __m256d cubic_taps4(const unsigned char *p, const size_t *offsets, __m256d d) {
    __m128i a = pixel4(p + offsets[0]), b = pixel4(p + offsets[1]);
    __m128i c = pixel4(p + offsets[2]), e = pixel4(p + offsets[3]);
    __m256d p1 = _mm256_cvtepi32_pd(b);
    __m256d p2 = _mm256_cvtepi32_pd(_mm_sub_epi32(c, a));
    __m256d p3 = _mm256_cvtepi32_pd(_mm_sub_epi32(_mm_add_epi32(_mm_slli_epi32(_mm_sub_epi32(a, b), 1), c), e));
    __m256d p4 = _mm256_cvtepi32_pd(_mm_add_epi32(_mm_sub_epi32(_mm_sub_epi32(b, a), c), e));
    return _mm256_add_pd(p1, _mm256_mul_pd(d, _mm256_add_pd(p2, _mm256_mul_pd(d, _mm256_add_pd(p3, _mm256_mul_pd(d, p4))))));
}

/* cubic on four lanes of doubles; -a + c is c - a exactly (negation is exact). */
AVX2 static inline __m256d cubic4(__m256d a, __m256d b, __m256d c, __m256d e, __m256d d) {
    __m256d p2 = _mm256_sub_pd(c, a);
    __m256d p3 = _mm256_sub_pd(_mm256_add_pd(_mm256_mul_pd(_mm256_set1_pd(2.0), _mm256_sub_pd(a, b)), c), e);
    __m256d p4 = _mm256_add_pd(_mm256_sub_pd(_mm256_sub_pd(b, a), c), e);
    return _mm256_add_pd(b, _mm256_mul_pd(d, _mm256_add_pd(p2, _mm256_mul_pd(d, _mm256_add_pd(p3, _mm256_mul_pd(d, p4))))));
}

/* Pillow's line a + (b - a) d on the four channels of two pixels. */
AVX2 static inline __m256d line4(const unsigned char *pa, const unsigned char *pb, __m256d d) {
    __m128i a = pixel4(pa), b = pixel4(pb);
    return _mm256_add_pd(_mm256_cvtepi32_pd(a), _mm256_mul_pd(_mm256_cvtepi32_pd(_mm_sub_epi32(b, a)), d));
}

/* clamp8 on four lanes: truncating first and clamping the integers gives the same bytes. */
AVX2 static inline void store4(unsigned char *o, __m256d v) {
    __m128i i = _mm256_cvttpd_epi32(v);
    i = _mm_min_epi32(_mm_max_epi32(i, _mm_setzero_si128()), _mm_set1_epi32(255));
    i = _mm_packus_epi16(_mm_packus_epi32(i, i), i);
    int w = _mm_cvtsi128_si32(i);
    memcpy(o, &w, 4);
}

AVX2 static void affine_avx2(const unsigned char *in, unsigned char *out, int height, int width, const double *a,
                             int bicubic, const unsigned char *fill) {
    size_t stride = (size_t)width * 4;
    for (int y = 0; y < height; y++) {
        for (int x = 0; x < width; x++) {
            double xin = x + 0.5, yin = y + 0.5;
            double xx = a[0] * xin + a[1] * yin + a[2];
            double yy = a[3] * xin + a[4] * yin + a[5];
            unsigned char *o = out + (size_t)y * stride + (size_t)x * 4;
            if (xx < 0.0 || xx >= width || yy < 0.0 || yy >= height) {
                memcpy(o, fill, 4);
                continue;
            }
            xx -= 0.5;
            yy -= 0.5;
            int bx = pillow_floor(xx), by = pillow_floor(yy);
            __m256d dx = _mm256_set1_pd(xx - bx), dy = _mm256_set1_pd(yy - by);
            if (bicubic) {
                size_t xs[4];
                __m256d r[4];
                for (int k = 0; k < 4; k++) xs[k] = (size_t)clip(bx - 1 + k, width) * 4;
                for (int k = 0; k < 4; k++) r[k] = cubic_taps4(in + clip(by - 1 + k, height) * stride, xs, dx);
                store4(o, cubic4(r[0], r[1], r[2], r[3], dy));
            } else {
                size_t x0 = (size_t)clip(bx, width) * 4, x1 = (size_t)clip(bx + 1, width) * 4;
                const unsigned char *r0 = in + clip(by, height) * stride, *r1 = in + clip(by + 1, height) * stride;
                __m256d v1 = line4(r0 + x0, r0 + x1, dx), v2 = line4(r1 + x0, r1 + x1, dx);
                store4(o, _mm256_add_pd(v1, _mm256_mul_pd(_mm256_sub_pd(v2, v1), dy)));
            }
        }
    }
}

AVX2 static void shift_pixel_avx2(unsigned char *o, const unsigned char *line, int base, double d, int extent,
                                  size_t step, int bicubic) {
    __m256d dd = _mm256_set1_pd(d);
    if (bicubic) {
        size_t taps[4];
        for (int k = 0; k < 4; k++) taps[k] = clip(base - 1 + k, extent) * step;
        store4(o, cubic_taps4(line, taps, dd));
    } else {
        store4(o, line4(line + clip(base, extent) * step, line + clip(base + 1, extent) * step, dd));
    }
}

AVX2 static void shift_avx2(const unsigned char *in, unsigned char *out, int height, int width, int axis,
                            const double *a, int bicubic, const unsigned char *fill) {
    shift_loop(in, out, height, width, axis, a, bicubic, fill, shift_pixel_avx2);
}
#endif

static void shift_scalar(const unsigned char *in, unsigned char *out, int height, int width, int axis,
                         const double *a, int bicubic, const unsigned char *fill) {
    shift_loop(in, out, height, width, axis, a, bicubic, fill, shift_pixel_scalar);
}

/* out = in transformed by Pillow's affine map a (a[0..5]: output pixel centre -> source).
 * in, out: height x width RGBX pixels, rows contiguous. bicubic: 1 for BICUBIC, 0 for BILINEAR.
 * fill: the 4 bytes of pixels whose source lies outside the image. Returns 0, or -1 without doing
 * anything where the CPU lacks AVX2: a scalar 2-D form is no faster than Pillow's own. */
int affine_rgbx(const unsigned char *in, unsigned char *out, int height, int width, const double *a, int bicubic,
                const unsigned char *fill) {
#ifdef HAVE_AVX2_PATH
    if (use_avx2(0)) {
        affine_avx2(in, out, height, width, a, bicubic, fill);
        return 0;
    }
#endif
    (void)in, (void)out, (void)height, (void)width, (void)a, (void)bicubic, (void)fill;
    return -1;
}

/* affine_rgbx for a map that moves along `axis` only (1: x, with a[3..5] = 0, 1, 0; 0: y, with
 * a[0..2] = 1, 0, 0): one 1-D pass per pixel, on every CPU. portable: 1 forces the scalar form
 * (the tests compare both with Pillow). */
void shift_rows_rgbx(const unsigned char *in, unsigned char *out, int height, int width, int axis, const double *a,
                     int bicubic, const unsigned char *fill, int portable) {
#ifdef HAVE_AVX2_PATH
    if (use_avx2(portable)) {
        shift_avx2(in, out, height, width, axis, a, bicubic, fill);
        return;
    }
#endif
    shift_scalar(in, out, height, width, axis, a, bicubic, fill);
}

static void to_float(const unsigned char *bytes, float *f, size_t n) {
    for (size_t i = 0; i < n; i++) f[i] = bytes[i];
}

static v4f load4f(const float *f) {
    v4f v;
    memcpy(&v, f, sizeof v);
    return v;
}

/* Pillow's image.filter(ImageFilter.SMOOTH) of RGBX pixels: the kernel (1 1 1, 1 5 1, 1 1 1) / 13
 * in float, offset 0.5, the sum ((offset + row y+1) + row y) + row y-1 with each row
 * (a k0 + b k1) + c k2, clamped to [0, 255] and truncated; the outermost rows and columns copied,
 * images under 3 x 3 copied whole. The four channels of a pixel are the four lanes of a float
 * vector (SSE on x86-64, NEON on Arm). Returns 0, or -1 if its row buffer cannot be allocated. */
int smooth_rgbx(const unsigned char *in, unsigned char *out, int height, int width) {
    size_t stride = (size_t)width * 4;
    if (width < 3 || height < 3) {
        memcpy(out, in, stride * height);
        return 0;
    }
    float *rows = malloc(3 * stride * sizeof(float));
    if (!rows) return -1;
    float *above = rows, *row = rows + stride, *below = rows + 2 * stride;
    const float k1 = 1.0f / 13.0f, k5 = 5.0f / 13.0f, offset = 0.0f + 0.5f;
    to_float(in, above, stride);
    to_float(in + stride, row, stride);
    memcpy(out, in, stride);
    for (int y = 1; y < height - 1; y++) {
        const unsigned char *source = in + y * stride;
        unsigned char *o = out + y * stride;
        to_float(in + (y + 1) * stride, below, stride);
        memcpy(o, source, 4);
        for (int x = 1; x < width - 1; x++) {
            size_t i = (size_t)x * 4;
            v4f ss = {offset, offset, offset, offset};
            ss += load4f(below + i - 4) * k1 + load4f(below + i) * k1 + load4f(below + i + 4) * k1;
            ss += load4f(row + i - 4) * k1 + load4f(row + i) * k5 + load4f(row + i + 4) * k1;
            ss += load4f(above + i - 4) * k1 + load4f(above + i) * k1 + load4f(above + i + 4) * k1;
            v4i t = __builtin_convertvector(ss, v4i); /* truncating, then clamping: Pillow's bytes */
            for (int c = 0; c < 3; c++) o[i + c] = t[c] <= 0 ? 0 : (t[c] >= 255 ? 255 : (unsigned char)t[c]);
        }
        memcpy(o + stride - 4, source + stride - 4, 4);
        float *done = above;
        above = row;
        row = below;
        below = done;
    }
    memcpy(out + (height - 1) * stride, in + (height - 1) * stride, stride);
    free(rows);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Pillow's resize (Resample.c) of RGB pixels, computing only a window of the output: a resize
 * followed by a crop (timm's eval Resize + CenterCrop, or a crop resized from a box) gives
 * Pillow's bytes for that window without the rest. The coefficients are Pillow's, computed in
 * double for the whole output and rounded to its 22-bit fixed point; the sums are then integer
 * sums, equal in any order, so both passes vectorise freely.
 */
#define RESAMPLE_BITS 22

static double bilinear_weight(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

static double bicubic_weight(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

typedef struct {
    int ksize;
    int *bounds;  /* per output pixel: first input pixel, number of taps */
    int *weights; /* per output pixel: ksize fixed-point weights */
} Taps;

static void free_taps(Taps *t) {
    free(t->bounds);
    free(t->weights);
    t->bounds = NULL, t->weights = NULL; /* callers free again on their way out */
}

/* Pillow's precompute_coeffs + normalize_coeffs_8bpc for one axis: in_size input pixels, the box
 * [in0, in1) (floats, as Pillow receives them), out_size output pixels. Returns 0 or -1. */
static int make_taps(int in_size, float in0, float in1, int out_size, int bicubic, Taps *t) {
    double scale, filterscale;
    filterscale = scale = (double)(in1 - in0) / out_size;
    if (filterscale < 1.0) filterscale = 1.0;
    double support = (bicubic ? 2.0 : 1.0) * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    double *w = malloc(ksize * sizeof(double));
    t->ksize = ksize;
    t->bounds = malloc((size_t)out_size * 2 * sizeof(int));
    t->weights = malloc((size_t)out_size * ksize * sizeof(int));
    if (!w || !t->bounds || !t->weights) {
        free(w);
        free_taps(t);
        return -1;
    }
    for (int xx = 0; xx < out_size; xx++) {
        double center = in0 + (xx + 0.5) * scale;
        double ww = 0.0, ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            w[x] = bicubic ? bicubic_weight((x + xmin - center + 0.5) * ss) : bilinear_weight((x + xmin - center + 0.5) * ss);
            ww += w[x];
        }
        for (int x = 0; x < xmax; x++)
            if (ww != 0.0) w[x] /= ww;
        int *k = t->weights + (size_t)xx * ksize;
        for (int x = 0; x < ksize; x++) {
            double v = x < xmax ? w[x] : 0.0;
            k[x] = v < 0 ? (int)(-0.5 + v * (1 << RESAMPLE_BITS)) : (int)(0.5 + v * (1 << RESAMPLE_BITS));
        }
        t->bounds[xx * 2] = xmin;
        t->bounds[xx * 2 + 1] = xmax;
    }
    free(w);
    return 0;
}

/* Pillow's clip8: the sum shifted down by the fixed point, clamped to a byte. */
static inline unsigned char clip_sum(int v) {
    v >>= RESAMPLE_BITS;
    return v < 0 ? 0 : (v > 255 ? 255 : (unsigned char)v);
}

/* One pixel's channels as int lanes from 3- or 4-byte pixels. */
static inline void pixel_ints(const unsigned char *p, int *c) {
    c[0] = p[0], c[1] = p[1], c[2] = p[2];
}

static void horizontal_scalar(const unsigned char *row, int pixel_bytes, int origin_x, const Taps *t, int x0, int n,
                              unsigned char *out) {
    for (int xx = x0; xx < x0 + n; xx++, out += 4) {
        int xmin = t->bounds[xx * 2], taps = t->bounds[xx * 2 + 1];
        const int *k = t->weights + (size_t)xx * t->ksize;
        int s[3] = {1 << (RESAMPLE_BITS - 1), 1 << (RESAMPLE_BITS - 1), 1 << (RESAMPLE_BITS - 1)};
        for (int x = 0; x < taps; x++) {
            int c[3];
            pixel_ints(row + (size_t)(xmin + x - origin_x) * pixel_bytes, c);
            s[0] += c[0] * k[x], s[1] += c[1] * k[x], s[2] += c[2] * k[x];
        }
        out[0] = clip_sum(s[0]), out[1] = clip_sum(s[1]), out[2] = clip_sum(s[2]);
    }
}

#ifdef HAVE_AVX2_PATH
/* Two adjacent pixels (3 or 4 bytes each) as eight int32 lanes, RGBX RGBX. An 8-byte load; where
 * that would pass `end`, the bytes are copied first. */
AVX2 static inline __m256i two_pixels8(const unsigned char *p, int pixel_bytes, const unsigned char *end) {
    __m128i bytes;
    if (p + 8 <= end) {
        bytes = _mm_loadl_epi64((const __m128i *)p);
    } else {
        long long v = 0;
        memcpy(&v, p, (size_t)(end - p) < 8 ? (size_t)(end - p) : 8);
        bytes = _mm_cvtsi64_si128(v);
    }
    if (pixel_bytes == 3)
        bytes = _mm_shuffle_epi8(bytes, _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, -1, -1, -1, -1, -1, -1, -1, -1));
    return _mm256_cvtepu8_epi32(bytes);
}

AVX2 static void horizontal_avx2(const unsigned char *row, int pixel_bytes, int origin_x, const Taps *t, int x0, int n,
                                 unsigned char *out, const unsigned char *end) {
    for (int xx = x0; xx < x0 + n; xx++, out += 4) {
        int xmin = t->bounds[xx * 2], taps = t->bounds[xx * 2 + 1];
        const int *k = t->weights + (size_t)xx * t->ksize;
        const unsigned char *p = row + (size_t)(xmin - origin_x) * pixel_bytes;
        __m256i acc = _mm256_setzero_si256();
        int x = 0;
        for (; x + 1 < taps; x += 2) {
            __m256i kk = _mm256_setr_m128i(_mm_set1_epi32(k[x]), _mm_set1_epi32(k[x + 1]));
            __m256i px = two_pixels8(p + (size_t)x * pixel_bytes, pixel_bytes, end);
            acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(px, kk));
        }
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        if (x < taps) {
            int c[3];
            pixel_ints(p + (size_t)x * pixel_bytes, c);
            s = _mm_add_epi32(s, _mm_mullo_epi32(_mm_setr_epi32(c[0], c[1], c[2], 0), _mm_set1_epi32(k[x])));
        }
        s = _mm_srai_epi32(_mm_add_epi32(s, _mm_set1_epi32(1 << (RESAMPLE_BITS - 1))), RESAMPLE_BITS);
        s = _mm_min_epi32(_mm_max_epi32(s, _mm_setzero_si128()), _mm_set1_epi32(255));
        s = _mm_packus_epi16(_mm_packus_epi32(s, s), s);
        int w = _mm_cvtsi128_si32(s);
        memcpy(out, &w, 4);
    }
}
#endif

/* The vertical pass over one output row: n pixels of `pixel_bytes` from `taps` rows. Plain loops
 * over contiguous bytes, vectorised by the compiler (for AVX2 where inlined into an AVX2 caller). */
static inline __attribute__((always_inline)) void vertical_row(const unsigned char *const *rows, int taps, const int *k,
                                                               int pixel_bytes, int n, int *acc, unsigned char *out) {
    int width = n * pixel_bytes;
    for (int i = 0; i < width; i++) acc[i] = 1 << (RESAMPLE_BITS - 1);
    for (int y = 0; y < taps; y++) {
        const unsigned char *r = rows[y];
        int ky = k[y];
        for (int i = 0; i < width; i++) acc[i] += r[i] * ky;
    }
    for (int x = 0; x < n; x++)
        for (int c = 0; c < 3; c++) out[x * 3 + c] = clip_sum(acc[x * pixel_bytes + c]);
}

static void vertical_generic(const unsigned char *const *rows, int taps, const int *k, int pixel_bytes, int n, int *acc,
                             unsigned char *out) {
    vertical_row(rows, taps, k, pixel_bytes, n, acc, out);
}

#ifdef HAVE_AVX2_PATH
AVX2 static void vertical_avx2(const unsigned char *const *rows, int taps, const int *k, int pixel_bytes, int n, int *acc,
                               unsigned char *out) {
    vertical_row(rows, taps, k, pixel_bytes, n, acc, out);
}
#endif

/* The input pixels [x0, x1) x [y0, y1) that resample_rgb reads for the output window (wx, wy,
 * ww, wh) of Pillow's resize to out_w x out_h from box (floats x0, y0, x1, y1) with bilinear (0)
 * or bicubic (1) weights: written to window[0..3] as x0, y0, x1, y1. Returns 0 or -1. */
int resample_source_window(int in_w, int in_h, int out_w, int out_h, int bicubic, const float *box, int wx, int wy,
                           int ww, int wh, int *window) {
    Taps h = {0}, v = {0};
    if (make_taps(in_w, box[0], box[2], out_w, bicubic, &h) || make_taps(in_h, box[1], box[3], out_h, bicubic, &v)) {
        free_taps(&h);
        free_taps(&v);
        return -1;
    }
    int need_h = out_w != in_w || box[0] != 0 || box[2] != out_w;
    int need_v = out_h != in_h || box[1] != 0 || box[3] != out_h;
    window[0] = need_h ? h.bounds[wx * 2] : wx;
    window[2] = need_h ? h.bounds[(wx + ww - 1) * 2] + h.bounds[(wx + ww - 1) * 2 + 1] : wx + ww;
    window[1] = need_v ? v.bounds[wy * 2] : wy;
    window[3] = need_v ? v.bounds[(wy + wh - 1) * 2] + v.bounds[(wy + wh - 1) * 2 + 1] : wy + wh;
    free_taps(&h);
    free_taps(&v);
    return 0;
}

/* Pillow's im.resize((out_w, out_h), BILINEAR or BICUBIC, box) of an RGB image of in_w x in_h,
 * then the window (wx, wy, ww, wh) of it, written to out (wh x ww x 3 bytes). The input is given
 * from pixel (origin_x, origin_y) on (it must hold what resample_source_window names): in_bytes
 * bytes, rows of `stride` bytes, pixels of `pixel_bytes` (3: RGB, 4: RGBX). As Pillow: a horizontal pass (into
 * bytes) over the rows the vertical pass reads, then the vertical pass; either is skipped when its
 * axis is unchanged. portable: 1 forces the scalar horizontal pass. Returns 0, or -1 where memory
 * runs out. */
int resample_rgb(const unsigned char *in, size_t in_bytes, int pixel_bytes, size_t stride, int origin_x, int origin_y,
                 int in_w, int in_h, int out_w, int out_h, int bicubic, const float *box, int wx, int wy, int ww, int wh,
                 unsigned char *out, int portable) {
    Taps h = {0}, v = {0};
    int status = -1, avx2 = use_avx2(portable);
    unsigned char *temp = NULL;
    int *acc = NULL;
    const unsigned char **rows = NULL;
    int need_h = out_w != in_w || box[0] != 0 || box[2] != out_w;
    int need_v = out_h != in_h || box[1] != 0 || box[3] != out_h;
    if (make_taps(in_w, box[0], box[2], out_w, bicubic, &h) || make_taps(in_h, box[1], box[3], out_h, bicubic, &v))
        goto done;
    /* The rows the vertical pass reads (all window rows when it is skipped). */
    int r0 = need_v ? v.bounds[wy * 2] : wy;
    int r1 = need_v ? v.bounds[(wy + wh - 1) * 2] + v.bounds[(wy + wh - 1) * 2 + 1] : wy + wh;
    /* After the horizontal pass: rows r0..r1 of the window's columns, RGBX; else the input itself. */
    const unsigned char *src = in;
    size_t src_stride = stride;
    int src_bytes = pixel_bytes, src_x = origin_x, src_y = origin_y;
    if (need_h) {
        temp = malloc((size_t)(r1 - r0) * ww * 4 + 8);
        if (!temp) goto done;
        for (int r = r0; r < r1; r++) {
            const unsigned char *row = in + (size_t)(r - origin_y) * stride;
            unsigned char *t = temp + (size_t)(r - r0) * ww * 4;
#ifdef HAVE_AVX2_PATH
            if (avx2) {
                horizontal_avx2(row, pixel_bytes, origin_x, &h, wx, ww, t, in + in_bytes);
                continue;
            }
#endif
            horizontal_scalar(row, pixel_bytes, origin_x, &h, wx, ww, t);
        }
        src = temp, src_stride = (size_t)ww * 4, src_bytes = 4, src_x = wx, src_y = r0;
    }
    const unsigned char *first = src + (size_t)(wx - src_x) * src_bytes; /* the window's first column */
    if (!need_v) {
        for (int y = 0; y < wh; y++) {
            const unsigned char *row = first + (size_t)(wy + y - src_y) * src_stride;
            for (int x = 0; x < ww; x++) memcpy(out + ((size_t)y * ww + x) * 3, row + (size_t)x * src_bytes, 3);
        }
        status = 0;
        goto done;
    }
    acc = malloc((size_t)ww * src_bytes * sizeof(int));
    rows = malloc((size_t)v.ksize * sizeof(*rows));
    if (!acc || !rows) goto done;
    for (int yy = wy; yy < wy + wh; yy++) {
        int ymin = v.bounds[yy * 2], taps = v.bounds[yy * 2 + 1];
        for (int y = 0; y < taps; y++) rows[y] = first + (size_t)(ymin + y - src_y) * src_stride;
        unsigned char *o = out + (size_t)(yy - wy) * ww * 3;
        const int *k = v.weights + (size_t)yy * v.ksize;
#ifdef HAVE_AVX2_PATH
        if (avx2) {
            vertical_avx2(rows, taps, k, src_bytes, ww, acc, o);
            continue;
        }
#endif
        vertical_generic(rows, taps, k, src_bytes, ww, acc, o);
    }
    status = 0;
done:
    (void)avx2;
    free_taps(&h);
    free_taps(&v);
    free(temp);
    free(acc);
    free(rows);
    return status;
}
