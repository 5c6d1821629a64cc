"""BrokerCore on plain lists of frames and a fake clock: no sockets, no sleeps.

Every event takes ``now`` as a plain float; every assertion is on the frames
the core returns (decoded with the protocol module's own parsers), on error
codes and on counts, never on the wording of a message.
"""

import json
from types import SimpleNamespace

import pytest

from pyramid_powerhose import protocol as p
from pyramid_powerhose.broker_core import (
    MAX_HEARTBEAT_INTERVAL,
    PROBE_INTERVAL,
    PROBES,
    BrokerCore,
)
from pyramid_powerhose.protocol import Reply, Request

PID = 4242
SVC = b"svc"


# -- building the core and the frames -------------------------------------------------


def make_settings(**overrides):
    """The attributes BrokerCore reads, and nothing else (Settings is being reworked)."""
    values = dict(
        frontend="ipc:///tmp/x/front.sock",
        backend="ipc:///tmp/x/back.sock",
        heartbeat=1.0,
        liveness=3,
        max_job_size=1000,
        max_queue=100,
        max_queue_bytes=100_000,
        no_worker_timeout=1.0,
        grace=10.0,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def make_core(now=0.0, **overrides):
    return BrokerCore(make_settings(**overrides), now, PID)


def submit(core, now, client, job_id, service=SVC, data=b"data", ttl_ms=0, headers=None):
    """An extended (PHC01) client's request."""
    req = Request(service, job_id, data, ttl_ms, headers or {})
    return core.client_message([client, *p.client_request(req)], now)


def submit_plain(core, now, client, service=SVC, *body):
    """A plain MDP client's request (what a REQ socket's message looks like on the ROUTER)."""
    return core.client_message([client, b"", p.MDP_CLIENT, service, *(body or (b"data",))], now)


def ready(core, now, worker, service=SVC, credit=1):
    """An extended (powerhose/1) worker's READY."""
    return core.worker_message([worker, *p.worker_ready(service, credit)], now)


def ready_plain(core, now, worker, service=SVC):
    return core.worker_message([worker, b"", p.MDP_WORKER, p.READY, service], now)


def reply(core, now, worker, client, job_id, data=b"result"):
    return core.worker_message([worker, *p.worker_reply(client, Reply(job_id, True, data))], now)


def reply_error(core, now, worker, client, job_id, code=p.ERR_EXECUTION,
                message="boom", exc_type="ValueError", traceback="tb"):
    err = Reply.error(job_id, code, message, exc_type, traceback)
    return core.worker_message([worker, *p.worker_reply(client, err)], now)


def command(core, now, worker, cmd):
    """HEARTBEAT or DISCONNECT from a worker."""
    return core.worker_message([worker, *p.worker_command(cmd)], now)


# -- reading what the core returns ----------------------------------------------------


def client_sends(sends):
    return [s for s in sends if not s.to_worker]


def worker_sends(sends):
    return [s for s in sends if s.to_worker]


def replies(sends):
    """[(client address, Reply)] for every send to an extended client."""
    out = []
    for send in client_sends(sends):
        assert send.worker is None and send.job is None
        out.append((send.frames[0], p.parse_client_reply(send.frames[1:])))
    return out


def outcomes(sends):
    """[(client, job id, "OK" or the error code)]: what each extended client was told."""
    return [(addr, r.job_id, "OK" if r.ok else r.code) for addr, r in replies(sends)]


def dispatched(sends):
    """[(worker address, job id)] for every REQUEST to an extended worker, in order."""
    out = []
    for send in worker_sends(sends):
        cmd = p.parse_broker_command(send.frames[1:])
        if cmd.command == p.REQUEST:
            assert send.worker is not None and send.worker.address == send.frames[0]
            assert send.job is not None and send.job.msg.address == cmd.client
            out.append((send.frames[0], cmd.request.job_id))
    return out


def commands(sends, cmd):
    """Worker addresses sent ``cmd`` (HEARTBEAT or DISCONNECT), in order."""
    out = []
    for send in worker_sends(sends):
        assert send.frames[1:3] == [b"", p.MDP_WORKER]
        if send.frames[3] == cmd:
            assert len(send.frames) == 4
            out.append(send.frames[0])
    return out


def the_send(sends, job_id):
    """The REQUEST send carrying ``job_id`` (to report it undelivered)."""
    (send,) = [s for s in worker_sends(sends) if s.job is not None
               and s.job.msg.request.job_id == job_id]
    return send


def service_stats(core, now=0.0, service="svc"):
    return core.stats(now)["services"][service]


def short_jobs(core, now, workers, job_time=0.01):
    """Run one job on each worker, replied ``job_time`` after dispatch, so that
    the service's average job time is ``job_time``; workers end up idle in
    the order given."""
    for i, worker in enumerate(workers):
        job_id = b"warm%d" % i
        assert dispatched(submit(core, now, b"warm-client", job_id)) == [(worker, job_id)]
        assert outcomes(reply(core, now + job_time, worker, b"warm-client", job_id)) == [
            (b"warm-client", job_id, "OK")]
    return now + job_time


# -- least recently used ---------------------------------------------------------------


def test_jobs_go_to_the_worker_idle_the_longest():
    core = make_core()
    for t, worker in ((0.0, b"w1"), (0.1, b"w2"), (0.2, b"w3")):
        sends = ready(core, t, worker)
        assert commands(sends, p.HEARTBEAT) == [worker] and len(sends) == 1  # heard at once
    sent = []
    for job_id in (b"1", b"2", b"3"):
        sent += dispatched(submit(core, 1.0, b"c", job_id))
    assert sent == [(b"w1", b"1"), (b"w2", b"2"), (b"w3", b"3")]
    # They free up in another order: that order is the new LRU order.
    for t, worker, job_id in ((2.0, b"w2", b"2"), (2.1, b"w3", b"3"), (2.2, b"w1", b"1")):
        sends = reply(core, t, worker, b"c", job_id)
        assert outcomes(sends) == [(b"c", job_id, "OK")] and worker_sends(sends) == []
    sent = []
    for job_id in (b"4", b"5", b"6"):
        sent += dispatched(submit(core, 3.0, b"c", job_id))
    assert sent == [(b"w2", b"4"), (b"w3", b"5"), (b"w1", b"6")]


def test_a_worker_only_gets_jobs_of_its_own_service():
    core = make_core()
    ready(core, 0.0, b"a1", b"a")
    ready(core, 0.0, b"b1", b"b")
    ready(core, 0.0, b"a2", b"a")
    sent = []
    for job_id, service in ((b"ja1", b"a"), (b"jb1", b"b"), (b"ja2", b"a"), (b"jb2", b"b")):
        sent += dispatched(submit(core, 1.0, b"c", job_id, service))
    # jb2 waits for b1, busy; a1 and a2, idle, never take it.
    assert sent == [(b"a1", b"ja1"), (b"b1", b"jb1"), (b"a2", b"ja2")]
    assert service_stats(core, 1.0, "b")["queued"] == 1
    sends = reply(core, 2.0, b"a1", b"c", b"ja1")
    assert outcomes(sends) == [(b"c", b"ja1", "OK")] and dispatched(sends) == []
    assert dispatched(reply(core, 2.1, b"b1", b"c", b"jb1")) == [(b"b1", b"jb2")]
    # Interleaved again: a's idle worker a1 takes a's job, b's job queues behind b1.
    assert dispatched(submit(core, 3.0, b"c", b"jb3", b"b")) == []
    assert dispatched(submit(core, 3.0, b"c", b"ja3", b"a")) == [(b"a1", b"ja3")]
    assert dispatched(reply(core, 3.1, b"b1", b"c", b"jb2")) == [(b"b1", b"jb3")]
    stats = core.stats(3.1)["services"]
    assert (stats["a"]["workers"], stats["a"]["done"], stats["a"]["queued"]) == (2, 1, 0)
    assert (stats["b"]["workers"], stats["b"]["done"], stats["b"]["queued"]) == (1, 2, 0)


# -- credit and prefetch ------------------------------------------------------------------


def test_no_second_job_before_the_service_has_a_job_time():
    core = make_core()
    ready(core, 0.0, b"w", credit=2)
    assert core.services[SVC].job_time is None
    assert dispatched(submit(core, 1.0, b"c", b"1")) == [(b"w", b"1")]
    assert dispatched(submit(core, 1.0, b"c", b"2")) == []
    assert service_stats(core)["queued"] == 1


def test_second_job_only_when_no_worker_is_idle_and_jobs_are_short():
    core = make_core()
    ready(core, 0.0, b"a", credit=2)
    ready(core, 0.0, b"b", credit=2)
    now = short_jobs(core, 1.0, [b"a"], job_time=0.01)  # idle now: b, then a
    assert core.services[SVC].job_time < p.PREFETCH_BELOW
    sent = []
    for job_id in (b"1", b"2", b"3", b"4", b"5"):
        sent += dispatched(submit(core, now, b"c", job_id))
    # Each idle worker first (LRU), then the busy ones' second slots, then the queue.
    assert sent == [(b"b", b"1"), (b"a", b"2"), (b"b", b"3"), (b"a", b"4")]
    assert service_stats(core, now)["queued"] == 1
    assert [len(w.jobs) for w in (core.workers[b"a"], core.workers[b"b"])] == [2, 2]
    # b answers its first job: it takes the queued one, back to its credit.
    assert dispatched(reply(core, now + 0.01, b"b", b"c", b"1")) == [(b"b", b"5")]
    assert len(core.workers[b"b"].jobs) == 2


def test_a_worker_with_credit_gets_one_job_at_a_time_when_jobs_are_long():
    core = make_core()
    ready(core, 0.0, b"a", credit=2)
    ready(core, 0.0, b"b", credit=2)
    now = short_jobs(core, 1.0, [b"a"], job_time=0.5)
    assert core.services[SVC].job_time > p.PREFETCH_BELOW
    sent = []
    for job_id in (b"1", b"2", b"3", b"4"):
        sent += dispatched(submit(core, now, b"c", job_id))
    assert sent == [(b"b", b"1"), (b"a", b"2")]
    assert service_stats(core, now)["queued"] == 2
    # A reply frees one slot: one job, not two.
    assert dispatched(reply(core, now + 0.5, b"b", b"c", b"1")) == [(b"b", b"3")]
    assert len(core.workers[b"b"].jobs) == 1 and service_stats(core, now)["queued"] == 1


def test_jobs_turning_long_stop_prefetch():
    core = make_core()
    ready(core, 0.0, b"a", credit=2)
    now = short_jobs(core, 1.0, [b"a"], job_time=0.01)
    assert dispatched(submit(core, now, b"c", b"1")) == [(b"a", b"1")]
    # One long job lifts the average above the threshold: 0.01 + 0.2 * (1.0 - 0.01).
    assert dispatched(reply(core, now + 1.0, b"a", b"c", b"1")) == []
    assert core.services[SVC].job_time == pytest.approx(0.208)
    now += 2.0
    assert dispatched(submit(core, now, b"c", b"2")) == [(b"a", b"2")]
    assert dispatched(submit(core, now, b"c", b"3")) == []


def test_never_more_jobs_than_the_credit():
    core = make_core()
    ready(core, 0.0, b"w", credit=3)
    now = short_jobs(core, 1.0, [b"w"], job_time=0.01)
    sent = []
    for i in range(10):
        sent += dispatched(submit(core, now, b"c", b"%d" % i))
    assert sent == [(b"w", b"0"), (b"w", b"1"), (b"w", b"2")]
    held_most = 3
    for i in range(10):
        now += 0.01
        sends = reply(core, now, b"w", b"c", b"%d" % i)
        assert outcomes(sends) == [(b"c", b"%d" % i, "OK")]
        held_most = max(held_most, len(core.workers[b"w"].jobs))
        expected = [(b"w", b"%d" % (i + 3))] if i + 3 < 10 else []
        assert dispatched(sends) == expected
    assert held_most == 3
    assert service_stats(core, now)["done"] == 11


def test_plain_mdp_workers_never_get_two_jobs():
    core = make_core()
    ready_plain(core, 0.0, b"p")
    assert core.workers[b"p"].credit == 1
    sends = submit(core, 1.0, b"c", b"warm")
    assert [s.frames[0] for s in worker_sends(sends)] == [b"p"]
    core.worker_message([b"p", b"", p.MDP_WORKER, p.REPLY, b"c", b"", b"r"], 1.01)
    assert core.services[SVC].job_time < p.PREFETCH_BELOW
    first = submit(core, 2.0, b"c", b"1")
    assert [s.frames[0] for s in worker_sends(first)] == [b"p"]
    for job_id in (b"2", b"3"):
        assert submit(core, 2.0, b"c", job_id) == []
    assert len(core.workers[b"p"].jobs) == 1 and service_stats(core, 2.0)["queued"] == 2


# -- deadlines and services without workers ----------------------------------------------


def test_queued_job_fails_with_timeout_on_tick_once_its_deadline_passes():
    core = make_core()
    ready(core, 0.0, b"w")
    submit(core, 0.0, b"c", b"running")
    assert submit(core, 0.0, b"c", b"late", ttl_ms=500) == []
    assert outcomes(core.tick(0.4)) == []
    assert service_stats(core, 0.4)["queued"] == 1
    assert outcomes(core.tick(0.6)) == [(b"c", b"late", p.ERR_TIMEOUT)]
    assert service_stats(core, 0.6)["queued"] == 0
    # The worker frees up afterwards: the failed job is not sent to it.
    sends = reply(core, 0.7, b"w", b"c", b"running")
    assert outcomes(sends) == [(b"c", b"running", "OK")]
    assert worker_sends(sends) == []
    stats = service_stats(core, 0.7)
    assert (stats["idle"], stats["done"], stats["failed"]) == (1, 1, 1)


def test_job_past_its_deadline_is_failed_not_sent_when_a_worker_frees_before_the_tick():
    core = make_core()
    ready(core, 0.0, b"w")
    submit(core, 0.0, b"c", b"running")
    submit(core, 0.0, b"c", b"late", ttl_ms=500)
    submit(core, 0.0, b"c", b"next")
    sends = reply(core, 0.6, b"w", b"c", b"running")
    assert outcomes(sends) == [(b"c", b"running", "OK"), (b"c", b"late", p.ERR_TIMEOUT)]
    assert dispatched(sends) == [(b"w", b"next")]


def test_worker_is_told_the_time_left_not_the_original_ttl():
    core = make_core()
    ready(core, 0.0, b"w")
    submit(core, 0.0, b"c", b"running")
    submit(core, 0.0, b"c", b"queued", ttl_ms=2000, headers={"k": "v"})
    (send,) = worker_sends(reply(core, 0.5, b"w", b"c", b"running"))
    cmd = p.parse_broker_command(send.frames[1:])
    assert (cmd.client, cmd.request.job_id, cmd.request.ttl_ms) == (b"c", b"queued", 1500)
    assert cmd.request.headers == {"k": "v"}
    # No ttl: no deadline, "0" on the wire.
    submit(core, 1.0, b"d", b"free")
    (send,) = worker_sends(reply(core, 1.1, b"w", b"c", b"queued"))
    cmd = p.parse_broker_command(send.frames[1:])
    assert (cmd.request.job_id, cmd.request.ttl_ms) == (b"free", 0)


@pytest.mark.parametrize("after, fails", [(0.999, False), (1.001, True)])
def test_no_worker_error_after_the_no_worker_timeout_not_before(after, fails):
    core = make_core(no_worker_timeout=1.0)
    submit(core, 5.0, b"c", b"1", service=b"nobody")
    assert core.poll_timeout() == 50
    expected = [(b"c", b"1", p.ERR_NO_WORKER)] if fails else []
    assert outcomes(core.tick(5.0 + after)) == expected
    stats = service_stats(core, 5.0 + after, "nobody")
    assert (stats["queued"], stats["failed"]) == ((0, 1) if fails else (1, 0))


def test_no_worker_error_counts_from_when_the_last_worker_left():
    """A job that waited behind a busy worker is not failed the moment that
    worker leaves: the service must have had no worker for the timeout."""
    core = make_core(no_worker_timeout=1.0)
    ready(core, 0.0, b"w")
    assert dispatched(submit(core, 0.0, b"c", b"1")) == [(b"w", b"1")]
    submit(core, 0.0, b"c", b"2")  # queued behind it
    command(core, 5.0, b"w", p.DISCONNECT)  # job 1 is requeued
    assert outcomes(core.tick(5.999)) == []
    assert sorted(outcomes(core.tick(6.2))) == [(b"c", b"1", p.ERR_NO_WORKER),
                                                (b"c", b"2", p.ERR_NO_WORKER)]
    # Had a worker come within the timeout, it would have taken them.
    core = make_core(no_worker_timeout=1.0)
    ready(core, 0.0, b"w")
    submit(core, 0.0, b"c", b"1")
    submit(core, 0.0, b"c", b"2")
    command(core, 5.0, b"w", p.DISCONNECT)
    assert outcomes(core.tick(5.5)) == []
    assert dispatched(ready(core, 5.9, b"v")) == [(b"v", b"1")]


def test_ready_is_answered_at_once_with_a_heartbeat_or_a_job():
    core = make_core()
    # An idle worker hears from us straight away, not at the next tick.
    sends = ready(core, 0.0, b"w1")
    assert commands(sends, p.HEARTBEAT) == [b"w1"] and dispatched(sends) == []
    # A worker that registers with a job waiting gets the job, and nothing else.
    submit(core, 0.0, b"c", b"1")
    submit(core, 0.0, b"c", b"2")
    sends = ready(core, 0.1, b"w2")
    assert dispatched(sends) == [(b"w2", b"2")] and commands(sends, p.HEARTBEAT) == []


def test_a_worker_registering_in_time_takes_the_queued_job():
    core = make_core(no_worker_timeout=1.0)
    submit(core, 0.0, b"c", b"1")
    assert core.tick(0.5) == []
    assert dispatched(ready(core, 0.9, b"w")) == [(b"w", b"1")]
    assert outcomes(core.tick(1.5)) == []
    assert service_stats(core, 1.5)["failed"] == 0


def test_jobs_queued_behind_busy_workers_never_get_no_worker_error():
    core = make_core(no_worker_timeout=1.0)
    ready(core, 0.0, b"w")
    submit(core, 0.0, b"c", b"1")
    submit(core, 0.0, b"c", b"2")
    command(core, 4.0, b"w", p.HEARTBEAT)  # keep w alive past the no-worker timeout
    assert outcomes(core.tick(5.0)) == []
    assert service_stats(core, 5.0)["queued"] == 1


# -- worker liveness -----------------------------------------------------------------------


def test_silent_worker_expires_its_job_fails_and_it_gets_disconnect():
    core = make_core(heartbeat=1.0, liveness=3)
    ready(core, 0.0, b"w")
    submit(core, 0.0, b"c", b"1")
    sends = core.tick(3.0)  # exactly heartbeat * liveness: not yet
    assert outcomes(sends) == [] and commands(sends, p.DISCONNECT) == []
    sends = core.tick(3.1)
    assert outcomes(sends) == [(b"c", b"1", p.ERR_WORKER_LOST)]
    assert commands(sends, p.DISCONNECT) == [b"w"]
    assert b"w" not in core.workers
    stats = service_stats(core, 3.1)
    assert (stats["workers"], stats["failed"]) == (0, 1)
    # A late heartbeat from it gets DISCONNECT: it must register again.
    assert commands(command(core, 3.2, b"w", p.HEARTBEAT), p.DISCONNECT) == [b"w"]


def test_heartbeat_keeps_a_worker_alive():
    core = make_core(heartbeat=1.0, liveness=3)
    ready(core, 0.0, b"w")
    submit(core, 0.0, b"c", b"1")
    assert command(core, 2.0, b"w", p.HEARTBEAT) == []  # no answer to a known worker
    sends = core.tick(4.5)
    assert outcomes(sends) == [] and commands(sends, p.DISCONNECT) == []
    assert b"w" in core.workers
    # A reply counts as a heartbeat too.
    reply(core, 4.9, b"w", b"c", b"1")
    assert commands(core.tick(7.8), p.DISCONNECT) == []
    assert commands(core.tick(8.0), p.DISCONNECT) == [b"w"]


# -- requeue on DISCONNECT --------------------------------------------------------------------


def _prefetching_worker_with_two_jobs(idle_credit):
    """Worker a (credit 2, short jobs) holds jobs 1 and 2; b then c registered
    afterwards and are idle, in that order."""
    core = make_core()
    ready(core, 0.0, b"a", credit=2)
    now = short_jobs(core, 1.0, [b"a"], job_time=0.01)
    sent = dispatched(submit(core, now, b"cl", b"1") + submit(core, now, b"cl", b"2"))
    assert sent == [(b"a", b"1"), (b"a", b"2")]
    assert commands(ready(core, now, b"b", credit=idle_credit), p.HEARTBEAT) == [b"b"]
    assert commands(ready(core, now, b"c", credit=idle_credit), p.HEARTBEAT) == [b"c"]
    assert [len(core.workers[w].jobs) for w in (b"a", b"b", b"c")] == [2, 0, 0]
    return core, now + 0.01


def test_disconnect_of_an_extended_worker_requeues_its_jobs_in_order():
    core, now = _prefetching_worker_with_two_jobs(idle_credit=1)
    sends = command(core, now, b"a", p.DISCONNECT)
    assert outcomes(sends) == []  # nothing fails
    assert dispatched(sends) == [(b"b", b"1"), (b"c", b"2")]
    assert commands(sends, p.DISCONNECT) == []  # it left: nothing to tell it
    assert b"a" not in core.workers
    stats = service_stats(core, now)
    assert (stats["workers"], stats["busy"], stats["queued"], stats["failed"]) == (2, 2, 0, 0)


def test_requeued_jobs_spread_over_idle_workers_with_credit():
    core, now = _prefetching_worker_with_two_jobs(idle_credit=2)
    sends = command(core, now, b"a", p.DISCONNECT)
    assert outcomes(sends) == []
    assert dispatched(sends) == [(b"b", b"1"), (b"c", b"2")]


def test_disconnect_of_a_plain_worker_fails_its_job():
    core = make_core()
    ready_plain(core, 0.0, b"p")
    ready(core, 0.0, b"e")
    submit(core, 0.0, b"c", b"1")  # to p, idle the longest
    assert core.workers[b"p"].jobs
    sends = command(core, 1.0, b"p", p.DISCONNECT)
    assert outcomes(sends) == [(b"c", b"1", p.ERR_WORKER_LOST)]
    assert dispatched(sends) == []  # not rerun on e: p may have started it
    assert b"p" not in core.workers and service_stats(core)["failed"] == 1


def test_disconnect_from_an_unknown_worker_is_ignored():
    core = make_core()
    assert command(core, 0.0, b"ghost", p.DISCONNECT) == []


# -- sends that failed -----------------------------------------------------------------------


def test_undelivered_request_goes_to_the_next_idle_worker():
    core = make_core()
    ready(core, 0.0, b"a")
    ready(core, 0.0, b"b")
    sends = submit(core, 1.0, b"c", b"1")
    assert dispatched(sends) == [(b"a", b"1")]
    again = core.undelivered(worker_sends(sends), 1.0)
    assert dispatched(again) == [(b"b", b"1")] and outcomes(again) == []
    assert [w.address for w in core.vanished] == [b"a"]
    # a gets nothing more while it is not buried.
    assert dispatched(submit(core, 1.1, b"c", b"2")) == []
    assert service_stats(core, 1.1)["queued"] == 1
    assert dispatched(reply(core, 1.2, b"b", b"c", b"1")) == [(b"b", b"2")]


def test_undelivered_request_goes_back_to_the_head_of_its_queue():
    core = make_core()
    ready(core, 0.0, b"a")
    ready(core, 0.0, b"b")
    first = submit(core, 1.0, b"c", b"1")
    submit(core, 1.0, b"c", b"2")
    assert submit(core, 1.0, b"c", b"3") == []  # queued
    assert core.undelivered([the_send(first, b"1")], 1.0) == []  # nobody idle
    assert [j.msg.request.job_id for j in core.services[SVC].queue] == [b"1", b"3"]
    assert dispatched(reply(core, 1.1, b"b", b"c", b"2")) == [(b"b", b"1")]
    assert dispatched(reply(core, 1.2, b"b", b"c", b"1")) == [(b"b", b"3")]


def test_bury_vanished_fails_the_jobs_the_worker_did_hold():
    core = make_core()
    ready(core, 0.0, b"a", credit=2)
    now = short_jobs(core, 1.0, [b"a"], job_time=0.01)
    held = submit(core, now, b"c", b"1")
    lost = submit(core, now, b"c", b"2")
    assert dispatched(held + lost) == [(b"a", b"1"), (b"a", b"2")]
    # The second REQUEST could not be delivered: job 2 goes back to the queue...
    assert core.undelivered([the_send(lost, b"2")], now) == []
    assert [w.address for w in core.vanished] == [b"a"]
    # ... and to the next worker that registers.
    assert dispatched(ready(core, now + 0.01, b"b")) == [(b"b", b"2")]
    # Job 1 did reach a: once a's last words are read, it is lost.
    sends = core.bury_vanished(now + 0.02)
    assert outcomes(sends) == [(b"c", b"1", p.ERR_WORKER_LOST)]
    assert core.vanished == [] and b"a" not in core.workers
    assert service_stats(core, now)["workers"] == 1


def test_a_failed_heartbeat_marks_a_busy_worker_vanished_and_burial_fails_its_job():
    core = make_core()
    ready(core, 0.0, b"a")
    ready(core, 0.0, b"b")
    submit(core, 1.0, b"c", b"1")  # to a
    probes = core.connection_closed(1.5)
    assert sorted(commands(probes, p.HEARTBEAT)) == [b"a", b"b"]
    to_a = [s for s in probes if s.frames[0] == b"a"]
    assert core.undelivered(to_a, 1.5) == []
    assert [w.address for w in core.vanished] == [b"a"]
    assert outcomes(core.bury_vanished(1.5)) == [(b"c", b"1", p.ERR_WORKER_LOST)]
    # Burying twice is harmless.
    assert core.bury_vanished(1.6) == []


def test_a_vanished_worker_that_sent_disconnect_gets_its_jobs_requeued():
    core = make_core()
    ready(core, 0.0, b"a")
    submit(core, 1.0, b"c", b"1")
    heartbeats = core.connection_closed(1.5)
    core.undelivered(heartbeats, 1.5)
    assert [w.address for w in core.vanished] == [b"a"]
    ready(core, 1.5, b"b")
    # Its last words, read before the burial: DISCONNECT, so job 1 never ran.
    sends = command(core, 1.5, b"a", p.DISCONNECT)
    assert dispatched(sends) == [(b"b", b"1")] and outcomes(sends) == []
    assert core.bury_vanished(1.5) == []
    assert service_stats(core, 1.5)["failed"] == 0


def test_a_vanished_worker_replying_before_its_burial_gets_no_new_job():
    core = make_core()
    ready(core, 0.0, b"a")
    submit(core, 1.0, b"c", b"1")  # a
    submit(core, 1.0, b"c", b"2")  # queued
    core.undelivered(core.connection_closed(1.5), 1.5)
    # Its last words include the reply: the client gets it, the queued job stays.
    sends = reply(core, 1.5, b"a", b"c", b"1")
    assert outcomes(sends) == [(b"c", b"1", "OK")] and worker_sends(sends) == []
    assert core.bury_vanished(1.5) == []  # it held nothing more
    assert dispatched(ready(core, 1.6, b"b")) == [(b"b", b"2")]


def test_a_vanished_worker_gets_no_second_job_through_its_credit():
    core = make_core()
    ready(core, 0.0, b"a", credit=2)
    now = short_jobs(core, 1.0, [b"a"], job_time=0.01)
    assert dispatched(submit(core, now, b"c", b"1")) == [(b"a", b"1")]
    core.undelivered(core.connection_closed(now), now)
    assert submit(core, now, b"c", b"2") == []
    assert service_stats(core, now)["queued"] == 1


def test_undelivered_disconnect_to_an_unknown_peer_changes_nothing():
    core = make_core()
    sends = command(core, 0.0, b"ghost", p.HEARTBEAT)
    assert commands(sends, p.DISCONNECT) == [b"ghost"] and sends[0].worker is None
    assert core.undelivered(sends, 0.0) == [] and core.vanished == []


# -- unexpected commands ---------------------------------------------------------------------


def test_reply_for_a_job_the_worker_does_not_hold_disconnects_it():
    core = make_core()
    ready(core, 0.0, b"w")
    submit(core, 0.0, b"c", b"1")
    sends = reply(core, 0.5, b"w", b"someone-else", b"1")
    assert commands(sends, p.DISCONNECT) == [b"w"]
    assert outcomes(sends) == [(b"c", b"1", p.ERR_WORKER_LOST)]  # its job is not left hanging
    assert b"w" not in core.workers


def test_reply_while_holding_no_job_disconnects_the_worker():
    core = make_core()
    ready(core, 0.0, b"w")
    sends = reply(core, 0.5, b"w", b"c", b"1")
    assert commands(sends, p.DISCONNECT) == [b"w"]
    assert b"w" not in core.workers


def test_reply_from_an_unregistered_address_gets_disconnect():
    core = make_core()
    sends = reply(core, 0.0, b"stranger", b"c", b"1")
    assert commands(sends, p.DISCONNECT) == [b"stranger"] and client_sends(sends) == []
    assert core.workers == {}


def test_heartbeat_from_an_unknown_address_gets_disconnect():
    core = make_core()
    sends = command(core, 0.0, b"stranger", p.HEARTBEAT)
    assert commands(sends, p.DISCONNECT) == [b"stranger"]
    assert core.workers == {}


def test_second_ready_forgets_the_worker_and_fails_its_job():
    core = make_core()
    ready(core, 0.0, b"w")
    submit(core, 0.0, b"c", b"1")
    sends = ready(core, 0.5, b"w")
    assert commands(sends, p.DISCONNECT) == [b"w"]
    assert outcomes(sends) == [(b"c", b"1", p.ERR_WORKER_LOST)]
    assert b"w" not in core.workers and service_stats(core)["workers"] == 0


def test_ready_for_an_mmi_service_gets_disconnect():
    core = make_core()
    sends = ready(core, 0.0, b"w", b"mmi.service")
    assert commands(sends, p.DISCONNECT) == [b"w"]
    assert core.workers == {} and b"mmi.service" not in core.services


@pytest.mark.parametrize("body", [
    [b"1", p.STATUS_OK],  # no result frame
    [b"1", p.STATUS_OK, b"r", b"extra"],
    [b"1", p.STATUS_ERROR, b"ExecutionError", b"m"],  # error with frames missing
    [b"1", b"MAYBE", b"r"],  # unknown status
    [b"other-id", p.STATUS_OK, b"r"],  # not the job it holds
])
def test_malformed_reply_from_an_extended_worker(body):
    core = make_core()
    ready(core, 0.0, b"w")
    submit(core, 0.0, b"c", b"1")
    frames = [b"w", b"", p.MDP_WORKER, p.REPLY, b"c", b"", *body]
    sends = core.worker_message(frames, 0.5)
    assert outcomes(sends) == [(b"c", b"1", p.ERR_BAD_REQUEST)]
    assert commands(sends, p.DISCONNECT) == [b"w"]
    assert b"w" not in core.workers
    stats = service_stats(core, 0.5)
    assert (stats["workers"], stats["done"], stats["failed"]) == (0, 0, 1)


# -- dialects -----------------------------------------------------------------------------------


def test_plain_client_served_by_an_extended_worker():
    core = make_core()
    ready(core, 0.0, b"w")
    sends = submit_plain(core, 0.0, b"plain", SVC, b"ab", b"cd")
    (send,) = worker_sends(sends)
    cmd = p.parse_broker_command(send.frames[1:])
    assert cmd.client == b"plain"
    assert (cmd.request.data, cmd.request.ttl_ms, cmd.request.headers) == (b"abcd", 0, {})
    job_id = cmd.request.job_id
    assert job_id  # the broker names the job for the extended worker
    sends = reply(core, 0.1, b"w", b"plain", job_id, b"RESULT")
    assert [s.frames for s in sends] == [[b"plain", b"", p.MDP_CLIENT, SVC, b"RESULT"]]


def test_plain_clients_jobs_get_distinct_ids():
    core = make_core()
    ready(core, 0.0, b"w1")
    ready(core, 0.0, b"w2")
    ids = [p.parse_broker_command(worker_sends(submit_plain(core, 0.0, b"c"))[0].frames[1:])
           .request.job_id for _ in range(2)]
    assert len(set(ids)) == 2


def test_extended_error_reaches_a_plain_client_as_an_err_body():
    core = make_core()
    ready(core, 0.0, b"w")
    (send,) = worker_sends(submit_plain(core, 0.0, b"plain"))
    job_id = p.parse_broker_command(send.frames[1:]).request.job_id
    sends = reply_error(core, 0.1, b"w", b"plain", job_id, p.ERR_EXECUTION, "boom")
    assert [s.frames for s in sends] == [
        [b"plain", b"", p.MDP_CLIENT, SVC, b"ERR", b"ExecutionError", b"boom"]]
    assert service_stats(core, 0.1)["failed"] == 1


def test_extended_client_served_by_a_plain_worker():
    core = make_core()
    ready_plain(core, 0.0, b"p")
    sends = submit(core, 0.0, b"ext", b"7", data=b"payload", ttl_ms=5000, headers={"k": "v"})
    # A plain worker sees the job data as its one body frame, nothing else.
    assert [s.frames for s in sends] == [
        [b"p", b"", p.MDP_WORKER, p.REQUEST, b"ext", b"", b"payload"]]
    frames = [b"p", b"", p.MDP_WORKER, p.REPLY, b"ext", b"", b"ab", b"c"]
    ((addr, r),) = replies(core.worker_message(frames, 0.1))
    assert (addr, r.job_id, r.ok, r.data) == (b"ext", b"7", True, b"abc")


def test_plain_client_and_plain_worker_keep_their_body_frames():
    core = make_core()
    ready_plain(core, 0.0, b"p")
    sends = submit_plain(core, 0.0, b"plain", SVC, b"a", b"b")
    assert [s.frames for s in sends] == [
        [b"p", b"", p.MDP_WORKER, p.REQUEST, b"plain", b"", b"a", b"b"]]
    frames = [b"p", b"", p.MDP_WORKER, p.REPLY, b"plain", b"", b"x", b"y"]
    assert [s.frames for s in core.worker_message(frames, 0.1)] == [
        [b"plain", b"", p.MDP_CLIENT, SVC, b"x", b"y"]]


def test_extended_client_and_worker_pass_results_and_errors_through():
    core = make_core()
    ready(core, 0.0, b"w")
    sends = submit(core, 0.0, b"ext", b"1", data=b"d", headers={"a": "1", "é": "ü"})
    cmd = p.parse_broker_command(worker_sends(sends)[0].frames[1:])
    assert (cmd.request.job_id, cmd.request.data, cmd.request.headers) == (
        b"1", b"d", {"a": "1", "é": "ü"})
    ((_, ok),) = replies(reply(core, 0.1, b"w", b"ext", b"1", b"R"))
    assert ok == Reply(b"1", True, b"R")
    submit(core, 0.2, b"ext", b"2")
    ((_, err),) = replies(reply_error(core, 0.3, b"w", b"ext", b"2", p.ERR_EXECUTION,
                                     "ValueError: no", "ValueError", "Traceback..."))
    assert err == Reply.error(b"2", p.ERR_EXECUTION, "ValueError: no", "ValueError",
                              "Traceback...")


# -- malformed messages ----------------------------------------------------------------------


@pytest.mark.parametrize("frames", [
    [],
    [b"addr"],
    [b"addr", b"", p.MDP_CLIENT, SVC],  # no body
    [b"addr", b"x", p.MDP_CLIENT, SVC, b"body"],  # no empty delimiter
    [b"addr", b"", b"MDPC02", SVC, b"body"],  # unknown header
    [b"addr", b"", p.EXT_CLIENT, SVC, b"", b"5", b"d"],  # empty job id: nothing to answer to
    [b"addr", b"", p.EXT_CLIENT, SVC, b"i" * 256, b"5", b"d"],  # job id too long
])
def test_malformed_client_messages_that_cannot_be_answered_are_dropped(frames):
    core = make_core()
    ready(core, 0.0, b"w")
    assert core.client_message(frames, 0.0) == []
    assert not core.workers[b"w"].jobs and service_stats(core)["queued"] == 0


@pytest.mark.parametrize("frames", [
    [b"addr", b"", p.EXT_CLIENT, SVC, b"1", b"100"],  # no data
    [b"addr", b"", p.EXT_CLIENT, SVC, b"1", b"-5", b"d"],  # bad ttl
    [b"addr", b"", p.EXT_CLIENT, SVC, b"1", b"5", b"d", b"key"],  # odd headers
    [b"addr", b"", p.EXT_CLIENT, b"s" * 256, b"1", b"5", b"d"],  # service name too long
    [b"addr", b"", p.EXT_CLIENT, b"", b"1", b"5", b"d"],  # empty service name
])
def test_malformed_requests_get_a_protocol_error_at_once(frames):
    core = make_core()
    ready(core, 0.0, b"w")
    assert outcomes(core.client_message(frames, 0.0)) == [(b"addr", b"1", p.ERR_BAD_REQUEST)]
    assert not core.workers[b"w"].jobs and service_stats(core)["queued"] == 0
    assert set(core.services) == {SVC}  # a refused name is not kept


@pytest.mark.parametrize("service", [b"", b"s" * 256])
def test_a_plain_client_with_a_bad_service_name_gets_an_error_body(service):
    core = make_core()
    (send,) = core.client_message([b"addr", b"", p.MDP_CLIENT, service, b"body"], 0.0)
    assert send.frames[:3] == [b"addr", b"", p.MDP_CLIENT]
    assert send.frames[3] == service[:p.MAX_SERVICE_LENGTH]
    assert send.frames[4:6] == [p.STATUS_ERROR, p.ERR_BAD_REQUEST.encode()]


@pytest.mark.parametrize("frames", [
    [],
    [b"w"],
    [b"w", b"", p.MDP_WORKER],
    [b"w", b"", b"MDPW02", p.READY, SVC],
    [b"w", b"", p.MDP_WORKER, b"\x09"],
    [b"w", b"", p.MDP_WORKER, p.READY],
    [b"w", b"", p.MDP_WORKER, p.READY, SVC, b"other/1"],
    [b"w", b"", p.MDP_WORKER, p.READY, SVC, p.EXT_TOKEN, b"65"],
    [b"w", b"", p.MDP_WORKER, p.REPLY, b"c"],
    [b"w", b"", p.MDP_WORKER, p.REPLY, b"c", b"not-empty", b"body"],
    [b"w", b"", p.MDP_WORKER, p.HEARTBEAT, b"extra"],
    [b"w", b"", p.MDP_WORKER, p.DISCONNECT, b"extra"],
])
def test_malformed_worker_messages_are_dropped(frames):
    core = make_core()
    ready(core, 0.0, b"w")
    submit(core, 0.0, b"c", b"1")
    assert core.worker_message(frames, 0.5) == []
    # The worker is neither forgotten nor relieved of its job.
    assert len(core.workers[b"w"].jobs) == 1 and len(core.workers) == 1


# -- a worker of several brokers: PAUSE and RESUME ---------------------------------------------


def test_a_paused_worker_gets_no_job_until_it_resumes():
    core = make_core()
    ready(core, 0.0, b"w1", credit=2)
    ready(core, 0.0, b"w2", credit=2)
    assert command(core, 0.1, b"w1", p.PAUSE) == []
    assert service_stats(core, 0.1)["busy"] == 1  # busy elsewhere
    assert dispatched(submit(core, 0.2, b"c", b"1")) == [(b"w2", b"1")]
    assert submit(core, 0.2, b"c", b"2") == []  # w2 busy, w1 paused: it waits
    assert dispatched(command(core, 0.3, b"w1", p.RESUME)) == [(b"w1", b"2")]
    assert command(core, 0.3, b"w1", p.RESUME) == []  # twice: nothing more


def test_a_worker_paused_while_holding_a_job_finishes_it_then_waits():
    core = make_core()
    ready(core, 0.0, b"w")
    assert dispatched(submit(core, 0.0, b"c", b"1")) == [(b"w", b"1")]
    command(core, 0.1, b"w", p.PAUSE)
    submit(core, 0.1, b"c", b"2")
    sends = reply(core, 0.2, b"w", b"c", b"1")
    assert outcomes(sends) == [(b"c", b"1", "OK")] and dispatched(sends) == []
    assert dispatched(command(core, 0.3, b"w", p.RESUME)) == [(b"w", b"2")]


@pytest.mark.parametrize("register", [None, ready_plain])
def test_pause_from_an_unknown_or_plain_worker_costs_it_its_place(register):
    core = make_core()
    if register:
        register(core, 0.0, b"w")
    sends = command(core, 0.1, b"w", p.PAUSE)
    assert [s.frames for s in sends] == [[b"w", b"", p.MDP_WORKER, p.DISCONNECT]]


# -- refused jobs ----------------------------------------------------------------------------


def test_job_larger_than_max_job_size_fails_with_job_too_large():
    core = make_core(max_job_size=10)
    ready(core, 0.0, b"w")
    sends = submit(core, 0.0, b"c", b"big", data=b"x" * 11)
    assert outcomes(sends) == [(b"c", b"big", p.ERR_TOO_LARGE)] and worker_sends(sends) == []
    assert dispatched(submit(core, 0.0, b"c", b"fits", data=b"x" * 10)) == [(b"w", b"fits")]
    plain = submit_plain(core, 0.0, b"plain", SVC, b"x" * 6, b"y" * 5)  # 11 bytes joined
    assert [s.frames[:6] for s in plain] == [
        [b"plain", b"", p.MDP_CLIENT, SVC, b"ERR", p.ERR_TOO_LARGE.encode()]]


def test_headers_count_toward_max_job_size():
    core = make_core(max_job_size=10)
    ready(core, 0.0, b"w")
    # 4 bytes of data and 6 of headers fit; one byte more does not.
    assert dispatched(submit(core, 0.0, b"c", b"1", data=b"dddd", headers={"kk": "vvvv"})) == [
        (b"w", b"1")]
    sends = submit(core, 0.0, b"c", b"2", data=b"dddd", headers={"kk": "vvvvv"})
    assert outcomes(sends) == [(b"c", b"2", p.ERR_TOO_LARGE)] and worker_sends(sends) == []
    assert p.job_size(Request(SVC, b"1", b"dddd", 0, {"kk": "vvvvv", "é": "ü"})) == 4 + 7 + 4


def test_a_full_queue_fails_new_jobs_with_overloaded_at_once():
    core = make_core(max_queue=2, max_queue_bytes=100_000)
    ready(core, 0.0, b"w")
    assert dispatched(submit(core, 0.0, b"c", b"run")) == [(b"w", b"run")]
    assert submit(core, 0.0, b"c", b"q1") == [] and submit(core, 0.0, b"c", b"q2") == []
    assert outcomes(submit(core, 0.0, b"c", b"q3")) == [(b"c", b"q3", p.ERR_OVERLOADED)]
    assert service_stats(core)["queued"] == 2 and service_stats(core)["failed"] == 1
    # A place frees up as soon as the worker takes the next job.
    assert dispatched(reply(core, 0.1, b"w", b"c", b"run")) == [(b"w", b"q1")]
    assert submit(core, 0.1, b"c", b"q4") == []
    assert service_stats(core, 0.1)["queued"] == 2


def test_queued_bytes_are_bounded_and_given_back():
    core = make_core(max_job_size=1100, max_queue=100, max_queue_bytes=2500)
    ready(core, 0.0, b"w")
    submit(core, 0.0, b"c", b"run", data=b"x" * 1000)
    assert submit(core, 0.0, b"c", b"q1", data=b"x" * 1000) == []
    assert submit(core, 0.0, b"c", b"q2", data=b"x" * 1000, headers={"k": "v"}) == []
    assert service_stats(core)["queued_bytes"] == 2002
    assert outcomes(submit(core, 0.0, b"c", b"big", data=b"x" * 499)) == [
        (b"c", b"big", p.ERR_OVERLOADED)]
    assert submit(core, 0.0, b"c", b"small", data=b"x" * 498) == []  # 2500 exactly
    reply(core, 0.1, b"w", b"c", b"run")
    assert service_stats(core, 0.1)["queued_bytes"] == 1500
    # Requeued, expired and abandoned jobs keep the count true.
    command(core, 0.2, b"w", p.DISCONNECT)  # extended: q1 goes back to the queue
    assert service_stats(core, 0.2)["queued_bytes"] == 2500
    core.tick(0.2 + 1.0)  # no worker for no_worker_timeout: all fail
    assert service_stats(core, 1.2)["queued_bytes"] == 0


def test_services_with_no_worker_and_no_job_are_forgotten():
    from pyramid_powerhose.broker_core import SERVICE_TTL
    core = make_core()
    ready(core, 0.0, b"w")
    for i in range(1000):  # names from a client, none of them served
        outcomes(submit(core, 0.0, b"c", b"%d" % i, service=b"svc%d" % i))
    core.tick(1.0)  # no worker: the jobs fail
    assert len(core.services) == 1001
    core.tick(SERVICE_TTL + 1.0)
    assert set(core.services) == {SVC}  # the served one stays
    assert set(core.stats(SERVICE_TTL + 1.0)["services"]) == {"svc"}
    # A name in use is not forgotten: a job keeps waiting for a worker...
    core = make_core(no_worker_timeout=100.0)
    submit(core, 0.0, b"c", b"1", service=b"waits")
    core.tick(SERVICE_TTL + 1.0)
    assert b"waits" in core.services
    # ...and a worker that leaves keeps its service's stats a while.
    core = make_core()
    ready(core, 0.0, b"w")
    command(core, 5.0, b"w", p.DISCONNECT)
    core.tick(5.0 + SERVICE_TTL - 0.5)
    assert SVC in core.services
    core.tick(5.0 + SERVICE_TTL + 1.5)
    assert SVC not in core.services


def test_the_loop_does_not_look_at_every_service_ever_seen():
    core = make_core(no_worker_timeout=100.0)
    ready(core, 0.0, b"w")
    for i in range(500):
        core.services[b"idle%d" % i] = Poison(b"idle%d" % i)
    submit(core, 0.0, b"c", b"1")
    submit(core, 0.0, b"c", b"2")  # queued
    assert core.poll_timeout() < 1000 * core.heartbeat  # a job waits: a short sleep
    core.tick(0.5)
    assert not core.drained()
    reply(core, 0.6, b"w", b"c", b"1")
    reply(core, 0.7, b"w", b"c", b"2")
    assert core.poll_timeout() == 1000 * core.heartbeat


class Poison:
    """A service the loop must not touch between sweeps: any attribute raises."""

    def __init__(self, name):
        object.__setattr__(self, "_name", name)

    def __getattr__(self, name):
        raise AssertionError(f"the loop looked at service {self._name!r}")


def test_jobs_while_stopping_fail_with_no_worker():
    core = make_core()
    ready(core, 0.0, b"w")
    core.request_stop(1.0)
    sends = submit(core, 1.0, b"c", b"1")
    assert outcomes(sends) == [(b"c", b"1", p.ERR_NO_WORKER)] and worker_sends(sends) == []
    assert not core.workers[b"w"].jobs


# -- 8/MMI -------------------------------------------------------------------------------------


def mmi(core, now, service, body=b""):
    """An 8/MMI query from a plain client; the reply's one body frame."""
    (send,) = core.client_message([b"q", b"", p.MDP_CLIENT, service, body], now)
    assert not send.to_worker and send.frames[:4] == [b"q", b"", p.MDP_CLIENT, service]
    (value,) = send.frames[4:]
    return value


def test_mmi_service_answers_200_when_a_worker_serves_it_else_404():
    core = make_core()
    assert mmi(core, 0.0, p.MMI_SERVICE, SVC) == p.MMI_NOT_FOUND
    submit(core, 0.0, b"c", b"1")  # a queue, no worker: still 404
    assert mmi(core, 0.0, p.MMI_SERVICE, SVC) == p.MMI_NOT_FOUND
    ready(core, 0.1, b"w")
    assert mmi(core, 0.1, p.MMI_SERVICE, SVC) == p.MMI_FOUND
    assert mmi(core, 0.1, p.MMI_SERVICE, b"other") == p.MMI_NOT_FOUND
    command(core, 0.2, b"w", p.DISCONNECT)
    assert mmi(core, 0.2, p.MMI_SERVICE, SVC) == p.MMI_NOT_FOUND


def test_mmi_ping_answers_the_pid_and_stats_the_core_stats():
    core = make_core(now=100.0)
    assert mmi(core, 100.0, p.MMI_PING) == str(PID).encode()
    ready(core, 100.0, b"w")
    submit(core, 101.0, b"c", b"1")
    assert json.loads(mmi(core, 102.5, p.MMI_STATS)) == core.stats(102.5)
    assert mmi(core, 102.5, b"mmi.x") == p.MMI_NOT_IMPLEMENTED


def test_mmi_for_an_extended_client_and_while_stopping():
    core = make_core()
    core.request_stop(0.0)
    req = Request(b"mmi.ping", b"9", b"")
    ((addr, r),) = replies(core.client_message([b"ext", *p.client_request(req)], 0.5))
    assert (addr, r.job_id, r.ok, r.data) == (b"ext", b"9", True, str(PID).encode())


# -- statistics ---------------------------------------------------------------------------------


def counts(service_stats):
    """A service's stats without its histograms."""
    return {k: v for k, v in service_stats.items() if not k.endswith("_seconds")}


def test_histograms_count_wait_run_and_total_times_by_bucket():
    from pyramid_powerhose.broker_core import BUCKETS
    core = make_core()
    ready(core, 0.0, b"w")
    submit(core, 1.0, b"c", b"1")  # straight to the worker: waits 0
    submit(core, 1.0, b"c", b"2")  # waits for the first: 0.3 s
    reply(core, 1.3, b"w", b"c", b"1")  # ran 0.3 s
    reply(core, 1.302, b"w", b"c", b"2")  # ran 2 ms
    svc = service_stats(core, 2.0)

    def per_bucket(histogram):
        cumulative = [count for _, count in histogram["buckets"]]
        return {bound: n for bound, n in zip(
            [*BUCKETS, "+Inf"], [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])])
            if n}

    assert per_bucket(svc["wait_seconds"]) == {0.0001: 1, 0.5: 1}
    assert per_bucket(svc["run_seconds"]) == {0.0025: 1, 0.5: 1}
    assert per_bucket(svc["total_seconds"]) == {0.5: 2}
    assert svc["run_seconds"]["count"] == 2 and svc["run_seconds"]["sum"] == 0.302
    assert svc["wait_seconds"]["buckets"][-1] == ["+Inf", 2]


