"""What circus runs for a cluster: its configuration, as data.

Pure functions from a :class:`~pyramid_powerhose.settings.Settings` to the
command lines of the broker and the workers and to the configuration that
:mod:`pyramid_powerhose.supervisor` loads, so every decision (timeouts,
priorities, where the output goes) is tested without starting a process.
The settings given here have concrete endpoints: the cluster resolves the
private defaults before building them.
"""

from __future__ import annotations

import os
import re
import shlex
import sys

from . import endpoints
from .exc import ClusterError
from .settings import command_line

BROKER, WORKERS = "broker", "workers"  # the circus watchers, as circusctl names them
METRICS = "metrics"  # the exporter's watcher, when metrics_listen is set
CIRCUS = "circus"  # the name of circus's own log

CHECK_DELAY = 0.5  # seconds between circus's checks (reaping, respawning)
OWNER_GONE_GRACE = 3.0  # seconds the watchers get to stop once their owner died
STOP_MARGIN = 5.0  # seconds on top of the graceful timeouts before killing


def interpreter() -> str:
    """The interpreter for circus, the broker and the workers: this one.

    Under an embedding server (uWSGI, mod_wsgi) ``sys.executable`` is not a
    Python; set POWERHOSE_PYTHON to the virtualenv's python there.
    """
    executable = os.environ.get("POWERHOSE_PYTHON") or sys.executable
    if not executable:
        raise ClusterError("cannot tell which python runs the workers: set POWERHOSE_PYTHON")
    return executable


# -- the command lines --------------------------------------------------------------------
# The options come from the settings table (settings.command_line), so an
# option added there reaches the broker and the workers with no change here.

def broker_argv(settings, logfile=None, python=None) -> list[str]:
    """``powerhose-broker`` for ``settings``."""
    return [python or interpreter(), "-m", "pyramid_powerhose.cli.broker",
            *command_line(_supervised(settings, logfile), "broker")]


def worker_argv(settings, logfile=None, python=None) -> list[str]:
    """``powerhose-worker TARGET`` for ``settings``."""
    return [python or interpreter(), "-m", "pyramid_powerhose.cli.worker", settings.target,
            *command_line(_supervised(settings, logfile), "worker")]


def metrics_argv(settings, python=None) -> list[str]:
    """``powerhose metrics`` serving ``settings.metrics_listen`` for this cluster's broker.

    A ClusterError if the address is not HOST:PORT or prometheus_client is missing.
    """
    try:
        from .metrics import parse_listen
    except ImportError as exc:
        raise ClusterError(f"metrics_listen = {settings.metrics_listen}: {exc}") from None
    try:
        parse_listen(settings.metrics_listen)
    except ValueError as exc:
        raise ClusterError(f"metrics_listen: {exc}") from None
    return [python or interpreter(), "-m", "pyramid_powerhose.cli.metrics",
            "--listen", settings.metrics_listen, "--exit-with-parent",
            *command_line(settings, "status")]


def _supervised(settings, logfile):
    # Under our supervisor: if it is killed, circus cannot stop its children.
    return settings.replace(exit_with_parent=True, logfile=logfile or settings.logfile)



# -- params: in a private file, not on the command line -----------------------------------------

def params_path(run_dir) -> str:
    """Where a cluster writes its workers' params (mode 0600, in its private ``run_dir``)."""
    return os.path.join(run_dir, "params.json")


def params_in_file(settings, run_dir):
    """The workers' settings with their params in :func:`params_path`, off the command line.

    Every local user can read every command line (``ps``); the params may
    hold secrets.  The cluster writes the file before circus starts.
    """
    if not settings.params and not settings.params_file or run_dir is None:
        return settings  # run_dir None: a circus file (circus_ini), params_file as given
    return settings.replace(params={}, params_file=params_path(run_dir))


# -- the circus configuration ---------------------------------------------------------------

def graceful_timeouts(settings) -> dict[str, float]:
    """Seconds circus waits after SIGTERM before SIGKILL, per watcher.

    A broker drains its accepted jobs for ``grace``; a worker finishes its
    current job, which takes at most ``worker_timeout``.
    """
    return {BROKER: settings.grace + STOP_MARGIN,
            WORKERS: max(settings.grace, settings.worker_timeout) + STOP_MARGIN}


def log_path(run_dir, name) -> str:
    """Where a background cluster's ``name`` (broker, workers, circus) writes its output."""
    return os.path.join(run_dir, f"{name}.log")


