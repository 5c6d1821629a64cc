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
import time

import zmq

from . import endpoints, multipart
from .broker_core import BrokerCore
from .exc import DuplicateBrokerError

log = logging.getLogger(__name__)

# Per poll, how many messages are read from one socket before looking at the
# other: batches cut poll() calls under load and keep both sides served.
BATCH = 64

_UNREACHABLE = (errno.EHOSTUNREACH, errno.EAGAIN)

PARENT_CHECK_INTERVAL = 0.05  # seconds: getppid() is a system call

# Cython-compiled, this module's file is the extension, not the source.
COMPILED = not __file__.endswith(".py")


class Broker:
    """Binds the frontend and backend and runs the core until stopped."""

    def __init__(self, settings, context=None):
        self.settings = settings.replace(
            frontend=endpoints.resolve(settings.frontend, "frontend"),
            backend=endpoints.resolve(settings.backend, "backend"))
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.core = BrokerCore(self.settings, time.monotonic(), os.getpid())
        self._locks = []
        self._stop_signalled = False
        self._parent = os.getppid() if settings.exit_with_parent else None
        self._next_parent_check = 0.0

    # -- life cycle -----------------------------------------------------------

    def bind(self):
        """Take the endpoint locks, then bind; DuplicateBrokerError if taken."""
        s = self.settings
        for name, endpoint in (("frontend", s.frontend), ("backend", s.backend)):
            fd = endpoints.lock(endpoint, name)
            if fd is not None:
                self._locks.append(fd)
        self.frontend = self._bind_router(s.frontend, "frontend")
        self.backend = self._bind_router(s.backend, "backend")
        # Sending to a worker that went away must fail, not vanish: that is
        # how a dead worker's job is failed fast (BrokerCore.undelivered).
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.monitor = self.backend.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller = zmq.Poller()
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.backend, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        log.info("broker pid %d: frontend %s, backend %s, heartbeat %.2fs (%s)",
                 os.getpid(), s.frontend, s.backend, s.heartbeat,
                 "compiled" if COMPILED else "pure Python")

    def _bind_router(self, endpoint, name):
        sock = self.context.socket(zmq.ROUTER)
        sock.linger = 1000
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
        self.poller = None
        if hasattr(self, "backend"):
            self.backend.disable_monitor()
        for sock in ("monitor", "frontend", "backend"):
            if hasattr(self, sock):
                getattr(self, sock).close()
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
        core = self.core
        poll = self.poller.poll
        frontend, backend, monitor = self.frontend, self.backend, self.monitor
        while True:
            events = dict(poll(core.poll_timeout()))
            if frontend in events:
                self._drain(frontend, core.client_message)
            if backend in events:
                self._drain(backend, core.worker_message)
            if monitor in events:
                self._read_monitor()
                self._send(core.connection_closed(time.monotonic()))
            if core.vanished:
                # Read the vanished workers' last words before the core decides.
                while multipart.readable(backend):
                    self._drain(backend, core.worker_message)
                self._send(core.bury_vanished(time.monotonic()))
            now = time.monotonic()
            if self._stop_signalled or self._parent_gone(now):
                core.request_stop(now)
            self._send(core.tick(now))
            if core.drained():
                break
        self._send(core.disconnect_all())

    def _drain(self, sock, handle):
        for _ in range(BATCH):
            try:
                frames = multipart.recv(sock, multipart.NOBLOCK)
            except zmq.Again:
                return
            self._send(handle(frames, time.monotonic()))
            # Ask rather than recv until EAGAIN: pyzmq's zmq.Again costs more
            # than a message, and most wake-ups bring just one.
            if not multipart.readable(sock):
                return

    def _send(self, sends):
        """Send what the core decided; report sends to vanished workers back to it."""
        while sends:
            failed = []
            for send in sends:
                if not send.to_worker:
                    multipart.send(self.frontend, send.frames)
                    continue
                try:
                    multipart.send(self.backend, send.frames, multipart.NOBLOCK)
                except zmq.ZMQError as exc:
                    if exc.errno not in _UNREACHABLE:
                        raise
                    failed.append(send)
            sends = self.core.undelivered(failed, time.monotonic()) if failed else None

    def _read_monitor(self):
        while True:
            try:
                multipart.recv(self.monitor, multipart.NOBLOCK)
            except zmq.Again:
                return

    def _parent_gone(self, now) -> bool:
        if self._parent is None or now < self._next_parent_check:
            return False
        self._next_parent_check = now + PARENT_CHECK_INTERVAL
        if os.getppid() != self._parent:
            log.warning("parent process %d is gone", self._parent)
            self._parent = None
            return True
        return False
