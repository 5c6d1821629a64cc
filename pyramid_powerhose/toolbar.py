"""A pyramid_debugtoolbar panel: the jobs a request sent to powerhose.

Listed in the toolbar's own includes, as it documents for add-ons
(``debugtoolbar.includes = pyramid_powerhose.toolbar``; the ``[toolbar]``
extra), it adds a *Powerhose* tab
listing, for each job of the request: its service, its size, how long the
call took, the worker that ran it (pid@host) and its outcome, with the
remote traceback of an ``ExecutionError``.  Without the include nothing is
recorded, and no job asks who runs it.
"""

from __future__ import annotations

import time

from pyramid.exceptions import ConfigurationError

from .client import collect_replies
from .exc import ExecutionError
from .plugin import IRequestJobs

ENVIRON_KEY = "pyramid_powerhose.jobs"  # the request's list of job records


def includeme(config):
    """Run by the toolbar's own configuration (``debugtoolbar.includes``)."""
    if not hasattr(config, "add_debugtoolbar_panel"):
        raise ConfigurationError(
            "pyramid_powerhose.toolbar is a pyramid_debugtoolbar panel: list it in "
            "debugtoolbar.includes rather than including it in the application "
            "(pip install 'pyramid_powerhose[toolbar]')")
    config.add_debugtoolbar_panel(PowerhosePanel)
    config.inject_parent_action(_record_jobs)


def _record_jobs(parent_config):
    """In the application: ``request.powerhose`` notes the request's jobs."""
    parent_config.registry.registerUtility(RecordingPowerhose, IRequestJobs)


class RecordingPowerhose:
    """``request.powerhose`` that also notes each job in the request's environ."""

    def __init__(self, powerhose, request):
        self._powerhose = powerhose
        self._jobs = request.environ.setdefault(ENVIRON_KEY, [])

    def __getattr__(self, name):
        return getattr(self._powerhose, name)

    def execute(self, data, timeout=None, headers=None, service=None) -> bytes:
        return self._record("execute", [data], service,
                            lambda: self._powerhose.execute(data, timeout, headers, service))

    def map(self, iterable, timeout=None, headers=None, service=None) -> list:
        items = list(iterable)
        return self._record("map", items, service,
                            lambda: self._powerhose.map(items, timeout, headers, service))

    def submit(self, data, timeout=None, headers=None, service=None):
        record = self._new("submit", [data], service)
        start = time.perf_counter()
        # The job's thread runs in a copy of this context: its reply is noted
        # in ``replies`` when it comes, after this block.
        with collect_replies() as replies:
            future = self._powerhose.submit(data, timeout, headers, service)
        future.add_done_callback(lambda f: self._done(record, start, f.exception(), replies))
        return future

    def _new(self, call, items, service):
        record = {"call": call, "jobs": len(items),
                  "service": service or self._powerhose.settings.service,
                  "bytes": sum(len(x) if isinstance(x, (bytes, str)) else 0 for x in items),
                  "ms": None, "worker": "", "outcome": "running", "traceback": ""}
        self._jobs.append(record)
        return record

    def _record(self, call, items, service, run):
        record = self._new(call, items, service)
        start = time.perf_counter()
        with collect_replies() as replies:
            try:
                result = run()
            except Exception as error:
                self._done(record, start, error, replies)
                raise
        self._done(record, start, None, replies)
        return result

    @staticmethod
    def _done(record, start, error, replies):
        record["ms"] = round((time.perf_counter() - start) * 1000, 3)
        record["worker"] = _workers(replies)
        record["outcome"] = "OK" if error is None else type(error).__name__
        if isinstance(error, ExecutionError):
            record["outcome"] += f" ({error.exc_type})"
            record["traceback"] = error.traceback


def _workers(replies) -> str:
    """Who ran the jobs: ``pid@host``, each followed by its number of jobs
    when there were several (map); "" when no reply said (no worker ran the
    job, the worker did not say, an older broker, or a client that runs jobs
    in-process)."""
    counts = {}
    for reply in replies:
        if reply.worker:
            counts[reply.worker] = counts.get(reply.worker, 0) + 1
    if len(replies) == 1:
        return ", ".join(counts)
    return ", ".join(f"{worker} ({count})" for worker, count in counts.items())


try:
    from pyramid_debugtoolbar.panels import DebugPanel
except ImportError:  # the [toolbar] extra is not installed: includeme says so
    DebugPanel = object


class PowerhosePanel(DebugPanel):
    name = "powerhose"
    has_content = True
    template = "pyramid_powerhose:templates/toolbar.dbtmako"
    title = "Powerhose jobs"
    nav_title = "Powerhose"

    def __init__(self, request):
        self.request = request

    def process_response(self, response):
        jobs = self.request.environ.get(ENVIRON_KEY, [])
        self.data = {"jobs": jobs}
        count = sum(job["jobs"] for job in jobs)
        self.nav_subtitle = f"{count} job{'s' if count != 1 else ''}"
