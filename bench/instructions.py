#!/usr/bin/env python
"""Instructions per job in each process of a round trip, counted by callgrind.

On a shared virtual machine a timing moves by 2x from one minute to the
next; an instruction count does not.  This script runs one process at a
time under ``valgrind --tool=callgrind`` (the others run natively), warms
it up, zeroes its counters (``callgrind_control -z``), runs the jobs, dumps
the counters (``callgrind_control -d``) and divides.  Every thread of the
process is counted, libzmq's I/O thread included, but only user space:
valgrind does not see the kernel, where most of a round trip's CPU goes
(system calls and thread wake-ups; see README.rst, "Performance").  So this
shows what our code adds over the same work without it, not the whole cost.

Each of our processes is counted next to a floor doing the same socket
work with no logic:

client
    ``Client.execute``; floor: a DEALER socket sending the same request
    frames and receiving the reply through ``multipart``.
broker
    ``powerhose-broker``; floor:
    ``zmq.proxy`` (C) relaying REQ/REP traffic, (c) of ``overhead.py``,
    which moves fewer frames per job (12 against our 32).
worker
    ``powerhose-worker tests.targets:echo``; floor: a loop answering each
    REQUEST with a REPLY of the same frames, without parsing, a ``Job`` or
    bookkeeping.

``--path direct`` (the default) counts the client and the worker on direct
jobs only (it waits for the lease and fails if a counted job was relayed);
the floors stay the relayed frames, a little more socket work than a
direct job's.  ``--path relayed`` sends everything through the broker.

    python bench/instructions.py              # client and worker, direct path, 2000 jobs each
    python bench/instructions.py --only client,broker,worker --path relayed
    python bench/instructions.py --jobs 300   # quicker, less exact (see below)
    python bench/instructions.py --only worker --jobs 20   # a smoke run, about a minute

Work not per job (a process's heartbeats and timers, valgrind's own
zeroing and dumping) is counted too, spread over the jobs: with fewer
jobs it weighs more (with 100 jobs the client and the worker counted 65k
where 2000 gave 48k and 56k).  Needs valgrind (``apt-get install
valgrind``).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import time

import zmq

import harness
from harness import PAYLOAD, SERVE, Processes, console_script, wait_until

from pyramid_powerhose import Client, multipart, protocol
from pyramid_powerhose.bench import describe_machine, table
from pyramid_powerhose.protocol import Request

SERVICE = "default"


# -- the processes under test, this script re-run with "_run" --------------------


def floor_worker(backend):
    """A worker with no logic: READY, then each REQUEST answered with its data."""
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(backend)
    multipart.send(sock, protocol.worker_ready(SERVICE.encode()))
    while True:
        frames = multipart.recv_within(sock, 1000)
        if frames is None:
            multipart.send(sock, protocol.worker_command(protocol.HEARTBEAT))
        elif frames[2] == protocol.REQUEST:
            multipart.send(sock, [b"", protocol.MDP_WORKER, protocol.REPLY, frames[3], b"",
                                  frames[5], protocol.STATUS_OK, frames[7]])
        elif frames[2] == protocol.HEARTBEAT:
            multipart.send(sock, protocol.worker_command(protocol.HEARTBEAT))


def client_loop(kind, frontend, path="direct"):
    """Runs jobs when told on stdin ("N"), answers "done" on stdout."""
    if kind == "client":
        client = Client(frontend=frontend, timeout=60, direct=path == "direct")
        call = lambda: client.execute(PAYLOAD)  # noqa: E731
    else:  # the floor: the same frames, no Client
        sock = zmq.Context().socket(zmq.DEALER)
        sock.connect(frontend)
        frames = protocol.client_request(Request(SERVICE.encode(), b"1", PAYLOAD, 60000))

        def call():
            multipart.send(sock, frames)
            return multipart.recv_within(sock, 60000)[-1]
    print("ready", flush=True)
    for line in sys.stdin:
        for _ in range(int(line)):
            if call() != PAYLOAD:
                raise RuntimeError("wrong echo")
        print("done", flush=True)


# -- counting -------------------------------------------------------------------


def python_script(name, module):
    """A console script as ``python <script>``, so that valgrind runs the interpreter."""
    command = console_script(name, module)
    return [sys.executable, *command] if len(command) == 1 else command


def count(pid, out_file, run_jobs, jobs):
    """Instructions per job of process ``pid`` while ``run_jobs(jobs)`` runs."""
    run_jobs(max(100, jobs // 10))  # warm-up: connections, caches, lazy imports
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    run_jobs(jobs)
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    dumps = sorted(glob.glob(f"{out_file}.*"), key=os.path.getmtime)
    with open(dumps[-1]) as dump:
        totals = re.search(r"^totals:\s*(\d+)", dump.read(), re.M)
    return int(totals.group(1)) / jobs


def client_runner(client):
    def run_jobs(n):
        for _ in range(n):
            if client.execute(PAYLOAD) != PAYLOAD:
                raise RuntimeError("wrong echo")
    return run_jobs


def setup_relay(procs, run_dir, valgrind):
    """zmq.proxy under valgrind with a REP echo behind it; driven by a REQ here."""
    front, back = f"ipc://{run_dir}/proxy-f.sock", f"ipc://{run_dir}/proxy-b.sock"
    relay = procs.start("proxy", valgrind + SERVE + ["proxy", front, back])
    procs.start("proxy-rep", SERVE + ["echo-connect", back])
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.linger = 0
    sock.connect(front)

    def run_jobs(n):
        for _ in range(n):
            sock.send(PAYLOAD)
            while not sock.poll(1000):
                procs.check()
            if sock.recv() != PAYLOAD:
                raise RuntimeError("wrong echo")
    return relay.pid, run_jobs


def direct_only(probe, run_jobs, procs):
    """``run_jobs`` once ``probe`` holds a lease on the worker, checking that
    every job went direct: the count is the direct path's alone.  (Under
    valgrind a GRANT may come after the client gave up waiting for it and
    sent a job through the broker.)"""
    def direct_jobs():
        workers = probe.stats(timeout=10)["workers"]
        return sum(worker.get("direct_jobs", 0) for worker in workers)

    def leased():
        run_jobs(20)
        return probe.stats(timeout=10)["services"][SERVICE].get("leased")
    wait_until(leased, procs, "a lease on the worker", timeout=180)

    def run_direct(n):
        time.sleep(1.5)  # the worker tells what it ran once idle (FREE)
        before = direct_jobs()
        run_jobs(n)
        time.sleep(1.5)
        went = direct_jobs() - before
        if went != n:
            raise RuntimeError(f"{n - went} of {n} jobs did not go direct")
    return run_direct


def setup_cluster(variant, procs, run_dir, valgrind, direct=True):
    """A broker and one worker, one of the three processes under valgrind;
    ``direct``: the client and the worker on the direct path (the worker
    run counts only direct jobs), else everything through the broker."""
    front, back = f"ipc://{run_dir}/{variant}-f.sock", f"ipc://{run_dir}/{variant}-b.sock"
    me = [sys.executable, os.path.abspath(__file__), "_run"]
    broker = procs.start(f"{variant}-broker", (valgrind if variant == "broker" else []) +
                         python_script("powerhose-broker", "pyramid_powerhose.cli.broker") +
                         ["--frontend", front, "--backend", back])
    if variant == "floor-worker":
        worker = procs.start(variant, valgrind + me + ["floor-worker", back])
    else:
        worker = procs.start(f"{variant}-worker", (valgrind if variant == "worker" else []) +
                             python_script("powerhose-worker", "pyramid_powerhose.cli.worker") +
                             ["tests.targets:echo", "--backend", back] +
                             ([] if direct else ["--no-direct"]))
    probe = Client(frontend=front, timeout=60, direct=direct)
    # A process under valgrind starts slowly: it may not answer for a while.
    wait_until(lambda: harness.registered(probe, 1, SERVICE), procs,
               f"the {variant} run's worker", timeout=180)
    if variant not in ("client", "floor-client"):
        run_jobs = client_runner(probe)
        if direct and variant == "worker":
            run_jobs = direct_only(probe, run_jobs, procs)
        return (broker if variant == "broker" else worker).pid, run_jobs
    loop = procs.start(variant, valgrind + me + [variant, front,
                                                 "direct" if direct else "relayed"],
                       pipes=True)

    def run_jobs(n):
        loop.stdin.write(b"%d\n" % n)
        loop.stdin.flush()
        if loop.stdout.readline().strip() != b"done":
            procs.check()
            raise RuntimeError(f"{variant} stopped")
    if loop.stdout.readline().strip() != b"ready":
        procs.check()
        raise RuntimeError(f"{variant} did not start")
    if direct and variant == "client":
        run_jobs = direct_only(probe, run_jobs, procs)
    return loop.pid, run_jobs


def measure(variant, run_dir, jobs, keep=None, direct=True):
    """Instructions per job of one variant, in processes of its own; the
    counters' dumps are left in ``keep`` if given (for callgrind_annotate)."""
    procs = Processes(run_dir)
    if keep:
        os.makedirs(keep, exist_ok=True)
    out_file = os.path.join(keep or run_dir, f"{variant}.callgrind")
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}"]
    try:
        if variant == "proxy":
            pid, run_jobs = setup_relay(procs, run_dir, valgrind)
        else:
            pid, run_jobs = setup_cluster(variant, procs, run_dir, valgrind, direct)
        return count(pid, out_file, run_jobs, jobs)
    finally:
        procs.close()


