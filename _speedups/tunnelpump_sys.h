/* C shims for tunnelpump.pyx: AES-256-CTR in place (our VAES engine or OpenSSL's EVP), and the
 * few socket details Cython cannot express.
 *
 * Nothing here allocates except tp_ctr_new (one cipher state per direction, made once per
 * connection) and nothing keeps state of its own: the keystream position lives in the tp_ctr
 * (counter block + offset into the current keystream block), which is why one long-lived state
 * per direction gives the same bytes as CtrStream however the stream is cut.
 */
#ifndef NOPORTS_TUNNELPUMP_SYS_H
#define NOPORTS_TUNNELPUMP_SYS_H

#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "tunnelpump_vaes.h"

/* send() flag that turns SIGPIPE into EPIPE; macOS relies on Python's SIG_IGN instead. */
#ifdef MSG_NOSIGNAL
#define TP_MSG_NOSIGNAL MSG_NOSIGNAL
#else
#define TP_MSG_NOSIGNAL 0
#endif

/* Cython treats `errno = x` as a new local variable: set it through a function. */
static inline void tp_set_errno(int e) { errno = e; }

/* One direction's AES-256-CTR state: key 32 bytes, iv 16 bytes (the whole initial counter
 * block, incremented big-endian over all 128 bits, as noports-protocol.md §6 and Dart's/mbedtls's
 * CTR do).  Two engines give the same bytes: our VAES/AVX-512 one (tunnelpump_vaes.h, about twice
 * OpenSSL 3.0's speed where the CPU has it) and OpenSSL EVP (everywhere else, or when the caller
 * asks for it: tests and benchmarks compare the two).  The choice is made once per object. */
typedef struct tp_ctr {
    EVP_CIPHER_CTX *evp;       /* the EVP engine's context, NULL when the VAES one runs */
#ifdef TP_HAVE_VAES
    tp_vaes vaes;              /* needs 16-byte alignment: allocated with posix_memalign */
#endif
} tp_ctr;

/* 1 when the VAES engine can run here (compiled in, CPU and OS support it); checked once. */
static int tp_ctr_fast_available(void)
{
#ifdef TP_HAVE_VAES
    static int usable = -1;
    if (usable < 0)
        usable = tp_vaes_usable();
    return usable;
#else
    return 0;
#endif
}

/* A new state, on the VAES engine when `allow_fast` and it is available.  NULL on failure. */
static tp_ctr *tp_ctr_new(const unsigned char *key, const unsigned char *iv, int allow_fast)
{
    void *mem = NULL;
    tp_ctr *c;
    if (posix_memalign(&mem, 64, sizeof(tp_ctr)) != 0)
        return NULL;
    c = (tp_ctr *)mem;
    memset(c, 0, sizeof(*c));
#ifdef TP_HAVE_VAES
    if (allow_fast && tp_ctr_fast_available()) {
        tp_vaes_init(&c->vaes, key, iv);
        return c;
    }
#else
    (void)allow_fast;
#endif
    c->evp = EVP_CIPHER_CTX_new();
    if (c->evp == NULL || EVP_EncryptInit_ex(c->evp, EVP_aes_256_ctr(), NULL, key, iv) != 1) {
        EVP_CIPHER_CTX_free(c->evp);
        free(c);
        return NULL;
    }
    return c;
}

static void tp_ctr_free(tp_ctr *c)
{
    if (c == NULL)
        return;
    if (c->evp != NULL)
        EVP_CIPHER_CTX_free(c->evp);
#ifdef TP_HAVE_VAES
    OPENSSL_cleanse(&c->vaes, sizeof(c->vaes));   /* round keys (a memset could be elided) */
#endif
    free(c);
}

/* 0: OpenSSL EVP, 1: VAES. */
static inline int tp_ctr_engine(const tp_ctr *c) { return c->evp == NULL; }

/* Encrypt (= decrypt) `n` bytes from `in` to `out` and advance the keystream.  `in` == `out`
 * (exactly in place) is allowed; partial overlap is not (OpenSSL refuses it: -1).  EVP takes an
 * int length, so longer inputs go through it in INT_MAX-sized pieces.  Returns 0, or -1 when
 * OpenSSL refuses (it never does for CTR with a valid context). */
static inline int tp_ctr_crypt(tp_ctr *c, const unsigned char *in, unsigned char *out, size_t n)
{
#ifdef TP_HAVE_VAES
    if (c->evp == NULL) {
        if (in != out && in < out + n && out < in + n)
            return -1;                        /* the same rule as EVP's */
        tp_vaes_crypt(&c->vaes, in, out, n);
        return 0;
    }
#endif
    while (n > 0) {
        int piece = n > (size_t)(INT_MAX - 32) ? INT_MAX - 32 : (int)n;
        int outl = 0;
        if (EVP_EncryptUpdate(c->evp, out, &outl, in, piece) != 1 || outl != piece)
            return -1;
        in += piece;
        out += piece;
        n -= (size_t)piece;
    }
    return 0;
}

#endif /* NOPORTS_TUNNELPUMP_SYS_H */
