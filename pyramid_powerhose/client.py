"""The client: hands jobs to the broker and waits for their results.

Each thread gets its own DEALER socket, so threads run jobs concurrently
with no lock and no hand-off between them; each job carries an id, so a
reply that arrives after its caller gave up is recognised and dropped and
the socket stays usable.  After ``fork()`` a child opens its own context
and sockets on first use.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import os
import threading
import time
import weakref

import zmq

from . import endpoints, exc, multipart, protocol
from .job import Job, to_bytes
from .exc import ProtocolError
from .protocol import Request
from .settings import Settings

log = logging.getLogger(__name__)

# Bumped in every forked child: a client notices it is in a new process
# with an integer comparison instead of a getpid() system call per job.
_fork_generation = 0


def _after_fork():
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork)

MAP_WINDOW = 128  # jobs in flight at once per map() call


class _Channel:
    """One thread's socket to the broker, with its job id counter."""

    __slots__ = ("socket", "ids", "__weakref__")

    def __init__(self, context, frontend):
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        # Not ZMQ_IMMEDIATE: with it, libzmq throws away the replies a socket
        # has received but not yet read when the connection drops, e.g. the
        # last replies of a broker that finished its jobs and stopped.  Jobs
        # queued while no broker is up are discarded on timeout (_retire).
        sock.connect(frontend)
        self.socket = sock
        self.ids = itertools.count(1)
        weakref.finalize(self, sock.close, 0)

    def next_id(self):
        return b"%x" % next(self.ids)

    def close(self):
        self.socket.close(0)


