"""The direct path end to end: a real broker, real workers, real clients.

The pieces are tested alone elsewhere (test_protocol, test_broker_leases,
test_direct_worker, test_direct_client); here they meet, and the
guarantees of PROTOCOL.rst, "The direct path", are checked where they
matter: which path a job took, a worker killed or leaving with a direct
job, a holder killed, a broker killed, jobs of other processes waiting.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pyramid_powerhose import Client, exc
from tests.conftest import REPO, read_log, wait_for

JOB_PATH = "direct"  # whatever pytest --path says (conftest)
LOST_WITHIN = 2.0  # seconds: WorkerLostError "within a second", with margin


def service(client, name="default"):
    return client.stats(timeout=1.0)["services"].get(name, {})


def direct_count(client):
    return service(client).get("direct", 0)


def leased_to(client):
    """Worker pids by holder (address hex), from the broker's stats."""
    holders = {}
    for worker in client.stats(timeout=1.0)["workers"]:
        if worker.get("leased_to"):
            holders.setdefault(worker["leased_to"], set()).add(worker["pid"])
    return holders


def until_direct(client, data=b"", **kwargs) -> int:
    """Jobs until the broker has counted one that went direct; how many."""
    sent = []

    def sent_one_direct():
        client.execute(data, **kwargs)
        sent.append(1)
        return direct_count(client) > 0
    wait_for(sent_one_direct, what="a job on the direct path")
    return len(sent)


@pytest.fixture
def direct_cluster(start_broker, start_worker, wait_workers, client):
    broker = start_broker()
    workers = [start_worker("tests.targets:pid") for _ in range(2)]
    wait_workers(client, 2)
    return broker, workers


def test_jobs_go_direct_and_the_broker_counts_them(direct_cluster, client):
    sent = until_direct(client, b"")
    pids = {client.execute(b"") for _ in range(50)}
    assert len(pids) == 1  # one thread, one lease: one worker
    # Every job counted once, whichever path it took; direct ones once their
    # worker is idle (FREE).
    wait_for(lambda: service(client)["done"] == sent + 50,
             what="the broker to count every job")
    after = service(client)
    assert after["direct"] >= 50 and after["leased"] == 1
    assert client.has_service()  # mmi.service: a leased worker still serves it


def test_headers_errors_and_who_ran_the_job_on_the_direct_path(start_broker, start_worker,
                                                                wait_workers, client):
    start_broker()
    start_worker("tests.targets:headers")
    wait_workers(client, 1)
    until_direct(client, headers={"a": "1"})
    assert client.execute(b"", headers={"k": "v", "z": "é"}) == "k=v|z=é".encode()
    from pyramid_powerhose.client import collect_replies
    with collect_replies() as replies:
        client.execute(b"", headers={"powerhose.worker": ""})
    (reply,) = replies
    pid = client.stats()["workers"][0]["pid"]
    assert reply.worker.startswith(f"{pid}@")


def test_an_exception_on_the_direct_path_is_an_execution_error(start_broker, start_worker,
                                                               wait_workers, client):
    start_broker()
    start_worker("tests.targets:boom")
    wait_workers(client, 1)
    failed = []

    def failed_direct():
        with pytest.raises(exc.ExecutionError) as raised:
            client.execute(b"x")
        assert raised.value.exc_type.endswith("ValueError")
        failed.append(raised.value)
        return direct_count(client) > 0

    wait_for(failed_direct, what="a failure on the direct path")
    wait_for(lambda: service(client)["outcomes"].get("ExecutionError") == len(failed),
             what="every failure counted")
    assert service(client)["failed"] == len(failed)


def test_a_worker_killed_with_a_direct_job_fails_it_fast(start_broker, start_worker,
                                                         wait_workers, client, procs):
    start_broker()
    worker = start_worker("tests.targets:sleep")
    wait_workers(client, 1)
    until_direct(client, b"0")
    future = client.submit(b"30", timeout=60)
    wait_for(lambda: service(client)["busy"] == 1, what="the direct job to start")
    killed = time.monotonic()
    procs.stop(worker, signal.SIGKILL)
    with pytest.raises(exc.WorkerLostError):
        future.result(timeout=30)
    assert time.monotonic() - killed < LOST_WITHIN


