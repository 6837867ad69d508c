# cython: language_level=3
"""The relay's byte pump, compiled (loaded through ``noports._speedups.load("relaypump")``).

Owns the splice of two already-authenticated TCP sockets, exactly as its pure twin
``noports/_pure/relaypump.py`` does and with the same API: bytes both ways, head bytes first,
FIN passed on as FIN (half-close), a reset or a full close on one side closing the other,
back-pressure with bounded buffering per direction, byte counts.  It never parses what it
carries.  The same tests run on both (tests/functional/test_relaypump_impls.py).

How: the event loop (uvloop or stock asyncio) only reports readiness of the two raw fds
(``add_reader``/``add_writer``); the callbacks are C loops.  On Linux each direction moves bytes
with kernel ``splice(2)`` socket -> pipe -> socket, so the relay never copies them into user
space; elsewhere (macOS wheels), or when the kernel refuses a pipe, a direction copies through
a reused 256 KiB block with ``recv``/``send`` (no Python object per chunk either way).  The
field layout is in relaypump.pxd; the platform shims in relaypump_sys.h.

Measured (bench/test_bench_pump.py, one stream on this 2-vCPU box shared with other jobs, so
ratios from interleaved rounds count, not absolutes): the splice path costs the relay process
0.14-0.16 CPU s per GB against socat -b 131072's 0.32-0.34 and the pure pump's 0.35-0.56, at a
throughput equal to socat's or better.  strace of 1 GiB through it: 2,204 splice calls (about
1 MiB per call), 179 epoll waits, 96 epoll_ctl and nothing else: the loop is not in the way.
The GIL is held throughout: every call here is non-blocking and short, and dropping it around
each would cost more than it could give another thread.

What one hop costs (issue 5; iperf3 -> this pump -> iperf3 -s vs direct, interleaved): 91 % of
the relay's CPU is kernel time (perf), and a minimal C epoll splice relay costs the same CPU per
GB and reaches the same throughput, so the pump is at the kernel's floor.  The hop also makes
its two ends dearer: the receiver copies out of spliced skbs built from 4 KiB page fragments
(per-fragment copy overhead doubles) and the sender runs slower too, so the whole chain's CPU
goes from ~0.27 s/GB direct to ~0.48 s/GB through one hop.  On a CPU-bound shared box that
ratio, not this code, sets the throughput (~0.55-0.7x direct).  Tried and not better within
noise: 64-256 KiB pipes, no TCP_NODELAY, blocking splice in a thread per direction, the copy
path (receiver cheaper, relay 2x dearer).
"""

import asyncio
import os
import socket

from cpython.bytes cimport PyBytes_AS_STRING
from libc.errno cimport EAGAIN, EINTR, EINVAL, EIO, ENOMEM, errno
from libc.stdlib cimport free, malloc
from posix.unistd cimport close as c_close

from relaypump cimport (
    EWOULDBLOCK,
    NP_HAVE_SPLICE,
    NP_MSG_NOSIGNAL,
    SHUT_WR,
    _Dir,
    _State,
    np_pipe_open,
    np_set_errno,
    np_splice,
    recv,
    send,
    shutdown,
)

# One result type for both implementations: callers may compare or isinstance() them freely.
from noports._pure.relaypump import SpliceResult

__all__ = ["MAX_BUFFER", "READ_SIZE", "Splice", "SpliceResult", "open_splice", "splice"]

#: Bytes buffered per direction at most (Atsign's socket_connector 2.6.0 uses 4 MiB too).
MAX_BUFFER = 4 * 1024 * 1024
#: Largest single read of the copy path (and the pure twin's loops: 256 KiB).
READ_SIZE = 256 * 1024

cdef enum:
    _READ_SIZE = 262144      # READ_SIZE as a C constant

