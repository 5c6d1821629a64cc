"""The Pyramid plugin: ``config.include('pyramid_powerhose')``.

This module is glue: it reads the ``powerhose.*`` settings, gives each
request a ``request.powerhose`` backed by one shared :class:`Client`,
starts (or finds) a cluster, and maps the errors a client raises to HTTP
answers.  It knows the client and cluster APIs, not ZeroMQ.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading

from pyramid.exceptions import ConfigurationError
from pyramid.response import Response
from zope.interface import Interface

from .client import Client
from .logs import RepeatFilter
from .exc import (BrokerLostError, ClusterError, NoWorkerError, OverloadedError,
                  SettingsError, TimeoutError, UnsafeDirectoryError, WorkerLostError)
from .settings import settings_from_mapping

log = logging.getLogger(__name__)
# A broker down means a warning per request: a few per interval, and a count.
log.addFilter(RepeatFilter())

PREFIX = "powerhose."

# The cluster starts after every ordinary (order 0) action has run, so a
# configuration error elsewhere in the app does not leave processes behind.
CLUSTER_ORDER = 10


class IPowerhose(Interface):
    """The registry's :class:`Powerhose`."""


class IClientWrapper(Interface):
    """Wraps each client: ``wrapper(client, service)`` -> a client.

    Registered by ``pyramid_powerhose.metrics``, whose wrapper records the
    round trip of every job; this module does not import it, so an app
    without it never loads ``prometheus_client``.
    """


class IClientFactory(Interface):
    """Replaces :class:`Client`: ``factory(settings=...)`` -> a client.

    Registered by ``pyramid_powerhose.testing``.  With a client factory,
    the jobs never reach a broker, so no cluster is spawned or attached.
    """


def includeme(config):
    """Run jobs on a powerhose cluster from Pyramid views.

    Including ``pyramid_powerhose``:

    * adds ``request.powerhose``, whose ``execute(data, timeout=None,
      headers=None, service=None)`` returns a job's result (bytes) and
      ``submit(...)`` a ``concurrent.futures.Future``; every request of a
      process shares one thread-safe, fork-safe :class:`Client`, created
      on first use (so it is safe to load the app before a server forks);
    * reads the ``powerhose.*`` settings when the configuration is
      committed: a wrong value or an unknown ``powerhose.*`` key raises
      ``ConfigurationError`` naming it;
    * with ``powerhose.cluster = spawn``, or ``auto`` (the default) when no
      broker answers on ``powerhose.frontend``, starts a broker and
      ``powerhose.workers`` workers running ``powerhose.target`` under
      Circus, before the app serves its first request.  The cluster is
      stopped when this process exits, and exits by itself within seconds
      if the process is killed.  With ``attach``, nothing is started: the
      app expects a broker run elsewhere (``powerhose`` command, circus);
    * unless ``powerhose.http_errors = false``, answers ``NoWorkerError``,
      ``WorkerLostError``, ``BrokerLostError`` and ``OverloadedError`` with 503 and a ``Retry-After`` header, and
      ``TimeoutError`` with 504, each with a short JSON body.

    With ``config.include('pyramid_powerhose.metrics')`` too, every call of
    ``request.powerhose`` is timed into a Prometheus histogram
    (docs/metrics.rst).

    With ``auto``, server processes that start at once on the same ipc
    frontend take turns on a lock file beside the socket: the first one
    spawns the cluster, the others find its broker and attach (to any
    broker that answers there: its workers must serve the app's
    ``powerhose.service``).  A tcp
    frontend has no such file: two processes that both find no broker
    both spawn one, the second broker cannot bind the port, and that
    process attaches to the first one's broker instead.

    The spawned cluster lives as long as the process that spawned it, or
    any process that attached to it with ``auto`` on the same ipc
    frontend: when the spawner exits, the others keep it; when the last of
    them exits or is killed, it stops.  With a pre-forking server that
    recycles its worker processes, load the app in the master (gunicorn
    ``--preload``) or run the cluster separately and use ``attach``.
    """
    config.add_request_method(_request_powerhose, "powerhose", reify=True)
    config.include("pyramid_powerhose.status_page")  # adds nothing unless enabled
    config.action(("pyramid_powerhose", "settings"), _configure, args=(config,))
    config.action(("pyramid_powerhose", "cluster"), _start_cluster,
                  args=(config.registry,), order=CLUSTER_ORDER)


def get_powerhose(registry) -> "Powerhose":
    """The application's :class:`Powerhose` (what ``request.powerhose`` is)."""
    powerhose = registry.queryUtility(IPowerhose)
    if powerhose is None:
        raise ConfigurationError(
            "pyramid_powerhose is not configured: call config.include('pyramid_powerhose') "
            "and commit the configuration (config.make_wsgi_app())")
    return powerhose


