/* Native inner loops of the update codecs (core/codecs.py), loaded with ctypes by core/kernels.py.
 *
 * Why C: numpy has no single pass for these. Its float32 -> float16 cast runs one element at a time
 * (2 ms for 1M elements here, 8x a memcpy of the same bytes), and a quantiser is a chain of whole-array
 * passes (absmax, multiply, round, narrow), each reading and writing the vector again. One fused pass per
 * direction runs at memory speed. Every function computes exactly what the numpy path in codecs.py computes
 * (same IEEE operations in the same order, round to nearest even), so payloads are byte-identical whichever
 * path made them; tests/unit/test_kernels.py checks that on random and adversarial vectors.
 *
 * Plain C with no Python API: nothing here holds the GIL (ctypes releases it for the call), so the PS can
 * decode on several threads at once. x86-64 functions built for AVX2 + F16C are used only when the CPU has
 * them (dlt_cpu_ok); core/kernels.py falls back to numpy otherwise, and on other architectures.
 */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define DLT_X86 1
#define DLT_FAST __attribute__((target("avx2,f16c")))
#else
#define DLT_X86 0
#define DLT_FAST
#endif

/* 1 when this build's fast functions can run on this CPU. */
int dlt_cpu_ok(void) {
#if DLT_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

#define FP16_MAX 65504.0f

#if DLT_X86
/* IEEE half bits of float32 `x` (finite, |x| <= 65504), rounded to nearest even: the F16C instruction. */
DLT_FAST static inline uint16_t half_of(float x) {
    return (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), 0);
}

/* float32 -> IEEE half bits, as numpy's astype(float16) after clipping to +-65504.
 * Returns the number of elements beyond +-65504 (saturated to it), or -1 at the first NaN / Inf
 * (`out` is then partly written and must be discarded). */
DLT_FAST int64_t dlt_f32_to_f16(const float *x, uint16_t *out, size_t n) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 limit = _mm256_set1_ps(FP16_MAX);
    int64_t saturated = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        /* "not <= 65504" is true for larger magnitudes, Inf and NaN alike: rare, sorted out one by one */
        __m256 outside = _mm256_cmp_ps(_mm256_and_ps(v, abs_mask), limit, _CMP_NLE_UQ);
        if (__builtin_expect(_mm256_movemask_ps(outside) != 0, 0)) {
            for (size_t j = i; j < i + 8; j++) {
                float a = x[j];
                if (!isfinite(a)) return -1;
                if (fabsf(a) > FP16_MAX) { saturated++; a = a > 0 ? FP16_MAX : -FP16_MAX; }
                out[j] = half_of(a);
            }
            continue;
        }
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i < n; i++) {
        float a = x[i];
        if (!isfinite(a)) return -1;
        if (fabsf(a) > FP16_MAX) { saturated++; a = a > 0 ? FP16_MAX : -FP16_MAX; }
        out[i] = half_of(a);
    }
    return saturated;
}

/* IEEE half bits -> float32, exactly. Returns -1 (output to be discarded) when any code is NaN or Inf
 * (exponent all ones), which a payload must never carry; else 0. */
DLT_FAST int dlt_f16_to_f32(const uint16_t *h, float *out, size_t n) {
    const __m128i mag_mask = _mm_set1_epi16(0x7FFF);
    const __m128i first_bad = _mm_set1_epi16(0x7C00 - 1);
    __m128i bad = _mm_setzero_si128();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i v = _mm_loadu_si128((const __m128i *)(h + i));
        /* signed compare is right: magnitudes are < 0x8000 */
        bad = _mm_or_si128(bad, _mm_cmpgt_epi16(_mm_and_si128(v, mag_mask), first_bad));
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(v));
    }
    int any_bad = _mm_movemask_epi8(bad) != 0;
    for (; i < n; i++) {
        any_bad |= (h[i] & 0x7FFF) >= 0x7C00;
        out[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h[i])));
    }
    return any_bad ? -1 : 0;
}
#endif

