"""The process that runs circus for a cluster and ends it with its owner.

Circus's threaded arbiter does not work on Python 3.9+ (circus issue 1147)
and circus installs process-wide signal handlers, so a cluster's arbiter
runs here, in a child process of its own, never in the application.

A cluster belongs to the process that started it.  That process holds the
write end of this one's stdin and never writes to it, so end-of-file means
the owner is gone, even killed by SIGKILL (the kernel closes its files).
Then the arbiter stops its watchers, and a few seconds later whatever is
still alive is killed: no broker or worker outlives its owner.

Other processes may share the cluster (web servers with ``cluster = auto``
that found it running): each holds a connection to a unix socket beside
the frontend's (see :class:`Users`), and the cluster stays up while any of
them lives, owner or not; it stops when the last one goes, killed or not.  Circus
starts each process in its own session, so no signal to a process group
could reach them all; they are found as this process's children instead.

Run as ``python -m pyramid_powerhose.supervisor CONFIG.json``; the file is
written by :mod:`pyramid_powerhose.circusd` from :mod:`pyramid_powerhose.watchers`.
"""

import json
import logging
import os
import selectors
import shutil
import socket
import sys
import threading
import time

import psutil
from circus import logger as circus_logger
from circus.arbiter import Arbiter
from circus.exc import ConflictError
from circus.util import configure_logger
from circus.watcher import Watcher


def load_arbiter(config):
    watchers = [Watcher.load_from_config(dict(watcher)) for watcher in config["watchers"]]
    # No multicast discovery (circus would bind udp 0.0.0.0:12027) and no
    # statistics process: a cluster only needs its control endpoint.
    return Arbiter(watchers, config["endpoint"], config["pubsub_endpoint"],
                   check_delay=config["check_delay"], multicast_endpoint=None,
                   statsd=False, proc_name="powerhose-circus")


def tolerate_busy_arbiter(arbiter):
    """Skip a periodic check that finds circus busy, instead of logging a traceback.

    Circus runs its check every ``check_delay`` even while an exclusive
    command (stopping the broker, circusctl decr) runs; the next check,
    after the command, does the work.
    """
    check = arbiter.manage_watchers

    def manage_watchers():
        try:
            return check()
        except ConflictError:
            return None

    arbiter.manage_watchers = manage_watchers  # read by the controller when it starts


class Users:
    """The processes sharing the cluster besides its owner, one connection each.

    A process connects to the unix socket and sends ``A`` to be counted for
    as long as the connection stays open (the kernel closes it when the
    process dies, however it dies), or ``?`` to be told the count.
    """

    def __init__(self, path):
        self.path = path
        self.count = 0
        self._changed = threading.Condition()
        self._listener = None
        if path is None:
            return
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                os.unlink(path)  # left by a cluster that was killed
            except FileNotFoundError:
                pass
            listener.bind(path)
            os.chmod(path, 0o600)
            listener.listen(64)
        except OSError as exc:
            listener.close()
            circus_logger.warning("cannot listen on %s (%s): no other process can share "
                                  "this cluster", path, exc)
            return
        self._listener = listener
        threading.Thread(target=self._serve, name="powerhose-users", daemon=True).start()

    def wait_until_none(self):
        """Block while any process shares the cluster."""
        with self._changed:
            while self.count:
                self._changed.wait()

    def close(self):
        if self._listener is not None:
            self._listener.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _serve(self):
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is self._listener:
                    self._accept(selector)
                    continue
                try:
                    gone = not key.fileobj.recv(64)
                except OSError:
                    gone = True
                if gone:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
                    self._add(-1)

    def _accept(self, selector):
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        conn.settimeout(2.0)
        try:
            request = conn.recv(1)
            if request == b"A":
                conn.setblocking(True)
                selector.register(conn, selectors.EVENT_READ)
                self._add(1)
                return
            if request == b"?":
                conn.sendall(str(self.count).encode())
        except OSError:
            pass
        conn.close()

    def _add(self, delta):
        with self._changed:
            self.count += delta
            self._changed.notify_all()
        circus_logger.info("%d other processes share this cluster", self.count)


def watch_owner(arbiter, grace, run_dir, owner_gone, users):
    """Block until the owner closes our stdin and no other user is left, then stop everything."""
    while True:
        try:
            if not os.read(0, 4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    if users.count:
        circus_logger.warning("the process that started this cluster is gone; %d other "
                              "processes share it: running until the last one goes",
                              users.count)
        users.wait_until_none()
    users.close()
    owner_gone.set()
    circus_logger.warning("the process that owns this cluster is gone; stopping")
    arbiter.loop.add_callback(arbiter.stop)
    time.sleep(grace)
    circus_logger.error("watchers still running %.0fs after their owner left; killing them",
                        grace)
    kill_children()
    shutil.rmtree(run_dir, ignore_errors=True)
    logging.shutdown()
    os._exit(1)


def kill_children():
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        config = json.load(f)
    configure_logger(circus_logger, config["loglevel"], "-")
    arbiter = load_arbiter(config)
    tolerate_busy_arbiter(arbiter)
    owner_gone = threading.Event()
    users = Users(config.get("users_socket"))
    threading.Thread(target=watch_owner, name="powerhose-owner",
                     args=(arbiter, config["owner_grace"], config["run_dir"], owner_gone,
                           users),
                     daemon=True).start()
    try:
        arbiter.start()
    except BaseException:
        # As circusd does: never leave watchers behind on an unexpected error.
        arbiter.loop.run_sync(arbiter._emergency_stop)
        raise
    finally:
        users.close()
        kill_children()
        if owner_gone.is_set():
            shutil.rmtree(config["run_dir"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
