/* AES-256-CTR on VAES + AVX2 (x86-64): 16 counter blocks per step in eight 256-bit registers.
 *
 * Why: OpenSSL 3.0's CTR uses 128-bit AES-NI (aesni_ctr32_encrypt_blocks), ~4.4 GB/s on the
 * bench machine (Sapphire Rapids), ~0.2 CPU s/GB at each end of a tunnel, two thirds of what the
 * recv + send copies cost.  VAES runs two (ymm) or four (zmm) AES blocks per instruction: this
 * engine measured 0.09-0.10 CPU s/GB against EVP's 0.19-0.25 in the same run.  A 512-bit
 * version was ~10 % faster still on that machine, but needs AVX-512 (this one also runs on Intel
 * Alder Lake and AMD Zen 3) and 8-way zmm gained nothing over 4-way: the AES units are the
 * limit.  Everything else (no VAES, other architectures, other compilers) uses OpenSSL EVP:
 * tunnelpump_sys.h picks one per cipher object at creation.
 *
 * The stream is noports-protocol.md §6's AES-256-CTR: key 32 bytes, the IV is the whole initial
 * counter block, incremented big-endian over all 128 bits.  State kept between calls: the next
 * counter (as two native 64-bit halves) and the unused tail of the last keystream block, so the
 * bytes are the same however the stream is cut.
 *
 * Only the functions that use the instructions carry target attributes: the module itself is
 * built with the compiler's default flags and runs on any x86-64.
 */
#ifndef NOPORTS_TUNNELPUMP_VAES_H
#define NOPORTS_TUNNELPUMP_VAES_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && \
    (defined(__clang__) || __GNUC__ >= 8) && !defined(NOPORTS_NO_VAES)
#define TP_HAVE_VAES 1
#include <cpuid.h>
#include <immintrin.h>

#define TP_PRAGMA(x) _Pragma(#x)
#define TP_UNROLL8 TP_PRAGMA(GCC unroll 8)
#define TP_UNROLL16 TP_PRAGMA(GCC unroll 16)

typedef struct {
    __m128i rk[15];            /* AES-256 encryption round keys */
    uint64_t ctr_hi, ctr_lo;   /* the next counter block, big-endian value as two halves */
    unsigned char ks[16];      /* keystream of the last block ... */
    unsigned int ks_used;      /* ... of which this many bytes are used (16: none left) */
} tp_vaes;

/* CPUID + XGETBV: AES-NI, AVX2, VAES, and the OS saving the YMM state. */
static int tp_vaes_usable(void)
{
    unsigned int a, b, c, d;
    unsigned int xcr0_lo, xcr0_hi;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    if (!(c & (1u << 25)) || !(c & (1u << 27)) || !(c & (1u << 28)))  /* AES-NI, OSXSAVE, AVX */
        return 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & 0x6) != 0x6)                        /* XMM and YMM state enabled */
        return 0;
    if (__get_cpuid_max(0, NULL) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b & (1u << 5)) && (c & (1u << 9));         /* AVX2, VAES */
}

__attribute__((target("aes,sse4.1")))
static inline __m128i tp_vaes_expand_step(__m128i prev, __m128i assist)
{
    /* prev ^= prev << 32 ^ prev << 64 ^ prev << 96, then xor the broadcast assist word */
    prev = _mm_xor_si128(prev, _mm_slli_si128(prev, 4));
    prev = _mm_xor_si128(prev, _mm_slli_si128(prev, 4));
    prev = _mm_xor_si128(prev, _mm_slli_si128(prev, 4));
    return _mm_xor_si128(prev, assist);
}

/* FIPS-197 AES-256 key schedule with AESKEYGENASSIST (rcon must be an immediate). */
__attribute__((target("aes,sse4.1")))
static void tp_vaes_expand(__m128i rk[15], const unsigned char key[32])
{
    __m128i a = _mm_loadu_si128((const __m128i *)key);
    __m128i b = _mm_loadu_si128((const __m128i *)(key + 16));
    rk[0] = a;
    rk[1] = b;
#define TP_EXPAND_PAIR(i, rcon)                                                           \
    a = tp_vaes_expand_step(a, _mm_shuffle_epi32(_mm_aeskeygenassist_si128(b, rcon), 0xff)); \
    rk[i] = a;                                                                            \
    if (i + 1 < 15) {                                                                     \
        b = tp_vaes_expand_step(b, _mm_shuffle_epi32(_mm_aeskeygenassist_si128(a, 0), 0xaa)); \
        rk[i + 1] = b;                                                                    \
    }
    TP_EXPAND_PAIR(2, 0x01)
    TP_EXPAND_PAIR(4, 0x02)
    TP_EXPAND_PAIR(6, 0x04)
    TP_EXPAND_PAIR(8, 0x08)
    TP_EXPAND_PAIR(10, 0x10)
    TP_EXPAND_PAIR(12, 0x20)
    TP_EXPAND_PAIR(14, 0x40)
#undef TP_EXPAND_PAIR
}

static void tp_vaes_init(tp_vaes *st, const unsigned char key[32], const unsigned char iv[16])
{
    uint64_t hi = 0, lo = 0;
    int i;
    tp_vaes_expand(st->rk, key);
    for (i = 0; i < 8; i++) {
        hi = (hi << 8) | iv[i];
        lo = (lo << 8) | iv[8 + i];
    }
    st->ctr_hi = hi;
    st->ctr_lo = lo;
    st->ks_used = 16;
}

