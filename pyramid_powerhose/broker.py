"""The broker's loop: the sockets around :class:`~.broker_core.BrokerCore`.

It reads like the zguide's Majordomo broker: poll, hand what came from
clients and from workers to the core, tell it when a connection closed,
let it expire what is dead and send heartbeats, and send what it returns.
Every decision is the core's; this module owns the sockets, the poller,
the endpoint locks and the signals, and nothing else.

Written once, in plain Python; where a compiler was present at install,
Cython compiles this module and the core (``setup.py``), and the same
source then runs as C.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
from time import monotonic

import zmq

from . import curve, endpoints
from .multipart import NOBLOCK, readable, recv_within, send
from .broker_core import BrokerCore, Send
from .exc import DuplicateBrokerError, SettingsError

try:
    import cython
except ImportError:  # needed only to compile; uncompiled, this module does without
    pass

log = logging.getLogger(__name__)

# Per poll, how many messages are read from one socket before looking at the
# other: batches cut poll() calls under load and keep both sides served.
BATCH = 64

_UNREACHABLE = (errno.EHOSTUNREACH, errno.EAGAIN)

PARENT_CHECK_INTERVAL = 0.05  # seconds: getppid() is a system call

# Cython-compiled, this module's file is the extension, not the source.
COMPILED = not __file__.endswith(".py")


# glibc serves an allocation this large or larger with its own mmap, and
# gives it back to the system when freed.  Left to itself, it raises that
# bound to the size of the largest block freed, so that after a burst of
# large jobs their frames come from (and stay in) the heap.
MMAP_THRESHOLD = 256 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter, from glibc's malloc.h


def give_large_frames_back():
    """Fix glibc's mmap threshold, so that the memory of large jobs goes back
    to the system once they are sent on; a no-op without glibc."""
    try:
        import ctypes
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its own malloc, its own policy
        pass


class Broker:
    """Binds the frontend and backend and runs the core until stopped."""

    def __init__(self, settings, context=None):
        give_large_frames_back()
        for name in ("frontend", "backend"):
            endpoints.single(getattr(settings, name), name, "a broker")
        self.settings = settings.replace(
            frontend=endpoints.resolve(settings.frontend, "frontend"),
            backend=endpoints.resolve(settings.backend, "backend"))
        curve.check_exposure(self.settings)
        self._curve_pair = None
        self.allow = None
        if settings.curve_secret:
            curve.require_curve()
            if not settings.curve_allow:
                raise SettingsError("curve_secret needs curve_allow: the directory of the "
                                    "clients' and workers' public keys the broker accepts")
            self._curve_pair = curve.load_pair(settings.curve_secret)
            self.allow = curve.AllowList(settings.curve_allow, monotonic())
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.core = BrokerCore(self.settings, monotonic(), os.getpid(),
                               "compiled" if COMPILED else "pure Python")
        self._locks = []
        self._stop_signalled = False
        self._readiness = None
        self._parent = os.getppid() if settings.exit_with_parent else None
        self._next_parent_check = 0.0
        self.frontend = self.backend = self.monitor = self.zap = None
        self.sockets = ()

    # -- life cycle -----------------------------------------------------------

    def bind(self):
        """Take the endpoint locks, then bind; DuplicateBrokerError if taken."""
        s = self.settings
        for name, endpoint in (("frontend", s.frontend), ("backend", s.backend)):
            fd = endpoints.lock(endpoint, name)
            if fd is not None:
                self._locks.append(fd)
        if self.allow is not None:
            # Bound before any CURVE socket: libzmq asks it during every handshake.
            self.zap = self.context.socket(zmq.REP)
            self.zap.linger = 0
            self.zap.bind(curve.ZAP_ENDPOINT)
        self.frontend = self._bind_router(s.frontend, "frontend")
        self.backend = self._bind_router(s.backend, "backend")
        # Sending to a worker that went away must fail, not vanish: that is
        # how a dead worker's job is failed fast (BrokerCore.undelivered).
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.monitor = self.backend.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sockets = (self.frontend, self.backend, self.monitor)
        if self.zap is not None:
            self.sockets += (self.zap,)
        log.info("broker pid %d: frontend %s, backend %s, heartbeat %.2fs (%s%s)",
                 os.getpid(), s.frontend, s.backend, s.heartbeat,
                 "compiled" if COMPILED else "pure Python",
                 f"; CURVE, {len(self.allow.keys)} keys allowed by {s.curve_allow}"
                 if self.allow is not None else "")

    def _bind_router(self, endpoint, name):
        sock = self.context.socket(zmq.ROUTER)
        sock.linger = 1000
        if self._curve_pair is not None:
            curve.serve(sock, self._curve_pair)
        # Per-frame hard cap; jobs between max_job_size and this get a clear
        # JobTooLargeError, larger frames cost the sender its connection.
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.settings.max_job_size + 65536)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            if exc.errno == errno.EADDRINUSE:
                raise DuplicateBrokerError(
                    f"the {name} {endpoint} is already in use; is a broker running?"
                ) from None
            raise
        return sock

    def close(self):
        """Close the sockets, once the last replies have left (up to 1 s)."""
        if self.backend is not None:
            self.backend.disable_monitor()
        for sock in (self.monitor, self.frontend, self.backend, self.zap):
            if sock is not None:
                sock.close()
        self.frontend = self.backend = self.monitor = self.zap = None
        if self._own_context:
            # Without term() a process exiting right after a final reply
            # can take that reply with it.
            self.context.term()
        for fd in self._locks:
            os.close(fd)
        self._locks = []

    def request_stop(self, *_):
        """SIGTERM, SIGINT: the loop tells the core at its next turn."""
        self._stop_signalled = True

    def install_signal_handlers(self):
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    # -- the loop ---------------------------------------------------------------

    def run(self):
        """Serve until stopped; returns once every accepted job is settled."""
        core: BrokerCore = self.core
        waiting: _Readiness = _Readiness(self.sockets)
        self._readiness = waiting
        while True:
            ready = waiting.wait(core.poll_timeout())
            if ready & FRONTEND:
                self._drain(FRONTEND)
            if ready & BACKEND:
                self._drain(BACKEND)
            if ready & MONITOR:
                self._read_monitor()
                self._send(core.connection_closed(_now()))
            if ready & ZAP:
                self._answer_zap()
            if core.vanished:
                # Read the vanished workers' last words before the core decides.
                while readable(self.backend):
                    self._drain(BACKEND)
                self._send(core.bury_vanished(_now()))
            now = _now()
            if self.allow is not None:
                self.allow.refresh(now)
            if self._stop_signalled or waiting.stop_signalled or self._parent_gone(now):
                core.request_stop(now)
            self._send(core.tick(now))
            if core.drained():
                break
        waiting.close()
        self._send(core.disconnect_all())

    def _drain(self, side):
        """Up to BATCH messages from the FRONTEND or the BACKEND, to the core."""
        core: BrokerCore = self.core
        sock = self.frontend if side == FRONTEND else self.backend
        for i in range(BATCH):
            frames = recv_within(sock, 0)
            if frames is None:
                return
            if side == FRONTEND:
                self._send(core.client_message(frames, _now()))
            else:
                self._send(core.worker_message(frames, _now()))
            # Ask rather than receive until there is none: both cost libzmq
            # the same, but most wake-ups bring just one message, and the
            # answer lets the next wait skip asking this socket again.
            if not readable(sock):
                self._readiness.asked(side)
                return

    def _send(self, sends):
        """Send what the core decided; report sends to vanished workers back to it."""
        waiting: _Readiness = self._readiness
        out: Send
        while sends:
            failed = []
            for out in sends:
                if not out.to_worker:
                    send(self.frontend, out.frames)
                    waiting.stale |= FRONTEND  # a send may take the socket's wake-up
                    continue
                waiting.stale |= BACKEND
                try:
                    send(self.backend, out.frames, NOBLOCK)
                except zmq.ZMQError as exc:
                    if exc.errno not in _UNREACHABLE:
                        raise
                    failed.append(out)
            sends = self.core.undelivered(failed, _now()) if failed else None

    def _answer_zap(self):
        """Whether a peer may connect: the allow-list decides (ZAP, RFC 27)."""
        self._readiness.stale |= ZAP
        while True:
            frames = recv_within(self.zap, 0)
            if frames is None:
                return
            send(self.zap, self.allow.answer(frames))

    def _read_monitor(self):
        self._readiness.stale |= MONITOR
        while recv_within(self.monitor, 0) is not None:
            pass

    def _parent_gone(self, now) -> bool:
        if self._parent is None or now < self._next_parent_check:
            return False
        self._next_parent_check = now + PARENT_CHECK_INTERVAL
        if os.getppid() != self._parent:
            log.warning("parent process %d is gone", self._parent)
            self._parent = None
            return True
        return False


def _now() -> float:
    """``time.monotonic()``; compiled, the same clock read in C, without a
    Python call and a float object (four a job)."""
    if not COMPILED:
        return monotonic()
    now: timespec
    clock_gettime(CLOCK_MONOTONIC, cython.address(now))
    return now.tv_sec + now.tv_nsec * 1e-9


FRONTEND, BACKEND, MONITOR, ZAP = 1, 2, 4, 8  # bits of _Readiness.wait()'s answer
MAX_DESCRIPTORS = 5  # those four sockets' and the wake-up pipe's
STOP_SIGNALS = frozenset((signal.SIGTERM, signal.SIGINT))


class _Readiness:
    """Which of the broker's sockets have a message waiting, asking libzmq little.

    Each question to a socket (``ZMQ_EVENTS``, or a receive that finds
    nothing) costs libzmq a ``getpid`` and a ``poll`` system call, and
    ``zmq_poll`` asks every socket before and after it sleeps.  A socket's
    ``ZMQ_FD`` becomes readable only when something new arrives for a
    socket that was asked since it was last used; so only a socket whose
    descriptor fired, or that was used since it was last asked (a send or a
    receive may take its wake-up), is asked, and the loop sleeps in one
    ``poll`` on the descriptors, with a self-pipe so that a signal wakes it.
    """

    def __init__(self, sockets):
        self.sockets = sockets
        self.stale = (1 << len(sockets)) - 1  # bits: used (or fired) since last asked
        self.stop_signalled = False
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Bit i: sockets[i]'s descriptor; the last bit, the wake-up pipe's.
        descriptors = [sock.getsockopt(zmq.FD) for sock in sockets] + [self.wake_r]
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
        try:
            self.previous_wakeup = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: signals are not ours to handle
            self.previous_wakeup = None

    def wait(self, timeout_ms) -> int:
        """The bits of the sockets with a message waiting, sleeping up to
        ``timeout_ms`` if none has; 0 if none came."""
        ready = self._ask()
        if ready:
            return ready
        fired = self._sleep(timeout_ms)
        wake = 1 << len(self.sockets)
        if fired & wake:
            self._drain_wake_pipe()
        self.stale |= fired & (wake - 1)
        return self._ask()

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
        # rest of the loop's own per message).
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

    def asked(self, side):
        """The FRONTEND or the BACKEND was just found empty: its descriptor will tell."""
        self.stale &= ~side

    def _drain_wake_pipe(self):
        """Read the numbers of the signals that came.

        Compiled, the loop runs no bytecode, so CPython may not run a
        signal's Python handler until much later: SIGTERM and SIGINT are
        seen here, in the bytes the C handler wrote, as soon as they wake
        the loop."""
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
        if self.previous_wakeup is not None:
            signal.set_wakeup_fd(self.previous_wakeup)
        os.close(self.wake_r)
        os.close(self.wake_w)
