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
bytes to encrypt them.  Field layout and the measured reasons for it: tunnelpump.pxd; the C
shims (AES engines, MSG_NOSIGNAL): tunnelpump_sys.h.

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

import asyncio
import socket

from cpython.buffer cimport PyBUF_WRITE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.errno cimport EAGAIN, EINTR, ENOMEM, errno
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from tunnelpump cimport (
    EWOULDBLOCK,
    SHUT_WR,
    TP_MSG_NOSIGNAL,
    _Ctr,
    _Dir,
    _State,
    recv,
    send,
    shutdown,
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


# -- helpers --------------------------------------------------------------------------------------

cdef inline bint _would_block(int err) noexcept:
    return err == EAGAIN or err == EWOULDBLOCK


cdef inline void _init_dir(_Dir *d, int index) noexcept:
    d.index = index
    d.src_fd = -1
    d.dst_fd = -1


def _tune(sock):
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass   # not TCP (a socketpair) or already dead: the first syscall will find out


cdef class TunnelSplice:
    """A live splice of a plain socket and a relay socket.  Make it with
    :func:`open_splice_encrypted`.

    ``bytes_plain_to_relay`` / ``bytes_relay_to_plain`` count live; ``await wait()`` returns the
    TunnelResult once both sockets are closed; ``close()`` aborts both at once.
    """

    cdef:
        _State s                  # every C field: see tunnelpump.pxd
        readonly object loop
        object _plain_sock        # owned: kept alive while their fds are in use, closed at end
        object _relay_sock
        object _encrypt           # the cipher objects s.pr / s.rp use (EvpCtr: its _Ctr)
        object _decrypt
        object _done              # asyncio Future -> TunnelResult
        object _cb_read_plain     # bound methods handed to the loop, made once (not per call)
        object _cb_read_relay
        object _cb_write_plain
        object _cb_write_relay
        object _how               # first event that ended the splice wins...
        object _by                # ... and the side it came from

    def __cinit__(self):
        _init_dir(&self.s.pr, 0)
        _init_dir(&self.s.rp, 1)

    def __init__(self, loop, encrypt, decrypt, head_plain, head_relay, max_buffer):
        if max_buffer < 2 * READ_SIZE:
            raise ValueError(f"max_buffer must be at least {2 * READ_SIZE} bytes")
        self.loop = loop
        self.s.max_buffer = max_buffer
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
        self._done = loop.create_future()

    cdef int _set_head(self, _Dir *d, head) except -1:
        cdef const unsigned char[::1] h
        cdef Py_ssize_t n = len(head)
        if n == 0:
            return 0
        h = bytes(head)
        d.head = <char *>malloc(n)
        if d.head == NULL:
            raise MemoryError()
        memcpy(d.head, &h[0], n)
        d.head_len = n
        self._crypt(d, d.head, n)
        d.forwarded = n
        return 0

    def __dealloc__(self):
        self._release_c()

    # -- public surface (the pure twin's) --
    @property
    def bytes_plain_to_relay(self):
        return self.s.pr.forwarded

    @property
    def bytes_relay_to_plain(self):
        return self.s.rp.forwarded

    @property
    def buffered_plain_to_relay(self):
        """Bytes read from the plain socket and not yet handed to the relay socket's kernel."""
        return _buffered(&self.s.pr)

    @property
    def buffered_relay_to_plain(self):
        return _buffered(&self.s.rp)

    @property
    def max_buffer(self):
        return self.s.max_buffer

    @property
    def done(self):
        return self._done.done()

    async def wait(self):
        return await asyncio.shield(self._done)

    def close(self):
        """Abort both sockets now (unsent buffered bytes are dropped)."""
        self._fail("aborted", None)

    # -- for tests --
    @property
    def _carriers(self):
        """Whether each direction holds a block now (an idle one must not)."""
        return (self.s.pr.buf != NULL, self.s.rp.buf != NULL)

    @property
    def _cipher_kinds(self):
        """(plain->relay, relay->plain): "none", "evp" or "foreign"."""
        names = ("none", "evp", "foreign")
        return (names[self.s.pr.cipher_kind], names[self.s.rp.cipher_kind])

    # -- start: called once by open_splice_encrypted --
    def _start(self, plain_sock, relay_sock):
        self._plain_sock = plain_sock   # ownership passes here: closed by _finish(), whatever
        self._relay_sock = relay_sock
        if self.s.finished:             # close() came first
            self._close_sockets()
            return
        fd_plain = plain_sock.fileno()
        fd_relay = relay_sock.fileno()
        if fd_plain < 0 or fd_relay < 0:
            # a socket that is already closed cannot be spliced: a reset by that side
            self._fail("reset", "plain" if fd_plain < 0 else "relay")
            return
        for sock in (plain_sock, relay_sock):
            _tune(sock)
        self.s.pr.src_fd = fd_plain
        self.s.pr.dst_fd = fd_relay
        self.s.rp.src_fd = fd_relay
        self.s.rp.dst_fd = fd_plain
        self._cb_read_plain = self._on_read_plain
        self._cb_read_relay = self._on_read_relay
        self._cb_write_plain = self._on_write_plain
        self._cb_write_relay = self._on_write_relay
        self.s.started = True
        # Head bytes and anything already queued move now; the loop takes over from here.
        self._guarded(&self.s.pr)
        self._guarded(&self.s.rp)

    # -- loop callbacks: readiness of one fd drives one direction --
    def _on_read_plain(self):
        self._guarded(&self.s.pr)       # plain readable: plain -> relay can fill

    def _on_write_relay(self):
        self._guarded(&self.s.pr)       # relay writable: plain -> relay can drain

    def _on_read_relay(self):
        self._guarded(&self.s.rp)

    def _on_write_plain(self):
        self._guarded(&self.s.rp)

    cdef _guarded(self, _Dir *d):
        try:
            self._pump(d)
        except BaseException:
            # a loop call or a foreign cipher failed: never leave fds registered
            self._fail("reset", None)
            raise

    # -- the hot path --
    cdef int _pump(self, _Dir *d) except -1:
        """Move what can move now in direction ``d``, then register exactly the readiness it
        waits for: src readable (block empty), dst writable (dst full), or nothing (FIN)."""
        cdef ssize_t n
        cdef int rounds = 0
        cdef int r
        if self.s.finished:
            return 0   # a callback the loop had already queued when the splice ended
        while True:
            # What waits goes first (head bytes, then the block): order is kept and at most one
            # block (<= max_buffer) beyond the head is ever held per direction.
            r = _drain(d)
            if r < 0:
                return self._fail("reset", _dst_name(d))
            if r > 0:
                # dst is full: stop reading src (its kernel buffer fills, TCP's window closes on
                # the sender: back-pressure) until dst drains.
                return self._want(d, False, True)
            if d.src_eof:
                # everything before the FIN is out: pass it on, keep the other direction open
                if shutdown(d.dst_fd, SHUT_WR) != 0:
                    return self._fail("reset", _dst_name(d))
                d.eof_passed = True
                _return_buf(d)
                self._want(d, False, False)
                if self.s.pr.eof_passed and self.s.rp.eof_passed:
                    self._fail("eof", None)
                return 0
            if rounds == _MAX_ROUNDS:
                # Fairness: let the other connections run.  Come back by call_soon, not only by
                # the poll: uvloop (libuv) reports POLLERR on an fd once and then stops polling
                # it, so bytes still queued -- and the reset behind them -- would never be read.
                # (For the same reason there is no "short read: skip the read that would say
                # EAGAIN" shortcut: that last read is the one that reports the reset.)
                _return_buf(d)      # empty: its block goes back to the pool
                self._want(d, True, False)
                self.loop.call_soon(
                    self._cb_read_plain if d.index == 0 else self._cb_read_relay)
                return 0
            rounds += 1
            if d.buf == NULL:
                d.buf = _borrow_buf(d, self.s.block_size)
                if d.buf == NULL:
                    tp_set_errno(ENOMEM)
                    return self._fail("reset", _src_name(d))
            n = recv(d.src_fd, d.buf, <size_t>d.buf_cap, 0)
            if n > 0:
                # in place, before anything of it is sent: no second buffer, no Python object
                self._crypt(d, d.buf, n)
                d.buf_start = 0
                d.buf_end = n
                d.forwarded += n
            elif n == 0:
                d.src_eof = True
            elif _would_block(errno):
                _return_buf(d)      # block empty, socket drained
                return self._want(d, True, False)
            elif errno != EINTR:
                return self._fail("reset", _src_name(d))

    cdef int _crypt(self, _Dir *d, char *data, Py_ssize_t n) except -1:
        """Put ``n`` bytes at ``data`` through ``d``'s cipher, in place."""
        if d.cipher_kind == 1:
            return _crypt_checked(d.ctr, <unsigned char *>data, <unsigned char *>data, n)
        if d.cipher_kind == 2:
            # a foreign cipher (CtrStream ...): one memoryview per chunk, released at once so
            # nothing can point into a block that goes back to the pool
            view = PyMemoryView_FromMemory(data, n, PyBUF_WRITE)
            try:
                (self._encrypt if d.index == 0 else self._decrypt).update_into(view, view)
            finally:
                view.release()
        return 0

    # -- registration and the end --
    cdef int _want(self, _Dir *d, bint read, bint write) except -1:
        """Make the loop watch exactly what ``d`` waits for (no call when nothing changes: each
        add/remove costs an epoll_ctl and a Python call)."""
        if read != d.reading:
            d.reading = read
            if read:
                self.loop.add_reader(
                    d.src_fd, self._cb_read_plain if d.index == 0 else self._cb_read_relay)
            else:
                self.loop.remove_reader(d.src_fd)
        if write != d.writing:
            d.writing = write
            if write:
                self.loop.add_writer(
                    d.dst_fd, self._cb_write_relay if d.index == 0 else self._cb_write_plain)
            else:
                self.loop.remove_writer(d.dst_fd)
        return 0

    cdef int _fail(self, str how, str by) except -1:
        """Record the first event that ended the splice, then close everything."""
        if self._how is None:
            self._how = how
            self._by = by
        return self._finish()

    cdef int _finish(self) except -1:
        if self.s.finished:
            return 0
        self.s.finished = True
        if self.s.started:
            try:
                self._want(&self.s.pr, False, False)
                self._want(&self.s.rp, False, False)
            except Exception:
                pass        # a closed loop has already forgotten the fds
        self._release_c()
        self._close_sockets()
        self._cb_read_plain = self._cb_read_relay = None
        self._cb_write_plain = self._cb_write_relay = None
        if not self._done.done():
            result = TunnelResult(self.s.pr.forwarded, self.s.rp.forwarded,
                                  self._how or "closed", self._by)
            try:
                self._done.set_result(result)
            except RuntimeError:
                pass        # the loop is closed: nobody can await the result any more
        return 0

    def _close_sockets(self):
        for sock in (self._plain_sock, self._relay_sock):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass

    cdef void _release_c(self) noexcept:
        # blocks back to the pool; unsent head bytes dropped (the counts are kept)
        _return_buf(&self.s.pr)
        _return_buf(&self.s.rp)
        _drop_head(&self.s.pr)
        _drop_head(&self.s.rp)


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
    d.head_off = d.head_len
    free(d.head)
    d.head = NULL


cdef int _drain(_Dir *d) noexcept:
    """Send what waits in ``d``: 0 all sent, 1 dst would block, -1 dst failed (errno)."""
    cdef ssize_t n
    while d.head_off < d.head_len:
        n = send(d.dst_fd, d.head + d.head_off, <size_t>(d.head_len - d.head_off),
                 TP_MSG_NOSIGNAL)
        if n > 0:
            d.head_off += n
        elif n < 0 and errno == EINTR:
            continue
        else:
            return 1 if n < 0 and _would_block(errno) else -1
    if d.head != NULL:
        free(d.head)          # all sent: a big head must not live as long as the connection
        d.head = NULL
    while d.buf_end > d.buf_start:
        n = send(d.dst_fd, d.buf + d.buf_start, <size_t>(d.buf_end - d.buf_start),
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


cdef inline Py_ssize_t _buffered(_Dir *d) noexcept:
    return (d.head_len - d.head_off) + (d.buf_end - d.buf_start)


cdef inline str _src_name(_Dir *d):
    return "plain" if d.index == 0 else "relay"


cdef inline str _dst_name(_Dir *d):
    return "relay" if d.index == 0 else "plain"


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
    try:
        return await pump.wait()
    except asyncio.CancelledError:
        pump.close()
        raise
