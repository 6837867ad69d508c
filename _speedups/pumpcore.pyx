# cython: language_level=3
"""What the two compiled pumps share (``relaypump`` splices, ``tunnelpump`` runs AES-CTR).

An internal base, not a data-plane module: it has no pure twin to choose between (the pure pumps
share ``noports/_pure/pumpcore.py`` the same way), ``noports._speedups`` does not list it, and
only the two compiled pumps import it.  Both splice two already-connected sockets through C
loops that the event loop (uvloop or stock asyncio) drives by readiness of the two raw fds
(``add_reader``/``add_writer``), and own the sockets until both are closed.  Here is that
skeleton, once:

- the lifecycle: ``_start`` (fd checks, socket tuning, the four loop callbacks), ``max_buffer``,
  ``done``, ``wait``, ``close``, the result once both sockets are closed;
- the control loop ``_pump``: what waits goes out first, a full destination stops reading the
  source (back-pressure), a FIN is passed on as a FIN (half-close), a reset or error on one side
  ends both, and at most ``_max_rounds`` rounds run per callback (fairness);
- readiness registration (``_want``) and the end (``_fail``, ``_finish``).

How bytes move is each pump's: ``_drain`` (send what waits), ``_fill`` (read into an empty
carrier: the relay's pipe or copy block, the tunnel's block after the cipher ran over it),
``_release`` (the carrier back to its pool once empty) and ``_holds_carrier`` (for tests).  The
field layout and why this module's .pxd sits under noports/_speedups/: pumpcore.pxd.
"""

import asyncio

from libc.errno cimport EINTR, errno

# This module's own declarations, cimported by name although Cython loads them anyway: it is how
# cythonize learns that this .pyx depends on noports/_speedups/pumpcore.pxd (it only looks for a
# .pxd next to the .pyx), so a change to the .pxd rebuilds the base with the pumps.
from noports._speedups.pumpcore cimport SHUT_WR, _Half, _would_block, shutdown

# tune: one socket set-up for all four pumps (non-blocking, TCP_NODELAY, keepalive; a socket
# that is not TCP or already dead is left as it is: here the first syscall will find out);
# READ_SIZE: the smallest max_buffer is two of the pure pumps' reads, in both implementations.
from noports._pure.pumpcore import READ_SIZE, tune

__all__ = ["SpliceCore"]


