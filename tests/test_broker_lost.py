"""A broker that dies, or none at all: the client fails its jobs within about a second.

Before, each job in flight at a broker's kill -9 (and every job sent where
nothing listens) waited the client's full timeout.
"""

import threading
import time

import pytest

from pyramid_powerhose import Client, exc
from tests.conftest import wait_for

LOST_WITHIN = 2.5  # seconds; the timeouts below are 30


def test_jobs_in_flight_fail_fast_when_the_broker_is_killed(start_broker, start_worker,
                                                            wait_workers, endpoints):
    """Relayed jobs: a direct job in flight is not the broker's, and finishes
    (test_direct.py)."""
    client = Client(frontend=endpoints.frontend, direct=False)
    broker = start_broker()
    for _ in range(2):
        start_worker("tests.targets:sleep")
    wait_workers(client, 2)
    # Several threads (several sockets) and one map() of their own.
    futures = [client.submit(b"20", timeout=30) for _ in range(5)]
    mapped = []
    mapper = threading.Thread(target=lambda: mapped.append(_outcome(
        lambda: client.map([b"20", b"20"], timeout=30))))
    mapper.start()
    wait_for(lambda: client.stats()["services"]["default"]["queued"] >= 3,
             what="jobs queued at the broker")
    killed = time.monotonic()
    broker.kill()
    for future in futures:
        with pytest.raises(exc.BrokerLostError):
            future.result(timeout=30)
    mapper.join(30)
    assert isinstance(mapped[0], exc.BrokerLostError)
    assert time.monotonic() - killed < LOST_WITHIN
    client.close()


def test_no_broker_fails_fast_and_a_new_one_is_used(start_broker, start_worker,
                                                    wait_workers, endpoints):
    with Client(frontend=endpoints.frontend) as client:
        for _ in range(2):  # every job, not only the first
            started = time.monotonic()
            with pytest.raises(exc.BrokerLostError):
                client.execute(b"x", timeout=30)
            assert time.monotonic() - started < LOST_WITHIN
        assert client.ping(timeout=5) is None
        broker = start_broker()
        start_worker()
        wait_workers(client, 1)
        assert client.ping() == broker.pid
        assert client.execute(b"back", timeout=30) == b"back"


def test_a_long_job_with_a_live_broker_is_not_lost(start_broker, start_worker,
                                                  wait_workers, client):
    """Waiting in slices costs nothing to a job that takes many of them."""
    start_broker()
    start_worker("tests.targets:sleep")
    wait_workers(client, 1)
    assert client.execute(b"2", timeout=10).isdigit()
    assert client.map([b"1.5", b"0"], timeout=10)[0].isdigit()


def _outcome(call):
    try:
        return call()
    except Exception as error:
        return error


def test_short_lived_threads_each_get_a_watched_socket(cluster, client):
    """A new thread's socket may reuse a dead one's fd: its monitor must still start."""
    results = []
    for i in range(60):
        thread = threading.Thread(target=lambda i=i: results.append(
            _outcome(lambda: client.execute(b"%d" % i))))
        thread.start()
        thread.join()
    assert results == [b"%d" % i for i in range(60)]
