"""Talking to a cluster's circus: spawning it, its commands, and killing what it leaves.

One :class:`Circusd` is one ``python -m pyramid_powerhose.supervisor``
process, its private directory (control socket, configuration, logs) and
the commands circusctl would send it.  It knows processes and circus
commands, not readiness: that is the cluster's business.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import psutil

from . import endpoints, watchers
from .exc import ClusterError
from .worker import load_params
from .watchers import BROKER, CIRCUS, OWNER_GONE_GRACE, STOP_MARGIN, WORKERS

log = logging.getLogger(__name__)

LOG_TAIL = 20  # lines of a log quoted in a ClusterError


class Circusd:
    """A running circus supervisor, owned by the process that spawned it.

    The owner holds the supervisor's stdin; closing it (or dying) tells
    the supervisor to stop everything by itself, once no other process
    shares the cluster (:meth:`users`).
    """

    def __init__(self, proc, run_dir, endpoint, background, users_path=None):
        self.proc = proc
        self.users_path = users_path  # where processes sharing the cluster count themselves
        self.run_dir = run_dir
        self.endpoint = endpoint  # circus's control endpoint
        self.background = background
        self.owner = os.getpid()
        self._known = {}  # pid -> psutil.Process of every broker and worker seen

    @classmethod
    def spawn(cls, settings, background) -> "Circusd":
        """Start circus with the ``broker`` and ``workers`` watchers for ``settings``.

        Returns at once, before the watchers run.
        """
        run_dir = tempfile.mkdtemp(prefix="powerhose-cluster-")  # mode 0700
        endpoint = f"ipc://{run_dir}/circus.sock"
        try:
            endpoints.check(endpoint, "circus endpoint")
        except ValueError as exc:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise ClusterError(f"{exc}; set TMPDIR to a shorter directory") from None
        python = watchers.interpreter()
        try:
            _write_params(settings, run_dir)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        config = watchers.circus_config(settings, run_dir, endpoint, background, python)
        config["users_socket"] = endpoints.users_path(settings.frontend)
        config_path = os.path.join(run_dir, "circus.json")
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
        output = None
        if background:
            output = open(watchers.log_path(run_dir, CIRCUS), "ab")
        try:
            # Its own session: Ctrl-C in a terminal reaches the owner, which
            # stops the cluster in order, not every process at once.
            proc = subprocess.Popen(
                [python, "-m", "pyramid_powerhose.supervisor", config_path],
                stdin=subprocess.PIPE, stdout=output,
                stderr=subprocess.STDOUT if output else None,
                cwd=run_dir, start_new_session=True)
        except OSError as exc:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise ClusterError(f"cannot start circus with {python}: {exc}") from exc
        finally:
            if output is not None:
                output.close()
        log.info("circus pid %d for %r, control endpoint %s", proc.pid, settings.target,
                 endpoint)
        return cls(proc, run_dir, endpoint, background, config["users_socket"])

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self):
        return self.proc.poll()

    # -- commands -----------------------------------------------------------------------

    def call(self, command, timeout=5.0, **properties) -> dict:
        """One circus command; retried while circus is busy with another."""
        # Imported here: an app that only attaches to a broker never loads circus.
        from circus.client import CircusClient
        from circus.exc import CallError

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
                time.sleep(0.1)  # e.g. a worker still retiring after a decrease
                continue
            raise ClusterError(f"circus at {self.endpoint} refused {command!r}: {reason}")

    def pids(self) -> dict:
        """``{'circus': pid, 'broker': [pid], 'workers': [pids]}``, as circus sees them."""
        pids = {
            CIRCUS: self.pid,
            BROKER: self.call("list", timeout=1.0, name=BROKER)["pids"],
            WORKERS: self.call("list", timeout=1.0, name=WORKERS)["pids"],
        }
        for pid in pids[BROKER] + pids[WORKERS]:
            if pid not in self._known:
                try:
                    self._known[pid] = psutil.Process(pid)
                except psutil.Error:
                    pass
        return pids

    def numprocesses(self, name) -> int:
        """How many processes circus aims for in watcher ``name`` (circusctl may change it)."""
        reply = self.call("get", timeout=1.0, name=name, keys=["numprocesses"])
        return int(reply["options"]["numprocesses"])

    def set_numprocesses(self, name, numprocesses):
        self.call("set", timeout=10.0, name=name, options={"numprocesses": numprocesses})

    # -- stopping -----------------------------------------------------------------------

    def stop(self, graceful_timeouts):
        """Stop the broker, then circus and the workers; kill whatever is left.

        ``graceful_timeouts`` (per watcher, as in the configuration) is how
        long each gets before it is killed.  Returns once every process is
        gone and the private directory removed.
        """
        proc = self.proc
        try:
            processes = _tree(proc.pid)
            if proc.poll() is None:
                try:
                    self.call("stop", timeout=graceful_timeouts[BROKER] + STOP_MARGIN,
                              name=BROKER, waiting=True)
                    processes = _tree(proc.pid) or processes
                    self.call("quit", timeout=STOP_MARGIN)
                    patience = graceful_timeouts[WORKERS] + STOP_MARGIN
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
        finally:
            self._known = {}
            if proc.stdin is not None:
                proc.stdin.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def users(self) -> int:
        """How many other processes share this cluster (see supervisor.Users)."""
        path = self.users_path
        if path is None:
            return 0
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(2.0)
                conn.connect(path)
                conn.sendall(b"?")
                return int(conn.recv(32) or b"0")
        except (OSError, ValueError):
            return 0

    def detach(self):
        """The owner leaves a cluster others share: the supervisor stops it when they go."""
        log.info("leaving the cluster (circus pid %d) to the processes that share it",
                 self.pid)
        self.proc.stdin.close()

    def forget(self):
        """In a forked child: drop the inherited pipe; circus stays the parent's."""
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    # -- output ---------------------------------------------------------------------------

    def logs_tail(self, *names) -> str:
        """The last lines of the logs of ``names`` (broker, workers, circus), for an error."""
        if not self.background:
            return " See its output above."
        text = ""
        for name in names:
            try:
                with open(watchers.log_path(self.run_dir, name), errors="replace") as f:
                    lines = [line.rstrip() for line in f if line.strip()][-LOG_TAIL:]
            except OSError:
                continue
            if lines:
                text += f"\nlast lines of the {name} log:\n    " + "\n    ".join(lines)
        return text


def _write_params(settings, run_dir):
    """The workers' params, into the file :func:`watchers.params_in_file` names (mode 0600)."""
    if not settings.params and not settings.params_file:
        return
    params = load_params(settings)
    fd = os.open(watchers.params_path(run_dir), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(params, f)


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
