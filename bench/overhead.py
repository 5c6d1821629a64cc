#!/usr/bin/env python
"""What one powerhose job costs, next to the floors it is built on.

For a 100-byte echo job, the round trip of:

(a) a direct function call;
(b) raw pyzmq REQ/REP between two processes (one hop);
(c) ``zmq.proxy`` between a ROUTER and a DEALER in its own process, with one
    REP echo process behind it: two hops and no Python per message, the
    floor for any broker on libzmq;
(d) powerhose: ``Client.execute`` -> ``powerhose-broker`` -> ``powerhose-worker``,
    the real console scripts of this interpreter's environment;
(e) ``concurrent.futures.ProcessPoolExecutor(1)``: ``submit().result()``;

then jobs/s with 8 client threads for (d) with 2 workers (one
shared Client) and for ``ProcessPoolExecutor(2)``.

Every variant is warmed up, then measured in rounds (the order rotates each
round; within a round the latency variants take turns every 50 round
trips) and the median across rounds is reported: on a shared, noisy
machine only side-by-side numbers mean anything.  Every zmq variant
uses ipc endpoints in a private temp dir; every process is started in its
own process group and killed at the end, even on Ctrl-C or error.

    python bench/overhead.py            # full run, 25 short rounds, about a minute and a half
    python bench/overhead.py --quick    # smoke run, a few seconds
    python bench/overhead.py --rst      # the tables as RST, for README.rst
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import itertools
import math
import os
import platform
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
from pyramid_powerhose.bench import cpu_model
from pyramid_powerhose.settings import Settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
PAYLOAD = bytes(range(100))
THREADS = 8
TARGETS = {"latency": 1.3, "throughput": 1.0}  # from the issue


def echo(data):
    return data


# -- helper processes (this script, re-run with "_serve") -------------------


def serve(kind, *endpoints):
    """Run in a child: a REP echo server or a zmq.proxy relay, until killed."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ctx = zmq.Context()
    if kind == "proxy":
        frontend, backend = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        frontend.bind(endpoints[0])
        backend.bind(endpoints[1])
        zmq.proxy(frontend, backend)  # C loop: no Python per message
    sock = ctx.socket(zmq.REP)
    if kind == "rep-bind":
        sock.bind(endpoints[0])
    else:
        sock.connect(endpoints[0])
    while True:
        sock.send(sock.recv())


class Processes:
    """Children in their own process groups, all killed by ``close``."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.procs = []

    def start(self, name, argv, pipes=False, path=REPO):
        """Output goes to ``<name>.log``; with ``pipes``, stdin and stdout are pipes.

        ``path`` is the child's working directory and first on its
        PYTHONPATH: the source tree whose ``pyramid_powerhose`` it imports.
        """
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [path, os.environ.get("PYTHONPATH")])))
        with open(os.path.join(self.run_dir, f"{name}.log"), "wb") as log, signals_deferred():
            streams = (dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log) if pipes
                       else dict(stdout=log, stderr=subprocess.STDOUT))
            proc = subprocess.Popen(argv, cwd=path, env=env, start_new_session=True, **streams)
            proc.name = name
            self.procs.append(proc)
        return proc

    def check(self):
        for proc in self.procs:
            if proc.poll() is not None:
                with open(os.path.join(self.run_dir, f"{proc.name}.log"), errors="replace") as f:
                    raise RuntimeError(f"{proc.name} exited with {proc.returncode}:\n{f.read()}")

    def close(self):
        for proc in self.procs:
            _killpg(proc, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
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
    path = os.path.join(BIN, name)
    if os.path.exists(path):
        return [path]
    return [sys.executable, "-m", module]  # not installed: run from the source tree


def wait_until(predicate, procs, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check()
        if predicate():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


# -- the variants -------------------------------------------------------------


def req_caller(ctx, endpoint, procs):
    """A REQ round trip as a function of no arguments, checked once for life."""
    sock = ctx.socket(zmq.REQ)
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


def start_powerhose(procs, client, workers):
    """The real console scripts on the client's endpoints; returns once all are ready."""
    settings = client.settings
    broker = procs.start("powerhose-broker", console_script(
        "powerhose-broker", "pyramid_powerhose.cli.broker") + [
        "--frontend", settings.frontend, "--backend", settings.backend])
    for i in range(workers):
        procs.start(f"powerhose-worker-{i}", console_script(
            "powerhose-worker", "pyramid_powerhose.cli.worker") + [
            "tests.targets:echo", "--backend", settings.backend])
    wait_until(lambda: client.ping(timeout=0.2) == broker.pid, procs, "the broker")
    wait_until(lambda: client.stats()["services"].get("default", {}).get("workers") == workers,
               procs, f"{workers} workers")
    assert client.execute(PAYLOAD) == PAYLOAD


