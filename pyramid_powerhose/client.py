"""The client: hands jobs to the broker and waits for their results.

Each thread gets its own DEALER socket, so threads run jobs concurrently
with no lock and no hand-off between them; each job carries an id, so a
reply that arrives after its caller gave up is recognised and dropped and
the socket stays usable.  After ``fork()`` a child opens its own context
and sockets on first use.

A broker that dies takes its jobs with it, and a client that waited for
their timeout would hold a web request for seconds for nothing.  So one
thread per client follows every socket's connection (libzmq's socket
monitor: connected, disconnected) and counts its losses; a thread waiting
for a reply looks at that count only when a short wait slice passes with
no reply, so a job that gets its reply at once costs nothing more.  A job
sent before its socket lost the broker, or on a socket that found no
broker within ``CONNECT_TIMEOUT``, fails with ``BrokerLostError``.

Given several frontends (several brokers), each thread has a socket to
each broker, and each job goes to one of them, in turn among the brokers
that some socket of the client is connected to now.  A broker whose
connection drops, or to which a job failed with ``BrokerLostError``, is
left out until a socket connects to it again (libzmq keeps trying in the
background), so a restarted broker is used again as soon as it is back.
With ``retries``, a job lost with its broker is sent again, to another
broker if one answers.  With one frontend, none of this costs anything.

The direct path (docs/direct_path.rst): with one ipc frontend, CURVE off,
``settings.direct`` and no gevent, the watcher's thread also keeps a
control socket to the broker, which leases this process idle workers; a
job then goes from its thread straight to a leased worker (a socket per
thread and lease) and back, without the broker.  A job with no lease to
go on, or that a worker refused before starting it (NOT_RUN), goes
through the broker as above, and the broker hears how many such jobs
there are.  Otherwise every job goes through the broker.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import itertools
import json
import logging
import operator
import os
import sys
import threading
import weakref
from time import monotonic

import zmq
import zmq.utils.monitor

from . import curve, endpoints, exc
from .job import Job, to_bytes
from .exc import ProtocolError
from .leases import LEASE_BEAT, Lease, Leases
# Names, not module.NAME: compiled (setup.py), a module global is a cached
# look-up, a module's attribute a dictionary look-up every time.
from .multipart import NOBLOCK, recv, recv_within, send
from .protocol import (
    ERR_NOT_RUN, MAX_SERVICE_LENGTH, MMI_FOUND, MMI_PING, MMI_PREFIX, MMI_SERVICE, MMI_STATS,
    REVOKE_LOST, WORKER_HEADER, Request, client_request, direct_request, job_size, new_request,
    parse_client_reply, parse_direct_reply, parse_lease_notice,
)
from .readiness import now_ns as _now_ns
from .settings import Settings
from .tracing import inject

try:
    import cython
    from cython.cimports.cpython.bytes import PyBytes_FromStringAndSize
except (ImportError, AttributeError):  # needed only to compile (AttributeError:
    pass  # Cython installed, cython.cimports exists only when compiling)

log = logging.getLogger(__name__)

# Cython-compiled, this module's file is the extension, not the source.
COMPILED = not __file__.endswith(".py")


def _hex(number: cython.longlong) -> bytes:
    """``b"%x" % number`` for a job id (> 0); compiled, formatted in C."""
    if not COMPILED:
        return b"%x" % number
    digits: cython.p_const_char = b"0123456789abcdef"
    buffer = cython.declare(cython.char[16])  # 64 bits: 16 digits at most
    i: cython.int = 16
    while True:
        i -= 1
        buffer[i] = digits[number & 15]
        number >>= 4
        if number <= 0:
            return PyBytes_FromStringAndSize(cython.address(buffer[i]), 16 - i)

# Bumped in every forked child: a client notices it is in a new process
# with an integer comparison instead of a getpid() system call per job.
_fork_generation = 0


def _after_fork():
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork)

MAP_WINDOW = 128  # jobs in flight at once per map() call

# A thread waiting for a reply looks at its connection this often.
WAIT_SLICE = 0.2
WAIT_SLICE_MS = 200
# A socket that has not reached a broker within this many seconds of its
# creation or of its last disconnection has none to reach (none listens, or
# it is not coming back): its jobs fail with BrokerLostError, not at their
# timeout.  A broker restarted faster than this keeps the jobs sent to it.
CONNECT_TIMEOUT = 1.0

_MONITORED = (zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
              | zmq.EVENT_MONITOR_STOPPED)
# A thread's socket to a leased worker: only its loss matters.
_LEASE_MONITORED = zmq.EVENT_DISCONNECTED | zmq.EVENT_MONITOR_STOPPED
_monitor_ids = itertools.count()


def _monitor(context, sock, events):
    """A PAIR socket that will read ``sock``'s ``events`` (call it before
    connecting ``sock``, so that no event is missed).  Our own address:
    pyzmq's get_monitor_socket() names it after the socket's fd, which a
    new socket may reuse while the old monitor is bound."""
    address = f"inproc://powerhose-monitor-{next(_monitor_ids)}"
    sock.monitor(address, events)
    monitor = context.socket(zmq.PAIR)
    monitor.connect(address)
    return monitor


class _Broker:
    """One frontend of the client, and what its sockets say about it.

    ``up``: how many of the client's sockets are connected to it now;
    ``lost``: a connection to it dropped, or a job to it failed with
    BrokerLostError, and none connected since.  Written under the
    watcher's condition (``lost`` also by a thread whose job was lost).
    """

    __slots__ = ("endpoint", "index", "up", "lost")

    def __init__(self, endpoint, index):
        self.endpoint = endpoint
        self.index = index
        self.up = 0
        self.lost = False


class _Channel:
    """One thread's socket to one broker, with its job id counter.

    ``connected``, ``losses`` (connections dropped so far) and ``since``
    (when it was created or last lost its broker) are written by the
    client's :class:`_ConnectionWatcher` thread, read by the owner.
    """

    __slots__ = ("socket", "ids", "since", "connected", "losses", "secure", "broker",
                 "frontend", "__weakref__")

    def __init__(self, context, broker, watcher, keys=None):
        frontend = broker.endpoint
        self.broker = broker
        self.frontend = frontend
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        # With CURVE, a connection counts once its handshake succeeded: a
        # broker that refuses our key accepts the tcp connection first.
        self.secure = keys is not None
        if keys is not None:
            curve.connect_with(sock, *keys)
        self.socket = sock
        self.ids = itertools.count(1)
        self.since = monotonic()
        self.connected = False
        self.losses = 0
        weakref.finalize(self, _close_socket, sock)
        watcher.watch(_Watched(self), _monitor(context, sock, _MONITORED))
        # Not ZMQ_IMMEDIATE: with it, libzmq throws away the replies a socket
        # has received but not yet read when the connection drops, e.g. the
        # last replies of a broker that finished its jobs and stopped.  Jobs
        # queued while no broker is up are discarded with the socket (_retire).
        sock.connect(frontend)

    def next_id(self):
        return _hex(next(self.ids))

    def close(self):
        _close_socket(self.socket)


# A channel's socket is closed by Client.close() in the closing thread, or by
# the channel's finalizer in the thread whose local storage drops it, which
# may run at the same moment when that thread exits: libzmq aborts if two
# threads close one socket at once.  pyzmq makes a second close a no-op.
_closing = threading.Lock()


def _close_socket(sock):
    with _closing:
        sock.close(0)


def _gevent_patched() -> bool:
    """Whether gevent has monkey-patched this process (its sockets, at least)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("socket")