class Powerhose:
    """The application's link to its cluster: settings, client, cluster.

    One per registry, hence one client per process; the client is created
    on first use, after any fork of the server.
    """

    def __init__(self, settings, client_factory=Client):
        self.settings = settings
        self.cluster = None  # the cluster this process spawned, if any
        self._client_factory = client_factory
        self._client = None
        self._cluster_pid = None
        self._lock = threading.Lock()

    @property
    def client(self):
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._client_factory(settings=self.settings)
                client = self._client
        return client

    def execute(self, data, timeout=None, headers=None, service=None) -> bytes:
        """Run one job and return its result; see :meth:`Client.execute`."""
        return self.client.execute(data, timeout=timeout, headers=headers, service=service)

    def submit(self, data, timeout=None, headers=None, service=None):
        """Run one job in the background; returns a Future."""
        return self.client.submit(data, timeout=timeout, headers=headers, service=service)

    def map(self, iterable, timeout=None, headers=None, service=None) -> list:
        """Run many jobs at once; results in order."""
        return self.client.map(iterable, timeout=timeout, headers=headers, service=service)

    def start_cluster(self):
        """Spawn (``spawn``), find or spawn (``auto``), or do nothing (``attach``).

        Raises the cluster layer's errors: SettingsError,
        UnsafeDirectoryError, ClusterError.
        """
        mode = self.settings.cluster
        if mode == "attach":
            return
        from . import cluster  # psutil and circus: loaded only by apps that start clusters

        if mode == "spawn":
            self._own(cluster.spawn(self.settings))
        else:
            self._own(cluster.attach_or_spawn(self.settings))

    def _own(self, cluster):
        if cluster is None:
            return
        self.cluster = cluster
        self._cluster_pid = os.getpid()
        atexit.register(self.close)

    def close(self):
        """Close the client, and leave the cluster if this process spawned it.

        Leaving stops it, unless other processes attached to it with
        ``auto``: then the last of them stops it.  Called at exit.  A forked child (a pre-fork server's worker) does
        not own the cluster and leaves it alone.
        """
        client, self._client = self._client, None
        if client is not None:
            client.close()
        cluster, self.cluster = self.cluster, None
        if cluster is not None and self._cluster_pid == os.getpid():
            atexit.unregister(self.close)
            log.info("stopping the powerhose cluster on %s, unless other processes "
                     "share it", self.settings.frontend)
            cluster.leave()


class IRequestJobs(Interface):
    """Wraps ``request.powerhose``: ``wrapper(powerhose, request)`` -> the same API.

    Registered by ``pyramid_powerhose.toolbar``, which notes the request's
    jobs for the debug toolbar; without it, ``request.powerhose`` is the
    application's :class:`Powerhose` itself.
    """


def _request_powerhose(request):
    powerhose = get_powerhose(request.registry)
    wrapper = request.registry.queryUtility(IRequestJobs)
    return powerhose if wrapper is None else wrapper(powerhose, request)


# -- configuration actions ---------------------------------------------------------

def _configure(config):
    registry = config.registry
    try:
        settings = settings_from_mapping(registry.settings or {}, PREFIX)
    except SettingsError as exc:
        raise ConfigurationError(str(exc)) from None
    factory = registry.queryUtility(IClientFactory)
    if factory is None and settings.cluster != "attach" and not settings.target:
        raise ConfigurationError(
            f"{PREFIX}cluster = {settings.cluster} needs {PREFIX}target, the worker "
            f"callable (pkg.module:func); set it, or set {PREFIX}cluster = attach "
            "to use a broker and workers started elsewhere")
    factory = factory or Client
    wrapper = registry.queryUtility(IClientWrapper)
    if wrapper is not None:
        factory = _wrapped(factory, wrapper)
    registry.registerUtility(Powerhose(settings, factory), IPowerhose)
    if settings.http_errors:
        add_error_views(config, settings)


def _wrapped(factory, wrapper):
    def wrapped_factory(settings):
        return wrapper(factory(settings=settings), settings.service)

    return wrapped_factory


def _start_cluster(registry):
    powerhose = get_powerhose(registry)
    if registry.queryUtility(IClientFactory) is not None:
        return  # jobs run in-process (pyramid_powerhose.testing)
    mode = powerhose.settings.cluster
    try:
        powerhose.start_cluster()
    except UnsafeDirectoryError as exc:
        raise _unsafe_directory(exc) from None
    except SettingsError as exc:
        # The cluster's own checks name a field whose ini key is the same
        # (target, working_dir).
        raise ConfigurationError(f"{PREFIX}{exc}") from None
    except ClusterError as exc:
        frontend = powerhose.settings.frontend or "(default)"
        raise ConfigurationError(
            f"{PREFIX}cluster = {mode}, {PREFIX}frontend = {frontend}: {exc}") from None


def _unsafe_directory(exc):
    return ConfigurationError(
        f"{PREFIX}frontend and {PREFIX}backend are not set, and their default ipc sockets "
        f"cannot be used: {exc}; or set {PREFIX}frontend and {PREFIX}backend to explicit "
        "endpoints")


# -- exception views ---------------------------------------------------------------------

HTTP_ERRORS = (
    # (error, HTTP status, "error" in the JSON body, message, send Retry-After)
    (NoWorkerError, 503, "no-worker",
     "No worker is available to handle this request; try again shortly.", True),
    (WorkerLostError, 503, "worker-lost",
     "The worker handling this request stopped before finishing; try again.", True),
    (BrokerLostError, 503, "broker-lost",
     "The service is restarting or unavailable; try again shortly.", True),
    (OverloadedError, 503, "overloaded",
     "The service has too much work queued; try again shortly.", True),
    (TimeoutError, 504, "timeout",
     "The work for this request did not finish in time.", False),
)


def add_error_views(config, settings):
    """Powerhose errors as 503/504 JSON answers.

    The body says what happened in general terms; the details (endpoints,
    services, job ids) go to the log, not to the HTTP client.
    """
    retry_after = str(max(1, math.ceil(settings.heartbeat * settings.liveness)))
    for error, status, code, message, retry in HTTP_ERRORS:
        view = _error_view(status, code, message, retry_after if retry else None)
        config.add_exception_view(view, context=error)


def _error_view(status, code, message, retry_after):
    def powerhose_error_view(exc, request):
        log.warning("%s %s: %s: %s", request.method, request.path, type(exc).__name__, exc)
        response = Response(json_body={"error": code, "message": message}, status=status)
        if retry_after:
            response.headers["Retry-After"] = retry_after
        return response

    return powerhose_error_view
