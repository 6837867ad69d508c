# cython: language_level=3
"""The tunnel's encrypting pump, compiled (loaded through ``noports._speedups.load("tunnelpump")``).

Owns the splice of one *plain* socket (the user's local connection, or the daemon's connection to
its target) with one *relay* socket whose bytes are AES-256-CTR (noports-protocol.md §6), exactly
as its pure twin ``noports/_pure/tunnelpump.py`` does and with the same API: plain -> relay bytes
encrypted, relay -> plain bytes decrypted (either cipher may be None: a plain copy), head bytes
through the cipher first, FIN passed on as FIN (half-close), a reset or a full close on one side
closing the other, back-pressure with bounded buffering per direction, byte counts.  It never
parses what it carries.  The same tests run on both (tests/functional/test_tunnelpump_impls.py).

How: the event loop (uvloop or stock asyncio) only reports readiness of the two raw fds
(``add_reader``/``add_writer``); the callbacks are C loops.  Each direction receives into one
1 MiB block, runs AES-256-CTR over it in place (one long-lived cipher state per direction, so
the keystream position carries across reads of any size), and sends from the same
block, waiting for writability on a partial send with the source not read meanwhile.  No Python
object is made per chunk.  Unlike the relay pump there is no splice(2): the tunnel must see the
bytes to encrypt them.  The lifecycle and control loop (drain, back-pressure, FIN, fairness,
registration, the end) are SpliceCore's, shared with the relay pump (pumpcore.pyx); here are the
tunnel's steps: receive and run the cipher (``_fill``), send what waits (``_drain``), the block
pool and the ciphers.  Field layout and the measured reasons for it: tunnelpump.pxd; the C shims
(AES engines, MSG_NOSIGNAL): tunnelpump_sys.h.

AES engines: on x86-64 CPUs with VAES and AVX-512 (Intel Ice Lake and later, AMD Zen 4) our own
AES-256-CTR (tunnelpump_vaes.h) runs four AES blocks per instruction, about twice OpenSSL 3.0's
128-bit AES-NI path; elsewhere OpenSSL EVP does the work.  Both give the same bytes (tested
against ``cryptography`` and the spec's counter); ``_configure(aes="evp")`` forces EVP.

Ciphers: :func:`new_cipher` makes an :class:`EvpCtr` (CtrStream's surface: ``update``,
``update_into``, ``process_in_place``, ``position``), which the C loop drives directly.  Any other
object with CtrStream's ``update_into(data, out)`` (a CtrStream, say) is accepted too, through a
slower path that hands it a memoryview of the block per chunk; and an EvpCtr works in the pure
twin, which only calls ``update_into``.  A foreign cipher must not keep the views it is given.

The GIL is held throughout: every call here is non-blocking and short (AES-CTR of 256 KiB is
~35 us), and dropping it around each would cost more than it could give another thread.
"""

from cpython.buffer cimport PyBUF_WRITE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.errno cimport EINTR, ENOMEM, errno
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from noports._speedups.pumpcore cimport (
    SpliceCore,
    _Half,
    _init_half,
    _send_head,
    _would_block,
    recv,
    send,
)
from tunnelpump cimport (
    TP_MSG_NOSIGNAL,
    _Ctr,
    _Dir,
    _State,
    tp_ctr_crypt,
    tp_ctr_engine,
    tp_ctr_fast_available,
    tp_ctr_free,
    tp_ctr_new,
    tp_set_errno,
)

# One result type for both implementations: callers may compare or isinstance() them freely.
from noports._pure.tunnelpump import TunnelResult

__all__ = [
    "MAX_BUFFER",
    "READ_SIZE",
    "TunnelResult",
    "TunnelSplice",
    "new_cipher",
    "open_splice_encrypted",
    "splice_encrypted",
]

#: Bytes buffered per direction at most (Atsign's socket_connector 2.6.0 uses 4 MiB too).
MAX_BUFFER = 4 * 1024 * 1024
#: The pure twin's largest single read, kept for the API: the smallest max_buffer is two of it.
#: (This pump reads up to _BLOCK_SIZE, 1 MiB, per call; see below.)
READ_SIZE = 256 * 1024

