/* Platform shims for relaypump.pyx: kernel splice(2) on Linux, stubs elsewhere.
 *
 * The .pyx is one source for every platform (macOS wheels must build too): instead of Cython's
 * deprecated compile-time IF, it calls these np_* functions and tests NP_HAVE_SPLICE at run
 * time; on other systems the stubs fail with ENOSYS and the pump takes its recv/send path.
 * Nothing here allocates or keeps state.
 */
#ifndef NOPORTS_RELAYPUMP_SYS_H
#define NOPORTS_RELAYPUMP_SYS_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1   /* splice, pipe2, F_SETPIPE_SZ (Python.h's pyconfig.h defines it too) */
#endif

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <unistd.h>

/* send() flag that turns SIGPIPE into EPIPE; macOS relies on SO_NOSIGPIPE / Python's
 * SIG_IGN instead. */
#ifdef MSG_NOSIGNAL
#define NP_MSG_NOSIGNAL MSG_NOSIGNAL
#else
#define NP_MSG_NOSIGNAL 0
#endif

/* Cython treats `errno = x` as a new local variable: set it through a function. */
static inline void np_set_errno(int e) { errno = e; }

#if defined(__linux__) && defined(SPLICE_F_NONBLOCK) && defined(F_SETPIPE_SZ)
#define NP_HAVE_SPLICE 1

/* One direction's pipe: both ends non-blocking and close-on-exec; capacity raised to
 * `size` bytes when the kernel allows it.  Returns the capacity obtained (>= 4096) or -1. */
static inline int np_pipe_open(int fds[2], int size)
{
    int cap;
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0)
        return -1;
    /* EPERM past /proc/sys/fs/pipe-user-pages-soft for unprivileged users: keep what we got */
    (void)fcntl(fds[1], F_SETPIPE_SZ, size);
    cap = fcntl(fds[1], F_GETPIPE_SZ);
    if (cap < 0) {
        close(fds[0]);
        close(fds[1]);
        return -1;
    }
    return cap;
}

/* Move up to `len` bytes from fd_in to fd_out, one of which is a pipe, without copying them
 * through user space.  SPLICE_F_NONBLOCK makes the pipe side non-blocking; the sockets are
 * non-blocking themselves.  0 from a socket means the peer sent its FIN. */
static inline ssize_t np_splice(int fd_in, int fd_out, size_t len)
{
    return splice(fd_in, NULL, fd_out, NULL, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
}

#else
#define NP_HAVE_SPLICE 0

static inline int np_pipe_open(int fds[2], int size)
{
    (void)fds; (void)size;
    errno = ENOSYS;
    return -1;
}

static inline ssize_t np_splice(int fd_in, int fd_out, size_t len)
{
    (void)fd_in; (void)fd_out; (void)len;
    errno = ENOSYS;
    return -1;
}
#endif

#endif /* NOPORTS_RELAYPUMP_SYS_H */
