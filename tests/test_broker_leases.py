"""The broker core's side of the direct path (docs/direct_path.rst, #19): leases.

As in test_broker_core: BrokerCore on plain lists of frames and a fake
clock, every assertion on the exact frames the core returns (built with the
protocol module's own functions) and on the stats.
"""

import json

import pytest

from pyramid_powerhose import protocol as p
from pyramid_powerhose.broker_core import HOLDER_TTL, WISH_TTL, BrokerCore, Send
from pyramid_powerhose.busy_word import BUSY

from .conftest import wait_for
from .test_broker_core import (
    PID, SVC, client_sends, command, dispatched, make_core, make_settings, outcomes, ready,
    ready_plain, reply, service_stats, submit, worker_sends,
)

H = b"holder-1"  # a client process's control DEALER, as the frontend ROUTER names it
H2 = b"holder-2"


# -- frames in -----------------------------------------------------------------------------


def endpoint_of(worker):
    return b"ipc:///tmp/x/direct/%s.sock" % worker


def announce(core, now, worker, endpoint=None):
    """DIRECT, as a worker sends it right after READY."""
    return core.worker_message([worker, *p.worker_direct(endpoint or endpoint_of(worker))],
                               now)


def ready_direct(core, now, worker, service=SVC, credit=1):
    """An extended worker that announces a direct endpoint."""
    return ready(core, now, worker, service, credit) + announce(core, now, worker)


def wish(core, now, holder, wanted, service=SVC):
    return core.client_message([holder, *p.lease_wanted(service, wanted)], now)


def give_back(core, now, holder, epoch, service=SVC):
    """RETURN."""
    return core.client_message([holder, *p.lease_return(service, epoch)], now)


def beat(core, now, holder):
    return core.client_message([holder, *p.lease_heartbeat()], now)


def answer(core, now, worker, epoch, held=0):
    """The worker's LEASE: the epoch it now serves (0: none)."""
    return core.worker_message([worker, *p.worker_lease(epoch, held)], now)


def report(core, now, worker, counts, cmd=p.REPORT):
    return core.worker_message([worker, *p.worker_counts(cmd, counts)], now)


# -- frames out ----------------------------------------------------------------------------


def leases(sends):
    """[(worker, epoch)] for every LEASE to a worker (epoch 0: the lease ends)."""
    out = []
    for send in worker_sends(sends):
        if send.frames[3] == p.LEASE:
            assert send.frames[1:3] == [b"", p.MDP_WORKER] and len(send.frames) == 5
            assert send.worker is not None and send.worker.address == send.frames[0]
            cmd = p.parse_broker_command(send.frames[1:])
            out.append((send.frames[0], cmd.epoch))
    return out


def notices(sends):
    """[(holder, LeaseNotice)] for every PHL01 message to a client process."""
    out = []
    for send in client_sends(sends):
        assert send.frames[2] == p.EXT_LEASE
        out.append((send.frames[0], p.parse_lease_notice(send.frames[1:])))
    return out


def grants(sends):
    """[(holder, epoch, endpoint, credit)]."""
    return [(h, n.epoch, n.endpoint, n.credit) for h, n in notices(sends)
            if n.command == p.LEASE_GRANT]


def revokes(sends):
    """[(holder, epoch, reason)]."""
    return [(h, n.epoch, n.reason) for h, n in notices(sends) if n.command == p.LEASE_REVOKE]


def busy(sends):
    """[(holder, service)] for every BUSY."""
    return [(h, n.service) for h, n in notices(sends) if n.command == p.LEASE_BUSY]


def only_busy(sends, holder, service=SVC):
    """The one thing sent is BUSY to ``holder``: no idle worker for its wish."""
    return [s.frames for s in sends] == [p.lease_busy(holder, service)]


def lease_all(core, now, holder, workers, service=SVC):
    """``holder`` wants len(workers) leases and gets exactly these workers, in
    this order; returns their epochs by worker."""
    sends = wish(core, now, holder, len(workers), service)
    offered = leases(sends)
    assert [w for w, _ in offered] == list(workers) and client_sends(sends) == []
    epochs = dict(offered)
    for worker in workers:
        sends = answer(core, now, worker, epochs[worker])
        assert sends and grants(sends) == [
            (holder, epochs[worker], endpoint_of(worker), core.workers[worker].credit)]
        assert len(sends) == 1
    return epochs


def worker_stats(core, now, worker):
    (found,) = [w for w in core.stats(now)["workers"] if w["address"] == worker.hex()]
    return found


def counts_of(done=0, failed=(), seconds=()):
    counts = p.DirectCounts()
    for s in seconds[:done]:
        counts.add(s)
    for code, s in failed:
        counts.add(s, code)
    return counts


# -- grants --------------------------------------------------------------------------------


def test_a_grant_goes_to_the_lru_idle_direct_worker_only_after_its_answer():
    core = make_core()
    ready_direct(core, 0.0, b"w1")
    ready_direct(core, 0.0, b"w2", credit=2)
    ready_direct(core, 0.0, b"w3")
    # w1 runs a relayed job: idle in LRU order are now w2, w3, w1.
    submit(core, 1.0, b"c", b"1")
    reply(core, 1.1, b"w1", b"c", b"1")
    sends = wish(core, 2.0, H, 1)
    (send,) = sends
    epoch = leases(sends)[0][1]
    assert send.frames == [b"w2", b"", p.MDP_WORKER, p.LEASE, b"%d" % epoch] and epoch > 0
    assert send.worker is core.workers[b"w2"] and send.job is None
    # No GRANT before the worker's answer, and the worker is out of the pool.
    assert dispatched(submit(core, 2.1, b"c", b"2")) == [(b"w3", b"2")]
    (send,) = answer(core, 2.2, b"w2", epoch)
    # The worker's credit, its pid@host (none said) and the broker's max_job_size.
    assert send.frames == p.lease_grant(H, SVC, epoch, endpoint_of(b"w2"), 2, b"", 1000)
    assert not send.to_worker and send.worker is None and send.job is None
    # The next grant has the next epoch, from the next idle worker (w1, w3 busy).
    sends = wish(core, 3.0, H, 1)
    assert leases(sends) == [(b"w1", epoch + 1)]
    assert grants(answer(core, 3.1, b"w1", epoch + 1)) == [
        (H, epoch + 1, endpoint_of(b"w1"), 1)]
    stats = worker_stats(core, 3.1, b"w2")
    assert (stats["leased_to"], stats["direct_jobs"], stats["holding"]) == (H.hex(), 0, 0)
    assert service_stats(core, 3.1)["leased"] == 2


