/* CRC-32 with zlib's polynomial, fast: crc32_update(crc, p, len) gives zlib's
 * crc32(crc, p, len). Static functions, included by the C code that frames or checks
 * stream records (migrate/dataplane/dataplane.c, the stream reader's helper built by
 * migrate/stream/_build_pages.py). Needs zlib and pthreads. */
#ifndef HVM_CRC32_FOLD_H
#define HVM_CRC32_FOLD_H
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <zlib.h>

/* -- CRC-32 (zlib's polynomial) by carry-less multiplication ---------------------------
 * zlib's table-driven crc32 runs at about 4 GB/s here, the largest cost of a record after
 * the copies. Folding with PCLMULQDQ: the running value is 128 bits (four of them, 64
 * bytes apart, in the main loop); folding one forward by D bits over the data that
 * follows multiplies its low and high 64-bit halves by x^(D+32) and x^(D-32) modulo the
 * polynomial (bit-reflected, as the CRC is, and shifted left by one) and adds the next
 * block. What is left, 16 bytes, is worth the same to the CRC as all the bytes folded
 * into it (the initial value is added into the first block), so zlib finishes the
 * CRC from there over those 16 bytes and the tail. The constants are computed from the
 * polynomial at first use; tests compare every length with zlib's crc32. */
#define CRC_POLY 0x104C11DB7ull      /* x^32 + ... + 1, the normal form */

static uint64_t crc_constant(unsigned n)        /* reflect32(x^n mod P) << 1 */
{
    uint64_t v = 1;
    for (unsigned i = 0; i < n; i++) {
        v <<= 1;
        if (v >> 32 & 1)
            v ^= CRC_POLY;
    }
    uint64_t r = 0;
    for (int i = 0; i < 32; i++)
        r |= (v >> i & 1) << (31 - i);
    return r << 1;
}

#if defined(__x86_64__)
#include <immintrin.h>
static uint64_t K128LO, K128HI, K512LO, K512HI;
static int crc_fast;
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    K128LO = crc_constant(128 + 32);
    K128HI = crc_constant(128 - 32);
    K512LO = crc_constant(512 + 32);
    K512HI = crc_constant(512 - 32);
    __builtin_cpu_init();
    crc_fast = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
}

__attribute__((target("pclmul,sse4.1")))
static inline __m128i fold(__m128i x, __m128i k, __m128i next)
{
    return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), next);
}

__attribute__((target("pclmul,sse4.1")))
static uint32_t crc32_folded(uint32_t crc, const uint8_t *p, size_t len)
{
    const __m128i k512 = _mm_set_epi64x((long long)K512HI, (long long)K512LO);
    const __m128i k128 = _mm_set_epi64x((long long)K128HI, (long long)K128LO);
    __m128i x0 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128((int)~crc));
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
    p += 64;
    len -= 64;
    while (len >= 64) {
        x0 = fold(x0, k512, _mm_loadu_si128((const __m128i *)p));
        x1 = fold(x1, k512, _mm_loadu_si128((const __m128i *)(p + 16)));
        x2 = fold(x2, k512, _mm_loadu_si128((const __m128i *)(p + 32)));
        x3 = fold(x3, k512, _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        len -= 64;
    }
    x0 = fold(fold(fold(x0, k128, x1), k128, x2), k128, x3);
    while (len >= 16) {
        x0 = fold(x0, k128, _mm_loadu_si128((const __m128i *)p));
        p += 16;
        len -= 16;
    }
    uint8_t rest[16];
    _mm_storeu_si128((__m128i *)rest, x0);
    return (uint32_t)crc32(crc32(0xFFFFFFFFul, rest, 16), p, len);
}
#endif

/* zlib's crc32(crc, p, len), the same value, faster where the CPU can */
static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t len)
{
#if defined(__x86_64__)
    pthread_once(&crc_once, crc_init);
    if (crc_fast && len >= 64)
        return crc32_folded(crc, p, len);
#endif
    return (uint32_t)crc32(crc, p, len);
}

#endif
