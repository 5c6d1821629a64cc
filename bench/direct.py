#!/usr/bin/env python
"""A direct path on one host: could a lease reach the 1-hop floor?

Raw pyzmq prototypes of the design in PROTOCOL.rst ("Design: a direct
path on one host"), side by side in one run with today's path, the two
libzmq floors and the two process pools a user would pick instead:

(i)   powerhose: ``Client.execute`` -> ``powerhose-broker`` ->
      ``powerhose-worker`` (2 echo workers), the real thing as a user runs
      it: on ipc, the direct path (PROTOCOL.rst, "The direct path");
(i-b) powerhose, relayed: the same with ``--no-direct`` workers, every job
      through the broker (the path before the direct one, and the path of
      tcp, plain MDP peers and several brokers);
(ii)  relay: ``zmq.proxy`` (ROUTER to DEALER, libzmq's C loop) in its own
      process, 2 REP echo workers behind it: 4 messages, no Python;
(iii) 1-hop: a DEALER straight to a ROUTER echo process: 2 messages, the
      floor for running anything in another process over libzmq, both
      ends sending and reading with ``pyramid_powerhose.multipart`` (one
      compiled call per message), as the prototypes below do;
(iii-b) the same hop as ``overhead.py``'s (b): pyzmq REQ/REP, one frame,
      pyzmq's own send and recv (the 1-hop figure issue 19 quotes);
(iv)  lease, DONE per job.  A stand-in broker (a Python loop, ROUTER on
      both sides) grants this process a lease on each of 2 workers (credit
      2 each, as ``powerhose-worker --prefetch``); a job goes from the
      calling thread's DEALER straight to the worker's ROUTER, bound on ipc
      in the run's private dir; the worker polls that socket and its DEALER
      to the broker, checks the lease's epoch, answers straight back, and
      *then*, off the critical path, tells the broker ``DONE`` (job id, run
      time, outcome), which the broker notes as the real one would (the
      worker idle again, a histogram, the outcome).  Threads of this process
      share the leases under a lock and a condition: the least loaded lease,
      then the least recently used;
(iv-b) lease, FREE when idle (the design's choice): the same, but the
      worker tells the broker ``FREE`` (with its counts) only once it has
      been idle for 1 ms after a job: under load, no message to the broker
      per job; when the load stops, the broker knows within a millisecond;
(iv-c) lease, counts per beat: the same, the counts sent every 100 ms with
      the heartbeat, nothing else;
(iv-d) lease, one socket: (iv-b) with the worker on one ROUTER socket,
      bound for clients and connected to the broker's backend (the broker
      sees the frames a DEALER would send), waiting in one blocking receive
      (its timeout after a job, 2 ms, is how it notices it is idle): no
      poll in the worker's loop;
(iv-e) lease, one socket, packed: (iv-d) with the direct frames packed,
      ``["", epoch:job_id, data]`` and ``["", epoch:job_id, status, result]``
      (3 and 4 frames instead of 6 and 5), and a leaner client call;
(iv-f) lease, compiled: (iv-e)'s client call and worker loop, the same work
      compiled by Cython (``bench/lease_fast.pyx``, built at run time into
      the run's private dir against pyzmq's .pxd files, as the package's
      ``multipart``, whose compiled calls it uses): does compiling the
      Python each end runs per job bring the lease within 1.25x the floor?
(v)   ``ProcessPoolExecutor(2)``: ``submit().result()``;
(vi)  ``multiprocessing.Pool(2)``: ``apply()``.

Measured: the round trip of a 100-byte echo from one thread (the variants
taking turns every 50 round trips, the order rotating each round; with
``--gap MS``, one job at a time instead, each after MS of quiet, the
variants taking turns job by job, as a web app at low load sends jobs:
then nothing else is measured), jobs/s
from 8 threads, and (unless ``--no-break-even``) the break-even of
``floor.py``: 4 threads, 2 workers at the cluster's ``nice``, the
built-in GIL-holding job, speed-up over in-process, for powerhose, the
1-hop floor (``floor.py``'s *direct*: a REQ per thread to 2 REP workers)
and the leases (iv), (iv-b), (iv-e) and (iv-f).  Medians over rounds, [range of
the rounds].  Not prototyped: revocation, monitors, deadlines, headers,
typed errors.  On a shared machine the break-even moves a lot between
runs: only figures of one run compare.

    python bench/direct.py             # 15 rounds, break-even at 5 sizes x 3 rounds: 3-5 minutes
    python bench/direct.py --quick     # smoke run, about 15 seconds
    python bench/direct.py --no-break-even --rounds 25
    python bench/direct.py --no-break-even --only lease-lean lease-fast powerhose
    python bench/direct.py --gap 5     # one job at a time, 5 ms apart: 1-2 minutes

``--only`` names the paths to run (the 1-hop floor always runs); (iv-f)
needs Cython and a C compiler, as the package's compiled modules do.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import concurrent.futures
import functools
import multiprocessing
import os
import signal
import statistics
import sys
import threading
import time

import zmq

import harness
from harness import PAYLOAD, SERVE, THREADS, Load, Processes, in_process

from pyramid_powerhose import Client, multipart
from pyramid_powerhose.bench import (BUILTIN_TARGET, describe_machine, jobs_for,
                                     rounds_per_ms, table)
from pyramid_powerhose.cluster import get_cluster
from pyramid_powerhose.settings import Settings

ME = [sys.executable, os.path.abspath(__file__), "serve"]
WORKERS = 2
BE_THREADS = 4  # the break-even's calling threads, as floor.py's
SIZES_MS = (0.05, 0.1, 0.2, 0.3, 0.5)
LEASES = {"lease": "job", "lease-lazy": "lazy", "lease-beat": "beat", "lease-one": "one",
          "lease-lean": "lean", "lease-fast": "fast"}  # name: worker's mode
BE_LEASES = ("lease", "lease-lazy", "lease-lean", "lease-fast")  # in the break-even
TARGETS = {"round trip / 1-hop": 1.25, "break-even / 1-hop": 1.3}  # from issue 19

# Frames of the prototype.  Direct: client -> worker ["", PHD, job_id, ttl, epoch, data],
# worker -> client ["", PHD, job_id, "OK", result] or ["", PHD, job_id, "NOT_RUN"].
# Worker -> broker: READY ["", MDPW, 0x01, service, "powerhose/1", "1", direct endpoint],
# DONE ["", MDPW, 0x09, job_id, run_us, outcome], STATS ["", MDPW, 0x0a, jobs, run_us],
# FREE ["", MDPW, 0x0c, jobs, run_us],
# HEARTBEAT ["", MDPW, 0x04].  Client -> broker: LEASE ["", PHL, service, count];
# broker -> client ["", PHL, service, endpoint, epoch, endpoint, epoch, ...];
# broker -> worker LEASED ["", MDPW, 0x0b, client, epoch].
PHD, PHL, MDPW = b"PHD01", b"PHL01", b"MDPW01"
READY, HEARTBEAT, DONE, STATS, LEASED, FREE = (b"\x01", b"\x04", b"\x09", b"\x0a", b"\x0b",
                                               b"\x0c")
BROKER_ID = b"broker"  # the broker's routing id on a one-socket worker's ROUTER
CREDIT = 2  # jobs a worker accepts at once, as powerhose-worker's --prefetch
IDLE_MS = 1  # lazy: a worker idle this long after a job tells the broker FREE
OK, NOT_RUN = b"OK", b"NOT_RUN"
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def echo(data):
    return data


# -- the children: 1-hop echo, the lease broker and its workers ----------------------------

def serve(kind, *args):
    """Run in a child until killed."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    context = zmq.Context()
    if kind == "router-echo":  # the 1-hop floor
        sock = context.socket(zmq.ROUTER)
        sock.bind(args[0])
        send, recv = multipart.send, multipart.recv  # as the lease's worker sends and reads
        while True:
            send(sock, recv(sock))
    if kind == "lease-broker":
        lease_broker(context, *args)
    if kind == "lease-worker":
        if args[3] == "fast":
            lease_worker_fast(context, *args[:3], build_dir=args[4])
        if args[3] in ("one", "lean"):
            lease_worker_one(context, *args[:3], lean=args[3] == "lean")
        lease_worker(context, *args)
    raise SystemExit(f"unknown kind {kind}")


