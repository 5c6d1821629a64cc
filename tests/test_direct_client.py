"""The client's side of the direct path (#19), against a stand-in broker and
stand-in workers: real zmq sockets in this process, one thread serving
them all, speaking protocol.py's frames.

The stand-in broker answers relayed PHC01 jobs with ``relayed:<data>`` and
grants its workers to the first holder that asks (PHL01 LEASE), BUSY for
the rest of a wish; a stand-in
worker answers direct jobs with ``direct:<data>``, or holds them until told,
or refuses them (NOT_RUN).
"""

import os
import queue
import socket
import threading
import time

import pytest
import zmq

from pyramid_powerhose import Client, exc, protocol
from pyramid_powerhose.client import collect_replies

from .conftest import wait_for

pytestmark = pytest.mark.timeout(60)


class FakeWorker:
    def __init__(self, context, endpoint):
        self.endpoint = endpoint
        self.router = context.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.bind(endpoint)
        self.mode = "echo"  # or "hold", "not_run"
        self.epoch = 0  # the lease it serves
        self.jobs = []  # DirectRequest, every job read
        self.held = []


class FakeBroker:
    """A frontend ROUTER and stand-in workers, served by one thread."""

    def __init__(self, frontend, worker_endpoints=(), credit=2, grant=True):
        self.context = zmq.Context()
        self.frontend = frontend
        self.router = self.context.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.bind(frontend)
        self.workers = [FakeWorker(self.context, e) for e in worker_endpoints]
        self.credit = credit
        self.grant = grant  # grant idle workers to whoever asks
        self.relayed = []  # ClientMessage
        self.control = []  # LeaseControl
        self.holder = None
        self.epochs = iter(range(1000, 10 ** 6))
        self.calls = queue.Queue()
        self.stopping = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    # -- what the tests ask ----------------------------------------------------

    def commands(self, name):
        with self.lock:
            return [c for c in self.control if c.command == name]

    def do(self, fn):
        """Run ``fn`` in the serving thread (which owns the sockets); wait for it."""
        done = queue.Queue()
        self.calls.put(lambda: done.put(fn()))
        return done.get(timeout=5)

    def revoke(self, worker, reason):
        def go():
            epoch, worker.epoch = worker.epoch, 0
            self.router.send_multipart(protocol.lease_revoke(
                self.holder, b"default", epoch, reason))
            return epoch
        return self.do(go)

    def release(self, worker):
        """Answer the jobs ``worker`` holds."""
        def go():
            held, worker.held = worker.held, []
            for job in held:
                worker.router.send_multipart(protocol.direct_reply(
                    job.address, protocol.Reply(job.request.job_id, True,
                                                b"direct:" + job.request.data)))
        self.do(go)

    def kill(self, worker):
        """Close ``worker``'s socket, as its process's death would, unread jobs and all."""
        def go():
            self.poller.unregister(worker.router)
            worker.router.close(0)
        self.do(go)

    def close(self):
        self.stopping = True
        self.thread.join(5)
        self.context.destroy(linger=0)

    # -- the serving thread ------------------------------------------------------

    def _loop(self):
        self.poller = poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        for worker in self.workers:
            poller.register(worker.router, zmq.POLLIN)
        while not self.stopping:
            while not self.calls.empty():
                self.calls.get()()
            for sock, _ in poller.poll(10):
                frames = sock.recv_multipart()
                if sock is self.router:
                    self._frontend(frames)
                else:
                    self._direct(next(w for w in self.workers if w.router is sock), frames)

    def _frontend(self, frames):
        if protocol.is_lease_control(frames):
            msg = protocol.parse_lease_control(frames)
            with self.lock:
                self.control.append(msg)
            if msg.command == protocol.LEASE_WANTED and msg.wanted > 0 and self.grant:
                self.holder = msg.address
                idle = [w for w in self.workers if not w.epoch][:msg.wanted]
                for worker in idle:
                    worker.epoch = next(self.epochs)
                    self.router.send_multipart(protocol.lease_grant(
                        msg.address, msg.service, worker.epoch, worker.endpoint.encode(),
                        self.credit))
                if len(idle) < msg.wanted:
                    self.router.send_multipart(protocol.lease_busy(msg.address, msg.service))
            return
        msg = protocol.parse_frontend(frames)
        with self.lock:
            self.relayed.append(msg)
        reply = protocol.Reply(msg.request.job_id, True, b"relayed:" + msg.request.data)
        self.router.send_multipart(protocol.frontend_reply(msg, reply, b"1@relay"))

    def _direct(self, worker, frames):
        job = protocol.parse_direct_request(frames)
        with self.lock:
            worker.jobs.append(job)
        if worker.mode == "not_run" or job.epoch != worker.epoch:
            worker.router.send_multipart(protocol.direct_not_run(
                job.address, job.request.job_id, protocol.NOT_RUN_LEASE))
        elif worker.mode == "hold":
            worker.held.append(job)
        else:
            reply = protocol.Reply(job.request.job_id, True, b"direct:" + job.request.data)
            worker.router.send_multipart(protocol.direct_reply(job.address, reply))