cdef enum:
    _KEY_BYTES = 32
    _IV_BYTES = 16
    # Bytes per recv (one block per busy direction).  READ_SIZE above is the twin's figure and
    # the API's (the smallest max_buffer is two of it); this pump reads more per call because it
    # measured cheaper: pump CPU per GB, one encrypted stream, medians of 7 interleaved rounds on
    # this 2-vCPU box (bench/test_bench_tunnelpump.py's stream(), with _configure(block_size=)):
    # 256 KiB 0.475 s, 512 KiB 0.466 s, 1 MiB 0.391 s (the pure twin 0.540 s).  Throughput was
    # within the noise of the box, which other jobs shared.  A 1 MiB block still sits in one
    # core's 2 MiB L2 between the recv that fills it, the AES pass and the send that empties it.
    # Re-measured with the VAES engine (medians of 5, 2 GiB each, load ~8): 128 KiB 0.31 s,
    # 256 KiB 0.34 s, 512 KiB 0.34 s, 1 MiB 0.34 s: no size wins any more, so 1 MiB stays.  A
    # profile of that pump: AES 27 %, the recv copy 26 %, the send copy 16 %, the rest TCP;
    # ~1.3 recv and ~0.5 epoll_wait per MiB, epoll_ctl negligible (strace -c).
    _BLOCK_SIZE = 1048576

# At most this many receive/encrypt/send rounds per callback before yielding to the loop, so one
# busy direction cannot starve the other connections of the process (4 rounds = up to 4 MiB).
cdef int _MAX_ROUNDS = 4


# -- the ciphers ----------------------------------------------------------------------------------

cdef class EvpCtr:
    """One direction's AES-256-CTR state (what :func:`new_cipher` returns): on the VAES engine
    where the CPU has it, else on OpenSSL EVP (the name is historical).

    The same surface as :class:`noports.at.stream.CtrStream`, so code and tests that use one can
    use the other: ``update(data) -> bytes``, ``update_into(data, out) -> int`` (``out`` may be
    exactly ``data``), ``process_in_place(buf, n=None)``, ``position``.  The pump itself never
    calls these: it runs the C state on its own buffer.
    """

    cdef _Ctr c

    def __cinit__(self, key, iv):
        cdef const unsigned char[::1] k = key
        cdef const unsigned char[::1] v = iv
        if k.shape[0] != _KEY_BYTES:
            raise ValueError(f"AES-256 key must be {_KEY_BYTES} bytes, got {k.shape[0]}")
        if v.shape[0] != _IV_BYTES:
            raise ValueError(f"AES-CTR IV must be {_IV_BYTES} bytes, got {v.shape[0]}")
        self.c.ctx = tp_ctr_new(&k[0], &v[0], _aes_fast)
        if self.c.ctx == NULL:
            raise MemoryError("OpenSSL could not make an AES-256-CTR context")
        self.c.position = 0

    def __dealloc__(self):
        tp_ctr_free(self.c.ctx)
        self.c.ctx = NULL

    @property
    def _engine(self):
        """"vaes" or "evp": which AES engine this object runs on (tests, benchmarks)."""
        return "vaes" if tp_ctr_engine(self.c.ctx) else "evp"

    @property
    def position(self):
        """Bytes processed so far."""
        return self.c.position

    def update(self, data):
        """Encrypt/decrypt ``data`` into a new ``bytes`` (convenient; not for the data plane)."""
        cdef const unsigned char[::1] src = data
        cdef Py_ssize_t n = src.shape[0]
        out = PyBytes_FromStringAndSize(NULL, n)
        if n:
            _crypt_checked(&self.c, &src[0], <unsigned char *>PyBytes_AS_STRING(out), n)
        return out

    def update_into(self, data, out):
        """Encrypt/decrypt ``data`` into the writable buffer ``out``; returns ``len(data)``."""
        cdef const unsigned char[::1] src = data
        cdef unsigned char[::1] dst = out
        cdef Py_ssize_t n = src.shape[0]
        if dst.shape[0] < n:
            raise ValueError(f"output buffer too small: {dst.shape[0]} < {n}")
        if n:
            _crypt_checked(&self.c, &src[0], &dst[0], n)
        return n

    def process_in_place(self, buf, n=None):
        """Encrypt/decrypt the first ``n`` bytes (default: all) of a writable buffer."""
        cdef unsigned char[::1] b = buf
        cdef Py_ssize_t count = b.shape[0] if n is None else n
        if count < 0 or count > b.shape[0]:
            raise ValueError(f"n={n} is outside the buffer (length {b.shape[0]})")
        if count:
            _crypt_checked(&self.c, &b[0], &b[0], count)


