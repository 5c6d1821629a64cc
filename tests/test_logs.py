"""RepeatFilter: a failure storm cannot flood the log (issue #15); exact, with a fake clock."""

import logging

import pytest

from pyramid_powerhose import Client
from pyramid_powerhose.logs import RepeatFilter
from tests.conftest import read_log


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def record(msg="job %r failed", *args, name="pyramid_powerhose.broker", level=logging.INFO):
    return logging.makeLogRecord({"name": name, "levelno": level, "msg": msg,
                                  "args": args or ("a1",)})


@pytest.fixture
def clock():
    return Clock()


def test_a_kind_passes_burst_times_per_interval(clock):
    limit = RepeatFilter(burst=3, interval=10, clock=clock)
    passed = [limit.filter(record("job %r failed", i)) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    clock.now += 9.9
    assert not limit.filter(record())
    clock.now += 0.1  # a new interval
    first = record()
    assert limit.filter(first)
    assert "8" in first.getMessage()  # the count of what was dropped
    second = record()
    assert limit.filter(second) and second.getMessage() == record().getMessage()


def test_kinds_are_counted_apart(clock):
    limit = RepeatFilter(burst=1, interval=10, clock=clock)
    assert limit.filter(record("job %r failed"))
    assert limit.filter(record("worker %s expired"))  # another template
    assert limit.filter(record("job %r failed", level=logging.WARNING))  # another level
    assert limit.filter(record("job %r failed", name="pyramid_powerhose.worker"))
    assert not limit.filter(record("job %r failed", "b2"))  # same template, other args


def test_debug_records_all_pass(clock):
    limit = RepeatFilter(burst=1, interval=10, clock=clock)
    assert all(limit.filter(record(level=logging.DEBUG)) for _ in range(100))


def test_the_table_of_kinds_is_bounded(clock):
    limit = RepeatFilter(burst=1, interval=10, clock=clock)
    for i in range(5 * RepeatFilter.MAX_KINDS):
        assert limit.filter(record(f"built per call {i}"))  # each its own kind
    assert len(limit._kinds) <= RepeatFilter.MAX_KINDS


def test_a_worker_whose_target_always_raises_logs_a_bounded_amount(start_broker,
                                                                   start_worker,
                                                                   wait_workers, endpoints):
    start_broker()
    worker = start_worker("tests.targets:boom")
    with Client(frontend=endpoints.frontend) as client:
        wait_workers(client, 1)
        for _ in range(200):
            with pytest.raises(Exception):
                client.execute(b"x")
    lines = [line for line in read_log(worker).splitlines() if "boom: x" in line]
    assert 0 < len(lines) <= 21  # 20 per 10 s, not 200