def test_plain_non_direct_and_busy_workers_are_never_leased():
    core = make_core()
    ready_plain(core, 0.0, b"plain")
    core.worker_message([b"plain", *p.worker_direct(endpoint_of(b"plain"))], 0.0)  # ignored
    ready(core, 0.0, b"nodirect")
    ready_direct(core, 0.0, b"busy")
    ready_direct(core, 0.0, b"idle")
    # In LRU order, plain, nodirect and busy take a relayed job each.
    for job_id in (b"1", b"2", b"3"):
        submit(core, 1.0, b"c", job_id)
    assert [len(core.workers[w].jobs) for w in (b"plain", b"nodirect", b"busy", b"idle")] \
        == [1, 1, 1, 0]
    sends = wish(core, 2.0, H, 5)
    (offer,) = leases(sends)
    assert offer[0] == b"idle" and busy(sends) == [(H, SVC)] and len(sends) == 2
    # The plain and the non-direct workers finish: idle, not leased.
    assert leases(core.worker_message(
        [b"plain", b"", p.MDP_WORKER, p.REPLY, b"c", b"", b"r"], 2.1)) == []
    assert leases(reply(core, 2.1, b"nodirect", b"c", b"2")) == []
    # The busy direct worker, once idle, is leased to the wish still standing.
    sends = reply(core, 2.2, b"busy", b"c", b"3")
    assert outcomes(sends) == [(b"c", b"3", "OK")]
    assert leases(sends) == [(b"busy", offer[1] + 1)]
    assert only_busy(wish(core, 2.3, H, 5), H)  # (3 wanted and 2 being granted: none idle)
    for worker in (b"plain", b"nodirect"):
        assert core.workers[worker].holder is None and not core.workers[worker].direct
        assert core.workers[worker] in core.services[SVC].idle


def test_a_wish_of_n_grants_at_most_n():
    core = make_core()
    for worker in (b"w1", b"w2", b"w3", b"w4"):
        ready_direct(core, 0.0, worker)
    sends = wish(core, 1.0, H, 2)
    assert [w for w, _ in leases(sends)] == [b"w1", b"w2"] and len(sends) == 2
    epochs = dict(leases(sends))
    # Said again before the workers answered: those being granted count.
    assert wish(core, 1.1, H, 2) == []
    assert wish(core, 1.2, H, 1) == []
    for worker in (b"w1", b"w2"):
        assert grants(answer(core, 1.3, worker, epochs[worker])) == [
            (H, epochs[worker], endpoint_of(worker), 1)]
    # "n more": one more.
    assert [w for w, _ in leases(wish(core, 2.0, H, 1))] == [b"w3"]
    # Withdrawn: nothing, then nothing more when a worker turns idle.
    assert wish(core, 2.1, H, 0) == []
    assert dispatched(submit(core, 2.2, b"c", b"1")) == [(b"w4", b"1")]
    sends = reply(core, 2.3, b"w4", b"c", b"1")
    assert outcomes(sends) == [(b"c", b"1", "OK")] and len(sends) == 1
    assert service_stats(core, 3.0)["leased"] == 3


def test_a_wish_lapses_unless_said_again():
    for later, leased in ((WISH_TTL - 0.1, True), (WISH_TTL + 0.1, False)):
        core = make_core()
        ready_direct(core, 0.0, b"w")
        submit(core, 0.0, b"c", b"1")  # w busy: the wish waits
        assert only_busy(wish(core, 0.0, H, 1), H)
        beat(core, 2.0, H)
        core.tick(later)
        sends = reply(core, later, b"w", b"c", b"1")
        assert bool(leases(sends)) is leased, later


def test_a_leased_worker_is_never_leased_twice_nor_given_a_relayed_job():
    core = make_core()
    ready_direct(core, 0.0, b"w")
    epochs = lease_all(core, 0.0, H, [b"w"])
    # Another holder wants one: its share is 1 of 1 worker, and H is not beyond its own.
    assert only_busy(wish(core, 0.1, H2, 1), H2)
    assert only_busy(wish(core, 0.1, H, 1), H)
    assert core.workers[b"w"].epoch == epochs[b"w"]
    assert core.workers[b"w"] not in core.services[SVC].idle


# -- revocation ----------------------------------------------------------------------------


def test_a_queued_job_revokes_the_lease_free_the_longest_then_runs_on_that_worker():
    core = make_core()
    ready_direct(core, 0.0, b"w1")
    ready_direct(core, 0.0, b"w2")
    epochs = lease_all(core, 0.0, H, [b"w1", b"w2"])
    assert report(core, 1.0, b"w2", counts_of(1, seconds=[0.001]), p.FREE) == []
    assert report(core, 2.0, b"w1", counts_of(1, seconds=[0.001]), p.FREE) == []
    assert beat(core, 2.5, H) == []
    sends = submit(core, 3.0, b"c", b"job")
    assert leases(sends) == [(b"w2", 0)]
    assert revokes(sends) == [(H, epochs[b"w2"], p.REVOKE_SHARE)]
    assert len(sends) == 2 and dispatched(sends) == []
    # One revocation for one waiting job: nothing more on later ticks or heartbeats.
    assert leases(core.tick(3.1)) == [] and beat(core, 3.2, H) == []
    sends = answer(core, 3.3, b"w2", 0)
    assert dispatched(sends) == [(b"w2", b"job")] and len(sends) == 1
    sends = reply(core, 3.4, b"w2", b"c", b"job")
    assert outcomes(sends) == [(b"c", b"job", "OK")] and len(sends) == 1
    assert core.workers[b"w2"].holder is None and core.workers[b"w1"].holder is not None
    # RETURN asks for nothing but for a leaving worker: not for a revoked lease, nor
    # for one that goes on.
    assert give_back(core, 3.5, H, epochs[b"w2"]) == []
    assert give_back(core, 3.5, H, epochs[b"w1"]) == []
    assert core.workers[b"w1"].epoch == epochs[b"w1"] and not core.workers[b"w1"].ending
    assert service_stats(core, 3.5)["leased"] == 1


