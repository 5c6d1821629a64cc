"""--max-memory: a worker past it finishes its job, leaves, and is restarted; no job is lost."""

import concurrent.futures

from tests.conftest import wait_for
from tests.test_cluster import clusters  # noqa: F401 (fixture)


def test_a_leaking_worker_is_recycled_without_losing_a_job(clusters, client):  # noqa: F811
    # Both workers may be restarting at once; on a slow machine for over a
    # second, which would be NoWorkerError as documented, not a lost job.
    cluster = clusters("tests.reliability_targets:leak", numprocesses=2, max_memory=120,
                       no_worker_timeout=10)
    cluster.launch()
    first = set(cluster.pids()["workers"])
    # Each job keeps 10 MiB in its worker for ever: 60 jobs would be 300 MiB
    # per worker without recycling.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        kept = list(pool.map(lambda _: int(client.execute(b"10", timeout=30)), range(60)))
    assert len(kept) == 60  # every job answered: none lost while workers left
    assert max(kept) <= 120  # the leak never grew past the limit
    wait_for(lambda: set(cluster.pids()["workers"]) - first, timeout=20,
             what="circus to start new workers")
    cluster.wait_ready(timeout=20)


def test_without_max_memory_nothing_is_recycled(start_broker, start_worker, wait_workers,
                                                client):
    start_broker()
    worker = start_worker("tests.reliability_targets:leak")
    wait_workers(client, 1)
    assert [int(client.execute(b"10")) for _ in range(3)][-1] == 30
    assert worker.poll() is None