def test_jobs_per_second_counts_the_last_minute_only():
    core = make_core()
    ready(core, 0.0, b"w")
    for i in range(30):
        submit(core, 10.0 + i, b"c", b"%d" % i)
        reply(core, 10.5 + i, b"w", b"c", b"%d" % i)
    assert service_stats(core, 40.0)["jobs_per_second"] == 0.5
    assert service_stats(core, 69.0)["jobs_per_second"] == 0.5  # seconds 10 to 69
    assert service_stats(core, 70.0)["jobs_per_second"] == round(29 / 60, 3)  # second 10 left
    assert service_stats(core, 200.0)["jobs_per_second"] == 0.0


def test_workers_are_listed_and_their_departures_counted():
    core = make_core()
    ready(core, 0.0, b"a", credit=2)
    assert core.worker_message([b"a", *p.worker_info(b"4321@web1.example")], 0.0) == []
    ready(core, 0.0, b"b")
    ready_plain(core, 1.0, b"c")
    submit(core, 2.0, b"cl", b"1")  # a
    reply(core, 2.25, b"a", b"cl", b"1")
    workers = {w["address"]: w for w in core.stats(3.0)["workers"]}
    assert workers[b"a".hex()] == {"address": b"a".hex(), "pid": 4321, "host": "web1.example",
                                   "service": "svc", "extended": True,
                                   "credit": 2, "holding": 0, "paused": False, "jobs": 1,
                                   "age": 3.0, "last_job_ms": 250.0}
    assert workers[b"c".hex()]["extended"] is False and workers[b"c".hex()]["age"] == 2.0
    assert (workers[b"b".hex()]["pid"], workers[b"b".hex()]["host"]) == (None, None)
    command(core, 4.0, b"a", p.DISCONNECT)
    core.undelivered([Send_to(core, b"b")], 4.0)
    core.bury_vanished(4.0)
    core.tick(4.0 + 3.0 * 1.0 + 0.1)  # c missed its heartbeats
    assert core.stats(10.0)["worker_events"] == {"registered": 3, "left": 1, "lost": 1,
                                                  "expired": 1}
    assert core.stats(10.0)["workers"] == []


