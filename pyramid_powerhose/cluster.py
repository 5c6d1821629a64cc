"""A broker and its workers under Circus, owned by the process that starts them.

``get_cluster(target)`` turns its arguments into one
:class:`~pyramid_powerhose.settings.Settings` and returns a
:class:`Cluster`.  ``start()`` runs circus in a child process
(:mod:`pyramid_powerhose.supervisor`) with two watchers, ``broker`` and
``workers``, then either returns once the broker answers and the workers
have registered (``background=True``) or serves until SIGINT/SIGTERM.

Everything a cluster needs on disk (circus's control socket, its
configuration, the logs of a background cluster) lives in a private
temporary directory, removed when the cluster stops.  If the owning
process dies, the supervisor notices and stops the cluster by itself.

This layer knows commands and processes, not frames: readiness comes from
``Client.ping()`` and ``Client.stats()``, scaling from circus commands.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref

import psutil
from circus.client import CircusClient
from circus.exc import CallError

from . import endpoints
from .client import Client
from .exc import ClusterError, PowerhoseError, SettingsError
from .settings import Settings, format_params, parse_heartbeat, parse_params

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0  # seconds for the broker to answer and the workers to register
CHECK_DELAY = 0.5  # seconds between circus's checks (reaping, respawning)
OWNER_GONE_GRACE = 3.0  # seconds the watchers get to stop once their owner died
STOP_MARGIN = 5.0  # seconds on top of the graceful timeouts before killing
LOG_TAIL = 20  # lines of a log quoted in a ClusterError

BROKER, WORKERS = "broker", "workers"  # the circus watchers, as circusctl names them


def get_cluster(target=None, numprocesses=None, frontend=None, backend=None, heartbeat=None,
                working_dir=None, logfile=None, debug=None, background=False,
                worker_params=None, timeout=None, max_age=None, max_age_delta=None,
                service=None, settings=None) -> "Cluster":
    """A :class:`Cluster` serving ``target`` (``pkg.module:func`` or ``pkg.module.func``).

    Every argument is a :class:`Settings` field (``timeout`` is the
    worker's hard limit on one job, ``worker_params`` its ``get_params()``,
    as a dict or ``'k:v|k2:v2'``).  Arguments left to None keep the value
    of ``settings``, or the Settings default (5 workers, working dir '.',
    logs to stdout).  ``heartbeat`` may also be the original Powerhose's
    heartbeat endpoint, which keeps the default interval.
    """
    changes = {name: value for name, value in (
        ("target", target), ("numprocesses", numprocesses), ("frontend", frontend),
        ("backend", backend), ("working_dir", working_dir), ("logfile", logfile),
        ("debug", debug), ("max_age", max_age), ("max_age_delta", max_age_delta),
        ("service", service), ("worker_timeout", timeout)) if value is not None}
    if heartbeat is not None:
        seconds = parse_heartbeat(heartbeat)
        if seconds is not None:
            changes["heartbeat"] = seconds
    if worker_params is not None:
        changes["params"] = _params(worker_params)
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


# -- the command lines, built from Settings in this one place ------------------------------

def python() -> str:
    """The interpreter for circus, the broker and the workers: this one.

    Under an embedding server (uWSGI, mod_wsgi) ``sys.executable`` is not a
    Python; set POWERHOSE_PYTHON to the virtualenv's python there.
    """
    executable = os.environ.get("POWERHOSE_PYTHON") or sys.executable
    if not executable:
        raise ClusterError("cannot tell which python runs the workers: set POWERHOSE_PYTHON")
    return executable


def broker_command(settings, logfile=None) -> list[str]:
    """``powerhose-broker`` for ``settings``, run by this interpreter."""
    argv = [python(), "-m", "pyramid_powerhose.cli.broker",
            "--frontend", settings.frontend, "--backend", settings.backend,
            "--heartbeat", repr(settings.heartbeat),
            "--liveness", str(settings.liveness),
            "--grace", repr(settings.grace),
            "--no-worker-timeout", repr(settings.no_worker_timeout),
            "--max-job-size", str(settings.max_job_size)]
    return argv + _logging_options(settings, logfile)


def worker_command(settings, logfile=None) -> list[str]:
    """``powerhose-worker TARGET`` for ``settings``, run by this interpreter."""
    argv = [python(), "-m", "pyramid_powerhose.cli.worker", settings.target,
            "--backend", settings.backend, "--heartbeat", repr(settings.heartbeat),
            "--liveness", str(settings.liveness),
            "--service", settings.service,
            "--timeout", repr(settings.worker_timeout),
            "--max-age", repr(settings.max_age),
            "--max-age-delta", repr(settings.max_age_delta),
            "--broker-timeout", repr(settings.broker_timeout),
            "--prefetch", str(settings.prefetch),
            "--nice", str(settings.nice)]
    if settings.params:
        argv += ["--params", format_params(settings.params)]
    return argv + _logging_options(settings, logfile)


def _logging_options(settings, logfile):
    # Under our supervisor: if it is killed, circus cannot stop its children.
    options = ["--exit-with-parent", "--logfile", logfile or settings.logfile]
    if settings.debug:
        options.append("--debug")
    return options


# -- the cluster ---------------------------------------------------------------------------

_clusters = weakref.WeakSet()


def _after_fork_in_child():
    # A forked child inherits the owner's pipe to the supervisor; holding it
    # would keep the cluster alive after the owner dies.  The cluster is not
    # the child's to stop.
    for cluster in list(_clusters):
        cluster._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Cluster:
    """Circus running one broker and ``numprocesses`` workers for one target."""

    def __init__(self, settings: Settings, background=False):
        if not settings.target:
            raise SettingsError("a cluster needs a target: the worker callable, "
                                "pkg.module:func or pkg.module.func")
        working_dir = os.path.abspath(settings.working_dir)
        if not os.path.isdir(working_dir):
            raise SettingsError(f"working_dir {working_dir} is not a directory")
        self.settings = settings.replace(
            working_dir=working_dir, frontend=endpoints.resolve(settings.frontend, "frontend"),
            backend=endpoints.resolve(settings.backend, "backend"))
        self.background = background
        self.endpoint = None  # circus's control endpoint, once started
        self.run_dir = None
        self._supervisor = None
        self._owner = None
        self._known = {}  # pid -> psutil.Process of every broker and worker seen
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
        proc = self._supervisor
        return proc is not None and proc.poll() is None

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
            self._spawn()
        try:
            self._wait(timeout, starting=True)
        except BaseException:
            self.stop()
            raise
        log.info("cluster ready: broker on %s, %d workers for %r, circus on %s",
                 self.frontend, self.settings.numprocesses, self.settings.target, self.endpoint)

    def _spawn(self):
        run_dir = tempfile.mkdtemp(prefix="powerhose-cluster-")  # mode 0700
        endpoint = f"ipc://{run_dir}/circus.sock"
        try:
            endpoints.check(endpoint, "circus endpoint")
        except ValueError as exc:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise ClusterError(f"{exc}; set TMPDIR to a shorter directory") from None
        config = self._circus_config(run_dir, endpoint)
        config_path = os.path.join(run_dir, "circus.json")
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
        output = None
        if self.background:
            output = open(os.path.join(run_dir, "circus.log"), "ab")
        try:
            # Its own session: Ctrl-C in a terminal reaches the owner, which
            # stops the cluster in order, not every process at once.
            proc = subprocess.Popen(
                [python(), "-m", "pyramid_powerhose.supervisor", config_path],
                stdin=subprocess.PIPE, stdout=output,
                stderr=subprocess.STDOUT if output else None,
                cwd=run_dir, start_new_session=True)
        except OSError as exc:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise ClusterError(f"cannot start circus with {python()}: {exc}") from exc
        finally:
            if output is not None:
                output.close()
        self._supervisor, self._owner = proc, os.getpid()
        self.run_dir, self.endpoint = run_dir, endpoint
        atexit.register(self.stop)
        log.info("circus pid %d for %r, control endpoint %s", proc.pid,
                 self.settings.target, endpoint)

    def _circus_config(self, run_dir, endpoint):
        settings = self.settings
        broker_logs = workers_logs = None
        logfile = None
        if self.background:
            # Their output goes to files the owner can quote in a ClusterError.
            broker_logs = os.path.join(run_dir, "broker.log")
            workers_logs = os.path.join(run_dir, "workers.log")
            if settings.logfile in ("stdout", "stderr"):
                logfile = "stdout"
        # Circus waits this long after SIGTERM before SIGKILL: a broker
        # drains for --grace, a worker finishes its job (at most --timeout).
        broker_grace = settings.grace + STOP_MARGIN
        workers_grace = max(settings.grace, settings.worker_timeout) + STOP_MARGIN
        watchers = [
            _watcher(BROKER, broker_command(settings, logfile), 1, broker_grace,
                     settings.working_dir, broker_logs, priority=2, singleton=True),
            _watcher(WORKERS, worker_command(settings, logfile), settings.numprocesses,
                     workers_grace, settings.working_dir, workers_logs, priority=1),
        ]
        loglevel = "debug" if settings.debug else ("info" if self.background else "warning")
        return {
            "endpoint": endpoint,
            "pubsub_endpoint": f"ipc://{run_dir}/pubsub.sock",
            "check_delay": CHECK_DELAY,
            "owner_grace": OWNER_GONE_GRACE,
            "loglevel": loglevel,
            "run_dir": run_dir,
            "watchers": watchers,
        }

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
                self._check_alive()
                pids = self._pids_or_none()
                if pids is not None:
                    if starting:
                        self._check_no_death(seen, pids)
                    ready, state = self._readiness(client, pids)
                    if ready:
                        return
                if time.monotonic() >= deadline:
                    raise ClusterError(
                        f"the cluster for {self.settings.target!r} was not ready within "
                        f"{timeout}s: {state}.{self._logs_tail(BROKER, WORKERS)}")
                time.sleep(0.1)

    def _readiness(self, client, pids):
        wanted = self._numprocesses()
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
                    f"{self.frontend}, backend {self.backend}).{self._logs_tail(name)}")
            seen[name].update(pids[name])

    def _check_alive(self):
        proc = self._supervisor
        if proc is None:
            raise ClusterError(f"{self!r} is not running")
        if proc.poll() is not None:
            raise ClusterError(f"circus exited with status {proc.returncode}."
                               f"{self._logs_tail(None, BROKER, WORKERS)}")

    def _logs_tail(self, *names) -> str:
        """The last lines of the logs of ``names`` (None: circus), for an error message."""
        if not self.background:
            return " See its output above."
        text = ""
        for name in names:
            path = os.path.join(self.run_dir or "", f"{name or 'circus'}.log")
            try:
                with open(path, errors="replace") as f:
                    lines = [line.rstrip() for line in f if line.strip()][-LOG_TAIL:]
            except OSError:
                continue
            if lines:
                text += f"\nlast lines of the {name or 'circus'} log:\n    " + "\n    ".join(lines)
        return text

    # -- circus commands ----------------------------------------------------------------

    def _circus(self, command, timeout=5.0, **properties) -> dict:
        """One circus command; retried while circus is busy with another."""
        if self.endpoint is None:
            raise ClusterError(f"{self!r} is not running")
        deadline = time.monotonic() + timeout
        while True:
            client = CircusClient(endpoint=self.endpoint, timeout=timeout)
            try:
                reply = client.call({"command": command, "properties": properties})
            except CallError as exc:
                raise ClusterError(f"circus at {self.endpoint} did not answer {command!r} "
                                   f"within {timeout}s: {exc}") from None
            finally:
                client.stop()
            if reply.get("status") == "ok":
                return reply
            reason = reply.get("reason", "unknown error")
            if "already running" in reason and time.monotonic() < deadline:
                time.sleep(0.1)  # e.g. a worker still retiring after scale()
                continue
            raise ClusterError(f"circus at {self.endpoint} refused {command!r}: {reason}")

    def _pids_or_none(self):
        try:
            return self.pids()
        except ClusterError:
            return None  # not answering yet

    def pids(self) -> dict:
        """``{'circus': pid, 'broker': [pid], 'workers': [pids]}``, as circus sees them."""
        pids = {
            "circus": self._supervisor.pid if self._supervisor else None,
            BROKER: self._circus("list", timeout=1.0, name=BROKER)["pids"],
            WORKERS: self._circus("list", timeout=1.0, name=WORKERS)["pids"],
        }
        for pid in pids[BROKER] + pids[WORKERS]:
            if pid not in self._known:
                try:
                    self._known[pid] = psutil.Process(pid)
                except psutil.Error:
                    pass
        return pids

    def _numprocesses(self) -> int:
        """The worker count circus aims for (scale() or ``circusctl incr`` change it)."""
        reply = self._circus("get", timeout=1.0, name=WORKERS, keys=["numprocesses"])
        return int(reply["options"]["numprocesses"])

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
        self._circus("set", timeout=10.0, name=WORKERS,
                     options={"numprocesses": numprocesses})
        self.settings = self.settings.replace(numprocesses=numprocesses)
        log.info("scaled %r to %d workers", self.settings.target, numprocesses)

    # -- serving in the foreground ----------------------------------------------------------

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
            if not stop_requested and self._supervisor is not None:
                raise ClusterError(f"circus exited unexpectedly with status "
                                   f"{self._supervisor.returncode}."
                                   f"{self._logs_tail(None, BROKER, WORKERS)}")
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
            proc = self._supervisor
            if proc is None or os.getpid() != self._owner:
                return
            try:
                self._stop(proc)
            finally:
                self._supervisor = None
                atexit.unregister(self.stop)
                self._known = {}
                if proc.stdin is not None:
                    proc.stdin.close()
                shutil.rmtree(self.run_dir, ignore_errors=True)
                log.info("cluster for %r stopped", self.settings.target)

    def _stop(self, proc):
        settings = self.settings
        broker_grace = settings.grace + STOP_MARGIN
        workers_grace = max(settings.grace, settings.worker_timeout) + STOP_MARGIN
        processes = _tree(proc.pid)
        if proc.poll() is None:
            try:
                self._circus("stop", timeout=broker_grace + STOP_MARGIN, name=BROKER,
                             waiting=True)
                processes = _tree(proc.pid) or processes
                self._circus("quit", timeout=STOP_MARGIN)
                patience = workers_grace + STOP_MARGIN
            except ClusterError as exc:
                # As if the owner died: the supervisor stops circus, then kills.
                log.warning("circus did not stop in order (%s); closing its pipe", exc)
                proc.stdin.close()
                patience = OWNER_GONE_GRACE + STOP_MARGIN
            try:
                proc.wait(patience)
            except subprocess.TimeoutExpired:
                log.error("circus pid %d did not stop within %.0fs; killing the cluster",
                          proc.pid, patience)
        # Also what circus can no longer tell us about, should it have died.
        processes += [p for p in self._known.values() if p not in processes]
        for process in processes:
            try:
                process.kill()  # psutil checks the pid was not reused
            except psutil.Error:
                pass
        _signal(proc, signal.SIGKILL)
        proc.wait()

    def _forget(self):
        """In a forked child: drop the inherited pipe; the cluster stays the parent's."""
        proc = self._supervisor
        if proc is not None and proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass


def _tree(pid) -> list:
    """A process and its descendants, as psutil objects (safe against pid reuse)."""
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def _signal(proc, sig):
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _watcher(name, argv, numprocesses, graceful_timeout, working_dir, log_path,
             priority, singleton=False) -> dict:
    watcher = {
        "name": name,
        "cmd": shlex.quote(argv[0]),
        "args": argv[1:],
        "numprocesses": numprocesses,
        "working_dir": working_dir,
        "copy_env": True,  # PATH, PYTHONPATH, the virtualenv
        "graceful_timeout": graceful_timeout,
        "priority": priority,  # the broker starts first
        "singleton": singleton,
    }
    if log_path:
        watcher["stdout_stream"] = {"class": "FileStream", "filename": log_path}
        watcher["stderr_stream"] = {"class": "FileStream", "filename": log_path}
    return watcher
