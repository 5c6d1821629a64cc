"""``powerhose status``: percentiles read exactly from the broker's
histograms, the rows it shows, and the command against a real broker."""

import json
import subprocess
import time

import pytest

from pyramid_powerhose.status import quantile, render, service_rows, worker_rows

from .conftest import command
from .test_broker_core import make_core, ready, reply, reply_error, submit


def histogram(*pairs, inf=None):
    buckets = [list(pair) for pair in pairs]
    count = buckets[-1][1] if inf is None else inf
    return {"buckets": [*buckets, ["+Inf", count]], "sum": 0.0, "count": count}


def test_quantiles_interpolate_within_the_bucket_of_the_rank():
    h = histogram((0.1, 0), (0.5, 10), (1.0, 10))
    assert quantile(0.5, h) == pytest.approx(0.3)
    assert quantile(0.99, h) == pytest.approx(0.496)
    h = histogram((0.1, 4), (0.5, 8), (1.0, 10))
    assert quantile(0.5, h) == pytest.approx(0.1 + 0.4 * (5 - 4) / 4)
    assert quantile(0.95, h) == pytest.approx(0.5 + 0.5 * (9.5 - 8) / 2)
    assert quantile(0.5, histogram((0.1, 0), inf=0)) is None
    assert quantile(0.99, histogram((0.1, 0), (1.0, 1), inf=10)) == 1.0  # beyond: the bound


def test_rows_show_what_the_core_counted():
    core = make_core()
    ready(core, 0.0, b"w1")
    ready(core, 0.0, b"w2")
    submit(core, 1.0, b"c", b"1")
    submit(core, 1.0, b"c", b"2")
    reply(core, 1.004, b"w1", b"c", b"1")
    reply_error(core, 1.02, b"w2", b"c", b"2")
    submit(core, 2.0, b"c", b"3")
    stats = core.stats(3.0)
    ((name, idle, busy, queued, rate, wait50, wait99, run50, run99, done, errors),) = \
        service_rows(stats)
    assert (name, idle, busy, queued, done) == ("svc", 1, 1, 0, 1)
    assert float(rate) == pytest.approx(2 / 60, abs=0.001)
    assert 2.5 <= float(run50) <= 10 and 10 <= float(run99) <= 25  # 4 ms and 20 ms
    assert errors == "ExecutionError 1"
    states = {row[0]: row[4] for row in worker_rows(stats)}
    assert sorted(states.values()) == ["1 job(s)", "idle"]
    assert str(stats["pid"]) in render(stats).split()[2]  # "broker pid N"


def test_status_against_a_real_broker(cluster, endpoints, client):
    broker, _ = cluster
    for i in range(5):
        client.execute(b"%d" % i)
    result = subprocess.run(command("powerhose") + [
        "status", "--frontend", endpoints.frontend, "--json"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["pid"] == broker.pid
    assert stats["services"]["default"]["done"] >= 5
    assert len(stats["workers"]) == 2
    table = subprocess.run(command("powerhose") + ["status", "--frontend", endpoints.frontend],
                           capture_output=True, text=True, timeout=30)
    assert table.returncode == 0 and str(broker.pid) in table.stdout


def test_status_without_a_broker_exits_1_with_one_line(endpoints):
    started = time.monotonic()
    result = subprocess.run(command("powerhose") + [
        "status", "--frontend", endpoints.frontend], capture_output=True, text=True,
        timeout=30)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert time.monotonic() - started < 10


def test_workers_say_their_pid_and_host(cluster, client):
    import socket
    _, workers = cluster
    listed = client.stats()["workers"]
    assert sorted(w["pid"] for w in listed) == sorted(w.pid for w in workers)
    assert {w["host"] for w in listed} == {socket.gethostname()}


def test_status_of_several_brokers_shows_each(start_broker, endpoints, run_dir):
    other = f"ipc://{run_dir}/front2.sock"
    first = start_broker()
    second = start_broker(frontend=other, backend=f"ipc://{run_dir}/back2.sock")
    missing_one = f"ipc://{run_dir}/nobody.sock"
    result = subprocess.run(command("powerhose") + [
        "status", "--frontend", endpoints.frontend, "--frontend", other,
        "--frontend", missing_one, "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    each = json.loads(result.stdout)
    assert each[endpoints.frontend]["pid"] == first.pid
    assert each[other]["pid"] == second.pid
    assert each[missing_one] is None
