#!/usr/bin/env python
"""Two brokers against one: what does spreading jobs over several brokers give?

Two clusters side by side on ipc: one broker with 2 echo workers, and two
brokers with 2 echo workers registered with both (a worker runs one job at
a time: PAUSE and RESUME tell the other broker); the client of the second
is given both frontends and spreads its jobs over them.  Round trips from
one thread and jobs/s from 8, taking turns within every round.

    python bench/brokers.py            # 7 rounds, about a minute
    python bench/brokers.py --quick    # smoke run
"""

from __future__ import annotations

import harness

from pyramid_powerhose import Client

WORKERS = 2


def start(procs, run_dir, name, brokers):
    frontends = [f"ipc://{run_dir}/{name}-f{i}.sock" for i in range(brokers)]
    backends = [f"ipc://{run_dir}/{name}-b{i}.sock" for i in range(brokers)]
    broker = harness.console_script("powerhose-broker", "pyramid_powerhose.cli.broker")
    for i, (front, back) in enumerate(zip(frontends, backends)):
        procs.start(f"{name}-broker-{i}", broker + ["--frontend", front, "--backend", back])
    worker = harness.console_script("powerhose-worker", "pyramid_powerhose.cli.worker")
    for i in range(WORKERS):
        procs.start(f"{name}-worker-{i}", worker + [harness.ECHO_TARGET] + [
            arg for back in backends for arg in ("--backend", back)])
    client = Client(frontend=frontends, timeout=60.0)
    harness.wait_until(lambda: all(
        stats and stats["services"].get("default", {}).get("workers") == WORKERS
        for stats in client.broker_stats(timeout=2).values()), procs, f"{name}'s workers")
    return client


def main(argv=None):
    args = harness.pair_args(__doc__.split("\n\n")[0], argv)
    with harness.private_dir("ph-brokers-") as run_dir:
        procs = harness.Processes(run_dir)
        try:
            clients = {"one broker": start(procs, run_dir, "one", 1),
                       "two brokers": start(procs, run_dir, "two", 2)}
            lat, tput = harness.run_pair(clients, args)
            procs.check()
        finally:
            procs.close()
        print(harness.pair_report(lat, tput, args, f"ipc, {WORKERS} echo workers", "",
                                  "one broker", "two brokers"))
        return 0


if __name__ == "__main__":
    harness.run_script(main)
