"""A broker and its workers under Circus, owned by the process that starts them.

The small facade over :mod:`.watchers` (what circus runs) and
:mod:`.circusd` (talking to circus): ``get_cluster(target)`` returns a
:class:`Cluster` to start, wait until ready, scale and stop; and
``attach_or_spawn(settings)`` finds the broker an app should use or
starts one, for the Pyramid plugin.  If the owning process dies, the
supervisor notices and stops the cluster by itself, unless processes that
attached to it still share it: then it stops when the last of them goes.

Readiness comes from ``Client.ping()`` and ``Client.stats()``: this layer
knows commands and processes, not frames.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import signal
import socket
import threading
import time
import weakref

from . import endpoints
from .circusd import Circusd
from .client import Client
from .exc import ClusterError, PowerhoseError, SettingsError, UnsafeDirectoryError
from .settings import Settings, parse_heartbeat, parse_params
from .watchers import BROKER, CIRCUS, WORKERS, graceful_timeouts

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0  # seconds for the broker to answer and the workers to register

# How long an ``auto`` process waits for another one that is spawning the
# cluster; longer than a cluster takes to start on a loaded machine.
SPAWN_LOCK_TIMEOUT = 120.0
PING_TIMEOUT = 1.0


# get_cluster's names for Settings fields, kept from the original Powerhose.
ALIASES = {"timeout": "worker_timeout", "worker_params": "params"}


def get_cluster(target=None, background=False, settings=None, **options) -> "Cluster":
    """A :class:`Cluster` serving ``target`` (``pkg.module:func`` or ``pkg.module.func``).

    Every other keyword is a :class:`Settings` field (docs/settings.rst);
    ``timeout`` is the worker's hard limit on one job (``worker_timeout``)
    and ``worker_params`` its ``get_params()``, as a dict or
    ``'k:v|k2:v2'``.  Keywords left to None keep the value of ``settings``,
    or the Settings default.  ``heartbeat`` may also be the original
    Powerhose's heartbeat endpoint, which keeps the default interval.
    """
    fields = Settings.__dataclass_fields__
    changes = {} if target is None else {"target": target}
    for name, value in options.items():
        field = ALIASES.get(name, name)
        if field not in fields:
            raise TypeError(f"get_cluster() got an unexpected keyword argument {name!r}")
        if field == "heartbeat" and value is not None:
            value = parse_heartbeat(value)  # None: an old heartbeat endpoint
        if field == "params" and value is not None:
            value = _params(value)
        if value is not None:
            changes[field] = value
    base = settings if settings is not None else Settings()
    return Cluster(base.replace(**changes), background=background)


def _params(params) -> dict:
    if isinstance(params, str):
        return parse_params(params)
    params = {str(key): str(value) for key, value in dict(params).items()}
    for key, value in params.items():
        if not key.strip() or ":" in key or "|" in key or "|" in value:
            raise SettingsError(f"worker param {key!r}: keys cannot be empty or contain ':' "
                                "or '|', values cannot contain '|'")
    return params


# -- the cluster ---------------------------------------------------------------------------

_clusters = weakref.WeakSet()


def _after_fork_in_child():
    # A forked child inherits the owner's pipe to the supervisor; holding it
    # would keep the cluster alive after the owner dies.  The cluster is not
    # the child's to stop.
    for cluster in list(_clusters):
        cluster._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _resolved(settings: Settings) -> Settings:
    """``settings`` with concrete endpoints: the private defaults spelled out.

    A cluster runs one broker: SettingsError if ``settings`` lists several.
    """
    for name in ("frontend", "backend"):
        endpoints.single(getattr(settings, name), name, "a cluster's broker")
    return settings.replace(frontend=endpoints.resolve(settings.frontend, "frontend"),
                            backend=endpoints.resolve(settings.backend, "backend"))


class Cluster:
    """Circus running one broker and ``numprocesses`` workers for one target."""

    def __init__(self, settings: Settings, background=False):
        if not settings.target:
            raise SettingsError("target is empty: a cluster needs the worker callable, "
                                "pkg.module:func or pkg.module.func")
        working_dir = os.path.abspath(settings.working_dir)
        if not os.path.isdir(working_dir):
            raise SettingsError(f"working_dir {working_dir} is not a directory")
        # Resolved once: the broker, the workers and the readiness checks
        # all use the same explicit endpoints.
        self.settings = _resolved(settings).replace(working_dir=working_dir)
        self.background = background
        self.endpoint = None  # circus's control endpoint, once started
        self.run_dir = None  # its private directory (kept for error reports)
        self._circusd = None
        self._lock = threading.RLock()
        _clusters.add(self)

    @property
    def frontend(self):
        return self.settings.frontend

    @property
    def backend(self):
        return self.settings.backend

    @property
    def running(self) -> bool:
        circusd = self._circusd
        return circusd is not None and circusd.running

    def __repr__(self):
        state = "running" if self.running else "stopped"
        return f"<Cluster {self.settings.target!r} on {self.frontend} ({state})>"

    def __enter__(self):
        self.launch()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    # -- starting ---------------------------------------------------------------------

    def start(self, timeout=START_TIMEOUT):
        """Start circus, the broker and the workers.

        Background: return once the broker answers and the workers have
        registered, or raise ClusterError (nothing is left running).
        Foreground: then serve until SIGINT or SIGTERM, and stop everything.
        """
        self.launch(timeout)
        if not self.background:
            self.serve_forever()

    def launch(self, timeout=START_TIMEOUT):
        """Start everything and return once ready, whatever the mode."""
        with self._lock:
            if self.running:
                raise ClusterError(f"{self!r} is already running")
            self.stop()  # what is left of a cluster whose circus died
            circusd = Circusd.spawn(self.settings, self.background)
            self._circusd = circusd
            self.run_dir, self.endpoint = circusd.run_dir, circusd.endpoint
            atexit.register(self.stop)
        try:
            self._wait(timeout, starting=True)
        except BaseException:
            self.stop()
            raise
        log.info("cluster ready: broker on %s, %d workers for %r, circus on %s",
                 self.frontend, self.settings.numprocesses, self.settings.target, self.endpoint)

    # -- readiness ----------------------------------------------------------------------

    def wait_ready(self, timeout=START_TIMEOUT):
        """Return once the broker answers and the workers circus runs have registered.

        Raises ClusterError after ``timeout`` seconds, naming what is missing.
        """
        self._wait(timeout, starting=False)

    def _wait(self, timeout, starting):
        deadline = time.monotonic() + timeout
        seen = {BROKER: set(), WORKERS: set()}
        state = "circus is not answering yet"
        with Client(settings=self.settings) as client:
            while True:
                circusd = self._alive()
                try:
                    pids = circusd.pids()
                except ClusterError:
                    pids = None  # not answering yet
                if pids is not None:
                    if starting:
                        self._check_no_death(seen, pids)
                    ready, state = self._readiness(client, pids)
                    if ready:
                        return
                if time.monotonic() >= deadline:
                    raise ClusterError(
                        f"the cluster for {self.settings.target!r} was not ready within "
                        f"{timeout}s: {state}.{circusd.logs_tail(BROKER, WORKERS)}")
                time.sleep(0.1)

    def _readiness(self, client, pids):
        wanted = self._alive().numprocesses(WORKERS)  # scale() or circusctl may change it
        if not pids[BROKER]:
            return False, "circus has not started the broker"
        broker = client.ping(timeout=0.5)
        if broker != pids[BROKER][0]:
            return False, (f"no broker of this cluster answers on {self.frontend}"
                           + (f" (broker pid {broker} answers there)" if broker else ""))
        try:
            services = client.stats(timeout=1.0)["services"]
        except PowerhoseError as exc:
            return False, f"the broker on {self.frontend} did not answer mmi.stats: {exc}"
        registered = services.get(self.settings.service, {}).get("workers", 0)
        state = (f"{registered} of {wanted} workers registered for service "
                 f"{self.settings.service!r} on {self.backend}")
        return registered >= wanted, state

    def _check_no_death(self, seen, pids):
        """While starting, any broker or worker that exits is a failure to start."""
        for name in (BROKER, WORKERS):
            gone = seen[name] - set(pids[name])
            if gone:
                what = "the broker" if name == BROKER else "a worker"
                raise ClusterError(
                    f"{what} for {self.settings.target!r} exited while the cluster was "
                    f"starting (working dir {self.settings.working_dir}, frontend "
                    f"{self.frontend}, backend {self.backend}).{self._circusd.logs_tail(name)}")
            seen[name].update(pids[name])

    def _alive(self) -> Circusd:
        """The running circus, or a ClusterError saying why there is none."""
        circusd = self._circusd
        if circusd is None:
            raise ClusterError(f"{self!r} is not running")
        if not circusd.running:
            raise ClusterError(f"circus exited with status {circusd.returncode}."
                               f"{circusd.logs_tail(CIRCUS, BROKER, WORKERS)}")
        return circusd

    # -- while it runs --------------------------------------------------------------------

    def pids(self) -> dict:
        """``{'circus': pid, 'broker': [pid], 'workers': [pids]}``, as circus sees them."""
        circusd = self._circusd
        if circusd is None:
            raise ClusterError(f"{self!r} is not running")
        return circusd.pids()

    def scale(self, numprocesses: int):
        """Run ``numprocesses`` workers from now on, while jobs flow.

        New workers register as they start; extra ones get SIGTERM, finish
        their current job and leave (the broker requeues a job that crossed
        their DISCONNECT), so no job fails.  Returns at once: call
        ``wait_ready()`` to wait for new workers.
        """
        numprocesses = int(numprocesses)
        if numprocesses < 0:
            raise ValueError(f"numprocesses must be 0 or more, got {numprocesses}")
        circusd = self._circusd
        if circusd is None:
            raise ClusterError(f"{self!r} is not running")
        circusd.set_numprocesses(WORKERS, numprocesses)
        self.settings = self.settings.replace(numprocesses=numprocesses)
        log.info("scaled %r to %d workers", self.settings.target, numprocesses)

    def serve_forever(self):
        """Block until SIGINT or SIGTERM (or circus exits), then stop everything."""
        stop_requested = []
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda signum, frame:
                                              stop_requested.append(signum))
        try:
            while not stop_requested and self.running:
                time.sleep(0.2)
            circusd = self._circusd
            if not stop_requested and circusd is not None:
                raise ClusterError(f"circus exited unexpectedly with status "
                                   f"{circusd.returncode}."
                                   f"{circusd.logs_tail(CIRCUS, BROKER, WORKERS)}")
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if stop_requested:
            log.info("stopped on %s", signal.Signals(stop_requested[0]).name)

    # -- stopping -------------------------------------------------------------------------

    def stop(self):
        """Stop the broker, then the workers and circus; nothing is left running.

        The broker goes first and finishes its accepted jobs (``grace``)
        while the workers still run; then the workers finish their current
        job and leave.  Whatever outlives the graceful timeouts is killed.
        Idempotent; a no-op in a forked child of the owner.
        """
        with self._lock:
            circusd = self._circusd
            if circusd is None or os.getpid() != circusd.owner:
                return
            try:
                circusd.stop(graceful_timeouts(self.settings))
            finally:
                self._circusd = None
                atexit.unregister(self.stop)
                log.info("cluster for %r stopped", self.settings.target)

    def leave(self):
        """Stop the cluster, unless other processes share it (:func:`attach_or_spawn`).

        Then it is theirs: it keeps running, and stops by itself when the
        last of them exits or is killed.  A no-op in a forked child.
        """
        with self._lock:
            circusd = self._circusd
            if circusd is None or os.getpid() != circusd.owner:
                return
            if circusd.running and circusd.users():
                circusd.detach()
                self._circusd = None
                atexit.unregister(self.stop)
                return
        self.stop()

    def _forget(self):
        """In a forked child: drop the inherited pipe; the cluster stays the parent's."""
        circusd = self._circusd
        if circusd is not None:
            circusd.forget()


