"""What the scripts in bench/ share: their processes, their floors, their loops.

The measuring that ``powerhose-bench`` also does (the built-in job,
calling threads, the break-even, the machine header and the tables)
lives in :mod:`pyramid_powerhose.bench`; this module holds what only the
scripts need:

* :class:`Processes`: children in their own process groups, logging to a
  private directory, all killed at the end, even on Ctrl-C;
* :func:`start_powerhose`: the real console scripts on private endpoints,
  returning once every worker has registered;
* the floors: REP echo or job workers and a ``zmq.proxy`` relay, run as
  ``python harness.py serve KIND ENDPOINT...`` (:func:`serve`), and
  :class:`ReqCaller` to call them from many threads;
* the loops that take turns: :func:`run_rounds` (round trips and jobs/s),
  :func:`run_spaced` (round trips after idle gaps) and
  :func:`measure_size` (a job size by several paths);
* :func:`run_script` and :func:`private_dir`, the frame of every script.

A script imports it as ``import harness``: Python puts the script's own
directory first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import zmq

from pyramid_powerhose import Client
from pyramid_powerhose.bench import (break_even, describe_machine, hmac_chain, rounds_per_ms,
                                     run_threads, table)
from pyramid_powerhose.exc import PowerhoseError
from pyramid_powerhose.job import Job
from pyramid_powerhose.settings import Settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
PAYLOAD = bytes(range(100))  # the echo job of every round trip
ECHO_TARGET = "tests.targets:echo"
SERVE = [sys.executable, os.path.abspath(__file__), "serve"]


def say(text):
    """Progress, on stderr: the report alone goes to stdout."""
    print(f"# {text}", file=sys.stderr, flush=True)


# -- the frame of a script ------------------------------------------------------------

def run_script(main):
    """``sys.exit(main())``, with SIGTERM unwinding like Ctrl-C.

    Either way the script's ``finally`` blocks stop its children and
    remove its temp dir; it exits 130 on Ctrl-C, 143 on SIGTERM.
    """
    def on_term(*_):
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def pool_child():
    """A process pool's child: a process group of its own, and SIGTERM ends it
    at once.  Forked, it would keep the script's SIGTERM handler
    (:func:`run_script`), which runs only between bytecodes: a child waiting
    on its pool's queue lock for a task could outlive ``Pool.terminate`` and
    the script."""
    os.setpgrp()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def private_dir(prefix):
    """A temp dir of mode 0700, removed after; keep TMPDIR short: ipc paths are
    limited to 107 bytes."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- processes -----------------------------------------------------------------------------

class Processes:
    """Children in their own process groups, all killed by ``close``."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.procs = []

    def start(self, name, argv, pipes=False, path=REPO, preexec_fn=None):
        """Output goes to ``<name>.log``; with ``pipes``, stdin and stdout are pipes.

        ``path`` is the child's working directory and first on its
        PYTHONPATH: the source tree whose ``pyramid_powerhose`` it imports.
        """
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [path, os.environ.get("PYTHONPATH")])))
        with open(self.log_path(name), "wb") as log, signals_deferred():
            streams = (dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log) if pipes
                       else dict(stdout=log, stderr=subprocess.STDOUT))
            proc = subprocess.Popen(argv, cwd=path, env=env, start_new_session=True,
                                    preexec_fn=preexec_fn, **streams)
            proc.name = name
            self.procs.append(proc)
        return proc

    def log_path(self, name):
        return os.path.join(self.run_dir, f"{name}.log")

    def log(self, name, tail=None):
        with open(self.log_path(name), errors="replace") as f:
            text = f.read()
        return text if tail is None else text[-tail:]

    def check(self):
        """RuntimeError with its output if a child has exited."""
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.returncode}:\n"
                                   f"{self.log(proc.name)}")

    def close(self, sig=signal.SIGTERM, grace=3.0):
        """``sig`` to every group, then SIGKILL to what still runs after ``grace`` seconds."""
        for proc in self.procs:
            _killpg(proc, sig)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(proc, signal.SIGKILL)
                proc.wait()
        self.procs = []


@contextlib.contextmanager
def signals_deferred():
    """Hold Ctrl-C and SIGTERM until a child is started *and* recorded for cleanup."""
    caught = []
    previous = {sig: signal.signal(sig, lambda sig, frame: caught.append(sig))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])


def _killpg(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def console_script(name, module):
    """This environment's ``name`` script, or ``python -m module`` if it is not installed."""
    path = os.path.join(BIN, name)
    if os.path.exists(path):
        return [path]
    return [sys.executable, "-m", module]


