"""``config.include('pyramid_powerhose.testing')``: jobs run in the test's process.

For an application's own tests: ``request.powerhose`` runs
``powerhose.target`` right here instead of on a cluster, no broker is
spawned or contacted, and every job is recorded::

    config.include('pyramid_powerhose.testing')   # before or instead of
    config.include('pyramid_powerhose')            # the real plugin
    ...
    client = get_powerhose(app.registry).client     # a DummyClient
    assert client.jobs[0].data == b'...'

or, in an ini file for tests, ``pyramid.includes = pyramid_powerhose.testing``.
With ``pyramid.testing.setUp()``, include it before anything that includes
``pyramid_powerhose`` (autocommit runs the real plugin at once), and give a
``DummyRequest`` its ``request.powerhose`` with
``pyramid.request.apply_request_extensions(request)``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import threading
import time

from . import worker
from .client import check_job, check_service
from .exc import NoWorkerError
from .exc import from_reply as exc_from_reply
from .job import Job
from .plugin import IClientFactory
from .worker import resolve_target, run_target


def includeme(config):
    """Replace the client by a :class:`DummyClient`; never spawn or attach.

    Includes ``pyramid_powerhose`` itself, so ``request.powerhose``,
    the settings checks and the exception views are the real ones.
    """
    config.registry.registerUtility(DummyClient, IClientFactory)
    config.include("pyramid_powerhose")


class DummyClient:
    """Runs each job by calling the target in this process, and records it.

    Behaves like :class:`pyramid_powerhose.Client` as seen from a view: a
    str result becomes UTF-8 bytes; any other non-bytes result, and any
    exception of the target, becomes :class:`ExecutionError` (with
    ``exc_type`` and ``traceback``); a service without a target raises
    :class:`NoWorkerError`.  The target sees what it would in a worker:
    ``get_params()`` returns ``powerhose.params.*`` and the job carries its
    deadline.  Timeouts are not enforced.

    ``jobs`` lists every :class:`Job` run, in order; ``targets`` maps a
    service to its callable, for apps that use more than one service.
    """

    def __init__(self, settings):
        self.settings = settings
        self.jobs: list[Job] = []
        self.targets: dict = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def target_for(self, service):
        with self._lock:
            if service not in self.targets and service == self.settings.service \
                    and self.settings.target:
                self.targets[service] = resolve_target(self.settings.target)
            target = self.targets.get(service)
        if target is None:
            raise NoWorkerError(
                f"no target for service {service!r} in the testing client: set "
                "powerhose.target, or add one to DummyClient.targets")
        return target

    def execute(self, data, timeout=None, headers=None, service=None) -> bytes:
        """Run the target on one job and return its result (bytes)."""
        job = self._job(data, timeout, headers, service)
        target = self.target_for(job.service)
        with self._lock:
            self.jobs.append(job)
        with _worker_params(self.settings.params):
            reply = run_target(target, job)
        if reply.ok:
            return reply.data
        raise exc_from_reply(reply)

    def submit(self, data, timeout=None, headers=None, service=None):
        """Run the job now; returns a Future that is already done."""
        future = concurrent.futures.Future()
        try:
            future.set_result(self.execute(data, timeout, headers, service))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def map(self, iterable, timeout=None, headers=None, service=None) -> list:
        return [self.execute(data, timeout, headers, service) for data in iterable]

    def ping(self, timeout=1.0):
        return None  # there is no broker

    def close(self):
        pass

    def _job(self, data, timeout, headers, service):
        """The Job a worker would see, checked as the real client checks it."""
        data, headers, timeout = check_job(self.settings, data, headers, timeout)
        service = service or self.settings.service
        check_service(service)
        return Job(data, headers, id=b"%x" % next(self._ids),
                   deadline=time.monotonic() + timeout, service=service)


@contextlib.contextmanager
def _worker_params(params):
    """``get_params()`` answers ``powerhose.params.*`` during the job, as in a worker."""
    saved = dict(worker._params)
    worker._params.clear()
    worker._params.update(params)
    try:
        yield
    finally:
        worker._params.clear()
        worker._params.update(saved)

