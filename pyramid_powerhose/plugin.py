"""The Pyramid plugin: ``config.include('pyramid_powerhose')``.

This module is glue: it reads the ``powerhose.*`` settings, gives each
request a ``request.powerhose`` backed by one shared :class:`Client`,
starts (or finds) a cluster, and maps the errors a client raises to HTTP
answers.  It knows the client and cluster APIs, not ZeroMQ.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import math
import os
import threading
import time

from pyramid.exceptions import ConfigurationError
from pyramid.response import Response
from zope.interface import Interface

from . import endpoints
from .client import Client
from .exc import ClusterError, NoWorkerError, SettingsError, TimeoutError, WorkerLostError
from .settings import settings_from_mapping

log = logging.getLogger(__name__)

PREFIX = "powerhose."

# The cluster starts after every ordinary (order 0) action has run, so a
# configuration error elsewhere in the app does not leave processes behind.
CLUSTER_ORDER = 10

# How long an ``auto`` process waits for another one that is spawning the
# cluster; longer than a cluster takes to start on a loaded machine.
SPAWN_LOCK_TIMEOUT = 120.0

PING_TIMEOUT = 1.0


class IPowerhose(Interface):
    """The registry's :class:`Powerhose`."""


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
    * unless ``powerhose.http_errors = false``, answers ``NoWorkerError``
      and ``WorkerLostError`` with 503 and a ``Retry-After`` header, and
      ``TimeoutError`` with 504, each with a short JSON body.

    With ``auto``, server processes that start at once on the same ipc
    frontend take turns on a lock file beside the socket: the first one
    spawns the cluster, the others find its broker and attach (to any
    broker that answers there: its workers must serve the app's
    ``powerhose.service``).  A tcp
    frontend has no such file: two processes that both find no broker
    both spawn one, the second broker cannot bind the port, and that
    process attaches to the first one's broker instead.

    The spawned cluster lives and dies with the process that spawned it.
    With a pre-forking server that recycles its worker processes, load
    the app in the master (gunicorn ``--preload``) or run the cluster
    separately and use ``attach``.
    """
    config.add_request_method(_request_powerhose, "powerhose", reify=True)
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
        """Spawn (``spawn``), find or spawn (``auto``), or do nothing (``attach``)."""
        mode = self.settings.cluster
        if mode == "spawn":
            self._own(_spawn(self.settings))
        elif mode == "auto":
            self._own(_attach_or_spawn(self.settings))

    def _own(self, cluster):
        if cluster is None:
            return
        self.cluster = cluster
        self._cluster_pid = os.getpid()
        atexit.register(self.close)

    def close(self):
        """Close the client, and stop the cluster if this process spawned it.

        Called at exit.  A forked child (a pre-fork server's worker) does
        not own the cluster and leaves it alone.
        """
        client, self._client = self._client, None
        if client is not None:
            client.close()
        cluster, self.cluster = self.cluster, None
        if cluster is not None and self._cluster_pid == os.getpid():
            atexit.unregister(self.close)
            log.info("stopping the powerhose cluster on %s", self.settings.frontend)
            cluster.stop()


def _request_powerhose(request):
    return get_powerhose(request.registry)


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
    registry.registerUtility(Powerhose(settings, factory or Client), IPowerhose)
    if settings.http_errors:
        add_error_views(config, settings)


def _start_cluster(registry):
    powerhose = get_powerhose(registry)
    if registry.queryUtility(IClientFactory) is not None:
        return  # jobs run in-process (pyramid_powerhose.testing)
    powerhose.start_cluster()


# -- cluster ------------------------------------------------------------------------------

def _spawn(settings):
    from .cluster import get_cluster  # imports circus: only when spawning

    log.info("starting a powerhose cluster: %d workers running %s, frontend %s",
             settings.numprocesses, settings.target, settings.frontend)
    cluster = get_cluster(settings=settings, background=True)
    cluster.start()  # returns once ready; leaves nothing running if it raises
    return cluster


def _attach_or_spawn(settings):
    """The spawned cluster, or None when a broker already answers."""

    with _spawn_lock(endpoints.resolve(settings.frontend, "frontend")):
        pid = _ping(settings)
        if pid is not None:
            log.info("attaching to the powerhose broker (pid %d) on %s", pid, settings.frontend)
            return None
        try:
            return _spawn(settings)
        except ClusterError:
            # Without a lock (tcp), another process may have won the race.
            pid = _ping(settings)
            if pid is None:
                raise
            log.info("another process started the powerhose broker (pid %d) on %s "
                     "first; attaching to it", pid, settings.frontend)
            return None


def _ping(settings):
    """The pid of the broker answering on the frontend, or None."""
    path = endpoints.ipc_path(endpoints.resolve(settings.frontend, "frontend"))
    if path is not None and not os.path.exists(path):
        return None  # no socket, no broker: spare the ping's wait
    with Client(settings=settings) as client:
        return client.ping(timeout=PING_TIMEOUT)


@contextlib.contextmanager
def _spawn_lock(frontend):
    """Exclusive while one process looks for a broker and maybe spawns one.

    A lock file beside the frontend's ipc socket, in the same private
    directory (the broker's own ``.lock`` is a different file).  tcp
    frontends have no such place; see includeme's docstring.
    """
    path = endpoints.ipc_path(frontend)
    if path is None:
        yield
        return
    lock_path = path + ".spawn.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create {lock_path} beside the {PREFIX}frontend socket: {exc}; "
            "does its directory exist and belong to this user?") from None
    try:
        deadline = time.monotonic() + SPAWN_LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    raise ConfigurationError(
                        f"process {holder or '?'} has held {lock_path} for over "
                        f"{SPAWN_LOCK_TIMEOUT:.0f}s while starting a powerhose cluster; "
                        "is it stuck?") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        # LOCK_UN, not just close: a child forked meanwhile shares the lock.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# -- exception views ---------------------------------------------------------------------

HTTP_ERRORS = (
    # (error, HTTP status, "error" in the JSON body, message, send Retry-After)
    (NoWorkerError, 503, "no-worker",
     "No worker is available to handle this request; try again shortly.", True),
    (WorkerLostError, 503, "worker-lost",
     "The worker handling this request stopped before finishing; try again.", True),
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
