# The compiled encrypting pump's design header: every C field of the splice, and the C it calls.
#
# A TunnelSplice joins a *plain* socket (the user's connection at npt, the target at npd) and a
# *relay* socket whose bytes are AES-256-CTR (noports-protocol.md §6).  Each direction is one
# _Dir: bytes are received into one reused block, put through that direction's cipher IN PLACE
# (AES-CTR on the receive buffer: no second buffer, no Python object per chunk), and sent from the
# same block.  The event loop (uvloop or stock asyncio) only reports readiness of the two raw fds
# (add_reader/add_writer); the callbacks are C loops in tunnelpump.pyx.
#
# Why this shape, in numbers (shared/spec/performance-notes.md, bench/test_bench_tunnelpump.py):
# - a fresh >= 128 KiB buffer per chunk plus a fresh cipher output pushes glibc into mmap/munmap
#   churn (a 256 KiB update() 35 -> 242 us, an encrypting chain 1.3 -> 0.6 GB/s): one block per
#   direction, borrowed from a small pool while bytes wait in it, encrypted where it lies;
# - a new cipher context per chunk costs ~35 % of AES throughput: one cipher state per direction
#   for the whole connection, which also carries the keystream position across odd-sized reads;
# - 1 MiB per recv (the twin, like the loops' transports, reads 256 KiB): the pump's CPU per GB
#   fell from 0.475 s (256 KiB) to 0.391 s (1 MiB) against the twin's 0.540 s; the block still
#   fits one core's L2 between recv, AES pass and send (measurements in tunnelpump.pyx);
# - OpenSSL 3.0's AES-CTR (128-bit AES-NI) was ~40 % of the pump's CPU: where the CPU has VAES,
#   our own 256-bit engine (tunnelpump_vaes.h) runs it at about half the cost: pump CPU per GB
#   0.55 s -> 0.33 s (encryption off: 0.25 s), npt + srvd + npd per GB 1.25 s -> 0.94-1.01 s
#   (three socat hops: 0.86-0.97 s) in bench/test_bench_e2e.py-shaped runs.
#
# The lifecycle and control loop are SpliceCore's (noports/_speedups/pumpcore.pxd, shared with
# the relay pump); a _Dir starts with that skeleton's _Half, and only what follows it is the
# tunnel's own.
#
# tunnelpump.pyx cimports this file as ``tunnelpump`` (it sits next to the .pyx), as relaypump
# does: the sources live in the top-level _speedups/, not under the module's dotted path.  Only
# C declarations live here, so the cimport costs no import at run time.

from noports._speedups.pumpcore cimport _Half

cdef extern from "tunnelpump_sys.h" nogil:
    ctypedef struct tp_ctr:
        pass
    int TP_MSG_NOSIGNAL
    void tp_set_errno(int e)
    int tp_ctr_fast_available()
    tp_ctr *tp_ctr_new(const unsigned char *key, const unsigned char *iv, int allow_fast)
    void tp_ctr_free(tp_ctr *ctx)
    int tp_ctr_engine(const tp_ctr *ctx)
    int tp_ctr_crypt(tp_ctr *ctx, const unsigned char *inp, unsigned char *out, size_t n)


cdef struct _Ctr:
    # the C half of one EvpCtr cipher object (a direction's AES-256-CTR state)
    tp_ctr *ctx               # long-lived: the keystream position is inside it (VAES or EVP)
    long long position        # bytes processed so far (CtrStream.position's meaning)


cdef struct _Dir:
    _Half core            # who, head bytes, counts and FIN/registration state: first, always
    # -- the cipher: 0 none (copy), 1 our EvpCtr state (VAES or EVP), 2 a foreign update_into --
    int cipher_kind
    _Ctr *ctr             # kind 1: inside the EvpCtr that TunnelSplice keeps alive
    # -- what waits after the head bytes (core.head: put through the cipher at start) --
    char *buf             # one block, borrowed from the pool while bytes wait in it
    Py_ssize_t buf_cap    # its size (_State.block_size when it was borrowed)
    Py_ssize_t buf_start  # unsent (already en/decrypted) bytes are buf[buf_start:buf_end]
    Py_ssize_t buf_end


cdef struct _State:
    # the C half of a TunnelSplice beyond SpliceCore's (tunnelpump.pyx declares its Python-object
    # fields next to it)
    _Dir pr                   # plain -> relay
    _Dir rp                   # relay -> plain
    Py_ssize_t block_size     # bytes per recv: 1 MiB, or max_buffer if that is smaller