cdef int _crypt_checked(_Ctr *c, const unsigned char *src, unsigned char *dst,
                        Py_ssize_t n) except -1:
    if tp_ctr_crypt(c.ctx, src, dst, <size_t>n) != 0:
        # OpenSSL refuses partially overlapping buffers (exactly in place is fine)
        raise ValueError("AES-CTR update failed (partially overlapping buffers?)")
    c.position += n
    return 0


def new_cipher(key, iv):
    """One direction's AES-256-CTR state, in the form this pump implementation takes."""
    return EvpCtr(bytes(key), bytes(iv))


# -- the block pool -------------------------------------------------------------------------------
# A direction holds its 256 KiB block only while bytes wait in it: when it is empty the block goes
# back to a per-process pool and the next direction with data borrows it.  So a process with
# thousands of mostly idle connections holds a handful of blocks, not two per connection, and a
# busy one reuses the same hot memory (never a fresh malloc per chunk: the glibc trap).  Borrow
# and return are array operations with the GIL held (every callback holds it).
cdef enum:
    _POOL_MAX = 16           # at most 16 MiB kept for reuse

cdef char *_pool_buf[_POOL_MAX]
cdef int _pool_bufs = 0
# The size of pooled blocks; only _configure changes it (tests and benchmarks).  A splice whose
# max_buffer is smaller uses blocks of max_buffer bytes, malloc'd and freed outside the pool.
cdef Py_ssize_t _block_size = _BLOCK_SIZE
# Whether new ciphers may use the VAES engine (when the CPU has it); only _configure changes it.
cdef bint _aes_fast = True


cdef char *_borrow_buf(_Dir *d, Py_ssize_t size) noexcept:
    global _pool_bufs
    d.buf_cap = size
    if _pool_bufs > 0 and size == _block_size:
        _pool_bufs -= 1
        return _pool_buf[_pool_bufs]
    return <char *>malloc(size)


cdef void _return_buf(_Dir *d) noexcept:
    global _pool_bufs
    if d.buf == NULL:
        return
    if _pool_bufs < _POOL_MAX and d.buf_cap == _block_size:
        _pool_buf[_pool_bufs] = d.buf
        _pool_bufs += 1
    else:
        free(d.buf)       # the pool is full, or not a pool-sized block
    d.buf = NULL
    d.buf_start = d.buf_end = 0


def _pool_clear():
    """Free every pooled block (tests that count memory; reconfiguration).  Returns how many."""
    global _pool_bufs
    freed = _pool_bufs
    while _pool_bufs > 0:
        _pool_bufs -= 1
        free(_pool_buf[_pool_bufs])
    return freed


def _pool_size():
    """Pooled blocks now: for tests."""
    return _pool_bufs


def _aes_engines():
    """The AES engines new ciphers can use here, preferred first: ("vaes", "evp") or ("evp",)."""
    return ("vaes", "evp") if tp_ctr_fast_available() else ("evp",)


def _configure(block_size=None, aes=None):
    """Tests and benchmarks only: the block size (bytes per recv) of splices made afterwards,
    and the AES engine of ciphers made afterwards (``aes``: "auto" = the fastest here, or
    "evp").  Returns the previous ``(block_size, aes)``."""
    global _block_size, _aes_fast
    previous = (_block_size, "auto" if _aes_fast else "evp")
    if aes is not None:
        if aes not in ("auto", "evp"):
            raise ValueError(f"aes must be 'auto' or 'evp', not {aes!r}")
        _aes_fast = aes == "auto"
    if block_size is not None:
        if not 1 <= block_size <= 64 * 1024 * 1024:
            raise ValueError(f"block_size out of range: {block_size}")
        _block_size = int(block_size)
        _pool_clear()      # pooled blocks have the old size
    return previous


