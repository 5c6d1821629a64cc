"""A leased worker's busy word: read by the broker, written by the worker.

The broker chooses which lease to take back for a job that waits (the
one idle the longest), so it must know whether a leased worker is busy.
Told by message, that costs the job that ends a pause a REPORT, which
wakes the broker while the job runs (docs/notes.rst, "The direct path's
first job after a pause").  Instead, a worker on the direct path keeps
one 64-bit word in a file beside its direct socket (``<name>.busy`` for
``<name>.sock``, mode 0600, in the same private directory), and the
broker maps it read-only and reads it when it decides:

* ``BUSY`` (-1): a direct job is running;
* 0: no direct job has run yet;
* otherwise: when the worker last fell idle, in nanoseconds of
  CLOCK_MONOTONIC (the clock both processes read).

No message, no wake-up: the worker writes the word at the start and at
the end of each direct job.  A broker that finds no word (a worker of an
older version) relies on FREE and REPORT, as before (PROTOCOL.rst).
"""

from __future__ import annotations

import logging
import mmap
import os
import stat

from . import endpoints

log = logging.getLogger(__name__)

BUSY = -1
SUFFIX = ".busy"
_SOCKET_SUFFIX = ".sock"
_SIZE = 8


def path_for(endpoint_path: str) -> str | None:
    """The busy word's file beside a direct socket's file, or None if that
    file is not named ``<name>.sock``."""
    if not endpoint_path.endswith(_SOCKET_SUFFIX):
        return None
    return endpoint_path[:-len(_SOCKET_SUFFIX)] + SUFFIX


class BusyWord:
    """The worker's side: creates the file (it must not exist), maps it,
    and starts at 0; :meth:`close` removes it."""

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        self.path = path
        # One aligned 8-byte store per write: the reader never sees half of one.
        self.word = memoryview(self._map).cast("q")
        self.word[0] = 0

    def close(self):
        """Unmap and remove the file, as the direct socket closes."""
        if self.word is None:
            return
        self.word.release()
        self.word = None
        self._map.close()
        endpoints.remove(self.path)


class BusyReader:
    """The broker's side: one worker's word, mapped read-only."""

    __slots__ = ("path", "_map", "_word")

    def __init__(self, path, mapped):
        self.path = path
        self._map = mapped
        self._word = memoryview(mapped).cast("q")

    def read(self) -> int:
        """BUSY, 0 (no direct job yet), or when the worker fell idle (ns)."""
        return self._word[0]

    def close(self):
        self._word.release()
        self._map.close()


def open_reader(path: str, directory: str) -> BusyReader | None:
    """A reader of the word at ``path``, or None if there is none or it is
    not safe to trust: only a regular file of ours, of 8 bytes, directly
    in ``directory`` (the workers' private direct directory), not a link."""
    if os.path.dirname(os.path.abspath(path)) != os.path.abspath(directory):
        log.warning("busy word %s is not in %s: ignored", path, directory)
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # a worker of an older version: FREE and REPORT say it
    except OSError as exc:
        log.warning("cannot open busy word %s: %s", path, exc)
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or \
                info.st_size != _SIZE:
            log.warning("busy word %s is not an 8-byte file of ours: ignored", path)
            return None
        return BusyReader(path, mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ))
    finally:
        os.close(fd)
