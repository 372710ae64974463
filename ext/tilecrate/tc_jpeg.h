/* The codec core of tilecrate._jpeg (included once, by _jpeg.pyx; every function is static):
   re-encoding through libjpeg-turbo's API on the pixel and DCT paths, requantization (scalar,
   SSE2 and AVX2 lanes), Huffman tables as libjpeg's optimize pass makes them, and the self-tests
   the test suite calls. */
#ifndef TILECRATE_TC_JPEG_H
#define TILECRATE_TC_JPEG_H

#include <stdio.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <stdint.h>
#include <jpeglib.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define TC_MSG 200
#define TC_MAX_SIDE 16384
#define TC_MAX_PIXELS (1L << 26)
#define TC_MAX_SCANS 500
#define TC_ROWS 16

enum { TC_OK = 0, TC_NOT_JPEG = 1, TC_FAILED = 2, TC_NOT_SMALLER = 3 };
enum { TC_PIXEL = 0, TC_DCT = 1 };

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jb;
    char msg[TC_MSG];
} tc_err;

typedef struct {
    struct jpeg_progress_mgr pub;
    struct jpeg_decompress_struct *d;
} tc_progress;

typedef struct {
    struct jpeg_decompress_struct d;
    struct jpeg_compress_struct c;
    tc_err err;
    tc_progress prog;
    int ready;
    struct jpeg_destination_mgr dst;   /* our memory destination: see tc_dst_init */
    unsigned char *outbuf;      /* the live output buffer (freed on error, handed over on success) */
    unsigned long outsize;
    size_t outcap;
    size_t outhint;             /* first buffer size: the source tile's, so it rarely grows */
    unsigned char *rows;        /* pixel path scanline buffer */
    size_t rows_cap;
    long g_dc[NUM_HUFF_TBLS][257], g_ac[NUM_HUFF_TBLS][257];   /* pixel path symbol counts */
    int g_last_dc[MAX_COMPS_IN_SCAN];
} tc_ctx;

/* target tables of the requested quality: [0] luminance, [1] chrominance, natural order */
typedef struct {
    unsigned int q[2][DCTSIZE2];
    int roff;                   /* rounding offset for AC coefficients, in 1/256 (128 = nearest) */
    int optimize;               /* optimized Huffman tables (an extra pass, smaller output) */
    unsigned int max_w, max_h;  /* largest image accepted (the cache's tile size) */
} tc_tables;

static const unsigned int tc_std_lum[DCTSIZE2] = {
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99};
static const unsigned int tc_std_chr[DCTSIZE2] = {
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99};

/* the tables jpeg_set_quality(q, force_baseline=TRUE) installs */
static void tc_make_tables(tc_tables *t, int quality, int roff, int optimize,
                           unsigned int max_w, unsigned int max_h) {
    int scale = jpeg_quality_scaling(quality);
    for (int i = 0; i < DCTSIZE2; i++) {
        long a = ((long)tc_std_lum[i] * scale + 50L) / 100L;
        long b = ((long)tc_std_chr[i] * scale + 50L) / 100L;
        t->q[0][i] = (unsigned int)(a < 1 ? 1 : (a > 255 ? 255 : a));
        t->q[1][i] = (unsigned int)(b < 1 ? 1 : (b > 255 ? 255 : b));
    }
    t->roff = roff;
    t->optimize = optimize;
    t->max_w = max_w == 0 || max_w > TC_MAX_SIDE ? TC_MAX_SIDE : max_w;
    t->max_h = max_h == 0 || max_h > TC_MAX_SIDE ? TC_MAX_SIDE : max_h;
}

static void tc_error_exit(j_common_ptr cinfo) {
    tc_err *e = (tc_err *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, e->msg);
    longjmp(e->jb, 1);
}

/* a warning means corrupt or truncated data: the tile is not trusted, keep its bytes */
static void tc_emit_message(j_common_ptr cinfo, int level) {
    if (level < 0) {
        tc_err *e = (tc_err *)cinfo->err;
        (*cinfo->err->format_message)(cinfo, e->msg);
        longjmp(e->jb, 1);
    }
}

static void tc_output_message(j_common_ptr cinfo) { (void)cinfo; }

/* progressive files with thousands of scans are a known decoder DoS; tiles never need that */
static void tc_progress_monitor(j_common_ptr cinfo) {
    tc_progress *p = (tc_progress *)cinfo->progress;
    if (p->d != NULL && p->d->input_scan_number > TC_MAX_SCANS) {
        tc_err *e = (tc_err *)cinfo->err;
        snprintf(e->msg, TC_MSG, "more than %d scans", TC_MAX_SCANS);
        longjmp(e->jb, 1);
    }
}

/* A memory destination that always knows its live buffer. libjpeg's jpeg_mem_dest frees the
   buffer it gave the caller when it grows it and reports the new one only when compression
   finishes, so after an error mid-way the caller holds a freed pointer (a double free) and
   the live buffer leaks. */
#define TC_OUT_START 4096
#define TC_OUT_MAX_HINT (1 << 20)
static tc_ctx *tc_ctx_of_dest(j_compress_ptr c) {
    return (tc_ctx *)((char *)c->dest - offsetof(tc_ctx, dst));
}

static void tc_dst_init(j_compress_ptr c) {
    tc_ctx *x = tc_ctx_of_dest(c);
    free(x->outbuf);
    x->outsize = 0;
    x->outcap = x->outhint > TC_OUT_START ? x->outhint : TC_OUT_START;
    x->outbuf = (unsigned char *)malloc(x->outcap);
    if (x->outbuf == NULL) {
        x->outcap = 0;
        snprintf(x->err.msg, TC_MSG, "out of memory");
        longjmp(x->err.jb, 1);
    }
    c->dest->next_output_byte = x->outbuf;
    c->dest->free_in_buffer = x->outcap;
}

/* called when the buffer is full: double it, keep what is written */
static boolean tc_dst_empty(j_compress_ptr c) {
    tc_ctx *x = tc_ctx_of_dest(c);
    size_t cap = x->outcap * 2;
    unsigned char *nb = (unsigned char *)realloc(x->outbuf, cap);
    if (nb == NULL) {
        snprintf(x->err.msg, TC_MSG, "out of memory");
        longjmp(x->err.jb, 1);
    }
    x->outbuf = nb;
    c->dest->next_output_byte = nb + x->outcap;
    c->dest->free_in_buffer = cap - x->outcap;
    x->outcap = cap;
    return TRUE;
}

static void tc_dst_term(j_compress_ptr c) {
    tc_ctx *x = tc_ctx_of_dest(c);
    x->outsize = (unsigned long)(x->outcap - c->dest->free_in_buffer);
}

