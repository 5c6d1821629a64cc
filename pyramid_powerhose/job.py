"""The unit of work, as a worker's target sees it."""

from __future__ import annotations

import time


class Job:
    """Data (bytes) and headers (str to str) handed to a worker's target.

    ``id`` and ``deadline`` (a ``time.monotonic()`` value, or None) are set
    on the worker side; a client may also pass a Job to ``execute``.
    """

    __slots__ = ("data", "headers", "id", "deadline", "service")

    def __init__(self, data=b"", headers=None, id=b"", deadline=None, service=""):
        self.data = to_bytes(data)
        self.headers = dict(headers or {})
        self.id = id
        self.deadline = deadline
        self.service = service

    @property
    def time_left(self):
        """Seconds before the client gives up, or None without a deadline."""
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()

    def __repr__(self):
        return f"<Job id={self.id!r} {len(self.data)} bytes headers={self.headers!r}>"


def new_job(data: bytes, headers: dict, id: bytes, deadline, service) -> Job:
    """``Job(data, headers, id, deadline, service)`` for the worker, whose
    data is bytes and headers a dict of its own already: compiled, a C call
    that sets the fields, where calling the type parses its arguments and
    copies the headers (about 800 instructions a job)."""
    job = Job.__new__(Job)
    job.data = data
    job.headers = headers
    job.id = id
    job.deadline = deadline
    job.service = service
    return job


def to_bytes(data) -> bytes:
    """Job data and results are bytes; str is sent as UTF-8."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"job data must be bytes or str, not {type(data).__name__}")
