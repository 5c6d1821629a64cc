"""Prometheus metrics: the broker's statistics as metric families, and the
client's own view of its jobs.

Two sources, two ways of serving them:

* the broker's view: :class:`BrokerCollector` turns the ``mmi.stats`` reply
  (PROTOCOL.rst lists its fields) into metric families on each scrape.
  ``powerhose metrics --listen HOST:PORT`` (:mod:`.cli.metrics`) serves it,
  so the broker's loop never speaks HTTP.  :func:`families` is the pure
  conversion, tested on a stats dict without sockets;
* the web process's view: with ``config.include('pyramid_powerhose.metrics')``
  the client behind ``request.powerhose`` is a :class:`RecordingClient`,
  which records each call's round trip by service and outcome in a
  ``prometheus_client`` histogram.  Under a pre-forking server, set
  ``PROMETHEUS_MULTIPROC_DIR`` and serve a ``MultiProcessCollector``
  registry (docs/metrics.rst has the view).

``prometheus_client`` is an extra (``pyramid_powerhose[metrics]``): only
this module and the ``powerhose metrics`` command import it.
"""

from __future__ import annotations

import threading
import time

try:
    from prometheus_client import Histogram
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily)
    from prometheus_client.utils import floatToGoString
except ImportError:  # pragma: no cover - the extra is missing
    raise ImportError("pyramid_powerhose's metrics need prometheus_client: "
                      "pip install 'pyramid_powerhose[metrics]'") from None

from .broker_core import BUCKETS
from .exc import PowerhoseError

