"""The client's lease bookkeeping (leases.Leases), alone: no sockets, the
watcher's clock given by hand."""

import threading
import time

import pytest

from pyramid_powerhose import exc, leases, protocol
from pyramid_powerhose.leases import LEASE_BEAT, WISH_GAP, WISH_REPEAT, Leases
from pyramid_powerhose.protocol import LeaseNotice


def far():
    """A deadline no test reaches (taken when used: a constant of the module
    would have passed by the time a long run gets here)."""
    return time.monotonic_ns() + 60 * 10 ** 9


class Pokes:
    def __init__(self):
        self.count = 0

    def __call__(self):
        self.count += 1


@pytest.fixture
def pokes():
    return Pokes()


@pytest.fixture
def direct(pokes):
    return Leases(wake=pokes)


def grant(direct, epoch, credit=2, service=b"s"):
    direct.notice(LeaseNotice(protocol.LEASE_GRANT, service, epoch,
                              b"ipc:///tmp/w%d.sock" % epoch, credit))


def revoke(direct, epoch, reason=protocol.REVOKE_SHARE, service=b"s"):
    direct.notice(LeaseNotice(protocol.LEASE_REVOKE, service, epoch, reason=reason))


def sent(out):
    """The messages due, as (command, service, number) tuples."""
    return [tuple(m[2:]) for m in out]


def test_an_idle_process_keeps_to_the_lease_it_used_last(direct):
    grant(direct, 1)
    grant(direct, 2)
    first = direct.take(b"s", far())
    direct.release(first)
    for _ in range(3):  # one job at a time: the warm worker, every time
        again = direct.take(b"s", far())
        assert again is first
        direct.release(again)
    other = direct.take(b"s", far())
    assert direct.take(b"s", far()) is not other  # two at once: both leases
    assert other is first


def test_least_loaded_then_least_recently_used(direct):
    grant(direct, 1)
    grant(direct, 2)
    direct.services[b"s"].job_time = 0.001  # short jobs: a lease's whole credit is used
    a = direct.take(b"s", far())
    b = direct.take(b"s", far())
    assert {a.epoch, b.epoch} == {1, 2}  # the least loaded first
    c = direct.take(b"s", far())
    assert c is a  # both busy, at 1: the least recently used
    direct.release(b)
    d = direct.take(b"s", far())
    assert d is b  # now the least loaded
    e = direct.take(b"s", far())
    assert e is b  # a at 2 = its credit
    assert a.in_flight == 2 and b.in_flight == 2


def test_credit_beyond_one_only_while_jobs_are_short(direct):
    grant(direct, 1)  # credit 2
    a = direct.take(b"s", far())
    assert a.epoch == 1
    with pytest.raises(exc.TimeoutError):  # no job time yet: one job a lease
        direct.take(b"s", time.monotonic_ns() + 20_000_000)
    direct.release(a, None, 300_000_000)  # 0.3 s: long
    assert direct.take(b"s", far()) is a
    with pytest.raises(exc.TimeoutError):
        direct.take(b"s", time.monotonic_ns() + 20_000_000)
    for _ in range(30):  # short ones, until the average says so
        direct.release(a, None, 1_000_000)
        assert direct.take(b"s", far()) is a
    assert direct.take(b"s", far()) is a and a.in_flight == 2


def waiting(direct, count):
    deadline = time.monotonic() + 5
    while direct.services[b"s"].waiting != count and time.monotonic() < deadline:
        time.sleep(0.001)
    assert direct.services[b"s"].waiting == count


def busy_answer(direct, service=b"s"):
    direct.notice(LeaseNotice(protocol.LEASE_BUSY, service, 0))


def one_busy_and_one_asking(direct):
    """Short jobs so far (a lease's credit is used): a job on the one lease,
    and one more from a thread, which would join it and waits for the
    broker's answer.  (the busy lease, [what the thread's take returns], the
    thread)"""
    grant(direct, 1)
    direct.services[b"s"].job_time = 0.001
    busy = direct.take(b"s", far())
    got = []
    thread = threading.Thread(target=lambda: got.append(direct.take(b"s", far())))
    thread.start()
    waiting(direct, 1)
    return busy, got, thread


def test_a_job_asks_for_an_idle_worker_before_joining_a_busy_lease(direct, monkeypatch):
    """Short jobs so far (a lease's credit is used), but this one may be
    long: before it joins a busy lease, it asks the broker for a worker and
    takes the grant that comes, as the broker uses credit only when no
    worker is idle."""
    monkeypatch.setattr(leases, "ANSWER_WAIT", 30.0)  # only an answer ends the wait
    busy, got, thread = one_busy_and_one_asking(direct)
    assert sent(direct.due(1.0)[0])[0] == (b"LEASE", b"s", b"1")  # it asked
    grant(direct, 2)
    thread.join(5)
    assert got[0].epoch == 2 and busy.in_flight == 1


