"""The worker's side of the direct path (docs/direct_path.rst, issue #19).

A real worker process; the test plays its broker (a ROUTER bound on the
backend, speaking protocol.py's frames: it reads READY, DIRECT, LEASE, FREE
and REPORT, heartbeats the worker and leases it) and a client process
holding the lease (a DEALER connected to the endpoint the worker announced).
"""

import os
import signal
import stat
import time

import pytest
import zmq

from pyramid_powerhose import busy_word
from pyramid_powerhose.protocol import (
    BUCKETS, DIRECT, DISCONNECT, ERR_EXECUTION, ERR_NOT_RUN, ERR_TIMEOUT, FREE, HEARTBEAT,
    INFO, LEASE, NOT_RUN_LEASE, NOT_RUN_STOPPING, READY, REPLY, REPORT, Request,
    backend_command, backend_lease, backend_request, direct_request, parse_backend,
    parse_direct_reply, parse_worker_reply,
)
from tests.conftest import read_log

JOB_PATH = "direct"  # the worker's direct path, whatever pytest --path says (conftest)
TIMEOUT = 15.0  # every wait below is generous; none asserts a speed
TARGET = "tests.direct_targets:ledger"


class Rig:
    """The broker and the client, in the test's thread.

    Every wait goes through :meth:`pump`, which reads both sides and
    heartbeats the worker every 0.1 s (its heartbeat is 0.2 s, liveness 3),
    so that the worker never takes its broker for lost while the test waits.
    """

    def __init__(self, backend):
        self.context = zmq.Context()
        self.broker = self.context.socket(zmq.ROUTER)
        self.broker.linger = 0
        self.broker.bind(backend)
        self.poller = zmq.Poller()
        self.poller.register(self.broker, zmq.POLLIN)
        self.clients = []
        self.messages = []  # every WorkerMessage the worker sent, in order
        self.replies = {}  # job id -> Reply, from the direct socket
        self.worker = None  # the worker's address on the backend
        self.heartbeats = True
        self.next_beat = 0.0

    def close(self):
        for sock in [self.broker, *self.clients]:
            sock.close(0)
        self.context.term()

    # -- reading ------------------------------------------------------------------

    def pump(self, seconds=0.02):
        """One wait of up to ``seconds`` for either side; read what came."""
        now = time.monotonic()
        if self.heartbeats and self.worker is not None and now >= self.next_beat:
            self.broker.send_multipart(backend_command(self.worker, HEARTBEAT))
            self.next_beat = now + 0.1
        for sock, _ in self.poller.poll(max(1, int(min(seconds, 0.05) * 1000))):
            while sock.poll(0):
                frames = sock.recv_multipart()
                if sock is self.broker:
                    message = parse_backend(frames)
                    self.messages.append(message)
                    if message.command == READY:
                        self.worker = message.address
                else:
                    reply = parse_direct_reply(frames)
                    self.replies[reply.job_id] = reply

    def idle(self, seconds):
        """Keep reading (and heartbeating) for ``seconds``."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.pump()

    def wait(self, predicate, timeout=TIMEOUT, what="condition"):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; the "
                                     f"worker sent {self.commands()}")
            self.pump()

    def commands(self, start=0):
        return [message.command for message in self.messages[start:]]

    def seen(self, command, start=0):
        return [message for message in self.messages[start:] if message.command == command]

    def mark(self):
        return len(self.messages)

    def registered(self):
        """Wait for READY, INFO and the first HEARTBEAT after them (by then a
        DIRECT, sent with READY, has arrived); the DIRECT endpoint or None."""
        self.wait(lambda: HEARTBEAT in self.commands(), what="READY and a HEARTBEAT")
        assert self.commands()[:2] == [READY, INFO]
        direct = self.seen(DIRECT)
        if not direct:
            return None
        assert self.commands()[2] == DIRECT  # right after READY and INFO
        return direct[0].endpoint.decode()

    # -- the broker's part ----------------------------------------------------------

    def lease(self, epoch):
        """LEASE epoch to the worker; its answer (a WorkerMessage)."""
        start = self.mark()
        self.broker.send_multipart(backend_lease(self.worker, epoch))
        answer = self.wait(lambda: self.seen(LEASE, start), what=f"the answer to LEASE {epoch}")
        return answer[0]

    def counted(self, start=0):
        """The counts of every FREE and REPORT since ``start``, added up."""
        done, outcomes, buckets, run_sum = 0, {}, [0] * (len(BUCKETS) + 1), 0.0
        for message in self.messages[start:]:
            if message.command in (FREE, REPORT):
                counts = message.counts
                done += counts.done
                for code, n in counts.outcomes.items():
                    outcomes[code] = outcomes.get(code, 0) + n
                buckets = [a + b for a, b in zip(buckets, counts.buckets)]
                run_sum += counts.run_sum
        return done, outcomes, buckets, run_sum

    # -- the client's part ----------------------------------------------------------

    def client(self, endpoint):
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(endpoint)
        self.poller.register(sock, zmq.POLLIN)
        self.clients.append(sock)
        return sock

    def send(self, client, epoch, job_id, data, deadline_ns=0):
        client.send_multipart(direct_request(epoch, deadline_ns, Request(b"", job_id, data)))

    def reply(self, job_id, timeout=TIMEOUT):
        return self.wait(lambda: self.replies.get(job_id), timeout, f"the reply to {job_id!r}")

    def call(self, client, epoch, job_id, data, deadline_ns=0):
        self.send(client, epoch, job_id, data, deadline_ns)
        return self.reply(job_id)


@pytest.fixture
def rig(endpoints):
    rig = Rig(endpoints.backend)
    yield rig
    rig.close()


@pytest.fixture
def ledger(run_dir):
    """The file the target appends each job's data to, and a reader of it."""
    path = os.path.join(run_dir, "ledger")

    def lines():
        if not os.path.exists(path):
            return []
        with open(path, "rb") as f:
            return f.read().splitlines()
    lines.path = path
    return lines