cdef class TunnelSplice(SpliceCore):
    """A live splice of a plain socket and a relay socket.  Make it with
    :func:`open_splice_encrypted`.

    ``bytes_plain_to_relay`` / ``bytes_relay_to_plain`` count live; ``await wait()`` returns the
    TunnelResult once both sockets are closed; ``close()`` aborts both at once.  The plain socket
    is SpliceCore's first, the relay socket its second.
    """

    cdef:
        _State s                  # the tunnel's C fields: see tunnelpump.pxd
        object _encrypt           # the cipher objects s.pr / s.rp use (EvpCtr: its _Ctr)
        object _decrypt

    def __cinit__(self):
        _init_half(&self.s.pr.core, 0)
        _init_half(&self.s.rp.core, 1)
        self._dir[0] = &self.s.pr.core
        self._dir[1] = &self.s.rp.core

    def __init__(self, loop, encrypt, decrypt, head_plain, head_relay, max_buffer):
        self._setup(loop, max_buffer, _MAX_ROUNDS, ("plain", "relay"), TunnelResult)
        # one block is all a direction holds (beyond head bytes): never more than max_buffer
        self.s.block_size = min(_block_size, max_buffer)
        self._encrypt = encrypt
        self._decrypt = decrypt
        _set_cipher(&self.s.pr, encrypt)
        _set_cipher(&self.s.rp, decrypt)
        # Head bytes go through the cipher now, before anything is read: the keystream position
        # follows the byte order of the stream.
        self._set_head(&self.s.pr, head_plain)
        self._set_head(&self.s.rp, head_relay)

    cdef int _set_head(self, _Dir *d, head) except -1:
        cdef const unsigned char[::1] h
        cdef Py_ssize_t n = len(head)
        if n == 0:
            return 0
        h = bytes(head)
        d.core.head = <char *>malloc(n)
        if d.core.head == NULL:
            raise MemoryError()
        memcpy(d.core.head, &h[0], n)
        d.core.head_len = n
        self._crypt(d, d.core.head, n)
        d.core.forwarded = n
        return 0

    # -- public surface (the pure twin's; max_buffer, done, wait, close: SpliceCore) --
    @property
    def bytes_plain_to_relay(self):
        return self.s.pr.core.forwarded

    @property
    def bytes_relay_to_plain(self):
        return self.s.rp.core.forwarded

    @property
    def buffered_plain_to_relay(self):
        """Bytes read from the plain socket and not yet handed to the relay socket's kernel."""
        return _buffered(&self.s.pr)

    @property
    def buffered_relay_to_plain(self):
        return _buffered(&self.s.rp)

    # -- for tests --
    @property
    def _cipher_kinds(self):
        """(plain->relay, relay->plain): "none", "evp" or "foreign"."""
        names = ("none", "evp", "foreign")
        return (names[self.s.pr.cipher_kind], names[self.s.rp.cipher_kind])

    # -- the steps SpliceCore's control loop calls --
    cdef int _drain(self, _Half *h) noexcept:
        """Send what waits in ``h``: 0 all sent, 1 dst would block, -1 dst failed (errno)."""
        cdef _Dir *d = <_Dir *>h          # h is d.core, _Dir's first member
        cdef ssize_t n
        cdef int r = _send_head(h, TP_MSG_NOSIGNAL)
        if r != 0:
            return r
        if h.head != NULL:
            free(h.head)          # all sent: a big head must not live as long as the connection
            h.head = NULL
        while d.buf_end > d.buf_start:
            n = send(h.dst_fd, d.buf + d.buf_start, <size_t>(d.buf_end - d.buf_start),
                     TP_MSG_NOSIGNAL)
            if n > 0:
                d.buf_start += n
            elif n < 0 and errno == EINTR:
                continue
            else:
                return 1 if n < 0 and _would_block(errno) else -1
        d.buf_start = 0
        d.buf_end = 0
        return 0

    cdef Py_ssize_t _fill(self, _Half *h) except -2:
        """Receive from ``h``'s source into its (empty) block and put the bytes through the
        cipher there: > 0 bytes, 0 FIN, -1 errno; -2 when a foreign cipher raised."""
        cdef _Dir *d = <_Dir *>h
        cdef ssize_t n
        if d.buf == NULL:
            d.buf = _borrow_buf(d, self.s.block_size)
            if d.buf == NULL:
                tp_set_errno(ENOMEM)
                return -1
        n = recv(h.src_fd, d.buf, <size_t>d.buf_cap, 0)
        if n > 0:
            # in place, before anything of it is sent: no second buffer, no Python object
            self._crypt(d, d.buf, n)
            d.buf_start = 0
            d.buf_end = n
        return n

    cdef void _release(self, _Half *h) noexcept:
        _return_buf(<_Dir *>h)

    cdef bint _holds_carrier(self, _Half *h) noexcept:
        return (<_Dir *>h).buf != NULL

    cdef void _release_c(self) noexcept:
        # blocks back to the pool; unsent head bytes dropped (the counts are kept)
        SpliceCore._release_c(self)
        _drop_head(&self.s.pr)
        _drop_head(&self.s.rp)

    cdef int _crypt(self, _Dir *d, char *data, Py_ssize_t n) except -1:
        """Put ``n`` bytes at ``data`` through ``d``'s cipher, in place."""
        if d.cipher_kind == 1:
            return _crypt_checked(d.ctr, <unsigned char *>data, <unsigned char *>data, n)
        if d.cipher_kind == 2:
            # a foreign cipher (CtrStream ...): one memoryview per chunk, released at once so
            # nothing can point into a block that goes back to the pool
            view = PyMemoryView_FromMemory(data, n, PyBUF_WRITE)
            try:
                (self._encrypt if d.core.index == 0 else self._decrypt).update_into(view, view)
            finally:
                view.release()
        return 0


