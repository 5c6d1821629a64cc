#!/usr/bin/env python
"""What does CURVE cost?  The same broker over tcp on loopback, with and without it.

Two clusters side by side: a broker and 2 echo workers on tcp 127.0.0.1
ports, one plain, one with CURVE on every connection (``powerhose keys``'
pairs, the broker's ``--curve-secret`` and ``--curve-allow``, the client's
and workers' ``--curve-secret`` and ``--curve-broker``).  Round trips of a
100-byte echo from one client thread, and jobs/s from 8, the two taking
turns within every round (:func:`harness.run_rounds`); medians over
rounds, and the cost of encryption per job.

    python bench/curve.py             # 7 rounds, about a minute
    python bench/curve.py --quick     # smoke run
"""

from __future__ import annotations

import os
import socket
import subprocess

import harness

from pyramid_powerhose import Client

WORKERS = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_keys(run_dir):
    """Pairs for the broker, the client and the workers; the allow-list holds
    the client's and the workers' public keys."""
    keys, allowed = os.path.join(run_dir, "keys"), os.path.join(run_dir, "allowed")
    subprocess.run(harness.console_script("powerhose", "pyramid_powerhose.cli.cluster") + [
        "keys", keys, "broker", "client", "worker"], check=True, stdout=subprocess.DEVNULL)
    os.mkdir(allowed)
    for name in ("client", "worker"):
        os.link(os.path.join(keys, f"{name}.key"), os.path.join(allowed, f"{name}.key"))
    return keys, allowed


def start(procs, name, secure, run_dir):
    """A cluster on two fresh loopback ports; returns its Client once ready."""
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    broker_args, worker_args, client_keys = [], [], {}
    if secure:
        keys, allowed = make_keys(run_dir)
        broker_args = ["--curve-secret", os.path.join(keys, "broker.key_secret"),
                       "--curve-allow", allowed]
        worker_args = ["--curve-secret", os.path.join(keys, "worker.key_secret"),
                       "--curve-broker", os.path.join(keys, "broker.key")]
        client_keys = {"curve_secret": os.path.join(keys, "client.key_secret"),
                       "curve_broker": os.path.join(keys, "broker.key")}
    broker = harness.console_script("powerhose-broker", "pyramid_powerhose.cli.broker")
    procs.start(f"{name}-broker", broker + ["--frontend", frontend, "--backend", backend,
                                            *broker_args])
    for i in range(WORKERS):
        procs.start(f"{name}-worker-{i}", harness.console_script(
            "powerhose-worker", "pyramid_powerhose.cli.worker") + [
            harness.ECHO_TARGET, "--backend", backend, *worker_args])
    client = Client(frontend=frontend, timeout=60.0, **client_keys)
    harness.wait_until(lambda: client.ping(timeout=0.5), procs, f"{name}'s broker")
    harness.wait_until(lambda: harness.registered(client, WORKERS), procs,
                       f"{name}'s workers")
    return client


def main(argv=None):
    args = harness.pair_args(__doc__.split("\n\n")[0], argv)
    with harness.private_dir("ph-curve-") as run_dir:
        procs = harness.Processes(run_dir)
        try:
            clients = {}
            for name, secure in (("plain", False), ("curve", True)):
                os.makedirs(os.path.join(run_dir, name))
                clients[name] = start(procs, name, secure, os.path.join(run_dir, name))
            lat, tput = harness.run_pair(clients, args)
            procs.check()
        finally:
            procs.close()
        print(harness.pair_report(lat, tput, args, f"tcp on 127.0.0.1, {WORKERS} echo workers",
                                  "", "plain", "curve"))
        return 0


if __name__ == "__main__":
    harness.run_script(main)
