"""The worker: registers a service with the broker and runs jobs on it.

The main thread owns the socket and runs each job itself, so a job costs no
thread hand-off.  While a job runs, the main thread lets go of the socket
and a watchdog thread takes it over to keep heartbeating (so the broker
can tell a long job from a dead worker) and to enforce ``--timeout``.

That thread needs the GIL, which a target stuck in C code (a regular
expression that backtracks for ever) never lets go.  So the watchdog also
keeps re-arming ``faulthandler``'s timer, a thread written in C that needs
no GIL: if the watchdog has not re-armed it for ``--timeout`` plus a
margin, it writes every thread's stack to the log and ends the process,
and the broker fails the job with WorkerLostError; the supervisor
restarts the worker.

A worker may serve several brokers (several ``--backend``), one DEALER
socket each, with heartbeats and reconnection per broker; it still runs one
job at a time, in the order the jobs were read.  While it runs a job from
one broker it sends PAUSE to the others, so that they count it busy and
send it nothing, and RESUME once that job is done (PROTOCOL.rst, "Several
brokers").  With one broker, none of that is sent.

Life cycle, in one place each: ``connect`` (READY), ``handle_request``
(job started, job finished), ``_lost`` (broker lost: reconnect later),
``retire`` (max age, max memory or SIGTERM: DISCONNECT after the current
job, then exit).

The direct path (docs/direct_path.rst): a worker with one broker, on ipc,
without CURVE, also binds a ROUTER in a private ``direct`` directory beside
the broker's backend socket and announces it (DIRECT, after READY).  The
broker may then lease it to one client process (LEASE with an epoch), whose
threads send their jobs straight to that socket.  The worker is the arbiter:
it runs a direct job only under its current epoch, and answers NOT_RUN to
any other, and to every direct job once it is leaving; it runs them as it
runs relayed ones (``handle_direct``).  Whether it runs one now, the
broker reads in its busy word (``busy_word.py``), a file it writes at the
start and the end of each direct job.  It tells the broker what it ran
(counts by outcome and run-time bucket) once it has seen no direct job for
``FREE_AFTER_MS`` (FREE), at most once a heartbeat while it stays busy
(REPORT; without a busy word, also when it starts one after being idle),
and before it answers the end of its lease.  A leased worker that
leaves tells the broker first (LEASE 0) and waits for the end of its lease
(``_leave_lease``) before it closes the direct socket and sends DISCONNECT.
"""

from __future__ import annotations

import collections
import faulthandler
import importlib
import logging
import os
import random
import socket
import resource
import signal
import sys
import threading
import time
import traceback
from time import monotonic

import zmq

from . import busy_word, curve, endpoints
from .job import new_job
from .exc import ProtocolError, TargetError, UnsafeDirectoryError
# Names, not module.NAME: compiled (setup.py), a module global is a cached
# look-up, a module's attribute a dictionary look-up every time.
from .multipart import NOBLOCK, readable, recv, recv_within, send
from .readiness import WOKEN, ParentWatch, Readiness, now as _now
from .protocol import (
    DISCONNECT, ERR_EXECUTION, ERR_TIMEOUT, FREE, HEARTBEAT, LEASE, MAX_ABOUT_LENGTH,
    MAX_ENDPOINT_LENGTH, NOT_RUN_LEASE, NOT_RUN_STOPPING, PAUSE, REPORT, REQUEST, RESUME,
    DirectCounts, Reply, direct_not_run, direct_reply, ok_reply, parse_broker_command,
    parse_direct_request, worker_command, worker_counts, worker_direct, worker_info,
    worker_lease, worker_ready, worker_reply,
)
from .busy_word import BUSY
from .settings import read_params_file
from .tracing import job_span, traced

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NO_BROKER = 2
EXIT_JOB_TIMEOUT = 3

# Seconds past --timeout before faulthandler ends a worker whose watchdog
# thread cannot run: time for that thread to end it first, politely.
FAULT_MARGIN = 2.0

# A leased worker that has run direct jobs and then sees none for this many
# milliseconds tells the broker FREE.  Its wait between two direct jobs is
# a receive with a timeout of one more millisecond (libzmq times RCVTIMEO
# with a coarse clock, and a 1 ms RCVTIMEO may end at once): a timeout
# shorter than the kernel's tick (4 ms at the common HZ=250) is the
# earliest timer of a busy CPU, and arming and cancelling it reprograms
# the CPU's timer at every job, which on a VM costs the worker about 8 us
# a job (docs/performance.rst, "Where the rest goes").  Longer, the tick
# comes first.
FREE_AFTER_MS = 4
# While direct jobs flow, the broker's socket is asked this often (seconds).
BROKER_CHECK = 0.001
MAX_IPC_PATH = 107  # bytes: sun_path

# Cython-compiled, this module's file is the extension, not the source.
COMPILED = not __file__.endswith(".py")

_params: dict = {}


def get_params() -> dict:
    """The params this worker was started with: its ``--params-file``, then ``--params``."""
    return dict(_params)