# Pipe capacity asked of the kernel per direction: the relay's CPU per GB, one stream, medians of
# 5 interleaved rounds: 64 KiB (the default pipe) 0.21-0.24 s, 256 KiB 0.16-0.17 s, 1 MiB
# 0.14-0.15 s, throughput the same within noise.  1 MiB (pipe-max-size's default) it is; the
# pools below keep that from costing quota per idle session.
cdef Py_ssize_t _pipe_size = 1024 * 1024
# A pipe smaller than this (an unprivileged user past /proc/sys/fs/pipe-user-pages-soft gets
# 2 pages) would move 8 KiB per syscall: the copy path's 256 KiB blocks beat that.
cdef Py_ssize_t _MIN_PIPE = 64 * 1024
cdef bint _splice_enabled = NP_HAVE_SPLICE != 0
# At most this many fill/drain rounds per callback before yielding to the loop, so one busy
# direction cannot starve the other sessions of a worker (8 rounds = up to 8 MiB).
cdef int _MAX_ROUNDS = 8


# -- the carrier pools ----------------------------------------------------------------------
# A direction holds a pipe (or a copy block) only while bytes wait in it: when it is empty the
# carrier goes back to a per-process pool and the next direction with data borrows it.  So a
# worker with 10,000 mostly idle sessions holds a handful of pipes, not 20,000 (2 fds and 256
# pipe-user pages each at 1 MiB: an unprivileged user's quota of 16,384 pages would be gone at
# 32 sessions), and no 256 KiB copy block per idle direction.  Borrow and return are array
# operations with the GIL held (every callback holds it), no syscall: a 64-byte ping-pong pays
# nothing for them.
cdef enum:
    _POOL_MAX = 32

cdef int _pool_pipe_r[_POOL_MAX]
cdef int _pool_pipe_w[_POOL_MAX]
cdef Py_ssize_t _pool_pipe_cap[_POOL_MAX]
cdef int _pool_pipes = 0
cdef char *_pool_buf[_POOL_MAX]
cdef int _pool_bufs = 0


cdef bint _borrow_pipe(_Dir *d) noexcept:
    """Give ``d`` an empty pipe of useful size; False when the kernel will not."""
    global _pool_pipes
    cdef int fds[2]
    cdef int cap
    fds[0] = fds[1] = -1
    if _pool_pipes > 0:
        _pool_pipes -= 1
        d.pipe_r = _pool_pipe_r[_pool_pipes]
        d.pipe_w = _pool_pipe_w[_pool_pipes]
        d.pipe_cap = _pool_pipe_cap[_pool_pipes]
        return True
    cap = np_pipe_open(fds, <int>_pipe_size)
    if cap >= _MIN_PIPE:
        d.pipe_r = fds[0]
        d.pipe_w = fds[1]
        d.pipe_cap = cap
        return True
    if cap >= 0:
        c_close(fds[0])
        c_close(fds[1])
    return False       # EMFILE, ENOSYS, or a pipe too small to be worth it


cdef void _return_pipe(_Dir *d) noexcept:
    """Take ``d``'s pipe back: into the pool if it is empty and there is room, else closed."""
    global _pool_pipes
    if d.pipe_r < 0:
        return
    if d.in_pipe == 0 and _pool_pipes < _POOL_MAX:
        _pool_pipe_r[_pool_pipes] = d.pipe_r
        _pool_pipe_w[_pool_pipes] = d.pipe_w
        _pool_pipe_cap[_pool_pipes] = d.pipe_cap
        _pool_pipes += 1
    else:
        c_close(d.pipe_r)    # bytes still inside (an aborted splice) are dropped with it
        c_close(d.pipe_w)
    d.pipe_r = d.pipe_w = -1
    d.in_pipe = 0


cdef char *_borrow_buf() noexcept:
    global _pool_bufs
    if _pool_bufs > 0:
        _pool_bufs -= 1
        return _pool_buf[_pool_bufs]
    return <char *>malloc(_READ_SIZE)