COMPARISONS = [  # (ours, its floor, what the floor is)
    ("client", "floor-client", "a DEALER, the same frames"),
    ("broker", "proxy", "zmq.proxy relaying REQ/REP"),
    ("worker", "floor-worker", "a loop echoing the frames"),
]


def main(argv=None):
    if len(sys.argv) > 2 and sys.argv[1] == "_run":
        kind, *endpoints = sys.argv[2:]
        if kind == "floor-worker":
            return floor_worker(*endpoints)
        return client_loop(kind, *endpoints)
    parser = argparse.ArgumentParser(description="Instructions per job, per process (callgrind).")
    parser.add_argument("--jobs", type=int, default=2000,
                        help="jobs counted per process (default %(default)s)")
    names = [ours for ours, _, _ in COMPARISONS]
    parser.add_argument("--only", default="client,worker", metavar="A,B",
                        help="the processes to count, each next to its floor, among "
                        f"{','.join(names)} (default: %(default)s)")
    parser.add_argument("--path", choices=("direct", "relayed"), default="direct",
                        help="the client's and the worker's jobs on the direct path "
                        "(the default; only direct jobs are counted) or all through "
                        "the broker (the broker's count needs this)")
    parser.add_argument("--keep", metavar="DIR",
                        help="leave callgrind's dumps in DIR, to read with callgrind_annotate")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    if not only or set(only) - set(names):
        parser.error(f"--only: choose among {', '.join(names)}")
    if "broker" in only and args.path == "direct":
        parser.error("--only broker needs --path relayed: direct jobs do not pass the broker")
    if args.jobs < 1:
        parser.error("--jobs must be positive")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")

    rows = []
    with harness.private_dir("ph-") as run_dir:
        for ours, floor, what in COMPARISONS:
            if ours not in only:
                continue
            counts = []
            for variant in (ours, floor):
                counts.append(measure(variant, run_dir, args.jobs, args.keep,
                                      args.path == "direct"))
                harness.say(f"{variant}: {counts[-1]:.0f} instructions per job")
            rows.append([ours, f"{counts[0] / 1000:.1f}k", f"{counts[1] / 1000:.1f}k",
                         f"{counts[0] / counts[1]:.2f}", what])
    print(describe_machine())
    print(f"\n{len(PAYLOAD)}-byte echo, {args.path} path, {args.jobs} jobs counted per process, "
          "user-space instructions of all its threads (callgrind)\n")
    print(table(["process", "ours", "floor", "ours/floor", "the floor"], rows))
    return 0


if __name__ == "__main__":
    harness.run_script(main)
