"""Several brokers: workers serving them all, clients spreading jobs over them.

Real brokers and workers on private ipc endpoints; PROTOCOL.rst, "Several
brokers: PAUSE and RESUME" and "When the broker goes away".
"""

import threading
import time
from types import SimpleNamespace

import pytest
from pyramid import testing
from pyramid.exceptions import ConfigurationError

from pyramid_powerhose import Client, exc
from pyramid_powerhose import protocol
from pyramid_powerhose.client import _Broker, choose
from pyramid_powerhose.settings import Settings
from pyramid_powerhose.worker import Worker, _Broker as WorkerBroker
from tests.conftest import wait_for

TIMEOUT = 10.0  # each job's; every wait below is generous


class Pair:
    """Two brokers' endpoints in the test's private directory."""

    def __init__(self, run_dir):
        self.front = {name: f"ipc://{run_dir}/{name}-front.sock" for name in "AB"}
        self.back = {name: f"ipc://{run_dir}/{name}-back.sock" for name in "AB"}


@pytest.fixture
def pair(run_dir):
    return Pair(run_dir)


@pytest.fixture
def brokers(pair, start_broker):
    def start(*names):
        return {name: start_broker(frontend=pair.front[name], backend=pair.back[name])
                for name in names}
    return start


@pytest.fixture
def worker_on(pair, start_worker):
    def start(*names, target="tests.targets:sleep", args=()):
        more = [arg for name in names[1:] for arg in ("--backend", pair.back[name])]
        return start_worker(target, *more, *args, backend=pair.back[names[0]])
    return start


@pytest.fixture
def each(pair):
    """A client on each broker alone, to read its stats."""
    clients = {name: Client(frontend=pair.front[name], timeout=TIMEOUT) for name in "AB"}
    yield clients
    for client in clients.values():
        client.close()


def service(client, field):
    return client.stats(timeout=2)["services"].get("default", {}).get(field, 0)


def wait_service(client, field, value, timeout=10):
    wait_for(lambda: service(client, field) == value, timeout=timeout,
             what=f"{field} == {value}")


def test_a_worker_on_two_brokers_serves_both(brokers, worker_on, each):
    brokers("A", "B")
    worker = worker_on("A", "B", target="tests.targets:pid")
    for name in "AB":
        wait_service(each[name], "workers", 1)
    assert each["A"].execute(b"") == each["B"].execute(b"") == str(worker.pid).encode()
    assert service(each["A"], "done") == service(each["B"], "done") == 1


def test_while_a_worker_runs_a_job_from_one_broker_the_other_counts_it_busy(
        brokers, worker_on, each):
    brokers("A", "B")
    both = worker_on("A", "B")
    for name in "AB":
        wait_service(each[name], "idle", 1)
    long_job = each["A"].submit(b"2.5")
    wait_service(each["B"], "busy", 1)  # PAUSE: B counts it busy
    assert service(each["B"], "idle") == 0
    # B holds its job rather than give it to the paused worker.
    started = time.monotonic()
    queued_job = each["B"].submit(b"0")
    wait_service(each["B"], "queued", 1)
    time.sleep(0.5)
    assert service(each["B"], "queued") == 1 and not long_job.done()
    assert long_job.result(TIMEOUT) == queued_job.result(TIMEOUT) == str(both.pid).encode()
    assert time.monotonic() - started > 1.0  # it ran after the long one
    # RESUME once the worker has nothing left: idle on both again.
    for name in "AB":
        wait_service(each[name], "idle", 1)
        assert service(each[name], "busy") == 0


def test_a_broker_gives_a_job_to_another_worker_while_one_is_paused(
        brokers, worker_on, each):
    brokers("A", "B")
    worker_on("A", "B")
    only_b = worker_on("B")
    wait_service(each["A"], "idle", 1)
    wait_service(each["B"], "idle", 2)
    long_job = each["A"].submit(b"3")
    wait_service(each["B"], "busy", 1)
    started = time.monotonic()
    assert each["B"].execute(b"0") == str(only_b.pid).encode()
    assert time.monotonic() - started < 2.0 and not long_job.done()
    assert long_job.result(TIMEOUT).isdigit()


