"""The broker's bounds, on a real broker process: what it refuses, and at once.

The exact rules (which job fits, which name is forgotten when) are tested
on the core in test_broker_core.py; these check that a real broker, started
with its command-line flags, applies them on real sockets.
"""

import threading
import time

import psutil
import pytest
import zmq

from pyramid_powerhose import Client, protocol as p
from pyramid_powerhose.exc import OverloadedError

from .conftest import wait_busy, wait_for

MiB = 1 << 20


@pytest.fixture
def raw_client(endpoints):
    """A DEALER speaking PHC01 by hand: the requests our Client would refuse to send."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoints.frontend)
    yield sock
    sock.close(0)
    context.term()


def answer(sock, timeout=3.0):
    assert sock.poll(timeout * 1000), "no answer from the broker"
    return p.parse_client_reply(sock.recv_multipart())


def test_an_over_long_service_name_gets_a_protocol_error_at_once(start_broker, raw_client):
    start_broker()
    started = time.monotonic()
    raw_client.send_multipart([b"", p.EXT_CLIENT, b"s" * 256, b"j1", b"30000", b"data"])
    reply = answer(raw_client)
    assert (reply.ok, reply.job_id, reply.code) == (False, b"j1", p.ERR_BAD_REQUEST)
    assert time.monotonic() - started < 2.0


def test_headers_count_toward_the_brokers_max_job_size(start_broker, start_worker,
                                                       wait_workers, client, raw_client):
    start_broker("--max-job-size", "1000")
    start_worker()
    wait_workers(client, 1)
    headers = [b"k", b"v" * 996]  # 1 + 996 + 4 bytes of data: one byte too many
    raw_client.send_multipart([b"", p.EXT_CLIENT, b"default", b"big", b"5000", b"data", *headers])
    reply = answer(raw_client)
    assert (reply.ok, reply.job_id, reply.code) == (False, b"big", p.ERR_TOO_LARGE)
    raw_client.send_multipart([b"", p.EXT_CLIENT, b"default", b"fits", b"5000", b"dat",
                               *headers])
    assert answer(raw_client).ok


def test_a_full_queue_fails_jobs_with_overloaded_at_once(start_broker, start_worker,
                                                         wait_workers, endpoints):
    start_broker("--max-queue", "1")
    start_worker("tests.targets:sleep")
    results = {}
    with Client(frontend=endpoints.frontend, timeout=30.0) as client:
        wait_workers(client, 1)

        def run(name, seconds):
            try:
                results[name] = client.execute(seconds)
            except Exception as exc:  # noqa: BLE001 -- the outcome is the test's subject
                results[name] = exc

        threads = [threading.Thread(target=run, args=("running", b"3"))]
        threads[0].start()
        wait_busy(client)
        threads.append(threading.Thread(target=run, args=("queued", b"0")))
        threads[1].start()
        wait_for(lambda: client.stats()["services"]["default"]["queued"] == 1,
                 what="a queued job")
        started = time.monotonic()
        with pytest.raises(OverloadedError):
            client.execute(b"0")
        assert time.monotonic() - started < 2.0  # not after the running job
        for thread in threads:
            thread.join(30)
    assert not isinstance(results["running"], Exception)
    assert not isinstance(results["queued"], Exception)


def test_service_names_nobody_serves_are_answered(start_broker, start_worker, wait_workers,
                                                  client, raw_client):
    """Each is answered NO_WORKER and counted; the broker goes on serving.
    That the names are forgotten after SERVICE_TTL is asserted exactly in
    test_broker_core, with a fake clock: here it would cost ten seconds."""
    start_broker("--no-worker-timeout", "0.2")
    start_worker()
    wait_workers(client, 1)
    for i in range(500):  # within the sockets' high-water marks: every answer arrives
        raw_client.send_multipart([b"", p.EXT_CLIENT, b"svc%d" % i, b"%d" % i, b"1000", b"x"])
    for _ in range(500):
        assert answer(raw_client, timeout=10).code == p.ERR_NO_WORKER
    assert len(client.stats()["services"]) == 501
    assert client.execute(b"still served") == b"still served"


def test_memory_of_a_burst_of_large_jobs_goes_back_to_the_system(start_broker, start_worker,
                                                                  wait_workers, endpoints):
    # Heartbeats of 1 s (not the fixtures' 0.2 s): moving 8 MiB jobs on a
    # loaded machine must not pass for a dead worker.
    broker = psutil.Process(start_broker("--max-queue-bytes", str(1 << 30),
                                         "--heartbeat", "1").pid)
    start_worker("tests.targets:sleep", "--heartbeat", "1")
    data = b"0.02" + b" " * (8 * MiB - 4)  # 8 MiB; the worker sleeps 20 ms
    # Relayed: on the direct path the jobs would wait in the client, not the broker.
    with Client(frontend=endpoints.frontend, timeout=60.0, direct=False) as client:
        wait_workers(client, 1)
        client.execute(b"0")
        before = broker.memory_info().rss
        peak = before
        for _ in range(2):
            threads = [threading.Thread(target=client.execute, args=(data,)) for _ in range(30)]
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                peak = max(peak, broker.memory_info().rss)
                time.sleep(0.02)
        assert client.stats()["services"]["default"]["done"] == 61
    assert peak - before > 100 * MiB  # the burst did queue in the broker
    wait_for(lambda: broker.memory_info().rss - before < 24 * MiB, timeout=5,
             what="the broker's memory back near where it started")
