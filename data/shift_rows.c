/* RandAugment's shear and translate ops with Pillow's exact arithmetic, on RGB pixels.
 *
 * timm's ShearX/Y and TranslateX/Y call Image.transform(AFFINE, BILINEAR or BICUBIC), Pillow's
 * generic per-pixel engine: for every output pixel a 4 x 4 (bicubic) or 2 x 2 (bilinear)
 * neighbourhood, in double precision. These maps move pixels along one axis only, so the other
 * source coordinate always lands on a pixel centre, where Pillow's second 1-D pass returns its
 * centre row (or column) value exactly (d = 0 in its polynomial). What remains is one 1-D pass
 * per pixel and channel, evaluated here with Pillow's expressions in Pillow's order (Geometry.c:
 * affine_transform, BICUBIC_HEAD/BODY, BILINEAR_HEAD/BODY, the clamp and the cast), so the bytes
 * are Pillow's. Built with -ffp-contract=off (data/native.py): no fused multiply-adds.
 */
#include <math.h>
#include <string.h>

/* Pillow's FLOOR: a cast for non-negative values, floor() below zero. */
static int pillow_floor(double x) { return x < 0.0 ? (int)floor(x) : (int)x; }

/* Pillow's XCLIP / YCLIP, and the bicubic body's "repeat the last row read" at the far edge. */
static int clip(int i, int n) { return i < 0 ? 0 : (i < n ? i : n - 1); }

/* Pillow's bicubic (a = -1) through v1..v4 at d in [0, 1). Its p2..p4 are sums of small integers,
 * exact in double and so equal to the same sums in int; the Horner steps are its doubles. */
static double cubic(int v1, int v2, int v3, int v4, double d) {
    double p2 = -v1 + v3;
    double p3 = 2 * (v1 - v2) + v3 - v4;
    double p4 = -v1 + v2 - v3 + v4;
    return v2 + d * (p2 + d * (p3 + d * p4));
}

/* out = in transformed by Pillow's affine map a (a[0..5]: output pixel centre -> source), for a
 * map that moves along `axis` only (1: x, with a[3..5] = 0, 1, 0; 0: y, with a[0..2] = 1, 0, 0).
 * in, out: height x width RGB pixels, 3 bytes each, rows contiguous. bicubic: 1 for BICUBIC,
 * 0 for BILINEAR. fill: the RGB value of pixels whose source lies outside the image. */
void shift_rows_rgb(const unsigned char *in, unsigned char *out, int height, int width, int axis, const double *a,
                    int bicubic, const unsigned char *fill) {
    int extent = axis == 1 ? width : height;
    size_t step = axis == 1 ? 3 : (size_t)width * 3; /* bytes between neighbours along the axis */
    for (int y = 0; y < height; y++) {
        for (int x = 0; x < width; x++) {
            double xin = x + 0.5, yin = y + 0.5;
            unsigned char *o = out + ((size_t)y * width + x) * 3;
            double src = axis == 1 ? a[0] * xin + a[1] * yin + a[2] : a[3] * xin + a[4] * yin + a[5];
            if (src < 0.0 || src >= extent) {
                memcpy(o, fill, 3);
                continue;
            }
            src -= 0.5;
            int base = pillow_floor(src);
            double d = src - base;
            const unsigned char *line = axis == 1 ? in + (size_t)y * width * 3 : in + (size_t)x * 3;
            if (bicubic) {
                const unsigned char *t0 = line + clip(base - 1, extent) * step, *t1 = line + clip(base, extent) * step;
                const unsigned char *t2 = line + clip(base + 1, extent) * step, *t3 = line + clip(base + 2, extent) * step;
                for (int c = 0; c < 3; c++) {
                    double v = cubic(t0[c], t1[c], t2[c], t3[c], d);
                    o[c] = v <= 0.0 ? 0 : (v >= 255.0 ? 255 : (unsigned char)v);
                }
            } else {
                const unsigned char *t0 = line + clip(base, extent) * step, *t1 = line + clip(base + 1, extent) * step;
                for (int c = 0; c < 3; c++) {
                    double v1 = t0[c], v2 = t1[c];
                    o[c] = (unsigned char)(v1 + (v2 - v1) * d);
                }
            }
        }
    }
}