def test_busy_joins_the_waiting_job_and_the_next_ones_at_once(direct, pokes, monkeypatch):
    monkeypatch.setattr(leases, "ANSWER_WAIT", 30.0)
    first, got, thread = one_busy_and_one_asking(direct)
    direct.due(1.0)  # the wish of 1 goes
    busy_answer(direct)  # no idle worker
    thread.join(5)
    assert got == [first] and first.in_flight == 2
    direct.release(first)
    before = pokes.count
    started = time.monotonic()
    assert direct.take(b"s", far()) is first  # the broker holds the wish: no asking
    assert time.monotonic() - started < 5 and pokes.count == before
    # Once the wish held is granted, the next job that would join asks again.
    grant(direct, 2)
    direct.take(b"s", far())  # the idle new lease
    direct.release(first)  # both leases at one job each now
    got = []
    thread = threading.Thread(target=lambda: got.append(direct.take(b"s", far())))
    thread.start()
    waiting(direct, 1)
    assert pokes.count == before + 1
    busy_answer(direct)
    thread.join(5)
    assert got[0].in_flight == 2


def test_no_answer_counts_as_busy(direct, monkeypatch):
    monkeypatch.setattr(leases, "ANSWER_WAIT", 0.01)
    grant(direct, 1)
    direct.services[b"s"].job_time = 0.001
    first = direct.take(b"s", far())
    assert direct.take(b"s", far()) is first  # no answer within ANSWER_WAIT: it joins
    direct.release(first)
    monkeypatch.setattr(leases, "ANSWER_WAIT", 30.0)
    direct.due(1.0)  # the wish goes: the broker holds it
    started = time.monotonic()
    assert direct.take(b"s", far()) is first and first.in_flight == 2
    assert time.monotonic() - started < 5  # as after BUSY: no wait at all


def test_a_job_with_no_lease_waits_for_the_answer_to_the_wish_out(direct, monkeypatch):
    """Jobs one after another: the second must not go relayed (and take back
    the worker being leased) while the grant is on its way; after BUSY,
    jobs go relayed at once."""
    monkeypatch.setattr(leases, "ANSWER_WAIT", 30.0)
    assert direct.take(b"s", far()) is None  # relayed: the wish of 1
    direct.due(1.0)
    direct.relayed(b"s")
    got = []
    thread = threading.Thread(target=lambda: got.append(direct.take(b"s", far())))
    thread.start()
    waiting(direct, 1)
    grant(direct, 7)
    thread.join(5)
    assert got[0].epoch == 7
    direct.release(got[0])
    revoke(direct, 7)
    out, _ = direct.due(1.5)  # the RETURN
    assert direct.take(b"s", far()) is None  # no lease, no wish out: relayed at once
    direct.due(2.0)  # the wish
    busy_answer(direct)
    direct.relayed(b"s")
    started = time.monotonic()
    assert direct.take(b"s", far()) is None  # BUSY: relayed at once
    assert time.monotonic() - started < 5


def test_a_grant_counts_off_the_wish_as_at_the_broker(direct, pokes):
    assert direct.take(b"s", far()) is None  # relayed: a wish of 1
    assert sent(direct.due(1.0)[0])[0] == (b"LEASE", b"s", b"1")
    grant(direct, 1, credit=1)  # the broker's wish for us is 0 again
    direct.relayed(b"s")
    direct.take(b"s", far())
    before = pokes.count
    with pytest.raises(exc.TimeoutError):  # waits for room: asks again
        direct.take(b"s", time.monotonic_ns() + 20_000_000)
    assert pokes.count == before + 1


def test_no_lease_means_relayed_and_a_wish(direct, pokes):
    assert direct.take(b"s", far()) is None
    assert pokes.count == 1
    assert direct.take(b"s", far()) is None
    out, wake = direct.due(10.0)
    assert sent(out) == [(b"LEASE", b"s", b"2"), (b"HEARTBEAT",)]
    direct.relayed(b"s")
    direct.relayed(b"s")
    # Dropping to 0 does not wake the watcher; the wish is withdrawn when it
    # is due again, a second later, and the heartbeats stop with it.
    assert pokes.count == 1
    out, wake = direct.due(10.5)
    assert out == [] and wake == pytest.approx(10.0 + min(WISH_REPEAT, LEASE_BEAT))
    out, wake = direct.due(11.0)
    assert sent(out) == [(b"LEASE", b"s", b"0")]
    out, wake = direct.due(12.0)
    assert out == [] and wake is None


def test_a_relayed_job_over_before_the_watcher_looks_still_asks(direct, pokes):
    assert direct.take(b"s", far()) is None
    assert pokes.count == 1
    direct.relayed(b"s")  # a quick broker: the reply came before the watcher woke
    out, _ = direct.due(10.0)
    assert sent(out) == [(b"LEASE", b"s", b"1"), (b"HEARTBEAT",)]
    # Said once: the next repeat says what is wanted now.
    out, _ = direct.due(10.0 + WISH_REPEAT)
    assert sent(out) == [(b"LEASE", b"s", b"0")]


