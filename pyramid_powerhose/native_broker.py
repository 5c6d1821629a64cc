"""The broker's loop in C++: the same broker, with less CPU per message.

``native/broker.cpp``, built as the ``pyramid_powerhose._nbroker`` module
when a C++ compiler and libzmq's headers are present, is a port of
:mod:`pyramid_powerhose.broker` message for message: the same frames,
dispatch, timers, errors and log lines.  ``broker.py`` stays the reference
implementation and the fallback where the module could not be built.

Python keeps what happens once per process: the settings, the endpoint
locks, the log file.  ``serve`` then runs the whole loop in C++ without
the GIL, handling SIGTERM and SIGINT itself, and returns after the
graceful stop.
"""

from __future__ import annotations

import errno
import os

from . import endpoints
from .exc import DuplicateBrokerError

try:
    from . import _nbroker
except ImportError:  # built without a compiler or libzmq's headers
    _nbroker = None

ENGINES = ("auto", "native", "python")
ENGINE_VARIABLE = "POWERHOSE_BROKER"  # the default engine, for supervisors and tests


class EngineUnavailable(RuntimeError):
    """The native engine was asked for but is not built."""


def available() -> bool:
    return _nbroker is not None and hasattr(_nbroker, "serve")


def choose(engine: str) -> str:
    """``native`` or ``python`` for an ``--engine`` value (``auto``: native if built)."""
    if engine not in ENGINES:
        raise ValueError(f"broker engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "auto":
        return "native" if available() else "python"
    if engine == "native" and not available():
        raise EngineUnavailable(
            "the native broker engine is not built (it needs a C++ compiler and "
            "libzmq's headers, e.g. Debian's g++ and libzmq3-dev, when the package "
            "is installed); reinstall with them, or use --engine python")
    return engine


def serve(settings, log_fd: int) -> None:
    """Run the native broker until SIGTERM/SIGINT; DuplicateBrokerError if taken."""
    locks = []
    try:
        for name, endpoint in (("frontend", settings.frontend), ("backend", settings.backend)):
            fd = endpoints.lock(endpoint, name)
            if fd is not None:
                locks.append(fd)
        parent = os.getppid() if settings.exit_with_parent else 0
        try:
            _nbroker.serve(settings.frontend, settings.backend, settings.heartbeat,
                           settings.liveness, settings.max_job_size,
                           settings.no_worker_timeout, settings.grace, parent, log_fd,
                           settings.debug)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:  # tcp; ipc endpoints are locked above
                endpoint = exc.strerror.rpartition(": ")[0]  # "<endpoint>: <strerror>"
                name = "frontend" if endpoint == settings.frontend else "backend"
                raise DuplicateBrokerError(
                    f"the {name} {endpoint} is already in use; is a broker running?"
                ) from None
            raise
    finally:
        for fd in locks:
            os.close(fd)
