# The compiled relay pump's design header: every field of the splice, and the C it calls.
#
# A Splice joins two authenticated TCP sockets A and B.  Each direction (A->B, B->A) is one
# _Dir: bytes leave the source socket, wait in that direction's buffer (a kernel pipe on Linux,
# a reused malloc'd block elsewhere), and go out to the destination socket.  The event loop only
# says "readable"/"writable" (add_reader/add_writer on the raw fds, on uvloop and on stock
# asyncio alike); every byte is moved by C code in relaypump.pyx, never by a Python object.
# Why this shape, in numbers: see the hot-path comments in relaypump.pyx and bench/README.md.
#
# relaypump.pyx cimports this file as ``relaypump`` (it sits next to the .pyx): Cython looks for
# a module's own .pxd under its dotted name (noports/_speedups/relaypump.pxd), which this
# layout (sources in the top-level _speedups/) does not have.  Only C declarations live here,
# so the cimport costs no import at run time.

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    int SHUT_WR

cdef extern from "<errno.h>" nogil:
    int EWOULDBLOCK           # Cython's libc.errno lacks it (equal to EAGAIN on Linux)

cdef extern from "relaypump_sys.h" nogil:
    # 1 where kernel splice(2) and F_SETPIPE_SZ exist (Linux), else 0 and the stubs below
    # fail with ENOSYS
    int NP_HAVE_SPLICE
    int NP_MSG_NOSIGNAL
    void np_set_errno(int e)
    int np_pipe_open(int fds[2], int size)
    ssize_t np_splice(int fd_in, int fd_out, size_t length)


cdef struct _Dir:
    # -- who --
    int index             # 0: A->B, 1: B->A (chooses the Python callbacks)
    int src_fd            # the socket this direction reads
    int dst_fd            # the socket it writes
    # -- what is waiting to go out, in order: head bytes, then the pipe or the copy buffer --
    const char *head      # bytes read after the auth line (owned by Splice._head_ab/_head_ba)
    Py_ssize_t head_len
    Py_ssize_t head_off   # head bytes already sent
    int path              # 0 no byte read yet, 1 splice (kernel pipe), 2 copy (buf)
    int pipe_r            # splice path: the pipe's ends, -1 when this direction copies
    int pipe_w
    Py_ssize_t pipe_cap   # the pipe's capacity as the kernel granted it
    Py_ssize_t in_pipe    # bytes spliced into the pipe and not yet out of it
    char *buf             # copy path: one reused block, allocated at the first read
    Py_ssize_t buf_start  # unsent bytes are buf[buf_start:buf_end]
    Py_ssize_t buf_end
    # -- progress and state --
    long long forwarded   # bytes read from src (head included) and handed to dst's side
    bint src_eof          # src sent its FIN
    bint eof_passed       # ... and, everything before it sent, dst got our FIN
    bint reading          # add_reader(src_fd) is active
    bint writing          # add_writer(dst_fd) is active


cdef struct _State:
    # the C half of a Splice (relaypump.pyx declares its few Python-object fields next to it)
    _Dir ab                   # A -> B
    _Dir ba                   # B -> A
    Py_ssize_t max_buffer     # at most this many bytes wait per direction
    bint started              # _start() has run: fds and callbacks are live
    bint finished             # both sockets closed, result set
    bint use_splice           # may open kernel pipes (else every direction copies)