def _within(green, sock, timeout_ms):
    """recv_within, or under gevent (Client._reset) a wait that yields to its hub."""
    if green:
        return _green_recv_within(sock, timeout_ms)
    return recv_within(sock, timeout_ms)


def _green_recv_within(sock, timeout_ms):
    """recv_within for a green socket: the wait yields to gevent's hub."""
    if timeout_ms > 0 and not sock.poll(timeout_ms):
        return None
    try:
        return recv(sock, NOBLOCK)
    except zmq.Again:
        return None


class _ConnectionWatcher:
    """A thread that reads every channel's socket monitor and keeps its state.

    Each monitor socket is created by its channel's thread and handed over
    here under a lock; from then on only this thread touches it, and closes
    it when libzmq says the monitored socket is gone.
    """

    def __init__(self, context, green=False, direct=None, frontend=None):
        self._pid = os.getpid()
        self._green = green
        self._context = context
        self._direct = direct  # a Leases: this thread also runs the control socket
        self._frontend = frontend
        self._stopped = False
        self._lock = threading.Lock()
        # Held to change a broker's ``up``, notified when one changes.
        self.changed = threading.Condition(threading.Lock())
        self._new = []  # (_Watched or Lease, monitor socket) not yet polled
        address = f"inproc://powerhose-watcher-{id(self):x}"
        self._wake_in = context.socket(zmq.PAIR)
        self._wake_in.bind(address)
        self._wake_out = context.socket(zmq.PAIR)
        self._wake_out.connect(address)
        self._thread = threading.Thread(target=self._run, name="powerhose-connections",
                                        daemon=True)
        self._thread.start()

    def watch(self, watched, monitor):
        """Read ``monitor`` from now on: a channel's (``_Watched``) or a
        thread's socket to a leased worker (its ``Lease``)."""
        with self._lock:
            self._new.append((watched, monitor))
            self._wake_out.send(b"")

    def stop(self):
        """End the thread; idempotent, and a no-op in a forked child."""
        if self._pid != os.getpid():
            return  # before the lock: a fork may have copied it held
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._wake_out.send(b"stop")
        self._thread.join()
        self._wake_out.close(0)
        if self._direct is not None:
            self._direct.close()  # its eventfd, once the thread no longer polls it

    def _run(self):
        if self._green:  # a greenlet under gevent: its poll must yield
            import zmq.green as green_zmq
            poller = green_zmq.Poller()
        else:
            poller = zmq.Poller()
        poller.register(self._wake_in, zmq.POLLIN)
        channels = {}  # monitor socket -> _Watched, or the Lease of a direct socket
        control = None
        try:
            if self._direct is not None:
                control = _Control(self._context, self._frontend, self._direct, poller)
            while True:
                try:
                    ready = poller.poll(None if control is None else control.timeout())
                except zmq.ZMQError:
                    return  # the context was destroyed first (a client never closed)
                for sock, _ in ready:
                    if control is not None and control.handle(sock):
                        continue
                    if sock is self._wake_in:
                        if self._wake_in.recv() == b"stop":
                            return
                        with self._lock:
                            new, self._new = self._new, []
                        for watched, monitor in new:
                            channels[monitor] = watched
                            poller.register(monitor, zmq.POLLIN)
                        continue
                    if not self._event(sock, channels[sock]):
                        poller.unregister(sock)
                        del channels[sock]
                        sock.close(0)
                if control is not None:
                    control.tick()
        finally:
            for monitor in channels:
                monitor.close(0)
            if control is not None:
                control.close()
            self._wake_in.close(0)

    def _event(self, monitor, watched) -> bool:
        """Apply one event to its channel or lease; False once the socket
        watched is gone."""
        event = zmq.utils.monitor.recv_monitor_message(monitor)["event"]
        if type(watched) is Lease:
            if event == zmq.EVENT_DISCONNECTED:
                self._direct.lost(watched)
            return event != zmq.EVENT_MONITOR_STOPPED
        if event == zmq.EVENT_MONITOR_STOPPED:
            self._count(watched, False)
            return False
        channel = watched.channel()
        if channel is None:
            return True  # its socket is closing: MONITOR_STOPPED follows
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED or (
                event == zmq.EVENT_CONNECTED and not channel.secure):
            channel.connected = True
            self._count(watched, True)
        elif event == zmq.EVENT_DISCONNECTED:
            channel.since = monotonic()
            channel.connected = False
            channel.losses += 1
            if watched.connected:
                watched.broker.lost = True
            self._count(watched, False)
        return True

    def _count(self, watched, connected):
        """Keep the broker's count of connected sockets."""
        if watched.connected == connected:
            return
        watched.connected = connected
        with self.changed:
            watched.broker.up += 1 if connected else -1
            if connected:
                watched.broker.lost = False
            self.changed.notify_all()