/* The largest |x| of x[0..len) into *absmax (+0.0 for all zeros); 0 when one of them is NaN or Inf, else 1. */
DLT_FAST static inline int chunk_absmax(const float *x, size_t len, float *absmax) {
    float best = 0.0f;
    int bad = 0;
    size_t j = 0;
#if DLT_X86
    /* gcc does not vectorise the scalar loop below (the NaN test and the max are two reductions) */
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 limit = _mm256_set1_ps(FLT_MAX);
    __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps(), nonfinite = _mm256_setzero_ps();
    for (; j + 16 <= len; j += 16) {
        __m256 a0 = _mm256_and_ps(_mm256_loadu_ps(x + j), abs_mask);
        __m256 a1 = _mm256_and_ps(_mm256_loadu_ps(x + j + 8), abs_mask);
        nonfinite = _mm256_or_ps(nonfinite, _mm256_cmp_ps(_mm256_max_ps(a0, a1), limit, _CMP_NLE_UQ));
        nonfinite = _mm256_or_ps(nonfinite, _mm256_cmp_ps(a0, a0, _CMP_UNORD_Q));  /* max_ps drops a NaN in a0 */
        m0 = _mm256_max_ps(m0, a0);
        m1 = _mm256_max_ps(m1, a1);
    }
    bad = _mm256_movemask_ps(nonfinite) != 0;
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_max_ps(m0, m1));
    for (int l = 0; l < 8; l++) best = lanes[l] > best ? lanes[l] : best;
#endif
    for (; j < len; j++) {
        float a = fabsf(x[j]);
        bad |= !(a <= FLT_MAX);  /* NaN and Inf */
        best = a > best ? a : best;
    }
    *absmax = best;
    return !bad;
}

/* Symmetric int8 with one absmax scale per chunk of `chunk` elements (Int8Codec.encode):
 * scale = absmax / 127; a normal scale quantises by the reciprocal, code = rint(x * (1 / scale)), which stays in
 * [-127, 127] with no clip; a subnormal one by division, clipped; a zero one gives zero codes. Returns -1 at a
 * chunk holding NaN or Inf (outputs to be discarded), else 0. */
DLT_FAST int dlt_int8_encode(const float *x, size_t n, size_t chunk, float *scales, int8_t *codes) {
    for (size_t c = 0, start = 0; start < n; c++, start += chunk) {
        size_t len = n - start < chunk ? n - start : chunk;
        const float *xs = x + start;
        float absmax;
        if (!chunk_absmax(xs, len, &absmax)) return -1;
        float scale = absmax / 127.0f;
        scales[c] = scale;
        int8_t *out = codes + start;
        if (scale >= FLT_MIN) {
            float inv = 1.0f / scale;
            for (size_t j = 0; j < len; j++) out[j] = (int8_t)(int32_t)nearbyintf(xs[j] * inv);
        } else if (scale > 0.0f) {
            for (size_t j = 0; j < len; j++) {
                float q = nearbyintf(xs[j] / scale);
                out[j] = (int8_t)(q > 127.0f ? 127 : q < -127.0f ? -127 : (int32_t)q);
            }
        } else {
            for (size_t j = 0; j < len; j++) out[j] = 0;
        }
    }
    return 0;
}

/* float32(code) * its chunk's scale (Int8Codec._decode); the caller has checked the scales. */
DLT_FAST void dlt_int8_decode(const int8_t *codes, const float *scales, size_t n, size_t chunk, float *out) {
    for (size_t c = 0, start = 0; start < n; c++, start += chunk) {
        size_t len = n - start < chunk ? n - start : chunk;
        float scale = scales[c];
        const int8_t *cs = codes + start;
        float *os = out + start;
        for (size_t j = 0; j < len; j++) os[j] = (float)cs[j] * scale;
    }
}

/* Dense low-bit quantisation (_LowBitCodec with _Levels): per chunk a step u = absmax / divisor (one ulp less
 * if top·u would overflow), then each element's code, packed `8 / bits` to a byte, code j of a byte at bit
 * j·bits. Mid-tread (4 bits): code = clip(rint(x / u), ±top) + top + 1. Mid-rise (2 bits, levels
 * ±1, ±3 in units of u): code = clip(floor(x / 2u), -2, 1) + 2. An all-zero chunk (u = 0) divides by 1.
 * `bits` is a compile-time constant in each caller below, so the shifts and divisions by `per` are cheap. */
