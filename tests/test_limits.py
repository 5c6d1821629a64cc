"""What the client refuses before sending: oversized jobs (headers count), bad service names."""

import time

import pytest

from pyramid_powerhose import Client, exc


def test_headers_count_towards_the_max_job_size(start_broker, start_worker, wait_workers,
                                                endpoints):
    """A job of small data and huge headers used to go through (issue #15, bug 2)."""
    start_broker()
    start_worker("tests.targets:headers")
    headers = {"k%d" % i: "v" * 400 for i in range(5)}  # 2010 bytes of header frames
    with Client(frontend=endpoints.frontend, max_job_size=1000) as client:
        wait_workers(client, 1)
        with pytest.raises(exc.JobTooLargeError):
            client.execute(b"x", headers=headers)
        assert client.stats()["services"]["default"]["done"] == 0  # never sent
        small = {"k": "v" * 500}
        assert client.execute(b"x" * 400, headers=small) == b"k=" + b"v" * 500


def test_size_limit_is_data_plus_header_frames(endpoints):
    """Exactly at the limit goes out; one byte more does not (no broker needed to refuse)."""
    with Client(frontend=endpoints.frontend, max_job_size=10) as client:
        with pytest.raises(exc.JobTooLargeError):
            client.execute(b"12345", headers={"ab": "cdef"})  # 5 + 2 + 4 = 11
        with pytest.raises(exc.TimeoutError):  # 10 bytes: sent (and nothing answers)
            client.execute(b"1234", headers={"ab": "cdef"}, timeout=0.2)


def test_overlong_service_name_is_refused_at_once(start_broker, start_worker, wait_workers,
                                                  client):
    """Bug 7: the broker drops such a request, so the client waited its full timeout."""
    start_broker()
    start_worker()
    wait_workers(client, 1)
    started = time.monotonic()
    for service in ("s" * 256, "é" * 128, "mmi.stats"):
        with pytest.raises(exc.SettingsError):
            client.execute(b"x", service=service, timeout=5)
        with pytest.raises(exc.SettingsError):
            client.map([b"x"], service=service, timeout=5)
    assert time.monotonic() - started < 1
    assert client.execute(b"ok") == b"ok"
    assert client.stats()["services"]["default"]["done"] == 1
