/* C shims for tunnelpump.pyx: AES-256-CTR in place through OpenSSL's EVP, and the few socket
 * details Cython cannot express.
 *
 * Nothing here allocates except tp_ctr_new (one EVP context per direction, made once per
 * connection) and nothing keeps state of its own: the keystream position lives in the
 * EVP_CIPHER_CTX (counter block + offset into the current keystream block), which is why one
 * long-lived context per direction gives the same bytes as CtrStream however the stream is cut.
 */
#ifndef NOPORTS_TUNNELPUMP_SYS_H
#define NOPORTS_TUNNELPUMP_SYS_H

#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <openssl/evp.h>

/* send() flag that turns SIGPIPE into EPIPE; macOS relies on Python's SIG_IGN instead. */
#ifdef MSG_NOSIGNAL
#define TP_MSG_NOSIGNAL MSG_NOSIGNAL
#else
#define TP_MSG_NOSIGNAL 0
#endif

/* Cython treats `errno = x` as a new local variable: set it through a function. */
static inline void tp_set_errno(int e) { errno = e; }

/* One direction's AES-256-CTR state: key 32 bytes, iv 16 bytes (the whole initial counter
 * block; OpenSSL increments it big-endian over all 128 bits, as noports-protocol.md §6 and
 * Dart's/mbedtls's CTR do).  NULL on failure. */
static inline EVP_CIPHER_CTX *tp_ctr_new(const unsigned char *key, const unsigned char *iv)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return NULL;
    if (EVP_EncryptInit_ex(ctx, EVP_aes_256_ctr(), NULL, key, iv) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

static inline void tp_ctr_free(EVP_CIPHER_CTX *ctx)
{
    if (ctx != NULL)
        EVP_CIPHER_CTX_free(ctx);
}

/* Encrypt (= decrypt) `n` bytes from `in` to `out` and advance the keystream.  `in` == `out`
 * (exactly in place) is allowed for CTR; partial overlap is not.  EVP takes an int length, so
 * longer inputs go through in INT_MAX-sized pieces (the pump's own calls are <= 256 KiB).
 * Returns 0, or -1 when OpenSSL refuses (it never does for CTR with a valid context). */
static inline int tp_ctr_crypt(EVP_CIPHER_CTX *ctx, const unsigned char *in, unsigned char *out,
                               size_t n)
{
    while (n > 0) {
        int piece = n > (size_t)(INT_MAX - 32) ? INT_MAX - 32 : (int)n;
        int outl = 0;
        if (EVP_EncryptUpdate(ctx, out, &outl, in, piece) != 1 || outl != piece)
            return -1;
        in += piece;
        out += piece;
        n -= (size_t)piece;
    }
    return 0;
}

#endif /* NOPORTS_TUNNELPUMP_SYS_H */