static int tc_ctx_init(tc_ctx *x) {
    memset(x, 0, sizeof(*x));
    x->d.err = jpeg_std_error(&x->err.pub);
    x->err.pub.error_exit = tc_error_exit;
    x->err.pub.emit_message = tc_emit_message;
    x->err.pub.output_message = tc_output_message;
    if (setjmp(x->err.jb)) return 0;
    jpeg_create_decompress(&x->d);
    x->c.err = &x->err.pub;
    jpeg_create_compress(&x->c);
    x->dst.init_destination = tc_dst_init;
    x->dst.empty_output_buffer = tc_dst_empty;
    x->dst.term_destination = tc_dst_term;
    x->c.dest = &x->dst;
    x->prog.pub.progress_monitor = tc_progress_monitor;
    x->prog.d = &x->d;
    x->d.progress = &x->prog.pub;
    x->ready = 1;
    return 1;
}

static void tc_ctx_free(tc_ctx *x) {
    if (x->ready) {
        jpeg_destroy_decompress(&x->d);
        jpeg_destroy_compress(&x->c);
    }
    free(x->outbuf);
    free(x->rows);
    x->outbuf = NULL; x->rows = NULL; x->ready = 0;
}

/* called after jpeg_read_header, before anything the image's size decides is allocated */
static int tc_check_header(tc_ctx *x, const tc_tables *t) {
    struct jpeg_decompress_struct *d = &x->d;
    if (d->image_width == 0 || d->image_height == 0) {
        snprintf(x->err.msg, TC_MSG, "unsupported size %ux%u", d->image_width, d->image_height);
        return 0;
    }
    if (d->image_width > t->max_w || d->image_height > t->max_h ||
        (long)d->image_width * (long)d->image_height > TC_MAX_PIXELS) {
        snprintf(x->err.msg, TC_MSG, "image %ux%u is larger than the %ux%u limit (the tile size)",
                 d->image_width, d->image_height, t->max_w, t->max_h);
        return 0;
    }
    if (d->num_components < 1 || d->num_components > 4) {
        snprintf(x->err.msg, TC_MSG, "unsupported component count %d", d->num_components);
        return 0;
    }
    return 1;
}

static void tc_copy_icc(tc_ctx *x) {
    for (jpeg_saved_marker_ptr m = x->d.marker_list; m != NULL; m = m->next) {
        if (m->marker == JPEG_APP0 + 2 && m->data_length >= 12 &&
            memcmp(m->data, "ICC_PROFILE", 12) == 0)
            jpeg_write_marker(&x->c, m->marker, m->data, m->data_length);
    }
}

static int tc_is_chroma(J_COLOR_SPACE cs, int ci) {
    return (cs == JCS_YCbCr || cs == JCS_YCCK) && (ci == 1 || ci == 2);
}

/* natural index of the k-th coefficient in zigzag order (what the entropy coder walks) */
static const int tc_zigzag[DCTSIZE2] = {
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48,
    41, 34, 27, 20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23,
    30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63};

/* zigzag position of each natural-order coefficient */
static int tc_zigzag_pos[DCTSIZE2];
#if defined(__SSE2__)
static uint64_t tc_zz_of_byte[8][256];
#endif
static int tc_avx2;
static void tc_init_zigzag(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    tc_avx2 = __builtin_cpu_supports("avx2");
#endif
    for (int k = 0; k < DCTSIZE2; k++) tc_zigzag_pos[tc_zigzag[k]] = k;
#if defined(__SSE2__)
    for (int i = 0; i < 8; i++)
        for (int b = 0; b < 256; b++) {
            uint64_t m = 0;
            for (int j = 0; j < 8; j++)
                if (b >> j & 1) m |= 1ULL << tc_zigzag_pos[8 * i + j];
            tc_zz_of_byte[i][b] = m;
        }
#endif
}

/* exported by libjpeg(-turbo) since 6b but declared only in the internal jchuff.h */
extern void jpeg_gen_optimal_table(j_compress_ptr cinfo, JHUFF_TBL *htbl, long freq[]);

/* Requantization by reciprocal multiply, no divide. The rule (unchanged): with source step s,
   new step t >= s and AC rounding offset roff/256 (DC: 128/256), a magnitude a becomes
   n = floor((256*a*s + roff*t) / (256*t)). Writing v = a*s = q*t + rem gives
   n = q + (256*rem >= (256 - roff)*t), because 256*rem + roff*t < 2*256*t. v < 2^31
   (|a| <= 32768, s <= 65535), so q = (m*v) >> 64 with m = ceil(2^64/t) is exact for t >= 2
   (Lemire, Kaser, Kurz 2019: exact for all 32-bit v). For t = 1, m = 2^64-1 gives q = v-1 and
   rem = 1 for v >= 1, and the threshold test (thr <= 256) adds the 1 back. Checked against the
   exact integer rule for every step pair and coefficient by _requant_selftest. */
typedef struct {
    uint64_t m[DCTSIZE2];
    uint32_t s[DCTSIZE2], step[DCTSIZE2], thr[DCTSIZE2];
    /* the same rule in 16-bit lanes, eight coefficients an instruction (tc_requant8) */
    uint16_t s16[DCTSIZE2], m16[DCTSIZE2], sh16[DCTSIZE2], t16[DCTSIZE2], thr16[DCTSIZE2],
             keep16[DCTSIZE2], lim16[DCTSIZE2];
    int requant;
    int lanes16;    /* every position fits the 16-bit rule (8-bit steps); set by tc_rq_begin */
} tc_rq;

static void tc_rq_begin(tc_rq *r) {
    r->requant = 0;
    r->lanes16 = 1;
}

/* The 16-bit rule, for s, t <= 255 and v = a*s <= 32767 (lim16 = 32767 / s; a larger |a| in a
   block sends that block to the scalar rule). q = floor(v/t) = floor(v*m / 2^(15+l)) with
   l = ceil(log2 t), m = ceil(2^(15+l)/t) < 2^16 (Granlund, Montgomery 1994, Thm 4.2 with
   N = 15: m*t - 2^(15+l) < t <= 2^l), taken as mulhi(2v, m) then mulhi(., 2^(16-l)), both
   exact floors. n = q + (rem >= ceil((256 - roff)*t / 256)), the integer form of the threshold
   above. A position whose step does not change (t == s) keeps a as it is (keep16), whatever
   its size. Checked against the exact rule by _requant_selftest16. */