def test_a_job_that_did_not_grow_the_wish_leaves_nothing_to_say(direct, pokes):
    assert direct.take(b"s", far()) is None
    out, _ = direct.due(10.0)
    assert sent(out)[0] == (b"LEASE", b"s", b"1")
    direct.relayed(b"s")
    assert direct.take(b"s", far()) is None  # within the wish held: no poke
    direct.relayed(b"s")
    assert pokes.count == 1
    grant(direct, 1)  # the wish held is spent; nothing waits or relays
    out, _ = direct.due(10.1)
    assert out == []


def test_wishes_are_paced_and_repeated(direct, pokes):
    direct.take(b"s", far())
    out, _ = direct.due(100.0)
    assert sent(out)[0] == (b"LEASE", b"s", b"1")
    direct.take(b"s", far())  # it grows: the watcher is woken
    assert pokes.count == 2
    out, wake = direct.due(100.004)  # too soon after the last
    assert out == [] and wake == pytest.approx(100.0 + WISH_GAP)
    out, wake = direct.due(100.0 + WISH_GAP)
    assert sent(out) == [(b"LEASE", b"s", b"2")]
    direct.relayed(b"s")  # shrinking is said only with the next repeat
    out, _ = direct.due(100.5)
    assert out == []
    out, _ = direct.due(100.0 + WISH_GAP + WISH_REPEAT)
    assert (b"LEASE", b"s", b"1") in sent(out)


def test_heartbeats_while_holding(direct):
    grant(direct, 7)
    out, wake = direct.due(5.0)
    assert sent(out) == [(b"HEARTBEAT",)] and wake == 5.0 + LEASE_BEAT
    out, _ = direct.due(5.5)
    assert out == []
    out, _ = direct.due(6.0)
    assert sent(out) == [(b"HEARTBEAT",)]


def test_revoke_returns_once_nothing_is_in_flight(direct):
    grant(direct, 1)
    lease = direct.take(b"s", far())
    revoke(direct, 1)
    assert lease.revoked == protocol.REVOKE_SHARE and not lease.gone
    assert direct.take(b"s", far()) is None  # not chosen any more: relayed
    assert direct.due(1.0)[0][0][2] == b"LEASE"  # no RETURN yet
    direct.release(lease)
    assert lease.gone
    out, _ = direct.due(2.0)
    assert (b"RETURN", b"s", b"1") in sent(out)
    out, _ = direct.due(3.0)
    assert not [m for m in sent(out) if m[0] == b"RETURN"]


def test_revoke_of_an_idle_or_unknown_lease_returns_at_once(direct):
    grant(direct, 1)
    revoke(direct, 1)
    revoke(direct, 99, protocol.REVOKE_LEAVING)
    out, _ = direct.due(1.0)
    assert [m for m in sent(out) if m[0] == b"RETURN"] == [
        (b"RETURN", b"s", b"1"), (b"RETURN", b"s", b"99")]


def test_not_run_stops_choosing_it_without_a_return(direct):
    grant(direct, 1)
    lease = direct.take(b"s", far())
    direct.release(lease, protocol.NOT_RUN_LEASE)
    assert lease.gone
    assert not [m for m in sent(direct.due(1.0)[0]) if m[0] == b"RETURN"]
    revoke(direct, 1)  # the broker's REVOKE, later: answered
    assert (b"RETURN", b"s", b"1") in sent(direct.due(2.0)[0])


def test_waiting_for_room_then_a_grant(direct):
    grant(direct, 1, credit=1)
    first = direct.take(b"s", far())
    got = []
    thread = threading.Thread(target=lambda: got.append(direct.take(b"s", far())))
    thread.start()
    deadline = time.monotonic() + 5
    while direct.services[b"s"].waiting != 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert sent(direct.due(1.0)[0])[0] == (b"LEASE", b"s", b"1")  # the waiting job
    grant(direct, 2, credit=1)
    thread.join(5)
    assert got[0].epoch == 2
    direct.release(first)


def test_waiting_then_the_last_lease_revoked_goes_relayed(direct):
    grant(direct, 1, credit=1)
    first = direct.take(b"s", far())
    got = []
    thread = threading.Thread(target=lambda: got.append(direct.take(b"s", far())))
    thread.start()
    deadline = time.monotonic() + 5
    while direct.services[b"s"].waiting != 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    revoke(direct, 1)
    thread.join(5)
    assert got == [None] and direct.services[b"s"].relaying == 1
    direct.release(first)


def test_waiting_for_room_times_out(direct):
    grant(direct, 1, credit=1)
    direct.take(b"s", far())
    with pytest.raises(exc.TimeoutError):
        direct.take(b"s", time.monotonic_ns() + 50 * 10 ** 6)
    assert direct.services[b"s"].waiting == 0


def test_broker_lost_drops_everything(direct):
    grant(direct, 1)
    grant(direct, 2)
    busy = direct.take(b"s", far())
    direct.due(1.0)
    direct.drop_all()
    assert direct.take(b"s", far()) is None
    assert not busy.gone  # its job finishes
    direct.release(busy)
    assert busy.gone and direct.by_epoch == {}
    out, _ = direct.due(2.0)
    assert sent(out) == [(b"LEASE", b"s", b"1"), (b"HEARTBEAT",)]  # said again, no RETURN