def test_info_from_an_unknown_worker_is_ignored():
    core = make_core()
    assert core.worker_message([b"x", *p.worker_info(b"1@h")], 0.0) == []
    assert core.workers == {}


def test_a_client_that_asks_is_told_which_worker_ran_its_job():
    core = make_core()
    ready(core, 0.0, b"a")
    core.worker_message([b"a", *p.worker_info(b"4321@web1")], 0.0)
    asked = {p.WORKER_HEADER: "1", "k": "v"}
    (request,) = worker_sends(submit(core, 1.0, b"c", b"1", headers=asked))
    # The question is the broker's: the worker gets the job's own headers only.
    assert request.frames == [b"a", b"", p.MDP_WORKER, p.REQUEST, b"c", b"",
                              b"1", b"0", b"data", b"k", b"v"]
    (sent,) = client_sends(reply(core, 1.5, b"a", b"c", b"1"))
    assert sent.frames == [b"c", b"", p.EXT_CLIENT, SVC, b"1", b"OK", b"result", b"4321@web1"]
    submit(core, 2.0, b"c", b"2", headers=asked)
    (sent,) = client_sends(reply_error(core, 2.5, b"a", b"c", b"2"))
    assert sent.frames == [b"c", b"", p.EXT_CLIENT, SVC, b"2", b"ERR", p.ERR_EXECUTION.encode(),
                           b"boom", b"ValueError", b"tb", b"4321@web1"]
    # Not asked: the reply is as it always was.
    submit(core, 3.0, b"c", b"3", headers={"k": "v"})
    (sent,) = client_sends(reply(core, 3.5, b"a", b"c", b"3"))
    assert sent.frames == [b"c", b"", p.EXT_CLIENT, SVC, b"3", b"OK", b"result"]
    # Lost with its worker (silent past its liveness): who it was.
    submit(core, 4.0, b"c", b"4", headers=asked)
    (sent,) = client_sends(core.tick(10.0))
    assert sent.frames[4:7] == [b"4", b"ERR", p.ERR_WORKER_LOST.encode()]
    assert sent.frames[-1] == b"4321@web1" and len(sent.frames) == 11
    # Never ran (no worker left): nobody.
    submit(core, 11.0, b"c", b"5", headers=asked)
    (sent,) = client_sends(core.tick(13.0))
    assert sent.frames[4:7] == [b"5", b"ERR", p.ERR_NO_WORKER.encode()]
    assert sent.frames[-1] == b"" and len(sent.frames) == 11