/* One counter block's keystream (the ragged ends and the rare carry into the high half). */
__attribute__((target("aes,sse4.1")))
static void tp_vaes_one_block(tp_vaes *st, unsigned char out[16])
{
    /* byte-reversed counter: low half in the low lane, then reverse all 16 bytes */
    const __m128i rev = _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m128i x = _mm_shuffle_epi8(_mm_set_epi64x((long long)st->ctr_hi, (long long)st->ctr_lo),
                                 rev);
    int r;
    x = _mm_xor_si128(x, st->rk[0]);
    for (r = 1; r < 14; r++)
        x = _mm_aesenc_si128(x, st->rk[r]);
    x = _mm_aesenclast_si128(x, st->rk[14]);
    _mm_storeu_si128((__m128i *)out, x);
    st->ctr_lo += 1;
    if (st->ctr_lo == 0)
        st->ctr_hi += 1;
}

/* `nblocks` whole blocks, 16 per step in eight 256-bit registers (eight independent AES chains
 * hide the instruction's latency); the caller guarantees the low counter half does not wrap
 * within them, so a 64-bit add per lane is the whole increment.  The last step computes 16
 * blocks of keystream and uses as many as remain. */
__attribute__((target("aes,avx2,vaes")))
static void tp_vaes_blocks(tp_vaes *st, const unsigned char *in, unsigned char *out,
                           size_t nblocks)
{
    const __m256i rev = _mm256_broadcastsi128_si256(
        _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m256i two = _mm256_set_epi64x(0, 2, 0, 2);
    const __m256i step = _mm256_set_epi64x(0, 16, 0, 16);
    __m256i k[15], c[8], x[8];
    unsigned char tail[256];
    int r, j;
    for (r = 0; r < 15; r++)
        k[r] = _mm256_broadcastsi128_si256(st->rk[r]);
    /* lanes hold (lo + i, hi) in native order: register j has blocks 2j and 2j + 1 */
    c[0] = _mm256_add_epi64(_mm256_set_epi64x((long long)st->ctr_hi, (long long)st->ctr_lo,
                                              (long long)st->ctr_hi, (long long)st->ctr_lo),
                            _mm256_set_epi64x(0, 1, 0, 0));
    for (j = 1; j < 8; j++)
        c[j] = _mm256_add_epi64(c[j - 1], two);
    st->ctr_lo += nblocks;
    while (nblocks > 0) {
        /* fully unrolled (GCC's -O2 would not): ~0.15 -> ~0.105 CPU s/GB measured */
        TP_UNROLL8
        for (j = 0; j < 8; j++)
            x[j] = _mm256_xor_si256(_mm256_shuffle_epi8(c[j], rev), k[0]);
        TP_UNROLL16
        for (r = 1; r < 14; r++) {
            TP_UNROLL8
            for (j = 0; j < 8; j++)
                x[j] = _mm256_aesenc_epi128(x[j], k[r]);
        }
        TP_UNROLL8
        for (j = 0; j < 8; j++)
            x[j] = _mm256_aesenclast_epi128(x[j], k[14]);
        if (nblocks >= 16) {
            TP_UNROLL8
            for (j = 0; j < 8; j++) {
                __m256i d = _mm256_loadu_si256((const __m256i *)(in + 32 * j));
                _mm256_storeu_si256((__m256i *)(out + 32 * j), _mm256_xor_si256(d, x[j]));
                c[j] = _mm256_add_epi64(c[j], step);
            }
            in += 256;
            out += 256;
            nblocks -= 16;
        } else {
            size_t i, n = nblocks * 16;
            for (j = 0; j < 8; j++)
                _mm256_storeu_si256((__m256i *)(tail + 32 * j), x[j]);
            for (i = 0; i < n; i++)
                out[i] = in[i] ^ tail[i];
            nblocks = 0;
        }
    }
}

/* Encrypt (= decrypt) n bytes; in == out is allowed (each block is read before it is written). */
static void tp_vaes_crypt(tp_vaes *st, const unsigned char *in, unsigned char *out, size_t n)
{
    size_t nblocks;
    while (n > 0 && st->ks_used < 16) {       /* the rest of the last block's keystream */
        *out++ = *in++ ^ st->ks[st->ks_used++];
        n--;
    }
    nblocks = n / 16;
    while (nblocks > 0) {
        /* blocks before the low half wraps go the fast way; the wrapping one goes alone */
        uint64_t before_wrap = ~st->ctr_lo;   /* blocks until lo == UINT64_MAX */
        size_t fast = nblocks < before_wrap ? nblocks : (size_t)before_wrap;
        if (fast > 0) {
            tp_vaes_blocks(st, in, out, fast);
            in += fast * 16;
            out += fast * 16;
            nblocks -= fast;
            n -= fast * 16;
        } else {
            unsigned char ks[16];
            int i;
            tp_vaes_one_block(st, ks);
            for (i = 0; i < 16; i++)
                out[i] = in[i] ^ ks[i];
            in += 16;
            out += 16;
            nblocks -= 1;
            n -= 16;
        }
    }
    if (n > 0) {                              /* a ragged end: keep the rest of its keystream */
        size_t i;
        tp_vaes_one_block(st, st->ks);
        for (i = 0; i < n; i++)
            out[i] = in[i] ^ st->ks[i];
        st->ks_used = (unsigned int)n;
    }
}

#endif /* x86-64 with GCC >= 8 or clang */
#endif /* NOPORTS_TUNNELPUMP_VAES_H */
