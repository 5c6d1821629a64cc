"""Exceptions a caller may handle, one class per failure.

Messages say what happened and what to check: the endpoint, the service,
the timeout.
"""

import builtins

from . import protocol


class PowerhoseError(Exception):
    """Base class of every error raised by pyramid_powerhose."""


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


class JobTooLargeError(PowerhoseError, ValueError):
    """The job's data is larger than the broker's --max-job-size."""


class DuplicateBrokerError(PowerhoseError):
    """A broker already serves this frontend."""


class ProtocolError(PowerhoseError):
    """A peer answered with frames this project does not understand."""


_BY_CODE = {
    protocol.ERR_EXECUTION: ExecutionError,
    protocol.ERR_TIMEOUT: TimeoutError,
    protocol.ERR_NO_WORKER: NoWorkerError,
    protocol.ERR_WORKER_LOST: WorkerLostError,
    protocol.ERR_TOO_LARGE: JobTooLargeError,
    protocol.ERR_BAD_REQUEST: ProtocolError,
}


def from_reply(reply):
    """The exception an ERR reply stands for."""
    cls = _BY_CODE.get(reply.code, PowerhoseError)
    if cls is ExecutionError:
        return ExecutionError(reply.message, reply.exc_type, reply.traceback)
    return cls(reply.message)
