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


def to_bytes(data) -> bytes:
    """Job data and results are bytes; str is sent as UTF-8."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"job data must be bytes or str, not {type(data).__name__}")