@pytest.fixture
def leased(rig, start_worker, ledger):
    """A worker of the ledger target, registered, leased under epoch 7, and a
    client connected to its direct socket: (worker process, client, endpoint)."""
    def start(*args, epoch=7):
        worker = start_worker(TARGET, "--params", f"log:{ledger.path}", *args)
        endpoint = rig.registered()
        assert endpoint, read_log(worker)
        answer = rig.lease(epoch)
        assert (answer.epoch, answer.held) == (epoch, 0)
        return worker, rig.client(endpoint), endpoint
    return start


def socket_file(endpoint):
    return endpoint[len("ipc://"):]


# -- who announces DIRECT -----------------------------------------------------------------


def test_direct_is_announced_after_ready_in_a_private_directory(rig, start_worker, run_dir):
    worker = start_worker(TARGET)
    endpoint = rig.registered()
    assert endpoint is not None, read_log(worker)
    folder = os.path.join(run_dir, "direct")
    path = socket_file(endpoint)
    assert os.path.dirname(path) == folder
    assert os.path.basename(path).startswith(f"{worker.pid}-")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(path).st_mode)


def test_no_direct_with_no_direct(rig, start_worker, run_dir):
    worker = start_worker(TARGET, "--no-direct")
    assert rig.registered() is None, read_log(worker)
    assert not os.path.exists(os.path.join(run_dir, "direct"))


def test_no_direct_with_two_backends(rig, start_worker, run_dir):
    worker = start_worker(TARGET, "--backend", f"ipc://{run_dir}/other-back.sock")
    assert rig.registered() is None, read_log(worker)


def test_no_direct_with_a_tcp_backend(procs, run_dir, start_worker):
    rig = Rig("tcp://127.0.0.1:0")
    try:
        backend = rig.broker.getsockopt(zmq.LAST_ENDPOINT).decode()
        worker = start_worker(TARGET, backend=backend)
        assert rig.registered() is None, read_log(worker)
    finally:
        rig.close()