def test_a_worker_that_did_not_say_who_it_is_is_nobody():
    core = make_core()
    ready_plain(core, 0.0, b"p")
    submit(core, 1.0, b"c", b"1", headers={p.WORKER_HEADER: "1"})
    (sent,) = client_sends(core.worker_message(
        [b"p", b"", p.MDP_WORKER, p.REPLY, b"c", b"", b"r"], 1.5))
    assert sent.frames == [b"c", b"", p.EXT_CLIENT, SVC, b"1", b"OK", b"r", b""]
    submit(core, 2.0, b"c", b"2")
    (sent,) = client_sends(core.worker_message(
        [b"p", b"", p.MDP_WORKER, p.REPLY, b"c", b"", b"r"], 2.5))
    assert sent.frames == [b"c", b"", p.EXT_CLIENT, SVC, b"2", b"OK", b"r"]


def Send_to(core, address):
    """A send to ``address`` that failed (its connection is gone)."""
    from pyramid_powerhose.broker_core import Send
    return Send(p.backend_command(address, p.HEARTBEAT), True, core.workers[address], None)


def test_stats_after_a_scripted_sequence():
    core = make_core(now=10.0)
    ready(core, 10.0, b"a")
    ready(core, 10.0, b"b")
    ready(core, 10.0, b"c")
    stats = core.stats(10.0)
    assert {k: v for k, v in stats.items() if k not in ("services", "workers")} == {
        "pid": PID, "engine": "", "uptime": 0.0,
        "frontend": "ipc:///tmp/x/front.sock", "backend": "ipc:///tmp/x/back.sock",
        "stopping": False,
        "worker_events": {"registered": 3, "left": 0, "lost": 0, "expired": 0},
    }
    assert counts(stats["services"]["svc"]) == {
        "workers": 3, "idle": 3, "busy": 0, "queued": 0, "queued_bytes": 0, "done": 0,
        "failed": 0, "job_ms": None, "outcomes": {}, "jobs_per_second": 0.0}
    submit(core, 11.0, b"cl", b"1")  # a
    reply(core, 11.010, b"a", b"cl", b"1")  # 10 ms
    assert service_stats(core, 11.010)["job_ms"] == 10.0
    submit(core, 12.0, b"cl", b"2")  # b
    reply_error(core, 12.060, b"b", b"cl", b"2")  # 60 ms: 10 + 0.2 * 50
    assert service_stats(core, 12.060)["job_ms"] == 20.0
    submit(core, 13.0, b"cl", b"3")  # c
    submit(core, 13.0, b"cl", b"4")  # a
    submit(core, 13.0, b"cl", b"5")  # b
    submit(core, 13.0, b"cl", b"6")  # queued
    submit(core, 13.0, b"cl", b"7", ttl_ms=100)  # queued, times out
    for worker in (b"a", b"b", b"c"):
        command(core, 13.0, worker, p.HEARTBEAT)
    assert outcomes(core.tick(13.5)) == [(b"cl", b"7", p.ERR_TIMEOUT)]
    stats = core.stats(15.25)
    assert stats["uptime"] == 5.25 and stats["stopping"] is False
    assert counts(stats["services"]["svc"]) == {
        "workers": 3, "idle": 0, "busy": 3, "queued": 1, "queued_bytes": len(b"data"),
        "done": 1, "failed": 2, "job_ms": 20.0,
        "outcomes": {"OK": 1, p.ERR_EXECUTION: 1, p.ERR_TIMEOUT: 1},
        "jobs_per_second": round(2 / 60, 3)}  # two jobs ended within the last minute
    core.request_stop(16.0)
    assert core.stats(16.0)["stopping"] is True