class Client:
    """Runs jobs on a powerhose cluster; thread-safe, fork-safe.

    ``execute`` blocks for one result; ``submit`` returns a Future;
    ``map`` runs many jobs at once and returns their results in order.
    """

    def __init__(self, frontend=None, timeout=None, service=None, max_job_size=None,
                 settings=None):
        base = settings or Settings()
        self.settings = base.replace(
            frontend=frontend or base.frontend,
            timeout=base.timeout if timeout is None else timeout,
            service=service or base.service,
            max_job_size=max_job_size or base.max_job_size,
        )
        self._frontend = self.settings.frontend  # empty: the default, resolved on first use
        self.timeout = self.settings.timeout
        self.service = self.settings.service
        self._closed = False
        self._lock = threading.Lock()
        self._executor = None
        self._reset()

    @property
    def frontend(self) -> str:
        """The broker's endpoint; the private default is looked up on first use."""
        if not self._frontend:
            self._frontend = endpoints.resolve(self.settings.frontend, "frontend")
        return self._frontend

    def _reset(self):
        self._generation = _fork_generation
        self._context = zmq.Context()
        self._local = threading.local()
        self._channels = weakref.WeakSet()
        self._executor = None

    def _channel(self) -> _Channel:
        if self._generation != _fork_generation:
            with self._lock:
                if self._generation != _fork_generation:
                    self._reset()  # a forked child: the parent's sockets are not ours
        try:
            return self._local.channel
        except AttributeError:
            pass
        if self._closed:
            raise exc.PowerhoseError("the client is closed")
        channel = _Channel(self._context, self.frontend)
        self._local.channel = channel
        with self._lock:
            self._channels.add(channel)
        return channel

    def _retire(self, channel):
        """Replace a thread's socket after a timeout.

        The timed-out job may still sit in the socket's queue (no broker
        was up); closing the socket drops it, so a broker that comes back
        never runs jobs whose callers gave up, and their late replies have
        nowhere to go.
        """
        if getattr(self._local, "channel", None) is channel:
            del self._local.channel
        with self._lock:
            self._channels.discard(channel)
        channel.close()

    # -- jobs -----------------------------------------------------------------

    def _request(self, data, headers, service, timeout):
        data, headers, timeout = check_job(self.settings, data, headers, timeout)
        service = service or self.service
        req = Request(service.encode(), b"", data, max(1, int(timeout * 1000)), headers)
        return req, timeout

    def execute(self, data, timeout=None, headers=None, service=None) -> bytes:
        """Run one job and return its result (bytes).

        Raises NoWorkerError, TimeoutError, ExecutionError, WorkerLostError
        or JobTooLargeError from ``pyramid_powerhose.exc``.
        """
        req, timeout = self._request(data, headers, service, timeout)
        channel = self._channel()
        req.job_id = channel.next_id()
        return _result(self._run(channel, req, timeout))

    def _run(self, channel, req, timeout):
        """Send one request on ``channel`` and wait for its reply."""
        deadline = time.monotonic() + timeout
        try:
            self._send(channel.socket, req, deadline, timeout)
            return self._receive(channel.socket, {req.job_id}, deadline, req, timeout)
        except exc.TimeoutError:
            self._retire(channel)
            raise

    def _send(self, sock, req, deadline, timeout):
        frames = protocol.client_request(req)
        try:
            multipart.send(sock, frames, multipart.NOBLOCK)
            return
        except zmq.Again:
            pass
        # No connection yet (just created, or the broker is down): wait for one.
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(remaining * 1000, zmq.POLLOUT):
                raise exc.TimeoutError(
                    f"could not queue the job for the broker at {self.frontend} "
                    f"within {timeout}s; is powerhose-broker running?")
            try:
                multipart.send(sock, frames, multipart.NOBLOCK)
                return
            except zmq.Again:
                continue

    def _receive(self, sock, wanted, deadline, req, timeout):
        """The next reply for one of ``wanted`` job ids; late ones are dropped."""
        while True:
            frames = multipart.recv_within(sock, int((deadline - time.monotonic()) * 1000))
            if frames is None:
                raise exc.TimeoutError(
                    f"job {req.job_id.decode()} on {req.service.decode()!r} got no result "
                    f"within {timeout}s from the broker at {self.frontend}; "
                    "is powerhose-broker running, and are its workers overloaded or hung?")
            try:
                reply = protocol.parse_client_reply(frames)
            except ProtocolError as error:
                log.warning("dropped malformed reply from %s: %s", self.frontend, error)
                continue
            if reply.job_id in wanted:
                return reply
            log.debug("dropped late reply for job %r", reply.job_id)

    def submit(self, data, timeout=None, headers=None, service=None) -> concurrent.futures.Future:
        """Run one job in the background; returns a ``concurrent.futures.Future``."""
        executor = self._executor
        if executor is None or self._generation != _fork_generation:
            self._channel()  # resets after a fork
            with self._lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        max_workers=32, thread_name_prefix="powerhose-submit")
                executor = self._executor
        return executor.submit(self.execute, data, timeout, headers, service)

    def map(self, iterable, timeout=None, headers=None, service=None) -> list:
        """Run many jobs at once and return their results in order.

        Up to 128 jobs are in flight at a time, each with its own timeout
        from when it is sent.  If any job fails, the error of the first
        failed job (in input order) is raised once all have settled.
        """
        channel = self._channel()
        sock = channel.socket
        pending = {}  # job id -> (index, request, deadline)
        results = []
        jobs = iter(enumerate(iterable))
        exhausted = False
        while True:
            while not exhausted and len(pending) < MAP_WINDOW:
                item = next(jobs, None)
                if item is None:
                    exhausted = True
                    break
                index, data = item
                req, job_timeout = self._request(data, headers, service, timeout)
                req.job_id = channel.next_id()
                deadline = time.monotonic() + job_timeout
                results.append(None)
                try:
                    self._send(sock, req, deadline, job_timeout)
                except exc.TimeoutError as error:
                    results[index] = error
                    continue
                pending[req.job_id] = (index, req, deadline, job_timeout)
            if not pending:
                break
            first = min(pending.values(), key=lambda p: p[2])
            try:
                reply = self._receive(sock, pending, first[2], first[1], first[3])
            except exc.TimeoutError as error:
                del pending[first[1].job_id]
                results[first[0]] = error
                continue
            index = pending.pop(reply.job_id)[0]
            results[index] = reply
        if any(isinstance(outcome, exc.TimeoutError) for outcome in results):
            self._retire(channel)
        values = []
        for outcome in results:
            if isinstance(outcome, Exception):
                raise outcome
            values.append(_result(outcome))
        return values

    # -- broker queries -----------------------------------------------------------

    def _mmi(self, service, body=b"", timeout=1.0):
        req = Request(service, b"", body, max(1, int(timeout * 1000)))
        channel = self._channel()
        req.job_id = channel.next_id()
        return _result(self._run(channel, req, timeout))

    def ping(self, timeout=1.0):
        """The broker's pid, or None if no broker answers within ``timeout``."""
        try:
            return int(self._mmi(protocol.MMI_PING, timeout=timeout))
        except exc.TimeoutError:
            return None

    def has_service(self, service=None, timeout=1.0) -> bool:
        """Whether the broker has at least one worker for ``service`` (8/MMI)."""
        name = (service or self.service).encode()
        return self._mmi(protocol.MMI_SERVICE, name, timeout) == protocol.MMI_FOUND

    def stats(self, timeout=1.0) -> dict:
        """The broker's statistics: workers idle and busy, queues, jobs done."""
        return json.loads(self._mmi(protocol.MMI_STATS, timeout=timeout))

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
        for channel in channels:
            channel.close()
        self._local = threading.local()
        self._context.destroy(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def check_job(settings, data, headers, timeout):
    """A job's data, headers and timeout, checked before anything is sent.

    ``data`` may be a Job, whose headers ``headers`` extends.
    """
    if isinstance(data, Job):
        headers = {**data.headers, **(headers or {})}
        data = data.data
    data = to_bytes(data)
    if len(data) > settings.max_job_size:
        raise exc.JobTooLargeError(
            f"job of {len(data)} bytes is larger than the max job size "
            f"({settings.max_job_size} bytes)")
    if timeout is None:
        timeout = settings.timeout
    if not timeout > 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
    if headers:
        headers = dict(headers)
        protocol.encode_headers(headers)  # str to str, or TypeError now
    else:
        headers = {}
    return data, headers, timeout


def _result(reply):
    if reply.ok:
        return reply.data
    raise exc.from_reply(reply)
