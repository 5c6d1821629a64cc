"""Jobs end to end through real broker and worker processes."""

import os
import threading
import time
from concurrent.futures import Future

import pytest

from pyramid_powerhose import Client, Job, exc
from tests.conftest import wait_busy, wait_for


def test_echo_str_and_bytes(cluster, client):
    assert client.execute(b"hello") == b"hello"
    assert client.execute("héllo") == "héllo".encode()


def test_binary_data_all_bytes_empty_and_10mb(cluster, client):
    every_byte = bytes(range(256)) * 4
    assert client.execute(every_byte) == every_byte
    assert client.execute(b"") == b""
    big = os.urandom(10 * 1024 * 1024)
    assert client.execute(big, timeout=30) == big


def test_headers_reach_the_worker(start_broker, start_worker, wait_workers, client):
    start_broker()
    start_worker("tests.targets:headers")
    wait_workers(client, 1)
    assert client.execute(b"", headers={"a": "1", "b": "ü"}) == "a=1|b=ü".encode()
    job = Job(b"", headers={"from": "job"})
    assert client.execute(job, headers={"extra": "x"}) == b"extra=x|from=job"


def test_remote_exception_carries_type_and_traceback(start_broker, start_worker,
                                                     wait_workers, client):
    start_broker()
    start_worker("tests.targets:boom")
    wait_workers(client, 1)
    with pytest.raises(exc.ExecutionError) as info:
        client.execute(b"kaput")
    error = info.value
    assert error.exc_type == "ValueError"
    assert "boom: kaput" in str(error)
    assert 'targets.py", line' in error.traceback and "raise ValueError" in error.traceback
    # The worker keeps serving after an exception.
    with pytest.raises(exc.ExecutionError):
        client.execute(b"again")


def test_wrong_result_type_is_an_execution_error(start_broker, start_worker, wait_workers,
                                                 client):
    start_broker()
    start_worker("tests.targets:wrong_type")
    wait_workers(client, 1)
    with pytest.raises(exc.ExecutionError, match="must return bytes or str"):
        client.execute(b"x")


def test_no_worker_error_arrives_fast(start_broker, client):
    start_broker()
    started = time.monotonic()
    with pytest.raises(exc.NoWorkerError, match="nobody"):
        client.execute(b"x", service="nobody", timeout=30)
    assert time.monotonic() - started < 5  # default --no-worker-timeout is 1 s


def test_no_worker_timeout_is_configurable(start_broker, client):
    start_broker("--no-worker-timeout", "0.2")
    started = time.monotonic()
    with pytest.raises(exc.NoWorkerError):
        client.execute(b"x", service="nobody", timeout=30)
    assert time.monotonic() - started < 2.5


def test_job_waits_for_a_worker_that_registers_late(start_broker, start_worker, client):
    start_broker("--no-worker-timeout", "10")
    result = client.submit(b"late", timeout=20)
    start_worker()
    assert result.result(timeout=20) == b"late"


def test_client_timeout_then_socket_still_usable(start_broker, start_worker, wait_workers,
                                                 client):
    start_broker()
    start_worker("tests.targets:sleep")
    wait_workers(client, 1)
    started = time.monotonic()
    with pytest.raises(exc.TimeoutError) as info:
        client.execute(b"1.0", timeout=0.3)
    assert isinstance(info.value, TimeoutError)  # the builtin, too
    assert time.monotonic() - started < 0.9
    # The late reply of the first job arrives while we wait for this one:
    # it is recognised by its job id and dropped.
    pid = client.execute(b"0", timeout=5)
    assert pid.isdigit()


def test_queued_job_past_its_deadline_is_dropped_unrun(start_broker, start_worker,
                                                       wait_workers, client):
    start_broker()
    start_worker("tests.targets:sleep")
    wait_workers(client, 1)
    busy = client.submit(b"1.0", timeout=10)
    time.sleep(0.1)
    with pytest.raises(exc.TimeoutError):
        client.execute(b"0", timeout=0.3)
    assert busy.result().isdigit()
    wait_for(lambda: client.stats()["services"]["default"]["failed"] == 1,
             what="broker counted the expired job")
    # The expired job never ran: only the long job was done.
    assert client.stats()["services"]["default"]["done"] == 1


def test_least_recently_used_dispatch(start_broker, start_worker, wait_workers, endpoints):
    """The broker's order, relayed: on the direct path one thread's jobs keep
    to the one worker leased to its process (test_direct.py)."""
    start_broker()
    for _ in range(3):
        start_worker("tests.targets:pid")
    client = Client(frontend=endpoints.frontend, direct=False)
    wait_workers(client, 3)
    pids = [client.execute(b"") for _ in range(9)]
    client.close()
    first_round = pids[:3]
    assert len(set(first_round)) == 3
    assert pids == first_round * 3  # each job goes to the worker idle the longest