def test_a_stream_of_jobs_from_one_broker_does_not_starve_the_other(
        brokers, worker_on, each):
    """The worker resumes the other brokers after each job, not once idle:
    with prefetched jobs from B always waiting, A would never get it."""
    brokers("A", "B")
    worker_on("A", "B")
    for name in "AB":
        wait_service(each[name], "idle", 1)
    stop = threading.Event()

    def stream():
        while not stop.is_set():
            each["B"].execute(b"0.05")

    streams = [threading.Thread(target=stream) for _ in range(3)]
    for thread in streams:
        thread.start()
    try:
        wait_service(each["B"], "busy", 1)
        time.sleep(0.5)
        started = time.monotonic()
        assert each["A"].execute(b"0", timeout=TIMEOUT).isdigit()
        assert time.monotonic() - started < 2.0
    finally:
        stop.set()
        for thread in streams:
            thread.join(TIMEOUT)


def test_a_worker_keeps_serving_one_broker_while_the_other_is_missing(
        brokers, worker_on, each, procs):
    brokers("A")  # nothing ever listens on B
    worker = worker_on("A", "B", target="tests.targets:pid", args=("--broker-timeout", "1"))
    wait_service(each["A"], "workers", 1)
    time.sleep(2.5)  # past --broker-timeout: one broker answers, so it stays
    assert worker.poll() is None
    assert each["A"].execute(b"") == str(worker.pid).encode()


def test_a_client_on_two_brokers_spreads_its_jobs(pair, brokers, worker_on, each):
    brokers("A", "B")
    for _ in range(2):
        worker_on("A", "B", target="tests.targets:echo")
    for name in "AB":
        wait_service(each[name], "workers", 2)
    with Client(frontend=[pair.front["A"], pair.front["B"]], timeout=TIMEOUT) as client:
        # Both answer (a new client sends to the first that connects): what
        # one thread's sockets learn serves the others.
        assert all(client.broker_stats().values())
        threads = [threading.Thread(target=lambda n=n: [
            client.execute(b"%d-%d" % (n, i)) for i in range(10)]) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert client.map([b"m%d" % i for i in range(5)]) == [b"m%d" % i for i in range(5)]
    done = {name: service(each[name], "done") for name in "AB"}
    assert sum(done.values()) == 25
    assert min(done.values()) >= 5, done


class Load:
    """Client threads running echo jobs, each recording (start, end, data, outcome)."""

    def __init__(self, client, threads=4):
        self.client = client
        self.stop = threading.Event()
        self.records = [[] for _ in range(threads)]
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(threads)]

    def _run(self, n):
        i = 0
        while not self.stop.is_set():
            data = b"%d:%d" % (n, i)
            i += 1
            start = time.monotonic()
            try:
                outcome = self.client.execute(data)
            except exc.PowerhoseError as error:
                outcome = error
            self.records[n].append((start, time.monotonic(), data, outcome))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        for thread in self.threads:
            thread.join(TIMEOUT * 2)
        assert not any(thread.is_alive() for thread in self.threads), "a job hung"