@pytest.fixture
def fake(endpoints):
    brokers = []

    def make(workers=1, **kwargs):
        broker = FakeBroker(kwargs.pop("frontend", endpoints.frontend),
                            [f"ipc://{endpoints.dir}/w{len(brokers)}-{i}.sock"
                             for i in range(workers)], **kwargs)
        brokers.append(broker)
        return broker
    yield make
    for broker in brokers:
        broker.close()


@pytest.fixture
def make_client(endpoints):
    clients = []

    def make(**kwargs):
        kwargs.setdefault("frontend", endpoints.frontend)
        kwargs.setdefault("timeout", 5.0)
        client = Client(**kwargs)
        clients.append(client)
        return client
    yield make
    for client in clients:
        client.close()


def leases(client):
    direct = client._direct
    if direct is None:
        return 0
    with direct.lock:
        return sum(len(svc.leases) for svc in direct.services.values())


def leased(fake, client, count=1):
    """The first job goes relayed and asks for a lease; wait for the grant."""
    assert client.execute(b"first") == b"relayed:first"
    wait_for(lambda: leases(client) >= count, what="a lease granted")


def test_first_job_relayed_and_a_wish_sent_then_direct(fake, make_client):
    broker = fake()
    client = make_client()
    assert client.execute(b"a") == b"relayed:a"
    wait_for(lambda: broker.commands(protocol.LEASE_WANTED), what="a LEASE wish")
    wish = broker.commands(protocol.LEASE_WANTED)[0]
    assert wish.service == b"default" and wish.wanted == 1
    wait_for(lambda: leases(client) == 1, what="the lease granted")
    for i in range(20):
        assert client.execute(b"%d" % i) == b"direct:%d" % i
    assert len(broker.relayed) == 1  # the broker saw no more jobs
    worker = broker.workers[0]
    assert len(worker.jobs) == 20
    # Each thread numbers its direct jobs from 1, in hex (formatted in C when compiled).
    assert [job.request.job_id for job in worker.jobs] == [b"%x" % i for i in range(1, 21)]
    job = worker.jobs[0]
    assert job.epoch == worker.epoch
    # The deadline is absolute on CLOCK_MONOTONIC, the job's timeout ahead.
    assert 0 < job.deadline_ns - time.monotonic_ns() <= 5e9


def test_threads_share_leases_within_credit(fake, make_client):
    broker = fake(workers=2, credit=2)
    client = make_client()
    assert client.execute(b"x") == b"relayed:x"
    # Ask until both workers are ours: the first wish was for one.
    for worker in broker.workers:
        broker.do(lambda w=worker: setattr(w, "mode", "hold"))
    wait_for(lambda: leases(client) == 1, what="a first lease")
    # Jobs known to be short, as after a few: a lease's whole credit is used.
    client._direct.services[b"default"].job_time = 0.001
    results = {}

    def run(i):
        results[i] = client.execute(b"%d" % i)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    # 2 on the one lease (its credit), 4 waiting for room: the wish says so
    # and the broker grants the second worker, which takes 2 more.
    wait_for(lambda: sum(len(w.held) for w in broker.workers) == 4, what="4 jobs held")
    assert [len(w.held) for w in broker.workers] == [2, 2]
    assert max(c.wanted for c in broker.commands(protocol.LEASE_WANTED)) >= 2
    assert len(broker.relayed) == 1  # the waiting jobs wait in the client
    for _ in range(3):
        for worker in broker.workers:
            broker.release(worker)
        time.sleep(0.05)
    for thread in threads:
        thread.join(5)
    assert results == {i: b"direct:%d" % i for i in range(6)}
    assert max(len(w.jobs) for w in broker.workers) <= 4
    assert sum(len(w.jobs) for w in broker.workers) == 6


