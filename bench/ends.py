#!/usr/bin/env python
"""Which end of the direct path costs what: the client's share and the
worker's share of a round trip, side by side in one run.

Three round trips of a 100-byte echo from one thread take turns every
``--count`` calls, ``--rounds`` times (medians across rounds):

* ``client -> worker``: ``Client.execute`` on a lease of a real cluster
  (``powerhose-broker`` and one ``powerhose-worker``), the direct path;
* ``DEALER -> worker``: a bare DEALER sending the frames the client sends
  (``protocol.direct_request``) to the same worker under the same lease,
  reading the reply with ``multipart``: no client logic;
* ``DEALER -> echo``: the same DEALER to a loop answering as the worker
  does (the same five frames), with no worker logic: the floor.

The first minus the second is what our client adds; the second minus the
third, what our worker adds.  (``bench/instructions.py`` counts the same
two shares in instructions, which do not move with the machine's load.)

    python bench/ends.py                 # 20 rounds x 300 calls each, about 30 s
    python bench/ends.py --quick         # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import zmq

import harness
from harness import PAYLOAD, Processes, wait_until

from pyramid_powerhose import multipart, protocol
from pyramid_powerhose.bench import describe_machine, table
from pyramid_powerhose.protocol import Request

VARIANTS = ("client -> worker", "DEALER -> worker", "DEALER -> echo")


def echo(endpoint):
    """The floor worker, run in a child: each direct job answered OK with its data."""
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        frames = multipart.recv(sock)
        multipart.send(sock, [frames[0], b"", frames[2], protocol.STATUS_OK, frames[3]])


class BareCall:
    """A DEALER sending a direct job under ``epoch`` and waiting for its answer."""

    def __init__(self, context, endpoint, epoch):
        self.sock = context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.epoch = epoch
        self.ids = 0

    def __call__(self):
        self.ids += 1
        frames = protocol.direct_request(
            self.epoch, 0, Request(b"default", b"%x" % self.ids, PAYLOAD))
        multipart.send(self.sock, frames)
        reply = multipart.recv_within(self.sock, 10000)
        if reply is None or reply[2] != protocol.STATUS_OK:
            raise RuntimeError(f"no answer, or not OK: {reply!r}")
        return reply[3]

    def close(self):
        self.sock.close(0)


def leased_endpoint(client, procs):
    """The (endpoint, epoch) of the lease ``client`` holds, once it holds one."""
    found = []

    def lease():
        client.execute(PAYLOAD)
        direct = client._direct
        if direct is not None and direct.by_epoch:
            found.append(next(iter(direct.by_epoch.values())))
        return found
    wait_until(lease, procs, "a lease on the worker")
    return found[0].endpoint, found[0].epoch


def main(argv=None):
    if len(sys.argv) > 2 and sys.argv[1] == "_echo":
        return echo(sys.argv[2])
    parser = argparse.ArgumentParser(description="The client's and the worker's shares of "
                                     "a direct round trip.")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--count", type=int, default=300, help="calls per variant per round")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds of 50")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.count = 3, 50
    if args.rounds < 1 or args.count < 1:
        parser.error("--rounds and --count must be positive")

    with harness.private_dir("ph-ends-") as run_dir:
        procs = Processes(run_dir)
        context = zmq.Context()
        calls = []
        client = None
        try:
            client, _, _ = harness.start_powerhose(
                procs, f"ipc://{run_dir}/front.sock", f"ipc://{run_dir}/back.sock",
                "tests.targets:echo", 1, name="ends")
            endpoint, epoch = leased_endpoint(client, procs)
            echo_endpoint = f"ipc://{run_dir}/echo.sock"
            procs.start("echo", [sys.executable, __file__, "_echo", echo_endpoint])
            calls = [lambda: client.execute(PAYLOAD), BareCall(context, endpoint, epoch),
                     BareCall(context, echo_endpoint, epoch)]
            medians = {name: [] for name in VARIANTS}
            for name, call in zip(VARIANTS, calls):  # warm-up, and the echo loop bound
                for _ in range(args.count):
                    if call() != PAYLOAD:
                        raise RuntimeError(f"{name}: wrong echo")
            for number in range(args.rounds):
                for name, call in zip(VARIANTS, calls):
                    start = time.perf_counter()
                    for _ in range(args.count):
                        call()
                    medians[name].append((time.perf_counter() - start) / args.count * 1e6)
                harness.say(f"round {number + 1}/{args.rounds} done")
            procs.check()
        finally:
            for call in calls[1:]:
                call.close()
            if client is not None:
                client.close()
            procs.close()
            context.term()

    median = {name: statistics.median(values) for name, values in medians.items()}
    rows = []
    for i, name in enumerate(VARIANTS):
        below = median[VARIANTS[i + 1]] if i + 1 < len(VARIANTS) else None
        rows.append([name, f"{median[name]:.1f}",
                     f"[{min(medians[name]):.1f}-{max(medians[name]):.1f}]",
                     "" if below is None else f"{median[name] - below:.1f}",
                     ["the client", "the worker", "(the floor)"][i]])
    print(describe_machine())
    print(f"\n{len(PAYLOAD)}-byte echo from one thread; {args.rounds} rounds x {args.count} "
          "calls, taking turns; medians across rounds [range]\n")
    print(table(["round trip (us)", "median", "range", "added", "by"], rows))
    return 0


if __name__ == "__main__":
    harness.run_script(main)
