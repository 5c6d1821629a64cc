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

Life cycle, in one place each: ``connect`` (READY), ``handle_request``
(job started, job finished), ``reconnect`` (broker lost), ``retire``
(max age, max memory or SIGTERM: DISCONNECT after the current job, then exit).
"""

from __future__ import annotations

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

import zmq

from . import curve, endpoints, multipart, protocol, tracing
from .job import Job
from .exc import ProtocolError, TargetError
from .protocol import Reply
from .settings import read_params_file

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NO_BROKER = 2
EXIT_JOB_TIMEOUT = 3

# Seconds past --timeout before faulthandler ends a worker whose watchdog
# thread cannot run: time for that thread to end it first, politely.
FAULT_MARGIN = 2.0

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


class Worker:
    def __init__(self, target, settings, context=None):
        self.target = target
        self.settings = settings
        self.service = settings.service.encode()
        self.context = context or zmq.Context.instance()
        self.curve = curve.client_keys(settings)  # None: no CURVE
        self.heartbeat = settings.heartbeat
        self.liveness = settings.heartbeat * settings.liveness
        self.socket = None
        self.stop_requested = False
        self.jobs_done = 0
        self._lock = threading.Lock()  # held by whoever uses the socket
        self._busy_since = None
        self._current = None
        self._client_address = b""
        self.backlog_since = None  # when the requests now in our socket may have arrived
        self._watchdog_stop = threading.Event()
        self._fault_file = None
        age = settings.max_age
        if age > 0:
            age += random.uniform(0, settings.max_age_delta)
        self.retire_at = time.monotonic() + age if age > 0 else None
        self.over_memory = False  # past --max-memory: retire after the current job
        self.parent = os.getppid() if settings.exit_with_parent else None
        params = load_params(settings)
        _params.clear()
        _params.update(params)

    # -- life cycle -----------------------------------------------------------

    def connect(self):
        """A new socket and a READY, as MDP asks after any disconnection."""
        if self.socket is not None:
            self.socket.close(0)
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.linger = 1000
        if self.curve is not None:
            curve.connect_with(self.socket, *self.curve)
        # Resolved here, not in Settings: the default directory is used only now.
        self.backend = endpoints.resolve(self.settings.backend, "backend")
        self.socket.connect(self.backend)
        multipart.send(self.socket, protocol.worker_ready(self.service, self.settings.prefetch))
        multipart.send(self.socket, protocol.worker_info(_about()))
        now = time.monotonic()
        self.broker_expiry = now + self.liveness
        self.next_heartbeat = now + self.heartbeat

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
            if self.socket is not None:
                self.socket.close()
                # Wait (up to the linger) for our last REPLY and DISCONNECT to
                # leave: the broker requeues prefetched jobs only on DISCONNECT.
                self.context.term()
            self._lock.release()

    def _loop(self):
        self.connect()
        log.info("worker pid %d serving %r on %s", os.getpid(), self.settings.service,
                 self.backend)
        no_broker_since = None
        backoff = 0.1
        timeout_ms = int(self.heartbeat * 1000)
        while True:
            frames = multipart.recv_within(self.socket, timeout_ms)
            if frames is not None:
                now = time.monotonic()
                self.broker_expiry = now + self.liveness
                no_broker_since, backoff = None, 0.1
                try:
                    command = protocol.parse_broker_command(frames)
                except ProtocolError as exc:
                    log.warning("dropped malformed message from broker: %s", exc)
                    continue
                if command.command == protocol.REQUEST:
                    self.handle_request(command)
                elif command.command == protocol.DISCONNECT:
                    log.info("broker sent DISCONNECT; registering again")
                    self.connect()
            now = time.monotonic()
            if self.parent is not None and os.getppid() != self.parent:
                log.warning("parent process %d is gone; stopping", self.parent)
                self.parent = None
                self.stop_requested = True
            if (self.stop_requested or self.over_memory
                    or (self.retire_at is not None and now >= self.retire_at)):
                return self.retire()
            if now >= self.broker_expiry:
                no_broker_since = no_broker_since or now - self.liveness
                if now - no_broker_since >= self.settings.broker_timeout:
                    log.error("no broker at %s for %.0fs; exiting", self.backend,
                              now - no_broker_since)
                    return EXIT_NO_BROKER
                log.warning("broker at %s not answering; reconnecting in %.1fs",
                            self.backend, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self.connect()
            elif now >= self.next_heartbeat:
                multipart.send(self.socket, protocol.worker_command(protocol.HEARTBEAT))
                self.next_heartbeat = now + self.heartbeat

    def retire(self) -> int:
        """Leave cleanly: DISCONNECT makes the broker requeue anything in flight to us."""
        if self.stop_requested:
            reason = "stop requested"
        elif self.over_memory:
            reason = f"resident memory past --max-memory {self.settings.max_memory} MiB"
        else:
            reason = "max age reached"
        log.info("worker retiring (%s) after %d jobs", reason, self.jobs_done)
        multipart.send(self.socket, protocol.worker_command(protocol.DISCONNECT))
        return EXIT_OK

    def request_stop(self, *_):
        """SIGTERM/SIGINT: finish the current job, then retire."""
        self.stop_requested = True

    def install_signal_handlers(self):
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    # -- jobs ---------------------------------------------------------------------

    def handle_request(self, command):
        req = command.request
        now = time.monotonic()
        # A prefetched request waited in our socket while we ran the previous
        # job, at most since that job started: count that against its ttl.
        waited = now - self.backlog_since if self.backlog_since is not None else 0.0
        self.backlog_since = now
        deadline = now + req.ttl_ms / 1000.0 - waited if req.ttl_ms else None
        if deadline is not None and deadline <= now:
            log.info("job %r waited %.3fs behind another job, past its deadline; not run",
                     req.job_id, waited)
            reply = Reply.error(req.job_id, protocol.ERR_TIMEOUT,
                                f"job waited {waited:.2f}s in the worker behind another job "
                                "and its deadline passed; it was not run")
            multipart.send(self.socket, protocol.worker_reply(command.client, reply))
            return
        job = Job(req.data, req.headers, req.job_id, deadline, self.settings.service)
        self._current = job
        self._client_address = command.client
        self._busy_since = now
        self._lock.release()  # the watchdog may heartbeat while we work
        try:
            reply = self.execute(job)
        finally:
            self._lock.acquire()
            self._busy_since = None
            self._current = None
        # The bookkeeping comes before the reply: once it is sent, our I/O
        # thread must run to pass it on, often on this core, and every
        # microsecond we keep the core delays the client.
        if not multipart.readable(self.socket):
            self.backlog_since = None  # what comes next did not queue behind this job
        # We could not read the broker's heartbeats while busy.
        now = time.monotonic()
        self.broker_expiry = max(self.broker_expiry, now + self.liveness)
        self.next_heartbeat = now + self.heartbeat
        self.jobs_done += 1
        multipart.send(self.socket, protocol.worker_reply(command.client, reply))
        if self.settings.max_memory and _peak_memory() > self.settings.max_memory << 20:
            self.over_memory = True  # checked after each job: one system call

    def execute(self, job) -> Reply:
        return run_target(self.target, job)

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
        now = time.monotonic()
        if limit and now - started > limit:
            self._job_timed_out(now - started)
        if now - last_beat >= self.heartbeat and self._lock.acquire(blocking=False):
            try:
                if self._busy_since is not None:
                    multipart.send(self.socket, protocol.worker_command(protocol.HEARTBEAT))
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
            reply = Reply.error(job_id, protocol.ERR_TIMEOUT,
                                f"job exceeded the worker's {self.settings.worker_timeout}s "
                                "time limit (--timeout); the worker was restarted")
            try:
                multipart.send(self.socket, protocol.worker_reply(self._client_address, reply))
                multipart.send(self.socket, protocol.worker_command(protocol.DISCONNECT))
                self.socket.close(linger=1000)
                self.context.term()  # flushes the reply before we exit
            except zmq.ZMQError:
                pass
        logging.shutdown()
        os._exit(EXIT_JOB_TIMEOUT)


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
    return about[:protocol.MAX_ABOUT_LENGTH]


def run_target(target, job) -> Reply:
    """Call a target on a job: its result, or the error a client will raise.

    A str result is sent as UTF-8; any other non-bytes result, like an
    exception, is an ExecutionError carrying the type and the traceback.
    """
    try:
        with tracing.job_span(job):  # the client's trace continues here, if it sent one
            result = target(job)
    except Exception as exc:
        log.info("job %r raised %s: %s", job.id, type(exc).__name__, exc)
        return Reply.error(job.id, protocol.ERR_EXECUTION,
                           f"{type(exc).__name__}: {exc}", _type_name(exc),
                           traceback.format_exc())
    if isinstance(result, str):
        result = result.encode("utf-8")
    elif isinstance(result, (bytearray, memoryview)):
        result = bytes(result)
    elif not isinstance(result, bytes):
        return Reply.error(job.id, protocol.ERR_EXECUTION,
                           f"target returned {type(result).__name__}; it must return "
                           "bytes or str", "TypeError")
    return Reply(job.id, True, result)


def _type_name(exc):
    cls = type(exc)
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
