"""pyramid_powerhose: run CPU-bound jobs in worker processes over ZeroMQ (7/MDP)."""

from .client import Client
from .job import Job
from .worker import get_params

__all__ = ["Client", "Job", "get_params"]