def test_no_direct_if_the_directory_is_not_private(rig, start_worker, run_dir):
    folder = os.path.join(run_dir, "direct")
    os.mkdir(folder)
    os.chmod(folder, 0o755)
    worker = start_worker(TARGET)
    assert rig.registered() is None
    assert "no direct path" in read_log(worker)
    assert os.listdir(folder) == []


# -- direct jobs ------------------------------------------------------------------------------


def test_a_job_under_the_lease_runs_and_is_answered(rig, leased, ledger):
    worker, client, _ = leased()
    reply = rig.call(client, 7, b"job-1", b"hello")
    assert (reply.ok, reply.data, reply.job_id) == (True, b"hello", b"job-1")
    assert ledger() == [b"hello"]


def test_a_job_of_another_epoch_or_without_a_lease_is_not_run(rig, start_worker, ledger):
    worker = start_worker(TARGET, "--params", f"log:{ledger.path}")
    client = rig.client(rig.registered())
    reply = rig.call(client, 7, b"no-lease", b"x")  # not leased yet
    assert (reply.ok, reply.code, reply.message) == (False, ERR_NOT_RUN, NOT_RUN_LEASE.decode())
    rig.lease(8)
    for epoch in (7, 9):  # an old epoch, and one the broker never gave
        reply = rig.call(client, epoch, b"wrong-%d" % epoch, b"x")
        assert (reply.code, reply.message) == (ERR_NOT_RUN, NOT_RUN_LEASE.decode())
    assert rig.call(client, 8, b"right", b"ran").ok
    rig.lease(0)  # the lease ends: its epoch is refused from now on
    reply = rig.call(client, 8, b"after-end", b"x")
    assert (reply.code, reply.message) == (ERR_NOT_RUN, NOT_RUN_LEASE.decode())
    assert ledger() == [b"ran"]  # none of the refused jobs ran
    assert worker.poll() is None


def test_an_exception_is_answered_as_an_execution_error(rig, leased, ledger):
    leased()
    client = rig.clients[0]
    reply = rig.call(client, 7, b"boom", b"fail now")
    assert (reply.ok, reply.code, reply.exc_type) == (False, ERR_EXECUTION, "ValueError")
    assert "failed: fail now" in reply.message and "ValueError" in reply.traceback


def test_a_job_past_its_deadline_is_not_run(rig, leased, ledger):
    leased()
    client = rig.clients[0]
    start = rig.mark()
    reply = rig.call(client, 7, b"late", b"x", deadline_ns=time.monotonic_ns() - 1)
    assert (reply.ok, reply.code) == (False, ERR_TIMEOUT)
    assert ledger() == []
    rig.wait(lambda: rig.seen(FREE, start), what="FREE")
    # Counted as failed, with no run time.
    assert rig.counted(start) == (0, {ERR_TIMEOUT: 1}, [0] * (len(BUCKETS) + 1), 0.0)
    # A deadline still ahead: it runs.
    deadline = time.monotonic_ns() + int(TIMEOUT * 1e9)
    assert rig.call(client, 7, b"in-time", b"ok", deadline_ns=deadline).ok
    assert ledger() == [b"ok"]


