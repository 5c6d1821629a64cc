"""AsyncClient on zmq.asyncio, against real brokers and workers: jobs awaited
together, the same errors as Client, cancellation, a lost broker, several
brokers.  Each test runs its own event loop (asyncio.run)."""

import asyncio
import signal
import socket
import time

import pytest

from pyramid_powerhose import Client, exc
from pyramid_powerhose.aio import AsyncClient
from pyramid_powerhose.client import collect_replies

from .conftest import wait_for


def workers(start_broker, start_worker, endpoints, count, target="tests.targets:sleep",
            service="default"):
    start_broker()
    for _ in range(count):
        start_worker(target, "--prefetch", "1", service=service)
    with Client(frontend=endpoints.frontend) as client:
        wait_for(lambda: client.stats()["services"].get(service, {}).get("workers") == count,
                 what="the workers")


def test_coroutines_await_their_jobs_together(start_broker, start_worker, endpoints):
    workers(start_broker, start_worker, endpoints, 4)

    async def main():
        async with AsyncClient(frontend=endpoints.frontend, timeout=10) as client:
            started = time.monotonic()
            pids = await asyncio.gather(*(client.execute(b"1") for _ in range(4)))
            return pids, time.monotonic() - started, await client.map([b"0"] * 10)

    pids, took, mapped = asyncio.run(main())
    assert len(set(pids)) == 4 and took < 2.5  # about 1 s, not 4
    assert len(mapped) == 10 and all(p.isdigit() for p in mapped)


def test_collected_replies_say_which_worker_ran_each_job(start_broker, start_worker,
                                                         endpoints):
    workers(start_broker, start_worker, endpoints, 2)

    async def main():
        async with AsyncClient(frontend=endpoints.frontend, timeout=10) as client:
            with collect_replies() as replies:
                pids = await client.map([b"0.5", b"0.5"])  # one job each
            await client.execute(b"0")  # not asked
            return pids, replies

    pids, replies = asyncio.run(main())
    host = socket.gethostname()
    assert sorted(r.worker for r in replies) == sorted(f"{p.decode()}@{host}" for p in pids)
    assert len(set(pids)) == 2


def test_the_same_errors_as_client(start_broker, start_worker, endpoints):
    start_broker()
    start_worker("tests.targets:boom", service="boom")
    start_worker("tests.targets:hang", service="hang")
    with Client(frontend=endpoints.frontend) as client:
        wait_for(lambda: client.has_service("boom") and client.has_service("hang"),
                 what="the workers")

    async def main():
        async with AsyncClient(frontend=endpoints.frontend) as client:
            with pytest.raises(exc.ExecutionError) as raised:
                await client.execute(b"x", service="boom")
            assert raised.value.exc_type.endswith("ValueError")
            with pytest.raises(exc.NoWorkerError):
                await client.execute(b"x", service="nobody", timeout=5)
            started = time.monotonic()
            with pytest.raises(exc.TimeoutError):
                await client.execute(b"x", service="hang", timeout=0.5)
            assert time.monotonic() - started < 2
            assert await client.ping() is not None

    asyncio.run(main())


def test_a_cancelled_job_is_abandoned_and_its_late_reply_dropped(start_broker, start_worker,
                                                                endpoints):
    workers(start_broker, start_worker, endpoints, 1)

    async def main():
        async with AsyncClient(frontend=endpoints.frontend, timeout=10) as client:
            task = asyncio.ensure_future(client.execute(b"0.5"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The abandoned job's reply comes back during this one: dropped.
            return await client.execute(b"0.8"), await client.execute(b"0")

    first, second = asyncio.run(main())
    assert first.isdigit() and second.isdigit()


def test_a_lost_broker_fails_jobs_fast(start_broker, start_worker, endpoints, procs):
    workers(start_broker, start_worker, endpoints, 1)
    broker = procs.procs[0]

    async def main():
        async with AsyncClient(frontend=endpoints.frontend, timeout=30) as client:
            job = asyncio.ensure_future(client.execute(b"5"))
            await asyncio.sleep(0.5)
            started = time.monotonic()
            broker.send_signal(signal.SIGKILL)
            with pytest.raises(exc.BrokerLostError):
                await job
            assert time.monotonic() - started < 3
            started = time.monotonic()
            with pytest.raises(exc.BrokerLostError):  # and while none listens
                await client.execute(b"0")
            assert time.monotonic() - started < 3

    asyncio.run(main())


def test_several_brokers_share_the_jobs(start_broker, start_worker, endpoints, run_dir):
    other = (f"ipc://{run_dir}/f2.sock", f"ipc://{run_dir}/b2.sock")
    start_broker()
    start_broker(frontend=other[0], backend=other[1])
    start_worker("tests.targets:echo")
    start_worker("tests.targets:echo", backend=other[1])
    with Client(frontend=[endpoints.frontend, other[0]]) as client:
        wait_for(lambda: all(s and s["services"].get("default", {}).get("workers") == 1
                             for s in client.broker_stats().values()), what="both brokers")

    async def main():
        async with AsyncClient(frontend=[endpoints.frontend, other[0]]) as client:
            await asyncio.sleep(0.3)  # both connections up
            return await asyncio.gather(*(client.execute(b"%d" % i) for i in range(20)))

    results = asyncio.run(main())
    assert results == [b"%d" % i for i in range(20)]
    with Client(frontend=[endpoints.frontend, other[0]]) as client:
        done = [s["services"]["default"]["done"] for s in client.broker_stats().values()]
    assert min(done) >= 5


def test_an_asyncio_http_server_serves_offloaded_requests_at_once(start_broker, start_worker,
                                                                  endpoints, procs):
    import concurrent.futures
    import socket
    import sys
    import urllib.request

    from .conftest import REPO
    workers(start_broker, start_worker, endpoints, 4)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs.start([sys.executable, "-m", "tests.asyncio_server", "127.0.0.1", str(port),
                 endpoints.frontend], "asyncio-server", cwd=REPO)
    url = f"http://127.0.0.1:{port}/job"

    def get(seconds):
        with urllib.request.urlopen(f"{url}?s={seconds}", timeout=30) as response:
            return response.read()

    wait_for(lambda: _answers(get), timeout=30, what="the asyncio server")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        pids = list(pool.map(get, ["1"] * 4))
    assert time.monotonic() - started < 2.5  # four 1 s jobs at once, not one after another
    assert len(set(pids)) == 4


def _answers(get):
    try:
        return get("0").isdigit()
    except OSError:
        return False
