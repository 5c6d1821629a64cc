"""--timeout stops a target that holds the GIL in C code (issue #15, bug 6).

The watchdog thread cannot run then; faulthandler's timer, a C thread,
dumps the stacks and ends the worker, and Circus starts another.
"""

import time

import pytest

from pyramid_powerhose import exc
from tests.conftest import read_log, wait_for
from tests.test_cluster import clusters  # noqa: F401 (fixture)


def test_a_target_stuck_in_c_is_ended(start_broker, start_worker, wait_workers, client):
    start_broker()
    worker = start_worker("tests.reliability_targets:regex", "--timeout", "1")
    wait_workers(client, 1)
    started = time.monotonic()
    with pytest.raises(exc.WorkerLostError):
        client.execute(b"spin", timeout=30)
    assert worker.wait(10) != 0
    assert time.monotonic() - started < 10  # 1 s + the margin, not hours
    log = read_log(worker)
    assert "in regex" in log  # the stuck thread's stack was written out


def test_circus_restarts_the_ended_worker(clusters, client):  # noqa: F811
    cluster = clusters("tests.reliability_targets:regex", numprocesses=1, timeout=1)
    cluster.launch()
    first = cluster.pids()["workers"]
    with pytest.raises(exc.WorkerLostError):
        client.execute(b"spin", timeout=30)
    wait_for(lambda: cluster.pids()["workers"] not in ([], first), timeout=20,
             what="circus to start another worker")
    cluster.wait_ready(timeout=20)  # the broker has its one worker back
    assert client.execute(b"ok", timeout=10) == b"ok"


def test_a_long_job_within_the_limit_is_not_ended(start_broker, start_worker,
                                                  wait_workers, client):
    """The timer is re-armed while jobs run in Python, and cancelled at exit."""
    start_broker()
    worker = start_worker("tests.targets:spin", "--timeout", "1")
    wait_workers(client, 1)
    for _ in range(4):  # 3.2 s of jobs, past the timer's first deadline
        assert client.execute(b"800", timeout=10) == b"done"
    worker.terminate()
    assert worker.wait(10) == 0
