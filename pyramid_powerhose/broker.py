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
import signal
from time import monotonic

import zmq

from . import busy_word, curve, endpoints
from .multipart import NOBLOCK, readable, recv_within, send
from .readiness import ParentWatch, Readiness, now as _now
from .broker_core import BrokerCore, Send
from .exc import DuplicateBrokerError, SettingsError

log = logging.getLogger(__name__)

# Per poll, how many messages are read from one socket before looking at the
# other: batches cut poll() calls under load and keep both sides served.
BATCH = 64

_UNREACHABLE = (errno.EHOSTUNREACH, errno.EAGAIN)

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
                               "compiled" if COMPILED else "pure Python",
                               _busy_word_opener(self.settings.backend))
        self._locks = []
        self._stop_signalled = False
        self._readiness = None
        self._parent = ParentWatch() if settings.exit_with_parent else None
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
        waiting: Readiness = Readiness(self.sockets, signals=True)
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
        waiting: Readiness = self._readiness
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
        if self._parent is None or not self._parent.gone(now):
            return False
        log.warning("parent process %d is gone", self._parent.parent)
        self._parent = None
        return True


def _busy_word_opener(backend):
    """The core's way to read the leased workers' busy words: only from the
    ``direct`` directory beside an ipc backend, where our workers bind their
    direct sockets (worker.py); None on tcp, where nothing is leased."""
    path = endpoints.ipc_path(backend)
    if path is None:
        return None
    directory = os.path.join(os.path.dirname(os.path.abspath(path)), "direct")
    return lambda word_path: busy_word.open_reader(word_path, directory)


FRONTEND, BACKEND, MONITOR, ZAP = 1, 2, 4, 8  # bits of Readiness.wait()'s answer