def wait_until(predicate, procs, what, timeout=20.0):
    """Poll ``predicate``; RuntimeError if a child exits or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check()
        if predicate():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def registered(client, workers, service="default"):
    """Whether ``workers`` workers of ``service`` have registered (False if no answer yet)."""
    try:
        return client.stats(timeout=2)["services"].get(service, {}).get("workers") == workers
    except PowerhoseError:  # a broker starting slowly (valgrind) does not answer yet
        return False


def start_powerhose(procs, frontend, backend, target, workers, name="powerhose",
                    broker=None, broker_path=REPO, worker_args=(), timeout=20.0,
                    worker=None, worker_path=REPO, direct=True):
    """``powerhose-broker`` (or the argv ``broker``, run in ``broker_path``) and
    ``workers`` ``powerhose-worker TARGET`` (or the argv ``worker``, run in
    ``worker_path``) on these endpoints.  ``direct=False``: the client asks
    for no lease (give this tree's workers ``--no-direct`` too, for a
    relayed path through and through).

    Returns a Client (timeout 60 s), the broker's and the workers'
    processes, once the broker answers and every worker has registered.
    """
    broker_argv = broker or console_script("powerhose-broker", "pyramid_powerhose.cli.broker")
    broker_proc = procs.start(f"{name}-broker", broker_argv + [
        "--frontend", frontend, "--backend", backend], path=broker_path)
    worker_argv = worker or console_script("powerhose-worker", "pyramid_powerhose.cli.worker")
    worker_procs = [procs.start(f"{name}-worker-{i}", worker_argv + [
        target, "--backend", backend, *worker_args], path=worker_path)
        for i in range(workers)]
    client = Client(settings=Settings(frontend=frontend, backend=backend, timeout=60.0,
                                      direct=direct))
    try:
        wait_until(lambda: client.ping(timeout=0.2) == broker_proc.pid, procs,
                   f"{name}'s broker", timeout)
        wait_until(lambda: registered(client, workers), procs,
                   f"{workers} workers behind {name}'s broker", timeout)
    except BaseException:
        client.close()
        raise
    return client, broker_proc, worker_procs


# -- the floors: REP workers and a zmq.proxy relay, in children ----------------------------

def serve(kind, *endpoints):
    """Run in a child until killed: ``proxy FRONT BACK``, or a REP worker.

    ``echo-bind``/``echo-connect`` answer each message with itself;
    ``jobs-bind``/``jobs-connect`` run the built-in job on it, at the
    ``nice`` of a powerhose-worker.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    context = zmq.Context()
    if kind == "proxy":
        frontend, backend = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
        frontend.bind(endpoints[0])
        backend.bind(endpoints[1])
        zmq.proxy(frontend, backend)  # C loop: no Python per message
    job, how = kind.split("-")
    if job == "jobs":
        os.nice(Settings().nice)
    sock = context.socket(zmq.REP)
    for endpoint in endpoints:
        sock.bind(endpoint) if how == "bind" else sock.connect(endpoint)
    while True:
        data = sock.recv()
        sock.send(in_process(data) if job == "jobs" else data)


def in_process(data):
    """The built-in job, called here."""
    return hmac_chain(Job(data))


def start_relay(procs, run_dir, name, workers, job="echo"):
    """``zmq.proxy`` with ``workers`` REP workers (``echo`` or ``jobs``) behind it;
    returns its frontend endpoint."""
    front, back = f"ipc://{run_dir}/{name}-f.sock", f"ipc://{run_dir}/{name}-b.sock"
    procs.start(name, SERVE + ["proxy", front, back])
    for i in range(workers):
        procs.start(f"{name}-worker-{i}", SERVE + [f"{job}-connect", back])
    return front


class ReqCaller:
    """One REQ socket per calling thread, connected to ``endpoints``."""

    def __init__(self, context, endpoints):
        self.context, self.endpoints = context, endpoints
        self.local = threading.local()
        self.sockets = []
        self.lock = threading.Lock()

    def __call__(self, data):
        sock = getattr(self.local, "sock", None)
        if sock is None:
            sock = self.local.sock = self.context.socket(zmq.REQ)
            sock.linger = 0
            sock.rcvtimeo = 60_000  # a worker that died fails the run instead of hanging it
            for endpoint in self.endpoints:
                sock.connect(endpoint)
            with self.lock:
                self.sockets.append(sock)
        sock.send(data)
        return sock.recv()

    def close(self):
        for sock in self.sockets:
            sock.close(0)


def req_caller(context, endpoint, procs):
    """A REQ round trip of PAYLOAD as a function of no arguments, checked once for life."""
    sock = context.socket(zmq.REQ)
    sock.linger = 0
    sock.connect(endpoint)
    sock.send(PAYLOAD)
    while not sock.poll(100):
        procs.check()
    assert sock.recv() == PAYLOAD

    def call():
        sock.send(PAYLOAD)
        return sock.recv()
    return call


# -- round trips and jobs/s, taking turns ------------------------------------------------------

THREADS = 8  # client threads of the jobs/s measures
BLOCK = 50  # round trips of one variant before the next takes over, within a round