DLT_FAST static inline int lowbit_encode(const float *x, size_t n, size_t chunk, const int bits, float *units,
                                         uint8_t *packed) {
    const int midrise = bits == 2;
    const int top = midrise ? 3 : (1 << (bits - 1)) - 1;
    const float divisor = midrise ? 4.0f : (float)top;
    const float lo = midrise ? -2.0f : (float)-top, hi = midrise ? 1.0f : (float)top;
    const float offset = midrise ? 2.0f : (float)(top + 1);
    const size_t per = 8 / (size_t)bits;
    int32_t codes[1024];
    size_t packed_len = (n * (size_t)bits + 7) / 8;
    for (size_t b = 0; b < packed_len; b++) packed[b] = 0;
    for (size_t c = 0, start = 0; start < n; c++, start += chunk) {
        size_t len = n - start < chunk ? n - start : chunk;
        float absmax;
        if (!chunk_absmax(x + start, len, &absmax)) return -1;
        float u = absmax / divisor;
        if (isinf(u * (float)top)) u = nextafterf(u, 0.0f);
        units[c] = u;
        float step = u > 0.0f ? u : 1.0f;
        if (midrise) step *= 2.0f;
        /* a block of codes at a time: the division and rounding vectorise, the packing reads them back */
        const size_t room = sizeof codes / sizeof codes[0];
        for (size_t done = 0; done < len; done += room) {
            size_t m = len - done < room ? len - done : room;
            const float *xs = x + start + done;
            size_t j = 0;
#if DLT_X86
            const __m256 vstep = _mm256_set1_ps(step), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
            const __m256 voffset = _mm256_set1_ps(offset);
            for (; j + 8 <= m; j += 8) {
                __m256 q = _mm256_div_ps(_mm256_loadu_ps(xs + j), vstep);
                q = midrise ? _mm256_floor_ps(q) : _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q = _mm256_min_ps(_mm256_max_ps(q, vlo), vhi);
                _mm256_storeu_si256((__m256i *)(codes + j), _mm256_cvttps_epi32(_mm256_add_ps(q, voffset)));
            }
#endif
            for (; j < m; j++) {
                float q = xs[j] / step;
                q = midrise ? floorf(q) : nearbyintf(q);
                q = q < lo ? lo : q > hi ? hi : q;
                codes[j] = (int32_t)(q + offset);
            }
            size_t first = start + done;
            j = 0;
            if (first % per == 0) {  /* whole bytes (every chunk, when chunk·bits is a multiple of 8) */
                uint8_t *out = packed + first / per;
#if DLT_X86
                /* 16 codes at a time: narrowed to bytes, then each byte's `per` codes moved together by the
                 * shift-and-or of codecs._pack (code l sits 8·l bits up in a word; shifting it down by
                 * l·(8 − bits) puts it at bit l·bits), and the words' low bytes kept */
                for (; j + 16 <= m; j += 16) {
                    const __m128i *c = (const __m128i *)(codes + j);
                    __m128i b = _mm_packus_epi16(_mm_packus_epi32(_mm_loadu_si128(c), _mm_loadu_si128(c + 1)),
                                                 _mm_packus_epi32(_mm_loadu_si128(c + 2), _mm_loadu_si128(c + 3)));
                    uint8_t *dst = out + j / per;
                    if (per == 2) {
                        __m128i t = _mm_and_si128(_mm_or_si128(b, _mm_srli_epi16(b, 4)), _mm_set1_epi16(0xFF));
                        _mm_storel_epi64((__m128i *)dst, _mm_packus_epi16(t, t));
                    } else {
                        __m128i t = _mm_or_si128(_mm_or_si128(b, _mm_srli_epi32(b, 6)),
                                                 _mm_or_si128(_mm_srli_epi32(b, 12), _mm_srli_epi32(b, 18)));
                        t = _mm_and_si128(t, _mm_set1_epi32(0xFF));
                        t = _mm_packus_epi16(_mm_packus_epi32(t, t), t);
                        int32_t word = _mm_cvtsi128_si32(t);
                        __builtin_memcpy(dst, &word, 4);
                    }
                }
#endif
                for (; j + per <= m; j += per) {
                    unsigned byte = 0;
                    for (size_t l = 0; l < per; l++) byte |= (unsigned)codes[j + l] << (l * (size_t)bits);
                    out[j / per] = (uint8_t)byte;
                }
            }
            for (; j < m; j++) {
                size_t i = first + j;
                packed[i / per] |= (uint8_t)(codes[j] << ((i % per) * (size_t)bits));
            }
        }
    }
    return 0;
}

