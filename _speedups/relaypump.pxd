# The compiled relay pump's design header: every field of the splice, and the C it calls.
#
# A Splice joins two authenticated TCP sockets A and B.  Each direction (A->B, B->A) is one
# _Dir: bytes leave the source socket, wait in that direction's buffer (a kernel pipe on Linux,
# a reused malloc'd block elsewhere), and go out to the destination socket.  The event loop only
# says "readable"/"writable" (add_reader/add_writer on the raw fds, on uvloop and on stock
# asyncio alike); every byte is moved by C code in relaypump.pyx, never by a Python object.
# Why this shape, in numbers: see the hot-path comments in relaypump.pyx and bench/README.md.
# The lifecycle and control loop are SpliceCore's (noports/_speedups/pumpcore.pxd, shared with
# the tunnel pump); a _Dir starts with that skeleton's _Half, and only what follows it is the
# relay's own.
#
# relaypump.pyx cimports this file as ``relaypump`` (it sits next to the .pyx): Cython looks for
# a module's own .pxd under its dotted name (noports/_speedups/relaypump.pxd), which this
# layout (sources in the top-level _speedups/) does not have.  Only C declarations live here,
# so the cimport costs no import at run time.

from noports._speedups.pumpcore cimport _Half

cdef extern from "relaypump_sys.h" nogil:
    # 1 where kernel splice(2) and F_SETPIPE_SZ exist (Linux), else 0 and the stubs below
    # fail with ENOSYS
    int NP_HAVE_SPLICE
    int NP_MSG_NOSIGNAL
    void np_set_errno(int e)
    int np_pipe_open(int fds[2], int size)
    ssize_t np_splice(int fd_in, int fd_out, size_t length)


cdef struct _Dir:
    _Half core            # who, head bytes, counts and FIN/registration state: first, always
    # -- what waits after the head bytes, in order: the pipe or the copy buffer --
    int path              # 0 no byte read yet, 1 splice (kernel pipe), 2 copy (buf)
    int pipe_r            # splice path: the pipe's ends, -1 when this direction copies
    int pipe_w
    Py_ssize_t pipe_cap   # the pipe's capacity as the kernel granted it
    Py_ssize_t in_pipe    # bytes spliced into the pipe and not yet out of it
    char *buf             # copy path: one reused block, allocated at the first read
    Py_ssize_t buf_start  # unsent bytes are buf[buf_start:buf_end]
    Py_ssize_t buf_end


cdef struct _State:
    # the C half of a Splice beyond SpliceCore's (relaypump.pyx declares its few Python-object
    # fields next to it)
    _Dir ab                   # A -> B
    _Dir ba                   # B -> A
    bint use_splice           # may open kernel pipes (else every direction copies)