cdef class SpliceCore:
    """The base of ``relaypump.Splice`` and ``tunnelpump.TunnelSplice``; not usable alone.

    A pump's ``__cinit__`` points ``_dir`` at the ``_Half`` heading each of its two ``_Dir``
    structs, its ``__init__`` calls ``_setup``, and it names the public counters itself.
    """

    def __cinit__(self):
        if type(self) is SpliceCore:
            raise TypeError("SpliceCore is the compiled pumps' base: make a pump instead")

    cdef int _setup(self, loop, max_buffer, int max_rounds, tuple sides, result) except -1:
        if max_buffer < 2 * READ_SIZE:
            raise ValueError(f"max_buffer must be at least {2 * READ_SIZE} bytes")
        self.loop = loop
        self._max_buffer = max_buffer
        self._max_rounds = max_rounds
        self._sides = sides
        self._result = result
        self._done = loop.create_future()
        return 0

    def __dealloc__(self):
        # Only C state is touched (the pump's _release_c frees or pools its carriers): safe
        # after the pump's Python fields have been cleared.
        self._release_c()

    # -- public surface (the pure twins') --
    @property
    def max_buffer(self):
        return self._max_buffer

    @property
    def done(self):
        return self._done.done()

    async def wait(self):
        return await asyncio.shield(self._done)

    def close(self):
        """Abort both sockets now (unsent buffered bytes are dropped)."""
        self._fail("aborted", None)

    async def _wait_or_abort(self):
        """``wait()``, aborting both sockets if the waiter is cancelled (the modules' splice)."""
        try:
            return await self.wait()
        except asyncio.CancelledError:
            self.close()
            raise

    # -- for tests --
    @property
    def _carriers(self):
        """Whether each direction holds a carrier (pipe or block) now (an idle one must not)."""
        return (self._holds_carrier(self._dir[0]), self._holds_carrier(self._dir[1]))

    # -- start: called once by the module's open_splice --
    def _start(self, sock_first, sock_second):
        self._sock_first = sock_first   # ownership passes here: closed by _finish(), whatever
        self._sock_second = sock_second
        if self._finished:              # close() came first
            self._close_sockets()
            return
        fd_first = sock_first.fileno()
        fd_second = sock_second.fileno()
        if fd_first < 0 or fd_second < 0:
            # a socket that is already closed cannot be spliced: a reset by that side
            self._fail("reset", self._sides[0] if fd_first < 0 else self._sides[1])
            return
        for sock in (sock_first, sock_second):
            tune(sock)
        self._dir[0].src_fd = fd_first
        self._dir[0].dst_fd = fd_second
        self._dir[1].src_fd = fd_second
        self._dir[1].dst_fd = fd_first
        self._cb_read_first = self._on_read_first
        self._cb_read_second = self._on_read_second
        self._cb_write_first = self._on_write_first
        self._cb_write_second = self._on_write_second
        self._started = True
        # Head bytes and anything already queued move now; the loop takes over from here.
        self._guarded(self._dir[0])
        self._guarded(self._dir[1])

    # -- loop callbacks: readiness of one fd drives one direction --
    def _on_read_first(self):
        self._guarded(self._dir[0])     # first readable: first -> second can fill

    def _on_write_second(self):
        self._guarded(self._dir[0])     # second writable: first -> second can drain

    def _on_read_second(self):
        self._guarded(self._dir[1])

    def _on_write_first(self):
        self._guarded(self._dir[1])

    cdef _guarded(self, _Half *h):
        try:
            self._pump(h)
        except BaseException:
            # a loop call failed (e.g. the loop is closing), or a step did (the tunnel's
            # foreign cipher): never leave fds registered
            self._fail("reset", None)
            raise

    # -- the hot path --
    cdef int _pump(self, _Half *h) except -1:
        """Move what can move now in direction ``h``, then register exactly the readiness it
        waits for: src readable (nothing waits), dst writable (dst full), or nothing (FIN)."""
        cdef Py_ssize_t n
        cdef int rounds = 0
        cdef int r
        if self._finished:
            return 0   # a callback the loop had already queued when the splice ended
        while True:
            # What waits goes first (head bytes, then the carrier: the relay's pipe or copy
            # buffer, the tunnel's block): order is kept and at most one read's worth beyond the
            # head is ever held per direction (relay: <= pipe capacity or READ_SIZE; tunnel: one
            # block, <= max_buffer).
            r = self._drain(h)
            if r < 0:
                return self._fail("reset", self._sides[1 - h.index])    # dst's side
            if r > 0:
                # dst is full: stop reading src (its kernel buffer fills, TCP's window closes
                # on the sender: back-pressure) until dst drains.  For the relay, not reading
                # more into the pipe meanwhile also avoids splice's ambiguity: with a non-empty
                # pipe EAGAIN may mean "pipe slots full" rather than "socket empty", and a
                # level-triggered reader on a socket we cannot drain would spin.
                return self._want(h, False, True)
            if h.src_eof:
                # everything before the FIN is out: pass it on, keep the other direction open
                if shutdown(h.dst_fd, SHUT_WR) != 0:
                    return self._fail("reset", self._sides[1 - h.index])
                h.eof_passed = True
                self._release(h)
                self._want(h, False, False)
                if self._dir[0].eof_passed and self._dir[1].eof_passed:
                    self._fail("eof", None)
                return 0
            if rounds == self._max_rounds:
                # Fairness: let the other connections run.  Come back by call_soon, not only by
                # the poll: uvloop (libuv) reports POLLERR on an fd once and then stops polling
                # it, so bytes still queued -- and the reset behind them -- would never be read.
                # (For the same reason there is no "short read: skip the read that would say
                # EAGAIN" shortcut: that last read is the one that reports the reset.)
                self._release(h)    # empty: its carrier goes back to the pool
                self._want(h, True, False)
                self.loop.call_soon(
                    self._cb_read_first if h.index == 0 else self._cb_read_second)
                return 0
            rounds += 1
            n = self._fill(h)
            if n > 0:
                h.forwarded += n
            elif n == 0:
                h.src_eof = True
            elif _would_block(errno):
                self._release(h)    # carrier empty, so EAGAIN is unambiguous: socket drained
                return self._want(h, True, False)
            elif errno != EINTR:
                return self._fail("reset", self._sides[h.index])        # src's side

    # -- the steps each pump overrides (these bodies only keep a bare object harmless) --
    cdef int _drain(self, _Half *h) noexcept:
        """Send what waits in ``h``: 0 all sent, 1 dst would block, -1 dst failed (errno)."""
        return 0

    cdef Py_ssize_t _fill(self, _Half *h) except -2:
        """Read from ``h``'s source into its (empty) carrier: > 0 bytes, 0 FIN, -1 errno;
        -2 with an exception set."""
        return 0

    cdef void _release(self, _Half *h) noexcept:
        """``h`` is empty (or the splice ended): give its carrier back."""
        pass

    cdef bint _holds_carrier(self, _Half *h) noexcept:
        return False

    # -- registration and the end --
    cdef int _want(self, _Half *h, bint read, bint write) except -1:
        """Make the loop watch exactly what ``h`` waits for (no call when nothing changes:
        each add/remove costs an epoll_ctl and a Python call)."""
        if read != h.reading:
            h.reading = read
            if read:
                self.loop.add_reader(
                    h.src_fd, self._cb_read_first if h.index == 0 else self._cb_read_second)
            else:
                self.loop.remove_reader(h.src_fd)
        if write != h.writing:
            h.writing = write
            if write:
                self.loop.add_writer(
                    h.dst_fd, self._cb_write_second if h.index == 0 else self._cb_write_first)
            else:
                self.loop.remove_writer(h.dst_fd)
        return 0

    cdef int _fail(self, str how, str by) except -1:
        """Record the first event that ended the splice, then close everything."""
        if self._how is None:
            self._how = how
            self._by = by
        return self._finish()

    cdef int _finish(self) except -1:
        if self._finished:
            return 0
        self._finished = True
        if self._started:
            try:
                self._want(self._dir[0], False, False)
                self._want(self._dir[1], False, False)
            except Exception:
                pass        # a closed loop has already forgotten the fds
        self._release_c()
        self._close_sockets()
        self._cb_read_first = self._cb_read_second = None
        self._cb_write_first = self._cb_write_second = None
        if not self._done.done():
            result = self._result(self._dir[0].forwarded, self._dir[1].forwarded,
                                  self._how or "closed", self._by)
            try:
                self._done.set_result(result)
            except RuntimeError:
                pass        # the loop is closed: nobody can await the result any more
        return 0

    def _close_sockets(self):
        for sock in (self._sock_first, self._sock_second):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass

    cdef void _release_c(self) noexcept:
        """Both directions' carriers back (the splice ended, or the object is going away)."""
        if self._dir[0] != NULL:
            self._release(self._dir[0])
            self._release(self._dir[1])