def test_not_run_is_resent_relayed_once(fake, make_client):
    broker = fake()
    client = make_client()
    leased(broker, client)
    broker.do(lambda: setattr(broker.workers[0], "mode", "not_run"))
    assert client.execute(b"again", headers={"k": "v"}) == b"relayed:again"
    assert len(broker.workers[0].jobs) == 1
    assert len(broker.relayed) == 2  # the first job, and this one once
    resent = broker.relayed[1].request
    assert resent.data == b"again" and resent.headers == {"k": "v"}
    assert 0 < resent.ttl_ms <= 5000
    # A lease whose worker said NOT_RUN is not chosen again.
    assert leases(client) == 0
    assert client.execute(b"next") == b"relayed:next"
    assert len(broker.workers[0].jobs) == 1


def test_revoke_share_stops_new_jobs_and_returns_once_idle(fake, make_client):
    broker = fake()
    client = make_client()
    leased(broker, client)
    worker = broker.workers[0]
    broker.do(lambda: setattr(worker, "mode", "hold"))
    broker.grant = False
    held = []
    thread = threading.Thread(target=lambda: held.append(client.execute(b"long")))
    thread.start()
    wait_for(lambda: worker.held, what="a job in flight")
    epoch = broker.revoke(worker, protocol.REVOKE_SHARE)
    wait_for(lambda: leases(client) == 0, what="the lease revoked")
    # A new job goes relayed; no RETURN while the first is in flight.
    assert client.execute(b"new") == b"relayed:new"
    assert len(worker.jobs) == 1
    time.sleep(0.1)
    assert broker.commands(protocol.LEASE_RETURN) == []
    broker.do(lambda: setattr(worker, "epoch", epoch))  # it answers the job it holds
    broker.release(worker)
    thread.join(5)
    assert held == [b"direct:long"]  # a job in flight on a revoked lease finishes
    wait_for(lambda: broker.commands(protocol.LEASE_RETURN), what="a RETURN")
    time.sleep(0.2)
    returns = broker.commands(protocol.LEASE_RETURN)
    assert [(r.service, r.epoch) for r in returns] == [(b"default", epoch)]


def job_held(broker, client):
    """A lease, and a job on it that its worker holds, from a thread of its
    own: (worker, thread, outcome), where the thread puts (error, when)."""
    leased(broker, client)
    worker = broker.workers[0]
    broker.do(lambda: setattr(worker, "mode", "hold"))
    outcome = []

    def run():
        try:
            client.execute(b"doomed")
        except exc.PowerhoseError as error:
            outcome.append((error, time.monotonic()))
    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: worker.held, what="a job in flight")
    return worker, thread, outcome


def lost_fast_then_returned(broker, thread, outcome, since, epoch):
    """The held job failed with WorkerLostError within a second of ``since``,
    and its lease (``epoch``) was RETURNed."""
    thread.join(5)
    error, when = outcome[0]
    assert isinstance(error, exc.WorkerLostError)
    assert when - since < 1.0
    wait_for(lambda: broker.commands(protocol.LEASE_RETURN), what="a RETURN")
    assert broker.commands(protocol.LEASE_RETURN)[0].epoch == epoch


def test_revoke_lost_fails_the_job_in_flight(fake, make_client):
    broker = fake()
    client = make_client()
    worker, thread, outcome = job_held(broker, client)
    revoked = time.monotonic()
    epoch = broker.revoke(worker, protocol.REVOKE_LOST)
    lost_fast_then_returned(broker, thread, outcome, revoked, epoch)