cdef void _return_buf(_Dir *d) noexcept:
    global _pool_bufs
    if d.buf == NULL:
        return
    if _pool_bufs < _POOL_MAX:
        _pool_buf[_pool_bufs] = d.buf
        _pool_bufs += 1
    else:
        free(d.buf)
    d.buf = NULL
    d.buf_start = d.buf_end = 0


def _pool_clear():
    """Close every pooled pipe and free every pooled block (after fork, on reconfiguration,
    and for tests that count FDs).  Returns how many pipes were closed."""
    global _pool_pipes, _pool_bufs
    closed = _pool_pipes
    while _pool_pipes > 0:
        _pool_pipes -= 1
        c_close(_pool_pipe_r[_pool_pipes])
        c_close(_pool_pipe_w[_pool_pipes])
    while _pool_bufs > 0:
        _pool_bufs -= 1
        free(_pool_buf[_pool_bufs])
    return closed


def _pool_size():
    """(pooled pipes, pooled blocks): for tests."""
    return (_pool_pipes, _pool_bufs)


def _after_fork_in_child():
    # A forked worker must not share pipes with its parent: two processes splicing through
    # one pipe would interleave their bytes.  Forget (close) the inherited pool.
    _pool_clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _configure(pipe_size=None, use_splice=None):
    """Tests and benchmarks only: the pipe capacity to ask for, and splice on/off (off = the
    portable recv/send path, so Linux CI exercises what macOS runs).  Applies to Splices made
    afterwards; returns the previous ``(pipe_size, use_splice)``."""
    global _pipe_size, _splice_enabled
    previous = (_pipe_size, bool(_splice_enabled))
    if pipe_size is not None:
        _pipe_size = int(pipe_size)
        _pool_clear()      # pooled pipes have the old size
    if use_splice is not None:
        _splice_enabled = bool(use_splice) and NP_HAVE_SPLICE != 0
    return previous


def _splice_supported():
    """True where this build can use kernel splice(2)."""
    return NP_HAVE_SPLICE != 0


cdef inline bint _would_block(int err) noexcept:
    return err == EAGAIN or err == EWOULDBLOCK


cdef inline void _init_dir(_Dir *d, int index) noexcept:
    d.index = index
    d.src_fd = -1
    d.dst_fd = -1
    d.pipe_r = -1
    d.pipe_w = -1


def _tune(sock):
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass   # not TCP (a socketpair) or already dead: the first syscall will find out