def lease_broker(context, frontend, backend):
    """The broker's side of the lease, as a Python loop: it registers workers
    with their direct endpoints, grants leases, and notes every DONE (the worker
    idle again, a histogram of run times, the outcome) or STATS."""
    front, back = context.socket(zmq.ROUTER), context.socket(zmq.ROUTER)
    front.bind(frontend)
    back.bind(backend)
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    workers = collections.OrderedDict()  # address: [endpoint, holder, epoch, idle, jobs]
    histogram = [0] * (len(BUCKETS) + 1)
    outcomes = collections.Counter()
    epochs = iter(range(1, 1 << 62))
    next_beat = time.monotonic() + 1.0
    while True:
        for sock, _ in poller.poll(1000):
            frames = multipart.recv(sock)
            if sock is back:
                address, command = frames[0], frames[3]
                if command == DONE:  # per job, off the critical path
                    worker = workers[address]
                    worker[3] = True  # idle again: could be dispatched or revoked now
                    worker[4] += 1
                    histogram[bisect.bisect_left(BUCKETS, int(frames[5]) / 1e6)] += 1
                    outcomes[frames[6]] += 1
                elif command == STATS or command == FREE:  # counts since the last one
                    worker = workers[address]
                    worker[3] = command == FREE
                    worker[4] += int(frames[4])
                elif command == READY:
                    workers[address] = [frames[7], None, 0, True, 0]
            else:  # a LEASE request: every worker of the service, to this client
                address, count = frames[0], int(frames[4])
                grant = [address, b"", PHL, frames[3]]
                for worker_address, worker in list(workers.items())[:count]:
                    worker[1], worker[2] = address, next(epochs)
                    multipart.send(back, [worker_address, b"", MDPW, LEASED, address,
                                          b"%d" % worker[2]])
                    grant += [worker[0], b"%d" % worker[2]]
                multipart.send(front, grant)
        now = time.monotonic()
        if now >= next_beat:
            next_beat = now + 1.0
            for worker_address in workers:
                multipart.send(back, [worker_address, b"", MDPW, HEARTBEAT])