static void tc_rq_set16(tc_rq *r, int k, uint32_t s, uint32_t step, int roff) {
    if (step == s) {
        r->keep16[k] = 0xFFFF; r->lim16[k] = 0xFFFF;
        r->s16[k] = r->m16[k] = r->sh16[k] = r->t16[k] = r->thr16[k] = 0;
        return;
    }
    if (s > 255 || step > 255) { r->lanes16 = 0; return; }
    uint32_t l = 32 - (uint32_t)__builtin_clz(step - 1);      /* step >= 2: ceil(log2 step) */
    uint32_t m = ((1u << (15 + l)) + step - 1) / step;
    if (m > 0xFFFF) { r->lanes16 = 0; return; }
    r->keep16[k] = 0;
    r->lim16[k] = (uint16_t)(32767 / s);
    r->s16[k] = (uint16_t)s;
    r->m16[k] = (uint16_t)m;
    r->sh16[k] = (uint16_t)(1u << (16 - l));
    r->t16[k] = (uint16_t)step;
    r->thr16[k] = (uint16_t)(((uint32_t)(256 - roff) * step + 255) / 256 - 1);
}

static void tc_rq_set(tc_rq *r, int k, uint32_t s, uint32_t step, int roff) {
    r->s[k] = s;
    r->step[k] = step;
    r->thr[k] = (uint32_t)(256 - roff) * step;
    r->m[k] = step == 1 ? UINT64_MAX : UINT64_MAX / step + 1;
    tc_rq_set16(r, k, s, step, roff);
}

static inline uint32_t tc_requant_mag(uint32_t a, const tc_rq *r, int k) {
    uint32_t v = a * r->s[k], q, rem;
#if defined(__SIZEOF_INT128__)
    q = (uint32_t)(((unsigned __int128)r->m[k] * v) >> 64);
#else
    q = v / r->step[k];     /* no 128-bit multiply: the divide is still exact */
#endif
    rem = v - q * r->step[k];
    return q + (rem * 256u >= r->thr[k]);
}

static inline void tc_requant_block(JCOEF *co, const tc_rq *r) {
    for (int k = 0; k < DCTSIZE2; k++) {
        int v = co[k];
        uint32_t n = tc_requant_mag((uint32_t)(v < 0 ? -v : v), r, k);
        co[k] = (JCOEF)(v < 0 ? -(int)n : (int)n);
    }
}

/* the previous rule, in doubles (kept for the self-test only) */
static uint32_t tc_requant_double(uint32_t a, uint32_t s, uint32_t step, int roff) {
    return (uint32_t)(((double)a * ((double)s * 256.0) + (double)step * (double)roff) / ((double)step * 256.0));
}

/* counts of disagreement over s in [1, s_max], t in [s, max(s, t_max)], a in [0, a_max]:
   [0] reciprocal vs exact integer rule, [1] doubles vs exact, [2] cases checked */
static void tc_requant_selftest(int roff, uint32_t s_max, uint32_t t_max, uint32_t a_max, uint64_t out[3]) {
    tc_rq r;
    out[0] = out[1] = out[2] = 0;
    for (uint32_t s = 1; s <= s_max; s++) {
        uint32_t top = s > t_max ? s : t_max;
        for (uint32_t t = s; t <= top; t++) {
            tc_rq_set(&r, 1, s, t, roff);
            for (uint32_t a = 0; a <= a_max; a++) {
                uint64_t exact = ((uint64_t)a * s * 256u + (uint64_t)roff * t) / ((uint64_t)t * 256u);
                out[0] += tc_requant_mag(a, &r, 1) != exact;
                out[1] += tc_requant_double(a, s, t, roff) != exact;
                out[2]++;
            }
        }
    }
}

/* libjpeg's jpeg_gen_optimal_table (Annex K.2, ties to the larger symbol), the same tables
   from a heap of the symbols in use instead of two scans over all 257 per merge (the library
   version was ~9 % of a DCT re-encode). 0 if a code would exceed 32 bits (libjpeg errors). */
static inline int tc_heap_less(const long *f, const int *sym, int i, int j) {
    return f[i] < f[j] || (f[i] == f[j] && sym[i] > sym[j]);
}

static void tc_heap_push(long *f, int *sym, int *n, long fv, int sv) {
    int i = (*n)++;
    f[i] = fv; sym[i] = sv;
    while (i > 0) {
        int p = (i - 1) >> 1;
        if (!tc_heap_less(f, sym, i, p)) break;
        long tf = f[i]; f[i] = f[p]; f[p] = tf;
        int ts = sym[i]; sym[i] = sym[p]; sym[p] = ts;
        i = p;
    }
}

static int tc_heap_pop(long *f, int *sym, int *n) {
    int top = sym[0], i = 0;
    (*n)--;
    f[0] = f[*n]; sym[0] = sym[*n];
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < *n && tc_heap_less(f, sym, l, m)) m = l;
        if (r < *n && tc_heap_less(f, sym, r, m)) m = r;
        if (m == i) break;
        long tf = f[i]; f[i] = f[m]; f[m] = tf;
        int ts = sym[i]; sym[i] = sym[m]; sym[m] = ts;
        i = m;
    }
    return top;
}

static int tc_gen_optimal_table(JHUFF_TBL *htbl, long freq[]) {
    UINT8 bits[33];
    int codesize[257], others[257], hs[257], pos[33];
    long hf[257], total = 0, merged[257];
    int n = 0, i, j, p;
    memset(bits, 0, sizeof(bits));
    freq[256] = 1;
    for (i = 0; i <= 256; i++) {
        codesize[i] = 0;
        others[i] = -1;
        if (freq[i] < 0) return 0;
        if (freq[i]) { total += freq[i]; tc_heap_push(hf, hs, &n, freq[i], i); }
        merged[i] = freq[i];
    }
    /* libjpeg ignores counts above 1e9; ours never get near (at most 2^28 symbols a table).
       No real symbol at all (never from our counters: every block codes a DC and an EOB or
       a last AC) would send libjpeg's length search below bits[0]. */
    if (total >= 1000000000L || n < 2) return 0;
    while (n >= 2) {
        int c1 = tc_heap_pop(hf, hs, &n), c2 = tc_heap_pop(hf, hs, &n);
        merged[c1] += merged[c2];
        merged[c2] = 0;
        tc_heap_push(hf, hs, &n, merged[c1], c1);
        codesize[c1]++;
        while (others[c1] >= 0) { c1 = others[c1]; codesize[c1]++; }
        others[c1] = c2;
        codesize[c2]++;
        while (others[c2] >= 0) { c2 = others[c2]; codesize[c2]++; }
    }
    for (i = 0; i <= 256; i++) {
        if (codesize[i]) {
            if (codesize[i] > 32) return 0;
            bits[codesize[i]]++;
        }
    }
    for (i = 32; i > 16; i--) {
        while (bits[i] > 0) {
            j = i - 2;
            while (bits[j] == 0) j--;
            bits[i] -= 2;
            bits[i - 1]++;
            bits[j + 1] += 2;
            bits[j]--;
        }
    }
    while (bits[i] == 0) i--;
    bits[i]--;
    memcpy(htbl->bits, bits, sizeof(htbl->bits));
    /* symbols by (unlimited) code length, then symbol: a counting sort */
    memset(pos, 0, sizeof(pos));
    for (j = 0; j <= 255; j++) if (codesize[j]) pos[codesize[j]]++;
    for (i = 1, p = 0; i <= 32; i++) { int c = pos[i]; pos[i] = p; p += c; }
    for (j = 0; j <= 255; j++) if (codesize[j]) htbl->huffval[pos[codesize[j]]++] = (UINT8)j;
    htbl->sent_table = FALSE;
    return 1;
}

