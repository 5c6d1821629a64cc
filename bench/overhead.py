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
    python bench/overhead.py --rst      # the header as one RST sentence, for a document
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics

import zmq

import harness
from harness import PAYLOAD, SERVE, THREADS, Load, Processes, req_caller, start_powerhose

from pyramid_powerhose.bench import describe_machine, table

TARGETS = {"latency": 1.3, "throughput": 1.0}  # from the issue


def echo(data):
    return data


# -- reporting ----------------------------------------------------------------


LABELS = {
    "direct": "(a) direct function call",
    "reqrep": "(b) pyzmq REQ/REP, 1 hop",
    "proxy": "(c) zmq.proxy relay, 2 hops",
    "powerhose": "(d) powerhose Client->broker->worker",
    "pool1": "(e) ProcessPoolExecutor(1)",
    "powerhose-8": "(d) powerhose, 2 workers",
    "pool2-8": "ProcessPoolExecutor(2)",
}


def report(args, lat, tput, rst):
    out = [describe_machine(rst), ""]
    out.append(f"{len(PAYLOAD)}-byte echo, one client thread; (d) has 2 workers. "
               f"{args.rounds} rounds x {args.count} round trips per variant, taking turns "
               f"every {harness.BLOCK}; "
               "median across rounds, [range of the rounds' medians]")
    out.append("")
    rows = []
    for name, per_round in lat.items():
        mean, med, tail = (statistics.median(s[i] for s in per_round) for i in range(3))
        medians = [s[1] for s in per_round]
        rows.append([LABELS[name], f"{mean:.1f}", f"{med:.1f}",
                     f"[{min(medians):.1f}-{max(medians):.1f}]", f"{tail:.1f}"])
    out.append(table(["round trip (us)", "mean", "median", "range", "p99"], rows))
    out.append("")
    rows = []
    for name, per_round in tput.items():
        rows.append([LABELS[name], f"{statistics.median(per_round):.0f}",
                     f"[{min(per_round):.0f}-{max(per_round):.0f}]"])
    out.append(table([f"{THREADS} client threads, {args.tput_count} jobs per round",
                      "jobs/s", "range"], rows))
    out.append("")

    def ratio(a, b, i=1):
        """Ratio of the medians across rounds, and the range of the per-round ratios."""
        if i is None:  # throughput
            pairs = list(zip(tput[a], tput[b]))
        else:  # 0: mean, 1: median round trip
            pairs = [(x[i], y[i]) for x, y in zip(lat[a], lat[b])]
        value, per_round = harness.ratio(pairs)
        return [f"{value:.2f}", per_round], value

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
    out.append(table(["ratio (of the medians)", "value", "per round", "target", "verdict"],
                     rows))
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
    parser.add_argument("--rst", action="store_true",
                        help="the machine header as one sentence, for an RST document")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.count = 3, 300
    if args.rounds < 1 or args.count < 1:
        parser.error("--rounds and --count must be positive")
    args.tput_count = 2 * args.count
    args.warmup = max(100, args.count // 5)
    return args


def main(argv=None):
    args = parse_args(argv)
    with harness.private_dir("ph-") as run_dir:
        procs = Processes(run_dir)
        pools, loads, ctx, client = [], [], None, None
        try:
            # Pools first: they fork, and a fork is only clean before zmq threads exist.
            pools = [concurrent.futures.ProcessPoolExecutor(n, initializer=harness.pool_child)
                     for n in (1, 2)]
            for pool in pools:
                assert pool.submit(echo, PAYLOAD).result() == PAYLOAD
            pool1, pool2 = pools
            procs.start("rep", SERVE + ["echo-bind", f"ipc://{run_dir}/rep.sock"])
            relay_front = harness.start_relay(procs, run_dir, "proxy", 1)
            ctx = zmq.Context()
            reqrep = req_caller(ctx, f"ipc://{run_dir}/rep.sock", procs)
            relay = req_caller(ctx, relay_front, procs)
            client, _, _ = start_powerhose(procs, f"ipc://{run_dir}/ph-front.sock",
                                           f"ipc://{run_dir}/ph-back.sock", harness.ECHO_TARGET, 2)
            assert client.execute(PAYLOAD) == PAYLOAD
            harness.say("processes ready; warming up")

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
            lat, tput = harness.run_rounds(latency, throughput, args.rounds, args.count,
                                           args.tput_count, args.warmup)
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
    return 0


if __name__ == "__main__":
    harness.run_script(main)
