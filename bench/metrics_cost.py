#!/usr/bin/env python
"""What do the metrics cost a job?  The web process's metrics on and off, side by side.

One broker and 2 echo workers; two clients of it taking turns within every
round (:func:`harness.run_rounds`): a plain ``Client``, and the same
wrapped as ``pyramid_powerhose.metrics`` wraps it (``RecordingClient``: a
Prometheus histogram observation per call).  The broker's own statistics
(histograms of wait, run and total time, outcomes) are always kept, for
both: their cost is in every broker figure of ``engines.py``.

    python bench/metrics_cost.py            # 7 rounds, about a minute
    python bench/metrics_cost.py --quick    # smoke run
    PROMETHEUS_MULTIPROC_DIR=/tmp/m python bench/metrics_cost.py   # multiprocess mode
"""

from __future__ import annotations

import argparse
import os
import statistics

import harness
from harness import PAYLOAD, THREADS, Load, say

from pyramid_powerhose import Client
from pyramid_powerhose.bench import describe_machine, table
from pyramid_powerhose.metrics import RecordingClient

WORKERS = 2


def report(lat, tput, args):
    mode = "multiprocess" if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else "single-process"
    out = [describe_machine(args.rst), "",
           f"ipc, {WORKERS} echo workers, {args.rounds} rounds; round trip of a "
           f"{len(PAYLOAD)}-byte echo from one thread ({args.count} per round), jobs/s from "
           f"{THREADS} threads ({args.tput_count} per round); prometheus_client in {mode} "
           "mode; medians [range of the rounds].", ""]
    rows = []
    for name in lat:
        medians = [s[1] for s in lat[name]]
        rates = tput[name]
        rows.append([name, f"{statistics.median(medians):.1f}",
                     f"[{min(medians):.1f}-{max(medians):.1f}]",
                     f"{statistics.median(rates):.0f}", f"[{min(rates):.0f}-{max(rates):.0f}]"])
    out.append(table(["client", "round trip (us)", "range", "jobs/s", "range"], rows))
    rt, rt_rounds = harness.ratio([(a[1], b[1]) for a, b in zip(lat["metrics on"],
                                                                  lat["metrics off"])])
    jobs, jobs_rounds = harness.ratio(list(zip(tput["metrics on"], tput["metrics off"])))
    extra = statistics.median(a[1] - b[1] for a, b in zip(lat["metrics on"], lat["metrics off"]))
    out += ["", f"on / off: round trip {rt:.3f}x {rt_rounds} ({extra:+.1f} us, median of the "
            f"rounds); jobs/s {jobs:.3f}x {jobs_rounds}"]
    return "\n".join(out)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


def main(argv=None):
    args = parse_args(argv)
    with harness.private_dir("ph-metrics-") as run_dir:
        procs = harness.Processes(run_dir)
        clients, loads = [], []
        try:
            plain, _, _ = harness.start_powerhose(
                procs, f"ipc://{run_dir}/f.sock", f"ipc://{run_dir}/b.sock",
                harness.ECHO_TARGET, WORKERS)
            recording = RecordingClient(Client(frontend=plain.frontend, timeout=60.0),
                                        "default")
            clients += [plain, recording]
            latency = {"metrics off": lambda: plain.execute(PAYLOAD),
                       "metrics on": lambda: recording.execute(PAYLOAD)}
            throughput = {}
            for name, call in latency.items():
                loads.append(Load(call))
                throughput[name] = loads[-1]
            say("processes ready; warming up")
            lat, tput = harness.run_rounds(latency, throughput, args.rounds, args.count,
                                           args.tput_count, args.warmup)
            procs.check()
        finally:
            for load in loads:
                load.close()
            for client in clients:
                client.close()
            procs.close()
        print(report(lat, tput, args))
        return 0


if __name__ == "__main__":
    harness.run_script(main)