def test_free_after_direct_jobs_with_exact_counts(rig, leased, ledger):
    leased()
    client = rig.clients[0]
    start = rig.mark()
    rig.idle(0.2)
    assert not rig.seen(FREE, start)  # nothing run: nothing to tell
    for i, data in enumerate([b"a", b"fail", b"b", b"c"]):
        rig.call(client, 7, b"job-%d" % i, data)
    rig.wait(lambda: rig.counted(start)[0] == 3 and rig.counted(start)[1],
             what="counts of 4 jobs")
    rig.idle(0.2)  # nothing more comes
    done, outcomes, buckets, run_sum = rig.counted(start)
    assert (done, outcomes) == (3, {ERR_EXECUTION: 1})
    assert sum(buckets) == 4 and run_sum > 0
    assert rig.seen(FREE, start)  # idle: FREE (perhaps after a REPORT)
    assert rig.commands()[-1] != REPORT or rig.seen(FREE, start)
    # Jobs sent at once run one after another; their counts come too.
    start = rig.mark()
    for i in range(5):
        rig.send(client, 7, b"batch-%d" % i, b"x%d" % i)
    for i in range(5):
        assert rig.reply(b"batch-%d" % i).ok
    rig.wait(lambda: rig.counted(start)[0] == 5, what="counts of 5 jobs")
    rig.idle(0.2)
    assert rig.counted(start)[0] == 5 and sum(rig.counted(start)[2]) == 5
    assert rig.seen(FREE, start)


def test_many_jobs_in_a_row_and_in_bursts_are_all_answered(rig, start_worker):
    """The worker waits on its two sockets by their descriptors (worker's
    _Readiness): a wake-up it lost would leave a job unanswered for ever."""
    worker = start_worker("tests.targets:echo", "--heartbeat", "2")
    client = rig.client(rig.registered())
    rig.lease(3)
    for i in range(300):
        job_id = b"serial-%d" % i
        assert rig.call(client, 3, job_id, job_id).data == job_id
    for burst in range(20):
        ids = [b"burst-%d-%d" % (burst, i) for i in range(5)]
        for job_id in ids:
            rig.send(client, 3, job_id, job_id)
        for job_id in ids:
            assert rig.reply(job_id).data == job_id
    start = rig.mark()
    rig.lease(0)
    assert rig.seen(LEASE, start)[0].epoch == 0
    rig.wait(lambda: rig.counted()[0] == 400, what="counts of 400 jobs")
    assert worker.poll() is None


def test_report_while_busy_at_most_once_a_heartbeat_then_free(rig, leased, ledger):
    leased()
    client = rig.clients[0]
    start = rig.mark()
    began = time.monotonic()
    for i in range(20):  # 0.6 s of work or more, in a row; the heartbeat is 0.2 s
        rig.send(client, 7, b"slow-%d" % i, b"sleep:0.03")
    for i in range(20):
        assert rig.reply(b"slow-%d" % i).ok
    busy = time.monotonic() - began

    def told():
        return [c for c in rig.commands(start) if c in (FREE, REPORT)]
    # Once idle, FREE (even if a REPORT just carried the last counts).
    rig.wait(lambda: rig.counted(start)[0] == 20 and told()[-1] == FREE,
             what="counts of 20 jobs, then FREE")
    assert told()[0] == REPORT  # while busy
    assert told().count(FREE) == 1
    reports = rig.seen(REPORT, start)
    # At most one a heartbeat, each with counts: not one a job.  None says
    # that a job started: the busy word says that (next test).
    assert 1 <= len(reports) <= busy / 0.2 + 1
    assert all(r.counts.jobs() > 0 for r in reports)
    done, outcomes, buckets, run_sum = rig.counted(start)
    assert (done, outcomes, sum(buckets)) == (20, {}, 20)
    assert run_sum >= 20 * 0.03
    assert sum(buckets[:BUCKETS.index(0.05)]) == 0  # none ran under 0.03 s


