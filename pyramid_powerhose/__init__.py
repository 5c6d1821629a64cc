"""pyramid_powerhose: run CPU-bound jobs in worker processes over ZeroMQ (7/MDP)."""

from .client import Client
from .job import Job
from .worker import get_params


def get_cluster(target, **options):
    """A broker and workers for ``target`` under Circus; see :mod:`.cluster`."""
    from .cluster import get_cluster as _get_cluster

    return _get_cluster(target, **options)


def includeme(config):
    """``config.include('pyramid_powerhose')``; see :mod:`.plugin`."""
    from .plugin import includeme as _includeme

    _includeme(config)


__all__ = ["Client", "Job", "get_params", "get_cluster", "includeme"]
