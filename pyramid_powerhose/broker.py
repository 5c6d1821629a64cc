"""The broker: clients on the frontend, workers on the backend, LRU between.

The loop reads like the zguide's Majordomo broker: poll, handle what came
from clients, handle what came from workers, expire what is dead, send
heartbeats.  State is a few plain containers: ``services`` (each with its
idle workers in least-recently-used order and its queue of jobs) and
``workers`` by address.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import time
from collections import deque

import zmq

from . import endpoints, multipart, protocol
from .exc import DuplicateBrokerError, ProtocolError

log = logging.getLogger(__name__)

# Per poll, how many messages are read from one socket before looking at the
# other: batches cut poll() calls under load and keep both sides served.
BATCH = 64

# A busy worker is handed a second job (credit > 1) only for services whose
# recent jobs average less than this: behind such jobs a waiting job waits
# little, while behind a long one it could wait although another worker
# frees up first.
PREFETCH_BELOW = 0.1  # seconds


def _name(service: bytes) -> str:
    """A service name for a message: clients may send any bytes."""
    return service.decode("utf-8", "replace")


class PendingJob:
    """A client's request, queued or in flight."""

    __slots__ = ("msg", "received", "deadline", "sent")

    def __init__(self, msg, now):
        self.msg = msg
        self.received = now
        self.sent = now
        ttl = msg.request.ttl_ms
        self.deadline = now + ttl / 1000.0 if ttl else None

    def ttl_ms(self, now):
        if self.deadline is None:
            return 0
        return max(1, int((self.deadline - now) * 1000))


class WorkerRef:
    """What the broker knows of one connected worker.

    ``jobs`` are the jobs sent to it and not yet answered, oldest (running)
    first; ``credit`` is how many it accepts at once (1 for plain MDP).
    """

    __slots__ = ("address", "service", "extended", "credit", "jobs", "expiry", "spare",
                 "vanished", "last_reply")

    def __init__(self, address, service, extended, credit, expiry):
        self.address = address
        self.service = service
        self.extended = extended
        self.credit = credit
        self.jobs = deque()
        self.expiry = expiry
        self.spare = False  # listed in service.spare
        self.vanished = False  # a send to it failed: its connection is gone
        self.last_reply = 0.0


class Service:
    """One service: its workers, the idle ones in LRU order, its queue.

    ``spare`` lists busy workers that accept one more job (credit > 1):
    they are used only when no worker is idle.
    """

    __slots__ = ("name", "workers", "idle", "spare", "queue", "done", "failed", "job_time")

    def __init__(self, name):
        self.name = name
        self.workers = set()
        self.idle = deque()  # left: idle the longest
        self.spare = deque()
        self.queue = deque()
        self.done = 0
        self.failed = 0
        self.job_time = None  # moving average of job run times, seconds

    def ran(self, seconds):
        average = self.job_time
        self.job_time = seconds if average is None else average + 0.2 * (seconds - average)

    def capacity(self, worker):
        """Jobs ``worker`` may hold now: its credit when jobs are short, else 1."""
        if self.job_time is not None and self.job_time < PREFETCH_BELOW:
            return worker.credit
        return 1


