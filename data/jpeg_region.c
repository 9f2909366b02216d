/* Decode one rectangle of a JPEG, optionally at 1/2, 1/4 or 1/8 scale, with libjpeg-turbo.
 *
 * A random resized crop keeps about half of a photo on average. libjpeg-turbo can skip the IDCT,
 * upsampling and colour conversion of the rows above the rectangle (jpeg_skip_scanlines) and of the
 * columns beside it (jpeg_crop_scanline), and stops after its last row; only the entropy decoding
 * of the rows above remains (a decoder cannot skip that). Built by data/jpeg_region.py, called
 * through ctypes; see that module for the contract the Python side relies on.
 */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

/* Columns decoded beyond each side of the rectangle. jpeg_crop_scanline widens the range to whole
 * iMCUs, and the chroma upsampling at the range's edge then replicates the edge column instead of
 * reading its neighbour: the outermost decoded columns can differ from a full decode's. With this
 * margin those columns lie outside the rectangle (or at the image's own edge, where a full decode
 * replicates too). */
#define COLUMN_MARGIN 16

enum {
    REGION_OK = 0,
    REGION_ERROR = -1,       /* libjpeg raised: corrupt or unsupported data */
    REGION_UNSUPPORTED = -2, /* CMYK / YCCK, or an uncommon sampling layout (common_sampling) */
    REGION_OUTSIDE = -3,     /* the rectangle does not lie inside the scaled image */
    REGION_WARNING = -4,     /* libjpeg warned (truncated or corrupt data): let the caller decide */
    REGION_NO_END = -5,      /* the data does not end with the end-of-image marker */
};

struct guard {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int warned;
};

static void on_error(j_common_ptr cinfo) { longjmp(((struct guard *)cinfo->err)->jump, 1); }

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) ((struct guard *)cinfo->err)->warned = 1;
}

/* Sampling layouts whose cropped decode is known to equal the whole decode: every chroma
 * component at 1x1 and luma at 1x1, 2x1, 1x2 or 2x2 (4:4:4, 4:2:2, 4:4:0, 4:2:0, greyscale).
 * libjpeg-turbo 2.1 crops luma 4x2 and 2x4 files wrongly at 1/2 and 1/4 scale (3.1 does not);
 * such rare layouts take the whole decode. */
static int common_sampling(const struct jpeg_decompress_struct *cinfo) {
    const jpeg_component_info *c = cinfo->comp_info;
    if (c[0].h_samp_factor > 2 || c[0].v_samp_factor > 2) return 0;
    for (int i = 1; i < cinfo->num_components; i++)
        if (c[i].h_samp_factor != 1 || c[i].v_samp_factor != 1) return 0;
    return 1;
}

/* Write the RGB pixels of the rectangle [x, x + w) x [y, y + h) of the image decoded at 1/denom
 * into out, h rows of w * 3 bytes, exactly as a full decode of the same file (accurate integer
 * IDCT, smooth upsampling: libjpeg's defaults) would hold them there. */
int jpeg_region_decode(const unsigned char *data, unsigned long length, int denom, int x, int y, int w, int h,
                       unsigned char *out) {
    /* A file cut short (the usual damage: an interrupted copy) lacks its end marker. Pillow refuses
     * those whatever the crop; without this check a rectangle in the intact part would decode. */
    if (length < 4 || data[length - 2] != 0xFF || data[length - 1] != 0xD9) return REGION_NO_END;
    struct jpeg_decompress_struct cinfo;
    struct guard err;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.warned = 0;
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return REGION_ERROR;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, length);
    jpeg_read_header(&cinfo, TRUE);
    if ((cinfo.jpeg_color_space != JCS_GRAYSCALE && cinfo.jpeg_color_space != JCS_YCbCr &&
         cinfo.jpeg_color_space != JCS_RGB) ||
        !common_sampling(&cinfo)) {
        jpeg_destroy_decompress(&cinfo);
        return REGION_UNSUPPORTED;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = denom;
    jpeg_start_decompress(&cinfo);
    int width = (int)cinfo.output_width, height = (int)cinfo.output_height;
    if (x < 0 || y < 0 || w <= 0 || h <= 0 || x + w > width || y + h > height) {
        jpeg_destroy_decompress(&cinfo);
        return REGION_OUTSIDE;
    }
    int first = x > COLUMN_MARGIN ? x - COLUMN_MARGIN : 0;
    int last = x + w + COLUMN_MARGIN < width ? x + w + COLUMN_MARGIN : width;
    JDIMENSION start = (JDIMENSION)first, span = (JDIMENSION)(last - first);
    jpeg_crop_scanline(&cinfo, &start, &span);
    /* Freed with the decompressor, also when libjpeg raises. */
    JSAMPARRAY row = (*cinfo.mem->alloc_sarray)((j_common_ptr)&cinfo, JPOOL_IMAGE, span * 3, 1);
    if (y > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)y) != (JDIMENSION)y) {
        jpeg_destroy_decompress(&cinfo);
        return REGION_ERROR;
    }
    size_t offset = (size_t)(x - (int)start) * 3, stride = (size_t)w * 3;
    for (int r = 0; r < h; r++) {
        if (jpeg_read_scanlines(&cinfo, row, 1) != 1) {
            jpeg_destroy_decompress(&cinfo);
            return REGION_ERROR;
        }
        memcpy(out + (size_t)r * stride, row[0] + offset, stride);
    }
    int warned = err.warned;
    /* The rows below the rectangle are not decoded at all: abort instead of finishing. */
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return warned ? REGION_WARNING : REGION_OK;
}