def test_a_worker_gone_after_its_lease_ended_fails_the_job_fast(fake, make_client):
    """The broker revoked the lease for another process and the worker answered
    its end (so the broker will not say REVOKE lost), a job of ours unread in
    its socket; then it dies.  The connection's loss says so: WorkerLostError
    within a wait slice, not at the job's timeout."""
    broker = fake()
    client = make_client(timeout=10.0)
    worker, thread, outcome = job_held(broker, client)
    epoch = broker.revoke(worker, protocol.REVOKE_SHARE)  # no REVOKE lost will follow
    killed = time.monotonic()
    broker.kill(worker)
    lost_fast_then_returned(broker, thread, outcome, killed, epoch)
    assert client.execute(b"after") == b"relayed:after"  # the lease is not chosen again


def test_a_lease_whose_worker_is_gone_is_not_chosen_again(fake, make_client):
    """Its connection dropped before the broker said REVOKE lost: the next job
    does not go into the dead worker's socket."""
    broker = fake()
    client = make_client(timeout=10.0)
    leased(broker, client)
    assert client.execute(b"one") == b"direct:one"  # this thread's socket is connected
    broker.grant = False  # the broker has not noticed yet: no REVOKE, no new grant
    broker.kill(broker.workers[0])
    wait_for(lambda: leases(client) == 0, what="the lease dropped")
    assert client.execute(b"two") == b"relayed:two"


def test_deadline_on_the_direct_path(fake, make_client):
    broker = fake()
    client = make_client()
    leased(broker, client)
    worker = broker.workers[0]
    broker.do(lambda: setattr(worker, "mode", "hold"))
    start = time.monotonic()
    with pytest.raises(exc.TimeoutError):
        client.execute(b"slow", timeout=0.3)
    assert time.monotonic() - start >= 0.3
    assert worker.held[0].deadline_ns <= time.monotonic_ns()
    # Its late reply is dropped; the lease serves the next job.
    broker.do(lambda: setattr(worker, "mode", "echo"))
    broker.release(worker)
    assert client.execute(b"after") == b"direct:after"


def test_headers_pass_through_and_the_worker_is_unnamed(fake, make_client):
    broker = fake()
    client = make_client()
    leased(broker, client)
    with collect_replies() as replies:
        assert client.execute(b"h", headers={"trace": "t1"}) == b"direct:h"
    job = broker.workers[0].jobs[-1]
    assert job.request.headers == {"trace": "t1"}  # not the question for a broker
    assert [r.worker for r in replies] == [""]
    assert client.execute(b"i", headers={"a": "b"}) == b"direct:i"
    assert broker.workers[0].jobs[-1].request.headers == {"a": "b"}


def test_map_and_submit(fake, make_client):
    broker = fake()
    client = make_client()
    leased(broker, client)
    assert client.submit(b"s").result(5) == b"direct:s"
    assert client.map([b"1", b"2"]) == [b"relayed:1", b"relayed:2"]  # map stays relayed


@pytest.mark.parametrize("how", ["setting", "tcp", "two frontends"])
def test_no_lease_control_when_direct_is_off(how, fake, make_client, endpoints):
    if how == "tcp":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        broker = fake(frontend=f"tcp://127.0.0.1:{port}")
        client = make_client(frontend=broker.frontend)
    elif how == "two frontends":
        broker = fake()
        other = fake(frontend=f"ipc://{endpoints.dir}/front2.sock")
        client = make_client(frontend=[broker.frontend, other.frontend])
    else:
        broker = fake()
        client = make_client(settings=client_settings(direct=False))
    for i in range(5):
        assert client.execute(b"%d" % i).startswith(b"relayed:")
    time.sleep(1.2)  # a wish would have been repeated by now
    assert client._direct is None
    assert broker.control == []


def client_settings(**values):
    from pyramid_powerhose.settings import Settings
    return Settings().replace(**values)


