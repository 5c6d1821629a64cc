"""pyramid_powerhose: run CPU-bound jobs in worker processes over ZeroMQ (7/MDP)."""

from . import _libzmq

_libzmq.install()  # before any module that calls libzmq is imported

from .client import Client  # noqa: E402
from .job import Job  # noqa: E402
from .worker import get_params  # noqa: E402


def get_cluster(target, **options):
    """A broker and workers for ``target`` under Circus; see :mod:`.cluster`."""
    from .cluster import get_cluster as _get_cluster

    return _get_cluster(target, **options)


def includeme(config):
    """``config.include('pyramid_powerhose')``; see :mod:`.plugin`."""
    from .plugin import includeme as _includeme

    _includeme(config)


__all__ = ["Client", "Job", "get_params", "get_cluster", "includeme"]