static inline int tc_nbits(int v) {
    unsigned int a = (unsigned int)(v < 0 ? -v : v);
    return a == 0 ? 0 : 32 - __builtin_clz(a);
}

/* bit n set when natural-order coefficient n is nonzero */
static inline uint64_t tc_nonzero_mask(const JCOEF *co) {
#if defined(__SSE2__)
    const __m128i z = _mm_setzero_si128();
    uint64_t m = 0;
    for (int i = 0; i < 4; i++) {
        __m128i a = _mm_loadu_si128((const __m128i *)(co + 16 * i));
        __m128i b = _mm_loadu_si128((const __m128i *)(co + 16 * i + 8));
        __m128i p = _mm_packs_epi16(_mm_cmpeq_epi16(a, z), _mm_cmpeq_epi16(b, z));
        m |= (uint64_t)(uint16_t)_mm_movemask_epi8(p) << (16 * i);
    }
    return ~m;
#else
    uint64_t m = 0;
    for (int k = 0; k < DCTSIZE2; k++) m |= (uint64_t)(co[k] != 0) << k;
    return m;
#endif
}

#if defined(__SSE2__)
/* requantize the eight coefficients at co[0..7] (positions k..k+7, magnitudes a, signs sg) */
static inline __m128i tc_requant8(__m128i a, __m128i sg, const tc_rq *r, int k) {
    __m128i s = _mm_loadu_si128((const __m128i *)(r->s16 + k));
    __m128i v = _mm_mullo_epi16(a, s);
    __m128i h = _mm_mulhi_epu16(_mm_add_epi16(v, v), _mm_loadu_si128((const __m128i *)(r->m16 + k)));
    __m128i q = _mm_mulhi_epu16(h, _mm_loadu_si128((const __m128i *)(r->sh16 + k)));
    __m128i rem = _mm_sub_epi16(v, _mm_mullo_epi16(q, _mm_loadu_si128((const __m128i *)(r->t16 + k))));
    __m128i keep = _mm_loadu_si128((const __m128i *)(r->keep16 + k));
    q = _mm_sub_epi16(q, _mm_cmpgt_epi16(rem, _mm_loadu_si128((const __m128i *)(r->thr16 + k))));
    q = _mm_or_si128(_mm_and_si128(keep, a), _mm_andnot_si128(keep, q));
    return _mm_sub_epi16(_mm_xor_si128(q, sg), sg);
}

/* the whole block in 16-bit lanes; sets *zz (zigzag nonzero mask) and returns 1, or returns 0
   untouched when a magnitude is too large for the lanes (the caller uses the scalar rule) */
static inline __attribute__((always_inline)) int tc_requant_block16(JCOEF *co, const tc_rq *r, uint64_t *zz) {
    const __m128i z = _mm_setzero_si128();
    __m128i bad = z;
    uint64_t nat = 0;
    int i;
    for (i = 0; i < 8; i++) {
        __m128i x = _mm_loadu_si128((const __m128i *)(co + 8 * i)), sg = _mm_srai_epi16(x, 15);
        __m128i a = _mm_sub_epi16(_mm_xor_si128(x, sg), sg);        /* -32768 -> 32768 (unsigned) */
        bad = _mm_or_si128(bad, _mm_subs_epu16(a, _mm_loadu_si128((const __m128i *)(r->lim16 + 8 * i))));
    }
    if (_mm_movemask_epi8(_mm_cmpeq_epi16(bad, z)) != 0xFFFF) return 0;
    for (i = 0; i < 8; i += 2) {
        __m128i x0 = _mm_loadu_si128((const __m128i *)(co + 8 * i)), s0 = _mm_srai_epi16(x0, 15);
        __m128i x1 = _mm_loadu_si128((const __m128i *)(co + 8 * i + 8)), s1 = _mm_srai_epi16(x1, 15);
        __m128i y0 = tc_requant8(_mm_sub_epi16(_mm_xor_si128(x0, s0), s0), s0, r, 8 * i);
        __m128i y1 = tc_requant8(_mm_sub_epi16(_mm_xor_si128(x1, s1), s1), s1, r, 8 * i + 8);
        _mm_storeu_si128((__m128i *)(co + 8 * i), y0);
        _mm_storeu_si128((__m128i *)(co + 8 * i + 8), y1);
        nat |= (uint64_t)(uint16_t)_mm_movemask_epi8(
                   _mm_packs_epi16(_mm_cmpeq_epi16(y0, z), _mm_cmpeq_epi16(y1, z))) << (8 * i);
    }
    nat = ~nat;
    *zz = 0;
    for (i = 0; i < 8; i++) *zz |= tc_zz_of_byte[i][(nat >> (8 * i)) & 0xFF];
    return 1;
}
#endif

/* requantize one block (only its nonzero coefficients) and add the symbols libjpeg's optimize
   pass (encode_mcu_gather) would count for it; 0 if a coefficient is out of baseline range */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* tc_requant_block16 sixteen lanes at a time, for CPUs with AVX2 (tc_avx2, set once at import) */
__attribute__((target("avx2"))) static inline __m256i tc_requant16(__m256i a, __m256i sg, const tc_rq *r, int k) {
    __m256i v = _mm256_mullo_epi16(a, _mm256_loadu_si256((const __m256i *)(r->s16 + k)));
    __m256i h = _mm256_mulhi_epu16(_mm256_add_epi16(v, v), _mm256_loadu_si256((const __m256i *)(r->m16 + k)));
    __m256i q = _mm256_mulhi_epu16(h, _mm256_loadu_si256((const __m256i *)(r->sh16 + k)));
    __m256i rem = _mm256_sub_epi16(v, _mm256_mullo_epi16(q, _mm256_loadu_si256((const __m256i *)(r->t16 + k))));
    __m256i keep = _mm256_loadu_si256((const __m256i *)(r->keep16 + k));
    q = _mm256_sub_epi16(q, _mm256_cmpgt_epi16(rem, _mm256_loadu_si256((const __m256i *)(r->thr16 + k))));
    q = _mm256_or_si256(_mm256_and_si256(keep, a), _mm256_andnot_si256(keep, q));
    return _mm256_sub_epi16(_mm256_xor_si256(q, sg), sg);
}

