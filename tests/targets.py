"""Worker targets used by the tests (powerhose-worker tests.targets:NAME)."""

import os
import time

from pyramid_powerhose import get_params


def echo(job):
    return job.data


def headers(job):
    return "|".join(f"{k}={v}" for k, v in sorted(job.headers.items()))


def boom(job):
    raise ValueError("boom: " + job.data.decode())


def wrong_type(job):
    return 42


def pid(job):
    return str(os.getpid())


def sleep(job):
    """Sleeps the number of seconds in the data, then returns the pid."""
    time.sleep(float(job.data or b"0"))
    return str(os.getpid())


def hang(job):
    while True:
        time.sleep(0.1)


def params(job):
    return "|".join(f"{k}={v}" for k, v in sorted(get_params().items()))


def spin(job):
    """Holds the GIL for the number of milliseconds in the data."""
    end = time.perf_counter() + float(job.data or b"1") / 1000
    while time.perf_counter() < end:
        pass
    return b"done"


def record(job):
    """Appends the data to the file named by the ``log`` param, echoes it."""
    with open(get_params()["log"], "ab") as f:
        f.write(job.data + b"\n")
    return job.data