def lease_worker(context, job, direct, backend, mode):
    """A worker with a direct ROUTER (bound, ipc, private dir) and a DEALER to the
    broker; runs a direct job only under a current lease.  What it tells the
    broker depends on ``mode``: ``job``, DONE after each reply; ``lazy``, FREE
    (with its counts) once it has been idle for IDLE_MS after a job; ``beat``,
    its counts with each heartbeat (every 100 ms)."""
    if job == "jobs":
        os.nice(Settings().nice)
    run = in_process if job == "jobs" else echo
    mine = context.socket(zmq.ROUTER)
    mine.bind(direct)
    broker = context.socket(zmq.DEALER)
    broker.connect(backend)
    multipart.send(broker, [b"", MDPW, READY, b"default", b"powerhose/1", b"%d" % CREDIT,
                            direct.encode()])
    poller = zmq.Poller()
    poller.register(mine, zmq.POLLIN)
    poller.register(broker, zmq.POLLIN)
    epoch = None
    jobs = run_ns = 0
    owed = False  # lazy: jobs done since the last FREE
    beat = 0.1 if mode == "beat" else 1.0
    next_beat = time.monotonic() + beat
    clock = time.perf_counter_ns
    while True:
        ready = poller.poll(IDLE_MS if owed else int(beat * 1000))
        if owed and not ready:  # idle for IDLE_MS: the broker hears it once
            multipart.send(broker, [b"", MDPW, FREE, b"%d" % jobs, b"%d" % (run_ns // 1000)])
            jobs = run_ns = 0
            owed = False
        for sock, _ in ready:
            if sock is mine:
                frames = multipart.recv(mine)
                if frames[5] != epoch:  # no lease, or an old one: the job never ran
                    multipart.send(mine, [frames[0], b"", PHD, frames[3], NOT_RUN])
                    continue
                started = clock()
                result = run(frames[6])
                took = clock() - started
                multipart.send(mine, [frames[0], b"", PHD, frames[3], OK, result])
                if mode == "job":
                    multipart.send(broker, [b"", MDPW, DONE, frames[3], b"%d" % (took // 1000),
                                            OK])
                else:
                    jobs += 1
                    run_ns += took
                    owed = mode == "lazy"
            else:
                frames = multipart.recv(broker)
                if frames[2] == LEASED:
                    epoch = frames[4]
        now = time.monotonic()
        if now >= next_beat:
            next_beat = now + beat
            if jobs and mode == "beat":
                multipart.send(broker, [b"", MDPW, STATS, b"%d" % jobs, b"%d" % (run_ns // 1000)])
                jobs = run_ns = 0
            else:
                multipart.send(broker, [b"", MDPW, HEARTBEAT])


def one_socket(context, job, direct, backend):
    """A one-socket worker's ROUTER, registered with the broker; and its job."""
    if job == "jobs":
        os.nice(Settings().nice)
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTING_ID, b"w" + os.urandom(8))
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.CONNECT_ROUTING_ID, BROKER_ID)
    sock.connect(backend)
    sock.bind(direct)
    ready = [BROKER_ID, b"", MDPW, READY, b"default", b"powerhose/1", b"%d" % CREDIT,
             direct.encode()]
    while True:  # a ROUTER cannot send before the connection is up
        try:
            multipart.send(sock, ready)
            break
        except zmq.ZMQError:
            time.sleep(0.01)
    return sock, in_process if job == "jobs" else echo


def lease_worker_fast(context, job, direct, backend, build_dir):
    """``lease_worker_one``'s lean loop, compiled (bench/lease_fast.pyx)."""
    fast = load_fast(build_dir)
    sock, run = one_socket(context, job, direct, backend)
    fast.serve(sock, run, BROKER_ID, LEASED, [BROKER_ID, b"", MDPW, FREE], OK, NOT_RUN,
               [BROKER_ID, b"", MDPW, HEARTBEAT], IDLE_MS)


def lease_worker_one(context, job, direct, backend, lean=False):
    """``lease_worker`` in ``lazy`` mode with one socket instead of two: a ROUTER
    bound on the direct endpoint for clients *and* connected to the broker's
    backend (ZMQ_CONNECT_ROUTING_ID names the broker ``broker`` on it).  The
    broker sees the same frames as from a DEALER; the worker waits on one
    socket, with no poller.  ``lean``: the direct frames are packed, request
    ["", epoch:job_id, data], reply ["", epoch:job_id, "OK", result]."""
    sock, run = one_socket(context, job, direct, backend)
    send, recv_within = multipart.send, multipart.recv_within
    epoch = prefix = None
    jobs = run_ns = 0
    owed = False
    next_beat = time.monotonic() + 1.0
    clock = time.perf_counter_ns
    while True:
        # One blocking receive, as the 1-hop floor's; after a job, with a timeout
        # of IDLE_MS + 1: libzmq times RCVTIMEO with a coarse millisecond clock, so
        # a timeout of n ms ends after n - 1 to n ms.  No poll on the critical path.
        frames = recv_within(sock, IDLE_MS + 1 if owed else 1000)
        if frames is None:
            if owed:  # idle for about IDLE_MS after a job: the broker hears it once
                send(sock, [BROKER_ID, b"", MDPW, FREE, b"%d" % jobs, b"%d" % (run_ns // 1000)])
                jobs = run_ns = 0
                owed = False
        elif frames[0] == BROKER_ID:
            if frames[3] == LEASED:
                epoch = frames[5]
                prefix = epoch + b":"
        elif lean:
            if not frames[2].startswith(prefix):
                send(sock, [frames[0], b"", frames[2], NOT_RUN])
                continue
            started = clock()
            result = run(frames[3])
            took = clock() - started
            send(sock, [frames[0], b"", frames[2], OK, result])
            jobs += 1
            run_ns += took
            owed = True
        elif frames[5] != epoch:
            send(sock, [frames[0], b"", PHD, frames[3], NOT_RUN])
        else:
            started = clock()
            result = run(frames[6])
            took = clock() - started
            send(sock, [frames[0], b"", PHD, frames[3], OK, result])
            jobs += 1
            run_ns += took
            owed = True
        now = time.monotonic()
        if now >= next_beat:
            next_beat = now + 1.0
            send(sock, [BROKER_ID, b"", MDPW, HEARTBEAT])


def build_fast(run_dir):
    """Compile bench/lease_fast.pyx into ``run_dir``, as setup.py compiles the
    package's modules (pyzmq's .pxd files, no -lzmq); the directory it is in."""
    try:
        from Cython.Build import cythonize
        from setuptools import Distribution, Extension
    except ImportError as exc:
        raise SystemExit(f"(iv-f) needs Cython and setuptools ({exc}); "
                         "leave it out with --only") from None
    build = os.path.join(run_dir, "lease-fast")
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lease_fast.pyx")
    extension = Extension("lease_fast", [source], include_dirs=zmq.get_includes(),
                          extra_compile_args=["-O2"])
    harness.say("compiling bench/lease_fast.pyx")
    dist = Distribution({"ext_modules": cythonize(
        [extension], build_dir=build, include_path=[harness.REPO], quiet=True,
        compiler_directives={"language_level": "3"})})
    command = dist.get_command_obj("build_ext")
    command.build_lib, command.build_temp = build, os.path.join(build, "tmp")
    dist.run_command("build_ext")
    load_fast(build)
    return build


def load_fast(build_dir):
    """The compiled module, once it is shown to call the libzmq pyzmq uses."""
    if build_dir not in sys.path:
        sys.path.insert(0, build_dir)
    try:
        import lease_fast
    except ImportError as exc:  # e.g. multipart running as Python: no _receive to cimport
        raise SystemExit(f"(iv-f): the compiled module does not load: {exc}") from None
    if not lease_fast.usable():
        raise SystemExit("(iv-f): the compiled module's libzmq calls do not reach pyzmq's "
                         f"libzmq (multipart compiled: {multipart.COMPILED})")
    return lease_fast


def start_lease(procs, run_dir, name, job="echo", mode="job", build_dir=None):
    """A lease broker and WORKERS lease workers; returns the broker's frontend."""
    front, back = f"ipc://{run_dir}/{name}-f.sock", f"ipc://{run_dir}/{name}-b.sock"
    procs.start(f"{name}-broker", ME + ["lease-broker", front, back])
    for i in range(WORKERS):
        procs.start(f"{name}-worker-{i}", ME + [
            "lease-worker", job, f"ipc://{run_dir}/{name}-w{i}.sock", back, mode,
            *([build_dir] if build_dir else [])])
    return front


class LeaseClient:
    """The client's side: leases asked for once, shared by this process's threads.

    A calling thread takes the least recently used free lease (waiting on a
    condition while none is free), sends the job on its own DEALER to that
    worker, waits for the reply in slices of 200 ms as the real client does,
    and gives the lease back.
    """

    def __init__(self, context, frontend, procs):
        self.context = context
        control = context.socket(zmq.DEALER)
        control.linger = 0
        control.connect(frontend)
        deadline = time.monotonic() + 20
        grant = []
        while len(grant) < 3 + 2 * WORKERS:  # until every worker has registered
            if time.monotonic() > deadline:
                raise RuntimeError("no lease granted within 20 s")
            multipart.send(control, [b"", PHL, b"default", b"%d" % WORKERS])
            while not control.poll(100):
                procs.check()
            grant = multipart.recv(control)
            time.sleep(0.05)
        control.close()
        time.sleep(0.2)  # the prototype's shortcut: LEASED reaches the workers first
        # [jobs in flight, last used, endpoint, epoch]: the least loaded, then the LRU
        self.leases = [[0, 0, endpoint, epoch] for endpoint, epoch in zip(grant[3::2], grant[4::2])]
        self.turn = iter(range(1, 1 << 62))
        self.waiting = 0  # threads waiting for room on a lease
        self.cond = threading.Condition(threading.Lock())
        self.local = threading.local()
        self.sockets = []
        self.ids = iter(range(1, 1 << 62))

    def _socket(self, endpoint):
        socks = getattr(self.local, "socks", None)
        if socks is None:
            socks = self.local.socks = {}
        sock = socks.get(endpoint)
        if sock is None:
            sock = socks[endpoint] = self.context.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(endpoint)
            with self.cond:
                self.sockets.append(sock)
        return sock

    def __call__(self, data):
        with self.cond:
            while True:
                lease = min(self.leases)
                if lease[0] < CREDIT:
                    break
                self.waiting += 1  # the real client would also ask the broker for a lease
                self.cond.wait()
                self.waiting -= 1
            lease[0] += 1
            lease[1] = next(self.turn)
            endpoint, epoch = lease[2], lease[3]
        try:
            sock = self._socket(endpoint)
            job_id = b"%x" % next(self.ids)
            multipart.send(sock, [b"", PHD, job_id, b"60000", epoch, data])
            while True:
                frames = multipart.recv_within(sock, 200)
                if frames is None:
                    continue  # the real client looks at its connection here
                if frames[2] == job_id:
                    break
        finally:
            with self.cond:
                lease[0] -= 1
                if self.waiting:
                    self.cond.notify()
        if frames[3] != OK:
            raise RuntimeError(f"job {job_id!r}: {frames[3:]!r}")
        return frames[4]

    def close(self):
        for sock in self.sockets:
            sock.close(0)


class LeanLeaseClient(LeaseClient):
    """LeaseClient with the direct frames packed: ["", epoch:job_id, data] out,
    ["", epoch:job_id, status, result] back."""

    def __init__(self, context, frontend, procs):
        super().__init__(context, frontend, procs)
        for lease in self.leases:
            lease[3] += b":"

    def __call__(self, data):
        cond = self.cond
        with cond:
            lease = min(self.leases)
            while lease[0] >= CREDIT:
                self.waiting += 1
                cond.wait()
                self.waiting -= 1
                lease = min(self.leases)
            lease[0] += 1
            lease[1] = next(self.turn)
        try:
            sock = self._socket(lease[2])
            head = lease[3] + b"%x" % next(self.ids)
            multipart.send(sock, [b"", head, data])
            while True:
                frames = multipart.recv_within(sock, 200)
                if frames is not None and frames[1] == head:
                    break
        finally:
            with cond:
                lease[0] -= 1
                if self.waiting:
                    cond.notify()
        if frames[2] != OK:
            raise RuntimeError(f"job {head!r}: {frames[2:]!r}")
        return frames[3]


class FastLeaseClient(LeaseClient):
    """LeanLeaseClient's call, compiled (lease_fast.LeaseCall); the grant as
    LeaseClient's."""

    def __init__(self, context, frontend, procs, build_dir):
        super().__init__(context, frontend, procs)
        self.call = load_fast(build_dir).LeaseCall(
            context, [(endpoint, epoch) for _, _, endpoint, epoch in self.leases], CREDIT, OK)

    def __call__(self, data):
        return self.call(data)

    def close(self):
        self.call.close()


class DealerCall:
    """The 1-hop floor's client: one DEALER to a ROUTER echo."""

    def __init__(self, context, endpoint, procs):
        self.sock = context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.sock.send_multipart([b"", PAYLOAD])
        while not self.sock.poll(100):
            procs.check()
        self.sock.recv_multipart()

    def __call__(self):
        sock = self.sock
        multipart.send(sock, [b"", PAYLOAD])  # as the lease's client sends and reads
        return multipart.recv(sock)[1]


# -- reporting -----------------------------------------------------------------------------

LABELS = {
    "powerhose": "(i) powerhose, direct path",
    "relayed": "(i-b) powerhose, relayed",
    "relay": "(ii) zmq.proxy relay",
    "1-hop": "(iii) 1-hop floor",
    "reqrep": "(iii-b) 1-hop, REQ/REP pyzmq",
    "lease": "(iv) lease, DONE per job",
    "lease-lazy": "(iv-b) lease, FREE when idle",
    "lease-beat": "(iv-c) lease, counts per beat",
    "lease-one": "(iv-d) lease, one socket",
    "lease-lean": "(iv-e) lease, one socket, packed",
    "lease-fast": "(iv-f) lease, compiled",
    "pool": "(v) ProcessPoolExecutor(2)",
    "mp": "(vi) multiprocessing.Pool(2)",
}


def lat_table(lat):
    """Round trips per path: medians, ranges and ratios to the 1-hop floor."""
    rows = []
    for name, per_round in lat.items():
        medians = [s[1] for s in per_round]
        ratio, spread = harness.ratio([(a[1], b[1]) for a, b in zip(per_round, lat["1-hop"])])
        rows.append([LABELS[name], f"{statistics.median(medians):.1f}",
                     f"[{min(medians):.1f}-{max(medians):.1f}]",
                     f"{statistics.median(s[2] for s in per_round):.1f}",
                     f"{ratio:.2f}", spread])
    return table(["round trip (us)", "median", "range", "p99", "/ 1-hop", "per round"], rows)


def spaced_report(args, lat):
    return "\n".join([
        f"{len(PAYLOAD)}-byte echo, one job at a time, each after {args.gap:g} ms of quiet "
        f"(the paths taking turns job by job); {args.rounds} rounds x {args.count} round "
        "trips; medians across rounds [range of the rounds]", "", lat_table(lat)])


def rt_report(args, lat, tput):
    out = [f"{len(PAYLOAD)}-byte echo; {args.rounds} rounds x {args.count} round trips from "
           f"one thread, taking turns every {harness.BLOCK}; jobs/s from {THREADS} threads, "
           f"{args.tput_count} jobs per round; medians across rounds [range of the rounds]", "",
           lat_table(lat), ""]
    rows = []
    base = "relayed" if "relayed" in tput else "powerhose"  # the path before
    for name, per_round in tput.items():
        versus = ["-", "-"]  # without --only's powerhose, nothing to compare with
        if base in tput:
            ratio, spread = harness.ratio(list(zip(per_round, tput[base])))
            versus = [f"{ratio:.2f}", spread]
        rows.append([LABELS[name], f"{statistics.median(per_round):.0f}",
                     f"[{min(per_round):.0f}-{max(per_round):.0f}]", *versus])
    out.append(table([f"{THREADS} threads", "jobs/s", "range", f"/ {base}", "per round"],
                     rows))
    return "\n".join(out)


def be_report(sizes, measured, paths, rounds):
    rows, evens = harness.break_even_table(sizes, measured, paths[1:])
    out = [f"break-even: {BE_THREADS} threads, {WORKERS} workers at nice {Settings().nice}, "
           f"the built-in job; speed-up over in-process, median over {rounds} rounds of the "
           "ratio within a round; CPU ms: the in-process runs' CPU time per job", "",
           table(["job ms", "CPU ms", "in-process jobs/s", *paths[1:]], rows)]
    return "\n".join(out), evens


def verdicts(lat, tput, evens):
    """The goal of issue 19, for the real direct path and the prototypes."""
    def med(name):
        return statistics.median(s[1] for s in lat[name])
    rows = []
    base = "relayed" if "relayed" in tput else "powerhose"  # the path before
    for name in ("powerhose", *LEASES):
        if name not in lat or name == base:
            continue
        rt = med(name) / med("1-hop")
        rows.append([LABELS[name], "round trip / 1-hop", f"{rt:.2f}", "<= 1.25",
                     "met" if rt <= TARGETS["round trip / 1-hop"] else "NOT met"])
        if "reqrep" in lat:
            rt = med(name) / med("reqrep")
            rows.append(["", "round trip / REQ/REP hop", f"{rt:.2f}", "<= 1.25",
                         "met" if rt <= TARGETS["round trip / 1-hop"] else "NOT met"])
        pools = [med(pool) for pool in ("pool", "mp") if pool in lat]
        if pools:
            rows.append(["", "round trip below both pools", f"{med(name):.0f} us", "yes",
                         "met" if med(name) < min(pools) else "NOT met"])
        if base in tput and name in tput:
            tp = statistics.median(tput[name]) / statistics.median(tput[base])
            rows.append(["", f"jobs/s / {base}", f"{tp:.2f}", ">= 1.0",
                         "met" if tp >= 1.0 else "NOT met"])
        if evens and name in evens:
            if evens[name] and evens["1-hop"]:
                be = evens[name] / evens["1-hop"]
                rows.append(["", "break-even / 1-hop", f"{be:.2f}", "<= 1.3",
                             "met" if be <= TARGETS["break-even / 1-hop"] else "NOT met"])
            else:
                rows.append(["", "break-even / 1-hop", "n/a", "<= 1.3", "not reached"])
    return table(["candidate", "goal", "value", "target", "verdict"], rows)


# -- main ----------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description="A direct path on one host: raw pyzmq prototypes "
                                "of a lease next to today's path, the floors and the pools.")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--count", type=int, default=1000, help="round trips per variant per round")
    p.add_argument("--sizes", type=float, nargs="+", default=list(SIZES_MS), metavar="MS")
    p.add_argument("--be-rounds", type=int, default=3, help="rounds per size of the break-even")
    p.add_argument("--no-break-even", action="store_true")
    p.add_argument("--gap", type=float, default=0, metavar="MS",
                   help="time jobs one at a time, each after MS milliseconds of quiet, "
                   "instead of back to back (no jobs/s, no break-even)")
    p.add_argument("--quick", action="store_true", help="smoke run")
    p.add_argument("--only", nargs="+", choices=list(LABELS), metavar="NAME",
                   help="run only these paths (the 1-hop floor always runs): "
                   + ", ".join(LABELS))
    args = p.parse_args(argv)
    args.only = set(args.only or LABELS) | {"1-hop"}
    args.be_jobs = 0
    if args.quick:
        args.rounds, args.count, args.sizes, args.be_rounds, args.be_jobs = 2, 200, [0.1, 0.5], 1, 40
    if args.rounds < 1 or args.count < 1 or args.be_rounds < 1 or min(args.sizes) <= 0:
        p.error("--rounds, --count, --be-rounds and --sizes must be positive")
    if args.gap < 0:
        p.error("--gap must be 0 (back to back) or positive milliseconds")
    if args.gap and not args.quick:
        args.count = min(args.count, 200)  # a round trip and a gap each: about a minute a path
    args.tput_count = 2 * args.count
    args.warmup = max(100, args.count // 5)
    return args


def lease_client(context, procs, run_dir, name, build_dir, job="echo"):
    """A lease broker and its workers for ``name``, and this process's client."""
    mode = LEASES[name]
    frontend = start_lease(procs, run_dir, name if job == "echo" else f"be-{name}", job=job,
                           mode=mode,
                           build_dir=build_dir if mode == "fast" else None)
    if mode == "fast":
        return FastLeaseClient(context, frontend, procs, build_dir)
    return (LeanLeaseClient if mode == "lean" else LeaseClient)(context, frontend, procs)


def direct_call(lease):
    """The call a round trip times: the compiled one as is, the others' __call__."""
    return lease.call if isinstance(lease, FastLeaseClient) else lease


def main(argv=None):
    args = parse_args(argv)
    only = args.only
    print(describe_machine())
    print()
    with harness.private_dir("ph-direct-") as run_dir:
        procs = Processes(run_dir)
        pool = mp_pool = context = client = cluster = be_client = None
        relayed = be_cluster = be_relayed = None
        leases, loads = [], []
        try:
            latency = {}
            # The pools first: they fork, and a fork is only clean before zmq threads exist.
            if "pool" in only:
                pool = concurrent.futures.ProcessPoolExecutor(WORKERS, initializer=harness.pool_child)
                assert pool.submit(echo, PAYLOAD).result() == PAYLOAD
                latency["pool"] = lambda: pool.submit(echo, PAYLOAD).result()
            if "mp" in only:
                mp_pool = multiprocessing.get_context("fork").Pool(WORKERS,
                                                                   initializer=harness.pool_child)
                assert mp_pool.apply(echo, (PAYLOAD,)) == PAYLOAD
                latency["mp"] = lambda: mp_pool.apply(echo, (PAYLOAD,))
            build_dir = build_fast(run_dir) if "lease-fast" in only else None
            context = zmq.Context()
            procs.start("router-echo", ME + ["router-echo", f"ipc://{run_dir}/hop.sock"])
            if "relay" in only:
                latency["relay"] = harness.req_caller(
                    context, harness.start_relay(procs, run_dir, "relay", WORKERS), procs)
            latency["1-hop"] = DealerCall(context, f"ipc://{run_dir}/hop.sock", procs)
            if "reqrep" in only:
                procs.start("rep", SERVE + ["echo-bind", f"ipc://{run_dir}/rep.sock"])
                latency["reqrep"] = harness.req_caller(context, f"ipc://{run_dir}/rep.sock",
                                                       procs)
            for name in LEASES:
                if name in only:
                    leases.append(lease_client(context, procs, run_dir, name, build_dir))
                    latency[name] = functools.partial(direct_call(leases[-1]), PAYLOAD)
            if "powerhose" in only:
                client, _, _ = harness.start_powerhose(
                    procs, f"ipc://{run_dir}/ph-f.sock", f"ipc://{run_dir}/ph-b.sock",
                    harness.ECHO_TARGET, WORKERS)
                latency["powerhose"] = functools.partial(client.execute, PAYLOAD)
            if "relayed" in only:
                relayed, _, _ = harness.start_powerhose(
                    procs, f"ipc://{run_dir}/re-f.sock", f"ipc://{run_dir}/re-b.sock",
                    harness.ECHO_TARGET, WORKERS, name="relayed", worker_args=("--no-direct",),
                    direct=False)
                latency["relayed"] = functools.partial(relayed.execute, PAYLOAD)
            latency = {name: latency[name] for name in LABELS if name in latency}
            harness.say("processes ready; warming up")
            if args.gap:
                lat = harness.run_spaced(latency, args.rounds, args.count, args.gap / 1000,
                                         args.warmup)
                procs.check()
                print(spaced_report(args, lat))
                return 0
            throughput = {}
            for name in ("powerhose", "relayed", *LEASES, "pool", "mp"):
                if name in latency:
                    loads.append(Load(latency[name]))
                    throughput[name] = loads[-1]
            lat, tput = harness.run_rounds(latency, throughput, args.rounds, args.count,
                                           args.tput_count, args.warmup)
            procs.check()
            print(rt_report(args, lat, tput))
            print()
            evens = None
            if not args.no_break_even:
                calls = {"in-process": in_process}
                if "powerhose" in only:
                    cluster = get_cluster(BUILTIN_TARGET, numprocesses=WORKERS,
                                          background=True, timeout=0,
                                          frontend=f"ipc://{run_dir}/be-f.sock",
                                          backend=f"ipc://{run_dir}/be-b.sock")
                    cluster.start()
                    be_client = Client(frontend=cluster.frontend, timeout=60)
                    calls["powerhose"] = be_client.execute
                if "relayed" in only:
                    be_cluster = get_cluster(BUILTIN_TARGET, numprocesses=WORKERS,
                                             background=True, timeout=0, direct=False,
                                             frontend=f"ipc://{run_dir}/be-rf.sock",
                                             backend=f"ipc://{run_dir}/be-rb.sock")
                    be_cluster.start()
                    be_relayed = Client(frontend=be_cluster.frontend, timeout=60, direct=False)
                    calls["relayed"] = be_relayed.execute
                hops = [f"ipc://{run_dir}/be-hop-{i}.sock" for i in range(WORKERS)]
                for i, endpoint in enumerate(hops):
                    procs.start(f"be-hop-{i}", SERVE + ["jobs-bind", endpoint])
                hop_jobs = harness.ReqCaller(context, hops)
                calls["1-hop"] = hop_jobs
                for name in BE_LEASES:
                    if name in only:
                        leases.append(lease_client(context, procs, run_dir, name, build_dir,
                                                   job="jobs"))
                        calls[name] = direct_call(leases[-1])
                paths = tuple(calls)
                for path in paths[1:]:
                    harness.wait_until(lambda: all(calls[path](b"1") == in_process(b"1")
                                                   for _ in range(2 * WORKERS)), procs, path)
                per_ms = rounds_per_ms()
                progress = harness.counter(len(args.sizes) * args.be_rounds * len(paths),
                                           "break-even")
                measured = [harness.measure_size(calls, ms, args.be_jobs or jobs_for(ms) // 2,
                                                 args.be_rounds, i, progress, BE_THREADS, per_ms)
                            for i, ms in enumerate(args.sizes)]
                print(file=sys.stderr)
                procs.check()
                text, evens = be_report(args.sizes, measured, paths, args.be_rounds)
                print(text)
                print()
                hop_jobs.close()
            print(verdicts(lat, tput, evens))
            return 0
        finally:
            for load in loads:
                load.close()
            for c in (client, be_client, relayed, be_relayed):
                if c is not None:
                    c.close()
            for each in (cluster, be_cluster):
                if each is not None:
                    each.stop()
            for held in leases:
                held.close()
            if context is not None:
                context.destroy(linger=0)
            procs.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if mp_pool is not None:
                mp_pool.terminate()
                mp_pool.join()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(*sys.argv[2:])
    else:
        harness.run_script(main)
