#!/usr/bin/env python
"""How long one thread hand-off takes on this machine.

A job through powerhose wakes about ten threads (``threads.py``): each
message crosses libzmq's I/O thread at each end of each hop.  What a
wake-up costs is the machine's, not ours, and on a virtual machine it
depends on where the woken thread runs.  This times the round trip of a
ping-pong between two processes over a pair of ``eventfd`` s, each side
pinned to a CPU, with the other side:

* on the same CPU: a plain context switch;
* on the other CPU, left idle: a halted virtual CPU must be woken, which
  is a VM exit and re-entry when the guest does not poll before halting;
* on the other CPU, which a ``nice`` 5 busy loop keeps running, as a
  worker running a job does: the woken thread preempts it;
* on the other CPU, left idle, with a PM QoS request that keeps idle CPUs
  polling instead of halting (``/dev/cpu_dma_latency`` set to 0; needs
  write access to it, usually root, and is reported as skipped without).

The cases take turns within each round; the report gives the median of
the rounds' medians.  Linux only, 2 CPUs or more.

    python bench/wakeups.py            # 9 rounds x 2000 round trips per case, about 10 s
    python bench/wakeups.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import struct
import sys
import time

from pyramid_powerhose.bench import describe_machine, table

GAP_NS = 50_000  # between round trips
STOP = 2  # a value the pinger never sends otherwise: the ponger exits
QOS_DEVICE = "/dev/cpu_dma_latency"
CASES = [
    ("same", "same CPU"),
    ("idle", "other CPU, idle"),
    ("busy", "other CPU, running a nice 5 busy loop"),
    ("poll", "other CPU, idle CPUs polling (PM QoS 0)"),
]


def fork(body):
    """A child process that runs ``body()`` and exits, whatever happens."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def stop(pid):
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def ponger(cpu, ping, pong):
    def body():
        os.sched_setaffinity(0, {cpu})
        while True:
            value = os.eventfd_read(ping)
            if value == STOP:
                return
            os.eventfd_write(pong, 1)
    return fork(body)


def spinner(cpu):
    def body():
        os.sched_setaffinity(0, {cpu})
        os.nice(5)
        while True:
            pass
    return fork(body)


@contextlib.contextmanager
def idle_cpus_polling():
    """Hold a PM QoS request of 0 us wake-up latency; None if not permitted."""
    try:
        fd = os.open(QOS_DEVICE, os.O_WRONLY)
    except OSError:
        yield None
        return
    try:
        os.write(fd, struct.pack("i", 0))
        time.sleep(0.05)  # the idle CPUs leave their halted state
        yield fd
    finally:
        os.close(fd)  # the request ends with the descriptor


def round_trips(case, cpus, count):
    """``count`` round trip times (us) for one case, or None if it cannot run here."""
    here, there = cpus
    if case == "same":
        there = here
    ping, pong = os.eventfd(0), os.eventfd(0)
    children = []
    try:
        with (idle_cpus_polling() if case == "poll" else contextlib.nullcontext(0)) as qos:
            if qos is None:
                return None
            if case == "busy":
                children.append(spinner(there))
            children.append(ponger(there, ping, pong))
            samples = []
            clock = time.perf_counter_ns
            os.eventfd_write(ping, 1)  # the first wakes a freshly forked child: not timed
            os.eventfd_read(pong)
            for _ in range(count):
                pause = clock() + GAP_NS  # the other side goes back to sleep, its CPU idle
                while clock() < pause:
                    pass
                started = clock()
                os.eventfd_write(ping, 1)
                os.eventfd_read(pong)
                samples.append((clock() - started) / 1000)
            os.eventfd_write(ping, STOP)
            return samples
    finally:
        for pid in children:
            stop(pid)
        os.close(ping)
        os.close(pong)


def measure(rounds, count):
    """Per case, the medians and 90th percentiles of each round."""
    results = {case: {"median": [], "p90": []} for case, _ in CASES}
    skipped = set()
    cpus = sorted(os.sched_getaffinity(0))[:2]
    os.sched_setaffinity(0, {cpus[0]})
    for r in range(rounds):
        order = CASES if r % 2 == 0 else CASES[::-1]
        for case, _ in order:
            if case in skipped:
                continue
            samples = round_trips(case, cpus, count)
            if samples is None:
                skipped.add(case)
                continue
            samples.sort()
            results[case]["median"].append(samples[len(samples) // 2])
            results[case]["p90"].append(samples[len(samples) * 9 // 10])
    return results, skipped


def report(results, skipped, rounds, count):
    rows = []
    for case, label in CASES:
        if case in skipped:
            rows.append([label, "skipped", "", f"(no write access to {QOS_DEVICE})"])
            continue
        medians = results[case]["median"]
        rows.append([label, f"{statistics.median(medians):.1f}",
                     f"{statistics.median(results[case]['p90']):.1f}",
                     f"[{min(medians):.1f}-{max(medians):.1f}]"])
    over = f"median of {rounds} rounds" if rounds > 1 else "one round"
    print(f"eventfd ping-pong between two processes, {count} round trips per case "
          f"and round, {over}")
    print()
    print(table(["hand-off round trip (us)", "median", "p90", "round medians"], rows))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--count", type=int, default=2000, help="round trips per case and round")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 200")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.count = 1, 200
    if args.rounds < 1 or args.count < 10:
        parser.error("--rounds must be at least 1 and --count at least 10")
    return args


def main(argv=None):
    args = parse_args(argv)
    if sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2:
        sys.exit("wakeups.py needs Linux and at least 2 CPUs")
    print(describe_machine())
    print()
    results, skipped = measure(args.rounds, args.count)
    report(results, skipped, args.rounds, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
