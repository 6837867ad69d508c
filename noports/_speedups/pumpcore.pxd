# The compiled pumps' shared skeleton: its C fields, its cdef methods, and the C both pumps call.
#
# relaypump's Splice (kernel splice(2) through a pipe, bytes verbatim) and tunnelpump's
# TunnelSplice (recv, AES-256-CTR in place, send) are both a SpliceCore: two sockets, the
# "first" (A, plain) and the "second" (B, relay), and two directions, [0] first -> second and
# [1] second -> first.  SpliceCore (_speedups/pumpcore.pyx) owns the lifecycle and the control
# loop (drain, back-pressure, FIN, fairness, registration, the end); a pump overrides the steps
# that move bytes (_drain, _fill), its carrier's release (_release, _holds_carrier) and names
# its API.  Each pump's per-direction struct _Dir starts with a _Half, so the skeleton works on
# _Half pointers and a pump's step casts one back to its _Dir (C's first-member rule): no
# indirection, no Python object on the hot path.  Cross-module cdef calls go through the vtable,
# as the pumps' own cdef methods always did.
#
# Why this file lives here and not next to its .pyx in the top-level _speedups/ (as
# relaypump.pxd and tunnelpump.pxd do): the pumps inherit SpliceCore from another extension
# module, and Cython finds a cimported module's .pxd only under its dotted name
# (noports/_speedups/pumpcore.pxd for noports._speedups.pumpcore), which is also the module the
# pumps import the base type from at run time.  The .pyx stays in _speedups/, where setup.py's
# glob builds it; cythonize's include path (the project root) finds this file for it too.
# pumpcore is an internal base, not a data-plane module with a pure twin: noports._speedups
# does not list it, and nothing loads it but the two pumps.

from libc.errno cimport EAGAIN, EINTR, errno

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    int SHUT_WR

cdef extern from "<errno.h>" nogil:
    int EWOULDBLOCK           # Cython's libc.errno lacks it (equal to EAGAIN on Linux)


cdef struct _Half:
    # One direction's state as the skeleton sees it (the first member of each pump's _Dir).
    # -- who --
    int index             # 0: first -> second, 1: second -> first (chooses the Python callbacks)
    int src_fd            # the socket this direction reads
    int dst_fd            # the socket it writes
    # -- what goes out before anything read later: bytes read before the splice started --
    char *head            # relay: into a bytes object the Splice keeps (_head_ab/_head_ba);
    Py_ssize_t head_len   # tunnel: its own malloc'd copy, already put through the cipher
    Py_ssize_t head_off   # head bytes already sent
    # -- progress and state --
    long long forwarded   # bytes read from src (head included) and handed to dst's side
    bint src_eof          # src sent its FIN
    bint eof_passed       # ... and, everything before it sent, dst got our FIN
    bint reading          # add_reader(src_fd) is active
    bint writing          # add_writer(dst_fd) is active


cdef inline void _init_half(_Half *h, int index) noexcept:
    h.index = index
    h.src_fd = -1
    h.dst_fd = -1


cdef inline bint _would_block(int err) noexcept:
    return err == EAGAIN or err == EWOULDBLOCK


cdef inline int _send_head(_Half *h, int flags) noexcept:
    """Send what is left of ``h``'s head bytes (``flags``: the pump's MSG_NOSIGNAL): 0 all sent,
    1 dst would block, -1 dst failed (errno).  The first thing each pump's _drain does."""
    cdef ssize_t n
    while h.head_off < h.head_len:
        n = send(h.dst_fd, h.head + h.head_off, <size_t>(h.head_len - h.head_off), flags)
        if n > 0:
            h.head_off += n
        elif n < 0 and errno == EINTR:
            continue
        else:
            return 1 if n < 0 and _would_block(errno) else -1
    return 0


cdef class SpliceCore:
    cdef:
        _Half *_dir[2]            # the pump's two directions (its __cinit__ points these in)
        readonly object loop
        Py_ssize_t _max_buffer    # at most this many bytes wait per direction
        int _max_rounds           # fill/drain rounds per callback before yielding (fairness)
        bint _started             # _start() has run: fds and callbacks are live
        bint _finished            # both sockets closed, result set
        tuple _sides              # the sockets' names in results: ("a", "b"), ("plain", "relay")
        object _result            # the pump's result type (fields: bytes [0], bytes [1], how, by)
        object _sock_first        # owned: kept alive while their fds are in use, closed at end
        object _sock_second
        object _done              # asyncio Future -> the result
        object _cb_read_first     # bound methods handed to the loop, made once (not per call)
        object _cb_read_second
        object _cb_write_first
        object _cb_write_second
        object _how               # first event that ended the splice wins...
        object _by                # ... and the side it came from

    cdef int _setup(self, loop, max_buffer, int max_rounds, tuple sides, result) except -1
    cdef _guarded(self, _Half *h)
    cdef int _pump(self, _Half *h) except -1
    cdef int _want(self, _Half *h, bint read, bint write) except -1
    cdef int _fail(self, str how, str by) except -1
    cdef int _finish(self) except -1
    cdef void _release_c(self) noexcept

    # -- the steps each pump overrides --
    cdef int _drain(self, _Half *h) noexcept
    cdef Py_ssize_t _fill(self, _Half *h) except -2
    cdef void _release(self, _Half *h) noexcept
    cdef bint _holds_carrier(self, _Half *h) noexcept