def test_one_revocation_per_waiting_job():
    core = make_core()
    for worker in (b"w1", b"w2", b"w3"):
        ready_direct(core, 0.0, worker)
    epochs = lease_all(core, 0.0, H, [b"w1", b"w2", b"w3"])
    # No FREE: the oldest grants of H, in order.
    first = submit(core, 1.0, b"c", b"1")
    second = submit(core, 1.0, b"c", b"2")
    assert leases(first) == [(b"w1", 0)] and leases(second) == [(b"w2", 0)]
    assert revokes(first + second) == [(H, epochs[b"w1"], p.REVOKE_SHARE),
                                       (H, epochs[b"w2"], p.REVOKE_SHARE)]
    assert leases(core.tick(1.1)) == []
    assert give_back(core, 1.1, H, epochs[b"w1"]) == []  # before its answer: nothing either
    assert dispatched(answer(core, 1.2, b"w2", 0)) == [(b"w2", b"1")]
    assert dispatched(answer(core, 1.2, b"w1", 0)) == [(b"w1", b"2")]
    assert service_stats(core, 1.2)["queued"] == 0


def test_without_free_the_oldest_lease_of_the_holder_most_beyond_its_share_goes():
    core = make_core()
    for worker in (b"w1", b"w2", b"w3"):
        ready_direct(core, 0.0, worker)
    lease_all(core, 0.0, H2, [b"w1"])
    epochs = lease_all(core, 1.0, H, [b"w2", b"w3"])
    for worker in (b"w1", b"w2", b"w3"):
        report(core, 1.5, worker, p.DirectCounts())  # each started a direct job
    # Share: 3 workers among 2 holders, 2 each; H holds 2, H2 1: H's oldest goes.
    sends = submit(core, 2.0, b"c", b"1")
    assert revokes(sends) == [(H, epochs[b"w2"], p.REVOKE_SHARE)]
    assert leases(sends) == [(b"w2", 0)]


def test_two_holders_share_the_workers():
    core = make_core()
    workers = [b"w1", b"w2", b"w3", b"w4"]
    for worker in workers:
        ready_direct(core, 0.0, worker)
    a = lease_all(core, 0.0, H, workers)
    # H2 wants 2: its share is 4 / 2; H, beyond by 2, gives back its two oldest.
    sends = wish(core, 1.0, H2, 2)
    assert leases(sends) == [(b"w1", 0), (b"w2", 0)]
    assert revokes(sends) == [(H, a[b"w1"], p.REVOKE_SHARE), (H, a[b"w2"], p.REVOKE_SHARE)]
    assert busy(sends) == []  # two workers are on their way to it: no BUSY
    assert wish(core, 1.1, H2, 2) == []  # said again: those revocations are under way
    offered = leases(answer(core, 1.2, b"w1", 0)) + leases(answer(core, 1.2, b"w2", 0))
    assert [w for w, _ in offered] == [b"w1", b"w2"]
    for worker, epoch in offered:
        assert grants(answer(core, 1.3, worker, epoch)) == [
            (H2, epoch, endpoint_of(worker), 1)]
    # Each at its share: more wishes revoke nothing.
    assert only_busy(wish(core, 2.0, H, 3), H) and only_busy(wish(core, 2.0, H2, 3), H2)
    holders = [worker_stats(core, 2.0, w)["leased_to"] for w in workers]
    assert holders == [H2.hex(), H2.hex(), H.hex(), H.hex()]


def test_a_free_lease_of_a_holder_beyond_its_share_goes_first():
    core = make_core()
    workers = [b"w1", b"w2", b"w3", b"w4"]
    for worker in workers:
        ready_direct(core, 0.0, worker)
    a = lease_all(core, 0.0, H, workers)
    for worker in workers:
        report(core, 0.4, worker, p.DirectCounts())  # each started a direct job
    report(core, 0.5, b"w3", counts_of(1, seconds=[0.01]), p.FREE)
    sends = wish(core, 1.0, H2, 1)
    assert revokes(sends) == [(H, a[b"w3"], p.REVOKE_SHARE)] and leases(sends) == [(b"w3", 0)]


def test_a_fresh_lease_goes_before_one_whose_worker_started_a_job():
    """Four processes' first jobs at once (the gunicorn case): a process that
    got a lease with its relayed job has not used it yet, while another's
    worker runs a direct job; the waiting job takes the unused one."""
    core = make_core()
    for worker in (b"w1", b"w2"):
        ready_direct(core, 0.0, worker)
    lease_all(core, 0.0, H, [b"w1"])
    fresh = lease_all(core, 0.5, H2, [b"w2"])
    report(core, 0.6, b"w1", p.DirectCounts())  # w1 started one of H's direct jobs
    sends = submit(core, 1.0, b"c", b"1")
    assert revokes(sends) == [(H2, fresh[b"w2"], p.REVOKE_SHARE)]
    assert leases(sends) == [(b"w2", 0)]


def test_a_grant_answered_while_relayed_jobs_wait_ends_at_once():
    core = make_core()
    ready_direct(core, 0.0, b"w")
    (offer,) = leases(wish(core, 0.0, H, 1))
    assert submit(core, 0.1, b"c", b"1") == []  # queued: w is being granted
    sends = answer(core, 0.2, b"w", offer[1])
    assert leases(sends) == [(b"w", 0)]
    assert busy(sends) == [(H, SVC)] and grants(sends) == []  # no GRANT: it waits no longer
    sends = answer(core, 0.3, b"w", 0)
    assert dispatched(sends) == [(b"w", b"1")] and len(sends) == 1
    # The holder still wants one: w, idle again, is offered to it.
    (offer,) = leases(reply(core, 0.4, b"w", b"c", b"1"))
    assert offer[0] == b"w" and offer[1] > 0


