"""Lock files beside ipc sockets: a planted symlink or fifo is refused, never followed."""

import os

import pytest

from pyramid_powerhose import endpoints as ph_endpoints
from pyramid_powerhose.cluster import spawn_lock
from pyramid_powerhose.exc import ClusterError, UnsafeDirectoryError


@pytest.fixture
def victim(run_dir):
    """A file of ours that a planted symlink points at."""
    path = os.path.join(run_dir, "precious.txt")
    with open(path, "w") as f:
        f.write("keep me")
    return path


def test_a_symlinked_broker_lock_is_refused(endpoints, victim):
    os.symlink(victim, endpoints.frontend[len("ipc://"):] + ".lock")
    with pytest.raises(UnsafeDirectoryError):
        ph_endpoints.lock(endpoints.frontend, "frontend")
    assert open(victim).read() == "keep me"


def test_a_fifo_as_a_lock_is_refused(endpoints):
    os.mkfifo(endpoints.frontend[len("ipc://"):] + ".lock")
    with pytest.raises(UnsafeDirectoryError):  # and does not block on open
        ph_endpoints.lock(endpoints.frontend, "frontend")


def test_the_broker_does_not_start_over_a_planted_lock(start_broker, endpoints, victim):
    os.symlink(victim, endpoints.backend[len("ipc://"):] + ".lock")
    broker = start_broker(wait=False)
    assert broker.wait(10) != 0
    assert open(victim).read() == "keep me"
    assert not os.path.exists(endpoints.frontend[len("ipc://"):])  # never bound


def test_a_symlinked_spawn_lock_is_refused(endpoints, victim):
    os.symlink(victim, endpoints.frontend[len("ipc://"):] + ".spawn.lock")
    with pytest.raises(ClusterError):
        with spawn_lock(endpoints.frontend):
            pass
    assert open(victim).read() == "keep me"


def test_a_regular_lock_still_works(endpoints):
    fd = ph_endpoints.lock(endpoints.frontend, "frontend")
    try:
        with open(endpoints.frontend[len("ipc://"):] + ".lock") as f:
            assert f.read() == str(os.getpid())
    finally:
        os.close(fd)