/* The inverse: out[i] = level(code i) · u of its chunk (levels: 2·code − 3 mid-rise, code − top − 1
 * mid-tread). Returns -1 if a mid-tread payload holds the code 0, which names no level (outputs to be
 * discarded), else 0. The caller has checked the steps and the padding. */
DLT_FAST static inline int lowbit_decode(const uint8_t *packed, const float *units, size_t n, size_t chunk,
                                         const int bits, float *out) {
    const int midrise = bits == 2;
    const int top = midrise ? 3 : (1 << (bits - 1)) - 1;
    const size_t per = 8 / (size_t)bits;
    const unsigned mask = (1u << bits) - 1u;
    /* every byte's `per` levels, and whether it holds a code 0: whole bytes decode by one lookup each */
    float levels[256][4];
    uint8_t holds_zero[256];
    for (unsigned byte = 0; byte < 256; byte++) {
        holds_zero[byte] = 0;
        for (size_t l = 0; l < per; l++) {
            unsigned code = (byte >> (l * (size_t)bits)) & mask;
            holds_zero[byte] |= code == 0;
            levels[byte][l] = midrise ? 2.0f * (float)code - 3.0f : (float)code - (float)(top + 1);
        }
    }
    unsigned zero_code = 0;
    for (size_t c = 0, start = 0; start < n; c++, start += chunk) {
        size_t len = n - start < chunk ? n - start : chunk;
        float u = units[c];
        size_t i = start, end = start + len;
        if (i % per == 0) {
#if DLT_X86
            /* 16 codes at a time: unpacked to one byte each, in order, then widened, levelled and scaled */
            const __m256 vu = _mm256_set1_ps(u);
            const __m256 scale = _mm256_set1_ps(midrise ? 2.0f : 1.0f);
            const __m256 shift = _mm256_set1_ps(midrise ? -3.0f : (float)-(top + 1));
            const __m128i low = _mm_set1_epi8((char)mask);
            __m128i zero_seen = _mm_setzero_si128();
            for (; i + 16 <= end; i += 16) {
                const uint8_t *src = packed + i / per;
                __m128i b;
                if (per == 2) {
                    __m128i raw = _mm_loadl_epi64((const __m128i *)src);
                    b = _mm_unpacklo_epi8(_mm_and_si128(raw, low), _mm_and_si128(_mm_srli_epi16(raw, 4), low));
                } else {
                    int32_t word;
                    __builtin_memcpy(&word, src, 4);
                    __m128i raw = _mm_cvtsi32_si128(word);
                    __m128i c01 = _mm_unpacklo_epi8(_mm_and_si128(raw, low), _mm_and_si128(_mm_srli_epi16(raw, 2), low));
                    __m128i c23 = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), low),
                                                    _mm_and_si128(_mm_srli_epi16(raw, 6), low));
                    b = _mm_unpacklo_epi16(c01, c23);
                }
                zero_seen = _mm_or_si128(zero_seen, _mm_cmpeq_epi8(b, _mm_setzero_si128()));
                __m256 lo8 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
                __m256 hi8 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
                /* code·scale + shift is exact (small integers), as the numpy path's table of levels */
                _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_add_ps(_mm256_mul_ps(lo8, scale), shift), vu));
                _mm256_storeu_ps(out + i + 8, _mm256_mul_ps(_mm256_add_ps(_mm256_mul_ps(hi8, scale), shift), vu));
            }
            zero_code |= _mm_movemask_epi8(zero_seen) != 0;
#endif
            for (; i + per <= end; i += per) {
                unsigned byte = packed[i / per];
                zero_code |= holds_zero[byte];
                for (size_t l = 0; l < per; l++) out[i + l] = levels[byte][l] * u;
            }
        }
        for (; i < end; i++) {
            unsigned code = (packed[i / per] >> ((i % per) * (size_t)bits)) & mask;
            zero_code |= code == 0;
            out[i] = (midrise ? 2.0f * (float)code - 3.0f : (float)code - (float)(top + 1)) * u;
        }
    }
    return zero_code && !midrise ? -1 : 0;
}