def test_a_worker_declining_a_lease_is_not_offered_one_again():
    core = make_core()
    ready_direct(core, 0.0, b"w")
    (offer,) = leases(wish(core, 0.0, H, 1))
    # The wish stands, and no other worker is idle: the holder hears BUSY at once.
    assert only_busy(answer(core, 0.1, b"w", 0), H)
    assert core.workers[b"w"].holder is None
    assert dispatched(submit(core, 0.2, b"c", b"1")) == [(b"w", b"1")]
    assert leases(reply(core, 0.3, b"w", b"c", b"1")) == []


# -- holders and workers going away --------------------------------------------------------


def test_a_silent_holder_is_forgotten_and_its_workers_get_lease_0():
    core = make_core()
    ready_direct(core, 0.0, b"w1")
    ready_direct(core, 0.0, b"w2")
    lease_all(core, 0.0, H, [b"w1", b"w2"])
    for t in (1.0, 2.0):  # the workers' heartbeats keep them alive
        command(core, t, b"w1", p.HEARTBEAT)
        command(core, t, b"w2", p.HEARTBEAT)
    assert beat(core, 1.5, H) == []
    assert leases(core.tick(1.5 + HOLDER_TTL - 0.1)) == []
    sends = core.tick(1.5 + HOLDER_TTL)
    assert sorted(leases(sends)) == [(b"w1", 0), (b"w2", 0)] and client_sends(sends) == []
    assert H not in core.holders
    assert answer(core, 4.6, b"w1", 0) == []
    assert dispatched(submit(core, 4.7, b"c", b"1")) == [(b"w1", b"1")]
    assert service_stats(core, 4.7)["leased"] == 1


def test_a_grant_answered_after_its_holder_was_forgotten_ends():
    core = make_core()
    ready_direct(core, 0.0, b"w")
    (offer,) = leases(wish(core, 0.0, H, 1))
    command(core, 2.0, b"w", p.HEARTBEAT)
    assert leases(core.tick(HOLDER_TTL)) == []  # forgotten; w's answer is awaited
    sends = answer(core, HOLDER_TTL + 0.1, b"w", offer[1])
    assert leases(sends) == [(b"w", 0)] and client_sends(sends) == []


def _lose(core, now, worker, how):
    if how == "expired":
        return core.tick(now)
    if how == "vanished":
        send = Send(p.backend_command(worker, p.HEARTBEAT), True, core.workers[worker], None)
        return core.undelivered([send], now) + core.bury_vanished(now)
    if how == "disconnect":
        return command(core, now, worker, p.DISCONNECT)
    if how == "ready again":
        return ready(core, now, worker)


@pytest.mark.parametrize("how", ["expired", "vanished", "disconnect", "ready again"])
def test_a_leased_worker_gone_revokes_its_lease_as_lost(how):
    core = make_core(heartbeat=1.0, liveness=3)
    ready_direct(core, 0.0, b"w")
    ready_direct(core, 0.0, b"other")
    epochs = lease_all(core, 0.0, H, [b"w"])
    command(core, 2.9, b"other", p.HEARTBEAT)
    beat(core, 2.9, H)
    sends = _lose(core, 3.1 if how == "expired" else 1.0, b"w", how)
    assert revokes(sends) == [(H, epochs[b"w"], p.REVOKE_LOST)]
    assert b"w" not in core.workers or core.workers[b"w"].holder is None
    assert core.holders[H].leases == [] and service_stats(core, 3.1)["leased"] == 0


def one_of_two_offered(core):
    """Two idle direct workers, a wish for one: the (worker, epoch) offered,
    and the other worker."""
    ready_direct(core, 0.0, b"w1")
    ready_direct(core, 0.0, b"w2")
    (offer,) = leases(wish(core, 0.0, H, 1))
    return offer, b"w2" if offer[0] == b"w1" else b"w1"


def test_a_declined_lease_goes_to_another_idle_worker():
    core = make_core()
    offer, other = one_of_two_offered(core)
    sends = answer(core, 0.1, offer[0], 0)
    (again,) = leases(sends)
    assert again[0] == other and again[1] > offer[1] and client_sends(sends) == []
    sends = answer(core, 0.2, other, again[1])
    assert grants(sends) == [(H, again[1], endpoint_of(other), 1)]


def test_a_worker_lost_while_being_granted_revokes_too_and_the_wish_stands():
    core = make_core()
    ready_direct(core, 0.0, b"w")
    (offer,) = leases(wish(core, 0.0, H, 1))
    sends = command(core, 0.1, b"w", p.DISCONNECT)
    # REVOKE lost, and the wish, standing again with no idle worker: BUSY.
    assert revokes(sends) == [(H, offer[1], p.REVOKE_LOST)] and busy(sends) == [(H, SVC)]
    assert len(client_sends(sends)) == 2
    sends = ready_direct(core, 0.2, b"w2")
    assert [w for w, _ in leases(sends)] == [b"w2"]


def test_a_worker_lost_while_being_granted_leaves_its_wish_to_another_idle_one():
    core = make_core()
    offer, other = one_of_two_offered(core)
    sends = command(core, 0.1, offer[0], p.DISCONNECT)
    assert revokes(sends) == [(H, offer[1], p.REVOKE_LOST)] and busy(sends) == []
    assert [w for w, _ in leases(sends)] == [other]


def test_a_leaving_worker_is_revoked_and_released_on_return():
    core = make_core()
    ready_direct(core, 0.0, b"w")
    epochs = lease_all(core, 0.0, H, [b"w"])
    # Unasked LEASE 0: it is leaving.  The holder hears; the worker waits.
    sends = answer(core, 1.0, b"w", 0)
    assert revokes(sends) == [(H, epochs[b"w"], p.REVOKE_LEAVING)] and len(sends) == 1
    assert answer(core, 1.1, b"w", 0) == []  # said twice: nothing more
    # Not offered to anyone, not revoked for a share.
    assert only_busy(wish(core, 1.2, H2, 1), H2)
    sends = give_back(core, 1.5, H, epochs[b"w"])
    assert sends[0].frames == p.backend_lease(b"w", 0) and len(sends) == 1
    assert give_back(core, 1.6, H, epochs[b"w"]) == []  # once
    # Its answer ends the lease; it gets no relayed job; then it leaves as today.
    assert answer(core, 1.7, b"w", 0) == []
    assert submit(core, 1.8, b"c", b"1") == [] and service_stats(core, 1.8)["queued"] == 1
    sends = command(core, 1.9, b"w", p.DISCONNECT)
    assert sends == []
    assert core.stats(2.0)["worker_events"]["left"] == 1