def test_the_busy_word_says_busy_while_a_direct_job_runs_then_idle_since(rig, leased, ledger,
                                                                        run_dir):
    """The broker reads it (busy_word.py): no message when a job starts, even
    on a fresh lease or after FREE, the broker's cue that we were idle."""
    worker, client, endpoint = leased()
    path = busy_word.path_for(socket_file(endpoint))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    word = busy_word.open_reader(path, os.path.join(run_dir, "direct"))
    try:
        assert word.read() == 0  # nothing ran yet
        for turn in range(2):  # on a fresh lease, then after FREE
            start = rig.mark()
            before = time.monotonic_ns()
            rig.send(client, 7, b"slow-%d" % turn, b"sleep:0.5")
            rig.wait(lambda: len(ledger()) == turn + 1, what="the job to start")
            assert word.read() == busy_word.BUSY
            rig.idle(0.1)  # what the worker sent as the job began has come
            assert REPORT not in rig.commands(start)
            assert rig.reply(b"slow-%d" % turn).ok
            assert before < word.read() <= time.monotonic_ns()
            rig.wait(lambda: rig.seen(FREE, start), what="FREE")
    finally:
        word.close()
    worker.terminate()
    worker.wait(TIMEOUT)
    assert not os.path.exists(path)


def test_the_end_of_a_lease_is_answered_after_a_report(rig, leased, ledger):
    leased()
    client = rig.clients[0]
    rig.send(client, 7, b"long", b"sleep:0.5")
    rig.wait(lambda: ledger() == [b"sleep:0.5"], what="the job to start")
    start = rig.mark()
    rig.broker.send_multipart(backend_lease(rig.worker, 0))  # while it runs
    assert rig.reply(b"long").ok
    rig.wait(lambda: rig.seen(LEASE, start), what="the answer to LEASE 0")
    rig.idle(0.2)
    commands = [c for c in rig.commands(start) if c != HEARTBEAT]
    assert commands[-2:] == [REPORT, LEASE], commands  # nothing after, no FREE
    assert (rig.seen(LEASE, start)[0].epoch, rig.seen(LEASE, start)[0].held) == (0, 0)
    assert rig.counted(start)[0] == 1
    reply = rig.call(client, 7, b"after", b"x")
    assert (reply.code, reply.message) == (ERR_NOT_RUN, NOT_RUN_LEASE.decode())
    assert ledger() == [b"sleep:0.5"]


def test_registering_again_drops_the_lease(rig, leased, ledger):
    _, client, endpoint = leased()
    before = rig.mark()
    assert rig.call(client, 7, b"before", b"1").ok
    # FREE follows the reply a millisecond later: let it come before the mark.
    rig.wait(lambda: rig.seen(FREE, before), what="FREE after the job")
    start = rig.mark()
    rig.broker.send_multipart(backend_command(rig.worker, DISCONNECT))
    rig.wait(lambda: rig.seen(DIRECT, start), what="READY and DIRECT again")
    assert rig.commands(start)[:3] == [READY, INFO, DIRECT]
    assert rig.seen(DIRECT, start)[0].endpoint.decode() == endpoint  # the same socket
    reply = rig.call(client, 7, b"after", b"2")
    assert (reply.code, reply.message) == (ERR_NOT_RUN, NOT_RUN_LEASE.decode())
    assert ledger() == [b"1"]


def test_relayed_jobs_still_run(rig, leased, ledger):
    leased()
    rig.lease(0)
    start = rig.mark()
    rig.broker.send_multipart(backend_request(rig.worker, b"client-1",
                                              Request(b"default", b"relayed", b"r"), True))
    reply = rig.wait(lambda: rig.seen(REPLY, start), what="a REPLY")[0]
    assert reply.client == b"client-1"
    assert parse_worker_reply(reply).data == b"r"
    assert ledger() == [b"r"]


# -- leaving ----------------------------------------------------------------------------


