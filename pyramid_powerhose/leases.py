"""One process's leases on the direct path: which worker a job may go to,
and what to tell the broker (docs/direct_path.rst).  Bookkeeping only, no
socket: the client's threads take and release leases, the connection
watcher's thread applies the broker's GRANT, REVOKE and BUSY and sends what
:meth:`Leases.due` says (client.py's ``_Control``), so every decision here
is tested without a process (tests/test_client_leases.py).

The broker leases this process idle workers ("GRANT"); the process's
threads then send their jobs straight to those workers, each thread on its
own DEALER per lease, and the broker is off the per-job path.  One control
DEALER per process tells the broker how many jobs could use leases (LEASE
wanted), heartbeats while it holds or wants leases, and hears GRANT, BUSY
and REVOKE; a revoked lease is RETURNed once none of our jobs is in flight
on it.  Used only with one ipc frontend, CURVE off, ``settings.direct`` and
no gevent; otherwise, and for any job with no lease to go on, the relayed
path runs exactly as before.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from time import monotonic_ns

from . import exc
# Names, not module.NAME: compiled (setup.py), a module global is a cached
# look-up, a module's attribute a dictionary look-up every time.
from .protocol import (
    LEASE_BUSY, LEASE_GRANT, LEASE_REVOKE, PREFETCH_BELOW, REVOKE_LOST, lease_heartbeat,
    lease_return, lease_wanted,
)

log = logging.getLogger(__name__)

WISH_GAP = 0.010  # seconds between two LEASE wishes of one service, at least
WISH_REPEAT = 1.0  # a wish > 0 is said again this often, and withdrawn (0) as late
LEASE_BEAT = 1.0  # a HEARTBEAT this often while holding or wanting leases
# A job that a wish may bring a lease for waits for the broker's answer to
# it, a GRANT or BUSY (no idle worker now), rather than settle for less
# (take): a job with no lease, which relayed would find the worker being
# leased and take it back (a process sending jobs one after another would
# never get its lease), and a job that would join a busy lease on its
# credit, and wait behind its job while the broker may have an idle worker.
# The answer takes a broker round trip, and a worker's for a GRANT; this
# long at most (longer than WISH_GAP, the longest a grown wish may wait to
# be sent), for an answer lost with its broker; no answer counts as BUSY.
ANSWER_WAIT = 0.015  # seconds
_LOCAL_NOT_RUN = b"not-run"  # a worker said NOT_RUN on a lease the broker had not revoked
_BROKER_GONE = b"broker-gone"  # the control socket lost the broker: leases dropped


class Lease:
    """A worker leased to this process: written under its Leases' lock.

    ``revoked``: None while usable, else why (a REVOKE_* reason or one of
    ours); ``owe_return``: the broker revoked it, a RETURN is due once
    ``in_flight`` is 0; ``gone``: nothing more will be sent on it, so the
    threads close their sockets to it.
    """

    __slots__ = ("service", "epoch", "endpoint", "credit", "about", "max_job_size",
                 "in_flight", "last_used", "revoked", "owe_return", "gone", "__weakref__")

    def __init__(self, service, epoch, endpoint, credit, about="", max_job_size=16 << 20):
        self.service = service  # its ServiceLeases
        self.epoch = epoch
        self.endpoint = endpoint
        self.credit = credit
        self.about = about  # the worker's pid@host, if it said
        self.max_job_size = max_job_size  # the broker's: larger jobs go through it
        self.in_flight = 0
        self.last_used = 0
        self.revoked = None
        self.owe_return = False
        self.gone = False


class ServiceLeases:
    """A service's usable leases and its wish: jobs ``waiting`` for room on a
    lease plus jobs ``relaying`` for lack of one; ``sent``: the wish the
    broker was last told, at ``sent_at`` (watcher's monotonic clock), of
    which ``granted`` leases have come since (the broker counts each off
    the wish); ``busy``: the broker answered BUSY, no idle worker for the
    rest of it, and the wish has not grown since."""

    __slots__ = ("name", "leases", "cond", "waiting", "relaying", "sent", "sent_at",
                 "granted", "busy", "job_time", "peak")

    def __init__(self, name, lock):
        self.name = name
        self.job_time = -1.0  # moving average of direct round trips, s (-1: none yet)
        self.leases = []  # usable (unrevoked) leases, in grant order
        self.cond = threading.Condition(lock)
        self.waiting = 0
        self.relaying = 0
        self.sent = 0
        self.sent_at = -1e9
        self.granted = 0
        self.busy = False
        # The most jobs waiting or relaying at once since the watcher was
        # poked: a relayed job may be over before the watcher looks, and the
        # wish it made must not go with it.
        self.peak = 0

    def held(self):
        """The part of our wish the broker holds (under the lock): what we
        said, less what it granted since, never below 0."""
        held = self.sent - self.granted
        return held if held > 0 else 0

    def unasked(self):
        """Jobs waiting or relaying beyond the wish the broker holds."""
        return self.waiting + self.relaying - self.held()

    def grew(self):
        """A job has just begun to wait or relay (under the lock): whether the
        wish grows past what the broker holds (then the watcher is poked,
        ``peak`` remembers it, and the broker's last answer is stale)."""
        if self.unasked() <= 0:
            return False
        n = self.waiting + self.relaying
        if n > self.peak:
            self.peak = n
        self.busy = False
        return True

    def wish(self):
        """The wish to send (under the lock): the jobs waiting or relaying now,
        or ``peak`` if more were when the watcher was poked."""
        n = self.waiting + self.relaying
        return self.peak if self.peak > n else n

    def answered_busy(self):
        """Whether the broker holds part of our wish that it said BUSY to (no
        idle worker): a job then joins a busy lease, or goes relayed, at
        once, and the broker grants that part as workers come free."""
        return self.busy and self.held() > 0

    def awaiting_answer(self):
        """Whether the broker holds part of our wish and has not answered
        BUSY to it: its GRANT may be on the way."""
        return not self.busy and self.held() > 0

    def choose(self):
        """The usable lease with room, or None; under the lock.

        Fewest in flight first.  Among idle leases, the most recently used:
        its worker is still awake in its loop (another, idle for a few
        milliseconds, has gone to sleep and told the broker FREE, and
        waking it costs the job more); among busy ones, the least recently used,
        whose jobs are the oldest.  A lease's credit beyond 1 is used only
        while the service's jobs are short, as the broker does
        (``PREFETCH_BELOW``): behind a long job, another job would wait
        although another worker may be idle, for the asking."""
        best = None
        short = 0 <= self.job_time < PREFETCH_BELOW
        for lease in self.leases:
            if lease.in_flight < (lease.credit if short else 1) and (
                    best is None or lease.in_flight < best.in_flight or (
                        lease.in_flight == best.in_flight and (
                            lease.last_used > best.last_used if lease.in_flight == 0
                            else lease.last_used < best.last_used))):
                best = lease
        return best


class Leases:
    """One process's leases, shared by its threads (the bookkeeping only:
    the watcher's thread does the talking to the broker, see client._Control).

    Callers take a lease (:meth:`take`) and give it back (:meth:`release`);
    the watcher applies GRANT, REVOKE and BUSY (:meth:`notice`), a lost broker
    (:meth:`drop_all`), and asks what to send (:meth:`due`).  A caller pokes
    the watcher (an eventfd its poller watches) only when the wish grows
    past what the broker was told or a RETURN is due, at most once until the
    watcher looked.
    """

    __slots__ = ("lock", "services", "by_epoch", "returns", "turn", "gone_gen", "poked",
                 "beat_at", "holders", "wake_fd", "_wake", "_acquire", "_release",
                 "__weakref__")

    def __init__(self, wake=None):
        self.lock = threading.Lock()
        # The lock's methods, bound once: take and release each lock and
        # unlock per job, and a look-up of the method costs more than the call.
        self._acquire = self.lock.acquire
        self._release = self.lock.release
        self.services = {}  # service name -> ServiceLeases
        self.by_epoch = {}  # epoch -> Lease, every lease not yet gone
        self.returns = []  # (service name, epoch) RETURNs due
        self.turn = 0  # the LRU clock
        self.gone_gen = 0  # bumped whenever a lease goes: threads then close sockets
        self.poked = False
        self.beat_at = 0.0
        self.holders = weakref.WeakSet()  # every thread's _DirectSockets, for close()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if wake is None else -1
        self._wake = wake  # tests: a callable instead of the eventfd

    def _poke(self):
        """Wake the watcher (under the lock)."""
        if not self.poked:
            self.poked = True
            if self._wake is not None:
                self._wake()
            else:
                os.eventfd_write(self.wake_fd, 1)

    def _service(self, name):
        svc = self.services.get(name)
        if svc is None:
            svc = self.services[name] = ServiceLeases(name, self.lock)
        return svc

    # -- callers' side -----------------------------------------------------------

    def take(self, name, deadline_ns):
        """A lease with room for one more job of ``name`` (counted in flight),
        or None: no lease, the job goes relayed and counts in the wish until
        :meth:`relayed`.  Waits for room while every lease is at its credit,
        up to ``deadline_ns`` (then TimeoutError)."""
        self._acquire()
        try:
            svc = self.services.get(name)
            if svc is None:
                svc = self._service(name)
            lease = svc.choose()
            if lease is not None and lease.in_flight and not svc.answered_busy():
                # Every lease is busy: this job would join one, on its credit,
                # and wait behind its job.  The broker may have an idle worker
                # for it (it uses credit only when none is idle): ask.
                lease = self._await_answer(svc, deadline_ns, True)
            if lease is None:
                if svc.leases:
                    lease = self._wait(svc, deadline_ns)
                elif svc.awaiting_answer():
                    lease = self._await_answer(svc, deadline_ns, False)
                if lease is None:
                    svc.relaying += 1
                    if svc.grew():
                        self._poke()
                    return None
            lease.in_flight += 1
            self.turn += 1
            lease.last_used = self.turn
            return lease
        finally:
            self._release()

    def _wait(self, svc, deadline_ns):
        """Wait for room on a lease of ``svc`` (under the lock); None once it
        holds no usable lease any more."""
        svc.waiting += 1
        if svc.grew():
            self._poke()
        try:
            while True:
                left = deadline_ns - monotonic_ns()
                if left <= 0:
                    raise exc.TimeoutError(
                        f"job on {svc.name.decode()!r} found no room on this process's "
                        "leased workers within its timeout; are they overloaded or hung?")
                svc.cond.wait(left / 1e9)
                if not svc.leases:
                    return None
                lease = svc.choose()
                if lease is not None:
                    return lease
        finally:
            svc.waiting -= 1

    def _await_answer(self, svc, deadline_ns, idle):
        """Wait for the broker's answer to the wish of ``svc``, which counts
        this job (under the lock): a GRANT, or BUSY; at most ANSWER_WAIT
        (and the deadline), and no answer then counts as BUSY.  The lease
        then chosen, or None.  ``idle``: only a lease with no job in flight
        ends the wait before the answer (another thread may have taken the
        grant that woke this one)."""
        svc.waiting += 1
        if svc.grew():
            self._poke()  # the wish grows by this job
        try:
            end = min(monotonic_ns() + int(ANSWER_WAIT * 1e9), deadline_ns)
            while True:
                lease = svc.choose()
                if lease is not None and (not idle or lease.in_flight == 0):
                    return lease
                if svc.busy:
                    return lease
                left = end - monotonic_ns()
                if left <= 0:
                    svc.busy = True
                    return lease
                svc.cond.wait(left / 1e9)
        finally:
            svc.waiting -= 1

    def relayed(self, name):
        """A job counted by :meth:`take` as relayed for lack of a lease is over."""
        with self.lock:
            self.services[name].relaying -= 1

    def release(self, lease, refused=None, took=-1):
        """A job on ``lease`` is over (``took``: its round trip in ns, or -1);
        ``refused``: the worker said NOT_RUN (this reason), so the lease is
        not chosen again."""
        self._acquire()
        try:
            lease.in_flight -= 1
            svc = lease.service
            if took >= 0:
                average = svc.job_time
                seconds = took * 1e-9
                svc.job_time = seconds if average < 0 else average + 0.2 * (seconds - average)
            if refused is not None and lease.revoked is None:
                self._revoke(lease, _LOCAL_NOT_RUN)
            if svc.waiting:
                svc.cond.notify()
            if lease.revoked is not None and lease.in_flight == 0:
                self._end(lease)
        finally:
            self._release()

    # -- the watcher's side --------------------------------------------------------

    def _revoke(self, lease, reason):
        """Stop choosing ``lease`` (under the lock)."""
        lease.revoked = reason
        svc = lease.service
        try:
            svc.leases.remove(lease)
        except ValueError:
            pass
        if svc.waiting:
            svc.cond.notify_all()  # room may be gone for good: they look again

    def _end(self, lease):
        """A revoked lease with nothing in flight: RETURN it if the broker
        revoked it; it is gone (under the lock)."""
        if lease.gone:
            return
        lease.gone = True
        self.by_epoch.pop(lease.epoch, None)
        self.gone_gen += 1
        if lease.owe_return:
            lease.owe_return = False
            self.returns.append((lease.service.name, lease.epoch))
            self._poke()

    def notice(self, notice):
        """Apply a GRANT, a REVOKE or a BUSY from the broker."""
        with self.lock:
            if notice.command == LEASE_BUSY:
                svc = self.services.get(notice.service)
                if svc is not None:
                    svc.busy = True
                    if svc.waiting:
                        svc.cond.notify_all()
            elif notice.command == LEASE_GRANT:
                if notice.epoch in self.by_epoch:
                    return
                svc = self._service(notice.service)
                lease = Lease(svc, notice.epoch, notice.endpoint.decode(), notice.credit,
                               notice.about.decode("utf-8", "replace"),
                               notice.max_job_size)
                self.by_epoch[notice.epoch] = lease
                svc.leases.append(lease)
                # The broker counts a grant off our wish (broker_core's _grant):
                # so do we (unasked), or a job that comes later would not ask
                # again for a worker the broker believes unwanted.
                svc.granted += 1
                if svc.waiting:
                    svc.cond.notify_all()
                log.debug("lease %d on %r granted: %s, credit %d", notice.epoch,
                          notice.service, lease.endpoint, notice.credit)
            elif notice.command == LEASE_REVOKE:
                lease = self.by_epoch.get(notice.epoch)
                log.debug("lease %d on %r revoked: %r", notice.epoch, notice.service,
                          notice.reason)
                if lease is None:  # gone already: the broker still waits for a RETURN
                    self.returns.append((notice.service, notice.epoch))
                    return
                if lease.revoked is None or notice.reason == REVOKE_LOST:
                    self._revoke(lease, notice.reason)
                lease.owe_return = True
                if lease.in_flight == 0:
                    self._end(lease)

    def lost(self, lease):
        """A thread's connection to the leased worker dropped (the watcher's
        monitor): the worker is gone, and no job in flight on the lease can
        be answered.  The broker says so too, with REVOKE ``lost``, unless
        the lease had ended there already (revoked for another process and
        answered by the worker, with a job of ours still unread in its
        socket): then only this tells the job's thread."""
        with self.lock:
            if lease.gone or lease.revoked == REVOKE_LOST:
                return
            log.debug("lease %d: the connection to %s dropped", lease.epoch, lease.endpoint)
            self._revoke(lease, REVOKE_LOST)
            if lease.in_flight == 0:
                self._end(lease)

    def drop_all(self):
        """The broker is gone: drop every lease (jobs in flight on them finish;
        no RETURN, no broker to hear it), and tell the next broker our wishes."""
        with self.lock:
            for lease in list(self.by_epoch.values()):
                if lease.revoked is None:
                    self._revoke(lease, _BROKER_GONE)
                lease.owe_return = False
                if lease.in_flight == 0:
                    self._end(lease)
            self.returns = []
            for svc in self.services.values():
                svc.sent = 0
                svc.sent_at = -1e9
                svc.busy = False

    def due(self, now):
        """What the watcher sends now (a list of messages), and when it must
        look again (a monotonic time, or None)."""
        with self.lock:
            self.poked = False
            out = [lease_return(name, epoch) for name, epoch in self.returns]
            self.returns = []
            wake = None
            wanting = False
            for svc in self.services.values():
                n = svc.wish()
                grown = n > svc.held()
                if grown or ((n or svc.sent) and now - svc.sent_at >= WISH_REPEAT):
                    if now - svc.sent_at >= WISH_GAP:
                        out.append(lease_wanted(svc.name, n))
                        svc.sent = n
                        svc.granted = 0
                        svc.sent_at = now
                        svc.peak = 0
                    else:
                        at = svc.sent_at + WISH_GAP
                        wake = at if wake is None or at < wake else wake
                if not grown:
                    svc.peak = 0
                if svc.sent:
                    wanting = True
                    at = svc.sent_at + WISH_REPEAT
                    wake = at if wake is None or at < wake else wake
            if self.by_epoch or wanting:
                if now >= self.beat_at:
                    out.append(lease_heartbeat())
                    self.beat_at = now + LEASE_BEAT
                wake = self.beat_at if wake is None or self.beat_at < wake else wake
            else:
                self.beat_at = 0.0  # the next lease or wish gets a heartbeat at once
            return out, wake

    def close(self):
        """Close every thread's sockets to leased workers, and the eventfd
        (idempotent; the watcher's thread must have ended)."""
        with self.lock:
            holders = list(self.holders)
        for holder in holders:
            holder.close()
        if self.wake_fd >= 0:
            os.close(self.wake_fd)
            self.wake_fd = -1