__attribute__((target("avx2"))) static int tc_requant_block16_avx2(JCOEF *co, const tc_rq *r, uint64_t *zz) {
    const __m256i z = _mm256_setzero_si256();
    __m256i bad = z;
    uint64_t nat = 0;
    int i;
    for (i = 0; i < 4; i++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(co + 16 * i)), sg = _mm256_srai_epi16(x, 15);
        __m256i a = _mm256_sub_epi16(_mm256_xor_si256(x, sg), sg);
        bad = _mm256_or_si256(bad, _mm256_subs_epu16(a, _mm256_loadu_si256((const __m256i *)(r->lim16 + 16 * i))));
    }
    if (!_mm256_testz_si256(bad, bad)) return 0;
    for (i = 0; i < 4; i += 2) {
        __m256i x0 = _mm256_loadu_si256((const __m256i *)(co + 16 * i)), s0 = _mm256_srai_epi16(x0, 15);
        __m256i x1 = _mm256_loadu_si256((const __m256i *)(co + 16 * i + 16)), s1 = _mm256_srai_epi16(x1, 15);
        __m256i y0 = tc_requant16(_mm256_sub_epi16(_mm256_xor_si256(x0, s0), s0), s0, r, 16 * i);
        __m256i y1 = tc_requant16(_mm256_sub_epi16(_mm256_xor_si256(x1, s1), s1), s1, r, 16 * i + 16);
        _mm256_storeu_si256((__m256i *)(co + 16 * i), y0);
        _mm256_storeu_si256((__m256i *)(co + 16 * i + 16), y1);
        /* packs works per 128-bit half: [y0 lo, y1 lo, y0 hi, y1 hi] -> natural order */
        __m256i eq = _mm256_permute4x64_epi64(
            _mm256_packs_epi16(_mm256_cmpeq_epi16(y0, z), _mm256_cmpeq_epi16(y1, z)), 0xD8);
        nat |= (uint64_t)(uint32_t)_mm256_movemask_epi8(eq) << (16 * i);
    }
    nat = ~nat;
    *zz = 0;
    for (i = 0; i < 8; i++) *zz |= tc_zz_of_byte[i][(nat >> (8 * i)) & 0xFF];
    return 1;
}
/* res[0..15] = tc_requant16 of av (the self-test's view of the AVX2 lanes) */
__attribute__((target("avx2"))) static void tc_requant16_probe(const uint16_t *av, int neg, const tc_rq *r, int16_t *res) {
    __m256i sg = _mm256_set1_epi16(neg ? -1 : 0);
    _mm256_storeu_si256((__m256i *)res, tc_requant16(_mm256_loadu_si256((const __m256i *)av), sg, r, 0));
}
#define TC_BLOCK16(co, r, zz) (tc_avx2 ? tc_requant_block16_avx2(co, r, zz) : tc_requant_block16(co, r, zz))
#define TC_HAVE_AVX2 1
#else
#define TC_BLOCK16(co, r, zz) tc_requant_block16(co, r, zz)
#endif

/* which lanes the DCT path uses: 2 = AVX2, 1 = SSE2; a test hook may force SSE2 (1) or ask for
   AVX2 back (2, granted only where the CPU has it); returns the level now in use */
static int tc_simd_level(int want) {
#if defined(TC_HAVE_AVX2)
    if (want == 1) tc_avx2 = 0;
    else if (want == 2) { __builtin_cpu_init(); tc_avx2 = __builtin_cpu_supports("avx2"); }
    return tc_avx2 ? 2 : 1;
#else
    (void)want;
    return 1;
#endif
}

static inline int tc_stats(const JCOEF *co, uint64_t zz, int *last_dc, long *dc, long *ac);
static inline int tc_block(JCOEF *co, const tc_rq *r, int *last_dc, long *dc, long *ac) {
    uint64_t nz, zz = 0;
#if defined(__SSE2__)
    if (r->requant && r->lanes16 && TC_BLOCK16(co, r, &zz)) return tc_stats(co, zz, last_dc, dc, ac);
#endif
    nz = tc_nonzero_mask(co);
    if (r->requant) {
        /* branch-free: whether a coefficient survives requantization is data, not a pattern */
        while (nz) {
            int n = __builtin_ctzll(nz);
            int v = co[n], sign = v >> 31;
            int q = (int)tc_requant_mag((uint32_t)((v ^ sign) - sign), r, n);
            nz &= nz - 1;
            co[n] = (JCOEF)((q ^ sign) - sign);
            zz |= (uint64_t)(q != 0) << tc_zigzag_pos[n];
        }
    } else {
#if defined(__SSE2__)
        for (int i = 0; i < 8; i++) zz |= tc_zz_of_byte[i][(nz >> (8 * i)) & 0xFF];
#else
        while (nz) {
            int n = __builtin_ctzll(nz);
            nz &= nz - 1;
            zz |= 1ULL << tc_zigzag_pos[n];
        }
#endif
    }
    return tc_stats(co, zz, last_dc, dc, ac);
}

/* the symbols libjpeg's optimize pass (encode_mcu_gather) counts for a block whose nonzero
   coefficients are the bits of zz (zigzag order); 0 if a coefficient is out of baseline range */
static inline int tc_stats(const JCOEF *co, uint64_t zz, int *last_dc, long *dc, long *ac) {
    int nb, prev = 0;
    unsigned int seen = 0;      /* OR of the AC magnitudes: >= 1024 iff one needs > 10 bits */
    nb = tc_nbits(co[0] - *last_dc);
    if (nb > 11) return 0;
    *last_dc = co[0];
    dc[nb]++;
    zz &= ~1ULL;
    while (zz) {
        int k = __builtin_ctzll(zz), run = k - prev - 1;
        zz &= zz - 1;
        while (run > 15) { ac[0xF0]++; run -= 16; }
        int v = co[tc_zigzag[k]];
        unsigned int a = (unsigned int)(v < 0 ? -v : v);
        seen |= a;
        nb = 32 - __builtin_clz(a);             /* a != 0 (a bit of zz), nb <= 16: index <= 256 */
        ac[(run << 4) + nb]++;
        prev = k;
    }
    if (seen >= 1024) return 0;
    if (prev < DCTSIZE2 - 1) ac[0]++;
    return 1;
}

/* The public layout of libjpeg's entropy encoder object (jpegint.h, unchanged since 6b). */
struct tc_entropy_encoder {
    void (*start_pass)(j_compress_ptr cinfo, boolean gather_statistics);
    boolean (*encode_mcu)(j_compress_ptr cinfo, JBLOCKROW *MCU_data);
    void (*finish_pass)(j_compress_ptr cinfo);
};

static const tc_rq tc_no_requant = {.requant = 0};