def time_calls(call, count):
    """Round trip times of ``count`` calls, in microseconds."""
    timer = time.perf_counter_ns
    samples = []
    append = samples.append
    for _ in range(count):
        start = timer()
        result = call()
        append(timer() - start)
    if result != PAYLOAD:
        raise RuntimeError(f"wrong echo: {result[:20]!r}...")
    return [ns / 1000.0 for ns in samples]


class Load:
    """``THREADS`` long-lived threads making calls, as a web server's would.

    The threads outlive the rounds, so a Client's per-thread sockets are
    connected once, during the warm-up, not in every measured round.
    """

    def __init__(self, call):
        self.call = call
        self.threads = concurrent.futures.ThreadPoolExecutor(THREADS)
        self.start = None
        self.stopping = False

    def jobs_per_second(self, total):
        counter = itertools.count()
        self.start = start = threading.Barrier(THREADS + 1)

        def run():
            start.wait()
            while not self.stopping and next(counter) < total:
                if self.call() != PAYLOAD:
                    raise RuntimeError("wrong echo")

        running = [self.threads.submit(run) for _ in range(THREADS)]
        start.wait()
        began = time.perf_counter()
        for future in running:
            future.result()
        return total / (time.perf_counter() - began)

    def close(self):
        """Stop the threads, even in the middle of a round (Ctrl-C, SIGTERM)."""
        self.stopping = True
        if self.start is not None:
            self.start.abort()
        self.threads.shutdown(wait=True, cancel_futures=True)


def p99(samples):
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def summarise(samples):
    """Mean, median and p99 of round trip times."""
    return statistics.fmean(samples), statistics.median(samples), p99(samples)


def run_rounds(latency, throughput, rounds, count, tput_count, warmup, progress=say):
    """Warm every variant up, then measure them round by round, interleaved.

    ``latency`` and ``throughput`` map names to calls and to :class:`Load`
    s.  Within a round the latency variants take turns every BLOCK round
    trips (the order reversing each turn), so that a burst of noise a few
    seconds long lands on all of them, not on whichever was running.
    Returns per variant, per round: (mean, median, p99) and jobs/s.
    """
    for call in latency.values():
        time_calls(call, warmup)
    for load in throughput.values():
        load.jobs_per_second(warmup)
    lat = {name: [] for name in latency}
    tput = {name: [] for name in throughput}
    names = list(latency)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        samples = {name: [] for name in names}
        for turn in range(math.ceil(count / BLOCK)):
            size = min(BLOCK, count - turn * BLOCK)
            for name in (order if turn % 2 == 0 else order[::-1]):
                samples[name] += time_calls(latency[name], size)
        for name in names:
            lat[name].append(summarise(samples[name]))
        tnames = list(throughput)
        for name in tnames[r % len(tnames):] + tnames[:r % len(tnames)]:
            tput[name].append(throughput[name].jobs_per_second(tput_count))
        progress(f"round {r + 1}/{rounds} done")
    return lat, tput


def run_spaced(latency, rounds, count, gap, warmup, progress=say):
    """Round trips one at a time, ``gap`` seconds apart, as a web app at low
    load sends its jobs: every call comes after ``gap`` of quiet on the
    machine, the variants taking turns call by call (the order rotating
    each round), so that between two calls of one variant its processes
    sat idle for ``len(latency)`` gaps.  Per variant, per round:
    (mean, median, p99)."""
    for call in latency.values():
        time_calls(call, warmup)
    names = list(latency)
    lat = {name: [] for name in names}
    timer, sleep = time.perf_counter_ns, time.sleep
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        samples = {name: [] for name in names}
        for _ in range(count):
            for name in order:
                call = latency[name]
                sleep(gap)
                start = timer()
                result = call()
                samples[name].append((timer() - start) / 1000.0)
                if result != PAYLOAD:
                    raise RuntimeError(f"wrong echo from {name}: {result[:20]!r}...")
        for name in names:
            lat[name].append(summarise(samples[name]))
        progress(f"round {r + 1}/{rounds} done")
    return lat


def ratio(pairs):
    """Ratio of the medians of ``pairs`` (a, b), and the range of the per-round ratios."""
    value = statistics.median(a for a, _ in pairs) / statistics.median(b for _, b in pairs)
    rounds = [a / b for a, b in pairs]
    return value, f"[{min(rounds):.2f}-{max(rounds):.2f}]"


# -- one job size by several paths, taking turns ---------------------------------------------

