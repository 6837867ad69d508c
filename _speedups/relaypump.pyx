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
lifecycle and control loop (drain, back-pressure, FIN, fairness, registration, the end) are
SpliceCore's, shared with the tunnel pump (pumpcore.pyx); here are the relay's steps: splice or
copy a read (``_fill``), send what waits (``_drain``), and the carrier pools.  The field layout
is in relaypump.pxd; the platform shims in relaypump_sys.h.

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

import os

from cpython.bytes cimport PyBytes_AS_STRING
from libc.errno cimport EINTR, EINVAL, EIO, ENOMEM, errno
from libc.stdlib cimport free, malloc
from posix.unistd cimport close as c_close

from noports._speedups.pumpcore cimport (
    SpliceCore,
    _Half,
    _init_half,
    _send_head,
    _would_block,
    recv,
    send,
)
from relaypump cimport (
    NP_HAVE_SPLICE,
    NP_MSG_NOSIGNAL,
    _Dir,
    _State,
    np_pipe_open,
    np_set_errno,
    np_splice,
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


cdef inline void _init_dir(_Dir *d, int index) noexcept:
    _init_half(&d.core, index)
    d.pipe_r = -1
    d.pipe_w = -1


cdef class Splice(SpliceCore):
    """A live splice of sockets A and B.  Make it with :func:`open_splice`.

    ``bytes_a_to_b`` / ``bytes_b_to_a`` count live; ``await wait()`` returns the SpliceResult
    once both sockets are closed; ``close()`` aborts both at once.  A is SpliceCore's first
    socket, B its second.
    """

    cdef:
        _State s                  # the relay's C fields: see relaypump.pxd
        object _head_ab           # bytes objects whose buffers s.ab.core.head / s.ba.core.head
        object _head_ba           # point into

    def __cinit__(self):
        _init_dir(&self.s.ab, 0)
        _init_dir(&self.s.ba, 1)
        self._dir[0] = &self.s.ab.core
        self._dir[1] = &self.s.ba.core

    def __init__(self, loop, head_a, head_b, max_buffer):
        self._setup(loop, max_buffer, _MAX_ROUNDS, ("a", "b"), SpliceResult)
        self._head_ab = bytes(head_a)
        self._head_ba = bytes(head_b)
        self.s.ab.core.head = PyBytes_AS_STRING(self._head_ab)
        self.s.ab.core.head_len = len(self._head_ab)
        self.s.ab.core.forwarded = self.s.ab.core.head_len
        self.s.ba.core.head = PyBytes_AS_STRING(self._head_ba)
        self.s.ba.core.head_len = len(self._head_ba)
        self.s.ba.core.forwarded = self.s.ba.core.head_len
        self.s.use_splice = _splice_enabled

    # -- public surface (the pure twin's; max_buffer, done, wait, close: SpliceCore) --
    @property
    def bytes_a_to_b(self):
        return self.s.ab.core.forwarded

    @property
    def bytes_b_to_a(self):
        return self.s.ba.core.forwarded

    @property
    def buffered_a_to_b(self):
        """Bytes read from A and not yet handed to B's kernel socket."""
        return _buffered(&self.s.ab)

    @property
    def buffered_b_to_a(self):
        return _buffered(&self.s.ba)

    # -- for tests: the path each direction took ("splice", "copy", or None before any byte) --
    @property
    def _paths(self):
        return (_path(&self.s.ab), _path(&self.s.ba))

    # -- the steps SpliceCore's control loop calls --
    cdef int _drain(self, _Half *h) noexcept:
        """Send what waits in ``h``: 0 all sent, 1 dst would block, -1 dst failed (errno)."""
        cdef _Dir *d = <_Dir *>h          # h is d.core, _Dir's first member
        cdef ssize_t n
        cdef int r = _send_head(h, NP_MSG_NOSIGNAL)
        if r != 0:
            return r
        while d.in_pipe > 0:
            # pipe -> socket: the pages go to the socket by reference, no copy
            n = np_splice(d.pipe_r, h.dst_fd, <size_t>d.in_pipe)
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
            n = send(h.dst_fd, d.buf + d.buf_start, <size_t>(d.buf_end - d.buf_start),
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

    cdef Py_ssize_t _fill(self, _Half *h) except -2:
        """Read from ``h``'s source into its (empty) buffer: > 0 bytes, 0 FIN, -1 errno."""
        cdef _Dir *d = <_Dir *>h
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
            want = d.pipe_cap if d.pipe_cap < self._max_buffer else self._max_buffer
            n = np_splice(h.src_fd, d.pipe_w, <size_t>want)
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
        n = recv(h.src_fd, d.buf, _READ_SIZE, 0)
        if n > 0:
            d.buf_start = 0
            d.buf_end = n
        return n

    cdef void _release(self, _Half *h) noexcept:
        _release_dir(<_Dir *>h)

    cdef bint _holds_carrier(self, _Half *h) noexcept:
        cdef _Dir *d = <_Dir *>h
        return d.pipe_r >= 0 or d.buf != NULL


cdef void _release_dir(_Dir *d) noexcept:
    _return_pipe(d)        # a pipe still holding bytes is closed, not pooled
    _return_buf(d)


cdef inline Py_ssize_t _buffered(_Dir *d) noexcept:
    return (d.core.head_len - d.core.head_off) + d.in_pipe + (d.buf_end - d.buf_start)


cdef inline object _path(_Dir *d):
    return (None, "splice", "copy")[d.path]


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
    return await pump._wait_or_abort()