cdef class Splice:
    """A live splice of sockets A and B.  Make it with :func:`open_splice`.

    ``bytes_a_to_b`` / ``bytes_b_to_a`` count live; ``await wait()`` returns the SpliceResult
    once both sockets are closed; ``close()`` aborts both at once.
    """

    cdef:
        _State s                  # every C field: see relaypump.pxd
        readonly object loop
        object _sock_a            # owned: kept alive while their fds are in use, closed at end
        object _sock_b
        object _head_ab           # bytes objects whose buffers s.ab.head / s.ba.head point into
        object _head_ba
        object _done              # asyncio Future -> SpliceResult
        object _cb_read_a         # bound methods handed to the loop, made once (not per call)
        object _cb_read_b
        object _cb_write_a
        object _cb_write_b
        object _how               # first event that ended the splice wins...
        object _by                # ... and the side it came from

    def __cinit__(self):
        _init_dir(&self.s.ab, 0)
        _init_dir(&self.s.ba, 1)

    def __init__(self, loop, head_a, head_b, max_buffer):
        if max_buffer < 2 * READ_SIZE:
            raise ValueError(f"max_buffer must be at least {2 * READ_SIZE} bytes")
        self.loop = loop
        self.s.max_buffer = max_buffer
        self._head_ab = bytes(head_a)
        self._head_ba = bytes(head_b)
        self.s.ab.head = PyBytes_AS_STRING(self._head_ab)
        self.s.ab.head_len = len(self._head_ab)
        self.s.ab.forwarded = self.s.ab.head_len
        self.s.ba.head = PyBytes_AS_STRING(self._head_ba)
        self.s.ba.head_len = len(self._head_ba)
        self.s.ba.forwarded = self.s.ba.head_len
        self.s.use_splice = _splice_enabled
        self._done = loop.create_future()

    def __dealloc__(self):
        self._release_c()

    # -- public surface (the pure twin's) --
    @property
    def bytes_a_to_b(self):
        return self.s.ab.forwarded

    @property
    def bytes_b_to_a(self):
        return self.s.ba.forwarded

    @property
    def buffered_a_to_b(self):
        """Bytes read from A and not yet handed to B's kernel socket."""
        return _buffered(&self.s.ab)

    @property
    def buffered_b_to_a(self):
        return _buffered(&self.s.ba)

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

    # -- for tests: the path each direction took ("splice", "copy", or None before any byte) --
    @property
    def _paths(self):
        return (_path(&self.s.ab), _path(&self.s.ba))

    @property
    def _carriers(self):
        """Whether each direction holds a pipe or block now (an idle one must not)."""
        return (self.s.ab.pipe_r >= 0 or self.s.ab.buf != NULL,
                self.s.ba.pipe_r >= 0 or self.s.ba.buf != NULL)

    # -- start: called once by open_splice --
    def _start(self, sock_a, sock_b):
        self._sock_a = sock_a     # ownership passes here: closed by _finish(), whatever happens
        self._sock_b = sock_b
        if self.s.finished:         # close() came first
            self._close_sockets()
            return
        fd_a = sock_a.fileno()
        fd_b = sock_b.fileno()
        if fd_a < 0 or fd_b < 0:
            # a socket that is already closed cannot be spliced: a reset by that side
            self._fail("reset", "a" if fd_a < 0 else "b")
            return
        for sock in (sock_a, sock_b):
            _tune(sock)
        self.s.ab.src_fd = fd_a
        self.s.ab.dst_fd = fd_b
        self.s.ba.src_fd = fd_b
        self.s.ba.dst_fd = fd_a
        self._cb_read_a = self._on_read_a
        self._cb_read_b = self._on_read_b
        self._cb_write_a = self._on_write_a
        self._cb_write_b = self._on_write_b
        self.s.started = True
        # Head bytes and anything already queued move now; the loop takes over from here.
        self._pump(&self.s.ab)
        self._pump(&self.s.ba)

    # -- loop callbacks: readiness of one fd drives one direction --
    def _on_read_a(self):
        self._guarded(&self.s.ab)       # A readable: A -> B can fill

    def _on_write_b(self):
        self._guarded(&self.s.ab)       # B writable: A -> B can drain

    def _on_read_b(self):
        self._guarded(&self.s.ba)

    def _on_write_a(self):
        self._guarded(&self.s.ba)

    cdef _guarded(self, _Dir *d):
        try:
            self._pump(d)
        except BaseException:
            # a loop call failed (e.g. the loop is closing): never leave fds registered
            self._fail("reset", None)
            raise

    # -- the hot path --
    cdef int _pump(self, _Dir *d) except -1:
        """Move what can move now in direction ``d``, then register exactly the readiness it
        waits for: src readable (buffer empty), dst writable (dst full), or nothing (FIN)."""
        cdef Py_ssize_t n
        cdef Py_ssize_t asked = 0
        cdef int rounds = 0
        cdef int r
        if self.s.finished:
            return 0   # a callback the loop had already queued when the splice ended
        while True:
            # What waits goes first (head bytes, then the pipe or buffer): order is kept and at
            # most one read's worth (<= pipe capacity or READ_SIZE) is ever held per direction.
            r = self._drain(d)
            if r < 0:
                return self._fail("reset", _dst_name(d))
            if r > 0:
                # dst is full: stop reading src (its kernel buffer fills, TCP's window closes
                # on the sender: back-pressure) until dst drains.  Not reading more into the
                # pipe meanwhile also avoids splice's ambiguity: with a non-empty pipe EAGAIN
                # may mean "pipe slots full" rather than "socket empty", and a level-triggered
                # reader on a socket we cannot drain would spin.
                return self._want(d, False, True)
            if d.src_eof:
                # everything before the FIN is out: pass it on, keep the other direction open
                if shutdown(d.dst_fd, SHUT_WR) != 0:
                    return self._fail("reset", _dst_name(d))
                d.eof_passed = True
                _release_dir(d)
                self._want(d, False, False)
                if self.s.ab.eof_passed and self.s.ba.eof_passed:
                    self._fail("eof", None)
                return 0
            if rounds == _MAX_ROUNDS:
                # Fairness: let the other connections run.  Come back by call_soon, not only by
                # the poll: uvloop (libuv) reports POLLERR on an fd once and then stops polling
                # it, so bytes still queued -- and the reset behind them -- would never be read.
                # (For the same reason there is no "short read: skip the read that would say
                # EAGAIN" shortcut: that last read is the one that reports the reset.)
                _release_dir(d)     # empty: its carrier goes back to the pool
                self._want(d, True, False)
                self.loop.call_soon(self._cb_read_a if d.index == 0 else self._cb_read_b)
                return 0
            rounds += 1
            n = self._fill(d, &asked)
            if n > 0:
                d.forwarded += n
            elif n == 0:
                d.src_eof = True
            elif _would_block(errno):
                _release_dir(d)     # buffer empty, so EAGAIN is unambiguous: socket drained
                return self._want(d, True, False)
            elif errno != EINTR:
                return self._fail("reset", _src_name(d))

    cdef int _drain(self, _Dir *d) noexcept:
        """Send what waits in ``d``: 0 all sent, 1 dst would block, -1 dst failed (errno)."""
        cdef ssize_t n
        while d.head_off < d.head_len:
            n = send(d.dst_fd, d.head + d.head_off, <size_t>(d.head_len - d.head_off),
                     NP_MSG_NOSIGNAL)
            if n > 0:
                d.head_off += n
            elif n < 0 and errno == EINTR:
                continue
            else:
                return 1 if n < 0 and _would_block(errno) else -1
        while d.in_pipe > 0:
            # pipe -> socket: the pages go to the socket by reference, no copy
            n = np_splice(d.pipe_r, d.dst_fd, <size_t>d.in_pipe)
            if n > 0:
                d.in_pipe -= n
                if d.in_pipe > 0:
                    # A non-blocking socket takes less only when its send buffer is full: the
                    # retry would just say EAGAIN (one wasted call per back-pressure stall).
                    return 1
            elif n < 0 and errno == EINTR:
                continue
            elif n < 0 and _would_block(errno):
                return 1
            else:
                if n == 0:
                    np_set_errno(EIO)  # a pipe we know holds bytes cannot be empty
                return -1
        while d.buf_end > d.buf_start:
            n = send(d.dst_fd, d.buf + d.buf_start, <size_t>(d.buf_end - d.buf_start),
                     NP_MSG_NOSIGNAL)
            if n > 0:
                d.buf_start += n
                if d.buf_end > d.buf_start:
                    return 1        # a short send: the send buffer is full (as above)
            elif n < 0 and errno == EINTR:
                continue
            else:
                return 1 if n < 0 and _would_block(errno) else -1
        d.buf_start = 0
        d.buf_end = 0
        return 0

    cdef Py_ssize_t _fill(self, _Dir *d, Py_ssize_t *asked) noexcept:
        """Read from ``d``'s source into its (empty) buffer: > 0 bytes, 0 FIN, -1 errno."""
        cdef int fds[2]
        cdef int cap
        cdef ssize_t n
        cdef Py_ssize_t want
        if d.pipe_r < 0 and d.buf == NULL:
            # A carrier is borrowed when bytes come (see the pools above).  A direction that
            # could not get a pipe once copies for good: asking again would cost syscalls at
            # every wake-up while the quota is exhausted.
            if self.s.use_splice and d.path != 2 and _borrow_pipe(d):
                d.path = 1
            else:
                d.path = 2
        if d.pipe_r >= 0:
            # socket -> pipe: one call takes the whole receive queue (tcp_splice_read walks it
            # in one go when non-blocking), up to the pipe's capacity.
            want = d.pipe_cap if d.pipe_cap < self.s.max_buffer else self.s.max_buffer
            asked[0] = want
            n = np_splice(d.src_fd, d.pipe_w, <size_t>want)
            if n > 0:
                d.in_pipe = n
                return n
            if n == 0 or errno != EINVAL:
                return n
            # a socket type splice does not serve: copy from now on (the pipe is empty)
            _return_pipe(d)
            d.path = 2
        if d.buf == NULL:
            d.buf = _borrow_buf()
            if d.buf == NULL:
                np_set_errno(ENOMEM)
                return -1
        asked[0] = _READ_SIZE
        n = recv(d.src_fd, d.buf, _READ_SIZE, 0)
        if n > 0:
            d.buf_start = 0
            d.buf_end = n
        return n

    # -- registration and the end --
    cdef int _want(self, _Dir *d, bint read, bint write) except -1:
        """Make the loop watch exactly what ``d`` waits for (no call when nothing changes:
        each add/remove costs an epoll_ctl and a Python call)."""
        if read != d.reading:
            d.reading = read
            if read:
                self.loop.add_reader(d.src_fd, self._cb_read_a if d.index == 0 else self._cb_read_b)
            else:
                self.loop.remove_reader(d.src_fd)
        if write != d.writing:
            d.writing = write
            if write:
                self.loop.add_writer(d.dst_fd, self._cb_write_b if d.index == 0 else self._cb_write_a)
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
                self._want(&self.s.ab, False, False)
                self._want(&self.s.ba, False, False)
            except Exception:
                pass        # a closed loop has already forgotten the fds
        self._release_c()
        self._close_sockets()
        self._cb_read_a = self._cb_read_b = self._cb_write_a = self._cb_write_b = None
        if not self._done.done():
            result = SpliceResult(self.s.ab.forwarded, self.s.ba.forwarded,
                                  self._how or "closed", self._by)
            try:
                self._done.set_result(result)
            except RuntimeError:
                pass        # the loop is closed: nobody can await the result any more
        return 0

    def _close_sockets(self):
        for sock in (self._sock_a, self._sock_b):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass

    cdef void _release_c(self) noexcept:
        _release_dir(&self.s.ab)
        _release_dir(&self.s.ba)