/* the optimize pass's statistics, counted by tc_block instead of libjpeg's encode_mcu_gather */
static boolean tc_gather_mcu(j_compress_ptr cinfo, JBLOCKROW *MCU_data) {
    tc_ctx *x = (tc_ctx *)cinfo->client_data;
    for (int blkn = 0; blkn < cinfo->blocks_in_MCU; blkn++) {
        int ci = cinfo->MCU_membership[blkn];
        jpeg_component_info *comp = cinfo->cur_comp_info[ci];
        if (!tc_block(MCU_data[blkn][0], &tc_no_requant, &x->g_last_dc[ci],
                      x->g_dc[comp->dc_tbl_no], x->g_ac[comp->ac_tbl_no])) {
            snprintf(x->err.msg, TC_MSG, "DCT coefficient out of range");
            longjmp(x->err.jb, 1);
        }
    }
    return TRUE;
}

static void tc_table_error(tc_ctx *x) {
    snprintf(x->err.msg, TC_MSG, "Huffman code longer than 32 bits");
    longjmp(x->err.jb, 1);
}

/* what libjpeg's finish_pass_gather does: one optimal table per table slot in use */
static void tc_gather_finish(j_compress_ptr cinfo) {
    tc_ctx *x = (tc_ctx *)cinfo->client_data;
    int did_dc[NUM_HUFF_TBLS] = {0}, did_ac[NUM_HUFF_TBLS] = {0};
    for (int ci = 0; ci < cinfo->comps_in_scan; ci++) {
        int dt = cinfo->cur_comp_info[ci]->dc_tbl_no, at = cinfo->cur_comp_info[ci]->ac_tbl_no;
        if (!did_dc[dt]) {
            if (cinfo->dc_huff_tbl_ptrs[dt] == NULL) cinfo->dc_huff_tbl_ptrs[dt] = jpeg_alloc_huff_table((j_common_ptr)cinfo);
            if (!tc_gen_optimal_table(cinfo->dc_huff_tbl_ptrs[dt], x->g_dc[dt])) tc_table_error(x);
            did_dc[dt] = 1;
        }
        if (!did_ac[at]) {
            if (cinfo->ac_huff_tbl_ptrs[at] == NULL) cinfo->ac_huff_tbl_ptrs[at] = jpeg_alloc_huff_table((j_common_ptr)cinfo);
            if (!tc_gen_optimal_table(cinfo->ac_huff_tbl_ptrs[at], x->g_ac[at])) tc_table_error(x);
            did_ac[at] = 1;
        }
    }
}

/* jpeg_start_compress has set up the statistics pass (nothing is coded until the first
   scanlines arrive): swap in the fast counter for that pass only; libjpeg's own start_pass
   installs the real coder for the output pass */
static void tc_hook_gather(tc_ctx *x, const tc_tables *t) {
    struct jpeg_compress_struct *c = &x->c;
    struct tc_entropy_encoder *e = (struct tc_entropy_encoder *)c->entropy;
    if (t->optimize != 2 || !c->optimize_coding || c->progressive_mode || c->arith_code || c->restart_interval != 0 ||
        c->restart_in_rows != 0 || c->comps_in_scan > MAX_COMPS_IN_SCAN || e == NULL)
        return;
    memset(x->g_dc, 0, sizeof(x->g_dc));
    memset(x->g_ac, 0, sizeof(x->g_ac));
    memset(x->g_last_dc, 0, sizeof(x->g_last_dc));
    c->client_data = x;
    e->encode_mcu = tc_gather_mcu;
    e->finish_pass = tc_gather_finish;
}

/* decode to the source colour space, encode at the requested quality */
static int tc_pixel(tc_ctx *x, int quality, const tc_tables *t) {
    struct jpeg_decompress_struct *d = &x->d;
    struct jpeg_compress_struct *c = &x->c;
    J_COLOR_SPACE cs;
    JSAMPROW rowp[TC_ROWS];
    size_t stride;
    int ci, i;
    jpeg_read_header(d, TRUE);
    if (!tc_check_header(x, t)) return 0;
    cs = d->jpeg_color_space;
    if (cs != JCS_GRAYSCALE && cs != JCS_YCbCr && cs != JCS_RGB && cs != JCS_CMYK && cs != JCS_YCCK) {
        snprintf(x->err.msg, TC_MSG, "unsupported colour space %d", (int)cs);
        return 0;
    }
    d->out_color_space = cs;           /* no colour conversion on the way out or back in */
    /* replicated chroma, averaged back down by the encoder at the same sampling, returns the
       source chroma; fancy (triangle) upsampling would blur it and costs time */
    d->do_fancy_upsampling = FALSE;
    jpeg_start_decompress(d);
    stride = (size_t)d->output_width * (size_t)d->output_components;
    if (x->rows_cap < stride * TC_ROWS) {
        unsigned char *nb = (unsigned char *)realloc(x->rows, stride * TC_ROWS);
        if (nb == NULL) { snprintf(x->err.msg, TC_MSG, "out of memory"); return 0; }
        x->rows = nb; x->rows_cap = stride * TC_ROWS;
    }
    for (i = 0; i < TC_ROWS; i++) rowp[i] = x->rows + (size_t)i * stride;
    c->image_width = d->output_width;
    c->image_height = d->output_height;
    c->input_components = d->output_components;
    c->in_color_space = cs;
    jpeg_set_defaults(c);
    if (c->num_components == d->num_components)
        for (ci = 0; ci < c->num_components; ci++) {
            c->comp_info[ci].h_samp_factor = d->comp_info[ci].h_samp_factor;
            c->comp_info[ci].v_samp_factor = d->comp_info[ci].v_samp_factor;
        }
    jpeg_set_quality(c, quality, TRUE);
    c->optimize_coding = t->optimize ? TRUE : FALSE;
    c->write_JFIF_header = d->saw_JFIF_marker;
    if (d->saw_JFIF_marker) {
        c->density_unit = d->density_unit;
        c->X_density = d->X_density;
        c->Y_density = d->Y_density;
    }
    jpeg_start_compress(c, TRUE);
    tc_hook_gather(x, t);
    tc_copy_icc(x);
    while (d->output_scanline < d->output_height) {
        JDIMENSION n = jpeg_read_scanlines(d, rowp, TC_ROWS);
        if (n == 0) { snprintf(x->err.msg, TC_MSG, "decoder returned no rows"); return 0; }
        jpeg_write_scanlines(c, rowp, n);
    }
    jpeg_finish_compress(c);
    jpeg_finish_decompress(d);
    return 1;
}

/* requantize coefficients: step = max(source, target), AC rounded toward zero by roff.
   With t->optimize == 2 the Huffman statistics are gathered in the same walk over the
   blocks (in the encoder's MCU order), replacing libjpeg's separate optimize pass. */