def test_leaving_while_leased_waits_for_the_end_of_the_lease(rig, leased, ledger):
    # A heartbeat of 1 s: the worker would leave on its own after 3 s.
    worker, client, endpoint = leased("--heartbeat", "1")
    assert rig.call(client, 7, b"before", b"1").ok
    start = rig.mark()
    os.kill(worker.pid, signal.SIGTERM)
    # Unsolicited: the worker tells the broker its lease must end.
    rig.wait(lambda: rig.seen(LEASE, start), what="the worker's LEASE 0")
    said = rig.seen(LEASE, start)[0]
    assert (said.epoch, said.held) == (0, 0)
    # From then on every direct job is refused, and the worker stays.
    reply = rig.call(client, 7, b"after", b"2")
    assert (reply.code, reply.message) == (ERR_NOT_RUN, NOT_RUN_STOPPING.decode())
    rig.idle(0.2)
    assert worker.poll() is None
    assert DISCONNECT not in rig.commands(start)
    assert os.path.exists(socket_file(endpoint))
    # The holder returned the lease: the broker ends it; the worker leaves.
    ended = rig.mark()
    rig.broker.send_multipart(backend_lease(rig.worker, 0))
    rig.wait(lambda: DISCONNECT in rig.commands(ended), what="DISCONNECT")
    assert rig.seen(LEASE, ended)[0].epoch == 0  # answered, before the DISCONNECT
    assert rig.commands(ended).index(LEASE) < rig.commands(ended).index(DISCONNECT)
    assert worker.wait(TIMEOUT) == 0
    assert not os.path.exists(socket_file(endpoint))
    assert ledger() == [b"1"]
    assert rig.counted()[0] == 1  # the job before, reported before the LEASE 0


def test_leaving_while_leased_without_an_answer_ends_after_liveness(rig, leased, ledger):
    worker, client, endpoint = leased()
    assert rig.call(client, 7, b"before", b"1").ok
    start = rig.mark()
    os.kill(worker.pid, signal.SIGTERM)
    rig.wait(lambda: rig.seen(LEASE, start), what="the worker's LEASE 0")
    # No LEASE 0 from the broker (which still heartbeats): the worker leaves
    # after heartbeat * liveness (0.6 s here), not for ever.
    rig.wait(lambda: DISCONNECT in rig.commands(start), what="DISCONNECT")
    assert worker.wait(TIMEOUT) == 0
    assert not os.path.exists(socket_file(endpoint))
    assert "did not end our lease" in read_log(worker)


def test_leaving_without_a_lease_is_as_before(rig, start_worker, ledger):
    worker = start_worker(TARGET, "--params", f"log:{ledger.path}")
    endpoint = rig.registered()
    start = rig.mark()
    os.kill(worker.pid, signal.SIGTERM)
    rig.wait(lambda: DISCONNECT in rig.commands(start), what="DISCONNECT")
    assert LEASE not in rig.commands(start)
    assert worker.wait(TIMEOUT) == 0
    assert not os.path.exists(socket_file(endpoint))


def test_max_age_while_leased_leaves_through_the_lease(rig, leased, ledger):
    worker, client, endpoint = leased("--max-age", "3")
    assert rig.call(client, 7, b"before", b"1").ok
    rig.wait(lambda: [m for m in rig.seen(LEASE) if m.epoch == 0], what="the worker's LEASE 0")
    reply = rig.call(client, 7, b"after", b"2")
    assert (reply.code, reply.message) == (ERR_NOT_RUN, NOT_RUN_STOPPING.decode())
    start = rig.mark()
    rig.broker.send_multipart(backend_lease(rig.worker, 0))
    rig.wait(lambda: DISCONNECT in rig.commands(start), what="DISCONNECT")
    assert worker.wait(TIMEOUT) == 0
    assert "max age reached" in read_log(worker)
    assert not os.path.exists(socket_file(endpoint))
    assert ledger() == [b"1"]


def test_a_direct_job_past_the_job_timeout_is_answered_and_the_worker_ends(
        rig, leased, ledger):
    worker, client, endpoint = leased("--timeout", "1")
    reply = rig.call(client, 7, b"stuck", b"sleep:60")
    assert (reply.ok, reply.code) == (False, ERR_TIMEOUT)
    assert "time limit" in reply.message
    assert worker.wait(TIMEOUT) == 3  # EXIT_JOB_TIMEOUT: restarted by its supervisor
    assert not os.path.exists(socket_file(endpoint))