/* Entry points: one specialisation per width (Int4Codec, Int2Codec). Returns -2 for any other width. */
DLT_FAST int dlt_lowbit_encode(const float *x, size_t n, size_t chunk, int bits, float *units, uint8_t *packed) {
    switch (bits) {
        case 2: return lowbit_encode(x, n, chunk, 2, units, packed);
        case 4: return lowbit_encode(x, n, chunk, 4, units, packed);
        default: return -2;
    }
}

DLT_FAST int dlt_lowbit_decode(const uint8_t *packed, const float *units, size_t n, size_t chunk, int bits, float *out) {
    switch (bits) {
        case 2: return lowbit_decode(packed, units, n, chunk, 2, out);
        case 4: return lowbit_decode(packed, units, n, chunk, 4, out);
        default: return -2;
    }
}

#if DLT_X86
/* LEFT_PACK[m] lists the set bits of the 8-bit mask m, lowest first, as lane numbers for a permute. */
static int32_t LEFT_PACK[256][8];

__attribute__((constructor)) static void build_left_pack(void) {
    for (int m = 0; m < 256; m++) {
        int n = 0;
        for (int bit = 0; bit < 8; bit++)
            if (m & (1 << bit)) LEFT_PACK[m][n++] = bit;
        for (; n < 8; n++) LEFT_PACK[m][n] = 0;
    }
}
#endif

/* -- SparseLoCo (SparseLoCoCodec): chunk-wise top-k, low-bit values, log2(chunk)-bit local indices ------------- */

/* Little-endian bit streams, as codecs._pack writes them: code i holds bits [i·width, (i+1)·width). */
typedef struct { uint8_t *out; uint64_t acc; int filled; } BitWriter;

static inline void bits_put(BitWriter *w, uint32_t code, int width) {
    w->acc |= (uint64_t)code << w->filled;
    w->filled += width;
    while (w->filled >= 8) { *w->out++ = (uint8_t)w->acc; w->acc >>= 8; w->filled -= 8; }
}

static inline void bits_flush(BitWriter *w) {
    if (w->filled > 0) *w->out++ = (uint8_t)w->acc;
    w->acc = 0; w->filled = 0;
}

typedef struct { const uint8_t *in; uint64_t acc; int filled; } BitReader;

static inline uint32_t bits_get(BitReader *r, int width) {
    while (r->filled < width) { r->acc |= (uint64_t)*r->in++ << r->filled; r->filled += 8; }
    uint32_t code = (uint32_t)(r->acc & ((1u << width) - 1u));
    r->acc >>= width; r->filled -= width;
    return code;
}

/* The k-th largest of a[0..n) (0 < k <= n), by quickselect (Hoare partitions, median-of-three pivots); `a` is
 * reordered. */
static float kth_largest(float *a, size_t n, size_t k) {
    ptrdiff_t lo = 0, hi = (ptrdiff_t)n - 1, target = (ptrdiff_t)k - 1;  /* index in descending order */
    while (lo < hi) {
        float p = a[lo], q = a[lo + (hi - lo) / 2], r = a[hi];
        float pivot = p > q ? (q > r ? q : (p > r ? r : p)) : (p > r ? p : (q > r ? r : q));
        ptrdiff_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) { float t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (target <= j) hi = j;
        else if (target >= i) lo = i;
        else return a[target];  /* between the parts: equal to the pivot */
    }
    return a[target];
}

/* The k largest |x| of x[0..len) (0 < k <= len, x finite), by position, into `local` (ascending): every
 * element above the k-th largest magnitude τ, then the first elements equal to τ that fit — numpy's
 * _top_k_rows / top_k_indices. A threshold t from a strided sample (about 2k of the chunk lie above it)
 * picks candidates in one branch-free pass; τ is exact among them as long as at least k are candidates
 * (else the whole chunk is searched: the estimate changes the cost, never the answer). `mag` and `pos`
 * hold `len` + 8 entries, `work` as many. */