# -- heartbeats ---------------------------------------------------------------------------------


def test_tick_heartbeats_every_worker_at_the_heartbeat_interval():
    core = make_core(heartbeat=1.0)
    ready(core, 0.0, b"a")
    ready_plain(core, 0.0, b"b")
    assert sorted(commands(core.tick(0.0), p.HEARTBEAT)) == [b"a", b"b"]
    for t in (0.5, 0.99):
        command(core, t, b"a", p.HEARTBEAT)
        command(core, t, b"b", p.HEARTBEAT)
        assert commands(core.tick(t), p.HEARTBEAT) == []
    assert sorted(commands(core.tick(1.0), p.HEARTBEAT)) == [b"a", b"b"]
    assert commands(core.tick(1.5), p.HEARTBEAT) == []
    assert sorted(commands(core.tick(2.0), p.HEARTBEAT)) == [b"a", b"b"]
    # Each heartbeat send names its worker, for undelivered().
    assert {s.worker.address for s in core.tick(3.0)} == {b"a", b"b"}


def test_heartbeats_are_never_further_apart_than_the_cap():
    core = make_core(heartbeat=10.0)
    ready(core, 0.0, b"w")
    assert commands(core.tick(0.0), p.HEARTBEAT) == [b"w"]
    assert commands(core.tick(MAX_HEARTBEAT_INTERVAL - 0.1), p.HEARTBEAT) == []
    assert commands(core.tick(MAX_HEARTBEAT_INTERVAL), p.HEARTBEAT) == [b"w"]
    assert commands(core.tick(2 * MAX_HEARTBEAT_INTERVAL), p.HEARTBEAT) == [b"w"]
    assert core.poll_timeout() == 10000