static int tc_dct(tc_ctx *x, const tc_tables *t) {
    struct jpeg_decompress_struct *d = &x->d;
    struct jpeg_compress_struct *c = &x->c;
    jvirt_barray_ptr *coefs;
    unsigned int steps[MAX_COMPONENTS][DCTSIZE2];
    int slot_of[MAX_COMPONENTS], last_dc[MAX_COMPONENTS];
    tc_rq rq[MAX_COMPONENTS];
    long dcf[NUM_HUFF_TBLS][257], acf[NUM_HUFF_TBLS][257];
    int nslots = 0, ci, k, fused = 0, nc;
    jpeg_read_header(d, TRUE);
    if (!tc_check_header(x, t)) return 0;
    coefs = jpeg_read_coefficients(d);
    if (coefs == NULL) { snprintf(x->err.msg, TC_MSG, "no coefficients"); return 0; }
    nc = d->num_components;
    for (ci = 0; ci < nc; ci++) {
        JQUANT_TBL *src = d->comp_info[ci].quant_table;
        const unsigned int *req = t->q[tc_is_chroma(d->jpeg_color_space, ci) ? 1 : 0];
        if (src == NULL) { snprintf(x->err.msg, TC_MSG, "component %d has no quantization table", ci); return 0; }
        tc_rq_begin(&rq[ci]);
        for (k = 0; k < DCTSIZE2; k++) {
            unsigned int s = src->quantval[k];
            if (s == 0) { snprintf(x->err.msg, TC_MSG, "zero quantization step"); return 0; }
            steps[ci][k] = s > req[k] ? s : req[k];
            rq[ci].requant |= steps[ci][k] != s;
            tc_rq_set(&rq[ci], k, s, steps[ci][k], k == 0 ? 128 : t->roff);
        }
    }
    jpeg_copy_critical_parameters(d, c);
    /* one table slot per distinct step table (components may have shared a source table) */
    for (ci = 0; ci < nc; ci++) {
        int found = -1;
        for (int s = 0; s < ci && found < 0; s++)
            if (memcmp(steps[s], steps[ci], sizeof(steps[ci])) == 0) found = slot_of[s];
        if (found < 0) {
            found = nslots++;
            if (c->quant_tbl_ptrs[found] == NULL)
                c->quant_tbl_ptrs[found] = jpeg_alloc_quant_table((j_common_ptr)c);
            for (k = 0; k < DCTSIZE2; k++) c->quant_tbl_ptrs[found]->quantval[k] = (UINT16)steps[ci][k];
            c->quant_tbl_ptrs[found]->sent_table = FALSE;
        }
        slot_of[ci] = found;
        c->comp_info[ci].quant_tbl_no = found;
    }
    /* the fused walk must visit blocks exactly as the encoder will: one scan, no restart
       markers, and (interleaved) no dummy blocks at the right or bottom edge */
    if (t->optimize == 2 && !c->arith_code && !c->progressive_mode && c->restart_interval == 0 && c->restart_in_rows == 0 && nc <= MAX_COMPS_IN_SCAN) {
        fused = 1;
        if (nc > 1) {
            JDIMENSION mcw = (JDIMENSION)(8 * d->max_h_samp_factor), mch = (JDIMENSION)(8 * d->max_v_samp_factor);
            JDIMENSION mcus_row = (d->image_width + mcw - 1) / mcw, mcu_rows = (d->image_height + mch - 1) / mch;
            for (ci = 0; ci < nc; ci++) {
                jpeg_component_info *comp = &d->comp_info[ci];
                if (comp->width_in_blocks != (JDIMENSION)comp->h_samp_factor * mcus_row ||
                    comp->height_in_blocks != (JDIMENSION)comp->v_samp_factor * mcu_rows)
                    fused = 0;
            }
        }
    }
    if (fused) {
        memset(dcf, 0, sizeof(dcf));
        memset(acf, 0, sizeof(acf));
        for (ci = 0; ci < nc; ci++) last_dc[ci] = 0;
        if (nc == 1) {
            jpeg_component_info *comp = &d->comp_info[0];
            long *dc = dcf[c->comp_info[0].dc_tbl_no], *ac = acf[c->comp_info[0].ac_tbl_no];
            for (JDIMENSION row = 0; row < comp->height_in_blocks; row++) {
                JBLOCKROW br = (*d->mem->access_virt_barray)((j_common_ptr)d, coefs[0], row, 1, TRUE)[0];
                for (JDIMENSION b = 0; b < comp->width_in_blocks; b++) {
                    if (!tc_block(br[b], &rq[0], &last_dc[0], dc, ac)) goto range;
                }
            }
        } else {
            JDIMENSION mcu_rows = d->comp_info[0].height_in_blocks / d->comp_info[0].v_samp_factor;
            JDIMENSION mcus_row = d->comp_info[0].width_in_blocks / d->comp_info[0].h_samp_factor;
            JBLOCKARRAY rows[MAX_COMPONENTS];
            for (JDIMENSION my = 0; my < mcu_rows; my++) {
                for (ci = 0; ci < nc; ci++) {
                    int v = d->comp_info[ci].v_samp_factor;
                    rows[ci] = (*d->mem->access_virt_barray)((j_common_ptr)d, coefs[ci], my * v, v, TRUE);
                }
                for (JDIMENSION mx = 0; mx < mcus_row; mx++)
                    for (ci = 0; ci < nc; ci++) {
                        int h = d->comp_info[ci].h_samp_factor, v = d->comp_info[ci].v_samp_factor;
                        long *dc = dcf[c->comp_info[ci].dc_tbl_no], *ac = acf[c->comp_info[ci].ac_tbl_no];
                        for (int yy = 0; yy < v; yy++)
                            for (int xx = 0; xx < h; xx++) {
                                JCOEF *co = rows[ci][yy][mx * h + xx];
                                if (!tc_block(co, &rq[ci], &last_dc[ci], dc, ac)) goto range;
                            }
                    }
            }
        }
        {
            /* build each shared table once */
            int dc_built[NUM_HUFF_TBLS] = {0}, ac_built[NUM_HUFF_TBLS] = {0};
            for (ci = 0; ci < nc; ci++) {
                int dt = c->comp_info[ci].dc_tbl_no, at = c->comp_info[ci].ac_tbl_no;
                if (!dc_built[dt]) {
                    if (c->dc_huff_tbl_ptrs[dt] == NULL) c->dc_huff_tbl_ptrs[dt] = jpeg_alloc_huff_table((j_common_ptr)c);
                    if (!tc_gen_optimal_table(c->dc_huff_tbl_ptrs[dt], dcf[dt])) goto table;
                    dc_built[dt] = 1;
                }
                if (!ac_built[at]) {
                    if (c->ac_huff_tbl_ptrs[at] == NULL) c->ac_huff_tbl_ptrs[at] = jpeg_alloc_huff_table((j_common_ptr)c);
                    if (!tc_gen_optimal_table(c->ac_huff_tbl_ptrs[at], acf[at])) goto table;
                    ac_built[at] = 1;
                }
            }
        }
        c->optimize_coding = FALSE;
    } else {
        /* the scalar rule only: optimize 0/1 are the reference the fused walk is tested against */
        for (ci = 0; ci < nc; ci++) {
            jpeg_component_info *comp = &d->comp_info[ci];
            if (!rq[ci].requant) continue;
            for (JDIMENSION row = 0; row < comp->height_in_blocks; row++) {
                JBLOCKROW br = (*d->mem->access_virt_barray)((j_common_ptr)d, coefs[ci], row, 1, TRUE)[0];
                for (JDIMENSION b = 0; b < comp->width_in_blocks; b++) tc_requant_block(br[b], &rq[ci]);
            }
        }
        c->optimize_coding = t->optimize ? TRUE : FALSE;
    }
    jpeg_write_coefficients(c, coefs);
    tc_copy_icc(x);
    jpeg_finish_compress(c);
    jpeg_finish_decompress(d);
    return 1;
range:
    snprintf(x->err.msg, TC_MSG, "DCT coefficient out of range");
    return 0;
table:
    snprintf(x->err.msg, TC_MSG, "Huffman code longer than 32 bits");
    return 0;
}

