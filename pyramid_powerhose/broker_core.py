"""The broker's decisions, without sockets: dispatch, credit, deadlines, expiry.

:class:`BrokerCore` is plain state (services, workers, queues) driven by
events, each given the current time: a message from a client, a message
from a worker, a tick of the clock, a connection that closed.  Each event
returns the messages to send, as :class:`Send` records; the loop that owns
the sockets (:mod:`pyramid_powerhose.broker`) sends them, and reports
back the sends to workers that failed because the worker's connection was
gone (:meth:`BrokerCore.undelivered`).  Tests drive it with lists of
frames and a fake clock.

Its state reads like the zguide's Majordomo broker: ``services`` by name,
each with its idle workers in least-recently-used order and its queue of
jobs; ``workers`` by address, each with the jobs it holds.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
from collections import deque

from .busy_word import BUSY as WORD_BUSY, path_for as busy_word_path
from .exc import ProtocolError

# Names, not protocol.NAME: compiled, a module global is a cached lookup,
# a module's attribute a dictionary lookup every time.
from .protocol import (
    DISCONNECT, ERR_BAD_REQUEST, ERR_NO_WORKER, ERR_OVERLOADED, ERR_TIMEOUT, ERR_TOO_LARGE,
    ERR_WORKER_LOST, HEARTBEAT, MMI_FOUND, MMI_NOT_FOUND, MMI_NOT_IMPLEMENTED,
    INFO, MMI_PING, MMI_PREFIX, MMI_SERVICE, MMI_STATS, PAUSE, READY, RESUME,
    REPLY, ClientMessage, Reply, Request, STATUS_OK, WorkerMessage, backend_command, backend_request,
    frontend_plain_reply, frontend_rejection, frontend_reply, frontend_worker_reply, job_size,
    parse_backend, parse_frontend, reply_frames_ok, BUCKETS,
    DIRECT, FREE, LEASE, LEASE_RETURN, LEASE_WANTED, REPORT, REVOKE_LEAVING,
    REVOKE_LOST, REVOKE_SHARE, DirectCounts, LeaseControl, backend_lease, is_lease_control,
    lease_busy, lease_grant, lease_revoke, parse_lease_control, PREFETCH_BELOW,
)

log = logging.getLogger("pyramid_powerhose.broker")

EXPIRY_INTERVAL = 0.05  # seconds between looks for expired jobs and workers
MAX_HEARTBEAT_INTERVAL = 2.5  # 7/MDP peers following the zguide expect one this often
PROBES = 4  # heartbeats sent 50 ms apart after a connection closed
PROBE_INTERVAL = 0.05
BUSY_POLL = 0.05  # seconds: how often the loop wakes while jobs wait or workers are probed

# A service with no worker and no job waiting is forgotten this long after
# its last use: clients may send any name, and each costs memory and stats.
SERVICE_TTL = 10.0  # seconds
SERVICE_SWEEP_INTERVAL = 1.0  # seconds between looks for such services


# The direct path (docs/direct_path.rst): a client process that holds or
# wants leases says so at least every second; one silent this long is
# forgotten and its leases end.  Its wish for more leases of a service
# lapses if not said again within WISH_TTL (it says it again every second
# while it stays above 0).
HOLDER_TTL = 3.0  # seconds
WISH_TTL = 2.5  # seconds
HOLDER_POLL = 1.0  # seconds: the longest the loop sleeps while holders are known


# The histograms' buckets are the protocol's (protocol.BUCKETS, imported
# above): leased workers report their direct jobs' run times by bucket.
RATE_WINDOW = 60  # seconds over which jobs/s is counted
NO_DEADLINE = float("inf")
# The same bounds, compiled: a C array (broker_core.pxd), compared without objects.
_BOUNDS = BUCKETS
_NBOUNDS = len(BUCKETS)
_WINDOW = RATE_WINDOW  # compiled, a C long: a job's count is C arithmetic


class Histogram:
    """Counts of durations by bucket, their sum and count: what an exporter
    needs to serve a Prometheus histogram, and percentiles can be read from."""

    __slots__ = ("counts", "total", "count")

    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: above every bound
        self.total = 0.0
        self.count = 0

    def observe(self, seconds):
        i = 0
        while i < _NBOUNDS and seconds > _BOUNDS[i]:
            i += 1
        self.counts[i] += 1
        self.total += seconds
        self.count += 1

    def add_counts(self, counts, total):
        """Durations already counted by bucket (a leased worker's report):
        ``counts`` per bucket, as :attr:`counts`, and their sum."""
        i = 0
        for n in counts:
            self.counts[i] += n
            self.count += n
            i += 1
        self.total += total

    def add_zeros(self, n):
        """``n`` durations of 0 (direct jobs, which never waited in the broker)."""
        self.counts[0] += n
        self.count += n

    def snapshot(self) -> dict:
        """Cumulative, as Prometheus has them: [[le, count of values <= le], ...]."""
        buckets = []
        running = 0
        for bound, count in zip(BUCKETS, self.counts):
            running += count
            buckets.append([bound, running])
        buckets.append(["+Inf", self.count])
        return {"buckets": buckets, "sum": round(self.total, 6), "count": self.count}


class Rate:
    """Events per second over the last RATE_WINDOW seconds, one counter a second."""

    __slots__ = ("slots", "second")

    def __init__(self, now):
        self.slots = [0] * RATE_WINDOW
        self.second = int(now)

    def _advance(self, second):
        if second - self.second >= RATE_WINDOW:
            self.slots = [0] * RATE_WINDOW
        else:
            for s in range(self.second + 1, second + 1):
                self.slots[s % RATE_WINDOW] = 0
        self.second = second

    def add(self, now):
        second = int(now)  # compiled, a C cast (broker_core.pxd)
        if second > self.second:
            self._advance(second)
        self.slots[second % _WINDOW] += 1

    def add_many(self, now, count):
        """``count`` events at once (direct jobs, reported together)."""
        second = int(now)  # compiled, a C cast (broker_core.pxd)
        if second > self.second:
            self._advance(second)
        self.slots[second % _WINDOW] += count

    def per_second(self, now) -> float:
        second = int(now)  # compiled, a C cast (broker_core.pxd)
        if second > self.second:
            self._advance(second)
        return sum(self.slots) / RATE_WINDOW


def _name(service: bytes) -> str:
    """A service name for a message: clients may send any bytes."""
    return service.decode("utf-8", "replace")


def _dropped(frames, sender, exc) -> list:
    """A malformed message is logged and dropped: nothing to send."""
    log.warning("dropped malformed message from a %s (%d frames): %s",
                sender, len(frames), exc)
    return []


def _rejected(frames, exc) -> list:
    """A client's malformed request: answered with ProtocolError at once when
    it can be (rather than left to the client's timeout), else dropped."""
    answer = frontend_rejection(frames, str(exc))
    if answer is None:
        return _dropped(frames, "client", exc)
    log.warning("refused a malformed request from a client (%d frames): %s",
                len(frames), exc)
    return [_send_record(answer, False, None, None)]


class Send:
    """One message to send: to a client (``worker`` is None) or to a worker.

    ``job`` is the job a REQUEST carries, so that a send that fails can put
    it back in its queue.
    """

    __slots__ = ("frames", "to_worker", "worker", "job")

    def __init__(self, frames, to_worker=False, worker=None, job=None):
        self.frames = frames
        self.to_worker = to_worker
        self.worker = worker
        self.job = job

    def __repr__(self):
        side = "worker" if self.to_worker else "client"
        return f"<Send to {side} {self.frames!r}>"


def _send_record(frames, to_worker, worker, job) -> Send:
    """A Send without a call to its constructor: compiled, a C function."""
    send: Send = Send.__new__(Send)
    send.frames = frames
    send.to_worker = to_worker
    send.worker = worker
    send.job = job
    return send


class PendingJob:
    """A client's request, queued or in flight.

    ``deadline`` is infinite for a job without one: compared as a plain
    number, compiled as a C double."""

    __slots__ = ("msg", "received", "deadline", "sent", "size")

    def __init__(self, msg, now, size=0):
        self._start(msg, now, size)

    def _start(self, msg, now, size):
        self.msg = msg
        self.received = now
        self.sent = now
        self.size = size  # bytes, as max_job_size and max_queue_bytes count them
        ttl = msg.request.ttl_ms
        self.deadline = now + ttl / 1000.0 if ttl else NO_DEADLINE

    def ttl_ms(self, now: float):
        if self.deadline == NO_DEADLINE:
            return 0
        return max(1, int((self.deadline - now) * 1000))


def _pending_job(msg, now, size) -> PendingJob:
    """A PendingJob without a call to its constructor: compiled, a C function."""
    job: PendingJob = PendingJob.__new__(PendingJob)
    job._start(msg, now, size)
    return job


class Holder:
    """A client process that holds or wants leases: its control DEALER's
    address on the frontend, when it was last heard (any PHL01 message),
    the leases it still wants by service name (``wanted``, each said at
    ``wished``), and the workers leased to it, being granted or ending."""

    __slots__ = ("address", "heard", "wanted", "wished", "leases", "gone")

    def __init__(self, address, now):
        self.address = address
        self.heard = now
        self.wanted = {}  # service name: leases it still wants (grants made count off)
        self.wished = {}  # service name: when it said so
        self.leases = []  # WorkerRefs whose holder it is, in the order granted
        self.gone = False  # forgotten: its leases end without a REVOKE


class WorkerRef:
    """What the broker knows of one connected worker.

    ``jobs`` are the jobs sent to it and not yet answered, oldest (running)
    first; ``credit`` is how many it accepts at once (1 for plain MDP).
    A list, not a deque: it holds a handful, and compiled, a list's
    operations are C calls where a deque's are Python method calls.

    The direct path: ``endpoint`` is what it announced (DIRECT), ``direct``
    whether it may be leased now.  While leased (``holder`` set; never
    with a relayed job, never in ``idle`` or ``spare``): ``epoch``,
    ``granting`` (LEASE sent, its answer awaited), ``ending`` (LEASE 0
    sent, its answer awaited), ``leaving`` (it said LEASE 0 first: it is
    going away; it stays set once the lease is over), ``free_since`` (idle
    since: its grant or its last FREE; None after a REPORT, which a worker
    sends when it starts a direct job after being idle), ``word`` (a reader
    of its busy word, busy_word.py, if it keeps one: then the word, not
    FREE and REPORT, says whether it is busy).
    """

    __slots__ = ("address", "service", "extended", "credit", "jobs", "expiry", "spare",
                 "vanished", "last_reply", "paused", "registered", "jobs_done", "last_job",
                 "about", "endpoint", "direct", "epoch", "holder", "granting", "ending",
                 "leaving", "free_since", "granted_at", "direct_jobs", "word")

    def __init__(self, address, service, extended, credit, expiry):
        self.address = address
        self.service = service
        self.extended = extended
        self.credit = credit
        self.jobs = []
        self.expiry = expiry
        self.spare = False  # listed in service.spare
        self.vanished = False  # a send to it failed: its connection is gone
        self.last_reply = 0.0
        self.paused = False  # running another broker's job: send it nothing
        self.registered = 0.0
        self.jobs_done = 0
        self.last_job = None  # seconds the last job ran
        self.about = b""  # pid@host, from its READY
        self.endpoint = b""  # its direct socket, from DIRECT
        self.direct = False  # announced DIRECT, extended, not leaving: may be leased
        self.epoch = 0
        self.holder = None  # the Holder it is leased to
        self.granting = False
        self.ending = False
        self.leaving = False
        self.free_since = None
        self.granted_at = 0.0
        self.direct_jobs = 0  # direct jobs it reported (FREE, REPORT)
        self.word = None


def _close_word(worker: WorkerRef):
    """Stop reading a worker's busy word (it announced another, or is gone)."""
    if worker.word is not None:
        worker.word.close()
        worker.word = None


class Service:
    """One service: its workers, the idle ones in LRU order, its queue.

    ``spare`` lists busy workers that accept one more job (credit > 1):
    they are used only when no worker is idle.  ``idle`` and ``spare`` are
    lists (see :class:`WorkerRef`); the queue, which may be long, a deque.
    """

    __slots__ = ("name", "workers", "idle", "spare", "queue", "queued_bytes", "done",
                 "failed", "job_time", "last_used", "without_workers_since", "outcomes",
                 "wait", "run", "total", "rate", "direct", "leased", "ending", "wishers",
                 "direct_seen")

    def __init__(self, name, now=0.0):
        self.name = name
        self.workers = set()
        self.idle = []  # first: idle the longest
        self.spare = []
        self.queue = deque()  # only through push, push_front, pop, keep and clear
        self.queued_bytes = 0
        self.done = 0
        self.failed = 0
        self.job_time = None  # moving average of job run times, seconds
        self.last_used = now
        self.without_workers_since = now  # when its last worker left (or it was made)
        self.outcomes = {}  # error code: jobs that failed so (those that did not: done)
        self.wait = Histogram()  # seconds from arrival to a worker
        self.run = Histogram()  # seconds on the worker
        self.total = Histogram()  # seconds from arrival to the result
        self.rate = Rate(now)  # jobs ended, per second
        # The direct path: jobs leased workers reported; workers leased (being
        # granted, granted or ending), of which ending and back to the pool
        # once they answer (revocations in progress); holders that want
        # leases of it; whether a worker of it ever announced DIRECT (its
        # stats show the direct path's fields from then on).
        self.direct = 0
        self.leased = 0
        self.ending = 0
        self.wishers = []
        self.direct_seen = False

    def ended(self, code, now):
        """A job ran on a worker: ``code`` is None if it succeeded."""
        if code is None:
            self.done += 1
        else:
            self.failed += 1
            self.outcomes[code] = self.outcomes.get(code, 0) + 1
        self.rate.add(now)

    def push(self, job: PendingJob):
        self.queue.append(job)
        self.queued_bytes += job.size

    def push_front(self, jobs):
        """Jobs back at the head of the queue, in their order."""
        self.queue.extendleft(reversed(jobs))
        for job in jobs:
            self.queued_bytes += job.size

    def pop(self) -> PendingJob:
        job: PendingJob = self.queue.popleft()
        self.queued_bytes -= job.size
        return job

    def keep(self, jobs):
        """The queue becomes ``jobs`` (those of it still waiting)."""
        self.queue = deque(jobs)
        self.queued_bytes = 0
        for job in jobs:
            self.queued_bytes += job.size

    def clear(self):
        self.queue.clear()
        self.queued_bytes = 0

    def ran(self, seconds):
        average = self.job_time
        self.job_time = seconds if average is None else average + 0.2 * (seconds - average)

    def capacity(self, worker: WorkerRef):
        """Jobs ``worker`` may hold now: its credit when jobs are short, else 1."""
        if self.job_time is not None and self.job_time < PREFETCH_BELOW:
            return worker.credit
        return 1


class BrokerCore:
    """Every decision of the broker; the caller owns the sockets and the clock.

    ``settings`` gives heartbeat, liveness, max_job_size,
    no_worker_timeout and grace, and the resolved frontend and backend
    (named in messages and stats).  ``pid`` is what ``mmi.ping`` answers.
    ``open_busy_word(path)`` returns a reader of a worker's busy word, or
    None (busy_word.open_reader; the core itself opens no file).
    """

    def __init__(self, settings, now, pid=0, engine="", open_busy_word=None):
        self.settings = settings
        self.pid = pid
        self.engine = engine  # named in the stats: "compiled" or "pure Python"
        # Workers that registered, and how each one went: said DISCONNECT,
        # connection closed without a word, missed its heartbeats.
        self.counters = {"registered": 0, "left": 0, "lost": 0, "expired": 0}
        self.started = now
        self.services: dict[bytes, Service] = {}
        self.workers: dict[bytes, WorkerRef] = {}
        self.heartbeat = settings.heartbeat
        self.liveness = settings.heartbeat * settings.liveness
        self.stopping_since = None
        self.vanished: list[WorkerRef] = []  # sends to them failed; bury_vanished() decides
        self._probes_left = 0
        self._next_heartbeat = now
        self._next_expiry = now
        self._plain_ids = itertools.count(1)
        self._out: list[Send] = []
        self._max_job_size = settings.max_job_size
        self._max_queue = settings.max_queue
        self._max_queue_bytes = settings.max_queue_bytes
        self._queued: set[Service] = set()  # services that may have jobs waiting
        self._next_sweep = now + SERVICE_SWEEP_INTERVAL
        # The direct path: client processes holding or wanting leases, by
        # address; leases by epoch; the next epoch (random, so that a broker
        # that restarts does not hand out its predecessor's epochs again).
        self.holders: dict[bytes, Holder] = {}
        self._leases: dict[int, WorkerRef] = {}
        self._next_epoch = secrets.randbits(40) + 1
        self._open_busy_word = open_busy_word

    def _take(self) -> list[Send]:
        out, self._out = self._out, []
        return out

    def _to_client(self, frames):
        self._out.append(_send_record(frames, False, None, None))

    def _to_worker(self, frames, worker=None, job=None):
        self._out.append(_send_record(frames, True, worker, job))

    # -- queries --------------------------------------------------------------------

    def poll_timeout(self) -> int:
        """Milliseconds the loop may sleep before the next tick is due."""
        if self._probes_left or self.stopping_since is not None or self._queued:
            return int(BUSY_POLL * 1000)
        if self.holders and self.heartbeat > HOLDER_POLL:
            return int(HOLDER_POLL * 1000)  # holders go silent: forget them in time
        return int(self.heartbeat * 1000)

    def drained(self) -> bool:
        """Stopping, and every accepted job settled: the loop may end."""
        if self.stopping_since is None:
            return False
        for worker in self.workers.values():
            if worker.jobs:
                return False
        for svc in self._queued:
            if svc.queue:
                return False
        return True

    def stats(self, now) -> dict:
        services = {}
        for svc in self.services.values():
            busy = 0
            for address in svc.workers:
                worker: WorkerRef = self.workers[address]
                # paused: busy with another broker; leased: busy while it
                # runs a direct job, as its busy word or its REPORT and FREE
                # say (not while its lease is being granted: it runs nothing)
                if worker.jobs or worker.paused or (worker.holder is not None and
                                                    not worker.granting and
                                                    self._idle_since(worker) is None):
                    busy += 1
            services[_name(svc.name)] = {
                "workers": len(svc.workers),
                "idle": len(svc.workers) - busy,
                "busy": busy,
                "queued": len(svc.queue),
                "queued_bytes": svc.queued_bytes,
                "done": svc.done,
                "failed": svc.failed,
                "job_ms": None if svc.job_time is None else round(svc.job_time * 1000, 3),
                "outcomes": {**({"OK": svc.done} if svc.done else {}), **svc.outcomes},
                "jobs_per_second": round(svc.rate.per_second(now), 3),
                "wait_seconds": svc.wait.snapshot(),
                "run_seconds": svc.run.snapshot(),
                "total_seconds": svc.total.snapshot(),
            }
            if svc.direct_seen:  # only once a worker of it announced DIRECT
                services[_name(svc.name)].update(direct=svc.direct, leased=svc.leased)
        workers = []
        for worker in self.workers.values():
            pid, _, host = worker.about.decode("utf-8", "replace").partition("@")
            workers.append({
                "address": worker.address.hex(),
                "pid": int(pid) if pid.isdigit() else None,
                "host": host or None,
                "service": _name(worker.service.name),
                "extended": worker.extended,
                "credit": worker.credit,
                "holding": len(worker.jobs),
                "paused": worker.paused,
                "jobs": worker.jobs_done,
                "age": round(now - worker.registered, 3),
                "last_job_ms": None if worker.last_job is None else round(
                    worker.last_job * 1000, 3),
            })
            if worker.endpoint:  # only for a worker that announced DIRECT
                holder: Holder = worker.holder
                workers[-1].update(
                    leased_to=None if holder is None else holder.address.hex(),
                    direct_jobs=worker.direct_jobs)
        return {
            "pid": self.pid,
            "engine": self.engine,
            "uptime": round(now - self.started, 3),
            "frontend": self.settings.frontend,
            "backend": self.settings.backend,
            "stopping": self.stopping_since is not None,
            "services": services,
            "workers": workers,
            "worker_events": dict(self.counters),
        }

    # -- events: clients ----------------------------------------------------------------

    def client_message(self, frames, now) -> list[Send]:
        """A message from the frontend: a job, an 8/MMI query, or a client
        process's lease control (PHL01)."""
        msg: ClientMessage
        if is_lease_control(frames):
            return self._lease_control(frames, now)
        try:
            msg = parse_frontend(frames)
        except ProtocolError as exc:
            return _rejected(frames, exc)
        req: Request = msg.request
        service = req.service
        if service.startswith(MMI_PREFIX):
            self._to_client(frontend_plain_reply(msg, [self.mmi(msg, now)]))
            return self._take()
        if self.stopping_since is not None:
            self._fail(msg, ERR_NO_WORKER,
                       f"broker at {self.settings.frontend} is shutting down; retry shortly")
            return self._take()
        size = job_size(req)
        if size > self._max_job_size:
            self._fail(msg, ERR_TOO_LARGE,
                       f"job of {size} bytes is larger than the broker's "
                       f"max job size ({self.settings.max_job_size} bytes)")
            return self._take()
        if not msg.extended:
            req.job_id = b"mdp-%d" % next(self._plain_ids)
        svc: Service = self._service(service, now)
        job: PendingJob = _pending_job(msg, now, size)
        if svc.queue or not self._dispatch(svc, job, now):
            if len(svc.queue) >= self._max_queue or \
                    svc.queued_bytes + size > self._max_queue_bytes:
                self._fail(msg, ERR_OVERLOADED,
                           f"the queue for {_name(service)!r} is full ({len(svc.queue)} jobs, "
                           f"{svc.queued_bytes} bytes; max queue {self._max_queue} jobs, "
                           f"{self._max_queue_bytes} bytes): retry later or add workers")
            else:
                svc.push(job)
                self._queued.add(svc)
                if svc.leased:  # leased workers may have to come back for it
                    self._reclaim(svc)
        return self._take()

    def _service(self, name, now) -> Service:
        """The service ``name``, created on first use; its use is noted."""
        svc: Service = self.services.get(name)
        if svc is None:
            svc = self.services[name] = Service(name, now)
        svc.last_used = now
        return svc

    def mmi(self, msg, now) -> bytes:
        service = msg.request.service
        if service == MMI_SERVICE:
            svc = self.services.get(msg.request.data)
            found = svc is not None and bool(svc.workers)
            return MMI_FOUND if found else MMI_NOT_FOUND
        if service == MMI_PING:
            return str(self.pid).encode()
        if service == MMI_STATS:
            return json.dumps(self.stats(now)).encode()
        return MMI_NOT_IMPLEMENTED

    def _fail(self, msg, code, message, worker=b""):
        """Fail a job; ``worker``: the pid@host of the worker that held it, if any,
        for a client that asked."""
        reply = Reply.error(msg.request.job_id, code, message)
        self._to_client(frontend_reply(msg, reply, worker))
        svc: Service = self.services.get(msg.request.service)
        if svc is not None:
            svc.failed += 1
            svc.outcomes[code] = svc.outcomes.get(code, 0) + 1
        log.info("job %r for %r failed: %s: %s",
                 msg.request.job_id, msg.request.service, code, message)

    # -- events: workers ----------------------------------------------------------------

    def worker_message(self, frames, now) -> list[Send]:
        """A message from the backend: READY, REPLY, HEARTBEAT or DISCONNECT."""
        msg: WorkerMessage
        try:
            msg = parse_backend(frames)
        except ProtocolError as exc:
            return _dropped(frames, "worker", exc)
        worker: WorkerRef = self.workers.get(msg.address)
        command = msg.command
        if command == REPLY:
            if worker is None:
                self._disconnect(msg.address)
            else:
                worker.expiry = now + self.liveness
                self._reply(worker, msg, now)
        elif command == HEARTBEAT:
            if worker is None:
                # MDP: a valid but unexpected command gets DISCONNECT; this is
                # how workers of a previous broker learn to register again.
                self._disconnect(msg.address)
            else:
                worker.expiry = now + self.liveness
        elif command == READY:
            if worker is not None:  # MDP: a worker MUST NOT send a further READY
                self._delete_worker(worker, now)
                self._disconnect(msg.address)
            elif msg.service.startswith(MMI_PREFIX):
                self._disconnect(msg.address)
            else:
                self._register(msg, now)
        elif command == DISCONNECT:
            if worker is not None:
                self.counters["left"] += 1
                self._delete_worker(worker, now, requeue=worker.extended)
        elif command == INFO:
            if worker is not None:  # else: sent before a restart of ours; nothing to note
                worker.about = msg.about
        elif command == PAUSE or command == RESUME:
            if worker is None or not worker.extended:
                self._disconnect(msg.address)  # unexpected: as for HEARTBEAT
            else:
                worker.expiry = now + self.liveness
                self._pause(worker, command == PAUSE, now)
        elif worker is None:
            # DIRECT, LEASE, FREE, REPORT from a worker we do not know (it
            # registered with a broker before us): its heartbeats will get it
            # a DISCONNECT, and it registers again.
            log.debug("dropped %r from unknown worker %s", command, msg.address.hex())
        elif command == FREE or command == REPORT:
            worker.expiry = now + self.liveness
            self._direct_counts(worker, msg, now)
        elif command == LEASE:
            worker.expiry = now + self.liveness
            self._worker_lease(worker, msg, now)
        elif command == DIRECT:
            worker.expiry = now + self.liveness
            self._worker_direct(worker, msg, now)
        return self._take()

    def _pause(self, worker: WorkerRef, paused, now):
        """A worker busy elsewhere gets no job until it resumes; jobs it
        already holds stay its own."""
        if worker.paused == paused or worker.holder is not None or worker.leaving:
            return  # a leased worker has one broker, and a leaving one is going
        worker.paused = paused
        if paused:
            try:
                worker.service.idle.remove(worker)
            except ValueError:
                pass
        elif not worker.jobs:
            self._worker_ready(worker, now)
        else:
            self._list_spare(worker)

    def _register(self, msg, now):
        svc: Service = self._service(msg.service, now)
        worker = WorkerRef(msg.address, svc, msg.extended, msg.credit, now + self.liveness)
        worker.registered = now
        self.workers[msg.address] = worker
        svc.workers.add(msg.address)
        self.counters["registered"] += 1
        log.info("worker %s registered for %r (%s, credit %d)", msg.address.hex(),
                 msg.service, "powerhose" if msg.extended else "plain MDP", msg.credit)
        self._worker_ready(worker, now)
        if not worker.jobs:
            # Answer at once: a worker that connected late in its liveness
            # window would otherwise give up on us before our next heartbeat
            # and leave a registration behind that has no socket.
            self._to_worker(backend_command(worker.address, HEARTBEAT), worker)

    def _reply(self, worker: WorkerRef, msg, now: float):
        job: PendingJob = worker.jobs[0] if worker.jobs else None
        if job is None or msg.client != job.msg.address:
            # 7/MDP: a valid but unexpected command costs the worker its place.
            log.warning("worker %s replied to a job it does not hold; disconnected",
                        msg.address.hex())
            self._delete_worker(worker, now)
            self._disconnect(worker.address)
            return
        # A worker runs its jobs in the order it got them: this is the oldest.
        del worker.jobs[0]  # compiled: list.pop(0) would be a Python method call
        client: ClientMessage = job.msg
        svc: Service = worker.service
        ran = now - max(job.sent, worker.last_reply)
        svc.ran(ran)
        svc.run.observe(ran)
        svc.total.observe(now - job.received)
        worker.last_reply = now
        worker.last_job = ran
        worker.jobs_done += 1
        if worker.extended:
            body = msg.body
            if not reply_frames_ok(body) or body[0] != client.request.job_id:
                self._fail(client, ERR_BAD_REQUEST,
                           f"worker {worker.address.hex()} sent a malformed reply",
                           worker.about)
                self._delete_worker(worker, now)
                self._disconnect(worker.address)
                return
            if body[1] == STATUS_OK:
                svc.ended(None, now)
            else:
                svc.ended(body[2].decode("utf-8", "replace"), now)
            self._to_client(frontend_worker_reply(client, body, worker.about))
        else:
            svc.ended(None, now)
            self._to_client(frontend_plain_reply(client, msg.body, worker.about))
        self._worker_ready(worker, now)

    def _worker_ready(self, worker: WorkerRef, now: float):
        """A worker has room: give it the oldest live jobs, or put it in line."""
        if worker.vanished or worker.paused:
            return
        svc: Service = worker.service
        queue = svc.queue
        room = svc.capacity(worker)
        while queue and len(worker.jobs) < room:
            job: PendingJob = svc.pop()
            if job.deadline <= now:
                self._fail(job.msg, ERR_TIMEOUT, self._timeout_message(job, now))
            else:
                self._send_job(worker, job, now)
        if not queue:
            self._queued.discard(svc)
        if not worker.jobs:
            svc.idle.append(worker)
            if svc.wishers:  # client processes want leases of it
                self._grant_idle(svc, now)
        else:
            self._list_spare(worker)

    def _dispatch(self, svc: Service, job: PendingJob, now: float) -> bool:
        """Send a new job to the LRU idle worker, else to a busy one with credit left."""
        idle = svc.idle
        worker: WorkerRef
        if idle:
            worker = idle[0]
            del idle[0]
            self._send_job(worker, job, now)
            self._list_spare(worker)
            return True
        spare = svc.spare
        while spare:
            worker = spare[0]
            del spare[0]
            worker.spare = False
            if worker.vanished or worker.paused or \
                    self.workers.get(worker.address) is not worker or \
                    not 0 < len(worker.jobs) < svc.capacity(worker):
                continue  # went idle or away since it was listed, or jobs got long
            self._send_job(worker, job, now)
            self._list_spare(worker)
            return True
        return False

    def _list_spare(self, worker: WorkerRef):
        svc: Service = worker.service
        if len(worker.jobs) < svc.capacity(worker) and not worker.spare:
            worker.spare = True
            svc.spare.append(worker)

    def _send_job(self, worker: WorkerRef, job: PendingJob, now: float):
        req: Request = job.msg.request
        svc: Service = worker.service
        svc.wait.observe(now - job.received)
        job.sent = now
        if job.deadline != NO_DEADLINE:
            req.ttl_ms = job.ttl_ms(now)
        worker.jobs.append(job)
        self._to_worker(backend_request(
            worker.address, job.msg.address, req, worker.extended, job.msg.body), worker, job)

    def _disconnect(self, address):
        self._to_worker(backend_command(address, DISCONNECT))

    # -- the direct path: leases (docs/direct_path.rst) ------------------------------------

    def _lease_control(self, frames, now) -> list[Send]:
        """PHL01 from a client process's control socket: LEASE (it wants
        leases), RETURN (nothing of it is in flight on a lease any more),
        HEARTBEAT.  Malformed ones are logged and dropped."""
        msg: LeaseControl
        try:
            msg = parse_lease_control(frames)
        except ProtocolError as exc:
            return _dropped(frames, "client's lease control", exc)
        holder: Holder = self.holders.get(msg.address)
        if holder is None:
            holder = self.holders[msg.address] = Holder(msg.address, now)
        holder.heard = now
        command = msg.command
        if command == LEASE_WANTED:
            if not msg.service.startswith(MMI_PREFIX) and self.stopping_since is None:
                self._wish(holder, self._service(msg.service, now), msg.wanted, now)
        elif command == LEASE_RETURN:
            self._lease_returned(holder, msg)
        return self._take()

    def _wish(self, holder: Holder, svc: Service, wanted, now):
        """A holder wants ``wanted`` more leases of ``svc`` (those it is being
        granted count off): :meth:`_answer`."""
        granting = 0
        worker: WorkerRef
        for worker in holder.leases:
            if worker.granting and worker.service is svc:
                granting += 1
        self._set_wish(holder, svc, wanted - granting, now)
        self._answer(holder, svc, now)

    def _answer(self, holder: Holder, svc: Service, now):
        """What ``holder`` wants of ``svc`` (its wish, or a grant that fell
        through): from the idle workers first, then by revoking leases of
        holders beyond their share; BUSY for what neither covers now (its
        jobs then join the leases it holds, or go relayed, rather than wait
        for a grant)."""
        if not svc.wishers:
            return
        self._grant_idle(svc, now)
        outstanding = holder.wanted.get(svc.name, 0)
        if not outstanding:
            return
        need = min(outstanding, self._share(svc) - self._held(holder, svc))
        # Workers ending their leases come back to the pool: the queue takes
        # them first, then the holders that want leases.
        while need > svc.ending - len(svc.queue):
            victim = self._victim(svc, holder)
            if victim is None:
                break
            self._revoke(victim, REVOKE_SHARE)
        if outstanding > svc.ending - len(svc.queue):
            self._to_client(lease_busy(holder.address, svc.name))

    def _set_wish(self, holder: Holder, svc: Service, wanted, now):
        name = svc.name
        if wanted > 0:
            if holder not in svc.wishers:
                svc.wishers.append(holder)
            holder.wanted[name] = wanted
            holder.wished[name] = now
        elif name in holder.wanted:
            del holder.wanted[name]
            del holder.wished[name]
            try:
                svc.wishers.remove(holder)
            except ValueError:
                pass

    def _grant_idle(self, svc: Service, now):
        """Idle workers that may be leased go to the holders that want leases
        of ``svc``, from the head of the idle list (LRU); each to the holder
        holding the fewest leases of it."""
        if self.stopping_since is not None:
            return
        idle = svc.idle
        wishers = svc.wishers
        worker: WorkerRef
        holder: Holder
        i = 0
        while wishers and i < len(idle):
            worker = idle[i]
            if not worker.direct:
                i += 1
                continue
            holder = wishers[0]
            if len(wishers) > 1:
                fewest = self._held(holder, svc)
                for other in wishers:
                    held = self._held(other, svc)
                    if held < fewest:
                        holder, fewest = other, held
            del idle[i]
            self._grant(worker, holder, now)

    def _grant(self, worker: WorkerRef, holder: Holder, now):
        """Offer ``worker`` a lease for ``holder``: the GRANT goes to the
        holder once the worker has answered."""
        svc: Service = worker.service
        epoch = self._next_epoch
        self._next_epoch += 1
        worker.holder = holder
        worker.epoch = epoch
        worker.granting = True
        worker.ending = False
        worker.free_since = None
        worker.granted_at = now
        holder.leases.append(worker)
        self._leases[epoch] = worker
        svc.leased += 1
        self._set_wish(holder, svc, holder.wanted.get(svc.name, 0) - 1, now)
        log.debug("leasing worker %s of %r to %s, epoch %d", worker.address.hex(), svc.name,
                  holder.address.hex(), epoch)
        self._to_worker(backend_lease(worker.address, epoch), worker)

    def _held(self, holder: Holder, svc: Service) -> int:
        """Leases of ``svc`` the holder has or is being granted, not ending."""
        held = 0
        worker: WorkerRef
        for worker in holder.leases:
            if worker.service is svc and not worker.ending and not worker.leaving:
                held += 1
        return held

    def _share(self, svc: Service) -> int:
        """Leases of ``svc`` each holder may keep when others want some: its
        workers that may be leased (or are), divided among the holders that
        want leases of it or hold some, rounded up."""
        workers = 0
        worker: WorkerRef
        for address in svc.workers:
            worker = self.workers[address]
            if worker.direct or (worker.holder is not None and not worker.leaving):
                workers += 1
        holders = 0
        holder: Holder
        for holder in self.holders.values():
            if svc.name in holder.wanted or self._held(holder, svc):
                holders += 1
        return -(-workers // holders) if holders else workers

    def _victim(self, svc: Service, taker, idle_only=False) -> WorkerRef:
        """The lease of ``svc`` to revoke: the one FREE the longest, else
        (unless ``idle_only``) the oldest of the holder holding the most
        beyond its share.  For ``taker`` (a holder below its share), only
        another holder's lease, and only from a holder beyond its share;
        for jobs waiting in the queue (``taker`` None), any."""
        share = self._share(svc)
        free: WorkerRef = None
        free_since = 0.0
        over: WorkerRef = None
        over_by = 0
        holder: Holder
        worker: WorkerRef
        for holder in self.holders.values():
            if holder is taker:
                continue
            beyond = self._held(holder, svc) - share
            if taker is not None and beyond <= 0:
                continue
            oldest: WorkerRef = None
            for worker in holder.leases:
                if worker.service is not svc or worker.granting or worker.ending or \
                        worker.leaving:
                    continue
                since = self._idle_since(worker)
                if since is not None and (free is None or since < free_since):
                    free, free_since = worker, since
                if oldest is None or worker.granted_at < oldest.granted_at:
                    oldest = worker
            if oldest is not None and (over is None or beyond > over_by or (
                    beyond == over_by and oldest.granted_at < over.granted_at)):
                over, over_by = oldest, beyond
        return free if free is not None or idle_only else over

    def _idle_since(self, worker: WorkerRef):
        """When a leased worker fell idle, or None if it is busy: its busy word
        says so if it keeps one (never before its lease began); else its
        last FREE or REPORT."""
        word = worker.word
        if word is None:
            return worker.free_since
        value = word.read()
        if value == WORD_BUSY:
            return None
        since = value / 1e9
        return since if since > worker.granted_at else worker.granted_at

    def _ending_soon(self, svc: Service) -> int:
        """Leases of ``svc`` ending whose worker is idle: back in the pool as
        soon as it answers, where a busy one is back when its job ends."""
        count = 0
        worker: WorkerRef
        for address in svc.workers:
            worker = self.workers[address]
            if worker.ending and self._idle_since(worker) is not None:
                count += 1
        return count

    def _reclaim(self, svc: Service):
        """Jobs wait in the queue of ``svc`` and no idle worker takes them:
        end leases, one per waiting job not already covered by a lease
        ending."""
        while len(svc.queue) > svc.ending:
            victim = self._victim(svc, None)
            if victim is None:
                return
            self._revoke(victim, REVOKE_SHARE)
        # A busy lease ending is back only when its job ends: a job counted
        # against one takes an idle lease instead, if there is one.
        while len(svc.queue) > self._ending_soon(svc):
            victim = self._victim(svc, None, True)
            if victim is None:
                return
            self._revoke(victim, REVOKE_SHARE)

    def _revoke(self, worker: WorkerRef, reason):
        holder: Holder = worker.holder
        log.debug("revoking lease %d of worker %s (%s)", worker.epoch, worker.address.hex(),
                  reason)
        self._to_client(lease_revoke(holder.address, worker.service.name, worker.epoch,
                                     reason))
        self._end(worker)

    def _end(self, worker: WorkerRef):
        """LEASE 0 to a leased worker; its lease is over once it answers."""
        worker.ending = True
        if not worker.leaving:
            svc: Service = worker.service
            svc.ending += 1
        self._to_worker(backend_lease(worker.address, 0), worker)

    def _unlease(self, worker: WorkerRef):
        """The lease is over (the worker answered, or it is gone)."""
        holder: Holder = worker.holder
        svc: Service = worker.service
        try:
            holder.leases.remove(worker)
        except ValueError:
            pass
        self._leases.pop(worker.epoch, None)
        svc.leased -= 1
        if worker.ending and not worker.leaving:
            svc.ending -= 1
        worker.holder = None
        worker.epoch = 0
        worker.granting = False
        worker.ending = False
        worker.free_since = None

    def _worker_direct(self, worker: WorkerRef, msg, now):
        """DIRECT: where the worker takes direct jobs; an extended worker may
        be leased from now on."""
        if not worker.extended or worker.leaving:
            log.debug("ignored DIRECT from worker %s", worker.address.hex())
            return
        svc: Service = worker.service
        worker.endpoint = msg.endpoint
        worker.direct = True
        svc.direct_seen = True
        _close_word(worker)
        path = busy_word_path(msg.endpoint[6:].decode("utf-8", "replace"))  # after ipc://
        if self._open_busy_word is not None and path is not None:
            worker.word = self._open_busy_word(path)
        if svc.wishers and worker.holder is None and not worker.jobs and not worker.paused \
                and not worker.vanished:
            self._grant_idle(svc, now)

    def _worker_lease(self, worker: WorkerRef, msg, now):
        """A worker's LEASE: the answer to ours (the epoch it now serves, 0 for
        none), or, unasked and with 0, the news that it is leaving."""
        epoch = msg.epoch
        holder: Holder = worker.holder
        svc: Service = worker.service
        if holder is None:
            log.debug("worker %s answered LEASE %d for no lease", worker.address.hex(),
                      epoch)
            return
        if msg.held:
            log.warning("worker %s holds %d direct jobs at the end of a lease",
                        worker.address.hex(), msg.held)
        if worker.granting:
            if epoch == worker.epoch:
                worker.granting = False
                if holder.gone or self.stopping_since is not None or \
                        (svc.queue and len(svc.queue) > self._ending_soon(svc)):
                    # Its holder is gone, we are stopping, or relayed jobs
                    # came first and no idle lease that is ending will take
                    # them (a busy one, revoked for them while this grant
                    # was in flight, comes back only when its job ends):
                    # the holder never learns of this lease, and if it
                    # waits for one, waits no longer.
                    if not holder.gone and self.stopping_since is None:
                        self._set_wish(holder, svc, holder.wanted.get(svc.name, 0) + 1, now)
                        self._to_client(lease_busy(holder.address, svc.name))
                    self._end(worker)
                else:
                    # Idle until it says otherwise (REPORT when it starts a
                    # direct job after being idle): a fresh lease is the first
                    # to revoke for a job that waits.
                    worker.free_since = now
                    self._to_client(lease_grant(holder.address, svc.name, epoch,
                                                worker.endpoint, worker.credit,
                                                worker.about, self._max_job_size))
            elif epoch == 0:
                # It declined (it is leaving, most likely): not offered again
                # until it announces DIRECT again.  The holder's wish stands,
                # and is answered again (another worker, or BUSY).
                log.info("worker %s declined a lease", worker.address.hex())
                worker.direct = False
                if not holder.gone:
                    self._set_wish(holder, svc, holder.wanted.get(svc.name, 0) + 1, now)
                self._unlease(worker)
                self._worker_ready(worker, now)
                if not holder.gone:
                    self._answer(holder, svc, now)
            else:
                log.debug("worker %s answered a stale LEASE %d", worker.address.hex(), epoch)
            return
        if epoch:
            log.debug("worker %s answered LEASE %d, serving %d", worker.address.hex(), epoch,
                      worker.epoch)
        elif worker.ending:
            leaving = worker.leaving
            self._unlease(worker)
            if not leaving:
                self._worker_ready(worker, now)  # the queue first, then the wishes
        elif not worker.leaving:
            # Unasked: it is leaving.  Its holder stops choosing it and says
            # RETURN once nothing of it is in flight on it; then LEASE 0.
            worker.leaving = True
            worker.direct = False
            if holder.gone:
                self._end(worker)
            else:
                self._to_client(lease_revoke(holder.address, svc.name, worker.epoch,
                                             REVOKE_LEAVING))

    def _lease_returned(self, holder: Holder, msg):
        """RETURN: only a leaving worker waits for it (then LEASE 0)."""
        worker: WorkerRef = self._leases.get(msg.epoch)
        if worker is None or worker.holder is not holder or \
                worker.service.name != msg.service:
            log.debug("RETURN of unknown lease %d from %s", msg.epoch, holder.address.hex())
        elif worker.leaving and not worker.ending:
            self._end(worker)

    def _direct_counts(self, worker: WorkerRef, msg, now):
        """FREE or REPORT: the direct jobs a leased worker ran since it last
        said, counted as relayed jobs are; those that ran waited 0 s in the
        broker, which never held them."""
        counts: DirectCounts = msg.counts
        svc: Service = worker.service
        failed = 0
        for code, count in counts.outcomes.items():
            failed += count
            svc.outcomes[code] = svc.outcomes.get(code, 0) + count
        jobs = counts.done + failed
        svc.done += counts.done
        svc.failed += failed
        ran = 0
        for count in counts.buckets:
            ran += count
        svc.run.add_counts(counts.buckets, counts.run_sum)
        svc.total.add_counts(counts.buckets, counts.run_sum)
        svc.wait.add_zeros(ran)
        if ran:
            svc.ran(counts.run_sum / ran)  # one step of the average: their mean
        if jobs:
            svc.rate.add_many(now, jobs)
        svc.direct += jobs
        svc.direct_seen = True
        worker.jobs_done += jobs
        worker.direct_jobs += jobs
        if worker.holder is not None and not worker.granting:
            worker.free_since = now if msg.command == FREE else None

    def _lease_lost(self, worker: WorkerRef) -> Holder:
        """A leased worker is gone (died, expired, vanished, left, registered
        again): its holder fails what it has in flight on it.  The holder
        whose wish it was being granted for, which then stands again (the
        caller answers it once the worker is forgotten), or None."""
        holder: Holder = worker.holder
        svc: Service = worker.service
        wishing: Holder = None
        if not holder.gone and not (worker.leaving and worker.ending):
            # (A leaving worker sent LEASE 0 after RETURN: nothing is in flight.)
            self._to_client(lease_revoke(holder.address, svc.name, worker.epoch,
                                         REVOKE_LOST))
            if worker.granting and self.stopping_since is None:
                self._set_wish(holder, svc, holder.wanted.get(svc.name, 0) + 1,
                               holder.heard)
                wishing = holder
        self._unlease(worker)
        return wishing

    def _expire_holders(self, now):
        """Forget holders silent for HOLDER_TTL (their leases end, without a
        REVOKE), and wishes not said again within WISH_TTL."""
        holder: Holder
        worker: WorkerRef
        for holder in list(self.holders.values()):
            if now - holder.heard >= HOLDER_TTL:
                log.info("client process %s silent for %.1fs: its %d leases end",
                         holder.address.hex(), now - holder.heard, len(holder.leases))
                del self.holders[holder.address]
                holder.gone = True
                self._drop_wishes(holder)
                for worker in list(holder.leases):
                    if not worker.granting and not worker.ending:
                        self._end(worker)
                continue
            for name, wished in list(holder.wished.items()):
                if now - wished >= WISH_TTL:
                    svc: Service = self.services.get(name)
                    if svc is None:
                        del holder.wanted[name]
                        del holder.wished[name]
                    else:
                        self._set_wish(holder, svc, 0, now)

    def _drop_wishes(self, holder: Holder):
        for name in holder.wanted:
            svc: Service = self.services.get(name)
            if svc is not None:
                try:
                    svc.wishers.remove(holder)
                except ValueError:
                    pass
        holder.wanted.clear()
        holder.wished.clear()

    def _end_all_leases(self):
        """Stopping: every lease ends (the holders are told the workers leave)
        and nobody wants one any more."""
        holder: Holder
        worker: WorkerRef
        for holder in self.holders.values():
            self._drop_wishes(holder)
            for worker in list(holder.leases):
                if worker.granting or worker.ending or worker.leaving:
                    continue  # ended at its answer; ending; waiting for RETURN
                self._to_client(lease_revoke(holder.address, worker.service.name,
                                             worker.epoch, REVOKE_LEAVING))
                self._end(worker)

    # -- events: sends that failed ------------------------------------------------------

    def undelivered(self, sends, now) -> list[Send]:
        """Sends to workers whose connection is gone (``ROUTER_MANDATORY``).

        Such a worker gets nothing more; the jobs those sends carried go
        back to the head of their queue, in order, for another worker.
        What happens to the jobs it did receive is decided once everything
        it sent has been read (:meth:`bury_vanished`).
        """
        requeue: dict[Service, list] = {}
        for send in sends:
            worker = send.worker
            if worker is None:
                continue  # a DISCONNECT to a peer we do not know: nothing to do
            if send.job is not None:
                try:
                    worker.jobs.remove(send.job)
                except ValueError:
                    pass
                else:
                    requeue.setdefault(worker.service, []).append(send.job)
            if not worker.vanished and self.workers.get(worker.address) is worker:
                log.debug("worker %s unreachable: its connection is gone",
                          worker.address.hex())
                worker.vanished = True
                try:
                    worker.service.idle.remove(worker)
                except ValueError:
                    pass
                self.vanished.append(worker)
        for svc, jobs in requeue.items():
            svc.push_front(jobs)
            self._queued.add(svc)
            self._serve_queue(svc, now)
        return self._take()

    def bury_vanished(self, now) -> list[Send]:
        """Forget workers whose connection closed, once their last words are read.

        libzmq drops a closed peer's route before the application has read
        what that peer sent: a worker that left cleanly has a DISCONNECT
        waiting (its prefetched jobs are requeued); one that died has not
        (its jobs fail with WorkerLostError).  Call this after reading
        everything waiting on the backend.
        """
        vanished, self.vanished = self.vanished, []
        for worker in vanished:
            if self.workers.get(worker.address) is worker:
                log.warning("worker %s is gone without a word: its connection closed",
                            worker.address.hex())
                self.counters["lost"] += 1
                self._delete_worker(worker, now)
        return self._take()

    def connection_closed(self, now) -> list[Send]:
        """A backend connection closed: find out whose, by probing.

        With ``ROUTER_MANDATORY`` a send to a vanished peer fails; probe
        now and for a few ticks while libzmq finishes tearing the pipe down.
        """
        self._probes_left = PROBES
        self._send_heartbeats()
        self._next_heartbeat = now + PROBE_INTERVAL
        return self._take()

    # -- events: the clock -------------------------------------------------------------

    def tick(self, now) -> list[Send]:
        """Expire what is dead, send heartbeats that are due, end the grace period."""
        if now < self._next_expiry and now < self._next_heartbeat and \
                self.stopping_since is None:
            return []  # most turns of the loop: nothing is due
        if now >= self._next_expiry:
            self._expire_jobs(now)
            self._expire_workers(now)
            if self.holders:
                self._expire_holders(now)
            self._next_expiry = now + EXPIRY_INTERVAL
            if now >= self._next_sweep:
                self._forget_idle_services(now)
                self._next_sweep = now + SERVICE_SWEEP_INTERVAL
        if now >= self._next_heartbeat:
            self._send_heartbeats()
            if self._probes_left:
                self._next_heartbeat = now + PROBE_INTERVAL
            else:
                self._next_heartbeat = now + min(self.heartbeat, MAX_HEARTBEAT_INTERVAL)
        if self.stopping_since is not None and now - self.stopping_since >= \
                self.settings.grace and not self.drained():
            self._abandon_all()
        return self._take()

    def _expire_workers(self, now):
        for worker in [w for w in self.workers.values() if w.expiry < now]:
            log.warning("worker %s missed %d heartbeats; expired",
                        worker.address.hex(), self.settings.liveness)
            self.counters["expired"] += 1
            self._delete_worker(worker, now)
            self._disconnect(worker.address)

    def _expire_jobs(self, now):
        """Fail queued jobs past their deadline, or waiting for no worker."""
        no_worker = self.settings.no_worker_timeout
        svc: Service
        for svc in list(self._queued):
            keep = []
            for job in svc.queue:
                if job.deadline <= now:
                    self._fail(job.msg, ERR_TIMEOUT, self._timeout_message(job, now))
                elif not svc.workers and \
                        now - max(job.received, svc.without_workers_since) >= no_worker:
                    # No worker for that long: not a job that waited behind
                    # busy workers and saw the last one leave a moment ago.
                    self._fail(job.msg, ERR_NO_WORKER,
                               f"no worker serves {_name(svc.name)!r} on "
                               f"{self.settings.backend}; is powerhose-worker running "
                               "with that --service?")
                else:
                    keep.append(job)
            svc.keep(keep)
            if not keep:
                self._queued.discard(svc)
            elif svc.leased:  # jobs wait: may a lease end for them?
                self._reclaim(svc)

    def _forget_idle_services(self, now):
        """Services with no worker, no job waiting and no recent use go."""
        idle = [name for name, svc in self.services.items()
                if not svc.workers and not svc.queue and now - svc.last_used >= SERVICE_TTL]
        for name in idle:
            del self.services[name]

    def _timeout_message(self, job, now):
        return (f"job waited {now - job.received:.2f}s in the queue for "
                f"{_name(job.msg.request.service)!r} and its deadline passed: "
                "all workers busy; add workers or raise the timeout")

    def _send_heartbeats(self):
        for worker in self.workers.values():
            self._to_worker(backend_command(worker.address, HEARTBEAT), worker)
        if self._probes_left:
            self._probes_left -= 1

    # -- workers leaving -------------------------------------------------------------------

    def _delete_worker(self, worker: WorkerRef, now: float, requeue=False):
        """Forget a worker; its jobs are requeued (never started) or failed."""
        self.workers.pop(worker.address, None)
        _close_word(worker)
        svc: Service = worker.service
        wishing: Holder = None
        if worker.holder is not None:
            wishing = self._lease_lost(worker)
        worker.direct = False
        svc.workers.discard(worker.address)
        svc.last_used = now
        if not svc.workers:
            svc.without_workers_since = now
        try:
            svc.idle.remove(worker)
        except ValueError:
            pass
        if wishing is not None:  # lost while being granted: no job of it to requeue
            self._answer(wishing, svc, now)
        jobs, worker.jobs = worker.jobs, []
        if not jobs:
            return
        if requeue:
            # An extended worker sends DISCONNECT only once it has answered
            # every job it started, so the jobs we still count crossed that
            # DISCONNECT on the wire and never ran.
            svc.push_front(list(jobs))
            self._queued.add(svc)
            self._serve_queue(svc, now)
        else:
            for job in jobs:
                self._fail(job.msg, ERR_WORKER_LOST,
                           f"worker {worker.address.hex()} serving {_name(svc.name)!r} "
                           "died or disconnected while running the job; check the "
                           "worker's log", worker.about)

    def _serve_queue(self, svc: Service, now: float):
        """Jobs put back at the head of the queue go to idle workers, one each
        (credit beyond 1 is for when no worker is idle)."""
        queue, idle = svc.queue, svc.idle
        while queue and idle:
            job = svc.pop()
            if job.deadline <= now:
                self._fail(job.msg, ERR_TIMEOUT, self._timeout_message(job, now))
                continue
            worker = idle[0]
            del idle[0]
            self._send_job(worker, job, now)
            self._list_spare(worker)
        if not queue:
            self._queued.discard(svc)
        elif svc.leased:
            self._reclaim(svc)

    # -- stopping ------------------------------------------------------------------------

    def request_stop(self, now):
        """Stop taking jobs; finish the ones accepted within the grace period."""
        if self.stopping_since is None:
            log.info("broker stopping: finishing accepted jobs (grace %.1fs)",
                     self.settings.grace)
            self.stopping_since = now
            self._end_all_leases()

    def _abandon_all(self):
        for svc in self._queued:
            for job in svc.queue:
                self._fail(job.msg, ERR_NO_WORKER, "broker stopped before the job ran")
            svc.clear()
        self._queued.clear()
        for worker in self.workers.values():
            for job in worker.jobs:
                self._fail(job.msg, ERR_WORKER_LOST,
                           "broker stopped before the job finished (grace period over)",
                           worker.about)
            worker.jobs.clear()

    def disconnect_all(self) -> list[Send]:
        """DISCONNECT to every worker, as the broker leaves."""
        worker: WorkerRef
        for address, worker in self.workers.items():
            self._disconnect(address)
            _close_word(worker)
        self.workers.clear()
        for svc in self.services.values():
            svc.workers.clear()
            svc.idle.clear()
            svc.spare.clear()
        return self._take()