def test_a_leaving_worker_is_released_when_its_holder_is_forgotten():
    core = make_core()
    ready_direct(core, 0.0, b"w")
    epochs = lease_all(core, 0.0, H, [b"w"])
    assert revokes(answer(core, 1.0, b"w", 0)) == [(H, epochs[b"w"], p.REVOKE_LEAVING)]
    command(core, 2.0, b"w", p.HEARTBEAT)
    sends = core.tick(HOLDER_TTL)
    assert leases(sends) == [(b"w", 0)] and client_sends(sends) == []
    # It leaves before answering: no REVOKE to anybody.
    assert command(core, HOLDER_TTL + 0.1, b"w", p.DISCONNECT) == []


def test_a_leaving_worker_that_leaves_before_the_return_revokes_as_lost():
    core = make_core()
    ready_direct(core, 0.0, b"w")
    epochs = lease_all(core, 0.0, H, [b"w"])
    answer(core, 1.0, b"w", 0)
    beat(core, 1.5, H)
    assert revokes(command(core, 2.0, b"w", p.DISCONNECT)) == [
        (H, epochs[b"w"], p.REVOKE_LOST)]


# -- counts and stats ----------------------------------------------------------------------


def test_busy_only_between_a_report_and_a_free():
    """A worker whose lease is being granted, or granted and unused, runs
    nothing: idle in the stats; busy once it says it started a direct job."""
    core = make_core()
    ready_direct(core, 0.0, b"w")
    (offer,) = leases(wish(core, 0.0, H, 1))
    assert (service_stats(core, 0.1)["busy"], service_stats(core, 0.1)["leased"]) == (0, 1)
    answer(core, 0.2, b"w", offer[1])
    assert service_stats(core, 0.2)["busy"] == 0
    report(core, 0.3, b"w", p.DirectCounts())
    assert service_stats(core, 0.3)["busy"] == 1
    report(core, 0.4, b"w", counts_of(1, seconds=[0.001]), p.FREE)
    assert service_stats(core, 0.4)["busy"] == 0


# -- the busy word (busy_word.py): read when deciding, not told ----------------------------


class FakeWord:
    """A worker's busy word as the core reads it (busy_word.BusyReader)."""

    def __init__(self):
        self.value = 0  # no direct job yet
        self.closed = False

    def read(self):
        return self.value

    def close(self):
        self.closed = True


def worded_core(missing=()):
    """A core whose workers keep busy words (none for the paths in ``missing``:
    workers of an older version); the words by path."""
    words = {}

    def open_busy_word(path):
        if path in missing:
            return None
        words[path] = FakeWord()
        return words[path]
    return BrokerCore(make_settings(), 0.0, PID, open_busy_word=open_busy_word), words


def word_of(words, worker):
    return words["/tmp/x/direct/%s.busy" % worker.decode()]


def test_the_busy_word_not_free_and_report_says_which_lease_is_idle():
    core, words = worded_core()
    for worker in (b"w1", b"w2"):
        ready_direct(core, 0.0, worker)
    epochs = lease_all(core, 0.0, H, [b"w1", b"w2"])
    # w2 said REPORT (busy), then fell idle; w1 said FREE, then started a job
    # without a REPORT.  Their words say so.
    report(core, 0.5, b"w2", p.DirectCounts())
    report(core, 1.0, b"w1", counts_of(1, seconds=[0.001]), p.FREE)
    word_of(words, b"w1").value = BUSY
    word_of(words, b"w2").value = int(2.0e9)  # idle since 2.0 s
    sends = submit(core, 3.0, b"c", b"job")
    assert revokes(sends) == [(H, epochs[b"w2"], p.REVOKE_SHARE)]
    assert leases(sends) == [(b"w2", 0)]


def test_of_idle_leases_the_one_idle_the_longest_goes_counted_from_its_grant():
    core, words = worded_core()
    for worker in (b"w1", b"w2", b"w3"):
        ready_direct(core, 0.0, worker)
    epochs = lease_all(core, 1.0, H, [b"w1", b"w2"])
    epochs.update(lease_all(core, 2.0, H, [b"w3"]))
    word_of(words, b"w1").value = int(2.5e9)
    word_of(words, b"w2").value = int(1.5e9)
    word_of(words, b"w3").value = int(0.5e9)  # before its lease began: idle since 2.0
    # Each FREE says otherwise; the words decide.
    for at, worker in ((2.6, b"w1"), (2.7, b"w2"), (2.8, b"w3")):
        report(core, at, worker, counts_of(1, seconds=[0.001]), p.FREE)
    sends = submit(core, 3.0, b"c", b"1")
    assert revokes(sends) == [(H, epochs[b"w2"], p.REVOKE_SHARE)]
    sends = submit(core, 3.0, b"c", b"2")
    assert revokes(sends) == [(H, epochs[b"w3"], p.REVOKE_SHARE)]


def a_lease_and_a_grant_in_flight(w1_word):
    """w1 leased to H, its busy word ``w1_word``; w2 offered to H2, not yet
    answered (so no victim yet)."""
    core, words = worded_core()
    for worker in (b"w1", b"w2"):
        ready_direct(core, 0.0, worker)
    epochs = lease_all(core, 0.0, H, [b"w1"])
    word_of(words, b"w1").value = w1_word
    (offer,) = leases(wish(core, 0.1, H2, 1))
    assert offer[0] == b"w2"
    return core, epochs[b"w1"], offer[1]


def test_a_grant_answered_while_a_job_waits_for_a_busy_revoked_lease_takes_the_job():
    """The job cannot wait for the busy lease revoked for it (back only when
    its job ends) while the grant in flight, not a victim then, sits idle
    with its holder: seen under gunicorn, a job waited a whole job's time."""
    core, w1_epoch, w2_epoch = a_lease_and_a_grant_in_flight(BUSY)  # H's job runs on w1
    sends = submit(core, 0.2, b"c", b"job")  # relayed: no worker idle
    assert revokes(sends) == [(H, w1_epoch, p.REVOKE_SHARE)]
    sends = answer(core, 0.3, b"w2", w2_epoch)
    assert grants(sends) == [] and busy(sends) == [(H2, SVC)]
    assert leases(sends) == [(b"w2", 0)]
    sends = answer(core, 0.4, b"w2", 0)
    assert [w for w, _ in dispatched(sends)] == [b"w2"]