class _Watched:
    """What the watcher keeps of a channel: the channel may go before its monitor."""

    __slots__ = ("channel", "broker", "connected")

    def __init__(self, channel):
        self.channel = weakref.ref(channel)
        self.broker = channel.broker
        self.connected = False


# -- the direct path (docs/direct_path.rst): a thread's sockets to the workers
# leased to its process (leases.py keeps the leases), and the process's control
# socket to the broker, in the connection watcher's thread.

class _DirectSockets:
    """One thread's DEALERs to the workers leased to its process, made on
    first use and closed by the thread once their lease is gone (or when the
    thread ends, or by Client.close); :meth:`run` sends a job on one."""

    __slots__ = ("socks", "gen", "ids", "context", "watcher", "__weakref__")

    def __init__(self, direct, context, watcher):
        self.socks = {}  # Lease -> socket
        self.gen = direct.gone_gen
        self.ids = 0  # the last job id used on these sockets
        self.context = context
        self.watcher = watcher  # the client's _ConnectionWatcher: reads their monitors
        with direct.lock:
            direct.holders.add(self)
        weakref.finalize(self, _close_sockets, self.socks)

    def sweep(self, gen):
        self.gen = gen
        for lease in [lease for lease in self.socks if lease.gone]:
            _close_socket(self.socks.pop(lease))

    def open(self, lease):
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 0
        # If the connection drops, the worker is gone: the watcher revokes
        # the lease (Leases.lost), and a job in flight on it fails with
        # WorkerLostError within a wait slice.
        self.watcher.watch(lease, _monitor(self.context, sock, _LEASE_MONITORED))
        sock.connect(lease.endpoint)
        self.socks[lease] = sock
        return sock

    def close(self):
        _close_sockets(self.socks)

    def run(self, direct, lease, req, deadline_ns, timeout):
        """Send one job on ``lease`` (taken from ``direct``) from this thread's
        socket to its worker, wait for the reply and release the lease; None
        if the worker did not run it (NOT_RUN, or the job could not be queued)."""
        refused = None
        took = -1  # ns from send to reply, for the service's job time
        try:
            if self.gen != direct.gone_gen:
                self.sweep(direct.gone_gen)
            sock = self.socks.get(lease)
            if sock is None:
                sock = self.open(lease)
            self.ids += 1
            job_id = _hex(self.ids)
            req.job_id = job_id
            headers = req.headers
            asked = headers and WORKER_HEADER in headers
            if asked:  # a question for a broker: the worker gets the job's own headers
                req.headers = {k: v for k, v in headers.items() if k != WORKER_HEADER}
                frames = direct_request(lease.epoch, deadline_ns, req)
                req.headers = headers
            else:
                frames = direct_request(lease.epoch, deadline_ns, req)
            try:
                send(sock, frames, NOBLOCK)
            except zmq.Again:
                return None  # never queued: it may go through the broker
            sent = now = _now_ns()
            while True:
                wait = (deadline_ns - now + 999999) // 1000000  # ms left, rounded up
                frames = recv_within(sock, WAIT_SLICE_MS if wait > WAIT_SLICE_MS else
                                     wait if wait > 0 else 0)
                now = _now_ns()
                if frames is None:
                    if lease.revoked == REVOKE_LOST:
                        raise exc.WorkerLostError(
                            f"job {job_id.decode()} on {req.service.decode()!r}: the worker "
                            f"leased at {lease.endpoint} was lost while the job was in flight")
                    if now >= deadline_ns:
                        raise exc.TimeoutError(
                            f"job {job_id.decode()} on {req.service.decode()!r} got no result "
                            f"within {timeout}s from the worker leased at {lease.endpoint}; "
                            "is it overloaded or hung?")
                    continue
                try:
                    reply = parse_direct_reply(frames)
                except ProtocolError as error:
                    log.warning("dropped malformed direct reply from %s: %s", lease.endpoint,
                                error)
                    continue
                if reply.job_id == job_id:
                    took = now - sent
                    break
                log.debug("dropped late direct reply for job %r", reply.job_id)
            if not reply.ok and reply.code == ERR_NOT_RUN:
                refused = reply.message.encode()
                log.debug("job %s on %r not run by its leased worker (%s): relayed",
                          job_id.decode(), req.service.decode(), reply.message)
                return None
            if asked:  # as the broker would: the worker's pid@host, from the GRANT
                reply.worker = lease.about
                note_reply(reply)
            return reply
        finally:
            direct.release(lease, refused, took)