def test_a_job_is_never_run_twice_through_revocations(start_broker, start_worker,
                                                      wait_workers, endpoints, run_dir,
                                                      client):
    """Two processes' threads and a relayed client pull the two workers back
    and forth (grants, revocations, NOT_RUN resends): each job runs once."""
    ledger = os.path.join(run_dir, "ledger")
    start_broker()
    for _ in range(2):
        start_worker("tests.targets:record", "--params", f"log:{ledger}")
    wait_workers(client, 2)
    script = (
        "import sys, threading\n"
        "from pyramid_powerhose import Client\n"
        "c = Client(frontend=sys.argv[1], timeout=30)\n"
        "def run(t):\n"
        "    for i in range(150):\n"
        "        key = f'{sys.argv[2]}-{t}-{i}'.encode()\n"
        "        assert c.execute(key) == key\n"
        "ts = [threading.Thread(target=run, args=(t,)) for t in range(3)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "c.close()\n")
    others = [subprocess.Popen([sys.executable, "-c", script, endpoints.frontend, f"p{n}"],
                               cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
              for n in range(2)]
    with Client(frontend=endpoints.frontend, timeout=30, direct=False) as relayed:
        for i in range(60):
            key = f"relayed-{i}".encode()
            assert relayed.execute(key) == key
    for other in others:
        assert other.wait(120) == 0
    with open(ledger) as f:
        keys = f.read().split()
    assert len(keys) == len(set(keys)) == 2 * 3 * 150 + 60
    stats = service(client)
    assert stats["direct"] > 0  # some went direct, some were relayed


def test_no_worker_idles_while_another_process_waits(start_broker, start_worker,
                                                     wait_workers, endpoints, client):
    """Process A holds both workers' leases; process B's job is not kept
    waiting behind A's: a lease is revoked for it at once."""
    start_broker()
    for _ in range(2):  # credit 1: two threads at once need two leases
        start_worker("tests.targets:sleep", "--prefetch", "1")
    wait_workers(client, 2)

    def two_at_once():  # process A: two threads, until it holds both leases
        threads = [threading.Thread(target=client.execute, args=(b"0.05",))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        return sum(len(pids) for pids in leased_to(client).values()) == 2

    wait_for(two_at_once, what="process A to hold both leases")
    with Client(frontend=endpoints.frontend, timeout=10) as other:
        started = time.monotonic()
        assert other.execute(b"0").isdigit()
        assert time.monotonic() - started < 1.0  # not a timeout: a revocation


def test_the_broker_sees_a_direct_job_run_by_the_workers_busy_word(start_broker,
                                                                   start_worker,
                                                                   wait_workers, client):
    """A job that ends a pause sends the broker nothing (no REPORT): the
    broker reads the worker's busy word, and its stats show the worker busy
    while the job runs, idle after."""
    start_broker()
    start_worker("tests.targets:sleep")
    wait_workers(client, 1)
    until_direct(client, b"0")
    time.sleep(0.1)  # idle: the worker has said FREE
    assert service(client)["busy"] == 0
    done = direct_count(client)
    job = threading.Thread(target=client.execute, args=(b"2",))
    job.start()
    try:
        wait_for(lambda: service(client)["busy"] == 1, timeout=1.5,
                 what="the broker to see the direct job running")
    finally:
        job.join(10)
    wait_for(lambda: service(client)["busy"] == 0, what="the worker idle again")
    wait_for(lambda: direct_count(client) == done + 1, what="the job counted as direct")


def test_a_killed_holder_lets_its_workers_go(start_broker, start_worker, wait_workers,
                                            endpoints, client):
    start_broker("--no-worker-timeout", "30")
    start_worker("tests.targets:pid")
    wait_workers(client, 1)
    # Jobs until the broker counts one on the direct path (the stats' queries
    # between jobs leave the grant time to land even on a loaded machine).
    script = ("import sys, time\n"
              "from pyramid_powerhose import Client\n"
              "c = Client(frontend=sys.argv[1])\n"
              "deadline = time.monotonic() + 20\n"
              "while time.monotonic() < deadline:\n"
              "    c.execute(b'')\n"
              "    if c.stats()['services']['default'].get('direct'):\n"
              "        break\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script, endpoints.frontend], cwd=REPO,
                              stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert holder.stdout.readline() == b"ready\n"
        wait_for(lambda: leased_to(client), what="the holder's lease")
        holder.kill()
        holder.wait(10)
        # The broker forgets a silent holder after 3 s; then the worker is free.
        wait_for(lambda: not leased_to(client), timeout=10, what="the lease to end")
        assert client.execute(b"") == str(client.stats()["workers"][0]["pid"]).encode()
    finally:
        holder.kill()
        holder.wait(10)


def test_a_direct_job_in_flight_finishes_when_the_broker_dies(start_broker, start_worker,
                                                               wait_workers, client, procs):
    broker = start_broker()
    start_worker("tests.targets:sleep")
    wait_workers(client, 1)
    until_direct(client, b"0")
    future = client.submit(b"1", timeout=30)
    wait_for(lambda: service(client)["busy"] == 1, what="the direct job to start")
    procs.stop(broker, signal.SIGKILL)
    assert future.result(timeout=30).isdigit()  # the broker was not on its path
    with pytest.raises(exc.BrokerLostError):
        client.execute(b"0", timeout=10)  # new jobs: no lease, no broker


def test_recycling_under_direct_load_loses_nothing(start_broker, start_worker, wait_workers,
                                                   client):
    """Workers that reach --max-age while leased leave through the lease
    (NOT_RUN for what comes after, resent relayed); every job is answered."""
    start_broker()
    workers = [start_worker("tests.targets:pid", "--max-age", "1", "--broker-timeout", "5")
               for _ in range(2)]
    wait_workers(client, 2)
    errors, answered = [], []

    def run():
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                answered.append(client.execute(b"", timeout=10))
            except exc.NoWorkerError:
                time.sleep(0.05)  # both workers gone at once: none registered yet
            except Exception as error:  # reported below
                errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(answered) > 100
    for worker in workers:
        assert worker.wait(20) == 0  # left cleanly after max_age
    assert any("direct" in read_log(w) for w in workers)