def test_a_job_that_would_wait_for_a_busy_revoked_lease_takes_an_idle_one():
    core, w1_epoch, w2_epoch = a_lease_and_a_grant_in_flight(BUSY)
    sends = submit(core, 0.2, b"c", b"j1")
    assert revokes(sends) == [(H, w1_epoch, p.REVOKE_SHARE)]
    sends = ready_direct(core, 0.3, b"w3")  # a new worker takes j1
    assert [w for w, _ in dispatched(sends)] == [b"w3"]
    sends = answer(core, 0.4, b"w2", w2_epoch)  # nothing waits: the grant stands
    assert grants(sends) == [(H2, w2_epoch, endpoint_of(b"w2"), 1)]
    # j2 is one job for one lease ending, but that lease is busy: w2's,
    # idle, is revoked for it rather than j2 waiting for w1's job to end.
    sends = submit(core, 0.5, b"c", b"j2")
    assert revokes(sends) == [(H2, w2_epoch, p.REVOKE_SHARE)]
    sends = answer(core, 0.6, b"w2", 0)
    assert [w for w, _ in dispatched(sends)] == [b"w2"]


def test_a_grant_answered_while_an_idle_revoked_lease_comes_back_for_the_job_stands():
    core, w1_epoch, w2_epoch = a_lease_and_a_grant_in_flight(int(0.05e9))  # w1 idle
    sends = submit(core, 0.2, b"c", b"job")
    assert revokes(sends) == [(H, w1_epoch, p.REVOKE_SHARE)]
    sends = answer(core, 0.3, b"w2", w2_epoch)
    assert grants(sends) == [(H2, w2_epoch, endpoint_of(b"w2"), 1)]


def test_busy_in_the_stats_is_what_the_word_says():
    core, words = worded_core()
    ready_direct(core, 0.0, b"w")
    (offer,) = leases(wish(core, 0.0, H, 1))
    answer(core, 0.2, b"w", offer[1])
    assert service_stats(core, 0.2)["busy"] == 0
    word_of(words, b"w").value = BUSY  # no REPORT
    assert service_stats(core, 0.3)["busy"] == 1
    report(core, 0.4, b"w", counts_of(1, seconds=[0.001]), p.FREE)  # counts only
    assert service_stats(core, 0.4)["busy"] == 1
    word_of(words, b"w").value = int(0.45e9)
    assert service_stats(core, 0.5)["busy"] == 0


def test_a_worker_without_a_word_is_told_by_free_and_report():
    """A worker of an older version keeps no word: FREE and REPORT, as before."""
    core, words = worded_core(missing={"/tmp/x/direct/w1.busy"})
    for worker in (b"w1", b"w2"):
        ready_direct(core, 0.0, worker)
    epochs = lease_all(core, 0.0, H, [b"w1", b"w2"])
    assert list(words) == ["/tmp/x/direct/w2.busy"]
    report(core, 1.0, b"w1", counts_of(1, seconds=[0.001]), p.FREE)
    word_of(words, b"w2").value = BUSY
    sends = submit(core, 2.0, b"c", b"job")
    assert revokes(sends) == [(H, epochs[b"w1"], p.REVOKE_SHARE)]
    report(core, 2.5, b"w2", p.DirectCounts())  # ignored for w2: its word says


def test_a_word_is_read_only_beside_a_sock_file_and_closed_with_its_worker():
    core, words = worded_core()
    ready(core, 0.0, b"w1", SVC, 1)
    announce(core, 0.0, b"w1", b"ipc:///tmp/x/direct/w1.socket")  # not <name>.sock
    assert words == {}
    ready_direct(core, 0.0, b"w2")
    first = word_of(words, b"w2")
    announce(core, 0.1, b"w2")  # announced again: a fresh reader, the old one closed
    assert first.closed and not word_of(words, b"w2").closed
    ready_direct(core, 0.0, b"w3")
    core.worker_message([b"w2", *p.worker_command(p.DISCONNECT)], 0.2)
    assert word_of(words, b"w2").closed and not word_of(words, b"w3").closed
    core.disconnect_all()
    assert word_of(words, b"w3").closed


def test_free_and_report_counts_show_in_the_stats_exactly():
    from pyramid_powerhose.broker_core import BUCKETS
    core = make_core()
    ready_direct(core, 0.0, b"w")
    ready(core, 0.0, b"relayed")
    lease_all(core, 0.0, H, [b"w"])
    stats = service_stats(core, 0.5)  # leased, no job yet: idle
    assert (stats["workers"], stats["busy"], stats["idle"], stats["leased"],
            stats["direct"]) == (2, 0, 2, 1, 0)
    assert report(core, 0.6, b"w", p.DirectCounts()) == []  # it started a direct job
    stats = service_stats(core, 0.6)
    assert (stats["busy"], stats["idle"], stats["direct"]) == (1, 1, 0)
    # While busy: 3 OK (0.05 ms, 2 ms, 2 ms), one ExecutionError after 0.3 s, one
    # TimeoutError that never started.
    counts = counts_of(3, [(p.ERR_EXECUTION, 0.3), (p.ERR_TIMEOUT, -1)],
                       seconds=[0.00005, 0.002, 0.002])
    assert report(core, 1.0, b"w", counts) == []
    stats = service_stats(core, 1.0)
    assert (stats["busy"], stats["idle"]) == (1, 1)
    # Then 2 more OK of 20 ms, and idle.
    assert report(core, 2.0, b"w", counts_of(2, seconds=[0.02, 0.02]), p.FREE) == []
    stats = service_stats(core, 2.0)
    assert (stats["workers"], stats["busy"], stats["idle"], stats["leased"]) == (2, 0, 2, 1)
    assert (stats["done"], stats["failed"], stats["direct"]) == (5, 2, 7)
    assert stats["outcomes"] == {"OK": 5, p.ERR_EXECUTION: 1, p.ERR_TIMEOUT: 1}
    assert stats["jobs_per_second"] == round(7 / 60, 3)

    def per_bucket(histogram):
        cumulative = [count for _, count in histogram["buckets"]]
        return {bound: n for bound, n in zip(
            [*BUCKETS, "+Inf"],
            [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])]) if n}

    for field in ("run_seconds", "total_seconds"):
        assert per_bucket(stats[field]) == {0.0001: 1, 0.0025: 2, 0.025: 2, 0.5: 1}
        assert stats[field]["count"] == 6
        assert stats[field]["sum"] == round(0.00005 + 0.002 + 0.002 + 0.3 + 0.04, 6)
    # The 6 that ran waited 0 s in the broker; the one that never started, nothing.
    assert per_bucket(stats["wait_seconds"]) == {0.0001: 6}
    assert stats["wait_seconds"]["sum"] == 0
    worker = worker_stats(core, 2.0, b"w")
    assert (worker["jobs"], worker["direct_jobs"], worker["leased_to"]) == (7, 7, H.hex())
    # A REPORT with more: busy again; counts add up.
    report(core, 3.0, b"w", counts_of(1, seconds=[0.001]))
    stats = service_stats(core, 3.0)
    assert (stats["busy"], stats["done"], stats["direct"]) == (1, 6, 8)
    assert json.loads(json.dumps(core.stats(3.0))) == core.stats(3.0)