def test_kill_one_of_two_brokers_under_load(pair, brokers, worker_on, each, start_broker):
    started = brokers("A", "B")
    for _ in range(2):
        worker_on("A", "B", target="tests.targets:echo")
    for name in "AB":
        wait_service(each[name], "workers", 2)
    client = Client(frontend=[pair.front["A"], pair.front["B"]], timeout=5.0)
    try:
        assert all(client.broker_stats().values())
        with Load(client) as load:
            time.sleep(1.0)
            killed = time.monotonic()
            started["A"].kill()
            time.sleep(3.0)
            # Back on the same endpoints: the workers and the client find it again.
            start_broker(frontend=pair.front["A"], backend=pair.back["A"])
            wait_for(lambda: service(each["A"], "done") > 0, timeout=30,
                     what="the restarted broker used again")
        records = [record for thread in load.records for record in thread]
    finally:
        client.close()
    assert len(records) > 50
    for start, end, data, outcome in records:
        # Each caller got its own job's result, or a typed error; nothing
        # waited past its timeout.
        assert outcome == data or isinstance(outcome, (exc.BrokerLostError,
                                                       exc.WorkerLostError)), (
            start - killed, end - killed, outcome)
        assert end - start < 5.0 + 1.0
    # Only jobs in flight at the kill, or sent just after it, failed.
    failed = [(start - killed, end - killed, outcome)
              for start, end, data, outcome in records if outcome != data]
    assert all(end >= 0 and start < 2.0 for start, end, _ in failed), failed
    # Within 2 s of the kill, every thread is served through B again.
    for thread in load.records:
        assert any(start < killed + 2.0 and outcome == data
                   for start, end, data, outcome in thread if end > killed)
        assert all(outcome == data for start, end, data, outcome in thread
                   if start > killed + 2.0)


def test_retries_send_a_lost_job_to_the_other_broker(pair, brokers, worker_on, each):
    started = brokers("A", "B")
    workers = [worker_on("A", "B") for _ in range(2)]
    for name in "AB":
        wait_service(each[name], "idle", 2)
    with Client(frontend=[pair.front["A"], pair.front["B"]], timeout=TIMEOUT,
                retries=1) as client:
        job = client.submit(b"1.5")
        # Kill the broker the job went to, while a worker runs it.
        holder = wait_for(lambda: next((name for name in "AB" if _holds(each[name])), None),
                          what="the job on a worker")
        started[holder].kill()
        result = job.result(TIMEOUT)
    assert int(result) in {worker.pid for worker in workers}
    other = "B" if holder == "A" else "A"
    wait_service(each[other], "done", 1)  # the retry ran there


def _holds(client):
    """Whether one of this broker's workers holds a job it sent."""
    return any(worker["holding"] for worker in client.stats(timeout=2)["workers"])


def test_without_retries_a_lost_job_fails_fast(pair, brokers, worker_on, each):
    started = brokers("A", "B")
    worker_on("A", "B")
    for name in "AB":
        wait_service(each[name], "idle", 1)
    with Client(frontend=[pair.front["A"], pair.front["B"]], timeout=TIMEOUT) as client:
        job = client.submit(b"1.5")
        holder = wait_for(lambda: next((name for name in "AB" if _holds(each[name])), None),
                          what="the job on the worker")
        killed = time.monotonic()
        started[holder].kill()
        with pytest.raises(exc.BrokerLostError):
            job.result(TIMEOUT)
        assert time.monotonic() - killed < 2.5
        # The other broker carries on.
        assert client.execute(b"0").isdigit()


def test_ping_and_stats_come_from_a_broker_that_answers(pair, brokers, each):
    started = brokers("A")  # B never answers
    with Client(frontend=[pair.front["B"], pair.front["A"]], timeout=TIMEOUT) as client:
        assert client.ping(timeout=2) == started["A"].pid
        assert client.stats(timeout=2)["frontend"] == pair.front["A"]
        each_stats = client.broker_stats(timeout=2)
        assert list(each_stats) == [pair.front["B"], pair.front["A"]]
        assert each_stats[pair.front["B"]] is None
        assert each_stats[pair.front["A"]]["pid"] == started["A"].pid
        assert client.has_service(timeout=2) is False  # A answers: no worker


def test_an_app_with_several_frontends_must_attach(pair):
    config = testing.setUp(settings={
        "powerhose.frontend": f"{pair.front['A']} {pair.front['B']}",
        "powerhose.target": "tests.targets:echo", "powerhose.cluster": "spawn"})
    try:
        with pytest.raises(ConfigurationError, match="powerhose.frontend lists 2 endpoints"):
            config.include("pyramid_powerhose")
            config.commit()
    finally:
        testing.tearDown()


# -- the choice of a broker, exactly --------------------------------------------------------