cdef int _set_cipher(_Dir *d, cipher) except -1:
    if cipher is None:
        d.cipher_kind = 0
    elif isinstance(cipher, EvpCtr):
        d.cipher_kind = 1
        d.ctr = &(<EvpCtr>cipher).c
    elif callable(getattr(cipher, "update_into", None)):
        d.cipher_kind = 2
    else:
        raise TypeError(f"not a cipher (no update_into): {type(cipher).__name__}")
    return 0


cdef void _drop_head(_Dir *d) noexcept:
    d.core.head_off = d.core.head_len
    free(d.core.head)
    d.core.head = NULL


cdef inline Py_ssize_t _buffered(_Dir *d) noexcept:
    return (d.core.head_len - d.core.head_off) + (d.buf_end - d.buf_start)


async def open_splice_encrypted(loop, plain_sock, relay_sock, *, encrypt=None, decrypt=None,
                                head_plain=b"", head_relay=b"", max_buffer=MAX_BUFFER):
    """Start splicing; ownership of both sockets passes to the TunnelSplice.

    ``encrypt`` (from :func:`new_cipher`, or None) is applied to plain -> relay bytes,
    ``decrypt`` to relay -> plain bytes.  ``head_plain`` / ``head_relay`` are bytes already read
    from that socket (ciphertext for the relay's): they go through the cipher first.
    """
    pump = TunnelSplice(loop, encrypt, decrypt, head_plain, head_relay, max_buffer)
    pump._start(plain_sock, relay_sock)
    return pump


async def splice_encrypted(loop, plain_sock, relay_sock, *, encrypt=None, decrypt=None,
                           head_plain=b"", head_relay=b"", max_buffer=MAX_BUFFER):
    """Splice until both sockets are closed; cancelling aborts both."""
    pump = await open_splice_encrypted(loop, plain_sock, relay_sock, encrypt=encrypt,
                                       decrypt=decrypt, head_plain=head_plain,
                                       head_relay=head_relay, max_buffer=max_buffer)
    return await pump._wait_or_abort()