DLT_FAST static size_t select_top_k(const float *x, size_t len, size_t k, float *work, float *mag, uint32_t *pos,
                                    uint32_t *local) {
    size_t count = 0;
#if DLT_X86
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    if (len >= 1024 && k * 16 <= len) {
        size_t stride = len / 256, m = (2 * k * 256 + len - 1) / len + 1;  /* the sample's m-th largest */
        /* the m largest of the sample, kept sorted descending (m <= 33: k·16 <= len); most samples lose one
         * compare against the smallest kept */
        float best[40];
        size_t kept = 0;
        for (size_t j = 0; j < 256; j++) {
            float a = fabsf(x[j * stride]);
            if (kept == m && a <= best[m - 1]) continue;
            size_t at = kept < m ? kept++ : m - 1;
            while (at > 0 && best[at - 1] < a) { best[at] = best[at - 1]; at--; }
            best[at] = a;
        }
        const float threshold = best[m - 1];
        const __m256 t = _mm256_set1_ps(threshold);
        const __m256i step = _mm256_set1_epi32(8);
        __m256i base = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        size_t j = 0;
        for (; j + 8 <= len; j += 8) {
            __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + j), abs_mask);
            unsigned hits = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_GE_OQ));
            __m256i lanes = _mm256_loadu_si256((const __m256i *)LEFT_PACK[hits]);
            _mm256_storeu_si256((__m256i *)(pos + count), _mm256_permutevar8x32_epi32(base, lanes));
            _mm256_storeu_ps(mag + count, _mm256_permutevar8x32_ps(v, lanes));
            count += (size_t)__builtin_popcount(hits);
            base = _mm256_add_epi32(base, step);
        }
        for (; j < len; j++) {
            float a = fabsf(x[j]);
            if (a >= threshold) { pos[count] = (uint32_t)j; mag[count] = a; count++; }
        }
    }
#endif
    if (count < k) {  /* no estimate, or it let through too few: every element is a candidate */
        for (size_t j = 0; j < len; j++) { pos[j] = (uint32_t)j; mag[j] = fabsf(x[j]); }
        count = len;
    }
    for (size_t j = 0; j < count; j++) work[j] = mag[j];
    const float tau = kth_largest(work, count, k);
    size_t above = 0, n = 0;
    for (size_t j = 0; j < count; j++) above += mag[j] > tau;
    size_t ties = k - above;  /* the first this many elements equal to τ are kept */
    for (size_t j = 0; j < count && n < k; j++) {
        if (mag[j] > tau) local[n++] = pos[j];
        else if (mag[j] == tau && ties) { ties--; local[n++] = pos[j]; }
    }
    return n;
}

/* Encode (SparseLoCoCodec.encode) a finite vector: per chunk its top k (the last, partial chunk of r elements
 * keeps ceil(k·r/chunk)), a step u = absmax of the kept / divisor (as _Levels.units), each kept value's
 * `bits`-bit code (as _Levels.codes), then every chunk's steps, the code stream and the index stream, each
 * stream packed across chunks. `scratch` holds chunk + 8 + k floats, `local` k entries, `mag` and `pos` chunk + 8
 * each.
 * Returns 0; -1 for a chunk or k out of range. */
DLT_FAST int dlt_sparse_encode(const float *x, size_t n, size_t chunk, size_t k, int bits, int index_bits,
                               float *units, uint8_t *codes_out, uint8_t *index_out, float *scratch,
                               uint32_t *local, float *mag, uint32_t *pos) {
    if (chunk == 0 || k == 0 || k > chunk || (bits != 2 && bits != 4 && bits != 8)) return -1;
    const int midrise = bits == 2;
    const int top = midrise ? 3 : (1 << (bits - 1)) - 1;
    const float divisor = midrise ? 4.0f : (float)top;
    const float lo = midrise ? -2.0f : (float)-top, hi = midrise ? 1.0f : (float)top;
    const float offset = midrise ? 2.0f : (float)(top + 1);
    BitWriter codes = {codes_out, 0, 0}, index = {index_out, 0, 0};
    float *work = scratch, *values = scratch + chunk + 8;
    for (size_t c = 0, start = 0; start < n; c++, start += chunk) {
        size_t len = n - start < chunk ? n - start : chunk;
        size_t kc = len == chunk ? k : (k * len + chunk - 1) / chunk;
        size_t got = kc ? select_top_k(x + start, len, kc, work, mag, pos, local) : 0;
        float absmax = 0.0f;
        for (size_t j = 0; j < got; j++) {
            values[j] = x[start + local[j]];
            float a = fabsf(values[j]);
            absmax = a > absmax ? a : absmax;
        }
        float u = absmax / divisor;
        if (isinf(u * (float)top)) u = nextafterf(u, 0.0f);
        units[c] = u;
        float step = u > 0.0f ? u : 1.0f;
        if (midrise) step *= 2.0f;
        for (size_t j = 0; j < got; j++) {
            float q = values[j] / step;
            q = midrise ? floorf(q) : nearbyintf(q);
            q = q < lo ? lo : q > hi ? hi : q;
            bits_put(&codes, (uint32_t)(int32_t)(q + offset), bits);
            bits_put(&index, local[j], index_bits);
        }
    }
    bits_flush(&codes);
    bits_flush(&index);
    return 0;
}