# -- measuring ----------------------------------------------------------------


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
    return statistics.fmean(samples), statistics.median(samples), p99(samples)


BLOCK = 50  # round trips of one variant before the next takes over, within a round


def run_rounds(latency, throughput, rounds, count, tput_count, warmup, progress):
    """Warm every variant up, then measure them round by round, interleaved.

    Within a round the latency variants take turns every BLOCK round trips
    (the order reversing each turn), so that a burst of noise a few seconds
    long lands on all of them, not on whichever was running.
    """
    for name, call in latency.items():
        time_calls(call, warmup)
    for name, load in throughput.items():
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


# -- reporting ----------------------------------------------------------------


def machine():
    model = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("cpu", f"{model}, {cores} cores"),
        ("system", f"{platform.system()} {platform.release()}, load average "
                   + " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("zmq", f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}"),
    ]


LABELS = {
    "direct": "(a) direct function call",
    "reqrep": "(b) pyzmq REQ/REP, 1 hop",
    "proxy": "(c) zmq.proxy relay, 2 hops",
    "powerhose": "(d) powerhose Client->broker->worker",
    "pool1": "(e) ProcessPoolExecutor(1)",
    "powerhose-8": "(d) powerhose, 2 workers",
    "pool2-8": "ProcessPoolExecutor(2)",
}


def table(header, rows, rst):
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("=" * w for w in widths)
    if rst:
        return "\n".join([rule, line(header), rule, *map(line, rows), rule])
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def report(args, lat, tput, rst):
    out = []
    if rst:
        out += ["Measured " + "; ".join(f"{k}: {v}" for k, v in machine()) + ".", ""]
    else:
        out += [f"{k:8}{v}" for k, v in machine()] + [""]
    out.append(f"{len(PAYLOAD)}-byte echo, one client thread; (d) has 2 workers. "
               f"{args.rounds} rounds x {args.count} round trips per variant, taking turns "
               f"every {BLOCK}; "
               "median across rounds, [range of the rounds' medians]")
    out.append("")
    rows = []
    for name, per_round in lat.items():
        mean, med, tail = (statistics.median(s[i] for s in per_round) for i in range(3))
        medians = [s[1] for s in per_round]
        rows.append([LABELS[name], f"{mean:.1f}", f"{med:.1f}",
                     f"[{min(medians):.1f}-{max(medians):.1f}]", f"{tail:.1f}"])
    out.append(table(["round trip (us)", "mean", "median", "range", "p99"], rows, rst))
    out.append("")
    rows = []
    for name, per_round in tput.items():
        rows.append([LABELS[name], f"{statistics.median(per_round):.0f}",
                     f"[{min(per_round):.0f}-{max(per_round):.0f}]"])
    out.append(table([f"{THREADS} client threads, {args.tput_count} jobs per round",
                      "jobs/s", "range"], rows, rst))
    out.append("")

    def ratio(a, b, i=1):
        """Ratio of the medians across rounds, and the range of the per-round ratios."""
        if i is None:  # throughput
            pairs = list(zip(tput[a], tput[b]))
        else:  # 0: mean, 1: median round trip
            pairs = [(x[i], y[i]) for x, y in zip(lat[a], lat[b])]
        value = statistics.median(x for x, _ in pairs) / statistics.median(y for _, y in pairs)
        rounds = [x / y for x, y in pairs]
        return [f"{value:.2f}", f"[{min(rounds):.2f}-{max(rounds):.2f}]"], value

    def verdict(met):
        return "met" if met else "NOT met"

    d_c, d_c_value = ratio("powerhose", "proxy")
    d_pool, d_pool_value = ratio("powerhose-8", "pool2-8", None)
    rows = [
        ["(d)/(c) median round trip", *d_c, f"<= {TARGETS['latency']}",
         verdict(d_c_value <= TARGETS["latency"])],
        ["(d)/(c) mean round trip", *ratio("powerhose", "proxy", 0)[0], "", ""],
        ["(d)/(b) median round trip", *ratio("powerhose", "reqrep")[0], "", ""],
        ["jobs/s (d) / ProcessPoolExecutor(2)", *d_pool, f">= {TARGETS['throughput']}",
         verdict(d_pool_value >= TARGETS["throughput"])],
    ]
    out.append(table(["ratio (of the medians)", "value", "per round", "target", ""],
                     rows, rst))
    return "\n".join(out)