class Broker:
    def __init__(self, settings, context=None):
        self.settings = settings
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.services: dict[bytes, Service] = {}
        self.workers: dict[bytes, WorkerRef] = {}
        self.heartbeat = settings.heartbeat
        self.liveness = settings.heartbeat * settings.liveness
        self.started = time.time()
        self.stopping_since = None
        self._locks = []
        self._vanished = []
        self._probes_left = 0
        self._next_heartbeat = 0.0
        self._next_expiry = 0.0
        self._parent = os.getppid() if settings.exit_with_parent else None

    # -- life cycle -----------------------------------------------------------

    def bind(self):
        """Take the endpoint locks, then bind; DuplicateBrokerError if taken."""
        s = self.settings
        for name, endpoint in (("frontend", s.frontend), ("backend", s.backend)):
            self._lock(name, endpoint)
        self.frontend = self._bind_router(s.frontend, "frontend")
        self.backend = self._bind_router(s.backend, "backend")
        # Sending to a worker that went away must fail, not vanish: that is
        # how a dead worker's job is failed fast (see _probe_workers).
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.monitor = self.backend.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller = zmq.Poller()
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.backend, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        log.info(
            "broker pid %d: frontend %s, backend %s, heartbeat %.2fs",
            os.getpid(), s.frontend, s.backend, self.heartbeat,
        )

    def _lock(self, name, endpoint):
        fd = endpoints.lock(endpoint, name)
        if fd is not None:
            self._locks.append(fd)

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
        """Stop taking jobs; finish the ones accepted within the grace period."""
        if self.stopping_since is None:
            log.info("broker stopping: finishing accepted jobs (grace %.1fs)",
                     self.settings.grace)
            self.stopping_since = time.monotonic()

    def install_signal_handlers(self):
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    # -- the loop ---------------------------------------------------------------

    def run(self):
        """Serve until stopped; returns once every accepted job is settled."""
        poll = self.poller.poll
        frontend, backend, monitor = self.frontend, self.backend, self.monitor
        while True:
            events = dict(poll(self._poll_timeout()))
            if frontend in events:
                self._drain(frontend, self.handle_client)
            if backend in events:
                self._drain(backend, self.handle_worker)
            if monitor in events:
                self._handle_monitor()
            if self._vanished:
                self._bury_vanished()
            now = time.monotonic()
            if now >= self._next_expiry:
                self.expire_jobs(now)
                self.expire_workers(now)
                self._next_expiry = now + 0.05
                if self._parent is not None and os.getppid() != self._parent:
                    log.warning("parent process %d is gone", self._parent)
                    self._parent = None
                    self.request_stop()
            if now >= self._next_heartbeat:
                self.send_heartbeats()
                # 7/MDP peers following the zguide expect one every 2.5 s at most.
                self._next_heartbeat = now + min(self.heartbeat, 2.5)
            if self.stopping_since is not None and self._drained(now):
                break
        self._disconnect_all()

    def _poll_timeout(self):
        if self._probes_left or self.stopping_since is not None:
            return 50
        if any(s.queue for s in self.services.values()):
            return 50
        return int(self.heartbeat * 1000)

    def _drain(self, sock, handle):
        for _ in range(BATCH):
            try:
                frames = multipart.recv(sock, multipart.NOBLOCK)
            except zmq.Again:
                return
            try:
                handle(frames)
            except ProtocolError as exc:
                log.warning("dropped malformed message (%d frames): %s", len(frames), exc)
            # Ask rather than recv until EAGAIN: pyzmq's zmq.Again costs more
            # than a message, and most wake-ups bring just one.
            if not multipart.readable(sock):
                return

    # -- clients ----------------------------------------------------------------

    def handle_client(self, frames):
        msg = protocol.parse_frontend(frames)
        service = msg.request.service
        if service.startswith(protocol.MMI_PREFIX):
            multipart.send(self.frontend, protocol.frontend_plain_reply(msg, [self.mmi(msg)]))
            return
        if self.stopping_since is not None:
            self._fail(msg, protocol.ERR_NO_WORKER,
                       f"broker at {self.settings.frontend} is shutting down; retry shortly")
            return
        size = len(msg.request.data)
        if size > self.settings.max_job_size:
            self._fail(msg, protocol.ERR_TOO_LARGE,
                       f"job of {size} bytes is larger than the broker's "
                       f"max job size ({self.settings.max_job_size} bytes)")
            return
        if not msg.extended:
            msg.request.job_id = b"mdp-%d" % id(msg)
        svc = self.services.get(service)
        if svc is None:
            svc = self.services[service] = Service(service)
        job = PendingJob(msg, time.monotonic())
        if svc.queue or not self._dispatch(svc, job):
            svc.queue.append(job)

    def _fail(self, msg, code, message):
        reply = protocol.Reply.error(msg.request.job_id, code, message)
        multipart.send(self.frontend, protocol.frontend_reply(msg, reply))
        svc = self.services.get(msg.request.service)
        if svc is not None:
            svc.failed += 1
        log.info("job %r for %r failed: %s: %s",
                 msg.request.job_id, msg.request.service, code, message)

    def mmi(self, msg):
        service = msg.request.service
        if service == protocol.MMI_SERVICE:
            svc = self.services.get(msg.request.data)
            found = svc is not None and bool(svc.workers)
            return protocol.MMI_FOUND if found else protocol.MMI_NOT_FOUND
        if service == protocol.MMI_PING:
            return str(os.getpid()).encode()
        if service == protocol.MMI_STATS:
            return json.dumps(self.stats()).encode()
        return protocol.MMI_NOT_IMPLEMENTED

    def stats(self):
        services = {}
        for svc in self.services.values():
            busy = sum(1 for w in svc.workers if self.workers[w].jobs)
            services[svc.name.decode("utf-8", "replace")] = {
                "workers": len(svc.workers),
                "idle": len(svc.workers) - busy,
                "busy": busy,
                "queued": len(svc.queue),
                "done": svc.done,
                "failed": svc.failed,
                "job_ms": None if svc.job_time is None else round(svc.job_time * 1000, 3),
            }
        return {
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "frontend": self.settings.frontend,
            "backend": self.settings.backend,
            "stopping": self.stopping_since is not None,
            "services": services,
        }

    # -- workers ----------------------------------------------------------------

    def handle_worker(self, frames):
        msg = protocol.parse_backend(frames)
        worker = self.workers.get(msg.address)
        command = msg.command
        if command == protocol.REPLY:
            if worker is None:
                return self._disconnect(msg.address)
            worker.expiry = time.monotonic() + self.liveness
            self.handle_reply(worker, msg)
        elif command == protocol.HEARTBEAT:
            if worker is None:
                # MDP: a valid but unexpected command gets DISCONNECT; this is
                # how workers of a previous broker learn to register again.
                return self._disconnect(msg.address)
            worker.expiry = time.monotonic() + self.liveness
        elif command == protocol.READY:
            if worker is not None:  # MDP: a worker MUST NOT send a further READY
                self.delete_worker(worker)
                return self._disconnect(msg.address)
            if msg.service.startswith(protocol.MMI_PREFIX):
                return self._disconnect(msg.address)
            self.register(msg)
        elif command == protocol.DISCONNECT:
            if worker is not None:
                self.delete_worker(worker, requeue=worker.extended)

    def register(self, msg):
        svc = self.services.get(msg.service)
        if svc is None:
            svc = self.services[msg.service] = Service(msg.service)
        worker = WorkerRef(msg.address, svc, msg.extended, msg.credit,
                           time.monotonic() + self.liveness)
        self.workers[msg.address] = worker
        svc.workers.add(msg.address)
        log.info("worker %s registered for %r (%s, credit %d)", msg.address.hex(),
                 msg.service, "powerhose" if msg.extended else "plain MDP", msg.credit)
        self.worker_ready(worker)

    def handle_reply(self, worker, msg):
        if not worker.jobs or msg.client != worker.jobs[0].msg.address:
            log.warning("worker %s replied to a job it does not hold; dropped",
                        msg.address.hex())
            return
        # A worker runs its jobs in the order it got them: this is the oldest.
        job = worker.jobs.popleft()
        client = job.msg
        svc = worker.service
        now = time.monotonic()
        svc.ran(now - max(job.sent, worker.last_reply))
        worker.last_reply = now
        if worker.extended:
            body = msg.body
            if not protocol.reply_frames_ok(body) or body[0] != client.request.job_id:
                self._fail(client, protocol.ERR_BAD_REQUEST,
                           f"worker {worker.address.hex()} sent a malformed reply")
                self.delete_worker(worker)
                return self._disconnect(worker.address)
            if body[1] == protocol.STATUS_OK:
                svc.done += 1
            else:
                svc.failed += 1
            if client.extended:
                # Both ends speak the extension: pass the frames through.
                multipart.send(self.frontend, [client.address, b"", protocol.EXT_CLIENT,
                                               client.request.service, *body])
            else:
                reply = protocol.parse_worker_reply(msg)
                multipart.send(self.frontend, protocol.frontend_reply(client, reply))
        else:
            svc.done += 1
            multipart.send(self.frontend, protocol.frontend_plain_reply(client, msg.body))
        self.worker_ready(worker)

    def worker_ready(self, worker):
        """A worker has room: give it the oldest live jobs, or put it in line."""
        if worker.vanished:
            return
        svc = worker.service
        queue = svc.queue
        now = time.monotonic()
        room = svc.capacity(worker)
        while queue and len(worker.jobs) < room:
            job = queue.popleft()
            if job.deadline is not None and job.deadline <= now:
                self._fail(job.msg, protocol.ERR_TIMEOUT, self._timeout_message(job))
            elif not self._send_job(worker, job, now):
                queue.appendleft(job)  # the worker vanished; the job waits
                return
        if self.stopping_since is not None and not queue:
            return
        if not worker.jobs:
            svc.idle.append(worker)
        else:
            self._list_spare(worker)

    def _dispatch(self, svc, job):
        """Send a new job to the LRU idle worker, else to a busy one with credit left."""
        now = time.monotonic()
        idle = svc.idle
        while idle:
            worker = idle.popleft()
            if self._send_job(worker, job, now):
                self._list_spare(worker)
                return True
        spare = svc.spare
        while spare:
            worker = spare.popleft()
            worker.spare = False
            if worker.vanished or self.workers.get(worker.address) is not worker or \
                    not 0 < len(worker.jobs) < svc.capacity(worker):
                continue  # went idle or away since it was listed, or jobs got long
            if self._send_job(worker, job, now):
                self._list_spare(worker)
                return True
        return False

    def _list_spare(self, worker):
        if len(worker.jobs) < worker.service.capacity(worker) and not worker.spare:
            worker.spare = True
            worker.service.spare.append(worker)

    def _send_job(self, worker, job, now):
        """Send a job; False (and the worker forgotten) if it vanished."""
        req = job.msg.request
        job.sent = now
        if job.deadline is not None:
            req.ttl_ms = job.ttl_ms(now)
        frames = protocol.backend_request(
            worker.address, job.msg.address, req, worker.extended, job.msg.body)
        if self._send_worker(frames, worker):
            worker.jobs.append(job)
            return True
        return False

    def _send_worker(self, frames, worker):
        """Send to a worker; False if its connection is gone.

        Such a worker gets nothing more; what happens to its jobs is decided
        once everything it sent has been read (see _bury_vanished).
        """
        try:
            multipart.send(self.backend, frames, multipart.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            if not worker.vanished and self.workers.get(worker.address) is worker:
                log.debug("worker %s unreachable (%s)", worker.address.hex(), exc.strerror)
                worker.vanished = True
                try:
                    worker.service.idle.remove(worker)
                except ValueError:
                    pass
                self._vanished.append(worker)
            return False

    def _bury_vanished(self):
        """Forget workers whose connection closed, after reading their last words.

        libzmq drops a closed peer's route before the application has read
        what that peer sent: a worker that left cleanly has a DISCONNECT
        waiting (its prefetched jobs are requeued); one that died has not
        (its jobs fail with WorkerLostError).
        """
        while multipart.readable(self.backend):
            self._drain(self.backend, self.handle_worker)
        vanished, self._vanished = self._vanished, []
        for worker in vanished:
            if self.workers.get(worker.address) is worker:
                log.warning("worker %s is gone without a word: its connection closed",
                            worker.address.hex())
                self.delete_worker(worker)

    def _disconnect(self, address):
        try:
            multipart.send(self.backend, protocol.backend_command(address, protocol.DISCONNECT),
                           multipart.NOBLOCK)
        except zmq.ZMQError:
            pass

    def delete_worker(self, worker, requeue=False):
        """Forget a worker; its jobs are requeued (never started) or failed."""
        self.workers.pop(worker.address, None)
        svc = worker.service
        svc.workers.discard(worker.address)
        try:
            svc.idle.remove(worker)
        except ValueError:
            pass
        jobs, worker.jobs = worker.jobs, deque()
        if not jobs:
            return
        if requeue:
            # An extended worker sends DISCONNECT only once it has answered
            # every job it started, so the jobs we still count crossed that
            # DISCONNECT on the wire and never ran.
            svc.queue.extendleft(reversed(jobs))
            while svc.queue and svc.idle:
                self.worker_ready(svc.idle.popleft())
        else:
            for job in jobs:
                self._worker_lost(job, worker)

    def _worker_lost(self, job, worker):
        self._fail(job.msg, protocol.ERR_WORKER_LOST,
                   f"worker {worker.address.hex()} serving {_name(worker.service.name)!r} "
                   "died or disconnected while running the job; check the worker's log")

    # -- expiry and heartbeats -------------------------------------------------

    def expire_workers(self, now):
        for worker in [w for w in self.workers.values() if w.expiry < now]:
            log.warning("worker %s missed %d heartbeats; expired",
                        worker.address.hex(), self.settings.liveness)
            self.delete_worker(worker)
            self._disconnect(worker.address)

    def expire_jobs(self, now):
        """Fail queued jobs past their deadline, or waiting for no worker."""
        no_worker = self.settings.no_worker_timeout
        for svc in self.services.values():
            if not svc.queue:
                continue
            keep = deque()
            for job in svc.queue:
                if job.deadline is not None and job.deadline <= now:
                    self._fail(job.msg, protocol.ERR_TIMEOUT, self._timeout_message(job))
                elif not svc.workers and now - job.received >= no_worker:
                    self._fail(job.msg, protocol.ERR_NO_WORKER,
                               f"no worker serves {_name(svc.name)!r} on "
                               f"{self.settings.backend}; is powerhose-worker running "
                               "with that --service?")
                else:
                    keep.append(job)
            svc.queue = keep

    def _timeout_message(self, job):
        return (f"job waited {time.monotonic() - job.received:.2f}s in the queue for "
                f"{_name(job.msg.request.service)!r} and its deadline passed: "
                "all workers busy; add workers or raise the timeout")

    def send_heartbeats(self):
        for worker in list(self.workers.values()):
            if self.workers.get(worker.address) is worker:
                self._send_worker(
                    protocol.backend_command(worker.address, protocol.HEARTBEAT), worker)
        if self._probes_left:
            self._probes_left -= 1

    def _handle_monitor(self):
        while True:
            try:
                multipart.recv(self.monitor, multipart.NOBLOCK)
            except zmq.Again:
                break
        # A connection closed: find out whose, by probing (ROUTER_MANDATORY
        # makes a send to a vanished peer fail), now and for a few ticks
        # while libzmq finishes tearing the pipe down.
        self._probes_left = 4
        self.send_heartbeats()
        self._next_heartbeat = time.monotonic() + 0.05

    # -- shutdown -------------------------------------------------------------------

    def _drained(self, now):
        busy = any(w.jobs for w in self.workers.values())
        queued = any(s.queue for s in self.services.values())
        if not busy and not queued:
            return True
        if now - self.stopping_since < self.settings.grace:
            return False
        for svc in self.services.values():
            for job in svc.queue:
                self._fail(job.msg, protocol.ERR_NO_WORKER, "broker stopped before the job ran")
            svc.queue.clear()
        for worker in list(self.workers.values()):
            for job in worker.jobs:
                self._fail(job.msg, protocol.ERR_WORKER_LOST,
                           "broker stopped before the job finished (grace period over)")
            worker.jobs.clear()
        return True

    def _disconnect_all(self):
        for address in list(self.workers):
            self._disconnect(address)
        self.workers.clear()
