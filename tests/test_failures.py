"""Failures: dead, hung, silent and recycled workers; a restarted broker."""

import os
import signal
import threading
import time

import pytest

from pyramid_powerhose import Client, exc, multipart, protocol
from pyramid_powerhose.client import _receive
from pyramid_powerhose.protocol import Request
from tests.conftest import read_log, wait_busy, wait_for


def test_worker_killed_mid_job_fails_fast(start_broker, start_worker, wait_workers, client):
    start_broker()
    worker = start_worker("tests.targets:sleep")
    wait_workers(client, 1)
    future = client.submit(b"30", timeout=60)
    wait_busy(client)
    killed = time.monotonic()
    worker.kill()
    with pytest.raises(exc.WorkerLostError, match="died or disconnected"):
        future.result(timeout=60)
    assert time.monotonic() - killed < 3  # not the 60 s client timeout


def test_silent_worker_is_expired_by_heartbeat(start_broker, start_worker, wait_workers,
                                               client):
    start_broker()
    worker = start_worker("tests.targets:sleep")
    wait_workers(client, 1)
    future = client.submit(b"30", timeout=60)
    wait_busy(client)
    stopped = time.monotonic()
    worker.send_signal(signal.SIGSTOP)  # alive but silent: only heartbeats can tell
    try:
        with pytest.raises(exc.WorkerLostError):
            future.result(timeout=60)
        assert time.monotonic() - stopped < 5  # liveness is 3 x 0.2 s
    finally:
        worker.send_signal(signal.SIGCONT)


def test_long_job_keeps_heartbeating(start_broker, start_worker, wait_workers, client):
    """A job ten times longer than the broker's liveness is not mistaken for death."""
    start_broker()
    start_worker("tests.targets:spin")  # holds the GIL the whole time
    wait_workers(client, 1)
    assert client.execute(b"2000", timeout=10) == b"done"


def test_hung_worker_is_killed_and_others_keep_serving(start_broker, start_worker,
                                                       wait_workers, client):
    start_broker()
    hung = start_worker("tests.targets:hang", "--timeout", "1", service="hang")
    start_worker()  # another service keeps serving meanwhile
    wait_workers(client, 1, service="hang")
    wait_workers(client, 1)
    future = client.submit(b"", service="hang", timeout=60)
    started = time.monotonic()
    while not future.done() and time.monotonic() - started < 10:
        assert client.execute(b"still here") == b"still here"
    with pytest.raises(exc.TimeoutError, match="time limit"):
        future.result(timeout=1)
    assert time.monotonic() - started < 5
    assert hung.wait(5) == 3
    log = read_log(hung)
    assert "exceeded the 1.0s time limit" in log and "in hang" in log  # every stack logged
    # A replacement (what a supervisor does) takes over the service.
    start_worker("tests.targets:echo", service="hang")
    wait_workers(client, 1, service="hang")
    assert client.execute(b"back", service="hang") == b"back"


def test_broker_restart_workers_reconnect_client_recovers(start_broker, start_worker,
                                                          wait_workers, client, procs):
    broker = start_broker()
    workers = [start_worker() for _ in range(2)]
    wait_workers(client, 2)
    assert client.execute(b"before") == b"before"
    broker.kill()
    broker.wait()
    # On the direct path a job may still run on a lease until the client's
    # watcher sees the broker's connection drop (milliseconds): the lease was
    # the broker's word.  Once it has, the leases are gone.
    wait_for(lambda: client._direct is None or not client._direct.by_epoch, timeout=5)
    # No broker: a typed error, at once or at the (short) timeout.  Which one
    # depends on whether the client has seen its connection drop yet (it
    # learns that from its socket monitor, in another thread): BrokerLostError
    # if it has by the time it looks, else TimeoutError.
    with pytest.raises((exc.TimeoutError, exc.BrokerLostError)):
        client.execute(b"during", timeout=0.5)
    start_broker()
    wait_workers(client, 2, timeout=10)
    assert client.execute(b"after") == b"after"
    assert all(worker.poll() is None for worker in workers)