DEFAULT_LISTEN = "127.0.0.1:9464"  # the port Prometheus' wiki lists for exporters like this one
OK = "OK"  # the outcome of a job that returned a result, as the broker counts it


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> ``(host, port)``; ValueError if not.

    The host is required: an exporter binds only the address it is told.
    """
    host, sep, port = str(text).strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"listen address must be HOST:PORT, e.g. {DEFAULT_LISTEN}, "
                         f"got {text!r}")
    return host, int(port)


# -- the broker's view ------------------------------------------------------------------

def families(stats: dict) -> list:
    """The metric families of one ``mmi.stats`` reply (without ``powerhose_up``)."""
    uptime = GaugeMetricFamily("powerhose_broker_uptime_seconds",
                               "Seconds since the broker started.", value=stats["uptime"])
    info = GaugeMetricFamily("powerhose_broker_info", "The broker's pid and engine; always 1.",
                             labels=["pid", "engine"])
    info.add_metric([str(stats["pid"]), stats["engine"]], 1)
    stopping = GaugeMetricFamily("powerhose_broker_stopping",
                                 "1 while the broker drains its jobs before exiting.",
                                 value=int(bool(stats["stopping"])))
    events = CounterMetricFamily(
        "powerhose_worker_events", "Workers that registered, left (said DISCONNECT), were "
        "lost (connection closed) or expired (missed their heartbeats).", labels=["event"])
    for event, count in sorted(stats["worker_events"].items()):
        events.add_metric([event], count)
    jobs = CounterMetricFamily("powerhose_jobs", "Jobs that ended, by service and outcome "
                               "(OK or the error code).", labels=["service", "outcome"])
    workers = GaugeMetricFamily("powerhose_workers", "Registered workers by service, idle "
                                "or busy (holding a job, or paused).",
                                labels=["service", "state"])
    queued = GaugeMetricFamily("powerhose_queue_jobs", "Jobs waiting in the broker for a "
                               "worker.", labels=["service"])
    queued_bytes = GaugeMetricFamily("powerhose_queue_bytes", "Bytes of the jobs waiting in "
                                     "the broker.", labels=["service"])
    # The direct path: services a worker announced DIRECT for have these fields.
    direct = CounterMetricFamily("powerhose_direct_jobs", "Jobs that ended on the direct "
                                 "path (leased workers' reports), by service; also counted "
                                 "in powerhose_jobs.", labels=["service"])
    leased = GaugeMetricFamily("powerhose_workers_leased", "Workers leased to a client "
                               "process (being granted, granted or ending), by service.",
                               labels=["service"])
    histograms = (
        ("wait_seconds", HistogramMetricFamily(
            "powerhose_job_wait_seconds", "Seconds from a job's arrival at the broker to its "
            "hand-over to a worker.", labels=["service"])),
        ("run_seconds", HistogramMetricFamily(
            "powerhose_job_run_seconds", "Seconds a job spent on its worker.",
            labels=["service"])),
        ("total_seconds", HistogramMetricFamily(
            "powerhose_job_duration_seconds", "Seconds from a job's arrival at the broker to "
            "its result.", labels=["service"])),
    )
    for name, svc in sorted(stats["services"].items()):
        for outcome, count in sorted(svc["outcomes"].items()):
            jobs.add_metric([name, outcome], count)
        workers.add_metric([name, "idle"], svc["idle"])
        workers.add_metric([name, "busy"], svc["busy"])
        queued.add_metric([name], svc["queued"])
        queued_bytes.add_metric([name], svc["queued_bytes"])
        if "direct" in svc:
            direct.add_metric([name], svc["direct"])
            leased.add_metric([name], svc["leased"])
        for field, family in histograms:
            histogram = svc[field]
            family.add_metric([name], _buckets(histogram["buckets"]), histogram["sum"])
    return [uptime, info, stopping, events, jobs, workers, queued, queued_bytes, direct,
            leased, *(family for _, family in histograms)]


def _buckets(buckets) -> list[tuple[str, float]]:
    # Prometheus spells "le" as Go does (0.001, 1.0, +Inf), as prometheus_client's own.
    return [(bound if bound == "+Inf" else floatToGoString(bound), count)
            for bound, count in buckets]


def up(value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily("powerhose_up", "1 if the broker answered this scrape, else 0.",
                             value=value)


class BrokerCollector:
    """A ``prometheus_client`` collector reading the broker's stats on each scrape.

    ``read_stats()`` returns an ``mmi.stats`` reply or raises PowerhoseError
    (no broker): then the scrape has ``powerhose_up 0`` and nothing else.
    """

    def __init__(self, read_stats):
        self.read_stats = read_stats

    def collect(self):
        try:
            stats = self.read_stats()
        except PowerhoseError:
            yield up(0)
            return
        yield up(1)
        yield from families(stats)


# -- the client's view ---------------------------------------------------------------------

_round_trip = None
_round_trip_lock = threading.Lock()


def round_trip_histogram() -> Histogram:
    """The process's ``powerhose_client_round_trip_seconds``, created on first use.

    Once per process, in prometheus_client's default registry (in
    multiprocess mode, in ``PROMETHEUS_MULTIPROC_DIR``); created late so that
    an app that never records declares nothing.
    """
    global _round_trip
    with _round_trip_lock:
        if _round_trip is None:
            _round_trip = Histogram(
                "powerhose_client_round_trip_seconds",
                "Seconds a web process waited for a call's result: one job for execute "
                "and submit, all its jobs for map; by service, outcome (OK or the error "
                "class) and call.", ["service", "outcome", "call"], buckets=BUCKETS)
        return _round_trip


class RecordingClient:
    """A client whose ``execute``, ``submit`` and ``map`` record their round trip.

    Wraps any client (:class:`~pyramid_powerhose.Client`, the testing
    include's); everything else (``stats``, ``ping``, ``close``...) is the
    wrapped client's.
    """

    def __init__(self, client, service):
        self.client = client
        self.service = service  # the label of calls that name no service
        self.histogram = round_trip_histogram()

    def __getattr__(self, name):
        return getattr(self.client, name)

    def execute(self, data, timeout=None, headers=None, service=None) -> bytes:
        return self._timed("execute", service, self.client.execute, data, timeout, headers,
                           service)

    def map(self, iterable, timeout=None, headers=None, service=None) -> list:
        return self._timed("map", service, self.client.map, iterable, timeout, headers,
                           service)

    def submit(self, data, timeout=None, headers=None, service=None):
        start = time.perf_counter()
        future = self.client.submit(data, timeout=timeout, headers=headers, service=service)

        def record(future):
            error = None if future.cancelled() else future.exception()
            outcome = "Cancelled" if future.cancelled() else _outcome(error)
            self._observe("submit", service, outcome, start)

        future.add_done_callback(record)
        return future

    def _timed(self, call, service, method, data, timeout, headers, job_service):
        start = time.perf_counter()
        try:
            result = method(data, timeout=timeout, headers=headers, service=job_service)
        except Exception as error:
            self._observe(call, service, _outcome(error), start)
            raise
        self._observe(call, service, OK, start)
        return result

    def _observe(self, call, service, outcome, start):
        self.histogram.labels(service or self.service, outcome, call).observe(
            time.perf_counter() - start)


def _outcome(error) -> str:
    # The broker's error codes are the exception classes' names (exc.from_reply).
    return OK if error is None else type(error).__name__


def includeme(config):
    """``config.include('pyramid_powerhose.metrics')``, beside ``pyramid_powerhose``:
    record the app's jobs.

    Every call of ``request.powerhose`` (``execute``, ``submit``, ``map``)
    is timed into ``powerhose_client_round_trip_seconds`` by service,
    outcome and call.  Serving them is the app's: a view returning
    ``generate_latest`` of a registry (docs/metrics.rst).
    """
    from .plugin import IClientWrapper

    config.registry.registerUtility(RecordingClient, IClientWrapper)