def _close_sockets(socks):
    for sock in list(socks.values()):
        _close_socket(sock)


class _Control:
    """The process's control DEALER to the broker's frontend, in the watcher's
    thread: says the wishes, heartbeats and RETURNs that :class:`Leases`
    has due, applies GRANT and REVOKE, and drops every lease when its
    connection to the broker drops."""

    def __init__(self, context, frontend, direct, poller):
        self.direct = direct
        self.wake = None
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        self.monitor = _monitor(context, sock, zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(frontend)
        self.socket = sock
        self.fd = direct.wake_fd
        poller.register(sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        poller.register(self.fd, zmq.POLLIN)

    def timeout(self):
        """The poll's timeout in ms (None: until something happens)."""
        if self.wake is None:
            return None
        return max(0, int((self.wake - monotonic()) * 1000) + 1)

    def handle(self, sock) -> bool:
        """Handle ``sock`` if it is ours; whether it was."""
        if sock is self.socket:
            while True:
                frames = recv_within(self.socket, 0)
                if frames is None:
                    break
                try:
                    notice = parse_lease_notice(frames)
                except ProtocolError as error:
                    log.warning("dropped a malformed lease notice from the broker: %s", error)
                    continue
                try:
                    self.direct.notice(notice)
                except Exception:  # noqa: BLE001 -- this thread also watches the brokers
                    log.exception("could not apply %r", notice)
        elif sock is self.monitor:
            event = zmq.utils.monitor.recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self.direct.drop_all()
        elif sock == self.fd:
            try:
                os.eventfd_read(self.fd)
            except BlockingIOError:
                pass
        else:
            return False
        return True

    def tick(self):
        try:
            out, self.wake = self.direct.due(monotonic())
        except Exception:  # noqa: BLE001 -- this thread also watches the brokers
            log.exception("lease bookkeeping failed")
            self.wake = monotonic() + LEASE_BEAT
            return
        for frames in out:
            try:
                send(self.socket, frames, NOBLOCK)
            except zmq.Again:
                log.debug("control socket full: dropped %r", frames[2])

    def close(self):
        self.monitor.close(0)
        self.socket.close(0)


class Client:
    """Runs jobs on a powerhose cluster; thread-safe, fork-safe.

    ``execute`` blocks for one result; ``submit`` returns a Future;
    ``map`` runs many jobs at once and returns their results in order.
    A broker that dies with jobs in flight, or none listening, fails them
    with ``BrokerLostError`` within about a second (see the module's
    docstring and PROTOCOL.rst, "When the broker goes away").

    ``frontend`` may list several brokers (a list, or endpoints separated
    by spaces): jobs are spread over those that answer.  ``retries`` (0 by
    default) sends a job lost with its broker (``BrokerLostError``) again,
    to another broker if one answers, within the job's timeout: **for
    idempotent jobs only**, since a lost job may have run.  Other errors,
    ``WorkerLostError`` included, are never retried: the broker is fine,
    and a job that kills its worker would kill the next one.

    On one host (one ipc frontend, CURVE off), jobs go straight to workers
    the broker leases to this process (PROTOCOL.rst, "The direct path");
    ``direct=False`` sends every job through the broker.
    """

    def __init__(self, frontend=None, timeout=None, service=None, max_job_size=None,
                 settings=None, curve_secret=None, curve_broker=None, retries=None,
                 direct=None):
        self.settings = client_settings(settings, frontend, timeout, service, max_job_size,
                                        curve_secret, curve_broker, retries, direct)
        # CURVE: this client's key pair and the broker's public key, or None.
        self._curve = curve.client_keys(self.settings)
        self._frontends = None  # resolved on first use: the default may be needed
        self.timeout = self.settings.timeout
        self.service = self.settings.service
        self.retries = self.settings.retries
        self._several = len(self.settings.frontends) > 1
        self._turn = itertools.count()  # round robin over the brokers that answer
        self._closed = False
        self._lock = threading.Lock()
        self._executor = None
        self._reset()

    @property
    def frontends(self) -> tuple:
        """The brokers' endpoints; the private default is looked up on first use."""
        if self._frontends is None:
            self._frontends = endpoints.resolve_all(self.settings.frontend, "frontend")
        return self._frontends

    @property
    def frontend(self) -> str:
        """The broker's endpoint (several: separated by spaces, as in an ini file)."""
        return " ".join(self.frontends)

    def _reset(self):
        self._generation = _fork_generation
        # Under gevent (monkey-patched), every wait must yield to its hub, or
        # one waiting greenlet would stall them all: pyzmq's green sockets
        # poll cooperatively, and replies are then read without blocking.
        self._green = _gevent_patched()
        if self._green:
            import zmq.green as green_zmq
            self._context = green_zmq.Context()
        else:
            self._context = zmq.Context()
        self._local = threading.local()
        self._channels = weakref.WeakSet()
        self._brokers = None  # one _Broker per frontend, made with the first channel
        self._executor = None
        self._watcher = None  # started with the first channel
        direct = getattr(self, "_direct", None)
        if direct is not None and direct.wake_fd >= 0:
            os.close(direct.wake_fd)  # a forked child's copy: the parent's leases are not ours
            direct.wake_fd = -1
        self._direct = None  # this process's leases (a Leases), made with the watcher

    def _channel(self, index=0) -> _Channel:
        """This thread's socket to the ``index``-th broker, made on first use."""
        if self._generation != _fork_generation:
            with self._lock:
                if self._generation != _fork_generation:
                    self._reset()  # a forked child: the parent's sockets are not ours
        try:
            channel = self._local.channels[index]
        except AttributeError:
            self._local.channels = [None] * len(self.frontends)
            channel = None
        if channel is not None:
            return channel
        if self._closed:
            raise exc.PowerhoseError("the client is closed")
        with self._lock:
            if self._watcher is None:
                if self._may_lease():
                    self._direct = Leases()
                self._watcher = _ConnectionWatcher(self._context, self._green, self._direct,
                                                   self.frontends[0])
                weakref.finalize(self, self._watcher.stop)  # a client never closed
                self._brokers = [_Broker(endpoint, i)
                                 for i, endpoint in enumerate(self.frontends)]
        channel = _Channel(self._context, self._brokers[index], self._watcher, self._curve)
        self._local.channels[index] = channel
        with self._lock:
            self._channels.add(channel)
        return channel

    def _may_lease(self) -> bool:
        """Whether this client may take leases (docs/direct_path.rst): one ipc
        frontend, CURVE off, ``settings.direct``, not under gevent."""
        return (bool(self.settings.direct) and len(self.frontends) == 1
                and self.frontends[0].startswith("ipc://") and self._curve is None
                and not self._green)

    def _pick(self, avoid=()) -> _Channel:
        """This thread's socket to the broker for the next job.

        In turn among the brokers some socket is connected to, leaving out
        those in ``avoid`` (they lost this job) while another is left; if
        none is connected (a new client, or all gone), waits up to
        CONNECT_TIMEOUT for one, then tries one not known lost, or any.
        """
        if not self._several:
            return self._channel()
        channels = [self._channel(i) for i in range(len(self.frontends))]
        brokers = self._brokers
        if not any(broker.up for broker in brokers):
            changed = self._watcher.changed
            with changed:
                changed.wait_for(lambda: any(broker.up for broker in brokers),
                                 CONNECT_TIMEOUT)
        channel = choose(channels, avoid, next(self._turn))
        if channel.broker.up and not channel.connected:
            # Its broker answers our other sockets: this one connects within
            # libzmq's reconnect interval.  Its CONNECT_TIMEOUT starts now,
            # not when it last lost the broker.
            channel.since = max(channel.since, monotonic())
        return channel

    def _retire(self, channel):
        """Replace a thread's socket after a timeout.

        The timed-out job may still sit in the socket's queue (no broker
        was up); closing the socket drops it, so a broker that comes back
        never runs jobs whose callers gave up, and their late replies have
        nowhere to go.
        """
        mine = getattr(self._local, "channels", None)
        index = channel.broker.index
        if mine is not None and mine[index] is channel:
            mine[index] = None
        with self._lock:
            self._channels.discard(channel)
        channel.close()

    # -- jobs -----------------------------------------------------------------

    def _request(self, data, headers, service, timeout):
        return _job_request(self.settings, service or self.service, data, headers, timeout)

    def execute(self, data, timeout=None, headers=None, service=None,
                retries=None) -> bytes:
        """Run one job and return its result (bytes).

        Raises NoWorkerError, TimeoutError, ExecutionError, WorkerLostError,
        BrokerLostError, OverloadedError or JobTooLargeError from
        ``pyramid_powerhose.exc``, and SettingsError for a service name the
        protocol cannot carry.

        ``retries`` (default: the client's, 0 unless set) is how many times
        a job lost with its broker (BrokerLostError) is sent again, to
        another broker if one answers, all within ``timeout``: only for
        jobs that may safely run twice.
        """
        req, timeout = _job_request(self.settings, service or self.service, data, headers,
                                    timeout)
        # Leases (a Leases) only with one frontend; a thread's channel is made
        # with its _DirectSockets, so a direct job needs no _channel() call.
        direct = self._direct
        if direct is not None and self._generation == _fork_generation:
            return _execute_direct(self, direct, req, timeout, retries)
        if retries is None:
            retries = self.retries
        if not self._several:
            channel = self._channel()  # the first job, or the first after a fork: set up
            direct = self._direct
            if direct is not None:
                return _execute_direct(self, direct, req, timeout, retries)
            if not retries:
                req.job_id = channel.next_id()
                return _result(_run(self, channel, req, timeout))
        return self._relay(req, timeout, retries)

    def _relay(self, req, timeout, retries):
        """Send a job through the broker, with ``retries`` (see :meth:`execute`;
        None: the client's)."""
        if retries is None:
            retries = self.retries
        if not self._several and not retries:
            channel = self._channel()
            req.job_id = channel.next_id()
            return _result(_run(self, channel, req, timeout))
        deadline = monotonic() + timeout
        lost = []  # the brokers this job was lost with
        while True:
            channel = self._pick(lost)
            req.job_id = channel.next_id()
            try:
                return _result(_run(self, channel, req, timeout))
            except exc.BrokerLostError as error:
                timeout = deadline - monotonic()
                if retries <= 0 or timeout <= 0:
                    raise
                retries -= 1
                lost.append(channel.broker)
                req.ttl_ms = max(1, int(timeout * 1000))
                log.info("job %s on %r: %s; retrying (%d retries left)", req.job_id.decode(),
                         req.service.decode(), error, retries)

    def submit(self, data, timeout=None, headers=None, service=None,
               retries=None) -> concurrent.futures.Future:
        """Run one job in the background (see :meth:`execute`); returns a
        ``concurrent.futures.Future``."""
        executor = self._executor
        if executor is None or self._generation != _fork_generation:
            self._channel()  # resets after a fork
            with self._lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        max_workers=32, thread_name_prefix="powerhose-submit")
                executor = self._executor
        # The caller's context (its trace, tracing.py) goes with the job to the thread.
        return executor.submit(contextvars.copy_context().run, self.execute, data, timeout,
                               headers, service, retries)

    def map(self, iterable, timeout=None, headers=None, service=None) -> list:
        """Run many jobs at once and return their results in order.

        Up to 128 jobs are in flight at a time, each with its own timeout
        from when it is sent.  If any job fails, the error of the first
        failed job (in input order) is raised once all have settled.
        With several brokers, one call's jobs all go through one of them,
        chosen as for :meth:`execute`; they are not retried.
        """
        channel = self._pick()
        losses = channel.losses
        pending = {}  # job id -> (index, request, deadline, timeout)
        results = []
        jobs = iter(enumerate(iterable))
        exhausted = False
        lost = None  # the BrokerLostError that ended the run, if any
        while lost is None:
            while not exhausted and len(pending) < MAP_WINDOW:
                item = next(jobs, None)
                if item is None:
                    exhausted = True
                    break
                index, data = item
                req, job_timeout = self._request(data, headers, service, timeout)
                req.job_id = channel.next_id()
                deadline = monotonic() + job_timeout
                results.append(None)
                try:
                    _send(self, channel, req, deadline, job_timeout, losses)
                except exc.TimeoutError as error:
                    results[index] = error
                    continue
                except exc.BrokerLostError as error:
                    results[index] = lost = error
                    break
                pending[req.job_id] = (index, req, deadline, job_timeout)
            if not pending or lost is not None:
                break
            first = min(pending.values(), key=lambda p: p[2])
            try:
                reply = _receive(self, channel, pending, first[2], first[1], first[3], losses)
            except exc.TimeoutError as error:
                del pending[first[1].job_id]
                results[first[0]] = error
                continue
            except exc.BrokerLostError as error:
                lost = error
                break
            index = pending.pop(reply.job_id)[0]
            results[index] = reply
        for index, *_ in pending.values():
            results[index] = lost  # the jobs in flight when the broker went
        if lost is not None:
            channel.broker.lost = True
        if lost is not None or any(isinstance(outcome, exc.TimeoutError) for outcome in results):
            self._retire(channel)
        values = []
        for outcome in results:
            if isinstance(outcome, Exception):
                raise outcome
            values.append(_result(outcome))
        return values

    # -- broker queries -----------------------------------------------------------
    #
    # 8/MMI is per broker.  With several, ping() and stats() ask them in
    # turn (those connected first) and give the first answer, in the same
    # form as with one; broker_stats() gives each one's.

    def _mmi(self, service, body=b"", timeout=1.0, channel=None):
        req = Request(service, b"", body, max(1, int(timeout * 1000)))
        channel = channel or self._channel()
        req.job_id = channel.next_id()
        return _result(_run(self, channel, req, timeout))

    def _first_answer(self, service, timeout, body=b""):
        """The first broker's answer to an MMI query; the last error if none answers."""
        if not self._several:
            return self._mmi(service, body, timeout)
        channels = [self._channel(i) for i in range(len(self.frontends))]
        channels.sort(key=lambda channel: not channel.broker.up)
        error = None
        for channel in channels:
            try:
                return self._mmi(service, body, timeout, channel)
            except (exc.TimeoutError, exc.BrokerLostError) as lost:
                error = lost
        raise error

    def ping(self, timeout=1.0):
        """The pid of the (first) broker that answers within ``timeout``, or None."""
        try:
            return int(self._first_answer(MMI_PING, timeout))
        except (exc.TimeoutError, exc.BrokerLostError):
            return None

    def has_service(self, service=None, timeout=1.0) -> bool:
        """Whether a broker has at least one worker for ``service`` (8/MMI).

        With several brokers, whether one of those that answer has.
        """
        name = (service or self.service).encode()
        if not self._several:
            return self._mmi(MMI_SERVICE, name, timeout) == MMI_FOUND
        answered, error = False, None
        for i in range(len(self.frontends)):
            try:
                found = self._mmi(MMI_SERVICE, name, timeout, self._channel(i))
            except (exc.TimeoutError, exc.BrokerLostError) as lost:
                error = lost
                continue
            if found == MMI_FOUND:
                return True
            answered = True
        if not answered:
            raise error
        return False

    def stats(self, timeout=1.0) -> dict:
        """The broker's statistics: workers idle and busy, queues, jobs done.

        With several brokers, the first that answers (its ``frontend`` says
        which); :meth:`broker_stats` gives every broker's.
        """
        return json.loads(self._first_answer(MMI_STATS, timeout))

    def broker_stats(self, timeout=1.0) -> dict:
        """Each broker's statistics, by frontend; None for one that does not answer."""
        each = {}
        for i, frontend in enumerate(self.frontends):
            try:
                each[frontend] = json.loads(self._mmi(MMI_STATS, b"", timeout,
                                                      self._channel(i)))
            except (exc.TimeoutError, exc.BrokerLostError):
                each[frontend] = None
        return each

    # -- closing ----------------------------------------------------------------------

    def close(self):
        """Close every socket; call when no job is in flight."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._generation != _fork_generation:
            return  # the parent owns those sockets
        with self._lock:
            channels = list(self._channels)
            watcher, self._watcher = self._watcher, None
            direct, self._direct = self._direct, None
        for channel in channels:
            channel.close()
        if watcher is not None:
            watcher.stop()
        if direct is not None:
            direct.close()  # after the watcher, which polls its eventfd
        self._local = threading.local()
        self._context.destroy(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _run(client, channel, req, timeout):
    """``client``'s request on ``channel``, and its reply.  This and the three
    below are functions rather than Client's methods: compiled, C calls
    (client.pxd)."""
    deadline = monotonic() + timeout
    losses = channel.losses
    try:
        _send(client, channel, req, deadline, timeout, losses)
        return _receive(client, channel, {req.job_id}, deadline, req, timeout, losses)
    except exc.BrokerLostError:
        channel.broker.lost = True  # not chosen again until a socket reconnects
        client._retire(channel)
        raise
    except exc.TimeoutError:
        client._retire(channel)
        raise


def _send(client, channel, req, deadline, timeout, losses):
    sock = channel.socket
    frames = client_request(req)
    try:
        send(sock, frames, NOBLOCK)
        return
    except zmq.Again:
        pass
    # The socket's queue is full (a broker that does not read): wait.
    while True:
        remaining = deadline - monotonic()
        if remaining <= 0:
            raise exc.TimeoutError(
                f"could not queue the job for the broker at {channel.frontend} "
                f"within {timeout}s; is powerhose-broker running?")
        if not sock.poll(min(remaining, WAIT_SLICE) * 1000, zmq.POLLOUT):
            _check_broker(channel, req, losses)
            continue
        try:
            send(sock, frames, NOBLOCK)
            return
        except zmq.Again:
            continue


def _check_broker(channel, req, losses):
    """Raise BrokerLostError if ``channel`` lost its broker since ``losses``, or never had one."""
    if channel.losses != losses:
        raise exc.BrokerLostError(
            f"job {req.job_id.decode()} on {req.service.decode()!r}: the connection "
            f"to the broker at {channel.frontend} dropped while the job was in flight "
            "(the broker died or restarted); the job will not run later, retry it")
    if not channel.connected and monotonic() - channel.since > CONNECT_TIMEOUT:
        raise exc.BrokerLostError(
            f"job {req.job_id.decode()} on {req.service.decode()!r}: no broker "
            f"accepted a connection at {channel.frontend} within {CONNECT_TIMEOUT}s; "
            "is powerhose-broker running?")


def _receive(client, channel, wanted, deadline, req, timeout, losses):
    """The next reply for one of ``wanted`` job ids; late ones are dropped.

    Waits in slices of WAIT_SLICE; after a slice with no reply, raises
    BrokerLostError if the connection dropped (see _check_broker).
    """
    sock = channel.socket
    green = client._green
    while True:
        remaining = deadline - monotonic()
        frames = _within(green, sock, int(min(remaining, WAIT_SLICE) * 1000))
        if frames is None:
            if remaining <= WAIT_SLICE:
                raise exc.TimeoutError(
                    f"job {req.job_id.decode()} on {req.service.decode()!r} got no "
                    f"result within {timeout}s from the broker at {channel.frontend}; "
                    "is powerhose-broker running, and are its workers overloaded "
                    "or hung?")
            try:
                _check_broker(channel, req, losses)
            except exc.BrokerLostError:
                # A reply that came in just before the connection dropped
                # is still ours to read.
                frames = _within(green, sock, 0)
                if frames is None:
                    raise
            else:
                continue
        try:
            reply = parse_client_reply(frames)
        except ProtocolError as error:
            log.warning("dropped malformed reply from %s: %s", channel.frontend, error)
            continue
        if reply.job_id in wanted:
            if reply.worker is not None:  # asked for (collect_replies())
                note_reply(reply)
            return reply
        log.debug("dropped late reply for job %r", reply.job_id)


def _execute_direct(client, direct, req, timeout, retries):
    """``client``'s job on a lease of this process if it holds one with room
    (or gets room within the timeout); else, or if the worker did not run it
    (NOT_RUN), through the broker.  A function rather than a method:
    compiled, a C call (client.pxd), as are take, run and release from here."""
    deadline_ns = _now_ns() + int(timeout * 1e9)
    service = req.service
    lease = direct.take(service, deadline_ns)
    if lease is not None and (len(req.data) > lease.max_job_size or (
            req.headers and job_size(req) > lease.max_job_size)):
        # Larger than the broker allows: it answers JobTooLargeError.
        direct.release(lease)
        return client._relay(req, timeout, retries)
    if lease is None:  # no lease: relayed, and counted in our wish
        try:
            left = (deadline_ns - _now_ns()) / 1e9
            if left < timeout - 0.01:  # it waited for room on a lease, then lost it
                if left <= 0:
                    raise exc.TimeoutError(
                        f"job on {service.decode()!r} found no room on this process's "
                        f"leased workers within its timeout ({timeout}s)")
                req.ttl_ms = max(1, int(left * 1000))
                timeout = left
            return client._relay(req, timeout, retries)
        finally:
            direct.relayed(service)
    try:
        mine = client._local.direct
    except AttributeError:  # the thread's first direct job: its channel too, as relayed
        client._channel()
        mine = client._local.direct = _DirectSockets(direct, client._context,
                                                     client._watcher)
    reply = mine.run(direct, lease, req, deadline_ns, timeout)
    if reply is not None:
        if reply.ok:
            return reply.data
        raise exc.from_reply(reply)
    # NOT_RUN: the worker never started it; relayed, within what is left.
    left = (deadline_ns - _now_ns()) / 1e9
    if left <= 0:
        raise exc.TimeoutError(
            f"job on {service.decode()!r} was refused by its leased worker (not run) "
            f"and no time was left of its {timeout}s to send it through the broker")
    req.ttl_ms = max(1, int(left * 1000))
    return client._relay(req, left, retries)


def client_settings(settings, frontend, timeout, service, max_job_size, curve_secret,
                    curve_broker, retries, direct=None) -> Settings:
    """A client's settings: ``settings`` (or the defaults), with the arguments
    given (None, or empty, keeps the setting's value); for Client and AsyncClient."""
    base = settings or Settings()
    return base.replace(
        frontend=frontend or base.frontend,
        timeout=base.timeout if timeout is None else timeout,
        service=service or base.service,
        max_job_size=max_job_size or base.max_job_size,
        curve_secret=curve_secret or base.curve_secret,
        curve_broker=curve_broker or base.curve_broker,
        retries=base.retries if retries is None else retries,
        direct=base.direct if direct is None else direct,
    )


# -- which worker ran a job -------------------------------------------------------
#
# Asked for by the debug toolbar's panel (toolbar.py), through every layer
# between it and the client (request.powerhose, the metrics wrapper,
# submit's thread) without changing what execute, map and submit return.

_collected = contextvars.ContextVar("powerhose_collected_replies", default=None)
_collected_get = _collected.get  # bound once: asked for every job


@contextlib.contextmanager
def collect_replies():
    """Note the replies of the jobs run in this context, with who ran them.

    Within it, each job that :meth:`Client.execute`, :meth:`Client.map` or
    :meth:`Client.submit` (or :class:`~pyramid_powerhose.aio.AsyncClient`)
    sends asks the broker which worker runs it (the reserved header
    ``powerhose.worker``, PROTOCOL.rst), and its reply, a
    :class:`~pyramid_powerhose.protocol.Reply` whose ``worker`` is that
    worker's ``pid@host`` ("" when no worker ran the job, or the worker did
    not say who it is), is appended to the list this yields, in the order
    the replies arrive: results and errors alike, not a job lost with its
    broker or timed out.  A job submitted within it is noted when it
    completes, even after the block is left.  Blocks nest: the innermost
    one gets the replies.  A broker older than this feature leaves the list
    empty (and passes the header on to the job).
    """
    replies = []
    token = _collected.set(replies)
    try:
        yield replies
    finally:
        _collected.reset(token)


def ask_worker(headers: dict) -> dict:
    """``headers``, plus the reserved header that asks the broker who runs the
    job when called within :func:`collect_replies`."""
    if _collected.get() is None:
        return headers
    return {**headers, WORKER_HEADER: "1"}


def note_reply(reply):
    """Append a reply that says who ran its job to the current
    :func:`collect_replies` list, if any."""
    replies = _collected.get()
    if replies is not None:
        replies.append(reply)


def check_job(settings, data, headers, timeout):
    """A job's data, headers and timeout, checked before anything is sent.

    ``data`` may be a Job, whose headers ``headers`` extends.
    """
    if type(data) is not bytes:  # most jobs are bytes: one C comparison
        if isinstance(data, Job):
            headers = {**data.headers, **(headers or {})}
            data = data.data
        if not isinstance(data, bytes):  # to_bytes returns bytes as they are
            data = to_bytes(data)
    if timeout is None:
        timeout = settings.timeout
    if not timeout > 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
    headers = dict(headers) if headers else {}
    # As the broker counts it; headers map str to str, or TypeError now.
    size = job_size(Request(b"", b"", data, 0, headers)) if headers else len(data)
    if size > settings.max_job_size:
        raise exc.JobTooLargeError(
            f"job of {size} bytes (data and headers) is larger than the max job size "
            f"({settings.max_job_size} bytes)")
    return data, headers, timeout


def _job_request(settings, service, data, headers, timeout):
    """A job's Request, checked (:func:`check_job`, :func:`check_service`),
    with the caller's trace and the collect_replies() question in its
    headers; and its timeout."""
    data, headers, timeout = check_job(settings, data, headers, timeout)
    headers = inject(headers)  # the caller's trace, if any, goes with the job
    if _collected_get() is not None:  # inside collect_replies(): who runs it?
        headers = ask_worker(headers)
    name = _service_names.get(service)
    if name is None:
        name = check_service(service)
        if len(_service_names) < 64:
            _service_names[service] = name
    ttl_ms = int(timeout * 1000)
    return new_request(name, b"", data, ttl_ms if ttl_ms > 1 else 1, headers), timeout


_service_names = {}  # service -> its checked name, for the first 64 (an app has a few)


def check_service(service: str) -> bytes:
    """A job's service name as sent, or SettingsError for one no broker would take."""
    name = service.encode()
    if not 0 < len(name) <= MAX_SERVICE_LENGTH or name.startswith(MMI_PREFIX):
        raise exc.SettingsError(
            f"service {service[:40]!r}{'...' if len(service) > 40 else ''} "
            f"({len(name)} bytes) cannot be sent: service names are 1 to "
            f"{MAX_SERVICE_LENGTH} bytes and do not start with 'mmi.'")
    return name


def choose(items, avoid, turn, broker_of=operator.attrgetter("broker")):
    """Where a job goes: the ``turn``-th, in a round, of the best ``items``.

    ``broker_of(item)`` is the item's broker (a channel's by default; the
    asyncio client passes its brokers themselves).  Best are those whose
    broker is connected (``up``), then those not known ``lost``, then any;
    those whose broker is in ``avoid`` (it lost this job already) only when
    no other is left.  Both clients choose by this one rule.
    """
    fresh = [i for i in items if broker_of(i) not in avoid] or items
    best = ([i for i in fresh if broker_of(i).up]
            or [i for i in fresh if not broker_of(i).lost] or fresh)
    return best[turn % len(best)]


def _result(reply):
    if reply.ok:
        return reply.data
    raise exc.from_reply(reply)