# -- for the Pyramid plugin: find a broker, or spawn a cluster -----------------------------

def spawn(settings: Settings) -> Cluster:
    """A background cluster for ``settings``, started and ready.

    Raises ClusterError (leaving nothing running) if it does not start.
    """
    cluster = Cluster(settings, background=True)
    log.info("starting a powerhose cluster: %d workers running %s, frontend %s",
             settings.numprocesses, settings.target, cluster.frontend)
    cluster.launch()
    return cluster


def attach_or_spawn(settings: Settings):
    """The cluster spawned for ``settings``, or None when a broker already answers.

    Processes that start at once on the same ipc frontend take turns on a
    lock file beside its socket, so exactly one spawns.  A tcp frontend has
    no such place: a process that loses the race fails to bind, finds the
    winner's broker and attaches to it.

    A process that attaches to a cluster another one spawned (on an ipc
    frontend) shares it: the cluster keeps running while any of them lives
    (the spawner calls :meth:`Cluster.leave`), and stops when the last goes.
    """
    settings = _resolved(settings)
    with spawn_lock(settings.frontend):
        pid = broker_pid(settings)
        if pid is not None:
            shared = _share(settings.frontend)
            log.info("attaching to the powerhose broker (pid %d) on %s%s", pid,
                     settings.frontend, " (sharing its cluster)" if shared else "")
            return None
        try:
            return spawn(settings)
        except ClusterError:
            # Without a lock (tcp), another process may have won the race.
            pid = broker_pid(settings)
            if pid is None:
                raise
            log.info("another process started the powerhose broker (pid %d) on %s "
                     "first; attaching to it", pid, settings.frontend)
            return None