def circus_config(settings, run_dir, endpoint, background, python=None) -> dict:
    """The configuration :mod:`pyramid_powerhose.supervisor` runs.

    In the background the output of the broker and the workers goes to
    files in ``run_dir``, which a ClusterError quotes; in the foreground
    it goes to the terminal.
    """
    python = python or interpreter()
    broker_logs = workers_logs = logfile = None
    if background:
        broker_logs, workers_logs = log_path(run_dir, BROKER), log_path(run_dir, WORKERS)
        if settings.logfile in ("stdout", "stderr"):
            logfile = "stdout"  # into those files
    grace = graceful_timeouts(settings)
    workers = params_in_file(settings, run_dir)
    watchers = [
        watcher(BROKER, broker_argv(settings, logfile, python), 1, grace[BROKER],
                settings.working_dir, broker_logs, priority=2, singleton=True),
        watcher(WORKERS, worker_argv(workers, logfile, python), settings.numprocesses,
                grace[WORKERS], settings.working_dir, workers_logs, priority=1),
    ]
    if settings.metrics_listen:
        watchers.append(watcher(METRICS, metrics_argv(settings, python), 1, STOP_MARGIN,
                                settings.working_dir,
                                log_path(run_dir, METRICS) if background else None,
                                priority=0, singleton=True))
    loglevel = "debug" if settings.debug else ("info" if background else "warning")
    return {
        "endpoint": endpoint,
        "pubsub_endpoint": f"ipc://{run_dir}/pubsub.sock",
        "check_delay": CHECK_DELAY,
        "owner_grace": OWNER_GONE_GRACE,
        "loglevel": loglevel,
        "run_dir": run_dir,
        "watchers": watchers,
    }


def watcher(name, argv, numprocesses, graceful_timeout, working_dir, output,
            priority, singleton=False) -> dict:
    """One circus watcher running ``argv``; its output goes to the file ``output``, if any."""
    config = {
        "name": name,
        "cmd": shlex.quote(argv[0]),
        "args": argv[1:],
        "numprocesses": numprocesses,
        "working_dir": working_dir,
        "copy_env": True,  # PATH, PYTHONPATH, the virtualenv
        "graceful_timeout": graceful_timeout,
        "priority": priority,  # the higher starts first: the broker
        "singleton": singleton,
    }
    if output:
        config["stdout_stream"] = {"class": "FileStream", "filename": output}
        config["stderr_stream"] = {"class": "FileStream", "filename": output}
    return config


# -- the same cluster as a file for a plain circusd ------------------------------------------

def control_endpoints(frontend, default_dir) -> tuple[str, str]:
    """circus's control and event endpoints for :func:`circus_ini`.

    ipc sockets named after the broker's frontend, beside it when it is
    an ipc socket, so that two clusters never share them and only who may
    reach the broker's directory may reach circus (circus's own default
    is tcp on 127.0.0.1:5555, open to every local user); in
    ``default_dir()`` (the private default directory) otherwise.
    """
    path = endpoints.ipc_path(frontend)
    if path is None:
        name = "circus-" + re.sub(r"[^\w.-]", "-", frontend.partition("://")[2])
        path = os.path.join(default_dir(), name)
    stem = path[:-len(".sock")] if path.endswith(".sock") else path
    return f"ipc://{stem}-circus.sock", f"ipc://{stem}-circus-pubsub.sock"


def circus_ini(settings, endpoint, pubsub_endpoint, python=None) -> str:
    """The broker and workers of ``settings`` as a circus ini file, for ``circusd FILE``.

    The watchers are those :func:`circus_config` gives a foreground
    cluster, so both ways of running a cluster run the same command
    lines; their output goes to circusd's.  ``copy_env`` passes PATH,
    PYTHONPATH and the virtualenv on: without it circus starts its
    processes with an empty environment.
    """
    if settings.params:
        raise ClusterError("params given one by one would be on the command lines of the "
                           "circus file's workers, which every local user can read; put them "
                           "in a JSON file of mode 0600 and give --params-file instead")
    # run_dir only places a background cluster's logs and events: unused here.
    config = circus_config(settings, None, endpoint, background=False, python=python)
    lines = [
        "# A powerhose cluster for circusd: a broker and its workers.  Run it with",
        "#     circusd FILE",
        f"# Clients connect to {settings.frontend}, workers to {settings.backend}.",
        "",
        "[circus]",
        f"endpoint = {endpoint}",
        f"pubsub_endpoint = {pubsub_endpoint}",
        "# no UDP multicast discovery (circus would listen on 0.0.0.0:12027)",
        "multicast_endpoint =",
        "statsd = false",
        f"check_delay = {config['check_delay']}",
    ]
    for watcher in config["watchers"]:
        lines += ["", f"[watcher:{watcher['name']}]",
                  f"cmd = {watcher['cmd']}",
                  f"args = {shlex.join(watcher['args'])}",
                  f"numprocesses = {watcher['numprocesses']}",
                  f"working_dir = {watcher['working_dir']}",
                  f"copy_env = {str(watcher['copy_env']).lower()}",
                  f"graceful_timeout = {watcher['graceful_timeout']}",
                  f"priority = {watcher['priority']}",
                  f"singleton = {str(watcher['singleton']).lower()}"]
    for line in lines:
        _check_ini_line(line)
    return "\n".join(lines) + "\n"


def _check_ini_line(line):
    # circus's ini parser ends a value at " ;" (a comment) and at a newline.
    if "\n" in line or re.search(r"\s;", line.partition(" = ")[2]):
        raise ClusterError(f"cannot write this setting in a circus ini file "
                           f"(a newline or ' ;' in it): {line!r}")