def test_max_age_recycling_under_load_loses_no_job(start_broker, start_worker, client,
                                                   wait_workers):
    # A slow machine may restart all three at once for over a second: the
    # jobs wait for the next worker (no_worker_timeout is 10 s here); a
    # lost job would show as a TimeoutError.
    start_broker("--no-worker-timeout", "10")
    args = ("--max-age", "0.5", "--max-age-delta", "0.5")
    workers = [start_worker("tests.targets:echo", *args) for _ in range(3)]
    wait_workers(client, 3)
    stop = threading.Event()
    failures, done = [], [0]
    began = time.monotonic()

    def load():
        while not stop.is_set():
            sent = time.monotonic()
            try:
                assert client.execute(b"x", timeout=10) == b"x"
                done[0] += 1
            except Exception as error:  # noqa: BLE001 -- reported below, with when
                failures.append((round(sent - began, 2), round(time.monotonic() - began, 2),
                                 error))

    restarts = []

    def supervise():  # a minimal Circus: a worker that retired is replaced
        for i, worker in enumerate(workers):
            if worker.poll() is not None:
                assert worker.returncode == 0, read_log(worker)
                workers[i] = start_worker("tests.targets:echo", *args)
                restarts.append(round(time.monotonic() - began, 2))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    while time.monotonic() - began < 6:
        supervise()
        time.sleep(0.02)
    stop.set()
    stopped = round(time.monotonic() - began, 2)
    # Until the last jobs are answered: they too need workers, and the
    # workers running now retire within a second.
    while any(thread.is_alive() for thread in threads) and time.monotonic() - began < 30:
        supervise()
        time.sleep(0.02)
    for thread in threads:
        thread.join(5)
    assert failures == [], f"load stopped at {stopped} s; restarts at {restarts}"
    assert len(restarts) >= 3
    assert done[0] > 100


def test_worker_sigterm_finishes_the_current_job(start_broker, start_worker, wait_workers,
                                                 client):
    start_broker()
    worker = start_worker("tests.targets:sleep")
    wait_workers(client, 1)
    future = client.submit(b"1.0", timeout=10)
    wait_busy(client)
    worker.send_signal(signal.SIGTERM)
    assert future.result(timeout=10) == str(worker.pid).encode()
    assert worker.wait(5) == 0
    wait_workers(client, 0)


def test_broker_sigterm_drains_in_flight_jobs(start_broker, start_worker, wait_workers,
                                              client):
    broker = start_broker()
    start_worker("tests.targets:sleep")
    wait_workers(client, 1)
    future = client.submit(b"1.0", timeout=10)
    wait_busy(client)
    broker.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(exc.NoWorkerError, match="shutting down"):
        client.execute(b"0", timeout=5)  # no new jobs while draining
    assert future.result(timeout=10).isdigit()  # the accepted one finished
    assert broker.wait(5) == 0


def test_a_reply_read_after_the_broker_stopped_is_not_lost(start_broker, start_worker,
                                                          wait_workers, client):
    """The reply sits unread in the client's socket when the broker's connection closes.

    Steps the client's own per-thread socket by hand, so that nothing reads
    until the broker is gone (with ZMQ_IMMEDIATE, libzmq dropped the reply).
    """
    broker = start_broker()
    start_worker("tests.targets:sleep")
    wait_workers(client, 1)
    channel = client._channel()
    req = Request(b"default", channel.next_id(), b"0.5", 10_000)
    losses = channel.losses
    multipart.send(channel.socket, protocol.client_request(req))
    wait_busy(client)
    assert multipart.recv_within(channel.socket, 0) is None  # nothing yet
    broker.send_signal(signal.SIGTERM)
    assert broker.wait(10) == 0  # the job finished, its reply went out, then the connection closed
    time.sleep(0.5)  # time for the client's I/O thread to see the connection go
    reply = _receive(client, channel, {req.job_id}, time.monotonic() + 1, req, 1, losses)
    assert reply.ok and reply.data.isdigit()


def test_jobs_that_timed_out_without_a_broker_never_run(start_broker, start_worker,
                                                        wait_workers, endpoints, run_dir):
    seen = os.path.join(run_dir, "seen")
    with Client(frontend=endpoints.frontend) as client:
        for n in range(3):
            with pytest.raises(exc.TimeoutError):
                client.execute(b"stale-%d" % n, timeout=0.2)
        start_broker()
        start_worker("tests.targets:record", "--params", f"log:{seen}")
        wait_workers(client, 1)
        assert client.execute(b"fresh") == b"fresh"
        time.sleep(0.5)  # a stale job would have come right behind
    with open(seen, "rb") as f:
        assert f.read() == b"fresh\n"


def test_worker_exits_when_no_broker_for_too_long(start_worker):
    worker = start_worker("tests.targets:echo", "--broker-timeout", "1")
    assert worker.wait(15) == 2
    assert "no broker at" in read_log(worker)


def test_worker_killed_with_a_prefetched_job_fails_both_fast(start_broker, start_worker,
                                                             wait_workers, client):
    start_broker()
    worker = start_worker("tests.targets:sleep", "--prefetch", "2")
    wait_workers(client, 1)
    client.map([b"0"] * 5)  # short jobs: the broker prefetches
    running = client.submit(b"30", timeout=60)
    wait_busy(client)
    waiting = client.submit(b"0", timeout=60)
    wait_for(lambda: client.stats()["services"]["default"]["queued"] == 0, what="prefetch")
    time.sleep(0.1)
    killed = time.monotonic()
    worker.kill()
    for future in (running, waiting):
        with pytest.raises(exc.WorkerLostError):
            future.result(timeout=60)
    assert time.monotonic() - killed < 3
