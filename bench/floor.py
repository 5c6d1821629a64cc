#!/usr/bin/env python
"""Is the break-even ours, or libzmq's?  Job sizes around it, through
powerhose and through the bare libzmq floors, side by side.

At each job size, 4 client threads run the built-in GIL-holding job
(``pyramid_powerhose.bench:hmac_chain``) by four paths, which take turns
within every round (the order rotates from round to round):

* ``in-process``: the threads call the job themselves;
* ``powerhose``: ``Client.execute`` through the cluster ``get_cluster``
  starts (``powerhose-broker`` and 2 ``powerhose-worker``), as
  ``powerhose-bench`` does;
* ``relay``: a REQ socket per thread, ``zmq.proxy`` (ROUTER to DEALER,
  libzmq's own C loop) in a process of its own, 2 REP workers: the same
  four messages and four process hops per job as powerhose, with none of
  our code in the way, so **the floor for any broker on libzmq**;
* ``direct``: a REQ socket per thread connected to both REP workers, no
  broker: two messages per job, the floor for running the job in another
  process over libzmq at all (REQ sends round-robin, so a worker may
  hold two jobs while the other has none: a little below a true floor).

Every worker runs the same job at the same ``nice`` as the cluster's
(the ``nice`` setting, 5 by default).  For each size the report gives the
in-process CPU time per job (the size the job had while it ran, the axis
``powerhose-bench`` uses), the in-process jobs/s, and each path's speed-up
over in-process: the median over rounds of the ratio within a round.
Then each path's break-even, found as ``powerhose-bench`` finds it.  If
powerhose breaks even where the relay does, what is left to cut is not
in this project's code.

    python bench/floor.py                       # 0.1 to 1 ms, 5 rounds, about 4 minutes
    python bench/floor.py --sizes 0.2 0.3 0.4 --rounds 9
    python bench/floor.py --quick               # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys

import zmq

import harness
from harness import SERVE, Processes, ReqCaller, in_process, wait_until

from pyramid_powerhose import Client
from pyramid_powerhose.bench import BUILTIN_TARGET, break_even, describe_machine, jobs_for, table
from pyramid_powerhose.cluster import get_cluster

PATHS = ("in-process", "powerhose", "relay", "direct")
SIZES_MS = (0.1, 0.2, 0.3, 0.5, 1.0)
THREADS = 4
WORKERS = 2


def start_floors(procs, run_dir):
    """The relay and the direct workers; returns their callers."""
    front = harness.start_relay(procs, run_dir, "relay", WORKERS, job="jobs")
    direct = [f"ipc://{run_dir}/direct-{i}.sock" for i in range(WORKERS)]
    for i in range(WORKERS):
        procs.start(f"direct-worker-{i}", SERVE + ["jobs-bind", direct[i]])
    context = zmq.Context()
    return context, {"relay": ReqCaller(context, [front]), "direct": ReqCaller(context, direct)}


def report(sizes, measured, rounds):
    rows, points = [], {path: [] for path in PATHS[1:]}
    for ms, (rates, cpu) in zip(sizes, measured):
        row = [f"{ms:g}", f"{cpu:.3f}", f"{statistics.median(rates['in-process']):.0f}"]
        for path in PATHS[1:]:
            ratios = [a / b for a, b in zip(rates[path], rates["in-process"])]
            speedup = statistics.median(ratios)
            points[path].append((cpu, speedup))
            row.append(f"{speedup:.2f}x")
        mine = [a / b for a, b in zip(rates["powerhose"], rates["relay"])]
        row.append(f"{statistics.median(mine):.2f}")
        rows.append(row)
    print(table(["job ms", "CPU ms", "in-process jobs/s", "powerhose", "relay", "direct",
                 "powerhose/relay"], rows))
    over = f"medians over {rounds} rounds of" if rounds > 1 else "one round:"
    print(f"(speed-ups over in-process and powerhose/relay: {over} the ratio within a round; "
          "CPU ms: the in-process runs' CPU time per job)")
    for path, line in points.items():
        even = break_even(line)
        print(f"break-even, {path}: " + (f"{even:.3f} ms" if even else "not reached"))


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Speed-up over in-process threads through powerhose and through "
        "the bare libzmq floors, at job sizes around the break-even.")
    parser.add_argument("--sizes", type=float, nargs="+", default=list(SIZES_MS),
                        metavar="MS", help="job sizes, milliseconds of CPU "
                        "(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds per size, the paths taking turns (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=0,
                        help="jobs per path per round (default: about 2 s of work)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 sizes, 1 round of 40 jobs")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds, args.jobs = [0.1, 0.5], 1, 40
    if args.rounds < 1 or args.jobs < 0 or min(args.sizes) <= 0:
        parser.error("--rounds must be at least 1, --jobs and --sizes positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    print(describe_machine())
    print(f"{THREADS} threads; {WORKERS} workers behind powerhose, the relay and direct")
    with harness.private_dir("ph-floor-") as run_dir:
        procs = Processes(run_dir)
        cluster = context = callers = client = None
        try:
            cluster = get_cluster(BUILTIN_TARGET, numprocesses=WORKERS, background=True,
                                  timeout=0)
            cluster.start()
            client = Client(frontend=cluster.frontend, timeout=60)
            context, callers = start_floors(procs, run_dir)
            calls = {"in-process": in_process, "powerhose": client.execute, **callers}
            for path in PATHS[1:]:  # every worker has answered before anything is timed
                wait_until(lambda: all(calls[path](b"1") == in_process(b"1")
                                       for _ in range(2 * WORKERS)), procs, path)
            progress = harness.counter(len(args.sizes) * args.rounds * len(PATHS), "floor")
            measured = [harness.measure_size(calls, ms, args.jobs or jobs_for(ms), args.rounds, i,
                                             progress, THREADS)
                        for i, ms in enumerate(args.sizes)]
            print(file=sys.stderr)
            report(args.sizes, measured, args.rounds)
            return 0
        finally:
            procs.close()
            if cluster is not None:
                cluster.stop()
            # The calling threads are done, even after Ctrl-C (run_threads
            # waits for them): their sockets can be closed.
            if client is not None:
                client.close()
            if callers is not None:
                for caller in callers.values():
                    caller.close()
                context.term()


if __name__ == "__main__":
    harness.run_script(main)