def test_sixteen_threads_two_hundred_jobs_each(cluster, client):
    errors, results = [], {}

    def run(n):
        try:
            results[n] = [client.execute(b"%d-%d" % (n, i)) for i in range(200)]
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    for n in range(16):
        assert results[n] == [b"%d-%d" % (n, i) for i in range(200)]


def test_threads_are_not_serialised(start_broker, start_worker, wait_workers, client):
    """Four 0.5 s jobs on four workers from four threads overlap in time."""
    start_broker()
    for _ in range(4):
        start_worker("tests.targets:sleep")
    wait_workers(client, 4)
    started = time.monotonic()
    threads = [threading.Thread(target=client.execute, args=(b"0.5",)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - started < 1.5  # serialised would take 2 s


def test_submit_returns_a_future(cluster, client):
    future = client.submit(b"async")
    assert isinstance(future, Future)
    assert future.result(timeout=5) == b"async"


def test_map_returns_results_in_order(cluster, client):
    data = [b"job-%d" % i for i in range(500)]
    assert client.map(data) == data


def test_map_raises_the_first_failure(start_broker, start_worker, wait_workers, client):
    start_broker()
    start_worker("tests.targets:boom")
    wait_workers(client, 1)
    with pytest.raises(exc.ExecutionError, match="boom: a"):
        client.map([b"a", b"b"])


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_client_in_a_forked_child(cluster, client):
    assert client.execute(b"parent") == b"parent"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            ok = client.execute(b"child") == b"child"
            ok = ok and client.submit(b"child-future").result(5) == b"child-future"
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.execute(b"parent again") == b"parent again"


def test_ping_stats_and_mmi_service(cluster, client):
    broker, _ = cluster
    assert client.ping() == broker.pid
    assert client.has_service("default")
    assert not client.has_service("nobody")
    stats = client.stats()
    assert stats["pid"] == broker.pid
    assert stats["services"]["default"]["workers"] == 2
    assert stats["services"]["default"]["idle"] == 2


def test_ping_without_broker_returns_none(endpoints):
    with Client(frontend=endpoints.frontend) as client:
        started = time.monotonic()
        assert client.ping(timeout=0.3) is None
        assert time.monotonic() - started < 2


def test_execute_without_broker_times_out_with_a_clear_message(endpoints):
    with Client(frontend=endpoints.frontend) as client:
        with pytest.raises(exc.TimeoutError, match="is powerhose-broker running"):
            client.execute(b"x", timeout=0.3)


def test_oversized_job_refused_by_client_and_by_broker(start_broker, start_worker,
                                                       wait_workers, endpoints):
    start_broker("--max-job-size", "1000")
    start_worker()
    with Client(frontend=endpoints.frontend, max_job_size=100) as small:
        with pytest.raises(exc.JobTooLargeError, match="101 bytes"):
            small.execute(b"x" * 101)
    with Client(frontend=endpoints.frontend) as client:
        wait_workers(client, 1)
        with pytest.raises(exc.JobTooLargeError, match="max job size"):
            client.execute(b"x" * 1001)
        assert client.execute(b"x" * 1000) == b"x" * 1000


def test_bad_arguments_are_caught_before_sending(endpoints):
    with Client(frontend=endpoints.frontend) as client:
        with pytest.raises(TypeError):
            client.execute(12)
        with pytest.raises(TypeError):
            client.execute(b"x", headers={"k": 1})
        with pytest.raises(ValueError):
            client.execute(b"x", timeout=0)


def test_closed_client_refuses_jobs(endpoints):
    client = Client(frontend=endpoints.frontend)
    client.close()
    with pytest.raises(exc.PowerhoseError, match="closed"):
        client.execute(b"x")


def test_params_reach_the_worker(start_broker, start_worker, wait_workers, client):
    start_broker()
    start_worker("tests.targets:params", "--params", "db:sqlite://x|mode:fast")
    wait_workers(client, 1)
    assert client.execute(b"") == b"db=sqlite://x|mode=fast"


def test_prefetched_job_past_its_deadline_is_not_run(start_broker, start_worker,
                                                     wait_workers, client):
    start_broker()
    start_worker("tests.targets:sleep", "--prefetch", "2")
    wait_workers(client, 1)
    client.map([b"0"] * 5)
    busy = client.submit(b"1.0", timeout=10)
    wait_busy(client)
    with pytest.raises(exc.TimeoutError):
        client.execute(b"0", timeout=0.3)  # handed to the busy worker, then too late
    assert busy.result().isdigit()
    stats = wait_for(lambda: (s := client.stats()["services"]["default"])["failed"] == 1 and s,
                     what="the worker reported the expired job")
    assert stats["done"] == 6  # the five warm-up jobs and the long one: not the expired one