def measure_size(calls, ms, jobs, rounds, first_round, progress, threads, per_ms=None):
    """Rounds at one size of the built-in job: per path, jobs/s per round; and the
    in-process CPU ms per job.

    ``calls`` maps paths to calls, "in-process" among them; they take turns
    in every round, the order rotating from round to round.  ``per_ms``, the
    job's rounds per millisecond, is measured anew if not given.  Every
    result is checked against the in-process one.
    """
    data = b"%d" % max(1, round((per_ms or rounds_per_ms()) * ms))
    expected = in_process(data)
    paths = tuple(calls)
    rates = {path: [] for path in paths}
    cpu_ms = []
    for r in range(rounds):
        shift = (first_round + r) % len(paths)
        for path in paths[shift:] + paths[:shift]:
            cpu = time.process_time()
            seconds, results = run_threads(calls[path], data, jobs, threads)
            if path == "in-process":  # with each thread's warm-up call
                cpu_ms.append((time.process_time() - cpu) / (jobs + threads) * 1000)
            if any(result != expected for result in results):
                raise RuntimeError(f"{path} returned a wrong result at {ms} ms")
            rates[path].append(jobs / seconds)
            progress()
    return rates, statistics.median(cpu_ms)


def break_even_table(sizes, measured, names):
    """``measure_size``'s results as table rows: per size, the in-process CPU ms
    and jobs/s, and each path's speed-up (the median of the per-round
    ratios); the last row, each path's break-even.  Returns (rows, evens)."""
    rows, points = [], {name: [] for name in names}
    for ms, (rates, cpu) in zip(sizes, measured):
        row = [f"{ms:g}", f"{cpu:.3f}", f"{statistics.median(rates['in-process']):.0f}"]
        for name in names:
            speedup = statistics.median(a / b for a, b in zip(rates[name], rates["in-process"]))
            points[name].append((cpu, speedup))
            row.append(f"{speedup:.2f}x")
        rows.append(row)
    evens = {name: break_even(line) for name, line in points.items()}
    rows.append(["break-even", "", ""] + [f"{evens[n]:.3f} ms" if evens[n] else "not reached"
                                           for n in names])
    return rows, evens


def counter(total, label):
    """A progress callback: ``# label: n/total runs`` on stderr, rewritten in place."""
    done = [0]

    def progress():
        done[0] += 1
        print(f"# {label}: {done[0]}/{total} runs", file=sys.stderr, end="\r", flush=True)
    return progress


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"]:
        sys.exit("usage: harness.py serve proxy|echo-bind|echo-connect|jobs-bind|jobs-connect "
                 "ENDPOINT...")
    serve(*sys.argv[2:])


# -- two clients side by side: curve.py, metrics_cost.py ----------------------------------

def pair_args(description, argv):
    """The options of a script that compares two clients: rounds, count, --quick."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--count", type=int, default=2000, help="round trips per round")
    p.add_argument("--rst", action="store_true", help="the machine header as RST")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 small rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.count = 2, 200
    args.tput_count = 2 * args.count
    args.warmup = min(200, args.count)
    return args


def run_pair(clients, args):
    """Round trips and jobs/s of ``clients`` ({name: Client}, two of them),
    taking turns within every round; closes them."""
    loads = []
    try:
        latency = {name: (lambda client=client: client.execute(PAYLOAD))
                   for name, client in clients.items()}
        throughput = {}
        for name, call in latency.items():
            loads.append(Load(call))
            throughput[name] = loads[-1]
        say("processes ready; warming up")
        return run_rounds(latency, throughput, args.rounds, args.count, args.tput_count,
                          args.warmup)
    finally:
        for load in loads:
            load.close()
        for client in clients.values():
            client.close()


def pair_report(lat, tput, args, setting, label, base, other):
    """The machine, a table of both clients, and ``other`` against ``base``."""
    out = [describe_machine(args.rst), "",
           f"{setting}, {args.rounds} rounds; round trip of a {len(PAYLOAD)}-byte echo from "
           f"one thread ({args.count} per round), jobs/s from {THREADS} threads "
           f"({args.tput_count} per round); medians [range of the rounds].", ""]
    rows = []
    for name in lat:
        medians = [s[1] for s in lat[name]]
        rates = tput[name]
        rows.append([name, f"{statistics.median(medians):.1f}",
                     f"[{min(medians):.1f}-{max(medians):.1f}]",
                     f"{statistics.median(rates):.0f}", f"[{min(rates):.0f}-{max(rates):.0f}]"])
    out.append(table([label, "round trip (us)", "range", "jobs/s", "range"], rows))
    rt, rt_rounds = ratio([(a[1], b[1]) for a, b in zip(lat[other], lat[base])])
    jobs, jobs_rounds = ratio(list(zip(tput[other], tput[base])))
    extra = statistics.median(a[1] - b[1] for a, b in zip(lat[other], lat[base]))
    out += ["", f"{other} / {base}: round trip {rt:.3f}x {rt_rounds} ({extra:+.1f} us per job, "
            f"median of the rounds); jobs/s {jobs:.3f}x {jobs_rounds}"]
    return "\n".join(out)