def test_heartbeats_while_holding(fake, make_client):
    broker = fake()
    client = make_client()
    leased(broker, client)
    wait_for(lambda: len(broker.commands(protocol.LEASE_HEARTBEAT)) >= 3, timeout=5,
             what="heartbeats")
    # The wish went back to 0 once the jobs had a lease.
    wait_for(lambda: broker.commands(protocol.LEASE_WANTED)[-1].wanted == 0, timeout=3,
             what="the wish withdrawn")


def test_no_grant_keeps_today_behaviour(fake, make_client):
    broker = fake(grant=False)
    client = make_client()
    start = time.monotonic()
    for i in range(50):
        assert client.execute(b"%d" % i) == b"relayed:%d" % i
    assert time.monotonic() - start < 5  # nothing waits on a grant
    wishes = broker.commands(protocol.LEASE_WANTED)
    assert 1 <= len(wishes) <= 5  # not one per job


def test_broker_lost_drops_leases(fake, make_client):
    broker = fake()
    client = make_client()
    leased(broker, client)
    broker.close()
    wait_for(lambda: leases(client) == 0, what="leases dropped")
    with pytest.raises(exc.BrokerLostError):
        client.execute(b"x", timeout=3)


def test_close_leaves_no_threads_or_sockets(fake, endpoints):
    broker = fake()
    before = {t.ident for t in threading.enumerate()}
    client = Client(frontend=endpoints.frontend, timeout=5)
    leased(broker, client)
    assert client.execute(b"d") == b"direct:d"
    direct = client._direct
    fd = direct.wake_fd
    client.close()
    assert {t.ident for t in threading.enumerate()} <= before
    assert client._context.closed
    with pytest.raises(OSError):
        os.fstat(fd)
    assert all(s.closed for h in direct.holders for s in h.socks.values())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_holds_no_lease(fake, make_client):
    broker = fake()
    client = make_client()
    leased(broker, client)
    assert client.execute(b"p") == b"direct:p"
    pid = os.fork()
    if pid == 0:
        try:
            ok = client.execute(b"c", timeout=3) == b"relayed:c"
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.execute(b"q") == b"direct:q"


def test_threads_through_revokes_and_grants(fake, make_client):
    """8 threads run jobs while the broker revokes and grants leases again:
    every job gets its own result, once; every REVOKE gets one RETURN."""
    broker = fake(workers=2, credit=2)
    client = make_client()
    leased(broker, client)
    stop = threading.Event()
    revoked = []
    failures = []

    def churn():
        while not stop.is_set():
            for worker in broker.workers:
                if worker.epoch:
                    revoked.append(broker.revoke(worker, protocol.REVOKE_SHARE))
            time.sleep(0.02)

    def run(t):
        try:
            for i in range(150):
                data = b"%d-%d" % (t, i)
                result = client.execute(data)
                if result not in (b"direct:" + data, b"relayed:" + data):
                    failures.append((data, result))
        except Exception as error:  # noqa: BLE001 -- reported below
            failures.append(error)
    churner = threading.Thread(target=churn)
    churner.start()
    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    stop.set()
    churner.join(5)
    assert not failures
    assert revoked  # the churn did happen
    direct_jobs = sum(len(w.jobs) for w in broker.workers)
    assert direct_jobs > 0
    wait_for(lambda: sorted(r.epoch for r in broker.commands(protocol.LEASE_RETURN))
             == sorted(revoked), what="one RETURN per REVOKE")


def test_a_thread_that_ends_closes_its_sockets_to_leased_workers(fake, make_client):
    import gc
    broker = fake()
    client = make_client()
    leased(broker, client)

    def open_sockets():
        gc.collect()
        return sum(1 for s in list(client._context._sockets) if not s.closed)
    before = open_sockets()
    results = []
    for i in range(10):
        thread = threading.Thread(target=lambda i=i: results.append(client.execute(b"%d" % i)))
        thread.start()
        thread.join(5)
    assert results == [b"direct:%d" % i for i in range(10)]
    # Each thread's socket to the broker and to the worker went with it.
    wait_for(lambda: open_sockets() <= before, what="the threads' sockets closed")