def test_direct_fields_only_for_services_and_workers_that_take_part():
    core = make_core()
    ready(core, 0.0, b"w", b"relayed-only")
    ready_direct(core, 0.0, b"d")
    stats = core.stats(0.0)
    assert "direct" not in stats["services"]["relayed-only"]
    assert "leased" not in stats["services"]["relayed-only"]
    assert (stats["services"]["svc"]["direct"], stats["services"]["svc"]["leased"]) == (0, 0)
    workers = {w["address"]: w for w in stats["workers"]}
    assert "leased_to" not in workers[b"w".hex()] and "direct_jobs" not in workers[b"w".hex()]
    assert (workers[b"d".hex()]["leased_to"], workers[b"d".hex()]["direct_jobs"]) == (None, 0)


def test_mmi_service_still_finds_a_service_whose_only_worker_is_leased():
    core = make_core()
    ready_direct(core, 0.0, b"w")
    lease_all(core, 0.0, H, [b"w"])
    sends = core.client_message([b"c", b"", p.MDP_CLIENT, p.MMI_SERVICE, SVC], 1.0)
    assert [s.frames for s in sends] == [[b"c", b"", p.MDP_CLIENT, p.MMI_SERVICE, p.MMI_FOUND]]


# -- what the core ignores -----------------------------------------------------------------


def test_stale_and_unknown_epochs_are_ignored():
    core = make_core()
    ready_direct(core, 0.0, b"w")
    (offer,) = leases(wish(core, 0.0, H, 1))
    epoch = offer[1]
    assert answer(core, 0.1, b"w", epoch - 1) == []  # not the lease offered
    assert answer(core, 0.1, b"w", epoch + 7) == []
    assert grants(answer(core, 0.2, b"w", epoch)) == [(H, epoch, endpoint_of(b"w"), 1)]
    assert answer(core, 0.3, b"w", epoch) == []  # said again
    assert give_back(core, 0.4, H, epoch + 1) == []  # no such lease
    assert give_back(core, 0.4, H2, epoch) == []  # not its lease
    assert give_back(core, 0.4, H, epoch, b"other") == []  # not that service's
    assert answer(core, 0.5, b"stranger", epoch) == []  # unknown worker
    assert report(core, 0.5, b"stranger", counts_of(1, seconds=[0.1]), p.FREE) == []
    assert announce(core, 0.5, b"stranger") == []
    ready(core, 0.6, b"x")  # not leased
    assert answer(core, 0.6, b"x", 0) == [] and answer(core, 0.6, b"x", epoch) == []
    assert core.workers[b"w"].epoch == epoch and core.workers[b"x"].holder is None
    assert service_stats(core, 0.6)["leased"] == 1


@pytest.mark.parametrize("body", [
    [],
    [b"BOGUS"],
    [p.LEASE_HEARTBEAT, b"extra"],
    [p.LEASE_WANTED, SVC],
    [p.LEASE_WANTED, SVC, b"-1"],
    [p.LEASE_WANTED, SVC, b"lots"],
    [p.LEASE_WANTED, b"", b"1"],
    [p.LEASE_WANTED, b"x" * 256, b"1"],
    [p.LEASE_RETURN, SVC, b""],
    [p.LEASE_GRANT, SVC, b"1", b"ipc:///x", b"1"],
])
def test_malformed_lease_control_is_dropped(body):
    core = make_core()
    ready_direct(core, 0.0, b"w")
    assert core.client_message([H, b"", p.EXT_LEASE, *body], 0.0) == []
    assert core.client_message([H, b"x", p.EXT_LEASE, p.LEASE_HEARTBEAT], 0.0) == []
    assert core.workers[b"w"].holder is None
    assert [w for w, _ in leases(wish(core, 0.1, H, 1))] == [b"w"]


@pytest.mark.parametrize("frames", [
    [p.DIRECT, b"tcp://127.0.0.1:5555"],
    [p.DIRECT],
    [p.LEASE, b"1"],
    [p.LEASE, b"x", b"0"],
    [p.FREE, b"1"],
    [p.REPORT, b"1", b"0", b"1,2"],
])
def test_malformed_direct_path_commands_from_a_worker_are_dropped(frames):
    core = make_core()
    ready(core, 0.0, b"w")
    assert core.worker_message([b"w", b"", p.MDP_WORKER, *frames], 0.1) == []
    assert b"w" in core.workers and not core.workers[b"w"].direct
    assert only_busy(wish(core, 0.2, H, 1), H)


def test_a_wish_for_an_mmi_service_is_ignored():
    core = make_core()
    assert wish(core, 0.0, H, 1, p.MMI_SERVICE) == []
    assert p.MMI_SERVICE not in core.services


# -- stopping ------------------------------------------------------------------------------