def test_connection_closed_probes_at_once_and_polls_fast():
    core = make_core(heartbeat=1.0)
    ready(core, 0.0, b"a")
    ready(core, 0.0, b"b")
    core.tick(0.0)
    assert core.poll_timeout() == 1000
    sends = core.connection_closed(0.3)
    assert sorted(commands(sends, p.HEARTBEAT)) == [b"a", b"b"]
    assert all(s.worker is core.workers[s.frames[0]] for s in sends)
    assert core.poll_timeout() == 50
    assert sorted(commands(core.tick(0.3 + PROBE_INTERVAL), p.HEARTBEAT)) == [b"a", b"b"]


def test_connection_closed_sends_all_its_probes_50_ms_apart():
    core = make_core(heartbeat=1.0)
    ready(core, 0.0, b"w")
    core.tick(0.0)
    assert commands(core.connection_closed(0.3), p.HEARTBEAT) == [b"w"]
    for i in range(1, PROBES):
        t = 0.3 + i * PROBE_INTERVAL + 0.001
        assert commands(core.tick(t), p.HEARTBEAT) == [b"w"], f"probe {i + 1}"
    assert core.poll_timeout() == 1000


# -- stopping ----------------------------------------------------------------------------------


def test_stopping_finishes_running_and_queued_jobs_within_the_grace():
    core = make_core(grace=10.0)
    ready(core, 0.0, b"a")
    ready(core, 0.0, b"b")
    submit(core, 0.0, b"c", b"1")  # a
    submit(core, 0.0, b"c", b"2")  # b
    submit(core, 0.0, b"c", b"3")  # queued
    core.request_stop(1.0)
    assert not core.drained() and core.poll_timeout() == 50
    assert outcomes(core.tick(2.0)) == []
    sends = reply(core, 3.0, b"a", b"c", b"1")
    assert outcomes(sends) == [(b"c", b"1", "OK")] and dispatched(sends) == [(b"a", b"3")]
    assert not core.drained()
    reply(core, 4.0, b"b", b"c", b"2")
    assert not core.drained()
    assert outcomes(reply(core, 5.0, b"a", b"c", b"3")) == [(b"c", b"3", "OK")]
    assert core.drained()
    assert outcomes(core.tick(20.0)) == []  # nothing left to abandon