/* one tile: status, and on TC_OK the new bytes in *out (malloc'd, caller frees) */
static int tc_recode(tc_ctx *x, const unsigned char *src, size_t len, int method,
                     int quality, const tc_tables *t, int allow_larger,
                     unsigned char **out, size_t *outlen, char *msg) {
    int ok;
    *out = NULL; *outlen = 0;
    if (len < 3 || src[0] != 0xFF || src[1] != 0xD8 || src[2] != 0xFF) return TC_NOT_JPEG;
    if (!x->ready) { snprintf(msg, TC_MSG, "codec not initialised"); return TC_FAILED; }
    x->outbuf = NULL; x->outsize = 0;
    x->outhint = len < TC_OUT_MAX_HINT ? len + len / 8 : TC_OUT_MAX_HINT;
    x->err.msg[0] = 0;
    if (setjmp(x->err.jb)) {
        jpeg_abort_decompress(&x->d);
        jpeg_abort_compress(&x->c);
        free(x->outbuf); x->outbuf = NULL;
        memcpy(msg, x->err.msg, TC_MSG); msg[TC_MSG - 1] = 0;
        if (!msg[0]) snprintf(msg, TC_MSG, "undecodable JPEG");
        return TC_FAILED;
    }
    jpeg_mem_src(&x->d, src, (unsigned long)len);
    jpeg_save_markers(&x->d, JPEG_APP0 + 2, 0xFFFF);
    ok = method == TC_DCT ? tc_dct(x, t) : tc_pixel(x, quality, t);
    if (!ok) {
        jpeg_abort_decompress(&x->d);
        jpeg_abort_compress(&x->c);
        free(x->outbuf); x->outbuf = NULL;
        memcpy(msg, x->err.msg, TC_MSG); msg[TC_MSG - 1] = 0;
        return TC_FAILED;
    }
    if (!allow_larger && x->outsize >= len) {
        free(x->outbuf); x->outbuf = NULL;
        return TC_NOT_SMALLER;
    }
    *out = x->outbuf; *outlen = x->outsize;
    x->outbuf = NULL; x->outcap = 0;
    return TC_OK;
}

/* the 16-bit rule against the exact one over s in [1, s_max], t in [s, max(s, t_max)], both
   signs of a in [0, a_max]: [0] disagreements, [1] cases the lanes code, [2] cases they leave
   to the scalar rule (|a| above lim16, or the pair has no 16-bit form) */
static void tc_requant_selftest16(int roff, uint32_t s_max, uint32_t t_max, uint32_t a_max, uint64_t out[3]) {
    out[0] = out[1] = out[2] = 0;
#if defined(__SSE2__)
    tc_rq r;
    for (uint32_t s = 1; s <= s_max; s++) {
        uint32_t top = s > t_max ? s : t_max;
        for (uint32_t t = s; t <= top; t++) {
            tc_rq_begin(&r);
            for (int k = 0; k < 16; k++) tc_rq_set(&r, k, s, t, roff);
            if (!r.lanes16) { out[2] += 2 * ((uint64_t)a_max + 1); continue; }
            for (uint32_t a0 = 0; a0 <= a_max; a0 += 8) {
                uint16_t av[16];
                int16_t res[8], res16[16];
                for (int j = 0; j < 8; j++) av[j] = av[8 + j] = (uint16_t)(a0 + j <= a_max ? a0 + j : a_max);
                for (int neg = 0; neg <= 1; neg++) {
                    __m128i sg = _mm_set1_epi16(neg ? -1 : 0);
                    _mm_storeu_si128((__m128i *)res, tc_requant8(_mm_loadu_si128((const __m128i *)av), sg, &r, 0));
#if defined(TC_HAVE_AVX2)
                    if (tc_avx2) {      /* both halves of the AVX2 lanes must agree with SSE2's */
                        tc_requant16_probe(av, neg, &r, res16);
                        for (int j = 0; j < 8; j++)
                            out[0] += (res16[j] != res[j]) + (res16[8 + j] != res[j]);
                    }
#endif
                    for (int j = 0; j < 8; j++) {
                        uint32_t a = a0 + (uint32_t)j;
                        int64_t exact;
                        if (a > a_max || (!neg && a > 32767)) continue;     /* +32768 is no JCOEF */
                        if (a > r.lim16[j]) { out[2]++; continue; }
                        exact = (int64_t)(((uint64_t)a * s * 256u + (uint64_t)roff * t) / ((uint64_t)t * 256u));
                        out[0] += res[j] != (int16_t)(neg ? -exact : exact);
                        out[1]++;
                    }
                }
            }
        }
    }
#else
    (void)roff; (void)s_max; (void)t_max; (void)a_max;
#endif
}

/* tables from the same counts by tc_gen_optimal_table and by libjpeg: out[0..1] ours (bits,
   huffval), out[2..3] libjpeg's; 1 on success, 0 if ours refused, -1 if libjpeg failed */
static int tc_compare_tables(tc_ctx *x, const long *freq, unsigned char out[4][257]) {
    long f1[257], f2[257];
    JHUFF_TBL a, b;
    memcpy(f1, freq, sizeof(f1));
    memcpy(f2, freq, sizeof(f2));
    memset(&a, 0, sizeof(a));
    memset(&b, 0, sizeof(b));
    memset(out, 0, 4 * 257);
    if (!x->ready) return -1;
    if (setjmp(x->err.jb)) return -1;
    if (!tc_gen_optimal_table(&a, f1)) return 0;
    jpeg_gen_optimal_table(&x->c, &b, f2);
    memcpy(out[0], a.bits, sizeof(a.bits));
    memcpy(out[1], a.huffval, sizeof(a.huffval));
    memcpy(out[2], b.bits, sizeof(b.bits));
    memcpy(out[3], b.huffval, sizeof(b.huffval));
    return 1;
}

#endif /* TILECRATE_TC_JPEG_H */