def channels(*states):
    """Stand-in channels, one per broker, each (up, lost)."""
    made = []
    for i, (up, lost) in enumerate(states):
        broker = _Broker(f"ipc:///b{i}", i)
        broker.up, broker.lost = up, lost
        made.append(SimpleNamespace(broker=broker))
    return made


def chosen(channels, avoid=(), turns=4):
    return [choose(channels, avoid, turn).broker.index for turn in range(turns)]


def test_jobs_go_in_turn_to_the_brokers_that_are_up():
    assert chosen(channels((1, False), (2, False))) == [0, 1, 0, 1]
    assert chosen(channels((0, True), (1, False), (3, False))) == [1, 2, 1, 2]


def test_a_lost_broker_is_used_only_when_none_other_is_left():
    # None up yet (a new client): those not known lost first.
    assert chosen(channels((0, True), (0, False))) == [1, 1, 1, 1]
    assert chosen(channels((0, True), (0, True))) == [0, 1, 0, 1]


def test_the_asyncio_client_chooses_its_brokers_by_the_same_rule():
    from pyramid_powerhose.aio import _itself
    brokers = [SimpleNamespace(up=0, lost=True), SimpleNamespace(up=0, lost=False),
               SimpleNamespace(up=1, lost=False)]
    assert [choose(brokers, (), turn, _itself) for turn in range(2)] == [brokers[2]] * 2
    brokers[2].up = 0
    assert [choose(brokers, (), turn, _itself) for turn in range(2)] == brokers[1:]
    assert choose(brokers, (brokers[1], brokers[2]), 0, _itself) is brokers[0]


def test_a_retry_avoids_the_broker_that_lost_the_job():
    both = channels((1, False), (1, False))
    assert chosen(both, avoid=(both[0].broker,)) == [1, 1, 1, 1]
    # Nothing else left: the same broker again (one frontend, or all lost it).
    assert chosen(both, avoid=(both[0].broker, both[1].broker)) == [0, 1, 0, 1]


# -- the worker's PAUSE and RESUME, exactly ----------------------------------------------------

class Told(Worker):
    """A worker whose commands to its brokers are recorded, not sent."""

    def __init__(self, *backends):
        super().__init__(lambda job: b"", Settings(backend=list(backends)))
        self.brokers = [worker_broker(backend) for backend in backends]
        self.told = []

    def _tell(self, broker, command):
        self.told.append((broker.backend, command))


def worker_broker(backend):
    broker = WorkerBroker(backend)
    broker.socket = object()  # connected, as far as these decisions go
    return broker


def test_a_job_from_one_broker_pauses_the_others_once_and_its_end_resumes_them():
    worker = Told("ipc:///a", "ipc:///b", "ipc:///c")
    a, b, c = worker.brokers
    worker._hold(a)
    assert worker.told == [("ipc:///b", protocol.PAUSE), ("ipc:///c", protocol.PAUSE)]
    worker._hold(a)  # a second job from a: nothing new to say
    assert len(worker.told) == 2
    worker.told.clear()
    worker._hold(b)  # a job b sent before its PAUSE arrived: b runs it, a waits
    assert worker.told == [("ipc:///a", protocol.PAUSE), ("ipc:///b", protocol.RESUME)]
    worker.told.clear()
    worker._resume_all()
    assert worker.told == [("ipc:///a", protocol.RESUME), ("ipc:///c", protocol.RESUME)]
    assert not any(broker.paused for broker in worker.brokers)


def test_a_broker_known_lost_is_told_nothing():
    """Waiting to reconnect, or reconnected but not heard from since: PAUSE
    and RESUME would queue up for a broker that may start later and read
    them stale."""
    worker = Told("ipc:///a", "ipc:///b", "ipc:///c")
    a, b, c = worker.brokers
    b.socket, b.lost_since = None, 1.0  # waiting to reconnect
    c.lost_since = 1.0  # a new socket, no word from its broker since it was lost
    worker._hold(a)
    worker._resume_all()
    assert worker.told == []