def test_drained_is_false_until_stopping():
    core = make_core()
    assert not core.drained()
    core.request_stop(0.0)
    assert core.drained()


def test_past_the_grace_queued_and_running_jobs_fail():
    core = make_core(grace=10.0)
    ready(core, 0.0, b"w")
    submit(core, 0.0, b"c", b"running")
    submit(core, 0.0, b"c", b"queued")
    core.request_stop(1.0)
    command(core, 10.0, b"w", p.HEARTBEAT)
    assert outcomes(core.tick(10.9)) == [] and not core.drained()
    sends = core.tick(11.0)
    assert sorted(outcomes(sends)) == [(b"c", b"queued", p.ERR_NO_WORKER),
                                       (b"c", b"running", p.ERR_WORKER_LOST)]
    assert core.drained()
    # The late reply of the abandoned job is dropped, not sent twice.
    assert client_sends(reply(core, 11.5, b"w", b"c", b"running")) == []
    assert service_stats(core, 11.5)["failed"] == 2


def test_disconnect_all_tells_every_worker():
    core = make_core()
    ready(core, 0.0, b"a")
    ready_plain(core, 0.0, b"b")
    ready(core, 0.0, b"c", b"other")
    sends = core.disconnect_all()
    assert sorted(commands(sends, p.DISCONNECT)) == [b"a", b"b", b"c"]
    assert len(sends) == 3 and core.workers == {}


def test_jobs_requeued_while_stopping_run_on_a_worker_that_finished():
    core = make_core(grace=10.0)
    ready(core, 0.0, b"a")
    ready(core, 0.0, b"b")
    submit(core, 0.0, b"c", b"1")  # a
    submit(core, 0.0, b"c", b"2")  # b, which will leave without running it
    core.request_stop(1.0)
    reply(core, 2.0, b"a", b"c", b"1")  # a is free
    sends = command(core, 3.0, b"b", p.DISCONNECT)
    assert dispatched(sends) == [(b"a", b"2")]


# -- poll timeout -------------------------------------------------------------------------------


def test_poll_timeout_is_the_heartbeat_when_idle_and_50_ms_while_jobs_wait():
    core = make_core(heartbeat=1.5)
    assert core.poll_timeout() == 1500
    ready(core, 0.0, b"w")
    submit(core, 0.0, b"c", b"1")
    assert core.poll_timeout() == 1500  # running, nothing queued
    submit(core, 0.0, b"c", b"2")
    assert core.poll_timeout() == 50
    reply(core, 0.1, b"w", b"c", b"1")
    assert core.poll_timeout() == 1500