def load_params(settings) -> dict:
    """A worker's params: those in ``settings.params_file``, overridden by ``settings.params``."""
    params = read_params_file(settings.params_file) if settings.params_file else {}
    params.update(settings.params)
    return params


def resolve_target(target: str):
    """``pkg.module:func`` or ``pkg.module.func`` -> the callable.

    The current directory is importable, as with ``python -m``, so the
    seed's ``powerhose-worker echo_worker.echo`` works next to echo_worker.py.
    """
    if ":" in target:
        module_name, _, attr = target.partition(":")
    else:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise TargetError(f"target must look like pkg.module:func or pkg.module.func, got {target!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise TargetError(f"cannot import {module_name!r} for target {target!r}: {exc}") from exc
    for name in attr.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise TargetError(f"{module_name!r} has no attribute {attr!r} (target {target!r})") from None
    if not callable(obj):
        raise TargetError(f"target {target!r} is not callable")
    return obj


class _Broker:
    """One broker this worker registers with: its socket and its timers.

    ``lost_since`` is when it stopped answering (None while it answers);
    while ``socket`` is None the worker waits until ``reconnect_at``.
    ``paused``: we sent it PAUSE and no RESUME since.
    """

    __slots__ = ("backend", "socket", "expiry", "next_heartbeat", "paused", "lost_since",
                 "backoff", "reconnect_at")

    def __init__(self, backend):
        self.backend = backend
        self.socket = None
        self.expiry = self.next_heartbeat = self.reconnect_at = 0.0
        self.paused = False
        self.lost_since = None
        self.backoff = 0.1


class Worker:
    def __init__(self, target, settings, context=None):
        self.target = target
        self.settings = settings
        self.service = settings.service.encode()
        self.context = context or zmq.Context.instance()
        self.curve = curve.client_keys(settings)  # None: no CURVE
        self.heartbeat = settings.heartbeat
        self.liveness = settings.heartbeat * settings.liveness
        self.brokers = []  # one _Broker per backend, made when run() starts
        self._inbox = collections.deque()  # (broker, socket, frames) read, not yet handled
        self._poller = None  # zmq.Poller over the brokers' sockets (several)
        self._readiness = None  # over the direct socket and the broker's (direct)
        self.stop_requested = False
        self.jobs_done = 0
        self._lock = threading.Lock()  # held by whoever uses the socket
        # Bound once: looked up per job, each costs a method look-up.
        self._release, self._acquire = self._lock.release, self._lock.acquire
        self._busy_since = None
        self._current = None
        self._current_broker = None
        self._client_address = b""
        self.backlog_since = None  # when the requests now in our socket may have arrived
        self._watchdog_stop = threading.Event()
        self._fault_file = None
        age = settings.max_age
        if age > 0:
            age += random.uniform(0, settings.max_age_delta)
        self.retire_at = monotonic() + age if age > 0 else None
        self.over_memory = False  # past --max-memory: retire after the current job
        self.max_memory = settings.max_memory  # MiB; 0: no limit
        self.parent = ParentWatch() if settings.exit_with_parent else None
        # The direct path: our ROUTER (None: not announced), its endpoint and
        # socket file; the lease we serve (0: none); the direct jobs ended
        # since the last FREE or REPORT (``_counted``: there are some), and
        # whether the broker is owed a FREE (direct jobs since the last one).
        self.direct = None
        self.direct_endpoint = b""
        self._direct_path = None
        # Our busy word (busy_word.py), beside the direct socket, and its
        # 64-bit view, written at the start and the end of each direct job.
        self._busy_word = None
        self._word = None
        self._direct_client = None  # the address of the direct job running, if any
        self.lease_epoch = 0
        self.counts = DirectCounts()
        self._counted = False
        # The broker counts us idle (a fresh lease, or our FREE): the next
        # direct job we start is told to it (REPORT), so that it revokes an
        # idle lease for a waiting job rather than ours; unless it reads
        # our busy word, which says so without waking it.
        self._idle_told = False
        self._was_leased = False  # a holder may still send us jobs of an ended lease
        self._owed = False
        self._broker_check_at = 0.0  # while direct jobs flow: ask the broker's socket then
        self._leaving = False  # leaving while leased: every direct job is NOT_RUN
        self._lease_over = False  # while leaving: the broker ended the lease
        params = load_params(settings)
        _params.clear()
        _params.update(params)

    # -- life cycle -----------------------------------------------------------

    def connect(self, broker):
        """A new socket to ``broker`` and a READY, as MDP asks after any disconnection."""
        self._close(broker, 0)
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 1000
        if self.curve is not None:
            curve.connect_with(sock, *self.curve)
        sock.connect(broker.backend)
        send(sock, worker_ready(self.service, self.settings.prefetch))
        send(sock, worker_info(_about()))
        if self.direct is not None:
            send(sock, worker_direct(self.direct_endpoint))
        # A new registration: whatever lease we held came from a broker that
        # forgot us (or is gone), and so did the counts it had not heard.
        self.lease_epoch = 0
        if self._counted:
            self.counts = DirectCounts()
        self._counted = self._owed = False
        broker.socket = sock
        broker.paused = False  # a new registration starts unpaused
        self._poller = self._readiness = None
        now = monotonic()
        broker.expiry = now + self.liveness
        broker.next_heartbeat = now + self.heartbeat

    def _close(self, broker, linger=None):
        if broker.socket is not None:
            broker.socket.close(linger)
            broker.socket = None
            self._poller = self._readiness = None

    def run(self) -> int:
        """Serve jobs until retired, stopped, or without a broker too long."""
        self._lock.acquire()
        self._arm_fault_timer()  # before any job: the watchdog may not get to run
        watchdog = threading.Thread(target=self._watchdog, name="powerhose-watchdog", daemon=True)
        watchdog.start()
        try:
            return self._loop()
        finally:
            self._watchdog_stop.set()
            self._close_direct()
            if self.brokers:
                for broker in self.brokers:
                    self._close(broker)
                # Wait (up to the linger) for our last REPLY and DISCONNECT to
                # leave: the broker requeues prefetched jobs only on DISCONNECT.
                self.context.term()
            self._lock.release()

    def _loop(self):
        # Resolved here, not in Settings: the default directory is used only now.
        self.brokers = [_Broker(backend) for backend in
                        endpoints.resolve_all(self.settings.backend, "backend")]
        self._open_direct()
        for broker in self.brokers:
            self.connect(broker)
        log.info("worker pid %d serving %r on %s", os.getpid(), self.settings.service,
                 self._backends(self.brokers))
        timeout_ms = int(self.heartbeat * 1000)
        while True:
            message = self._next_message(timeout_ms)
            if message is not None:
                self._handle(message[0], message[1], message[2])  # not *: a dict per call
            if COMPILED:
                # A signal that came while we ran (not while we waited in a
                # system call, which it interrupts) has its Python handler
                # (request_stop) run only when bytecode runs, and compiled,
                # this loop runs none: SIGTERM would go unseen for ever.
                PyErr_CheckSignals()
            now = _now()
            if self.parent is not None and self.parent.gone(now):
                log.warning("parent process %d is gone; stopping", self.parent.parent)
                self.parent = None
                self.stop_requested = True
            if (self.stop_requested or self.over_memory
                    or (self.retire_at is not None and now >= self.retire_at)):
                return self.retire()
            for broker in self.brokers:
                if broker.socket is None:
                    if now >= broker.reconnect_at:
                        self.connect(broker)
                elif now >= broker.expiry:
                    self._lost(broker, now)
                elif now >= broker.next_heartbeat:
                    if self._counted:  # busy with direct jobs since the last report
                        self._report(broker, REPORT)
                    self._tell(broker, HEARTBEAT)
                    broker.next_heartbeat = now + self.heartbeat
            since = -1.0  # when the last broker was lost, if all are
            for broker in self.brokers:
                if broker.lost_since is None:
                    since = -1.0
                    break
                since = max(since, broker.lost_since)
            if since >= 0 and now - since >= self.settings.broker_timeout:
                log.error("no broker at %s for %.0fs; exiting",
                          self._backends(self.brokers), now - since)
                return EXIT_NO_BROKER

    def _next_message(self, timeout_ms):
        """(broker, socket, frames) of the next message, or None after ``timeout_ms``.

        With one broker, one receive on its socket.  With several, one
        message from each socket that has one, queued in the order read
        (the closest to arrival order there is).

        With a direct socket (one broker): ``(None, direct, frames)`` for a
        direct job (:meth:`_next_direct`).
        """
        if self.direct is not None:
            return self._next_direct(timeout_ms)
        if len(self.brokers) == 1:
            broker = self.brokers[0]
            if broker.socket is None:  # waiting to reconnect
                time.sleep(max(0.0, min(timeout_ms / 1000, broker.reconnect_at
                                        - monotonic())))
                return None
            frames = recv_within(broker.socket, timeout_ms)
            return None if frames is None else (broker, broker.socket, frames)
        if not self._inbox:
            self._read_each(0)
        if not self._inbox:
            self._read_each(timeout_ms)
        return self._inbox.popleft() if self._inbox else None

    def _read_each(self, timeout_ms):
        if self._poller is None:
            self._poller = zmq.Poller()
            for broker in self.brokers:
                if broker.socket is not None:
                    self._poller.register(broker.socket, zmq.POLLIN)
        ready = dict(self._poller.poll(timeout_ms))
        for broker in self.brokers:
            sock = broker.socket
            if sock is not None and sock in ready:
                try:
                    self._inbox.append((broker, sock, recv(sock, NOBLOCK)))
                except zmq.Again:
                    pass

    def _handle(self, broker, sock, frames):
        """One message from ``broker``: a sign of life, and maybe a job or a DISCONNECT.

        ``broker`` None: a direct job, from the direct socket."""
        if broker is None:
            self.handle_direct(frames)
            return
        if sock is not broker.socket:
            return  # read before we reconnected to that broker: it forgot us since
        broker.expiry = monotonic() + self.liveness
        broker.lost_since, broker.backoff = None, 0.1
        try:
            command = parse_broker_command(frames)
        except ProtocolError as exc:
            log.warning("dropped malformed message from the broker at %s: %s",
                        broker.backend, exc)
            return
        if command.command == REQUEST:
            if self._leaving:
                # Leaving: not run, not answered; our DISCONNECT requeues it.
                log.debug("job %r from the broker while leaving; left to our DISCONNECT",
                          command.request.job_id)
                return
            self.handle_request(command, broker)
        elif command.command == LEASE:
            self._lease(broker, command.epoch)
        elif command.command == DISCONNECT:
            if self._leaving:  # it forgot us, and the lease with us: nothing to wait for
                log.info("broker at %s sent DISCONNECT while we leave", broker.backend)
                self._lease_over = True
                return
            log.info("broker at %s sent DISCONNECT; registering again", broker.backend)
            self.connect(broker)

    def _lost(self, broker, now):
        """``broker`` did not answer for ``liveness`` heartbeats: reconnect after a backoff."""
        if broker.lost_since is None:
            broker.lost_since = now - self.liveness
        log.warning("broker at %s not answering; reconnecting in %.1fs", broker.backend,
                    broker.backoff)
        self._close(broker, 0)
        broker.reconnect_at = now + broker.backoff
        broker.backoff = min(broker.backoff * 2, 5.0)

    @staticmethod
    def _backends(brokers):
        return " ".join(broker.backend for broker in brokers)

    # -- several brokers: PAUSE and RESUME ----------------------------------------

    def _hold(self, holder):
        """About to run a job from ``holder``: the other brokers must count us busy.

        A broker known lost is told nothing (see _present).
        """
        for broker in self.brokers:
            if not self._present(broker):
                continue
            if broker is holder:
                if broker.paused:
                    self._tell(broker, RESUME)
                    broker.paused = False
            elif not broker.paused:
                self._tell(broker, PAUSE)
                broker.paused = True

    def _resume_all(self):
        """A job is done: every broker may send us jobs again.

        After every job, not only once nothing is left: a broker that keeps
        us busy with its prefetched jobs would otherwise starve the others.
        """
        for broker in self.brokers:
            if broker.paused and self._present(broker):
                self._tell(broker, RESUME)
            broker.paused = False

    @staticmethod
    def _present(broker) -> bool:
        """Whether to tell ``broker`` PAUSE and RESUME: not while it is known lost.

        To a broker that is not there, they would queue up in the socket
        (later ones dropped once it is full), and a broker starting on that
        endpoint would read the stale backlog, perhaps ending on a PAUSE.
        A new registration starts unpaused; a job it sends while we run
        another waits in our queue, like a prefetched one.
        """
        return broker.socket is not None and broker.lost_since is None

    # -- sending: never wait on one broker ------------------------------------------
    #
    # A DEALER whose broker died may have nowhere to queue a message, and a
    # send would then wait for that broker's return, starving the others
    # and the heartbeats.  So nothing waits: a command that cannot be
    # queued is dropped (the broker is gone; we register afresh when it is
    # back), and a reply waits for room at most ``liveness``.

    def _tell(self, broker, command):
        """Send HEARTBEAT, PAUSE, RESUME or DISCONNECT to ``broker``, if it can be queued."""
        try:
            send(broker.socket, worker_command(command), NOBLOCK)
        except zmq.Again:
            log.debug("broker at %s unreachable; command %r dropped", broker.backend, command)
        self._broker_used()

    def _reply(self, broker, client, reply):
        """Send a job's REPLY to the broker it came from."""
        frames = worker_reply(client, reply)
        sock = broker.socket
        self._broker_used()
        for wait in (False, True):
            if wait and not sock.poll(int(self.liveness * 1000), zmq.POLLOUT):
                break
            try:
                send(sock, frames, NOBLOCK)
                return
            except zmq.Again:
                pass
        log.warning("job %r: the broker at %s is unreachable; reply dropped (it fails "
                    "the job when it notices the worker is gone)", reply.job_id, broker.backend)

    def _pending(self) -> bool:
        """Whether a message waits to be handled (read, or in a socket)."""
        if self._inbox:
            return True
        for broker in self.brokers:
            if broker.socket is not None and readable(broker.socket):
                return True
        return False

    def retire(self) -> int:
        """Leave cleanly: DISCONNECT makes the broker requeue anything in flight to us."""
        if self.stop_requested:
            reason = "stop requested"
        elif self.over_memory:
            reason = f"resident memory past --max-memory {self.settings.max_memory} MiB"
        else:
            reason = "max age reached"
        log.info("worker retiring (%s) after %d jobs", reason, self.jobs_done)
        if self.lease_epoch and self.direct is not None:
            self._leave_lease()
        for broker in self.brokers:
            if broker.socket is not None:
                self._tell(broker, DISCONNECT)
        if self._was_leased and self.direct is not None:
            # Even after the broker's LEASE 0: a share revocation crossing our
            # own LEASE 0 reads the same, while its holder's jobs are in flight.
            self._drain_direct()
        self._close_direct()
        return EXIT_OK

    def request_stop(self, *_):
        """SIGTERM/SIGINT: finish the current job, then retire."""
        self.stop_requested = True

    def install_signal_handlers(self):
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    # -- jobs ---------------------------------------------------------------------

    def handle_request(self, command, broker):
        """Run one job from ``broker`` and send the reply back to it."""
        req = command.request
        now = _now()
        # A prefetched request waited in our socket while we ran the previous
        # job, at most since that job started: count that against its ttl.
        waited = now - self.backlog_since if self.backlog_since is not None else 0.0
        self.backlog_since = now
        deadline = now + req.ttl_ms / 1000.0 - waited if req.ttl_ms else None
        if deadline is not None and deadline <= now:
            log.info("job %r waited %.3fs behind another job, past its deadline; not run",
                     req.job_id, waited)
            reply = Reply.error(req.job_id, ERR_TIMEOUT,
                                f"job waited {waited:.2f}s in the worker behind another job "
                                "and its deadline passed; it was not run")
            self._reply(broker, command.client, reply)
            return
        if len(self.brokers) > 1:
            self._hold(broker)
        job = new_job(req.data, req.headers, req.job_id, deadline, self.settings.service)
        self._current_broker = broker
        self._client_address = command.client
        reply = self._run(job, now)
        # The bookkeeping comes before the reply: once it is sent, our I/O
        # thread must run to pass it on, often on this core, and every
        # microsecond we keep the core delays the client.
        if not self._pending():
            self.backlog_since = None  # what comes next did not queue behind this job
        # We could not read the brokers' heartbeats while busy: that time
        # does not count against them.  (Reset to now + liveness, a broker
        # that died would never expire while another keeps us busy.)
        started, now = now, _now()
        for each in self.brokers:
            each.expiry += now - started
        broker.next_heartbeat = now + self.heartbeat  # the reply is a sign of life
        self.jobs_done += 1
        self._reply(broker, command.client, reply)
        if len(self.brokers) > 1:
            self._resume_all()
        if self.max_memory and _peak_memory() > self.max_memory << 20:
            self.over_memory = True  # checked after each job: one system call

    def handle_direct(self, frames):
        """One message from the direct socket: run the job if our current
        lease allows it, answer it straight back, count it for the broker."""
        try:
            direct = parse_direct_request(frames)
        except ProtocolError as exc:
            log.warning("dropped a malformed direct job: %s", exc)
            return
        req = direct.request
        if self._leaving:
            send(self.direct, direct_not_run(direct.address, req.job_id, NOT_RUN_STOPPING))
            return
        if direct.epoch != self.lease_epoch or not self.lease_epoch:
            # Not our lease (revoked, or an old epoch): it never starts, so the
            # client may send it again through the broker.
            send(self.direct, direct_not_run(direct.address, req.job_id, NOT_RUN_LEASE))
            return
        deadline_ns = direct.deadline_ns
        # CLOCK_MONOTONIC, as the client's monotonic_ns() and our monotonic()
        # read it: one clock read, not two.
        now = _now()
        now_ns = int(now * 1e9)
        if deadline_ns and now_ns >= deadline_ns:
            log.info("direct job %r: its deadline passed before it started; not run",
                     req.job_id)
            reply = Reply.error(req.job_id, ERR_TIMEOUT,
                                "the job's deadline passed before the worker could start "
                                "it; it was not run")
            self.counts.add(-1.0, ERR_TIMEOUT)
            self._counted = self._owed = True
            send(self.direct, direct_reply(direct.address, reply))
            return
        word = self._word
        if word is not None:
            word[0] = BUSY
        elif self._idle_told:  # busy again: once per spell of work, not per job
            self._idle_told = False
            self._report(self.brokers[0], REPORT)
        job = new_job(req.data, req.headers, req.job_id,
                      deadline_ns * 1e-9 if deadline_ns else None, self.settings.service)
        self._direct_client = direct.address
        try:
            reply = self._run(job, now)
        finally:
            self._direct_client = None
        # Bookkeeping first, as for a relayed job (handle_request).
        end = _now()
        for each in self.brokers:  # we could not read the broker's heartbeats
            each.expiry += end - now
        self.jobs_done += 1
        self.counts.add(end - now, None if reply.ok else reply.code)
        self._counted = self._owed = True
        send(self.direct, direct_reply(direct.address, reply))
        if word is not None:
            word[0] = int(end * 1e9)  # idle since (the clock is CLOCK_MONOTONIC's)
        if self.max_memory and _peak_memory() > self.max_memory << 20:
            self.over_memory = True

    def _run(self, job, now) -> Reply:
        """Run ``job`` (started at ``now``) with the lock released, so that
        the watchdog may heartbeat while we work; it sees the job as
        ``_current`` and ``_busy_since``."""
        self._current = job
        self._busy_since = now
        self._release()
        try:
            return run_target(self.target, job)
        finally:
            self._acquire()
            self._busy_since = None
            self._current = None

    # -- the direct path ------------------------------------------------------------

    def _direct_allowed(self) -> bool:
        """Whether to announce a direct socket: one broker, on ipc, no CURVE."""
        if not self.settings.direct:
            return False
        if len(self.brokers) != 1:
            log.info("several brokers: no direct path (jobs are relayed)")
            return False
        if endpoints.ipc_path(self.brokers[0].backend) is None:
            log.info("backend %s is not ipc: no direct path", self.brokers[0].backend)
            return False
        if self.curve is not None:
            log.info("CURVE is on: no direct path")
            return False
        return True

    def _open_direct(self):
        """Bind the direct ROUTER in ``direct/`` beside the backend's socket
        file (mode 0700), if the direct path is allowed; a warning, and no
        direct path, if that directory is not ours alone."""
        if not self._direct_allowed():
            return
        backend_path = os.path.abspath(endpoints.ipc_path(self.brokers[0].backend))
        folder = os.path.join(os.path.dirname(backend_path), "direct")
        try:
            endpoints.private_dir(folder)
        except (UnsafeDirectoryError, OSError) as exc:
            log.warning("no direct path: %s", exc)
            return
        path = os.path.join(folder, f"{os.getpid()}-{os.urandom(4).hex()}.sock")
        endpoint = (endpoints.IPC + path).encode()
        if len(path.encode()) > MAX_IPC_PATH or len(endpoint) > MAX_ENDPOINT_LENGTH:
            log.warning("no direct path: the socket path %s would be too long", path)
            return
        sock = self.context.socket(zmq.ROUTER)
        sock.linger = 1000
        try:
            sock.bind(endpoint.decode())
        except zmq.ZMQError as exc:
            sock.close(0)
            log.warning("no direct path: cannot bind %s: %s", path, exc)
            return
        self.direct, self.direct_endpoint, self._direct_path = sock, endpoint, path
        self._poller = self._readiness = None
        try:
            self._busy_word = busy_word.BusyWord(busy_word.path_for(path))
            self._word = self._busy_word.word
        except OSError as exc:  # the broker then hears REPORT, as from an older worker
            log.warning("no busy word beside %s: %s", path, exc)
        log.info("direct jobs on %s", path)

    def _close_direct(self):
        """Close the direct socket, remove its file (libzmq leaves it) and
        our busy word's."""
        sock = self.direct
        if sock is None:
            return
        self.direct = None
        self._poller = self._readiness = None
        self.lease_epoch = 0
        sock.close()
        if self._busy_word is not None:
            self._word = None
            self._busy_word.close()
            self._busy_word = None
        endpoints.remove(self._direct_path)

    def _next_direct(self, timeout_ms):
        """_next_message with a direct socket: a wait on both sockets (the
        broker's read first, so that the end of a lease counts before the
        next direct job); FREE once idle ``FREE_AFTER_MS`` after direct jobs.

        While direct jobs flow (``_owed``), the wait is one blocking receive
        on the direct socket, and the broker's socket is asked at most every
        BROKER_CHECK seconds: asking both sockets costs a job about 10 us
        more (readiness.py asks libzmq before and after it sleeps).  A
        message from the broker waits that long at most, or until the
        direct socket has been quiet for FREE_AFTER_MS."""
        broker = self.brokers[0]
        waiting = self._readiness
        if waiting is None:
            waiting = self._readiness = Readiness(
                (self.direct,) if broker.socket is None else (self.direct, broker.socket))
        if self._owed:
            now = _now()
            if broker.socket is not None and now >= self._broker_check_at:
                self._broker_check_at = now + BROKER_CHECK
                message = _waiting_message(broker)
                if message is not None:
                    return message
                waiting.asked(_BROKER)
            # libzmq times RCVTIMEO with a coarse millisecond clock: one more
            # millisecond, and our own clock says whether it was enough.
            frames = recv_within(self.direct, FREE_AFTER_MS + 1)
            waiting.stale |= _DIRECT  # used: asked before the next sleep on its descriptor
            if frames is not None:
                return None, self.direct, frames
            left = FREE_AFTER_MS - int((_now() - now) * 1000)
            if left <= 0:
                # Quiet: what the broker sent meanwhile comes first (it may
                # have forgotten us), then FREE if we are still owed it.
                if broker.socket is not None:
                    message = _waiting_message(broker)
                    if message is not None:
                        return message
                self._report(broker, FREE)
                return None
            timeout_ms = left
        elif broker.socket is None:  # waiting to reconnect: direct jobs still run
            timeout_ms = max(0, min(timeout_ms,
                                    int((broker.reconnect_at - monotonic()) * 1000) + 1))
        ready = waiting.wait(timeout_ms)
        if not ready:  # the time is up
            if self._owed:
                self._report(broker, FREE)
            return None
        if ready == WOKEN:  # by something that was not a message (a connection)
            return None
        if ready & _BROKER:
            sock = broker.socket
        else:
            sock = self.direct
        try:
            frames = recv(sock, NOBLOCK)
        except zmq.Again:
            return None
        if sock is self.direct:
            return None, sock, frames
        return broker, sock, frames

    def _broker_used(self):
        """A send on the broker's socket may take the wake-up of a message
        that arrived meanwhile: the direct loop must ask it (readiness.py)."""
        waiting = self._readiness
        if waiting is not None:
            waiting.stale |= _BROKER

    def _lease(self, broker, epoch):
        """LEASE from the broker: serve ``epoch`` from now on, or (0) no lease;
        answered with the lease we now serve, after a REPORT of what we ran
        if the lease ends (so the broker's stats are exact)."""
        if epoch:
            if self._leaving or self.direct is None:
                epoch = 0  # leaving (the broker was told) or no direct socket
            self._idle_told = bool(epoch)  # a fresh lease counts idle at the broker
            self._was_leased = self._was_leased or bool(epoch)
            log.debug("leased under epoch %d", epoch)
        else:
            if self._counted:
                self._report(broker, REPORT)
            self._owed = False  # the answer tells the broker we are idle
            if self._leaving:
                self._lease_over = True
            log.debug("lease %d ended", self.lease_epoch)
        self.lease_epoch = epoch
        self._send_broker(broker, worker_lease(epoch, 0))

    def _report(self, broker, command):
        """FREE (idle again: owed once after direct jobs, even if a REPORT
        just carried their counts) or REPORT (still busy), with the direct
        jobs ended since the last one; then start counting afresh."""
        if broker.socket is not None:
            self._send_broker(broker, worker_counts(command, self.counts))
        if self._counted:
            self.counts = DirectCounts()
            self._counted = False
        if command == FREE:
            self._owed = False
            self._idle_told = True

    def _send_broker(self, broker, frames):
        """A message to ``broker`` if it can be queued (as _tell)."""
        try:
            send(broker.socket, frames, NOBLOCK)
        except zmq.Again:
            log.debug("broker at %s unreachable; %r dropped", broker.backend, frames[2])
        self._broker_used()

    def _drain_direct(self):
        """Leaving, after DISCONNECT, a worker that was leased: a holder's
        threads may have sent a direct job just before they heard the lease
        was over, so answer NOT_RUN stopping (they send it through the
        broker) until the direct socket has been quiet for a heartbeat,
        within ``liveness``, rather than close it on a job nobody would
        answer."""
        self._leaving = True
        quiet = max(0.1, self.heartbeat)
        last = monotonic()
        until = last + self.liveness
        while True:
            now = monotonic()
            if now >= until or now - last >= quiet:
                return
            message = self._next_message(int((quiet - (now - last)) * 1000) + 1)
            if message is not None and message[1] is self.direct:
                self.handle_direct(message[2])  # NOT_RUN stopping
                last = monotonic()
            # From the broker, after our DISCONNECT: nothing to do (it requeues
            # what it had sent us).

    def _leave_lease(self):
        """Leaving while leased: tell the broker (LEASE 0), answer NOT_RUN
        stopping to every direct job from now on, and wait for the broker to
        end the lease (its holder returned it, or was forgotten) or for
        ``heartbeat * liveness`` seconds, so that no direct job is left
        unread in a socket that closes."""
        broker = self.brokers[0]
        self._leaving = True
        self._lease_over = False
        log.info("leased under epoch %d: waiting for the broker to end the lease",
                 self.lease_epoch)
        if broker.socket is not None:
            if self._counted:
                self._report(broker, REPORT)
            self._send_broker(broker, worker_lease(0, 0))
        self._owed = False
        self.lease_epoch = 0
        until = monotonic() + self.liveness
        while not self._lease_over:
            now = monotonic()
            if broker.socket is None or now >= broker.expiry:
                log.warning("the broker at %s is gone; leaving without the end of the "
                            "lease", broker.backend)
                return
            if now >= until:
                log.warning("the broker did not end our lease within %.1fs; leaving "
                            "anyway", self.liveness)
                return
            message = self._next_message(int(min(self.heartbeat, until - now) * 1000) + 1)
            if message is not None:
                self._handle(message[0], message[1], message[2])
            now = monotonic()
            if broker.socket is not None and now >= broker.next_heartbeat:
                self._tell(broker, HEARTBEAT)
                broker.next_heartbeat = now + self.heartbeat
        log.info("the broker ended our lease")

    # -- watchdog thread --------------------------------------------------------

    def _watchdog(self):
        limit = self.settings.worker_timeout
        tick = self._tick()
        last_beat = 0.0
        try:
            while not self._watchdog_stop.wait(tick):
                self._arm_fault_timer()
                last_beat = self._watch(limit, last_beat)
        finally:
            if limit:
                faulthandler.cancel_dump_traceback_later()

    def _tick(self) -> float:
        limit = self.settings.worker_timeout
        return min(self.heartbeat / 2, limit / 4 if limit else self.heartbeat, 0.5)

    def _arm_fault_timer(self):
        """(Re-)arm faulthandler's timer, if there is a --timeout.

        From the watchdog thread every tick, not per job: each arming starts
        a thread, and a job must not pay for one.  The timer fires at least
        limit + margin after any job began, only if the watchdog stopped.
        """
        limit = self.settings.worker_timeout
        if limit:
            if self._fault_file is None:
                self._fault_file = _fault_file()
            faulthandler.dump_traceback_later(limit + FAULT_MARGIN + self._tick(), exit=True,
                                              file=self._fault_file)

    def _watch(self, limit, last_beat) -> float:
        """One tick: end a job past ``limit``, heartbeat while busy; the last beat's time."""
        started = self._busy_since
        if started is None:
            return last_beat
        now = monotonic()
        if limit and now - started > limit:
            self._job_timed_out(now - started)
        if now - last_beat >= self.heartbeat and self._lock.acquire(blocking=False):
            try:
                if self._busy_since is not None:
                    for broker in self.brokers:
                        if broker.socket is not None:
                            self._tell(broker, HEARTBEAT)
                    last_beat = now
            finally:
                self._lock.release()
        return last_beat

    def _job_timed_out(self, elapsed):
        """Past --timeout: log every stack, tell the client, exit for a restart."""
        job = self._current
        job_id = job.id if job is not None else b"?"
        log.error("job %r on %r exceeded the %.1fs time limit (%.1fs); stacks follow, "
                  "then the worker exits to be restarted", job_id, self.settings.service,
                  self.settings.worker_timeout, elapsed)
        for thread_id, frame in sys._current_frames().items():
            log.error("thread %s:\n%s", thread_id, "".join(traceback.format_stack(frame)))
        if self._lock.acquire(timeout=1.0):
            reply = Reply.error(job_id, ERR_TIMEOUT,
                                f"job exceeded the worker's {self.settings.worker_timeout}s "
                                "time limit (--timeout); the worker was restarted")
            try:
                if self._direct_client is not None and self.direct is not None:
                    send(self.direct, direct_reply(self._direct_client, reply))
                else:
                    self._reply(self._current_broker, self._client_address, reply)
                for broker in self.brokers:
                    if broker.socket is not None:
                        self._tell(broker, DISCONNECT)
                        broker.socket.close(linger=1000)
                self._close_direct()
                self.context.term()  # flushes the reply before we exit
            except zmq.ZMQError:
                pass
        logging.shutdown()
        os._exit(EXIT_JOB_TIMEOUT)


# Bits of Readiness.wait()'s answer in the direct loop: the direct socket
# is the first one, the broker's the second.
_DIRECT, _BROKER = 1, 2


def _peak_memory() -> int:
    """The most resident memory this process has used, in bytes (one getrusage call)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # KiB elsewhere


def _fault_file():
    """Where faulthandler writes: the log's stream, if it is a real file, else stderr."""
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        try:
            stream.fileno()
        except (AttributeError, OSError, ValueError):
            continue
        return stream
    return sys.stderr


def _about() -> bytes:
    """pid@host, for the broker's stats: who this worker is."""
    about = f"{os.getpid()}@{socket.gethostname()}".encode("utf-8", "replace")
    return about[:MAX_ABOUT_LENGTH]


def run_target(target, job) -> Reply:
    """Call a target on a job: its result, or the error a client will raise.

    A str result is sent as UTF-8; any other non-bytes result, like an
    exception, is an ExecutionError carrying the type and the traceback.
    """
    try:
        if job.headers and traced(job):  # no call for a job without headers
            with job_span(job):  # the client's trace continues here
                result = target(job)
        else:
            result = target(job)
    except Exception as exc:
        log.info("job %r raised %s: %s", job.id, type(exc).__name__, exc)
        return Reply.error(job.id, ERR_EXECUTION,
                           f"{type(exc).__name__}: {exc}", _type_name(exc),
                           traceback.format_exc())
    if isinstance(result, str):
        result = result.encode("utf-8")
    elif isinstance(result, (bytearray, memoryview)):
        result = bytes(result)
    elif not isinstance(result, bytes):
        return Reply.error(job.id, ERR_EXECUTION,
                           f"target returned {type(result).__name__}; it must return "
                           "bytes or str", "TypeError")
    return ok_reply(job.id, result)


def _waiting_message(broker):
    """(broker, socket, frames) of a message the broker's socket holds
    already, or None: a look without a wait."""
    sock = broker.socket
    if readable(sock):
        try:
            return broker, sock, recv(sock, NOBLOCK)
        except zmq.Again:
            pass
    return None


def _type_name(exc):
    cls = type(exc)
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
