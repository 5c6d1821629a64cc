"""How the broker's and the worker's loops wait: which of their sockets
have a message, asking libzmq as little as possible; the clock (the
client's direct path reads it too); and whether the process that started
them is gone.

Each question to a socket (``ZMQ_EVENTS``, or a receive that finds
nothing) costs libzmq a ``getpid`` and a ``poll`` system call, and
``zmq_poll`` asks every socket before and after it sleeps.  A socket's
``ZMQ_FD`` becomes readable only when something new arrives for a socket
that was asked since it was last used; so only a socket whose descriptor
fired, or that was used since it was last asked (a send or a receive may
take its wake-up), is asked, and the loop sleeps in one ``poll`` on the
descriptors.  The broker adds a self-pipe so that a signal wakes it.
"""

from __future__ import annotations

import errno
import os
import select
import signal
from time import monotonic, monotonic_ns

import zmq

from .multipart import readable

try:
    import cython
except ImportError:  # needed only to compile; uncompiled, this module does without
    pass

# Cython-compiled, this module's file is the extension, not the source.
COMPILED = not __file__.endswith(".py")

MAX_DESCRIPTORS = 5  # the broker's four sockets and the wake-up pipe
# wait()'s answer when something woke the loop that was not a message (a
# peer connecting, a signal): above every socket's bit.
WOKEN = 1 << MAX_DESCRIPTORS
STOP_SIGNALS = frozenset((signal.SIGTERM, signal.SIGINT))
PARENT_CHECK_INTERVAL = 0.05  # seconds: getppid() is a system call


def now() -> float:
    """``time.monotonic()``; compiled, the same clock read in C, without a
    Python call and a float object."""
    if not COMPILED:
        return monotonic()
    at: timespec
    clock_gettime(CLOCK_MONOTONIC, cython.address(at))
    return at.tv_sec + at.tv_nsec * 1e-9


def now_ns() -> int:
    """``time.monotonic_ns()``; compiled, the same clock read in C (the
    client reads it three times a direct job)."""
    if not COMPILED:
        return monotonic_ns()
    at: timespec
    clock_gettime(CLOCK_MONOTONIC, cython.address(at))
    return at.tv_sec * 1000000000 + at.tv_nsec


class ParentWatch:
    """--exit-with-parent: whether the process that started this one is
    gone, asked at most every PARENT_CHECK_INTERVAL (a loop turns once a
    message, and ``getppid`` is a system call)."""

    def __init__(self):
        self.parent = os.getppid()
        self.next_check = 0.0

    def gone(self, now) -> bool:
        if now < self.next_check:
            return False
        self.next_check = now + PARENT_CHECK_INTERVAL
        return os.getppid() != self.parent


class Readiness:
    """Which of ``sockets`` have a message waiting: bit ``1 << i`` for
    ``sockets[i]``.  ``signals``: also wake on SIGTERM and SIGINT, through
    a pipe given to ``signal.set_wakeup_fd`` (the main thread only), and
    say so in ``stop_signalled``."""

    def __init__(self, sockets, signals=False):
        self.sockets = tuple(sockets)
        self.stale = (1 << len(self.sockets)) - 1  # bits: used (or fired) since last asked
        self.stop_signalled = False
        self.previous_wakeup = None
        self.wake_r = self.wake_w = -1
        descriptors = [sock.getsockopt(zmq.FD) for sock in self.sockets]
        if signals:
            self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            descriptors.append(self.wake_r)  # the last bit: the wake-up pipe's
        if len(descriptors) > MAX_DESCRIPTORS:
            raise ValueError(f"at most {MAX_DESCRIPTORS - 1} sockets")
        self.nfds = len(descriptors)
        if COMPILED:  # poll() on an array (see _sleep)
            for i in range(self.nfds):
                self.fds[i].fd = descriptors[i]
                self.fds[i].events = POLLIN
        else:
            self.poll = select.poll()
            for fd in descriptors:
                self.poll.register(fd, select.POLLIN)
            self.slot = {fd: 1 << i for i, fd in enumerate(descriptors)}
        if signals:
            try:
                self.previous_wakeup = signal.set_wakeup_fd(self.wake_w,
                                                            warn_on_full_buffer=False)
            except ValueError:  # not the main thread: signals are not ours to handle
                self.previous_wakeup = None

    def wait(self, timeout_ms) -> int:
        """The bits of the sockets with a message waiting, sleeping up to
        ``timeout_ms`` if none has; 0 if the time is up, WOKEN if something
        else than a message woke the loop."""
        ready = self._ask()
        if ready:
            return ready
        fired = self._sleep(timeout_ms)
        if not fired:
            return 0
        wake = 1 << len(self.sockets)
        if fired & wake:
            self._drain_wake_pipe()
        self.stale |= fired & (wake - 1)
        return self._ask() or WOKEN

    def _sleep(self, timeout_ms) -> int:
        """Sleep until a descriptor fires or ``timeout_ms`` is up: the bits of
        those that fired."""
        fired = 0
        if not COMPILED:
            for fd, _ in self.poll.poll(timeout_ms):
                fired |= self.slot[fd]
            return fired
        # Compiled: poll() itself, on the array made once, rather than
        # select.poll's method call and list of tuples (as much work as the
        # rest of a loop's own per message).
        with cython.nogil:  # another thread of this process may be waiting to run
            rc = poll(self.fds, self.nfds, timeout_ms)
        if rc < 0:
            err = errno_of_c
            if err != errno.EINTR:
                raise OSError(err, os.strerror(err))
            PyErr_CheckSignals()  # a signal: its Python handler runs now
            return 0
        for i in range(self.nfds):
            if self.fds[i].revents:
                fired |= 1 << i
        return fired

    def _ask(self) -> int:
        """Ask the stale sockets; those with a message stay stale, since
        the loop is about to use them."""
        ready = 0
        for i in range(len(self.sockets)):
            bit = 1 << i
            if self.stale & bit:
                if readable(self.sockets[i]):
                    ready |= bit
                else:
                    self.stale &= ~bit
        return ready

    def asked(self, bit):
        """That socket was just found empty: its descriptor will tell."""
        self.stale &= ~bit

    def _drain_wake_pipe(self):
        """Read the numbers of the signals that came.

        Compiled, a loop runs no bytecode, so CPython may not run a
        signal's Python handler until much later: SIGTERM and SIGINT are
        seen here, in the bytes the C handler wrote, as soon as they wake
        the loop."""
        if self.wake_r < 0:
            return
        try:
            while True:
                signals = os.read(self.wake_r, 512)
                if not signals:
                    return
                if STOP_SIGNALS.intersection(signals):
                    self.stop_signalled = True
        except BlockingIOError:
            pass

    def close(self):
        """Give the signals' wake-up back and close the pipe, if there is one."""
        if self.wake_r < 0:
            return
        if self.previous_wakeup is not None:
            signal.set_wakeup_fd(self.previous_wakeup)
        os.close(self.wake_r)
        os.close(self.wake_w)
        self.wake_r = self.wake_w = -1