# Connections that count this process among a cluster's users, open until it exits.
_sharing = []


def _share(frontend) -> bool:
    """Count this process among the users of the cluster serving ``frontend``, if it
    was spawned by another process; False for a broker run otherwise."""
    path = endpoints.users_path(frontend)
    if path is None or not os.path.exists(path):
        return False
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(2.0)
        conn.connect(path)
        conn.sendall(b"A")
    except OSError as exc:
        conn.close()
        log.warning("cannot share the cluster on %s (%s): it will stop with the process "
                    "that started it", frontend, exc)
        return False
    _sharing.append(conn)  # the kernel closes it when this process dies
    return True


def broker_pid(settings: Settings):
    """The pid of the broker answering on ``settings.frontend`` (concrete), or None."""
    path = endpoints.ipc_path(settings.frontend)
    if path is not None and not os.path.exists(path):
        return None  # no socket, no broker: spare the ping's wait
    with Client(settings=settings) as client:
        return client.ping(timeout=PING_TIMEOUT)


@contextlib.contextmanager
def spawn_lock(frontend):
    """Exclusive while one process looks for a broker and maybe spawns one.

    A lock file beside the frontend's ipc socket, in the same private
    directory (the broker's own ``.lock`` is a different file).  tcp
    frontends have no such place; see :func:`attach_or_spawn`.
    """
    path = endpoints.ipc_path(frontend)
    if path is None:
        yield
        return
    lock_path = path + ".spawn.lock"
    try:
        fd = endpoints.open_lock_file(lock_path)
    except UnsafeDirectoryError as exc:
        raise ClusterError(
            f"{exc}; does its directory exist and belong to this user?") from None
    try:
        deadline = time.monotonic() + SPAWN_LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    raise ClusterError(
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
