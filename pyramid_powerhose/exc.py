"""Every exception a caller may handle, one class per failure, in one hierarchy.

Messages say what happened and what to check: the endpoint, the service,
the timeout, the setting.  This module depends on nothing else in the
package, so every layer (the protocol included) raises from here.
"""

import builtins


class PowerhoseError(Exception):
    """Base class of every error raised by pyramid_powerhose."""


# -- a job's outcome, as a client raises it --------------------------------------

class NoWorkerError(PowerhoseError):
    """No worker serves the job's service (none registered, or all gone)."""


class TimeoutError(PowerhoseError, builtins.TimeoutError):
    """The job did not complete before its deadline.

    Also a builtin ``TimeoutError``, so generic handlers catch it.
    """


class ExecutionError(PowerhoseError):
    """The worker's target raised; carries the remote type and traceback."""

    def __init__(self, message, exc_type="", traceback=""):
        super().__init__(message)
        self.exc_type = exc_type
        self.traceback = traceback

    def __str__(self):
        text = super().__str__()
        if self.traceback:
            text += "\n--- remote traceback ---\n" + self.traceback.rstrip()
        return text


class WorkerLostError(PowerhoseError):
    """The worker running the job died or disconnected before replying."""


class BrokerLostError(PowerhoseError, builtins.ConnectionError):
    """The client has no connection to a broker: it dropped with the job in flight
    (the broker died or restarted), or none was made (nothing listens there).

    Raised by the client itself within about a second, instead of waiting
    for the job's timeout; the job may or may not have run, and will not run
    later.  Also a builtin ``ConnectionError``.
    """


class JobTooLargeError(PowerhoseError, ValueError):
    """The job (data and headers) is larger than the max job size (client or broker)."""


class OverloadedError(PowerhoseError):
    """The service's queue is full (max queue, max queue bytes): retry later."""


class ProtocolError(PowerhoseError, ValueError):
    """Frames that do not follow the protocol (PROTOCOL.rst).

    Raised by :mod:`pyramid_powerhose.protocol` on untrusted input (the
    broker logs and drops such a message), and by a client whose peer
    answered with frames it does not understand.
    """


# -- configuration and processes ---------------------------------------------------

class SettingsError(PowerhoseError, ValueError):
    """A setting has a value that is not allowed; the message names it."""


class UnsafeDirectoryError(PowerhoseError, RuntimeError):
    """The default socket directory is not ours, or others can write to it."""


class TargetError(PowerhoseError, ImportError):
    """The worker's TARGET cannot be imported or is not callable."""


class DuplicateBrokerError(PowerhoseError):
    """A broker already serves this frontend."""


class ClusterError(PowerhoseError):
    """The cluster could not start, answer or stop; the message says why."""


# The error codes an ERR reply carries are these classes' names
# (protocol.ERR_*); anything else is a plain PowerhoseError.
_BY_CODE = {cls.__name__: cls for cls in (
    ExecutionError, TimeoutError, NoWorkerError, WorkerLostError, JobTooLargeError,
    OverloadedError, ProtocolError)}


def from_reply(reply):
    """The exception an ERR reply stands for."""
    cls = _BY_CODE.get(reply.code, PowerhoseError)
    if cls is ExecutionError:
        return ExecutionError(reply.message, reply.exc_type, reply.traceback)
    return cls(reply.message)