cdef void _release_dir(_Dir *d) noexcept:
    _return_pipe(d)        # a pipe still holding bytes is closed, not pooled
    _return_buf(d)


cdef inline Py_ssize_t _buffered(_Dir *d) noexcept:
    return (d.head_len - d.head_off) + d.in_pipe + (d.buf_end - d.buf_start)


cdef inline object _path(_Dir *d):
    return (None, "splice", "copy")[d.path]


cdef inline str _src_name(_Dir *d):
    return "a" if d.index == 0 else "b"


cdef inline str _dst_name(_Dir *d):
    return "b" if d.index == 0 else "a"


async def open_splice(loop, sock_a, sock_b, *, head_a=b"", head_b=b"", max_buffer=MAX_BUFFER):
    """Start splicing two connected sockets; ownership of both passes to the Splice.

    ``head_a`` (``head_b``) are bytes already read from A (B) after its auth line: they are
    written to B (A) before anything else.
    """
    pump = Splice(loop, head_a, head_b, max_buffer)
    pump._start(sock_a, sock_b)
    return pump


async def splice(loop, sock_a, sock_b, *, head_a=b"", head_b=b"", max_buffer=MAX_BUFFER):
    """Splice until both sockets are closed; cancelling aborts both."""
    pump = await open_splice(loop, sock_a, sock_b, head_a=head_a, head_b=head_b,
                             max_buffer=max_buffer)
    try:
        return await pump.wait()
    except asyncio.CancelledError:
        pump.close()
        raise