# -- main -----------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Round trip and throughput of powerhose next to its floors.")
    parser.add_argument("--rounds", type=int, default=25,
                        help="interleaved rounds per variant (default %(default)s)")
    parser.add_argument("--count", type=int, default=1000,
                        help="round trips per variant per round; the throughput runs "
                        "make twice as many (default %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 rounds of 300 round trips")
    parser.add_argument("--rst", action="store_true", help="print the tables as RST")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.count = 3, 300
    if args.rounds < 1 or args.count < 1:
        parser.error("--rounds and --count must be positive")
    args.tput_count = 2 * args.count
    args.warmup = max(100, args.count // 5)
    return args


def main(argv=None):
    if len(sys.argv) > 2 and sys.argv[1] == "_serve":
        return serve(*sys.argv[2:])
    args = parse_args(argv)

    def on_term(*_):
        raise SystemExit(143)  # cleanup in the finally blocks below
    signal.signal(signal.SIGTERM, on_term)

    def progress(text):
        print(f"# {text}", file=sys.stderr, flush=True)

    run_dir = tempfile.mkdtemp(prefix="ph-", dir="/tmp")
    procs = Processes(run_dir)
    pools, loads, ctx, client = [], [], None, None
    try:
        # Pools first: they fork, and a fork is only clean before zmq threads exist.
        pools = [concurrent.futures.ProcessPoolExecutor(n, initializer=os.setpgrp)
                 for n in (1, 2)]
        for pool in pools:
            assert pool.submit(echo, PAYLOAD).result() == PAYLOAD
        pool1, pool2 = pools
        me = [sys.executable, os.path.abspath(__file__), "_serve"]
        procs.start("rep", me + ["rep-bind", f"ipc://{run_dir}/rep.sock"])
        procs.start("proxy", me + ["proxy", f"ipc://{run_dir}/proxy-front.sock",
                                   f"ipc://{run_dir}/proxy-back.sock"])
        procs.start("proxy-rep", me + ["rep-connect", f"ipc://{run_dir}/proxy-back.sock"])
        ctx = zmq.Context()
        reqrep = req_caller(ctx, f"ipc://{run_dir}/rep.sock", procs)
        relay = req_caller(ctx, f"ipc://{run_dir}/proxy-front.sock", procs)
        client = Client(settings=Settings(frontend=f"ipc://{run_dir}/ph-front.sock",
                                          backend=f"ipc://{run_dir}/ph-back.sock",
                                          timeout=10.0))
        start_powerhose(procs, client, 2)
        progress("processes ready; warming up")

        latency = {
            "direct": lambda: echo(PAYLOAD),
            "reqrep": reqrep,
            "proxy": relay,
            "powerhose": lambda: client.execute(PAYLOAD),
            "pool1": lambda: pool1.submit(echo, PAYLOAD).result(),
        }
        loads = [Load(lambda: client.execute(PAYLOAD)),
                 Load(lambda: pool2.submit(echo, PAYLOAD).result())]
        throughput = {"powerhose-8": loads[0], "pool2-8": loads[1]}
        lat, tput = run_rounds(latency, throughput, args.rounds, args.count,
                               args.tput_count, args.warmup, progress)
        procs.check()
        print(report(args, lat, tput, args.rst))
    finally:
        for load in loads:
            load.close()
        if client is not None:
            client.close()
        if ctx is not None:
            ctx.destroy(linger=0)
        procs.close()
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