def test_stopping_ends_every_lease_and_grants_none():
    core = make_core()
    for worker in (b"w1", b"w2", b"w3"):
        ready_direct(core, 0.0, worker)
    epochs = lease_all(core, 0.0, H, [b"w1"])
    (offer,) = leases(wish(core, 0.5, H2, 1))  # w2 being granted
    core.request_stop(1.0)
    sends = core.tick(1.0)
    assert leases(sends) == [(b"w1", 0)]
    assert revokes(sends) == [(H, epochs[b"w1"], p.REVOKE_LEAVING)]
    # w2's answer comes: no GRANT, its lease ends.
    sends = answer(core, 1.1, b"w2", offer[1])
    assert leases(sends) == [(b"w2", 0)] and client_sends(sends) == []
    assert wish(core, 1.2, H, 1) == []  # w3 is idle: stopping brokers grant nothing
    assert answer(core, 1.3, b"w1", 0) == [] and answer(core, 1.3, b"w2", 0) == []
    assert service_stats(core, 1.3)["leased"] == 0
    assert core.drained()


def test_a_huge_wish_leases_the_idle_workers_and_no_more():
    core = make_core()
    ready_direct(core, 0.0, b"w1")
    ready_direct(core, 0.0, b"w2")
    sends = wish(core, 0.0, H, 10 ** 18 - 1)  # the most the protocol's 18 digits say
    assert [w for w, _ in leases(sends)] == [b"w1", b"w2"]
    (offer,) = leases(ready_direct(core, 0.1, b"w3"))  # the wish stands
    assert offer[0] == b"w3" and core.workers[b"w3"].holder is core.holders[H]
    # 19 digits: more than the protocol takes; dropped, nothing changes.
    assert core.client_message([H2, b"", p.EXT_LEASE, p.LEASE_WANTED, SVC, b"9" * 19],
                               0.2) == []
    assert H2 not in core.holders
    assert len(core.holders[H].leases) == 3


def test_the_loop_wakes_every_second_while_holders_are_known():
    core = make_core(heartbeat=5.0)
    assert core.poll_timeout() == 5000
    beat(core, 0.0, H)
    assert core.poll_timeout() == 1000
    assert core.tick(HOLDER_TTL) == [] and core.holders == {}
    assert core.poll_timeout() == 5000


# -- on real sockets: the broker process speaks it -----------------------------------------


def test_a_broker_process_grants_counts_and_revokes_on_real_sockets(start_broker, endpoints,
                                                                   client):
    """A worker and a client process played by hand on DEALERs: the broker's loop
    passes PHL01 to the core and sends its LEASE, GRANT and REVOKE."""
    import time

    import zmq

    start_broker()
    context = zmq.Context()
    worker = context.socket(zmq.DEALER)
    control = context.socket(zmq.DEALER)
    try:
        for sock, endpoint in ((worker, endpoints.backend), (control, endpoints.frontend)):
            sock.linger = 0
            sock.connect(endpoint)
        endpoint = f"ipc://{endpoints.dir}/direct/1-0123abcd.sock".encode()
        worker.send_multipart(p.worker_ready(b"default", 2))
        worker.send_multipart(p.worker_direct(endpoint))

        def from_broker(expected, timeout=5.0):
            """The next command but heartbeats (answered, to stay alive)."""
            deadline = time.monotonic() + timeout
            while worker.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                cmd = p.parse_broker_command(worker.recv_multipart())
                if cmd.command == p.HEARTBEAT:
                    worker.send_multipart(p.worker_command(p.HEARTBEAT))
                    continue
                assert cmd.command == expected
                return cmd
            raise AssertionError(f"no {expected!r} from the broker")

        def notice():
            assert control.poll(5000), "no PHL01 notice from the broker"
            return p.parse_lease_notice(control.recv_multipart())

        wait_for(lambda: client.stats(timeout=0.5)["services"].get("default", {}).get(
            "workers") == 1, what="the worker registered")
        control.send_multipart(p.lease_wanted(b"default", 1))
        epoch = from_broker(p.LEASE).epoch
        assert epoch > 0
        worker.send_multipart(p.worker_lease(epoch, 0))
        grant = notice()
        assert (grant.command, grant.service, grant.epoch, grant.endpoint, grant.credit) == (
            p.LEASE_GRANT, b"default", epoch, endpoint, 2)
        counts = p.DirectCounts()
        counts.add(0.001)
        counts.add(0.002, p.ERR_EXECUTION)
        worker.send_multipart(p.worker_counts(p.FREE, counts))
        control.send_multipart(p.lease_heartbeat())
        wait_for(lambda: client.stats(timeout=0.5)["services"]["default"]["direct"] == 2,
                 what="the direct jobs counted")
        stats = client.stats(timeout=0.5)
        assert (stats["services"]["default"]["done"], stats["services"]["default"]["failed"],
                stats["services"]["default"]["leased"]) == (1, 1, 1)
        (listed,) = stats["workers"]
        assert (listed["leased_to"] is not None, listed["direct_jobs"]) == (True, 2)
        # The worker leaves (DISCONNECT): the holder is told its lease is lost.
        worker.send_multipart(p.worker_command(p.DISCONNECT))
        revoke = notice()
        assert (revoke.command, revoke.epoch, revoke.reason) == (
            p.LEASE_REVOKE, epoch, p.REVOKE_LOST)
    finally:
        worker.close(0)
        control.close(0)
        context.term()


def test_the_direct_path_fields_become_metrics():
    pytest.importorskip("prometheus_client")
    from .test_metrics import expose, value

    core = make_core()
    ready(core, 0.0, b"r", b"relayed-only")
    ready_direct(core, 0.0, b"w1")
    ready_direct(core, 0.0, b"w2")
    lease_all(core, 0.0, H, [b"w1"])
    report(core, 1.0, b"w1", counts_of(2, [(p.ERR_EXECUTION, 0.01)], seconds=[0.001, 0.002]))
    families = expose(core.stats(2.0))
    assert value(families, "powerhose_direct_jobs_total", service="svc") == 3
    assert value(families, "powerhose_workers_leased", service="svc") == 1
    assert [s.labels["service"] for s in families["powerhose_direct_jobs"].samples
            if s.name == "powerhose_direct_jobs_total"] == ["svc"]
    assert [s.labels["service"] for s in families["powerhose_workers_leased"].samples] \
        == ["svc"]
    assert value(families, "powerhose_jobs_total", service="svc", outcome="OK") == 2