/* Decode (SparseLoCoCodec._kept_values): kept value i of chunk c is level(code) · u[c] at c·chunk + local index.
 * With `sent` NULL it is written into `out` (zeros elsewhere: the caller's); otherwise `out` becomes `sent` minus
 * the kept values (error feedback's residual; `out` may not be `sent`). Refuses before writing anything, in the
 * numpy path's order of checks: -1 for a mid-tread code 0 (no level), -2 for indices that do not strictly
 * increase within a chunk, -3 for an index past the end of the last chunk. The caller has checked the lengths,
 * the steps and the padding bits. */
DLT_FAST int dlt_sparse_decode(const uint8_t *codes_in, const uint8_t *index_in, const float *units, size_t n,
                               size_t chunk, size_t k, int bits, int index_bits, const float *sent, float *out) {
    const int midrise = bits == 2;
    const int top = midrise ? 3 : (1 << (bits - 1)) - 1;
    int zero_code = 0, unordered = 0, past_end = 0;
    for (int pass = 0; pass < 2; pass++) {  /* check everything, then write */
        BitReader codes = {codes_in, 0, 0}, index = {index_in, 0, 0};
        for (size_t c = 0, start = 0; start < n; c++, start += chunk) {
            size_t len = n - start < chunk ? n - start : chunk;
            size_t kc = len == chunk ? k : (k * len + chunk - 1) / chunk;
            float u = units[c];
            int64_t previous = -1;
            for (size_t j = 0; j < kc; j++) {
                uint32_t code = bits_get(&codes, bits);
                uint32_t local = bits_get(&index, index_bits);
                if (pass == 0) {
                    zero_code |= !midrise && code == 0;
                    unordered |= (int64_t)local <= previous;
                    past_end |= local >= len;
                    previous = local;
                    continue;
                }
                float level = midrise ? 2.0f * (float)code - 3.0f : (float)code - (float)(top + 1);
                float v = level * u;
                if (sent == NULL) out[start + local] = v;
                else out[start + local] -= v;
            }
        }
        if (zero_code) return -1;
        if (unordered) return -2;
        if (past_end) return -3;
        if (pass == 0 && sent != NULL) memcpy(out, sent, n * sizeof *out);  /* checked: now `out` may change */
    }
    return 0;
}


/* Positions i (ascending) with |x[i]| >= threshold, the top-k codec's candidates: writes at most `cap` of
 * them to `out` and returns how many there are (more than `cap` means: call again with room for all).
 * Branch-free: each group of 8 stores all its hits at once (a permute packs them to the left) and advances
 * by their count, so the scan runs at memory speed whatever the share of hits. */
DLT_FAST int64_t dlt_at_least(const float *x, size_t n, float threshold, int32_t *out, int64_t cap) {
    int64_t count = 0;
    size_t i = 0;
#if DLT_X86
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 t = _mm256_set1_ps(threshold);
    const __m256i step = _mm256_set1_epi32(8);
    __m256i base = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (; i + 8 <= n && count + 8 <= cap; i += 8) {
        __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask);
        unsigned mask = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_GE_OQ));
        __m256i lanes = _mm256_loadu_si256((const __m256i *)LEFT_PACK[mask]);
        _mm256_storeu_si256((__m256i *)(out + count), _mm256_permutevar8x32_epi32(base, lanes));
        count += __builtin_popcount(mask);
        base = _mm256_add_epi32(base, step);
    }
#endif
    for (; i < n; i++) {
        if (fabsf(x[i]) >= threshold) {
            if (count < cap) out[count] = (int32_t)i;
            count++;
        }
    }
    return count;
}
