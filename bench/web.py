#!/usr/bin/env python
"""The demo token server under HTTP load: in the view thread vs. offloaded.

Two real ``pserve demo_app/development.ini`` servers (waitress, 8 threads,
on free 127.0.0.1 ports), the same app and the same verification code:

in-process
    ``offload=false``: the view checks the ES256 signature itself, in
    waitress's threads, which take turns on the GIL;
offloaded
    ``offload=true``: the view sends the job through pyramid_powerhose to a
    spawned cluster of ``--workers`` (2) worker processes.

Load comes from this process: ``--concurrency`` threads, each with its own
keep-alive ``http.client`` connection, sending ``POST /token`` with valid
assertions until ``--requests`` have been sent or ``--max-seconds`` have
passed.  Rounds alternate between the two servers (the order flips every
round) and the medians across rounds are reported: on a shared, noisy
machine only side-by-side numbers mean anything.  Both servers and their
clusters run in a private temp dir and are stopped at the end, even on
Ctrl-C or error.

    python bench/web.py            # full run, about a minute
    python bench/web.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time

import psutil

import harness
from harness import BIN, REPO, Processes

sys.path.insert(0, REPO)
from demo_app import assertion  # noqa: E402
from pyramid_powerhose.bench import describe_machine, table  # noqa: E402

INI = os.path.join(REPO, "demo_app", "development.ini")
VARIANTS = ("in-process", "offloaded")
TARGET_RATIO = 1.6  # offloaded / in-process requests/s, on 2 cores
ASSERTIONS = 64  # distinct assertions in the request pool


# -- servers -------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One ``pserve development.ini`` in its own session, with its cluster."""

    def __init__(self, name, offload, procs, workers):
        self.name = name
        self.port = free_port()
        self.offload = offload
        self.workers = workers
        self.procs = procs
        sock_dir = os.path.join(procs.run_dir, name)
        os.mkdir(sock_dir, 0o700)
        argv = [os.path.join(BIN, "pserve"), INI, f"http_port={self.port}",
                f"offload={'true' if offload else 'false'}", f"workers={workers}",
                f"frontend=ipc://{sock_dir}/front.sock", f"backend=ipc://{sock_dir}/back.sock"]
        self.proc = procs.start(name, argv, preexec_fn=_die_with_parent)
        self.family = []

    def wait_ready(self, timeout=90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited:\n{self.log()}")
            try:
                status, body = request(self.port, "GET", "/__heartbeat__")
                if status == 200 and (not self.offload or body.get("workers") == self.workers):
                    self.family = _family(self.proc.pid)
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} server not ready after {timeout}s:\n{self.log()}")

    def cpu_seconds(self):
        """CPU time used so far by (the web process, its cluster)."""
        self.family = _family(self.proc.pid) or self.family
        web = cluster = 0.0
        for proc in self.family:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            if proc.pid == self.proc.pid:
                web += times.user + times.system
            else:
                cluster += times.user + times.system
        return web, cluster

    def log(self):
        return self.procs.log(self.name, tail=4000)

    def remember_family(self):
        """The cluster's processes, known before pserve exits and they are reparented."""
        self.family = self.family or _family(self.proc.pid)

    def reap(self):
        """Once pserve has stopped (its cluster follows it), kill what is left of the cluster."""
        _, alive = psutil.wait_procs(self.family, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass


def _die_with_parent():
    """In the child: SIGINT when the bench dies, even by SIGKILL (Linux only).

    pserve then exits as on Ctrl-C, and its cluster follows it.  SIGINT is
    un-ignored first: a shell's background job (``&``) starts with it ignored,
    and the child would inherit that.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _family(pid):
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def request(port, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


# -- load -------------------------------------------------------------------------


def load(port, bodies, total, concurrency, max_seconds):
    """Send up to ``total`` requests from ``concurrency`` keep-alive connections.

    Returns (requests/s, latencies in seconds, errors).
    """
    counter = iter(range(total))
    lock = threading.Lock()
    latencies, errors = [], []
    deadline = time.monotonic() + max_seconds
    start = threading.Barrier(concurrency + 1)

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        start.wait()
        try:
            while time.monotonic() < deadline:
                with lock:
                    index = next(counter, None)
                if index is None:
                    break
                sent = time.perf_counter()
                try:
                    conn.request("POST", "/token", body=bodies[index % len(bodies)],
                                 headers={"Content-Type": "application/json"})
                    response = conn.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException) as exc:
                    errors.append(repr(exc))
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    continue
                mine.append(time.perf_counter() - sent)
                if response.status != 200:
                    errors.append(f"HTTP {response.status}")
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    return len(latencies) / elapsed, latencies, errors


def own_cpu_seconds():
    times = psutil.Process().cpu_times()
    return times.user + times.system


def busy_cpu_seconds():
    """CPU time used (or stolen by the hypervisor) machine-wide so far."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def measure(server, bodies, args):
    """One round: requests/s, p50, p99, CPU ms per request (load, web, cluster),
    the requests done, and the cores other processes kept busy meanwhile."""
    web0, cluster0 = server.cpu_seconds()
    load0, busy0, began = own_cpu_seconds(), busy_cpu_seconds(), time.monotonic()
    rps, latencies, errors = load(server.port, bodies, args.requests, args.concurrency,
                                  args.max_seconds)
    load1, busy1, ended = own_cpu_seconds(), busy_cpu_seconds(), time.monotonic()
    web1, cluster1 = server.cpu_seconds()
    if errors:
        raise RuntimeError(f"{server.name}: {len(errors)} failed requests, e.g. "
                           f"{errors[:3]}\n{server.log()}")
    ours = (load1 - load0) + (web1 - web0) + (cluster1 - cluster0)
    others = max(0.0, (busy1 - busy0) - ours) / (ended - began)
    per_request = 1000 / len(latencies)
    cpu = ((load1 - load0) * per_request, (web1 - web0) * per_request,
           (cluster1 - cluster0) * per_request)
    return (rps, percentile(latencies, 0.5), percentile(latencies, 0.99), cpu,
            len(latencies), others)


def percentile(samples, fraction):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# -- report -------------------------------------------------------------------------


def report(args, results):
    print()
    print(f"POST /token, {args.requests} requests x {args.rounds} rounds, "
          f"{args.concurrency} concurrent keep-alive connections, waitress 8 threads, "
          f"{args.workers} workers; medians across rounds")
    medians, ceilings, rows = {}, {}, []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for name in VARIANTS:
        rounds = results[name]
        rps = statistics.median(r[0] for r in rounds)
        p50 = statistics.median(r[1] for r in rounds) * 1000
        p99 = statistics.median(r[2] for r in rounds) * 1000
        cpu = [statistics.median(r[3][i] for r in rounds) for i in range(3)]
        medians[name] = rps
        # What the CPU allows: all the cores busy, and neither the load
        # generator nor the web process (one GIL each) past one core.  The
        # cluster's CPU is spread over several worker processes.
        ceilings[name] = min(cores * 1000 / sum(cpu), 1000 / cpu[0], 1000 / cpu[1])
        per_round = " ".join(f"{r[0]:.0f}" for r in rounds)
        others = statistics.median(r[5] for r in rounds)
        rows.append([name, f"{rps:.1f}", f"{p50:.2f}", f"{p99:.2f}", f"{cpu[0]:.2f}",
                     f"{cpu[1]:.2f}", f"{cpu[2]:.2f}", f"{sum(cpu):.2f}", f"{others:.2f}",
                     per_round])
    print(table(["variant", "req/s", "p50 ms", "p99 ms", "CPU ms/request: load", "web",
                 "cluster", "total", "others", "req/s per round"], rows))
    ratio = medians["offloaded"] / medians["in-process"]
    verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
    print(f"offloaded / in-process requests/s: {ratio:.2f}x "
          f"({verdict} the {TARGET_RATIO}x target for 2 cores)")
    print("others: cores kept busy by other processes during the rounds (0 on a quiet "
          "machine)")
    print(f"CPU-bound ceilings from those CPU costs on {cores} cores: in-process "
          f"{ceilings['in-process']:.0f} req/s, offloaded {ceilings['offloaded']:.0f} req/s "
          f"({ceilings['offloaded'] / ceilings['in-process']:.2f}x)")
    return ratio


# -- main -------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few requests, 2 rounds")
    parser.add_argument("--requests", type=int, help="requests per round (default 1500)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="concurrent connections (default %(default)s)")
    parser.add_argument("--rounds", type=int, help="rounds per variant (default 3)")
    parser.add_argument("--workers", type=int, default=2,
                        help="powerhose workers for the offloaded variant (default %(default)s)")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="cap on one round's duration (default %(default)s)")
    args = parser.parse_args(argv)
    args.requests = args.requests or (150 if args.quick else 1500)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.warmup = 20 if args.quick else 100
    if args.requests < 1 or args.rounds < 1 or args.concurrency < 1 or args.workers < 1:
        parser.error("--requests, --rounds, --concurrency and --workers must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    print(describe_machine(), flush=True)
    servers = {}
    with harness.private_dir("ph-bench-") as run_dir:
        procs = Processes(run_dir)
        try:
            print(f"minting {ASSERTIONS} assertions, starting servers in {run_dir} ...",
                  flush=True)
            bodies = [json.dumps({"assertion": assertion.mint(f"user{i}@example.com",
                                                              ttl=3600)}).encode()
                      for i in range(ASSERTIONS)]
            servers["in-process"] = Server("in-process", False, procs, args.workers)
            servers["offloaded"] = Server("offloaded", True, procs, args.workers)
            for server in servers.values():
                server.wait_ready()
            for name, server in servers.items():  # warm-up: keys loaded, connections made
                _, _, errors = load(server.port, bodies, args.warmup, args.concurrency, 30)
                if errors:
                    raise RuntimeError(f"{name} warm-up failed: {errors[:3]}\n{server.log()}")
            results = {name: [] for name in VARIANTS}
            for round_no in range(args.rounds):
                order = VARIANTS if round_no % 2 == 0 else VARIANTS[::-1]
                for name in order:
                    result = measure(servers[name], bodies, args)
                    results[name].append(result)
                    print(f"round {round_no + 1}/{args.rounds} {name:<11} {result[0]:7.1f} "
                          f"req/s ({result[4]} requests)", flush=True)
            report(args, results)
            return 0
        finally:
            for server in servers.values():
                server.remember_family()
            procs.close(signal.SIGINT, grace=20)  # pserve exits and stops its cluster
            for server in servers.values():
                server.reap()


if __name__ == "__main__":
    harness.run_script(main)
